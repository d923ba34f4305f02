"""The per-process runtime's lifecycle: the board, the router hook, the groups of ranks.

The jobs are split along the architecture: the hook (``_hook``), the exchange
(``_collective``, ``_shm``), the policy (``_policy``) and the frame callback
(``_callback``), consensus (``_consensus``), the cache (``_cache``). This module
owns one process's instance of them, from the first ``dynamo_dist.compile`` to exit:
one :class:`Group` per set of ranks that compiles together (``group=``), and
assembles its typed stats (``_stats``), totals and per group. Intercepting
``torch.compile`` to attach the callback lives above it, in ``_intercept``.
"""

from __future__ import annotations

import atexit
import logging
import os
from functools import reduce
from typing import Any

import torch.distributed as dist

from dynamo_dist import _counts
from dynamo_dist._config import Config
from dynamo_dist._log import get_logger
from dynamo_dist.cache import backend
from dynamo_dist.dist import group as dist_group
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dist.group import group_name
from dynamo_dist.dist.local import GroupInfo
from dynamo_dist.dist.store import open_store, refused_count
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C, describe_identity
from dynamo_dist.exchange import consensus as exchange_consensus
from dynamo_dist.exchange import stats as exchange_stats
from dynamo_dist.exchange.collective import GlooTransport, Transport, percentiles
from dynamo_dist.exchange.policy import Policy
from dynamo_dist.exchange.record import MixedSlot
from dynamo_dist.exchange.shm import ShmTransport, ShmUnavailable, topology
from dynamo_dist.exchange.stats import (
    Counts,
    GroupStats,
    HookCounters,
    RuntimeStats,
    Stats,
    TransportStats,
)
from dynamo_dist.exchange.status import StatusBoard
from dynamo_dist.exchange.watch import STALL_EXIT_CODE, Stale, StallWatch
from dynamo_dist.tools import report as tools_report

log = get_logger("runtime")


class Group:
    """One group of ranks on this rank: its transport, C++ hook, policy, counts and info.

    Set up on the first ``dynamo_dist.compile`` naming the group, collectively over the
    group's members only (``dist_group.rendezvous``, then gloo groups of its own). A group of
    one rank has nobody to exchange with: no transport, no hook.
    """

    def __init__(
        self, cfg: Config, ranks: tuple[int, ...], board: StatusBoard | None, where: str
    ) -> None:
        world = dist.get_world_size()
        self.ranks = ranks
        self.name = group_name(ranks, world)
        self.counts = Counts()
        #: The handoff of a mixed outcome from the exchange to the policy (its docstring
        #: says why it cannot be a return value).
        self.mixed_slot = MixedSlot()
        self.transport: Transport | None = None
        self.hook: _C.GuardHook | None = None
        self.policy: Policy | None = None
        self.consensus = False
        if len(ranks) == 1:
            self.info: GroupInfo | None = None
            return
        store = dist_group.job_store()
        prefix = dist_group.rendezvous(store, ranks, cfg.timeout, cfg.stall_warning, where)
        # The group's own gloo groups; their timeout is what bounds an exchange on the
        # network.
        guard = dist_group.gloo_group(store, f"{prefix}/guard", ranks, cfg.timeout)
        self.transport = _make_transport(
            cfg, guard, ranks, self.name, board, store, prefix, self.mixed_slot
        )
        consensus_group = None
        if cfg.compiler_collectives and exchange_consensus.enable():
            consensus_group = dist_group.gloo_group(
                store, f"{prefix}/consensus", ranks, cfg.timeout + 60.0
            )
            self.consensus = True
        self.info = GroupInfo(
            name=self.name,
            key=dist_group.group_key(ranks, world),
            size=len(ranks),
            consensus=consensus_group,
            ranks=tuple(sorted(ranks)),
        )
        self.hook = self.transport.make_hook()
        self.policy = Policy(self.transport, self.hook, self.counts, self.mixed_slot)
        if board is not None:
            transport = self.transport
            board.positions[self.name] = lambda: (*transport.position(), transport.last_epoch())
            board.ticks.append(transport.watch)
        log.info(
            "guard exchange for %s on (transport %s, timeout %.0fs, %d ranks, consensus %s)",
            self.name,
            self.transport.name,
            cfg.timeout,
            len(ranks),
            "on" if self.consensus else "off",
        )

    def close(self) -> None:
        """Break the reference cycles between the transport and the C++ objects it feeds.

        The hook holds the transport's bound methods (its slow path), the transport
        holds the hook; the shared-memory segment holds the transport's wait logger and
        cross-host step, the transport holds the segment. The garbage collector cannot
        see references held in C++, so without this the transport, its gloo groups and
        its mapping would outlive shutdown. The hook passes results through afterwards.
        """
        if self.hook is not None:
            self.hook.release()
        if self.transport is not None:
            self.transport.close()

    def samples_ns(self) -> tuple[list[int], list[int]]:
        """(cost, wait) of this group's recent exchanges, in ns (``GuardHook.samples_ns``)."""
        return self.hook.samples_ns() if self.hook is not None else ([], [])

    def stats(self) -> GroupStats:
        tr = self.transport
        cost, wait = self.samples_ns()
        return GroupStats(
            ranks=list(self.ranks),
            transport=TransportStats(
                name=tr.name if tr is not None else "none",
                exchanges=tr.position()[0] if tr is not None else 0,
                mixed_outcomes=tr.mixed if tr is not None else 0,
                divergences=(tr.divergences if tr is not None else 0) + self.counts.strict_errors,
                **percentiles(cost, "cost"),
                **percentiles(wait, "wait"),
            ),
            compiles=self.counts.compiles,
            local_compiles=self.counts.local_compiles,
            first_entry_exchanges=self.counts.first_entry_exchanges,
            recompiles=self.counts.recompiles,
            recompile_reasons=dict(self.counts.recompile_reasons),
            regions={k: dict(v) for k, v in self.counts.regions.items()},
        )


