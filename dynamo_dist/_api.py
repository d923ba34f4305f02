"""``dynamo_dist.compile`` and ``dynamo_dist.stats``: the entry points users call."""

from __future__ import annotations

import functools
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
from dynamo_dist.dynamo import compat, intercept, names
from dynamo_dist.dynamo import hook as dynamo_hook

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
    group's exchange): call it on every rank of ``group``, after
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
        return functools.partial(
            compile,
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
    _check_arguments(model, policy, timeout)
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
    compile_kwargs: dict[str, Any] = {
        "backend": backend,
        "fullgraph": fullgraph,
        "dynamic": dynamic,
        "mode": mode,
        "options": options,
        **torch_kwargs,
    }
    return attach(model, cfg, compile_kwargs, torch.compile, group=group, now=True)


def _check_arguments(model: Any, policy: Any, timeout: Any) -> None:
    """Errors that name the argument, its value and what is allowed, before anything runs."""
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


def attach(
    model: Any,
    cfg: Config,
    kwargs: dict[str, Any],
    torch_compile: Callable[..., Any],
    *,
    group: Any = None,
    now: bool,
) -> Any:
    """The one attach path: ``torch_compile(model, **kwargs)``, adopted and joined to a group.

    ``now`` (``dynamo_dist.compile``): the group is joined here, collectively, as
    :func:`compile` documents; inside ``local()`` or in a single process the compile
    stays plain, with the shared cache alone. Otherwise (the switch): at the first call
    outside ``local()``, since frameworks call ``torch.compile`` before
    ``init_process_group``. Either way the same steps run in the same order
    (:meth:`_Joining.decide`), and a module with a shared cache may take the precompiled
    route at its first call (:class:`_FirstForward`).
    """
    _log.configure(cfg.log_level, cfg.log_format)
    joining = _Joining(model, cfg, kwargs, group, now)
    if cfg.cache_dir:
        # Now, before anything is traced or compiled (the first call may be inside
        # local(), or before init_process_group, and stay plain): with a shared cache,
        # inductor never works in a local directory someone else could fill.
        cache_localdir.require_private_local_dir()
    with own_compile(), intercept.capturing(joining.adoption):
        compiled = torch_compile(model, **kwargs)
    if not joining.adoption.contexts:
        if not now or dist_runtime.distributed_world() > 1:
            _log.get_logger("api").warning(
                "could not attach to this torch's Dynamo context; %s compiles without rank "
                "consistency",
                joining.label,
            )
        return compiled
    if now:
        joining.decide(collective=not dist_local.is_local(), at_compile=True)
    forward = getattr(compiled, "__dict__", {}).get("forward")
    if cfg.cache_dir and cfg.precompile and isinstance(model, torch.nn.Module) and forward:
        compiled.forward = _FirstForward(joining, forward)
    return compiled


class _Shared:
    """The shared cache as one compile uses it: its backend, key factors and profile."""

    def __init__(
        self,
        model: Any,
        cfg: Config,
        inner: Any,
        kwargs: dict[str, Any],
        agree: bool,
        label: str,
    ):
        self.inner = inner
        self.dynamic: bool | None = kwargs.get("dynamic")
        self.static: dict[str, Any] = {
            "backend": "inductor",
            "mode": kwargs.get("mode"),
            "options": json.dumps(kwargs.get("options"), sort_keys=True, default=repr),
            "dynamic": kwargs.get("dynamic"),
            "fullgraph": bool(kwargs.get("fullgraph", False)),
            "source": cache_key.source_hash(model),
        }
        self.cache = cache_backend.get_cache(cfg, agree)
        self.backend = cache_backend.CachingBackend(inner, self.cache, self.static, label)
        self.profiles = cache_profile.profiles_for(self.cache)

    def load_profile(self, group: Any) -> None:
        """The group's one reading of its automatic-dynamic profile, before any trace."""
        self.profiles.load(group, str(self.static["source"]))


def _job_world() -> int:
    """The job's world size as its launcher set it (1 outside a launcher)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() else 1


class _Joining:
    """One compile's way into its group: pending, then attached or plain, once."""

    def __init__(
        self, model: Any, cfg: Config, kwargs: dict[str, Any], group: Any, now: bool
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.kwargs = kwargs
        self.group = group
        self.now = now
        #: The name users read (errors, the report, ``cache ls``): see :mod:`.dynamo.names`.
        self.place = names.find_place(model)
        self.label = names.describe_callable(model, self.place)
        self.adoption = intercept.Adoption(
            cfg.policy,
            self.on_first_call,
            cache_profile.adopt_frame if cfg.cache_dir else None,
        )
        self.state = "pending"  # -> "attached" | "plain"
        self.shared: _Shared | None = None
        #: The group whose exchange the precompiled route uses; None: no exchange (a single
        #: process, or a group of one).
        self.joined_group: Any = None
        self.region = -1
        self.routable = False  # whether a module may take the precompiled route
        self._lock = threading.RLock()

    def on_first_call(self) -> None:
        """The switch's first call: decide, unless inside ``local()`` in a job.

        A first call inside local() waits for the first call outside it: the group's
        group is set up collectively, and the other ranks are not here.
        """
        if self.state == "pending" and (
            not dist_local.is_local() or dist_runtime.distributed_world() <= 1
        ):
            self.decide(collective=True)

    def decide(self, collective: bool, at_compile: bool = False) -> None:
        """Join the group (collective over its ranks), or stay plain torch.compile.

        ``at_compile``: ``dynamo_dist.compile`` deciding when it is called. In a job whose
        process group is not initialized yet (a module-level decorator, a framework that
        compiles in its constructor) the decision waits for the first call, as the
        switch's does.
        """
        with self._lock:
            if self.state != "pending":
                return
            runtime = dist_runtime.ensure(self.cfg)
            if runtime is None and collective and at_compile and _job_world() > 1:
                return  # decided at the first call (on_first_call)
            if self.place is None:  # the parent may be calling it now (a first call)
                self.place = names.find_place(self.model)
                self.label = names.describe_callable(self.model, self.place)
            if runtime is None or not collective:
                self._stay_plain(in_job=runtime is not None)
                return
            ranks = dist_group.resolve(self.group)
            shared = self._shared(agree=True)
            joined = runtime.group(ranks, self.label)
            joined.counts.add(self.adoption.counts)
            if shared is not None:
                shared.load_profile(joined.info)
            self.region = dynamo_hook.register_region(self.label, joined.name)
            self.adoption.attach(joined, self.region, shared.backend if shared else None)
            self.shared, self.routable = shared, shared is not None
            self.joined_group = joined if joined.hook is not None else None
            self.state = "attached"

    def _stay_plain(self, in_job: bool) -> None:
        # dynamo_dist.compile keeps the shared cache (agreed in a job: compiles inside
        # local() publish and load without the group); the switch is exactly torch.compile.
        shared = self._shared(agree=in_job) if self.now else None
        if shared is not None and not in_job:
            shared.load_profile(None)  # a single process: its own profile
        self.adoption.stay_plain(shared.backend if shared is not None else None)
        self.shared, self.routable = shared, shared is not None and not in_job
        world = _job_world()
        forked = dist_local.forked_from() is not None
        if forked:
            dist_local.warn_forked_child()  # once per child: plain torch.compile here
        if not in_job and self.cfg.policy != "off" and world > 1 and not forked:
            _log.get_logger("api").warning(
                "%s was first called before init_process_group in a job of %s ranks: it "
                "stays plain torch.compile, without rank consistency. Initialize the "
                "process group before the first call of compiled code (a warm-up or shape "
                "probe included)",
                self.label,
                world,
            )
        self.state = "plain"

    def _shared(self, agree: bool) -> _Shared | None:
        """The shared cache in front of the backend torch.compile built, if inductor."""
        built = self.adoption.built_backend
        if not self.cfg.cache_dir or built is None:
            return None
        if not compat.is_inductor_backend(built):
            _log.get_logger("cache").info(
                "cache_dir is set but %s does not compile with inductor: nothing to cache",
                self.label,
            )
            return None
        return _Shared(self.model, self.cfg, built, self.kwargs, agree, self.label)

    def precompiled(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` behind the precompiled route, where this compile may take it."""
        shared = self.shared
        if not self.routable or shared is None:
            return forward
        return cache_precompiled.PrecompiledModule(
            self.model,
            forward,
            shared.cache,
            shared.static,
            shared.inner,
            self.joined_group,
            self.cfg.policy,
            self.label,
            shared.dynamic,
            self.region,
        )


class _FirstForward:
    """A compiled module's ``forward`` with a shared cache: decides at the first call.

    The module may take the precompiled route (:mod:`.cache.precompiled`); for the
    switch the decision (collective) must come before the first trace, or every start
    would trace once before finding its artifact.
    """

    def __init__(self, joining: _Joining, forward: Callable[..., Any]) -> None:
        self.joining = joining
        self.forward = forward
        self.route: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        route = self.route
        if route is None:
            self.joining.on_first_call()
            if self.joining.state == "pending":
                return self.forward(*args, **kwargs)  # inside local(): a later call decides
            route = self.route = self.joining.precompiled(self.forward)
        return route(*args, **kwargs)


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

    For the switch (:mod:`._switch`): whether this is a multi-rank job, and which group
    runs the code, is only known when the compiled code first runs. Configuration errors
    still raise here, at ``torch.compile``.
    """
    return attach(model, _config.resolve(), kwargs, torch_compile, now=False)


def stats() -> dict[str, Any]:
    """This rank's counters as a plain dict (empty-ish in single-process programs)."""
    return dist_runtime.stats().as_dict()


def shutdown() -> None:
    """Uninstall the hook and restore Dynamo's previous settings (idempotent)."""
    dist_runtime.shutdown()
