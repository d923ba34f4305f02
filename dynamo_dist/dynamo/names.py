"""Names users recognise for compiled code: a module's class, its ``forward``, its place.

What dynamo_dist is handed is often torch's, not the user's: ``nn.Module.compile()``
compiles the bound ``Module._call_impl``, ``torch.compile(module)`` an
``OptimizedModule``, a training script the ``DistributedDataParallel`` around its model.
Named by what it is, every block of a regionally compiled model would read
``Module._call_impl (module.py:1782)``. A module is named instead by the class the user
wrote and the site of its ``forward`` (``TransformerBlock.forward (model.py:123)``), by
its place in the model where that is known (``at layers.3``), and by the wrappers around
it (``in DistributedDataParallel``).

The place is known when a module that contains the compiled one is being called on the
stack when the compile joins its group: at its first call for the switch,
``nn.Module.compile`` and a ``dynamo_dist.compile`` made before ``init_process_group``
(the parent's ``forward`` is calling it: ``self.layers``' owner), at the compile itself
for a ``dynamo_dist.compile`` in a running job (known there only when it is made inside
a module's call). Torch keeps no parent pointers; this reads the ``self`` of the module
calls on the stack and walks the outermost one's modules, once per compiled object and
never on a compiled call. Wrappers' own attributes (``_orig_mod``, ``module`` of DDP,
``_checkpoint_wrapped_module``, ...) are left out, so the place reads as in the model
the user wrote.

Names are for people only: no identity or cache key is ever computed from them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
from typing import Any

import torch
from torch import nn

#: How many frames up the stack a compiled module's parent is looked for.
_STACK_DEPTH = 100
#: Children that a wrapper (torch.compile, activation checkpointing, FSDP1) keeps its
#: wrapped module under: named modules a user did not write.
_WRAPPED_CHILDREN = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
#: ``nn.Module``'s call machinery: what ``nn.Module.compile`` hands torch.compile.
_MODULE_CALLS = frozenset(
    getattr(nn.Module, name) for name in ("__call__", "_call_impl", "_wrapped_call_impl")
)
_MODULE_CALL_CODES = frozenset(fn.__code__ for fn in _MODULE_CALLS)


def describe_code(code: types.CodeType, line: int | None = None) -> str:
    """``Class.method (file.py:line)``: a code object as tracebacks name it, without the path.

    ``line`` defaults to the first line. The file's basename only: the same program
    installed under different prefixes on different hosts reads the same.
    """
    name = getattr(code, "co_qualname", code.co_name)
    return f"{name} ({os.path.basename(code.co_filename)}:{line or code.co_firstlineno})"


def describe_callable(fn: object, place: str | None = None) -> str:
    """The name of what ``torch.compile`` / ``dynamo_dist.compile`` was given.

    A module (or its call machinery) is named by its user class's ``forward``; any other
    callable by its qualified name and first line. ``place`` (:func:`find_place`) is the
    module's path in its model.
    """
    module = _module_called(fn)
    wrappers: list[str] = []
    if module is not None:
        module, wrappers = _unwrap(module)
        cls = _user_class(module)
        name = _describe_function(f"{cls.__qualname__}.forward", getattr(cls, "forward", None))
    else:
        name = _describe_function(getattr(fn, "__qualname__", None) or type(fn).__qualname__, fn)
    if place:
        name += f" at {place}"
    if wrappers:
        name += " in " + " in ".join(wrappers)
    return name


def find_place(fn: object) -> str | None:
    """The path (``layers.3``) of the module ``fn`` runs inside the model containing it.

    None for a callable that is no module's, for a module that is its model's root, and
    where no module call on the stack is a parent's (see the module docstring). Bounded:
    at most ``_STACK_DEPTH`` frames, and one walk per distinct module being called.
    """
    module = _module_called(fn)
    if module is None:
        owner = getattr(fn, "__self__", None)  # a module's bound method (model.forward)
        module = owner if isinstance(owner, nn.Module) else None
    if module is None:
        return None
    target, _ = _unwrap(module)
    best: list[str] = []
    seen: set[int] = set()
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            break
        caller = _module_in_call(frame)
        if caller is not None and id(caller) not in seen:
            seen.add(id(caller))
            path = _path_in(caller, target)
            if path is not None and len(path) > len(best):
                best = path
        frame = frame.f_back
    return ".".join(best) or None


def _module_in_call(frame: types.FrameType) -> nn.Module | None:
    """The module a frame of ``nn.Module``'s call machinery is calling (None: another frame).

    Only these frames' variables are read. Reading ``f_locals`` makes Python 3.11 and 3.12
    keep a snapshot of the frame's variables until it returns: harmless for a module call,
    which returns with its forward, but a training loop's frame would hold its first batch
    (or a state dict it deleted) for the whole run.
    """
    if frame.f_code not in _MODULE_CALL_CODES:
        return None
    module = frame.f_locals.get("self")
    return module if isinstance(module, nn.Module) else None


def _module_called(fn: object) -> nn.Module | None:
    """The module whose call ``fn`` is: the module itself, or its bound call machinery."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module) and getattr(fn, "__func__", None) in _MODULE_CALLS:
        return owner
    return None


def _wrapped(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute, module) that ``module`` wraps, if it is a wrapper torch put around it."""
    children = module._modules
    for attr in _WRAPPED_CHILDREN:
        inner = children.get(attr)
        if inner is not None:
            return attr, inner
    if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return "module", module.module
    return None


def _unwrap(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module the user wrote inside ``module``'s wrappers, and the wrappers' names.

    An ``OptimizedModule`` goes unnamed: being compiled is what every name here says.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    wrappers: list[str] = []
    for _ in range(16):  # wrappers nest a few deep at most; a cycle must not spin
        inner = _wrapped(module)
        if inner is None:
            break
        if not isinstance(module, OptimizedModule):
            wrappers.append(_user_class(module).__qualname__)
        module = inner[1]
    return module, wrappers


def _user_class(module: nn.Module) -> type:
    """The class the user wrote: FSDP2's ``fully_shard`` swaps in a subclass named FSDP<cls>."""
    cls = type(module)
    fsdp_module: Any = getattr(torch.distributed, "fsdp", None)
    fsdp_module = getattr(fsdp_module, "FSDPModule", None)
    if fsdp_module is None or not issubclass(cls, fsdp_module):
        return cls
    return next((c for c in cls.__mro__ if not issubclass(c, fsdp_module)), cls)


def _describe_function(name: str, fn: object) -> str:
    """``name (file.py:line)`` for the code ``fn`` runs (through decorators), or ``name``."""
    target = getattr(fn, "forward", fn) if not isinstance(fn, types.FunctionType) else fn
    target = getattr(target, "__func__", target)
    with contextlib.suppress(ValueError):  # a __wrapped__ cycle
        target = inspect.unwrap(target)  # type: ignore[arg-type]
    code = getattr(target, "__code__", None)
    if code is None:
        return name
    return f"{name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def _path_in(root: nn.Module, target: nn.Module) -> list[str] | None:
    """The path of ``target`` under ``root`` without wrappers' attributes; None: not there."""
    stack: list[tuple[nn.Module, list[str]]] = [(root, [])]
    seen: set[int] = set()
    while stack:
        module, path = stack.pop()
        if module is target:
            return path
        if id(module) in seen:
            continue
        seen.add(id(module))
        wrapped = _wrapped(module)
        inner = wrapped[1] if wrapped is not None else None
        for name, child in reversed(list(module._modules.items())):
            if child is not None:
                stack.append((child, path if child is inner else [*path, name]))
    return None
