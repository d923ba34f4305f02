"""Precompiled artifacts: capturing a compiled function whole, saving, loading and guarding it.

``aot_compile_fullgraph`` through ``torch._dynamo.optimize(...)(fn).aot_compile``,
``AOTCompiledFunction.serialize/deserialize/guard_check``, ``GuardFilterEntry`` and
``torch._dynamo.package``'s guard and source helpers: torch 2.11 through 2.13 (2.11 gates
``.aot_compile`` behind ``torch._dynamo.config.enable_aot_compile``, False by default).
The cache's ``artifact`` and ``precompiled`` modules reach Dynamo's precompile through
these functions only.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from dynamo_dist.dynamo import compat, inductor, pgo


class PrecompileUnsupported(Exception):
    """This torch cannot capture or load precompiled artifacts; the message says why."""


def aot_compile_missing() -> str | None:
    """Why this torch has no usable ``aot_compile`` (None when it has one)."""
    try:
        import inspect

        import torch._dynamo
        from torch._dynamo import aot_compile, eval_frame, package  # noqa: F401
        from torch._dynamo.aot_compile import AOTCompiledFunction

        optimize = getattr(eval_frame, "_optimize", torch._dynamo.optimize)
        if "guard_filter_fn" not in inspect.signature(optimize).parameters:
            return (
                f"torch {compat.torch_version()}'s torch._dynamo.optimize takes no guard_filter_fn"
            )

        for name in ("serialize", "deserialize", "guard_check", "disable_guard_check"):
            if not hasattr(AOTCompiledFunction, name):
                return f"torch {compat.torch_version()} lacks AOTCompiledFunction.{name}"
        for name in ("load_guard_manager", "load_guards_state", "_hash_sourcelines"):
            if not hasattr(package, name):
                return f"torch {compat.torch_version()} lacks torch._dynamo.package.{name}"
    except ImportError as e:
        return f"torch {compat.torch_version()} has no torch._dynamo.aot_compile ({e})"
    return None


def unserializable_guard_types() -> frozenset[str]:
    """Guard types Dynamo cannot save (``CheckFunctionManager``'s list)."""
    from torch._dynamo.guards import CheckFunctionManager

    return frozenset(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)


def guard_root_global(entry: Any) -> str | None:
    """The global name a ``GuardFilterEntry``'s source starts from (None for a local)."""
    src = entry.orig_guard.originating_source
    while getattr(src, "base", None) is not None:
        src = src.base
    name = getattr(src, "global_name", None)
    return name if isinstance(name, str) else None


def is_package_error(e: BaseException) -> bool:
    """Whether ``e`` is Dynamo refusing to save a guard or graph (``exc.PackageError``)."""
    try:
        from torch._dynamo.exc import PackageError
    except ImportError:
        return False
    return isinstance(e, PackageError)


def is_graph_break(e: BaseException) -> bool:
    """Whether ``e`` is a graph break under ``fullgraph=True`` (``exc.Unsupported``)."""
    from torch._dynamo import exc

    return isinstance(e, exc.Unsupported | getattr(exc, "UserError", exc.Unsupported))


class aot_capture:
    """Capture ``fn(*args, **kwargs)`` as one precompiled artifact: ``art(*args)`` runs it.

    ``torch._dynamo.optimize(backend, nopython=True, guard_filter_fn=...)(fn).aot_compile``
    (``aot_compile_fullgraph``): Dynamo traces once, ``backend`` (the inductor wrapper the
    user's ``torch.compile`` options built) compiles forward and backward now, and the
    guards are built with ``guard_filter_fn``. The capture runs against an empty
    automatic-dynamic state (dims to keep dynamic are marked with ``mark_dynamic``), so no
    decision of an earlier capture or compile in this process leaks into it.
    """

    def __init__(self, backend: Any, guard_filter_fn: Callable[[Any], list[bool]]) -> None:
        self.backend = backend
        self.guard_filter_fn = guard_filter_fn

    def __call__(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import contextlib

        import torch
        import torch._dynamo

        ctx: Any = contextlib.nullcontext()
        if hasattr(torch._dynamo.config, "enable_aot_compile"):
            ctx = torch._dynamo.config.patch(enable_aot_compile=True)
        with ctx, pgo.isolated_code_state({}):
            optimized: Any = torch._dynamo.optimize(
                backend=self.backend, nopython=True, guard_filter_fn=self.guard_filter_fn
            )(fn)
            return optimized.aot_compile((tuple(args), dict(kwargs)))


def aot_serialize(art: Any) -> bytes:
    """The artifact as bytes (generated code, guards, graphs; not the built kernels)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    return bytes(AOTCompiledFunction.serialize(art, None).serialized_data)


def aot_deserialize(data: bytes, f_globals: dict[str, Any], isa: list[str] | None = None) -> Any:
    """An artifact from bytes, its guards checked against the live ``f_globals``.

    ``deserialize`` builds the guard manager over a snapshot of the globals taken now; a
    global the program changes afterwards would go unnoticed. So the guard manager is
    built again over the module's own dict (``load_guard_manager``), as Dynamo's do.
    """
    from torch._dynamo.aot_compile import AOTCompiledFunction
    from torch._dynamo.package import load_guard_manager, load_guards_state

    with inductor.cpp_kernels_load_only(isa):
        art = AOTCompiledFunction.deserialize(data, f_globals, None)
    found = art._artifacts
    found.guard_manager = load_guard_manager(
        load_guards_state(found.guards_state), found.original_code, f_globals
    )
    art.disable_guard_check()  # checked once per call by the caller, before calling
    return art


def aot_guard_check(art: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``art``'s guards pass for this call."""
    return bool(art.guard_check(*args, **kwargs))


def aot_inlined_sources(art: Any) -> list[tuple[str, int, int, str]]:
    """(module, first line, last line, checksum) of every function the artifact inlined."""
    return sorted(
        (str(s.module), int(s.firstlineno), int(s.lastlineno), str(s.checksum))
        for s in art.source_info().inlined_sources
    )


def hash_sourcelines(module: types.ModuleType, first: int, last: int) -> str:
    """Dynamo's checksum of a module's lines ``first..last`` (``package._hash_sourcelines``)."""
    from torch._dynamo.package import _hash_sourcelines

    return str(_hash_sourcelines(module, first, last))


def aot_guard_failure(art: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why ``art``'s guards fail for this call (Dynamo's verbose check), one line."""
    found = art._artifacts
    f_locals = art.prepare_f_locals(*args, **kwargs)
    manager = found.guard_manager
    info = manager.check_verbose(f_locals)
    # The failed guard, as Dynamo words it for a recompile; GuardDebugInfo's repr
    # (result=0, num_guards_executed=...) is not for users.
    parts = getattr(info, "verbose_code_parts", None)
    if not isinstance(parts, list | tuple) or not parts:
        text = str(info)
    elif len(parts) == 1:
        text = str(parts[0])  # a tensor check's own reason, or the one guard
    else:
        text = _first_failing(manager, f_locals, [str(p) for p in parts])
    return " ".join(text.split())[:500]


def _first_failing(manager: Any, f_locals: dict[str, Any], parts: list[str]) -> str:
    """Of a leaf guard's code parts (symbolic shapes put all of theirs in one), the first
    that is false here, evaluated as Dynamo's ``get_guard_fail_reason_helper`` does."""
    try:
        scope = {"L": f_locals, "G": manager.global_scope["G"], **(manager.closure_vars or {})}
        for part in parts:
            held = eval(part, dict(manager.global_scope), scope)  # the artifact's own guard
            if isinstance(held, bool) and not held:
                return part
    except Exception:  # diagnostics only: fall through to every part
        pass
    return "; ".join(parts)
