"""The switch: every ``torch.compile`` in the program becomes a ``dynamo_dist.compile``.

Most users never call ``torch.compile`` themselves: Hugging Face ``Trainer``,
accelerate, Lightning and torchtitan call it for them, often before
``init_process_group``. So the switch replaces the ``torch.compile`` attribute with
``_make_compile``'s function, which forwards every argument to the ``torch.compile`` it replaced
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

from dynamo_dist import _api, _config
from dynamo_dist._log import get_logger
from dynamo_dist.dynamo import patches

log = get_logger("switch")

_lock = threading.Lock()


class _State:
    installed: Callable[..., Any] | None = None  # ours, as last installed on torch
    on = False  # off: every installed copy of ours passes through


_state = _State()


def _make_compile(original: Callable[..., Any]) -> Callable[..., Any]:
    """A ``torch.compile`` that adds dynamo_dist to ``original`` while the switch is on.

    Each installation has its own ``original``: under another library's wrapper, a
    second installation on top must not call back into itself. A reference taken while
    the switch was on keeps working after it is turned off (it passes through).
    """

    @functools.wraps(original)
    def compile(model: Any = None, **kwargs: Any) -> Any:
        if model is None:
            # Decorator with arguments: torch's own decorator would call torch's
            # module-level compile, not the torch.compile attribute, and miss the switch.
            def decorate(fn: Any) -> Any:
                if fn is None:
                    raise RuntimeError("Model can't be None")
                return compile(fn, **kwargs)

            return decorate
        if not _state.on or _api.in_own_compile() or kwargs.get("disable", False):
            # Off, dynamo_dist's own compile (or another copy of ours already adding
            # it, further out), or disable=True: exactly the torch.compile we replaced.
            return original(model, **kwargs)
        return _api.compile_on_first_call(model, original, kwargs)

    compile.__dynamo_dist_switch__ = True  # type: ignore[attr-defined]
    return compile


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
    compiled object's first call: a multi-rank job then sets up the group
    (collective over the group: the whole world, or :func:`dynamo_dist.set_default_group`);
    a single process gets plain ``torch.compile``. Use it as a function, or as a context
    manager whose exit undoes it; objects compiled while it was on stay switched.
    """
    with _lock:
        if _state.on:
            return TorchCompilePatch(owner=False)
        current = torch.compile
        if _ours_in_chain(current):
            # Undone earlier under another library's wrapper: ours is still installed,
            # or in that wrapper's chain, passing through. Turning it back on is
            # enough.
            _state.on = True
            log.info("torch.compile switch on again (ours was still in torch.compile's chain)")
            return TorchCompilePatch(owner=True)
        installed = _make_compile(current)
        _state.installed = installed
        _state.on = True
        patches.replace_torch_compile(installed)
        log.info("torch.compile switch on: every torch.compile is a dynamo_dist.compile")
        return TorchCompilePatch(owner=True)


def _ours_in_chain(fn: Any) -> bool:
    """Whether a copy of ours is ``fn`` or reachable from it through ``__wrapped__``.

    A wrapper without ``__wrapped__`` hides what it calls: then ours is installed again
    on top, which is harmless (an inner copy passes through while an outer one adds
    dynamo_dist), where assuming ours inside would leave the switch on and doing nothing.
    """
    for _ in range(32):
        if fn is None:
            return False
        if getattr(fn, "__dynamo_dist_switch__", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _turn_off() -> None:
    with _lock:
        if not _state.on:
            return
        _state.on = False
        installed = _state.installed
        if installed is not None and torch.compile is installed:
            patches.replace_torch_compile(installed.__wrapped__)  # type: ignore[attr-defined]
            _state.installed = None
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
