"""Changes to torch's state, each scoped and restorable: it returns or restores what it replaced.

Dynamo's guard-complete hook, its compiler collectives, its recompile limits for one
compile, the tensors' ``mark_dynamic`` marks around a capture, AOTAutograd's backward
lowering, and the ``torch.compile`` attribute itself (the switch). Installing returns
the previous value, or the context manager puts it back on exit, so every change can
be undone in the order it was made.

Supported torch versions for every patch below: >= 2.9 (the package's floor), run on
2.11 on the GPU hosts and 2.13 in CI. A patch that needs a newer API says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any


def replace_torch_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn`` the ``torch.compile`` attribute and return the one it replaced.

    The switch (``dynamo_dist._switch``) installs its wrapper with this and restores the
    returned function the same way. ``nn.Module.compile()`` looks the attribute up at
    each call, so it follows too.
    """
    import torch

    previous: Callable[..., Any] = torch.compile
    torch.compile = fn
    return previous


def set_guard_complete_hook(hook: object | None) -> object | None:
    """Install ``hook`` as Dynamo's guard-complete hook and return the previous one.

    ``torch._C._dynamo.eval_frame.set_guard_complete_hook``: torch 2.9 through 2.13.
    Callers restore what this returns (see ``hook.install``/``uninstall``).
    """
    from typing import cast

    from torch._C._dynamo.eval_frame import set_guard_complete_hook as set_hook

    # Dynamo's stub wants its Protocol; the C++ hook is a pybind11 callable of that shape.
    return set_hook(cast(Any, hook))


def _compiler_collective(gather: Callable[[Any, Any], list[Any]]) -> Callable[[Any], None]:
    """Dynamo's ``OutputGraph.run_compiler_collective``, without the accelerator device context.

    ``gather(group, obj)`` is the object all-gather over the compile's group. Mirrors torch
    2.9 through 2.13: ``root_tx.distributed_state``, ``speculation_log`` and
    ``exc.CompileCollectiveRestartAnalysis``.
    """

    def run_compiler_collective(self: Any) -> None:
        import logging

        from torch._dynamo import exc

        tx = self.root_tx
        if tx is None:
            raise AssertionError("root_tx must not be None")
        ds = tx.distributed_state
        if ds is not None and ds.all_states is None:
            logging.getLogger("dynamo_dist.consensus").debug(
                "compiler collective: %s", ds.local_state
            )
            ds.all_states = gather(ds.compile_pg, ds.local_state)
            # Tracing may diverge from here with the merged information.
            tx.speculation_log.clear()
            raise exc.CompileCollectiveRestartAnalysis

    return run_compiler_collective


def install_compiler_collectives(
    group_for_compile: Callable[[], Any | None],
    gather: Callable[[Any, Any], list[Any]],
) -> Callable[[], None] | None:
    """Turn on Dynamo's compiler collectives, over the group ``group_for_compile()`` names.

    Dynamo asks ``get_compile_pg()`` once per compile; the answer is the group of the
    compile in progress (None: this compile talks to nobody, e.g. one inside
    ``dynamo_dist.local()`` or plain ``torch.compile`` code elsewhere). None when this
    torch has no compiler collectives. Sets ``torch._dynamo.config.enable_compiler_collectives``,
    replaces ``torch._dynamo.convert_frame.get_compile_pg`` and
    ``OutputGraph.run_compiler_collective`` (upstream enters a device context that CPU/gloo
    jobs lack): torch 2.9 through 2.13.
    """
    try:
        import torch._dynamo.config as dconfig
        import torch._dynamo.convert_frame as convert_frame
        from torch._dynamo.output_graph import OutputGraph
    except ImportError:  # pragma: no cover
        return None
    if (
        not hasattr(dconfig, "enable_compiler_collectives")
        or not hasattr(OutputGraph, "run_compiler_collective")
        or not hasattr(convert_frame, "get_compile_pg")
    ):
        return None
    saved_config = dconfig.enable_compiler_collectives
    saved_get = convert_frame.get_compile_pg
    saved_method = OutputGraph.__dict__["run_compiler_collective"]
    dconfig.enable_compiler_collectives = True
    convert_frame.get_compile_pg = group_for_compile
    OutputGraph.run_compiler_collective = _compiler_collective(gather)  # type: ignore[method-assign,assignment]

    def restore() -> None:
        dconfig.enable_compiler_collectives = saved_config
        convert_frame.get_compile_pg = saved_get
        OutputGraph.run_compiler_collective = saved_method  # type: ignore[method-assign]

    return restore


