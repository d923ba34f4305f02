"""Hands the current test to the runner (tests/ranks.py) so it can enforce the multiproc marker.

Nothing here is meant to be imported: shared test code lives in ``ranks.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ranks


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
