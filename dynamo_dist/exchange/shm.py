"""Shared-memory guard exchange within a host, hierarchical across hosts.

The local ranks of a host agree through a segment (``csrc/shm_exchange.cpp``)
in microseconds; with several hosts, one leader per host (local rank 0) takes
the host's combined record to the other leaders over a gloo group of leaders
(recursive doubling, ``_collective.DoublingExchange``, or gloo's allreduce), and
publishes the verdict to its local ranks. The record format and the
decision are the same as the gloo transport's, so both give identical verdicts
and identical errors.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dynamo_dist._log import get_logger
from dynamo_dist.dist import store as dist_store
from dynamo_dist.dist.group import all_gather_objects, gloo_group
from dynamo_dist.dist.proc import pid_alive
from dynamo_dist.dynamo.hook import _C
from dynamo_dist.exchange.allreduce import BandAllreduce, DoublingExchange, LeaderExchange
from dynamo_dist.exchange.collective import Transport
from dynamo_dist.exchange.native import NativeExchange, native_or_none

log = get_logger("shm")

_SHM_DIR = "/dev/shm"
_PREFIX = "dynamo_dist."
_STATUS = {1: "timeout", 2: "peer_dead", 3: "aborted"}
# How much of a rank's cause of giving up the host's other ranks read (one line of text).
_CAUSE_CHARS = 1000
# A segment not readable as an exchange is judged by its name's pid, which
# means nothing across PID namespaces; its age guards a live creator's
# microseconds between creating the segment and writing its header.
_UNREADABLE_GRACE_S = 60.0


@dataclass(frozen=True)
class Topology:
    """Which ranks share this host, from torchrun's environment or, failing that, hostnames."""

    local_rank: int
    local_world: int
    hosts: int
    local_ranks: list[int]  # global ranks on this host, local rank order
    leaders: list[int]  # global rank of each host's local rank 0, host order
    group_ranks: list[int]  # the group's global ranks, in group order

    @property
    def group_index(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.group_ranks)}


