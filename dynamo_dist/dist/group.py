"""Which ranks run the same code: resolving ``group=``, and setting up a group's own groups.

Pipeline stages run different code; the data- and tensor-parallel ranks of one stage
run the same code. So every exchange dynamo_dist makes is confined to a group of ranks
(``dynamo_dist.compile(..., group=...)``, default the whole world), and setting a
group up must involve its members only: a stage's ranks cannot wait for
ranks that never compile that stage.

torch's ``new_group`` is collective over the whole world, and its locally
synchronised form names groups after how many groups each process already has, which
members need not agree on. So a group's own gloo groups are built here directly on the
job's store, under a prefix named after the member ranks and how many times this
process has set that group up. Before building them, the members meet at a small
rendezvous in the store: each posts which group it is setting up, so ranks that
disagree about a group (rank 0 sets up ranks 0-2 while rank 1 sets up ranks 0-1) get a
:class:`RankDivergenceError` naming both views, instead of waiting forever.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dynamo_dist._errors import CollectiveTimeoutError, RankDivergenceError
from dynamo_dist._log import get_logger
from dynamo_dist.dist import proc
from dynamo_dist.dist import store as dist_store
from dynamo_dist.dynamo import compat

log = get_logger("group")

__all__ = [
    "all_gather_objects",
    "default_group",
    "gloo_group",
    "group_key",
    "group_name",
    "rendezvous",
    "resolve",
    "set_default_group",
]

_PREFIX = "dynamo_dist/groups"
_setups: dict[tuple[int, ...], int] = {}
_default: Any = None


def set_default_group(group: Any) -> None:
    """The group a ``dynamo_dist.compile`` without ``group=`` runs in (None: the world).

    Programs that never call ``dynamo_dist.compile`` themselves (every ``torch.compile``
    switched to it, see :func:`dynamo_dist.patch_torch_compile`) cannot pass ``group=``:
    an environment variable cannot name a process group. A pipeline-parallel program
    sets its stage's group here once, after ``init_process_group`` and before the first
    call of compiled code, since the switch decides the group at that call.
    """
    global _default
    if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
        mesh = getattr(group, "mesh", None)
        if not (
            isinstance(group, dist.ProcessGroup)
            or (isinstance(mesh, torch.Tensor) and hasattr(group, "get_group"))
        ):
            raise TypeError(
                "dynamo_dist.set_default_group: group must be None (the whole world), a "
                f"torch.distributed ProcessGroup or a DeviceMesh; got {type(group).__name__}"
            )
    _default = group


def default_group() -> Any:
    """What :func:`set_default_group` set (None: the whole world)."""
    return _default


def resolve(group: Any) -> tuple[int, ...]:
    """The sorted global ranks of ``group``: a ProcessGroup or a DeviceMesh, or None for
    the default group (:func:`set_default_group`, else the whole world).

    A DeviceMesh stands for all the ranks of this rank's (sub)mesh, e.g. one pipeline
    stage's dp x tp ranks in a torchtitan layout.
    """
    world = dist.get_world_size()
    if group is None:
        group = _default
    if group is None:
        return tuple(range(world))
    ranks: list[int]
    me = dist.get_rank()
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        # What torch's new_group returns on ranks outside the group.
        raise ValueError(
            f"dynamo_dist.compile: this rank ({me}) is not a member of the group passed as "
            "group= (new_group returned NON_GROUP_MEMBER here); every rank must pass a group "
            "it belongs to"
        )
    mesh = getattr(group, "mesh", None)
    if isinstance(mesh, torch.Tensor) and hasattr(group, "get_group"):
        ranks = [int(r) for r in mesh.flatten().tolist()]
    elif isinstance(group, dist.ProcessGroup):
        try:
            ranks = list(dist.get_process_group_ranks(group))
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"dynamo_dist.compile: group={group!r} is not a process group this rank "
                f"belongs to ({e}); pass a group this rank is a member of, or None"
            ) from e
    else:
        raise TypeError(
            f"dynamo_dist.compile: group must be None (the whole world), a "
            f"torch.distributed ProcessGroup or a DeviceMesh; got {type(group).__name__}"
        )
    if me not in ranks:
        raise ValueError(
            f"dynamo_dist.compile: this rank ({me}) is not a member of group={group!r} "
            f"(ranks {sorted(ranks)}); every rank must pass a group it belongs to"
        )
    return tuple(sorted(set(ranks)))


def group_name(ranks: Sequence[int], world: int) -> str:
    """``world``, or ``ranks 0,1`` with runs compressed (``ranks 0-7,16-23``)."""
    if list(ranks) == list(range(world)):
        return "world"
    parts: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return "ranks " + ",".join(parts)


def group_key(ranks: Sequence[int], world: int) -> str:
    """A store-safe key naming the group (and this job attempt)."""
    return f"{proc.restart_count()}/" + group_name(ranks, world).replace(" ", "_")


def rendezvous(
    store: Any, ranks: tuple[int, ...], timeout: float, stall_warning: float, where: str
) -> str:
    """Meet the other members of ``ranks``; returns the store prefix of this setup.

    Raises RankDivergenceError when a member is setting up a different group that
    includes this rank (both wait for each other: a certain deadlock), or when a member
    failed its own setup; CollectiveTimeoutError after ``timeout``.
    """
    me = dist.get_rank()
    world = dist.get_world_size()
    n = _setups.get(ranks, 0)
    _setups[ranks] = n + 1
    restart = proc.restart_count()
    base = f"{_PREFIX}/{group_key(ranks, world)}/{n}"
    pending_key = f"{_PREFIX}/{restart}/pending/"
    mine: dict[str, object] = {"ranks": list(ranks), "state": "waiting", "where": where}
    store.set(pending_key + str(me), json.dumps(mine))
    store.set(f"{base}/member/{me}", "1")
    start = time.monotonic()
    warned = False
    next_check = 0.5
    views: dict[int, dict[str, Any] | None] = {}
    delay = 0.002
    try:
        while True:
            missing = [m for m in ranks if not store.check([f"{base}/member/{m}"])]
            if not missing:
                break
            waited = time.monotonic() - start
            if waited >= next_check:
                next_check = waited + 1.0
                views = {m: _pending(store, pending_key, m) for m in ranks if m != me}
                _refuse_crossed_setups(ranks, mine, views, missing)
                if not warned and waited >= stall_warning:
                    warned = True
                    log.warning(
                        "setting up %s for dynamo_dist.compile (at %s): waited %.0fs for "
                        "ranks %s: %s. Every member must call dynamo_dist.compile with this "
                        "group; timeout %.0fs",
                        group_name(ranks, world),
                        where,
                        waited,
                        missing,
                        "; ".join(_where(m, views[m]) for m in missing),
                        timeout,
                    )
                if waited >= timeout:
                    raise CollectiveTimeoutError(
                        f"setting up {group_name(ranks, world)} for dynamo_dist.compile (at "
                        f"{where}) timed out after {waited:.0f}s: ranks {missing} never "
                        f"joined ({'; '.join(_where(m, views[m]) for m in missing)}). "
                        "Every member of the group must call dynamo_dist.compile with it.",
                        missing=missing,
                    )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    except BaseException as e:
        store.set(pending_key + str(me), json.dumps({**mine, "state": "failed", "error": str(e)}))
        raise
    store.set(pending_key + str(me), json.dumps({**mine, "state": "done"}))
    return base


def _refuse_crossed_setups(
    ranks: tuple[int, ...],
    mine: dict[str, object],
    views: dict[int, dict[str, Any] | None],
    missing: list[int],
) -> None:
    """Raise RankDivergenceError if a member's setup record shows the wait cannot end.

    Either a member failed its own setup of a group that includes this rank, or a
    missing member failed any setup (the error is on its way up its program, which will
    not join this group: a rank outside two others' disagreement about a group would
    otherwise wait out the timeout for one of them), or a missing member waits on a
    different group that includes this rank: each waits for the other, a certain
    deadlock.
    """
    me = dist.get_rank()
    world = dist.get_world_size()
    where = mine["where"]
    for m, view in views.items():
        if view is None:
            continue
        other = tuple(view.get("ranks", ()))
        if view.get("state") == "failed" and (other == ranks or me in other or m in missing):
            raise RankDivergenceError(
                f"rank {m} failed to set up its group {group_name(other, world)} "
                f"for dynamo_dist.compile ({view.get('error', 'unknown error')}); "
                f"this rank was setting up {group_name(ranks, world)} (at {where}) with it, "
                f"and rank {m} will not join it. Fix the error on rank {m} first.",
                {m: view, me: mine},
            )
        if m in missing and view.get("state") == "waiting" and other != ranks and me in other:
            raise RankDivergenceError(
                "ranks disagree about the group of a dynamo_dist.compile call: "
                f"rank {me} sets up {group_name(ranks, world)} (at {where}), "
                f"rank {m} sets up {group_name(other, world)} "
                f"(at {view.get('where', '?')}), and each waits for the other. "
                "Every member of a group must pass the same group (the same ranks) "
                "to dynamo_dist.compile, and create groups in the same order.",
                {me: mine, m: view},
            )


def _pending(store: Any, prefix: str, rank: int) -> dict[str, Any] | None:
    try:
        if not store.check([prefix + str(rank)]):
            return None
        raw = dist_store.checked(store.get(prefix + str(rank)), "group-setup record")
        view = json.loads(raw)
        if not isinstance(view, dict):
            return None
        # Its ranks are named (group_name) and its texts quoted in the setup's errors:
        # another type there would raise in place of the error that explains the wait.
        ranks = view.get("ranks", [rank])
        if not (
            isinstance(ranks, list)
            and ranks
            and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
        ) or any(not isinstance(view.get(k, ""), str) for k in ("state", "where", "error")):
            raise dist_store.PayloadRefused("group-setup record has a field of another type")
        return view
    except dist_store.PayloadRefused as e:
        dist_store.refuse("group-setup record", e)
        return None
    except Exception:
        return None


def _where(rank: int, view: dict[str, Any] | None) -> str:
    if view is None:
        return f"rank {rank} has not set up any group yet"
    world = dist.get_world_size()
    other = group_name(view.get("ranks", []) or [rank], world)
    return f"rank {rank} {view.get('state', '?')} setting up {other} at {view.get('where', '?')}"


def gloo_group(store: Any, prefix: str, ranks: Sequence[int], timeout: float) -> Any:
    """A CPU gloo group over ``ranks`` (this rank must be one), built by its members only."""
    group_rank = list(ranks).index(dist.get_rank())
    return dist.ProcessGroupGloo(
        dist.PrefixStore(f"{prefix}/", store),
        group_rank,
        len(ranks),
        timedelta(seconds=timeout),
    )


def all_gather_objects(pg: Any, obj: Any) -> list[Any]:
    """``all_gather_object`` on a group built by :func:`gloo_group` (unregistered with c10d).

    Objects come from the job's own ranks (as with torch's ``all_gather_object``).
    """
    data = pickle.dumps(obj)
    n = pg.size()
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    pg.allgather([sizes], [size]).wait()
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    outs = [torch.empty(longest, dtype=torch.uint8) for _ in range(n)]
    pg.allgather([outs], [buf]).wait()
    lengths = [int(s.item()) for s in sizes]
    return [pickle.loads(o[:k].numpy().tobytes()) for o, k in zip(outs, lengths, strict=True)]


def job_store() -> Any:
    """The job's key-value store (the default process group's)."""
    return compat.default_store()
