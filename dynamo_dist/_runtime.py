"""The per-process runtime's lifecycle: create the groups, transport, hook and board; close them.

The jobs are split along the architecture: the hook (``_hook``), the exchange
(``_collective``, ``_shm``), the policy (``_policy``) and the frame callback
(``_callback``), consensus (``_consensus``), the cache (``_cache``). This module
owns one process's instance of them, from the first ``dynamo_dist.compile`` to exit,
and assembles its typed stats (``_stats``). Intercepting ``torch.compile`` to attach
the callback lives above it, in ``_intercept``.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist

from . import _cache, _consensus, _hook, _report
from ._collective import GlooTransport, Transport, new_gloo_group, percentiles
from ._config import Config
from ._hook import _C, describe_identity
from ._log import get_logger
from ._policy import Policy
from ._shm import ShmTransport, ShmUnavailable, topology
from ._stats import Counts, HookCounters, RuntimeStats, Stats, TransportStats
from ._status import StatusBoard, open_store

log = get_logger("runtime")


class Runtime:
    """Everything dynamo_dist keeps per process once a distributed job compiles."""

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
        # Group creation is collective: every rank reaches this on its first
        # dynamo_dist.compile call, in the same order, in SPMD programs.
        # The groups' own timeout is what bounds an exchange on the network.
        group = new_gloo_group(cfg.timeout)
        self.transport = _make_transport(cfg, group, self.board)
        if self.board is not None:
            self.board.position = self.transport.position
            self.board.ticks.append(self.transport.watch)
        self.consensus = False
        if cfg.compiler_collectives:
            self.consensus = _consensus.enable(new_gloo_group(cfg.timeout + 60.0))
        self.hook = self.transport.make_hook()
        self._previous_hook = _hook.install(self.hook)
        self.counts = Counts()
        self.policy = Policy(self.transport, self.hook, self.counts)
        log.info(
            "guard exchange on (policy %s, transport %s, timeout %.0fs, %d ranks, consensus %s)",
            cfg.policy,
            self.transport.name,
            cfg.timeout,
            self.world_size,
            "on" if self.consensus else "off",
        )

    def close(self) -> None:
        """Uninstall, restore Dynamo's settings, and hand this rank's stats to the job report."""
        stats = self.stats().as_dict()
        _hook.uninstall(self.hook, self._previous_hook)
        _consensus.disable()
        _C.set_pending_error(None)
        if self.board is not None:
            self.board.close("exited")
            _report.publish_and_collect(
                self.board.store,
                self.generation,
                self.rank,
                self.world_size,
                stats,
                wait_s=min(self.cfg.timeout, 30.0),
                path=self.cfg.report,
            )

    def stats(self) -> Stats:
        """This rank's typed stats record, the shared cache's counts included."""
        lat = percentiles(self.transport.latencies())
        runtime = RuntimeStats(
            policy=self.cfg.policy,
            consensus=self.consensus,
            hook=HookCounters.from_hook(self.hook.counters()),
            transport=TransportStats(
                name=self.transport.name,
                exchanges=self.transport.position()[0],
                mixed_outcomes=self.transport.mixed,
                divergences=self.transport.divergences + self.counts.strict_errors,
                p50_us=lat["p50_us"],
                p99_us=lat["p99_us"],
            ),
            first_entry_exchanges=self.counts.first_entry_exchanges,
            compiles=self.counts.compiles,
        )
        return Stats(
            rank=self.rank, world_size=self.world_size, runtime=runtime, cache=_cache.stats()
        )


def _make_transport(cfg: Config, group: dist.ProcessGroup, board: StatusBoard | None) -> Transport:
    """Shared memory within hosts (hierarchical across them) unless gloo is asked for."""
    if cfg.transport in ("auto", "shm"):
        topo = topology(group)
        try:
            return ShmTransport(
                group=group,
                topo=topo,
                timeout=cfg.timeout,
                wait_log_interval=cfg.wait_log_interval,
                board=board,
                describe=describe_identity,
            )
        except ShmUnavailable as e:
            level = log.warning if cfg.transport == "shm" else log.info
            level("shared-memory guard exchange unavailable (%s); using gloo", e)
    return GlooTransport(
        group=group,
        timeout=cfg.timeout,
        wait_log_interval=cfg.wait_log_interval,
        board=board,
        describe=describe_identity,
    )


_runtime: Runtime | None = None
_generation = 0


def distributed_world() -> int:
    """The job's world size; 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def ensure(cfg: Config) -> Runtime | None:
    """The process's runtime, created on first use; None for single-process programs."""
    global _runtime
    if distributed_world() <= 1 or cfg.policy == "off":
        return None
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
    return Stats(rank=0, world_size=distributed_world(), cache=_cache.stats())


def shutdown() -> None:
    """Close the runtime if there is one (idempotent)."""
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None