def topology(group: Any, ranks: Sequence[int]) -> Topology:
    """Collective over ``group`` (global ranks ``ranks``): each reports its host and LOCAL_RANK."""
    env_ok = all(k in os.environ for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"))
    host_key = f"group{os.environ['GROUP_RANK']}" if env_ok else _host_identity()
    local = int(os.environ["LOCAL_RANK"]) if env_ok else -1
    records: list[tuple[str, int]] = all_gather_objects(group, (host_key, local))
    hosts: dict[str, list[tuple[int, int]]] = {}
    for rank, rec in zip(ranks, records, strict=True):
        assert rec is not None
        hosts.setdefault(rec[0], []).append((rec[1], rank))
    order = sorted(hosts, key=lambda k: min(r for _, r in hosts[k]))
    members = []
    for key in order:
        locals_ = hosts[key]
        # A missing or inconsistent LOCAL_RANK falls back to global-rank order.
        if sorted(lr for lr, _ in locals_) != list(range(len(locals_))):
            locals_ = [(i, r) for i, (_, r) in enumerate(sorted(locals_, key=lambda t: t[1]))]
        members.append([r for _, r in sorted(locals_)])
    me = dist.get_rank()
    host = next(i for i, m in enumerate(members) if me in m)
    return Topology(
        local_rank=members[host].index(me),
        local_world=len(members[host]),
        hosts=len(members),
        local_ranks=members[host],
        leaders=[m[0] for m in members],
        group_ranks=list(ranks),
    )


def _host_identity() -> str:
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


def shm_available() -> bool:
    return os.path.isdir(_SHM_DIR) and os.access(_SHM_DIR, os.W_OK)


def sweep_stale_segments() -> None:
    """Remove segments left by a leader that died between creating and unlinking one.

    A segment's creator holds a lease in it (a robust mutex the kernel marks
    owner-dead when the process exits), readable from any PID namespace: a
    segment whose creator let go of it is stale, one whose creator holds it is
    live whatever its name's pid means here. Segments that are not readable as
    an exchange (a crash before the header was written, another version's
    layout) go only when the pid in their name is gone here and they are old.
    Segments are unlinked as soon as every local rank attached, so this only
    ever finds leftovers of a crash during start-up.
    """
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        try:
            pid = int(name.split(".")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        path = os.path.join(_SHM_DIR, name)
        alive = _C.ShmExchange.creator_alive("/" + name)
        if alive is None:
            try:
                age = time.time() - os.stat(path).st_mtime
            except OSError:
                continue
            alive = pid_alive(pid) or age < _UNREADABLE_GRACE_S
        if not alive:
            try:
                os.unlink(path)
                log.info("removed stale shared-memory segment %s (its creator is gone)", name)
            except OSError:
                pass


class ShmUnavailable(RuntimeError):
    """Some rank could not create or attach the segment; every rank falls back together."""


def _open_segment(
    group: Any,
    topo: Topology,
    hierarchical: bool,
    timeout: float,
    log_interval: float,
) -> _C.ShmExchange:
    """Create (leader) or attach (others) this host's segment. Collective over ``group``.

    Every step ends in an agreement over all ranks, so a failure on one rank
    (no /dev/shm, a full tmpfs) makes all ranks fall back to gloo together
    instead of leaving some waiting in a collective the others skipped.
    """
    seg: _C.ShmExchange | None = None
    name: str | None = None
    error = ""
    try:
        if topo.local_rank == 0:
            try:
                if not shm_available():
                    raise OSError(f"{_SHM_DIR} is missing or not writable")
                sweep_stale_segments()
                name = f"/{_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"
                seg = _C.ShmExchange(
                    name, True, 0, topo.local_world, hierarchical, timeout, log_interval
                )
            except (OSError, RuntimeError) as e:
                error, name = str(e), None
        names: list[str | None] = all_gather_objects(group, name)
        leader_name = names[topo.group_index[topo.local_ranks[0]]]
        if topo.local_rank != 0:
            if leader_name is None:
                error = "the host's leader could not create the segment"
            else:
                try:
                    seg = _C.ShmExchange(
                        leader_name,
                        False,
                        topo.local_rank,
                        topo.local_world,
                        hierarchical,
                        timeout,
                        log_interval,
                    )
                except (OSError, RuntimeError) as e:
                    error = str(e)
        gathered: list[tuple[str, list[int]]] = all_gather_objects(
            group, (error, sorted(os.sched_getaffinity(0)))
        )
    finally:
        # Every rank has attached (or failed) by now, or a collective raised: the
        # leader removes the name either way. The mapping lives on, and no crash
        # from here on can leave a segment behind.
        if topo.local_rank == 0 and seg is not None:
            seg.unlink()
    failed = {r: g[0] for r, g in zip(topo.group_ranks, gathered, strict=True) if g[0]}
    if failed or seg is None:
        raise ShmUnavailable("; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items())))
    seg.set_cpus(host_cpus([gathered[topo.group_index[r]][1] for r in topo.local_ranks]))
    return seg


def host_cpus(affinities: Sequence[Sequence[int]]) -> int:
    """CPUs a host's ranks may run on: the union of their affinity masks.

    Not each rank's own mask: ranks pinned to a core each (numactl, per-GPU
    binding) have a core apiece, however small each mask is.
    """
    return len(set().union(*affinities)) if affinities else 0


class ShmTransport(Transport):
    """Guard exchange through shared memory; the C++ hook runs its fast path."""

    name = "shm"

    def __init__(
        self,
        *,
        topo: Topology,
        store: Any,
        prefix: str,
        leader_exchange: str = "native",
        busy_poll: float = 30e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.topo = topo
        self._store, self._prefix = store, prefix
        timeout = self.timeout
        hierarchical = topo.hosts > 1
        self.name = "shm+gloo" if hierarchical else "shm"
        self.shm = _open_segment(self.group, topo, hierarchical, timeout, self.wait_log_interval)
        if hierarchical and topo.local_rank == 0:
            # Built by the host leaders alone: the other ranks take no part.
            leaders_group = gloo_group(store, f"{prefix}/leaders", topo.leaders, timeout)
            native = (
                native_or_none(store, prefix, leaders_group, topo.leaders, timeout, busy_poll)
                if leader_exchange == "native"
                else None
            )
            self._cross: LeaderExchange = (
                native
                if native is not None
                else BandAllreduce(leaders_group)
                if leader_exchange == "allreduce"
                else DoublingExchange(leaders_group, timeout, topo.leaders)
            )
            self.waiters.append(self._cross)
            if native is not None:
                self.shm.set_cross_host_native(native.rounds, self._native_failure)
            else:
                self.shm.set_cross_host(self._cross_host)
            if leaders_group.rank() == 0:  # the leaders agreed: one of them tells every rank
                store.set(f"{prefix}/leaders/native", "1" if native is not None else "0")
        if hierarchical:
            # Every rank reports the same transport, the leaders' choice included.
            store.wait([f"{prefix}/leaders/native"])
            native_agreed = store.get(f"{prefix}/leaders/native") == b"1"
            self.name = "shm+native" if native_agreed else "shm+gloo"
        self._hook: _C.GuardHook | None = None
        self.shm.set_wait_logger(self._log_wait)

    def make_hook(self) -> _C.GuardHook:
        self._hook = _C.GuardHook(self.shm, self.slow_path)
        return self._hook

    def _seq_ident(self) -> tuple[int, int]:
        return (self._hook.seq, self._hook.last_ident) if self._hook is not None else (0, 0)

    def position(self) -> tuple[int, int]:
        return self._seq_ident()

    def last_epoch(self) -> int:
        return int(self._hook.last_epoch) if self._hook is not None else 0

    def waited(self) -> float | None:
        local = self.shm.waiting_for()
        cross = super().waited()
        waits = [w for w in (local if local >= 0 else None, cross) if w is not None]
        return max(waits) if waits else None

    def _log_wait(self, seq: int, waited: float) -> None:
        self.log_wait(seq, self._seq_ident()[1], waited)

    def _cross_host(self, word: int) -> int:
        seq, ident = self._seq_ident()
        t0 = time.monotonic()
        out, failure = self._cross(word)
        if failure is not None:
            self._say_why(f"its exchange with the other hosts' leaders failed: {failure}")
            raise self.timeout_error(seq, ident, time.monotonic() - t0, failure)
        return out

    def close(self) -> None:
        """Drop the C++ segment's Python callbacks and close the native exchange's sockets."""
        self.shm.set_wait_logger(None)
        self.shm.set_cross_host(None)
        self.shm.set_cross_host_native(None, None)
        cross = getattr(self, "_cross", None)
        if isinstance(cross, (NativeExchange, DoublingExchange)):
            cross.close()

    def _native_failure(self, status: int, value: int, peer: int, waited: float) -> None:
        """The native rounds failed (called by the C++ exchange): raise as ``_cross_host``."""
        assert isinstance(self._cross, NativeExchange)
        seq, ident = self._seq_ident()
        failure = self._cross.describe(status, value, peer)
        self._say_why(f"its exchange with the other hosts' leaders failed: {failure}")
        raise self.timeout_error(seq, ident, waited, failure)

    def _say_why(self, cause: str) -> None:
        """Leave why this rank gives up for the host's other ranks, before they see the abort.

        The segment's ``aborted`` word names only the local rank; its cause (a remote
        host's failure, for a leader) would otherwise reach them as "gave up".
        """
        try:
            self._store.set(f"{self._prefix}/gave_up/{self.rank}", cause[:_CAUSE_CHARS])
        except Exception as e:  # the store going away must not hide the error itself
            log.debug("could not leave the cause of giving up: %s", e)

    def _why_gave_up(self, rank: int) -> str | None:
        """What ``rank`` left in :meth:`_say_why` (it does so before it aborts), or None."""
        key = f"{self._prefix}/gave_up/{rank}"
        try:
            if not self._store.check([key]):
                return None
            return dist_store.checked(self._store.get(key), "cause of giving up").decode(
                errors="replace"
            )[:_CAUSE_CHARS]
        except Exception as e:
            log.debug("could not read rank %d's cause of giving up: %s", rank, e)
            return None

    def slow_path(
        self, status: int, seq: int, ident: int, hit: bool, word: int, culprit: int, waited: float
    ) -> bool:
        """Decides what the C++ fast path could not: mixed hits, mismatches, failures."""
        if status == 0:
            return self.decide(seq, ident, hit, word)
        suspects = [self.topo.local_ranks[culprit]] if culprit >= 0 else []
        who = f"local rank {culprit} (rank {suspects[0] if suspects else '?'})"
        # A rank that gave up may exit at once: its cause is read whichever we saw first.
        why = self._why_gave_up(suspects[0]) if _STATUS[status] != "timeout" and suspects else None
        cause = {
            "timeout": "timeout",
            "peer_dead": f"{who} exited after giving up on the exchange: {why}"
            if why
            else f"{who} exited or crashed",
            "aborted": f"{who} gave up on the exchange: {why}"
            if why
            else f"{who} gave up on the exchange (an error, or a signal whose handler "
            "raised, on that rank)"
            if suspects
            else "another rank on this host gave up on the exchange",
        }[_STATUS[status]]
        self._say_why(f"{who} gave up: {why}" if why else cause)
        self.shm.abort()
        if _STATUS[status] == "aborted":
            suspects = []  # it arrived; its cause names it
        raise self.timeout_error(seq, ident, waited, cause, suspects)


__all__ = ["ShmTransport", "ShmUnavailable", "Topology", "shm_available", "topology"]