class Runtime:
    """Everything dynamo_dist keeps per process once a distributed job compiles.

    Creating it is not collective: it opens the status board and installs the router
    hook. Each :class:`Group` is set up on first use, by that group's members.
    """

    def __init__(self, cfg: Config) -> None:
        global _generation
        _generation += 1
        # Runtimes are created and shut down in the same order on every rank,
        # so this numbers the job-report keys consistently across ranks.
        self.generation = _generation
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        store = open_store(cfg.timeout)
        self.board = (
            StatusBoard(store, self.rank, self.world_size, cfg.status_interval, describe_identity)
            if store is not None
            else None
        )
        if self.board is not None:
            self.board.in_local = lambda: _C.local_active_threads() > 0
            watch = StallWatch(
                self.board,
                self.rank,
                self.world_size,
                cfg.stall_warning,
                cfg.wait_log_interval,
                self._end_stalled_job if cfg.stall_abort else None,
            )
            self.board.ticks.append(watch.tick)
        self.groups: dict[tuple[int, ...], Group] = {}
        self.router = _C.Router()
        self._previous_hook = dynamo_hook.install(self.router)
        log.info("guard exchange on (policy %s, %d ranks)", cfg.policy, self.world_size)

    def group(self, ranks: tuple[int, ...], where: str) -> Group:
        """The group of ``ranks``, set up (collectively over its members) on first use."""
        g = self.groups.get(ranks)
        if g is None:
            g = Group(self.cfg, ranks, self.board, where)
            self.groups[ranks] = g
        return g

    def close(self) -> None:
        """Uninstall, restore Dynamo's settings, and hand this rank's stats to the job report."""
        stats = self.stats().as_dict()
        dynamo_hook.uninstall(self.router, self._previous_hook)
        exchange_consensus.disable()
        _C.set_pending_error(None)
        for g in self.groups.values():
            g.close()
        if self.board is not None:
            self.board.close("exited")
            tools_report.publish_and_collect(
                self.board.store,
                self.generation,
                self.rank,
                self.world_size,
                stats,
                wait_s=min(self.cfg.timeout, 30.0),
                path=self.cfg.report,
                started=self.board.started,
                records=self.board.snapshot,
                # Two heartbeats (a live rank's record changes at least once in each).
                silent_after=2 * (2 * self.board.interval + self.board.tick_interval),
                verbose=self.cfg.report_verbose,
            )

    def abandon_in_child(self) -> None:
        """In a forked child: let go of everything this runtime shares with its parent.

        The child has the parent's segment mapped, its sockets and store connection open,
        and each group's hook at the parent's sequence number. A post there from the child
        would pair with the parent's peers in place of the parent. So the hooks are released
        (they pass every result through), the router is swapped for a hook that says so
        once, and nothing is closed or published: the segment's lease, the native
        exchange's sockets (a shutdown is seen by the parent's peer) and the status board
        all stay the parent's. The objects stay referenced for the child's life
        (``_abandoned``): nothing of them is torn down while the child runs.
        """
        _abandoned.append(self)
        for g in self.groups.values():
            if g.hook is not None:
                g.hook.release()
        _C.set_pending_error(None)
        child_hook = _ForkedChildHook(self._previous_hook)
        _abandoned.append(child_hook)
        dynamo_hook.replace(self.router, child_hook)

    def _end_stalled_job(self, stale: list[Stale]) -> None:
        """``stall_abort``: write the job report and end this process (on the board's thread).

        The main thread may be blocked in torch's C++ (a collective waiting for the stale
        rank), where no exception reaches it; ending the process lets the launcher end
        the job (torchrun stops the other ranks, the stopped one included).
        """
        log.error(
            "stall_abort: ending rank %d with exit status %d, as rank(s) %s stopped; the "
            "launcher ends the job",
            self.rank,
            STALL_EXIT_CODE,
            ", ".join(str(s.rank) for s in stale),
        )
        try:
            tools_report.write_stall_report(
                self.rank,
                self.world_size,
                self.stats().as_dict(),
                [{"rank": s.rank, "silent_s": round(s.silent_s, 1), **s.record} for s in stale],
                self.cfg.report,
            )
        finally:
            logging.shutdown()
            os._exit(STALL_EXIT_CODE)

    def stats(self) -> Stats:
        """This rank's typed stats record: totals over its groups, each group, the cache."""
        groups = {g.name: g.stats() for g in self.groups.values()}
        gs = list(groups.values())
        hooks = [g.hook.counters() for g in self.groups.values() if g.hook is not None]
        hook_totals = {k: sum(int(h.get(k, 0)) for h in hooks) for k in hooks[0]} if hooks else {}
        samples = [g.samples_ns() for g in self.groups.values()]
        names = sorted({g.transport.name for g in groups.values()} - {"none"})
        runtime = RuntimeStats(
            policy=self.cfg.policy,
            consensus=any(g.consensus for g in self.groups.values()),
            hook=HookCounters.from_hook(hook_totals),
            transport=TransportStats(
                name="+".join(names) if len(names) != 1 else names[0],
                exchanges=sum(g.transport.exchanges for g in groups.values()),
                mixed_outcomes=sum(g.transport.mixed_outcomes for g in groups.values()),
                divergences=sum(g.transport.divergences for g in groups.values()),
                **percentiles((ns for cost, _ in samples for ns in cost), "cost"),
                **percentiles((ns for _, wait in samples for ns in wait), "wait"),
            ),
            first_entry_exchanges=sum(g.first_entry_exchanges for g in groups.values()),
            compiles=sum(g.compiles for g in groups.values()),
            local_compiles=sum(g.local_compiles for g in groups.values()),
            recompiles=sum(g.recompiles for g in groups.values()),
            recompile_reasons=reduce(_counts.add, (g.recompile_reasons for g in gs), {}),
            traced_by_region=reduce(_counts.add, (g.regions for g in gs), {}),
            groups=groups,
            regions=exchange_stats.regions(
                (f for g in self.groups.values() if g.hook is not None for f in g.hook.frames()),
                _region_of,
            ),
        )
        return Stats(
            rank=self.rank,
            world_size=self.world_size,
            runtime=runtime,
            cache=backend.stats(),
            store_refused=refused_count(),
        )


