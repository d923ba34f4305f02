"""``dynamo_dist.compile`` and ``dynamo_dist.stats``: the entry points users call."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar, overload

import torch

from . import _cache, _config, _group, _hook, _intercept, _local, _log, _runtime, _torch_compat
from ._config import POLICIES, Config, PolicyName

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
    whole world) is the set of ranks that run this code: a pipeline stage's ranks, for
    instance (all dp x tp ranks of one stage). Guard exchanges, consensus and the cache
    agreement then run within it only. Code that only some ranks run (rank-0
    evaluation) belongs inside :func:`dynamo_dist.local`. ``policy``, ``timeout`` and
    ``cache_dir`` override the configuration: ``config`` (a :class:`Config`, used as
    given, or the path of a TOML profile, which the ``DYNAMO_DIST_*`` environment
    overrides; default ``DYNAMO_DIST_CONFIG``). ``disable=True`` returns ``model``
    unchanged, as ``torch.compile(disable=True)`` does, and is not collective: every
    rank must pass the same value.
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
    }
    runtime = _runtime.ensure(cfg)
    ranks = _group.resolve(group) if runtime is not None else ()
    profile: Callable[[Any], None] | None = None
    if cfg.cache_dir:
        compile_kwargs, profile = _with_shared_cache(
            model, cfg, compile_kwargs, agree=runtime is not None
        )
    if runtime is None or _local.is_local():
        # Compiled inside dynamo_dist.local(): rank-local code, plain torch.compile
        # (its shared-cache entries, if any, are loaded and published without agreement).
        if profile is not None and runtime is None:
            profile(None)  # a single process: its own profile, nobody to agree with
        return torch.compile(model, **compile_kwargs)
    channel = runtime.channel(ranks, _hook.describe_callable(model))
    if profile is not None:
        # Every member calls compile() here, the group's channel now set up: the
        # group's one reading of its automatic-dynamic profile, before any trace.
        profile(channel.scope)
    region = _hook.register_region(model, channel.name)
    with _intercept.adopting(channel, region, cfg.policy) as adopted:
        compiled = torch.compile(model, **compile_kwargs)
    if not adopted:
        _log.get_logger("api").warning(
            "could not attach to this torch's Dynamo context; %s compiles without rank consistency",
            _hook.describe_callable(model),
        )
    return compiled


def _with_shared_cache(
    model: Any, cfg: _config.Config, kwargs: dict[str, Any], agree: bool
) -> tuple[dict[str, Any], Callable[[Any], None] | None]:
    """Put the shared precompile cache in front of inductor (other backends compile nothing).

    Also returns the loader of the automatic-dynamic profile, to call with the group's
    scope once the group is set up (None for a backend the cache does not serve).
    """
    if kwargs["backend"] != "inductor":
        _log.get_logger("cache").info(
            "cache_dir is set but backend %r is not inductor: nothing to cache", kwargs["backend"]
        )
        return kwargs, None
    inner = _torch_compat.inductor_backend(kwargs["mode"], kwargs["options"], kwargs["dynamic"])
    static = {
        "backend": "inductor",
        "mode": kwargs["mode"],
        "options": json.dumps(kwargs["options"], sort_keys=True, default=repr),
        "dynamic": kwargs["dynamic"],
        "fullgraph": kwargs["fullgraph"],
        "source": _cache.source_hash(model),
    }
    cache = _cache.get_cache(cfg, agree)
    backend = _cache.CachingBackend(inner, cache, static, _hook.describe_callable(model))
    profiles = _cache.profiles_for(cache)
    source = str(static["source"])

    def load_profile(scope: Any) -> None:
        profiles.load(scope, source)

    out = {"backend": backend, "fullgraph": kwargs["fullgraph"], "dynamic": kwargs["dynamic"]}
    return out, load_profile


def stats() -> dict[str, Any]:
    """This rank's counters as a plain dict (empty-ish in single-process programs)."""
    return _runtime.stats().as_dict()


def shutdown() -> None:
    """Uninstall the hook and restore Dynamo's previous settings (idempotent)."""
    _runtime.shutdown()
