"""Precompiled calls: a compiled module runs its artifact, with no Dynamo, on every rank or none.

``dynamo_dist.compile(m)`` and ``dynamo_dist.compile(DDP(m))`` with a shared cache put
:class:`PrecompiledModule` in place of the compiled module's ``forward``. It routes the
call through the module as usual (DDP's forward and the module's hooks run eagerly), and
the forward of the module DDP wraps (the *target*) runs a precompiled artifact
(:mod:`._precompile_artifact`): captured once by one rank, in its clean room, through
the shared cache protocol, and loaded by every other rank and every later start.

Capturing the module DDP wraps, outside DDP's frames, means DDPOptimizer never runs: its
graph pieces bypass AOTAutograd's cache, so they could never be loaded without tracing.

Every call stays rank-consistent, as Dynamo's calls are under the guard exchange:

1. Each rank checks its artifacts' guards for this call, in order (``guard_check``).
2. The verdict is exchanged within the group (its guard exchange): if every rank found one, all run
   theirs (different ranks may run different artifacts, as they may run different
   Dynamo entries: the graphs hold no collectives).
3. Otherwise the ranks without one obtain one for this call through the cache (the
   key holds the call's argument metadata and the dims that differed between this
   rank's earlier calls, which the capture marks dynamic: a restart that replays the
   same calls finds the same keys), and the result is exchanged again. If any rank
   still has none, the reason is counted and every rank gives the precompiled route up
   for this module for good: this call runs the target eagerly, later ones go through
   Dynamo (``torch.compile``'s own path, with the guard exchange).

Inside ``dynamo_dist.local()`` (rank-0 evaluation) nothing is exchanged: the rank uses,
loads or captures its own artifacts (an evaluation under ``no_grad`` gets one of its
own), and a failure sends its later local calls through Dynamo, on that rank alone.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from dynamo_dist.cache.artifact import (
    GRAPH_BREAK,
    GUARD_MISS,
    NO_AOT_COMPILE,
    PACKAGE_ERROR,
    PEER,
    RECOMPILE_LIMIT,
    SOURCE_CHANGED,
    TORCH_CHANGED,
    UNSUPPORTED,
    Captured,
    DroppedCheck,
    Failed,
    GuardRecord,
    Stored,
    dropped_check,
    guard_filter,
    load,
    produce,
    recorded_build_seconds,
    sources_now,
)
from dynamo_dist.cache.artifact_file import discard
from dynamo_dist.cache.key import call_spec, precompile_key, precompile_key_for_sources
from dynamo_dist.cache.protocol import SharedCache
from dynamo_dist.cache.stats import emit_precompiled, log, warn_once
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dynamo import artifacts, patches
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C

__all__ = ["PrecompiledModule"]

_MISSING = object()
_NO_ARTIFACT = "no precompiled artifact fits this call yet"
#: Artifacts one module may gather before it leaves the route (Dynamo's recompile_limit).
MAX_ARTIFACTS = 8


def _target_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward is captured: the one DDP wraps, else the model."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def repeated_blocks(target: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The model's repeated blocks (a ModuleList or Sequential of one class), if any.

    The first such container found breadth-first, with at least two blocks of a class
    of the user's (not a torch building block such as ``nn.Linear``): a transformer's
    layers. Each block is then captured on its own, and identical blocks share one
    artifact; the code around the blocks (embeddings, the head) runs eagerly.
    """
    queue = [target]
    while queue:
        module = queue.pop(0)
        children = list(module.children())
        if isinstance(module, torch.nn.ModuleList | torch.nn.Sequential) and len(children) > 1:
            kinds = {type(c) for c in children}
            kind = next(iter(kinds))
            if len(kinds) == 1 and not kind.__module__.startswith("torch."):
                return children
        queue.extend(children)
    return None


def _unsupported(target: torch.nn.Module, static: dict[str, Any]) -> str | None:
    """Why ``target`` cannot take the precompiled route at all (None if it can)."""
    options = str(static.get("options") or "")
    if static.get("mode") in ("reduce-overhead", "max-autotune") or (
        '"triton.cudagraphs": true' in options
    ):
        return "CUDA graphs (mode reduce-overhead or max-autotune) are not precompiled"
    if "forward" in target.__dict__:
        return "an instance-level forward (the class's is what would be captured)"
    if hasattr(target, "_initialize_hook"):
        return "a lazy module (its parameters are made at the first call)"
    fsdp = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp is not None and any(isinstance(m, fsdp) for m in target.modules()):
        return "FSDP2 (fully_shard) modules: their forward runs collectives in hooks"
    return None