def _region_of(ident: int) -> str:
    """The label of the compiled region a frame identity belongs to (``region_label``)."""
    if ident < 0:  # GuardHook.frames(): the identities beyond its cap, together
        return "other frames (beyond 4096 distinct in a group)"
    desc = _C.describe_identity(ident)
    return dynamo_hook.region_label(desc[2]) if desc is not None else "frames without a description"


def _make_transport(
    cfg: Config,
    guard: Any,
    ranks: tuple[int, ...],
    name: str,
    board: StatusBoard | None,
    store: Any,
    prefix: str,
    mixed_slot: MixedSlot,
) -> Transport:
    """Shared memory within hosts (hierarchical across them) unless gloo is asked for.

    ``guard``: the group's own gloo process group for the exchange; ``name``: its name.
    """
    common: dict[str, Any] = {
        "group": guard,
        "ranks": ranks,
        "group_name": name,
        "timeout": cfg.timeout,
        "wait_log_interval": cfg.wait_log_interval,
        "stall_warning": cfg.stall_warning,
        "board": board,
        "describe": describe_identity,
        "mixed_slot": mixed_slot,
    }
    if cfg.transport in ("auto", "shm"):
        topo = topology(guard, ranks)
        try:
            return ShmTransport(
                topo=topo,
                store=store,
                prefix=prefix,
                leader_exchange=cfg.leader_exchange,
                busy_poll=cfg.leader_busy_poll,
                **common,
            )
        except ShmUnavailable as e:
            level = log.warning if cfg.transport == "shm" else log.info
            level("shared-memory guard exchange unavailable (%s); using gloo", e)
    return GlooTransport(**common)


