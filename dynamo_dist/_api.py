"""``dynamo_dist.compile`` and ``dynamo_dist.stats``: the entry points users call."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

import torch

from dynamo_dist import _config, _log
from dynamo_dist._config import POLICIES, Config, PolicyName
from dynamo_dist.cache import backend as cache_backend
from dynamo_dist.cache import key as cache_key
from dynamo_dist.cache import localdir as cache_localdir
from dynamo_dist.cache import precompiled as cache_precompiled
from dynamo_dist.cache import profile as cache_profile
from dynamo_dist.dist import group as dist_group
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dist import runtime as dist_runtime
from dynamo_dist.dynamo import compat, intercept
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.callback import GuardedCallback
from dynamo_dist.exchange.stats import Counts

_F = TypeVar("_F", bound=Callable[..., Any])


@overload
def compile(
    model: _F,
    *,
    backend: str | Callable[..., Any] = "inductor",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    disable: bool = False,
    policy: PolicyName | None = None,
    timeout: float | None = None,
    cache_dir: str | None = None,
    config: str | os.PathLike[str] | Config | None = None,
    group: Any = None,
    **torch_kwargs: Any,
) -> _F: ...
@overload
def compile(
    model: None = None,
    *,
    backend: str | Callable[..., Any] = "inductor",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    disable: bool = False,
    policy: PolicyName | None = None,
    timeout: float | None = None,
    cache_dir: str | None = None,
    config: str | os.PathLike[str] | Config | None = None,
    group: Any = None,
    **torch_kwargs: Any,
) -> Callable[[_F], _F]: ...


def compile(
    model: Any = None,
    *,
    backend: str | Callable[..., Any] = "inductor",
    fullgraph: bool = False,
    dynamic: bool | None = None,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    disable: bool = False,
    policy: PolicyName | None = None,
    timeout: float | None = None,
    cache_dir: str | None = None,
    config: str | os.PathLike[str] | Config | None = None,
    group: Any = None,
    **torch_kwargs: Any,
) -> Any:
    """Drop-in for :func:`torch.compile` that keeps every rank's compiles in step.

    In a distributed job (``torch.distributed`` initialized, more than one rank),
    every entry into the compiled code is agreed across ranks: if any rank's
    guards miss, all ranks recompile together, and ranks that call compiled code
    in a different order get a :class:`RankDivergenceError` instead of a hang.
    In a single process it is exactly ``torch.compile``.

    The first call for a group is collective over that group's ranks (it sets up the
    group's exchange channel): call it on every rank of ``group``, after
    ``init_process_group``. ``group`` (a ProcessGroup or a DeviceMesh; default the
    group set by :func:`dynamo_dist.set_default_group`, else the whole world) is the
    set of ranks that run this code: a pipeline stage's ranks, for instance (all dp x
    tp ranks of one stage). Guard exchanges, consensus and the cache
    agreement then run within it only. Code that only some ranks run (rank-0
    evaluation) belongs inside :func:`dynamo_dist.local`. ``policy``, ``timeout`` and
    ``cache_dir`` override the configuration: ``config`` (a :class:`Config`, used as
    given, or the path of a TOML profile, which the ``DYNAMO_DIST_*`` environment
    overrides; default ``DYNAMO_DIST_CONFIG``). ``disable=True`` returns ``model``
    unchanged, as ``torch.compile(disable=True)`` does, and is not collective: every
    rank must pass the same value. Any other keyword (``name``, ``recompile_limit``, ...
    in newer torch) goes to ``torch.compile`` as given.
    """
    if model is None:

        def decorate(fn: _F) -> _F:
            return compile(
                fn,
                backend=backend,
                fullgraph=fullgraph,
                dynamic=dynamic,
                mode=mode,
                options=options,
                disable=disable,
                policy=policy,
                timeout=timeout,
                cache_dir=cache_dir,
                config=config,
                group=group,
                **torch_kwargs,
            )

        return decorate
    if not callable(model):
        raise TypeError(
            f"dynamo_dist.compile: model must be callable (a function, method or nn.Module), "
            f"got {type(model).__name__}"
        )
    if policy is not None and (not isinstance(policy, str) or policy.lower() not in POLICIES):
        raise ValueError(
            f"dynamo_dist.compile: policy={policy!r} is invalid; allowed: {', '.join(POLICIES)}"
        )
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise ValueError(
            f"dynamo_dist.compile: timeout={timeout!r} is invalid; allowed: a positive number "
            "of seconds"
        )
    if disable:
        # torch.compile(disable=True) returns the model itself; so do we, before
        # anything collective, so a disabled compile never creates the guard group.
        return model
    if isinstance(config, Config):
        cfg = _config.override(config, policy=policy, timeout=timeout, cache_dir=cache_dir)
    else:
        cfg = _config.resolve(
            config_file=config, policy=policy, timeout=timeout, cache_dir=cache_dir
        )
    _log.configure(cfg.log_level)
    compile_kwargs: dict[str, Any] = {
        "backend": backend,
        "fullgraph": fullgraph,
        "dynamic": dynamic,
        "mode": mode,
        "options": options,
        **torch_kwargs,
    }
    runtime = dist_runtime.ensure(cfg)
    ranks = dist_group.resolve(group) if runtime is not None else ()
    shared: _Shared | None = None
    if cfg.cache_dir:
        compile_kwargs, shared = _with_shared_cache(
            model, cfg, compile_kwargs, agree=runtime is not None
        )
    if runtime is None or dist_local.is_local():
        # Compiled inside dynamo_dist.local(): rank-local code, plain torch.compile
        # (its shared-cache entries, if any, are loaded and published without agreement).
        if shared is not None and runtime is None:
            shared.load_profile(None)  # a single process: its own profile, nobody to agree with
        with own_compile():
            compiled = torch.compile(model, **compile_kwargs)
        if shared is not None and runtime is None:
            _precompiled(compiled, model, cfg, shared, None, -1)
        return compiled
    channel = runtime.channel(ranks, dynamo_hook.describe_callable(model))
    if shared is not None:
        # Every member calls compile() here, the group's channel now set up: the
        # group's one reading of its automatic-dynamic profile, before any trace.
        shared.load_profile(channel.scope)
    region = dynamo_hook.register_region(model, channel.name)
    with own_compile(), intercept.adopting(channel, region, cfg.policy) as adopted:
        compiled = torch.compile(model, **compile_kwargs)
    if not adopted:
        _log.get_logger("api").warning(
            "could not attach to this torch's Dynamo context; %s compiles without rank consistency",
            dynamo_hook.describe_callable(model),
        )
    elif shared is not None:
        _precompiled(compiled, model, cfg, shared, channel, region)
    return compiled


def _precompiled(
    compiled: Any, model: Any, cfg: Config, shared: _Shared, channel: Any, region: int
) -> None:
    """Put the precompiled route in front of a compiled module (``cfg.precompile``)."""
    if not cfg.precompile:
        return
    cache_precompiled.install(
        compiled,
        model,
        shared.cache,
        shared.static,
        shared.inner,
        channel if channel is not None and channel.hook is not None else None,
        cfg.policy,
        dynamo_hook.describe_callable(model),
        shared.dynamic,
        region,
    )


class _Shared:
    """The shared cache as one compile uses it: its backend, key factors and profile."""

    def __init__(
        self,
        cache: Any,
        backend: Any,
        inner: Any,
        static: dict[str, Any],
        load_profile: Callable[[Any], None],
        dynamic: bool | None,
    ) -> None:
        self.cache = cache
        self.backend = backend
        self.inner = inner
        self.static = static
        self.load_profile = load_profile
        self.dynamic = dynamic


def _with_shared_cache(
    model: Any, cfg: _config.Config, kwargs: dict[str, Any], agree: bool
) -> tuple[dict[str, Any], _Shared | None]:
    """Put the shared precompile cache in front of inductor (other backends compile nothing).

    Also returns the cache as this compile uses it (None for a backend the cache does
    not serve): the loader of the automatic-dynamic profile, to call with the group's
    scope once the group is set up, and what the precompiled route needs.
    """
    if kwargs["backend"] != "inductor":
        _log.get_logger("cache").info(
            "cache_dir is set but backend %r is not inductor: nothing to cache", kwargs["backend"]
        )
        return kwargs, None
    inner = compat.inductor_backend(kwargs["mode"], kwargs["options"], kwargs["dynamic"])
    shared = _caching_backend(model, cfg, inner, kwargs, agree)
    out = {k: v for k, v in kwargs.items() if k not in ("backend", "mode", "options")}
    out["backend"] = shared.backend
    return out, shared


def _caching_backend(
    model: Any, cfg: _config.Config, inner: Any, kwargs: dict[str, Any], agree: bool
) -> _Shared:
    """The shared cache in front of ``inner`` (inductor, as torch.compile built it from
    ``kwargs``), and the loader of the automatic-dynamic profile."""
    static = {
        "backend": "inductor",
        "mode": kwargs.get("mode"),
        "options": json.dumps(kwargs.get("options"), sort_keys=True, default=repr),
        "dynamic": kwargs.get("dynamic"),
        "fullgraph": bool(kwargs.get("fullgraph", False)),
        "source": cache_key.source_hash(model),
    }
    cache = cache_backend.get_cache(cfg, agree)
    backend = cache_backend.CachingBackend(
        inner, cache, static, dynamo_hook.describe_callable(model)
    )
    profiles = cache_profile.profiles_for(cache)
    source = str(static["source"])

    def load_profile(scope: Any) -> None:
        profiles.load(scope, source)

    return _Shared(cache, backend, inner, static, load_profile, kwargs.get("dynamic"))


_own = threading.local()


@contextmanager
def own_compile() -> Iterator[None]:
    """Mark dynamo_dist's own ``torch.compile`` calls: a switched ``torch.compile``
    (:mod:`._switch`) passes them straight through instead of adopting them twice."""
    depth = getattr(_own, "depth", 0)
    _own.depth = depth + 1
    try:
        yield
    finally:
        _own.depth = depth


def in_own_compile() -> bool:
    """Whether this thread is inside dynamo_dist's own ``torch.compile`` call."""
    return bool(getattr(_own, "depth", 0))


