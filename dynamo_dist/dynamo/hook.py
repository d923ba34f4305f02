"""Installing the C++ guard hook into Dynamo, and naming the frames it sees.

Installation mirrors ``torch.compiler``'s setters: installing returns what was
there before, uninstalling puts it back, and both are idempotent.
"""

from __future__ import annotations

import hashlib
import os
import types
from collections.abc import Callable
from typing import Any, TypeVar

from dynamo_dist._log import get_logger
from dynamo_dist._version import __version__
from dynamo_dist.dynamo import compat, names, patches

log = get_logger("hook")

try:
    from dynamo_dist import _C as _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "dynamo_dist's C++ extension (dynamo_dist._C) is missing or was built for another "
        f"Python ({e}). Rebuild it: `pip install --no-build-isolation -e .` in the source tree, "
        "or reinstall the package with pip."
    ) from e

if getattr(_C, "__version__", None) != __version__:
    # An editable install keeps the compiled _C in the source tree: after a pull that
    # changes the C++ side, the old binary would otherwise load against new Python code.
    raise ImportError(
        f"dynamo_dist._C at {_C.__file__} was built for dynamo_dist "
        f"{getattr(_C, '__version__', '(unknown, older)')}, but the Python package is "
        f"{__version__}. Rebuild it: `pip install -e .` in the source tree, or reinstall "
        "the package with pip."
    )

_regions: dict[int, str] = {}
_region_counts: dict[str, int] = {}

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def transparent(fn: _Fn) -> _Fn:
    """Mark ``fn``'s frames as dynamo_dist's own: :func:`identity` looks past them.

    The frame callback, its forwarding wrapper and the exchange helpers sit between
    Dynamo and the exchange on some paths and not on others; marking them, instead of
    counting them at each call site, keeps every path's identity on the same caller.
    """
    _C.add_transparent(fn.__code__)
    return fn


@transparent
def identity(callee: types.CodeType | None = None) -> int:
    """The identity of the call about to run ``callee``: what ranks compare in an exchange.

    The one computation behind every exchange: the C++ hook's (for compiled calls, with
    the callee read from the pending frame), the frame callback's (first entries) and
    precompiled calls'. It names the innermost caller that is not a :func:`transparent`
    frame, its call site, the region, the grad mode and ``callee`` (left out on a build
    without the callee probe, as the hook leaves it out: ``_C.HAS_CALLEE_PROBE``).
    """
    return int(_C.current_identity(callee))


def classify_code(code: types.CodeType) -> tuple[int, bool]:
    """(hash stable across hosts, whether the call offset is part of the identity).

    The hash uses the file's basename, not its path: ranks on different hosts may
    install the same program under different prefixes. The call offset is left
    out for code Dynamo generated, whose bytecode layout depends on each rank's
    compile history.
    """
    name = getattr(code, "co_qualname", code.co_name)
    key = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}:{name}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little"), not compat.is_dynamo_output(code)


_C.set_code_classifier(classify_code)


def _install_mode_probe() -> None:
    import torch

    # Grad mode is part of every frame identity: a rank evaluating under no_grad must
    # never pair with a rank training through the same call site.
    _C.set_mode_probe(torch.is_grad_enabled)


_install_mode_probe()


def register_region(name: str, group_name: str) -> int:
    """A new region id for one dynamo_dist.compile call in the group named ``group_name``.

    Numbered per group: the n-th compile for a group is the same code on each of its
    ranks, whatever else each rank compiled (other groups, code compiled on some
    ranks only), so the id, part of every frame identity, matches across the group.
    ``name`` (:func:`names.describe_callable`) is for people only: it is not hashed.
    """
    n = _region_counts.get(group_name, 0) + 1
    _region_counts[group_name] = n
    digest = hashlib.blake2b(f"{group_name}#{n}".encode(), digest_size=8).digest()
    region = int.from_bytes(digest, "little") >> 2  # a positive int64
    _regions[region] = f"{name} [compile #{n} of group {group_name}]"
    return region


def _line_of(code: types.CodeType, lasti: int) -> int:
    if lasti < 0:
        return code.co_firstlineno
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


def region_label(region: int) -> str:
    """The name users read for a compiled region (the report's per-region rows, errors)."""
    return _regions.get(region, "code outside dynamo_dist.compile")


def describe_identity(ident: int) -> str:
    """Human name of a frame identity: the compiled region and, inside it, the call site."""
    desc = _C.describe_identity(ident)
    if desc is None:
        return f"frame {ident:#x}"
    code, lasti, region, _grad, callee = desc
    where = region_label(region)
    site = names.describe_code(code, _line_of(code, lasti))
    if callee is not None:
        return f"{where}: {names.describe_code(callee)}, called from {site}"
    return f"{where}, called from {site}"


def identity_grad(ident: int) -> bool | None:
    """Whether grad was enabled for an identity seen on this process (None: unknown)."""
    desc = _C.describe_identity(ident)
    return None if desc is None else bool(desc[3])


def region_enter(region: int, hook: _C.GuardHook | None) -> Callable[[], Callable[[], None]]:
    """The Dynamo enter/exit hook that marks calls of one compiled region.

    ``hook`` is the group's C++ hook (one per group of ranks) that exchanges the region's guard
    results; the installed :class:`_C.Router` dispatches to it. None: nobody to agree with.
    """
    return _C.RegionEnter(region, hook)


PENDING_CHECK = _C.pending_check
"""Inserted first in each adopted context's enter hooks: raises the kept error there,
before any other enter hook has applied something that would then never be undone."""


def current_hook() -> object | None:
    """The installed guard-complete hook (read by swapping it out and straight back)."""
    prev = patches.set_guard_complete_hook(None)
    patches.set_guard_complete_hook(prev)
    return prev


def install(hook: _C.GuardHook | _C.Router) -> object | None:
    """Install ``hook`` as Dynamo's guard-complete hook; returns the previous hook."""
    prev = patches.set_guard_complete_hook(hook)
    if prev is hook:
        return None
    if prev is not None:
        log.warning("replacing an existing guard-complete hook (%r); restored on uninstall", prev)
    return prev


def replace(hook: object, by: Callable[[bool], bool]) -> bool:
    """Install ``by`` in place of ``hook``, if ``hook`` is still the installed one."""
    current = patches.set_guard_complete_hook(by)
    if current is hook:
        return True
    patches.set_guard_complete_hook(current)  # someone else's since: leave theirs
    return False


def uninstall(hook: object, previous: object | None) -> None:
    """Restore ``previous`` if ``hook`` is still the installed one."""
    current = patches.set_guard_complete_hook(previous)
    if current is not None and current is not hook:
        # Someone installed their own hook after us; leave theirs in place.
        patches.set_guard_complete_hook(current)