def recompile_headroom(specific: int, accumulated: int) -> AbstractContextManager[None]:
    """Raise Dynamo's recompile limits by the given numbers of entries for one compile.

    ``torch._dynamo.config.recompile_limit`` / ``accumulated_recompile_limit`` (their
    ``config.patch``): torch 2.9 through 2.13. Restored on exit.
    """
    import contextlib

    import torch._dynamo.config as dconfig

    if not specific and not accumulated:
        return contextlib.nullcontext()
    patch: Any = dconfig.patch(
        recompile_limit=dconfig.recompile_limit + specific,
        accumulated_recompile_limit=dconfig.accumulated_recompile_limit + accumulated,
    )
    return patch


class eager_backward_lowering:
    """Have AOTAutograd compile the backward inside the backend call; restored on exit.

    ``torch._functorch.config.force_non_lazy_backward_lowering``: present in torch 2.9
    through 2.13; where a torch lacks it this is a no-op (the backward is then compiled
    lazily, outside the cache entry). ``config.patch`` puts the previous value back.
    """

    def __init__(self) -> None:
        self._patch: Any = None

    def __enter__(self) -> None:
        from torch._functorch import config as functorch_config

        if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            self._patch = functorch_config.patch(force_non_lazy_backward_lowering=True)
            self._patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._patch is not None:
            patch, self._patch = self._patch, None
            patch.__exit__(*exc)


class marked_dynamic:
    """``torch._dynamo.mark_dynamic`` on some dims of some tensors, undone on exit.

    The marks are tensor attributes (``_dynamo_dynamic_indices``, ``_dynamo_dynamic_range``,
    ``_has_dynamo_dim_marking``, ...; torch 2.1 through 2.13), which guards check: set
    only around a capture, and every one put back as it was, so neither a later compile
    of the same tensors nor an artifact's guards see them.
    """

    def __init__(self, marks: list[tuple[Any, frozenset[int]]]) -> None:
        self._marks = marks
        self._saved: list[tuple[Any, dict[str, Any]]] = []

    @staticmethod
    def _dynamo_attrs(tensor: Any) -> dict[str, Any]:
        return {
            k: v
            for k, v in getattr(tensor, "__dict__", {}).items()
            if k.startswith("_dynamo") or k.startswith("_has_dynamo")
        }

    def __enter__(self) -> None:
        import copy

        import torch._dynamo

        for tensor, dims in self._marks:
            self._saved.append((tensor, copy.copy(self._dynamo_attrs(tensor))))
            torch._dynamo.mark_dynamic(tensor, sorted(dims))

    def __exit__(self, *exc: object) -> None:
        for tensor, before in reversed(self._saved):
            for k in self._dynamo_attrs(tensor):
                if k not in before:
                    delattr(tensor, k)
            for k, v in before.items():
                setattr(tensor, k, v)
        self._saved.clear()


_optimize_lock = threading.RLock()  # wrapping_optimize windows, one thread at a time


def wrapping_optimize(
    wrap: Callable[[Any], Any], backend: Callable[[Any], Any] | None = None
) -> AbstractContextManager[None]:
    """While active, pass every context ``torch._dynamo.optimize`` builds through ``wrap``.

    ``backend``, if given, replaces the backend object torch.compile built from its
    arguments (``inductor`` with ``mode`` and ``options``, say) with ``backend(built)``.
    ``torch.compile`` ends with ``torch._dynamo.optimize(backend=..., ...)(model)`` in torch
    2.9 through 2.13. Patched for the duration of the ``with`` block only, and restored on
    exit. Windows of different threads take turns (a lock): interleaved, their saves and
    restores would leave ``optimize`` patched for good. Within a window, only this
    thread's calls are wrapped.
    """
    import contextlib

    import torch._dynamo as dynamo

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        with _optimize_lock:
            original = dynamo.optimize
            owner = threading.get_ident()

            def optimize(*args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() != owner:
                    return original(*args, **kwargs)
                if backend is not None and "backend" in kwargs:
                    kwargs["backend"] = backend(kwargs["backend"])
                return wrap(original(*args, **kwargs))

            dynamo.optimize = optimize
            try:
                yield
            finally:
                dynamo.optimize = original

    return scope()