class _ForkedChildHook:
    """The guard-complete hook of a forked child: passes results through, warns once.

    Compiled calls that hit their cache reach no Python code of ours but this hook; the
    first one logs the child's one warning, and the hook puts back the one that was
    installed before dynamo_dist's. The object stays referenced (``_abandoned``) while
    Dynamo may still be calling it.
    """

    def __init__(self, previous: object | None) -> None:
        self.previous = previous

    def __call__(self, hit: bool) -> bool:
        dist_local.warn_forked_child()
        dynamo_hook.uninstall(self, self.previous)
        previous = self.previous
        return bool(previous(hit)) if callable(previous) else hit


def _after_fork_in_child() -> None:
    """``os.register_at_fork(after_in_child=...)``: a forked child never joins the channel.

    Runs in the child of every fork (DataLoader workers, ``os.fork``, multiprocessing's
    fork start method) while it is the child's only thread. A child of a rank whose
    runtime has not started yet (a DataLoader iterator made before the first compiled
    call) is marked too: it inherits the initialized process group, and would otherwise
    start a runtime of its own as its parent's rank and set up groups with the other
    ranks' children. ``ensure`` refuses to start one in a marked child; a grandchild
    inherits its parent's mark.
    """
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        dist_local.mark_forked_child(f"rank {rt.rank} (pid {os.getppid()})")
        rt.abandon_in_child()
    elif distributed_world() > 1:
        dist_local.mark_forked_child(f"rank {dist.get_rank()} (pid {os.getppid()})")


_runtime: Runtime | None = None
_generation = 0
#: What a forked child inherited and let go of, kept referenced while it runs: nothing the
#: parent still uses (its gloo groups, sockets, segment) is torn down from the child.
_abandoned: list[object] = []
os.register_at_fork(after_in_child=_after_fork_in_child)


def distributed_world() -> int:
    """The job's world size; 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def ensure(cfg: Config) -> Runtime | None:
    """The process's runtime, created on first use; None for single-process programs."""
    global _runtime
    if distributed_world() <= 1 or cfg.policy == "off" or dist_local.forked_from() is not None:
        return None  # a forked child of a rank joins nothing: its compiled calls are local
    if _runtime is None:
        _runtime = Runtime(cfg)
        # The report must be collected while the store still answers: at exit,
        # before torch's own atexit handlers tear distributed state down.
        atexit.register(shutdown)
    elif (cfg.timeout, cfg.transport) != (_runtime.cfg.timeout, _runtime.cfg.transport):
        log.warning(
            "timeout/transport are per process and already set to %.0fs/%s; ignoring %.0fs/%s",
            _runtime.cfg.timeout,
            _runtime.cfg.transport,
            cfg.timeout,
            cfg.transport,
        )
    return _runtime


def current() -> Runtime | None:
    """The process's runtime, if one was created and not shut down."""
    return _runtime


def stats() -> Stats:
    """This rank's stats record, with or without a runtime."""
    if _runtime is not None:
        return _runtime.stats()
    return Stats(
        rank=0, world_size=distributed_world(), cache=backend.stats(), store_refused=refused_count()
    )


def shutdown() -> None:
    """Close the runtime if there is one (idempotent)."""
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None