def compile_on_first_call(
    model: Any, torch_compile: Callable[..., Any], kwargs: dict[str, Any]
) -> Any:
    """``torch_compile(model, **kwargs)``, made a ``dynamo_dist.compile`` at its first call.

    For the switch (:mod:`._switch`): frameworks call ``torch.compile`` before
    ``init_process_group``, so whether this is a multi-rank job, and which group runs the
    code, is only known when the compiled code first runs. What torch.compile returns is
    torch's own object (an ``OptimizedModule`` for a module): its frame callback and
    backend are wrapped in place, and an enter hook decides at the first call
    (:class:`_FirstCall`). Configuration errors still raise here, at ``torch.compile``.
    """
    cfg = _config.resolve()
    _log.configure(cfg.log_level)
    first = _FirstCall(model, cfg, kwargs)
    with own_compile(), compat.wrapping_optimize(first.adopt, backend=first.backend):
        compiled = torch_compile(model, **kwargs)
    if not first.callbacks:
        _log.get_logger("api").warning(
            "could not attach to this torch's Dynamo context; %s compiles without rank consistency",
            first.label,
        )
    elif cfg.cache_dir and cfg.precompile and isinstance(model, torch.nn.Module):
        forward = getattr(compiled, "__dict__", {}).get("forward")
        if forward is not None:
            compiled.forward = _FirstForward(first, forward)
    return compiled


