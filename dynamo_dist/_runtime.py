"""The per-process runtime: guard group, hook, policy, status board, counters.

Policy lives in the wrapper around Dynamo's frame callback. Dynamo calls the
C++ hook only for frames that already have compiled entries; the first time a
rank meets a frame (or after ``torch._dynamo.reset()``), it goes straight to
the callback. If we did nothing there, a rank holding entries would wait in
an exchange the fresh rank never joins: upstream's guard collectives hang or
pair unrelated frames exactly this way. So the wrapper runs the same exchange,
with a local "miss", before Dynamo compiles: every entry into a compiled frame
is exchanged exactly once on every rank, whatever its cache state.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist

from . import _consensus, _hook, _report
from ._collective import ExchangeBase, GlooExchange, Outcome, new_gloo_group, percentiles
from ._config import Config
from ._errors import RankDivergenceError
from ._hook import _C, describe_identity
from ._log import get_logger
from ._shm import ShmTransport, ShmUnavailable, topology
from ._status import StatusBoard, open_store

log = get_logger("runtime")

_FIRST_ENTRY_REASON = (
    "no compiled entry for this frame on this rank (first call here, or after "
    "torch._dynamo.reset())"
)


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
        self.compiles = 0
        self.first_entry_exchanges = 0
        self.forced_recompiles_logged = 0
        self.strict_errors = 0
        log.info(
            "guard exchange on (policy %s, transport %s, timeout %.0fs, %d ranks, consensus %s)",
            cfg.policy,
            self.transport.transport,
            cfg.timeout,
            self.world_size,
            "on" if self.consensus else "off",
        )

    def close(self) -> None:
        """Uninstall, restore Dynamo's settings, and hand this rank's stats to the job report."""
        from . import _cache

        stats = {**self.stats(), **_cache.stats()}
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

    # -- called from the callback wrapper -------------------------------------
    def exchange_first_entry(self) -> bool:
        """Exchange a local miss for a frame this rank has no entries for."""
        self.first_entry_exchanges += 1
        # skip=2: this method's frame and the wrapper's frame sit above the
        # caller of the frame Dynamo is evaluating.
        ident = _C.current_identity(2)
        try:
            return self.hook.exchange(False, ident)
        except BaseException as e:
            _C.set_pending_error(e)
            raise

    def take_mixed(self) -> Outcome | None:
        """The last exchange's outcome if some ranks hit and others missed."""
        out = self.transport.last_mixed
        if out is not None and out.seq == self.transport.position()[0]:
            self.transport.last_mixed = None
            return out
        return None

    def handle_mixed(self, outcome: Outcome, policy: str, frame: Any, cache_entry: Any) -> None:
        """Gather why the missing ranks missed, then log or raise according to ``policy``.

        Every rank reaches this for the same exchange (the hitting ranks were
        forced into the callback), so the gather below pairs up.
        """
        if outcome.hit:
            reasons = None
        elif cache_entry is None:
            reasons = [_FIRST_ENTRY_REASON]
        else:
            reasons = guard_failure_reasons(frame, cache_entry)
        records = self.transport.gather_objects({"hit": outcome.hit, "reasons": reasons})
        missed = [r for r, rec in enumerate(records) if not rec["hit"]]
        hit = [r for r, rec in enumerate(records) if rec["hit"]]
        what = describe_identity(outcome.ident)
        detail = "; ".join(
            f"rank {r}: {' | '.join(records[r]['reasons'] or ['guards failed'])}" for r in missed
        )
        msg = (
            f"forced recompile of {what} at guard exchange #{outcome.seq}: "
            f"ranks {missed} missed ({detail}); ranks {hit} hit"
        )
        self.forced_recompiles_logged += 1
        if policy == "strict":
            self.strict_errors += 1
            ranks = {
                r: {"hit": rec["hit"], "reasons": rec["reasons"], "frame": what, "seq": outcome.seq}
                for r, rec in enumerate(records)
            }
            raise RankDivergenceError(
                f"policy 'strict': {msg}. Make the inputs that the listed guards check identical "
                "across ranks (or mark them dynamic), or use policy 'sync' to recompile on all "
                "ranks instead of failing.",
                ranks,
            )
        if policy == "warn":
            log.warning("%s", msg)
        else:
            log.info("%s", msg)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "world_size": self.world_size,
            "policy": self.cfg.policy,
            "transport": self.transport.transport,
            "consensus": self.consensus,
        }
        out.update(self.hook.counters())
        out.update(
            exchanges=self.transport.position()[0],
            first_entry_exchanges=self.first_entry_exchanges,
            mixed_outcomes=self.transport.mixed,
            divergences=self.transport.divergences + self.strict_errors,
            compiles=self.compiles,
        )
        out.update(percentiles(self.transport.latencies()))
        return out