def _eager_forward(target: torch.nn.Module) -> Callable[..., Any]:
    return types.MethodType(type(target).forward, target)


def _restore_forward(target: torch.nn.Module, before: Any) -> None:
    if before is _MISSING:
        target.__dict__.pop("forward", None)
    else:
        target.__dict__["forward"] = before


class PrecompiledModule:
    """The compiled module's ``forward``: precompiled artifacts, else Dynamo.

    The artifacts are of the target's forward, or, where the target has repeated blocks
    (:func:`repeated_blocks`), of the blocks' forward: one artifact (or one per kind of
    call) serves every block, each instance checked by its guards, and each block's
    backward is its own autograd node, so DDP reduces a block's gradients as soon as its
    backward ends, as it does with DDPOptimizer's pieces.
    """

    def __init__(
        self,
        outer: torch.nn.Module,
        dynamo_forward: Callable[..., Any],
        cache: SharedCache,
        static: dict[str, Any],
        backend: Any,
        group: Any,
        policy: str,
        label: str,
        dynamic: bool | None,
        region: int = -1,
    ) -> None:
        self.outer = outer
        self.region = region  # the compiled region's id: names this module in diagnostics
        self.target = _target_of(outer)
        blocks = repeated_blocks(self.target)
        #: What is captured: the blocks, or the target itself.
        self.targets = blocks if blocks is not None else [self.target]
        kind = type(self.targets[0])
        self.dynamo_forward = dynamo_forward
        self.cache = cache
        self.static = static
        self.backend = backend
        self.group = group  # None: one process, or a group of one: nothing to agree
        self.policy = policy
        self.label = label
        self.dynamic = dynamic
        #: (artifact, check of its dropped guards), tried in order.
        self.arts: list[tuple[Any, DroppedCheck]] = []
        self.seen: list[list[tuple[int, ...] | None]] = []
        self.on = True
        # Inside dynamo_dist.local() the calls of this rank alone: given up separately.
        self.local_on = True
        self._code = getattr(kind.forward, "__code__", None)
        self._f_globals: dict[str, Any] = getattr(kind.forward, "__globals__", {})
        why = next(filter(None, (_unsupported(t, static) for t in self.targets)), None)
        # Calls of one compiled module from several threads run one at a time: the
        # module's forward is swapped for the duration of each.
        self._lock = threading.RLock()
        if why is not None:
            self._give_up(UNSUPPORTED, why)

    @property
    def counts(self) -> Any:
        return self.cache.counts

    # -- the call -----------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.on or (not self.local_on and dist_local.is_local()):
            return self.dynamo_forward(*args, **kwargs)
        with self._lock:
            before = [(t, t.__dict__.get("forward", _MISSING)) for t in self.targets]
            for target, was in before:
                target.__dict__["forward"] = partial(self._routed, target, was)
            try:
                return self.outer(*args, **kwargs)
            finally:
                for target, was in before:
                    _restore_forward(target, was)

    def _routed(self, target: torch.nn.Module, before: Any, *args: Any, **kwargs: Any) -> Any:
        """``target``'s forward for this call (its arguments as DDP passes them).

        The module is put back as it was first: guards, and a capture, see it unchanged.
        """
        _restore_forward(target, before)
        if not self.on or (not self.local_on and dist_local.is_local()):
            # Given up during this call (at an earlier block): the rest runs eagerly.
            return _eager_forward(target)(*args, **kwargs)
        full = (target, *args)
        art = self._pick(full, kwargs)
        if self._agree(art is not None, full, kwargs):
            return self._run(art, full, kwargs)
        self.counts.precompiled_misses += 1
        failed: Failed | None = None
        if art is None:
            if len(self.arts) >= MAX_ARTIFACTS:
                failed = Failed(
                    RECOMPILE_LIMIT,
                    f"{len(self.arts)} artifacts, none fits (Dynamo's recompile_limit is the "
                    "same idea; it also makes changing sizes and scalars dynamic)",
                )
            else:
                if self.arts:  # it had artifacts; none fits this call: a recompile
                    self.counts.count_recompile(self._miss_reason(full, kwargs).splitlines()[0])
                art, failed = self._obtain(target, args, kwargs)
        if self._agree(art is not None, full, kwargs, report=False):
            return self._run(art, full, kwargs)
        reason = failed or Failed(PEER, "another rank of the group could not use its artifact")
        self._give_up(reason.reason, reason.detail, dist_local.is_local())
        return _eager_forward(target)(*args, **kwargs)

    def _run(self, art: Any, full: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.counts.precompiled_calls += 1
        return art(*full, **kwargs)

    def _pick(self, full: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for art, check in self.arts:
            if check.ok() and artifacts.aot_guard_check(art, full, kwargs):
                return art
        return None

    # -- agreement ----------------------------------------------------------------------
    @dynamo_hook.transparent
    def _agree(
        self, ok: bool, full: tuple[Any, ...], kwargs: dict[str, Any], report: bool = True
    ) -> bool:
        """Whether every rank of the group says ``ok`` (the guard exchange's verdict)."""
        group = self.group
        if group is None or group.hook is None or dist_local.is_local():
            return ok  # nobody to agree with (inside local(): this rank's call alone)
        group.policy.check_thread()
        leave = _C.RegionEnter(self.region, group.hook)()
        if not report:
            # After a miss: other ranks may still be capturing or loading their artifact.
            group.transport.expected_wait = "other ranks are obtaining a precompiled artifact"
        try:
            # This method is transparent: the identity names the call site in _routed (a
            # Python call, whose offset is stable; this frame's own offset at a C call
            # varies with the interpreter's specialisation). The two exchanges of a miss
            # are thus told apart.
            ident = dynamo_hook.identity(self._code)
            verdict = bool(group.hook.exchange(ok, ident))
        except BaseException as e:
            _C.set_pending_error(e)  # later compiled calls raise it too, on this rank
            raise
        finally:
            group.transport.expected_wait = None
            leave()
        mixed = group.policy.take_mixed()
        if mixed is not None and report:
            why = None if ok else [self._miss_reason(full, kwargs)]
            group.policy.handle_mixed(mixed, self.policy, None, None, missed_because=why)
        return verdict

    def _miss_reason(self, full: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if not self.arts:
            return _NO_ARTIFACT
        try:
            reasons = [
                c.changed() or artifacts.aot_guard_failure(a, full, kwargs) for a, c in self.arts
            ]
        except Exception as e:  # diagnostics never break a step
            return f"precompiled guards failed (reasons unavailable: {type(e).__name__})"
        return "precompiled guards failed: " + " | ".join(reasons)

    # -- obtaining an artifact ------------------------------------------------------------
    def _dynamic_dims(self, args: tuple[Any, ...]) -> dict[int, frozenset[int]]:
        """Dims of tensor arguments that differed between this rank's obtained calls.

        Dynamo's automatic dynamic, replayed: a restart that sees the same calls in the
        same order derives the same dims, hence the same keys. Sizes 0 and 1 stay
        specialised, as Dynamo keeps them.
        """
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args]
        out: dict[int, frozenset[int]] = {}
        if self.dynamic is not False:
            for i, shape in enumerate(shapes):
                if shape is None:
                    continue
                dims = set()
                for earlier in self.seen:
                    prev = earlier[i] if i < len(earlier) else None
                    if prev is None or len(prev) != len(shape):
                        continue
                    for d, (a, b) in enumerate(zip(prev, shape, strict=True)):
                        if a != b and a > 1 and b > 1:
                            dims.add(d)
                if dims:
                    out[i] = frozenset(dims)
        self.seen.append(shapes)
        return out

    def _obtain(
        self, target: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, Failed | None]:
        missing = artifacts.aot_compile_missing()
        if missing is not None:
            return None, Failed(NO_AOT_COMPILE, missing)
        try:
            return self._through_cache(target, args, kwargs)
        except Exception as e:  # ours, never the job's: Dynamo takes over
            log.debug("precompiled artifact for %s failed", self.label, exc_info=True)
            return None, Failed(PACKAGE_ERROR, f"{type(e).__name__}: {e}")

    def _through_cache(
        self, target: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, Failed | None]:
        dynamic = self._dynamic_dims(args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += list(target.parameters())[:1]
        key, factors = precompile_key(
            self.static, target, call_spec(args, kwargs, dynamic), tensors
        )
        art, failed = self._by_key(target, key, factors, args, kwargs, dynamic)
        if failed is not None and failed.reason == SOURCE_CHANGED and failed.sources:
            # The functions the artifact inlined were edited since it was captured (the
            # key holds only the forward's own code): capture for the code as it is now,
            # under a key that says so, which later starts of this code then find.
            self.counts.precompiled_stale += 1
            log.info("%s: %s; capturing for the current source", self.label, failed.detail)
            now = sources_now(failed.sources)
            key, factors = precompile_key_for_sources(key, factors, now)
            art, failed = self._by_key(target, key, factors, args, kwargs, dynamic)
        return art, failed

    def _by_key(
        self,
        target: torch.nn.Module,
        key: str,
        factors: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        dynamic: dict[int, frozenset[int]],
    ) -> tuple[Any, Failed | None]:
        full = (target, *args)
        held = self.cache.artifacts.get(key)
        if held is not None:
            return self._usable(held[0], held[1], full, kwargs)
        capture = partial(self._capture, target, args, kwargs)
        marks = [(args[i], dims) for i, dims in dynamic.items()]
        started = time.monotonic()
        # Agreed through the group's exchange (_agree), not the cache's agreement
        # (group=None); the capture's own trace, if any, runs no compiler collectives.
        # A load is counted below, once the artifact is loaded (counts_loads=False).
        with dist_local.compiling(None, self.region), patches.marked_dynamic(marks):
            got = self.cache.compile(
                key,
                factors,
                partial(produce, key, capture, self.label),
                self.label,
                group=None,
                counts_loads=False,
            )
        region = dynamo_hook.region_label(self.region)
        if isinstance(got, Failed):
            return None, got
        if isinstance(got, Captured):
            art = got.art
            art.disable_guard_check()
            check, why = dropped_check(got.dropped, self._f_globals)
            if check is None:
                return None, Failed(TORCH_CHANGED, why or "")
            self.counts.precompiled_captures += 1
            # Inductor compiled it (forward and backward), outside its FX graph cache.
            self.counts.inductor_compiles += 1
            self.counts.count_built(region)
            emit_precompiled("capture", self.label, self.cache.rank, key=key[:12])
        elif isinstance(got, Stored):
            loaded, failed = load(got.data, self._f_globals)
            if loaded is None:
                if failed is not None and failed.reason == PACKAGE_ERROR:
                    discard(key)  # damaged in this rank's own cache: installed anew next time
                return None, failed
            art, check = loaded
            self.counts.precompiled_loads += 1
            seconds = time.monotonic() - started
            built = recorded_build_seconds(got.data)
            self.counts.count_loaded("precompiled", region, built, seconds)
            emit_precompiled("load", self.label, self.cache.rank, key=key[:12])
        else:
            return None, Failed(PACKAGE_ERROR, f"unexpected result {type(got).__name__}")
        self.cache.artifacts[key] = (art, check)
        return self._usable(art, check, full, kwargs)

    def _usable(
        self, art: Any, check: DroppedCheck, full: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, Failed | None]:
        """The artifact obtained for this call, if its guards pass (else a guard miss)."""
        why = check.changed()
        if why is None and not artifacts.aot_guard_check(art, full, kwargs):
            why = artifacts.aot_guard_failure(art, full, kwargs)
        if why is not None:
            return None, Failed(GUARD_MISS, why)
        self.arts.append((art, check))
        return art, None

    def _capture(
        self,
        target: torch.nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        dropped: list[GuardRecord],
    ) -> Any:
        capture = artifacts.aot_capture(self.backend, guard_filter(dropped))
        self.counts.count_traced(dynamo_hook.region_label(self.region))  # aot_compile traces
        # Gradients of an earlier step, set aside: Dynamo saves the parameters' guard
        # state with them, as a placeholder its own loader then refuses to assign
        # ("assigned grad expected to be a Tensor or None"). The capture reads no grad.
        held = [(p, p.grad) for p in target.parameters() if p.grad is not None]
        for p, _ in held:
            p.grad = None
        try:
            return capture(type(target).forward, (target, *args), kwargs)
        finally:
            for p, grad in held:
                p.grad = grad

    # -- giving up ------------------------------------------------------------------------
    def _give_up(self, reason: str, detail: str, local: bool = False) -> None:
        """Every rank of the group leaves the precompiled route for this module.

        ``local``: only this rank's calls inside ``dynamo_dist.local()`` leave it.
        """
        if local:
            self.local_on = False
        else:
            self.on = False
        fallbacks = self.counts.precompiled_fallbacks
        fallbacks[reason] = fallbacks.get(reason, 0) + 1
        emit_precompiled("fallback", self.label, self.cache.rank, reason=reason, detail=detail)
        message = (
            "%s runs through Dynamo instead of a precompiled artifact (%s: %s); "
            "warm starts of it will trace."
        )
        if reason == GRAPH_BREAK:
            message += " Fix: remove the graph break (see TORCH_LOGS=graph_breaks)."
        warn_once(f"precompiled:{self.label}:{reason}", message, self.label, reason, detail)