class _FirstForward:
    """A switched module's ``forward``: decides at the first call, before Dynamo runs.

    With a shared cache the module may take the precompiled route (:mod:`._precompile`);
    the decision (collective, as :class:`_FirstCall`'s) must come before the first trace,
    or every start would trace once before finding its artifact.
    """

    def __init__(self, first: _FirstCall, forward: Callable[..., Any]) -> None:
        self.first = first
        self.forward = forward
        self.route: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        route = self.route
        if route is None:
            route = self._decide()
        return route(*args, **kwargs)

    def _decide(self) -> Callable[..., Any]:
        first = self.first
        if first.state == "pending" and (
            not dist_local.is_local() or dist_runtime.distributed_world() <= 1
        ):
            first._decide()
        if first.state == "pending":
            return self.forward  # a first call inside local(): decided at a later one
        shared, channel = first.shared, first.channel
        if first.state == "attached" and shared is not None and channel is not None:
            self.route = cache_precompiled.PrecompiledModule(
                first.model,
                self.forward,
                shared.cache,
                shared.static,
                shared.inner,
                channel if channel.hook is not None else None,
                first.cfg.policy,
                first.label,
                shared.dynamic,
                first.region,
            )
        else:
            self.route = self.forward
        return self.route


class _SwitchableBackend:
    """The backend torch.compile built, until the first call puts the shared cache first."""

    # What Dynamo reads from a backend, copied: forwarding every attribute through
    # __getattr__ crashes torch 2.13's eval frame (its C++ backend lookup).
    _FORWARDED = ("compiler_name", "get_compiler_config", "backend_ctx_ctor", "reset")

    def __init__(self, built: Any) -> None:
        self.built = built
        self.target = built
        for name in self._FORWARDED:
            if hasattr(built, name):
                setattr(self, name, getattr(built, name))

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        return self.target(gm, example_inputs)

    # Dynamo reuses a frame's cache entries across torch.compile calls whose backends
    # compare equal (torch's wrappers define __eq__): torchtitan compiles each block on
    # its own, and all blocks share one compiled graph. Identity would compile every
    # block anew and hit the recompile limit (fullgraph: a hard error).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SwitchableBackend) and bool(self.target == other.target)

    def __hash__(self) -> int:
        return hash(type(self))