def _make_transport(
    cfg: Config, group: dist.ProcessGroup, board: StatusBoard | None
) -> ExchangeBase:
    """Shared memory within hosts (hierarchical across them) unless gloo is asked for."""
    if cfg.transport in ("auto", "shm"):
        topo = topology(group)
        try:
            return ShmTransport(
                group, topo, cfg.timeout, cfg.wait_log_interval, board, describe_identity
            )
        except ShmUnavailable as e:
            level = log.warning if cfg.transport == "shm" else log.info
            level("shared-memory guard exchange unavailable (%s); using gloo", e)
    return GlooExchange(group, cfg.timeout, cfg.wait_log_interval, board, describe_identity)


def guard_failure_reasons(frame: Any, cache_entry: Any) -> list[str]:
    """Dynamo's own guard-failure reasons for ``frame`` against its cache entries."""
    try:
        import inspect

        from torch._dynamo.guards import get_and_maybe_log_recompilation_reasons as reasons_fn

        first = next(iter(inspect.signature(reasons_fn).parameters))
        if first == "cache_entries":  # torch >= 2.12 takes the list of entries
            entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(frame.f_code)
            reasons = reasons_fn(entries, frame, cast(Any, None), skip_logging=True)
        else:  # older torch walks the linked list from the first entry
            reasons = reasons_fn(cache_entry, frame, cast(Any, None), skip_logging=True)
        return [" ".join(str(r).split()) for r in reasons] or ["guards failed"]
    except Exception as e:  # diagnostics must never break training
        return [f"guards failed (reasons unavailable: {type(e).__name__}: {e})"]


class GuardedCallback:
    """Wraps Dynamo's frame callback: first-entry exchanges, policies, sticky errors."""

    def __init__(self, inner: Callable[..., Any], runtime: Runtime, policy: str) -> None:
        self._inner = inner
        self._runtime = runtime
        self._policy = policy
        # Dynamo's C++ get_backend() follows this chain to find the backend
        # that keys its cache entries; it must lead through us to the real one.
        self._torchdynamo_orig_backend = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        err = _C.pending_error()
        if err is not None:
            raise err
        rt = self._runtime
        if cache_entry is None and _exchanges_on_first_entry(frame):
            rt.exchange_first_entry()
        outcome = rt.take_mixed()
        if outcome is not None:
            rt.handle_mixed(outcome, self._policy, frame, cache_entry)
        result = self._inner(frame, cache_entry, frame_state)
        if getattr(result, "guarded_code", None) is not None:
            rt.compiles += 1
        return result


def _exchanges_on_first_entry(frame: Any) -> bool:
    """Whether Dynamo would trace this frame (skip-listed code never gets cache entries)."""
    from torch._dynamo import config as dconfig
    from torch._dynamo import trace_rules

    if dconfig.disable:
        return False
    try:
        return not trace_rules.check(frame.f_code)
    except Exception:
        return True


_runtime: Runtime | None = None
_generation = 0


def distributed_world() -> int:
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
    return _runtime


def shutdown() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None


@contextmanager
def adopting(runtime: Runtime, region: int, policy: str) -> Iterator[list[Any]]:
    """While torch.compile runs, catch the Dynamo context it builds and adopt it.

    torch.compile ends with ``torch._dynamo.optimize(...)(model)``. Wrapping
    ``optimize`` for the duration of that one call lets us wrap the context's
    frame callback and add our region marker before the context is applied,
    without re-implementing torch.compile's argument handling.
    """
    import torch._dynamo as dynamo

    original = dynamo.optimize
    adopted: list[Any] = []

    def optimize(*args: Any, **kwargs: Any) -> Any:
        ctx = original(*args, **kwargs)
        if hasattr(ctx, "callback") and hasattr(ctx, "enter_exit_hooks") and callable(ctx.callback):
            ctx.callback = GuardedCallback(ctx.callback, runtime, policy)
            ctx.enter_exit_hooks.append(_hook.region_enter(region))
            adopted.append(ctx)
        return ctx

    dynamo.optimize = optimize
    try:
        yield adopted
    finally:
        dynamo.optimize = original
