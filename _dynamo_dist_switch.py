"""dynamo_dist's import hook: turns the torch.compile switch on when torch is imported.

Run from ``dynamo_dist_switch.pth`` at interpreter start, and only when
``DYNAMO_DIST_ALL_COMPILES`` or ``DYNAMO_DIST_CONFIG`` is set (the ``.pth`` line checks
``os.environ``, which ``site`` has already imported): with both unset, nothing here is
even imported. This module imports neither torch nor dynamo_dist itself. It adds a
finder to ``sys.meta_path`` that waits for ``import torch``; once torch is fully
imported, ``dynamo_dist._switch.install_from_environment`` reads the configuration
(``all_compiles``) and patches ``torch.compile``, before any program code can hold a
reference to it.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_OFF = ("", "0", "false", "no", "off")


def wanted(environ: Any = None) -> bool:
    """Whether the environment may ask for the switch (the profile decides the rest)."""
    env = os.environ if environ is None else environ
    value = env.get("DYNAMO_DIST_ALL_COMPILES", "").strip().lower()
    return value not in _OFF or (value == "" and bool(env.get("DYNAMO_DIST_CONFIG")))


class _AfterTorch(Loader):
    """Runs torch's own loader, then turns the switch on."""

    def __init__(self, inner: Loader) -> None:
        self._inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._inner.exec_module(module)
        finally:
            # torch's own loader back where importlib.resources and pkgutil look for it.
            module.__loader__ = self._inner
            if module.__spec__ is not None:
                module.__spec__.loader = self._inner
        # torch is imported and no meta_path iteration is under way. (A failed import
        # leaves the finder in place for the program's next attempt.)
        uninstall()
        try:
            from dynamo_dist import _switch

            _switch.install_from_environment()
        except Exception as e:  # never break `import torch`
            sys.stderr.write(f"dynamo_dist: the torch.compile switch is off: {e!r}\n")


class _Finder(MetaPathFinder):
    """Finds nothing itself: hands torch's own spec back with its loader wrapped."""

    def __init__(self) -> None:
        self.busy = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != "torch" or self.busy:
            return None
        from importlib.util import find_spec

        self.busy = True  # find_spec below asks every finder again, us included
        try:
            spec = find_spec(name)
        finally:
            self.busy = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AfterTorch(spec.loader)
        return spec


_finder = _Finder()


def install() -> None:
    """Called by the ``.pth`` line: wait for torch (or act now if it is already imported)."""
    if not wanted():
        return
    if "torch" in sys.modules:
        from dynamo_dist import _switch

        _switch.install_from_environment()
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
