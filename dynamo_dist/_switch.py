"""The switch: every ``torch.compile`` in the program becomes a ``dynamo_dist.compile``.

Most users never call ``torch.compile`` themselves: Hugging Face ``Trainer``,
accelerate, Lightning and torchtitan call it for them, often before
``init_process_group``. So the switch replaces the ``torch.compile`` attribute with
:func:`_compile`, which forwards every argument to the ``torch.compile`` it replaced
and adds dynamo_dist's policy, timeout and cache, decided at the first call of the
compiled code (``_api.compile_on_first_call``). Covered: ``torch.compile(fn)``,
``@torch.compile`` and ``@torch.compile(...)``, and ``nn.Module.compile()`` (which
looks ``torch.compile`` up at each call). Not covered: a reference taken before the
switch (``from torch import compile``); the import hook turns the switch on when torch
is first imported, before any program code can take one.

Three ways on, one mechanism:
- ``dynamo_dist.patch_torch_compile()``, a function that is also a context manager;
- ``DYNAMO_DIST_ALL_COMPILES=1`` (or ``all_compiles = true`` in the
  ``DYNAMO_DIST_CONFIG`` profile), read by the import hook (``_dynamo_dist_switch``);
- ``dynamo-dist-run --all-compiles``, which exports that variable to the workers.

Other libraries wrap ``torch.compile`` too. Undoing the switch restores the previous
``torch.compile`` only while ours is the outermost wrapper; under someone else's, ours
becomes a pass-through, so their wrapper keeps working and still reaches torch.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

from . import _api, _config
from ._log import get_logger

log = get_logger("switch")

_lock = threading.Lock()


class _State:
    original: Callable[..., Any] | None = None  # the torch.compile ours replaced
    installed: Callable[..., Any] | None = None  # ours, as installed on torch
    on = False  # off: ours (if still in someone's chain) passes through


_state = _State()


def _compile(model: Any = None, **kwargs: Any) -> Any:
    """``torch.compile`` while the switch is on: see the module docstring."""
    original = _state.original
    assert original is not None  # only ever installed with it set
    if model is None:
        # Decorator with arguments: torch's own decorator would call torch's module-level
        # compile, not the torch.compile attribute, and miss the switch.
        def decorate(fn: Any) -> Any:
            if fn is None:
                raise RuntimeError("Model can't be None")
            return _compile(fn, **kwargs)

        return decorate
    if not _state.on or _api.in_own_compile() or kwargs.get("disable", False):
        # Off (undone under someone else's wrapper), dynamo_dist's own compile, or
        # disable=True: exactly the torch.compile we replaced.
        return original(model, **kwargs)
    return _api.compile_on_first_call(model, original, kwargs)


class TorchCompilePatch:
    """The switch as turned on by one :func:`patch_torch_compile` call.

    ``undo()`` (or leaving the ``with`` block) turns it off if this call turned it on;
    a call made while the switch was already on undoes nothing.
    """

    def __init__(self, owner: bool) -> None:
        self._owner = owner

    def undo(self) -> None:
        if self._owner:
            self._owner = False
            _turn_off()

    def __enter__(self) -> TorchCompilePatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()


def patch_torch_compile() -> TorchCompilePatch:
    """Make every ``torch.compile`` in this process behave as ``dynamo_dist.compile``.

    For programs whose framework calls ``torch.compile`` (HF ``Trainer``, accelerate,
    Lightning, torchtitan's per-block compile). Every argument is forwarded; the policy,
    timeout and cache come from the configuration (``DYNAMO_DIST_*``, the
    ``DYNAMO_DIST_CONFIG`` profile). Whether to keep ranks consistent is decided at each
    compiled object's first call: a multi-rank job then sets up the group's channel
    (collective over the group: the whole world, or :func:`dynamo_dist.set_default_group`);
    a single process gets plain ``torch.compile``. Use it as a function, or as a context
    manager whose exit undoes it; objects compiled while it was on stay switched.
    """
    with _lock:
        if _state.on:
            return TorchCompilePatch(owner=False)
        current = torch.compile
        if _state.installed is not None and (
            current is _state.installed or _in_chain(current, _state.installed)
        ):
            # Undone earlier under another library's wrapper: ours is still installed,
            # or in that wrapper's chain, passing through. Turning it back on is
            # enough; wrapping again would adopt every compile twice.
            _state.on = True
            log.info("torch.compile switch on again (ours was still in torch.compile's chain)")
            return TorchCompilePatch(owner=True)
        _state.original = current
        installed = functools.wraps(current)(_compile)
        installed.__dynamo_dist_switch__ = True  # type: ignore[attr-defined]
        _state.installed = installed
        _state.on = True
        torch.compile = installed
        log.info("torch.compile switch on: every torch.compile is a dynamo_dist.compile")
        return TorchCompilePatch(owner=True)


def _in_chain(fn: Any, target: Any) -> bool:
    """Whether ``target`` is reachable from ``fn`` through ``__wrapped__`` links."""
    seen = 0
    while fn is not None and seen < 32:
        if fn is target:
            return True
        fn = getattr(fn, "__wrapped__", None)
        seen += 1
    # A wrapper that does not set __wrapped__: assume ours is inside it (it was there
    # when we were turned off), rather than wrap a second time.
    return fn is None


def _turn_off() -> None:
    with _lock:
        if not _state.on:
            return
        _state.on = False
        if torch.compile is _state.installed:
            torch.compile = _state.original  # type: ignore[assignment]
            _state.installed = None
            _state.original = None
            log.info("torch.compile switch off: torch.compile restored")
        else:
            log.info(
                "torch.compile switch off: another library wrapped torch.compile after "
                "dynamo_dist; ours now passes through to the torch.compile it replaced"
            )


def is_on() -> bool:
    """Whether the switch is on in this process."""
    return _state.on


def install_from_environment() -> None:
    """The import hook's entry, once torch is imported: on if the configuration says so.

    A bad configuration is reported and leaves ``torch.compile`` alone: the hook runs
    inside ``import torch``, where raising would break a program that may never compile.
    """
    try:
        cfg = _config.resolve()
    except Exception as e:
        log.error("%s; the torch.compile switch stays off", e)
        return
    if cfg.all_compiles:
        patch_torch_compile()


__all__ = ["TorchCompilePatch", "install_from_environment", "is_on", "patch_torch_compile"]