class _LazyCallback:
    """Dynamo's frame callback, forwarded as is until the first call attaches a group.

    Until then, a compile inside ``dynamo_dist.local()`` (rank-0 evaluation before the
    first training step) goes through ``local``, which keeps it out of the recompile
    limit and automatic-dynamic state of the calls outside ``local()``, as ``compile()``
    does.
    """

    def __init__(self, inner: Any, local: GuardedCallback | None = None) -> None:
        self.inner = inner
        self.target = inner
        self.local = local
        # Dynamo's C++ get_backend() follows this chain to the backend keying entries.
        self._torchdynamo_orig_backend = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "target") or name.startswith("__"):
            # Not set yet (copy.deepcopy, unpickling): never look it up through itself.
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        if self.target is self.inner and self.local is not None and dist_local.is_local():
            return self.local(frame, cache_entry, frame_state)
        return self.target(frame, cache_entry, frame_state)


def _no_cleanup() -> None:
    return None


class _FirstCall:
    """One switched ``torch.compile``: decides, at the first call, plain or rank-consistent.

    Two enter hooks go into the Dynamo context: ``first`` (index 0) and ``last``
    (appended). At the first call outside ``dynamo_dist.local()``, ``first`` decides:
    - a multi-rank job: set up the group's channel (collective, like ``compile()``), wrap
      the callback in :class:`GuardedCallback`, put the shared cache in front of inductor,
      and swap the two hooks in place for the pending-error check and the region marker,
      exactly the hooks ``compile()`` installs (same positions; swapped in place, so the
      list Dynamo is iterating keeps its length and the region marker already runs for
      this call);
    - a single process (or ``policy = off``): nothing, as plain torch.compile; both hooks
      are removed after this call returns (the list is not being iterated then).
    """

    def __init__(self, model: Any, cfg: _config.Config, kwargs: dict[str, Any]) -> None:
        self.model = model
        self.cfg = cfg
        self.kwargs = kwargs
        self.label = dynamo_hook.describe_callable(model)
        self.callbacks: list[_LazyCallback] = []
        self.ctxs: list[Any] = []
        self.backends: list[_SwitchableBackend] = []
        self.state = "pending"  # -> "attached" | "plain"
        # Set when attached: what the precompiled route of a switched module needs.
        self.shared: _Shared | None = None
        self.channel: Any = None
        self.region = -1
        self.counts = Counts()  # rank-local compiles before the first call outside local()
        if cfg.cache_dir:
            # Now, before anything is traced or compiled (the first call may be inside
            # local(), or before init_process_group, and stay plain): with a shared cache,
            # inductor never works in a local directory someone else could fill.
            cache_localdir.require_private_local_dir()
        self._lock = threading.RLock()
        # The hooks as installed (each attribute access makes a new bound method).
        self._hooks = (self._first, self._last)

    def backend(self, built: Any) -> Any:
        b = _SwitchableBackend(built)
        self.backends.append(b)
        return b

    def adopt(self, ctx: Any) -> Any:
        if hasattr(ctx, "callback") and hasattr(ctx, "enter_exit_hooks") and callable(ctx.callback):
            local = GuardedCallback(
                ctx.callback, None, self.cfg.policy, None, self.counts, wrapper_frames=1
            )
            lazy = _LazyCallback(ctx.callback, local)
            ctx.callback = lazy
            ctx.enter_exit_hooks.insert(0, self._hooks[0])
            ctx.enter_exit_hooks.append(self._hooks[1])
            self.callbacks.append(lazy)
            self.ctxs.append(ctx)
        return ctx

    def _first(self) -> Callable[[], None]:
        # A first call inside local() in a job waits for the first call outside it: the
        # group's channel is set up collectively, and the other ranks are not here.
        if self.state == "pending" and (
            not dist_local.is_local() or dist_runtime.distributed_world() <= 1
        ):
            self._decide()
        if self.state == "plain":
            return self._drop_hooks
        return _no_cleanup

    def _last(self) -> Callable[[], None]:
        return _no_cleanup

    def _drop_hooks(self) -> None:
        for ctx in self.ctxs:
            hooks = ctx.enter_exit_hooks
            hooks[:] = [h for h in hooks if all(h is not mine for mine in self._hooks)]

    def _decide(self) -> None:
        with self._lock:
            if self.state != "pending":
                return
            runtime = dist_runtime.ensure(self.cfg)
            if runtime is None:
                # A single process (or policy off): exactly plain torch.compile.
                self.state = "plain"
                world = os.environ.get("WORLD_SIZE", "1")
                if self.cfg.policy != "off" and world.isdigit() and int(world) > 1:
                    _log.get_logger("api").warning(
                        "%s was first called before init_process_group in a job of %s "
                        "ranks: it stays plain torch.compile, without rank consistency. "
                        "Initialize the process group before the first call of compiled "
                        "code (a warm-up or shape probe included)",
                        self.label,
                        world,
                    )
                return
            ranks = dist_group.resolve(None)
            load_profile: Callable[[Any], None] | None = None
            caching: Any = None
            if self.cfg.cache_dir and self.backends:
                built = self.backends[0].built
                if compat.is_inductor_backend(built):
                    shared = _caching_backend(self.model, self.cfg, built, self.kwargs, True)
                    caching, load_profile = shared.backend, shared.load_profile
                    self.shared = shared
                else:
                    _log.get_logger("cache").info(
                        "cache_dir is set but %s does not compile with inductor: nothing to cache",
                        self.label,
                    )
            channel = runtime.channel(ranks, self.label)
            channel.counts.local_compiles += self.counts.local_compiles
            if load_profile is not None:
                load_profile(channel.scope)
            region = dynamo_hook.register_region(self.model, channel.name)
            self.channel, self.region = channel, region
            if caching is not None:
                for b in self.backends:
                    b.target = caching
            for lazy in self.callbacks:
                # wrapper_frames: _LazyCallback.__call__ sits between Dynamo and it.
                lazy.target = intercept.guarded(lazy.inner, channel, self.cfg.policy, 1)
            attached = intercept.enter_hooks(channel, region)
            for ctx in self.ctxs:
                hooks = ctx.enter_exit_hooks
                for mine, theirs in zip(self._hooks, attached, strict=True):
                    hooks[next(i for i, h in enumerate(hooks) if h is mine)] = theirs
            self.state = "attached"


def stats() -> dict[str, Any]:
    """This rank's counters as a plain dict (empty-ish in single-process programs)."""
    return dist_runtime.stats().as_dict()


def shutdown() -> None:
    """Uninstall the hook and restore Dynamo's previous settings (idempotent)."""
    dist_runtime.shutdown()
