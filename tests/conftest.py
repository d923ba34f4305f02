"""Hands the current test to the runner (tests/ranks.py) so it can enforce the multiproc marker.

Nothing here is meant to be imported: shared test code lives in ``ranks.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import ranks

_SUPPORT_BIN = Path(__file__).resolve().parent / "support" / "bin"


def pytest_configure(config: pytest.Config) -> None:
    """One compiler cache for the session (tests/support/bin/g++): the controller makes it,
    the workers and every rank they start inherit it through the environment."""
    if "TESTS_CXX_CACHE" in os.environ or hasattr(config, "workerinput"):
        return
    cache = tempfile.mkdtemp(prefix="dynamo-dist-tests-cxx-")
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    os.environ["TESTS_CXX_CACHE"] = cache
    os.environ["PATH"] = os.pathsep.join([str(_SUPPORT_BIN), os.environ.get("PATH", "")])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The inductor tests (the longest: gcc builds kernels) first, so that on two workers
    none of them is left to run alone at the end of the tier."""
    items.sort(key=lambda item: item.get_closest_marker("inductor") is None)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Set before any fixture runs: a module-scoped fixture that launches ranks is
    # checked against the first test that needs it.
    ranks.current_item = item
    yield


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    ranks.current_item = None


#: Where the shared helpers (ranks.py) and reused test modules live: rank programs run as
#: scripts from their own folder, so their imports need these on PYTHONPATH too.
_HELPER_DIRS = [
    str(Path(__file__).resolve().parent / d)
    for d in (".", "adversarial", "multiproc", "unit/cache")
]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [*_HELPER_DIRS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Where a rank whose local inductor directory is not private switches to.

    ``$XDG_CACHE_HOME/dynamo_dist/inductor``: a directory of the test session's, so no
    test writes into the home directory of whoever runs the suite.
    """
    home = tmp_path_factory.mktemp("xdg-cache")
    home.chmod(0o700)
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
