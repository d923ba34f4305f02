"""``refused/<ns>/`` kept bounded: the newest ``REFUSED_KEEP`` boxes, trimmed in the background.

An entry proven bad is moved aside into a box ``refused/<ns>/<key>.<ms>.<hex>/`` (by
``DiskStore.refuse``) so the next reader recompiles instead of re-refusing it. A broken
or hostile writer can be refused again and again, so the directory is trimmed after each
refusal; deleting a box costs as much as its files (a hostile entry can hold many), so
the trim never runs on the compile's path but in a thread of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from dynamo_dist.cache import fs, fs_tree

__all__ = ["REFUSED_KEEP", "Trimmer", "trim_refused"]

# Boxes a reader's refusal creates: <key>.<milliseconds>.<16 hex digits>.
_REFUSED_BOX = re.compile(r"(.{1,64})\.([0-9]{1,20})\.[0-9a-f]{16}")
REFUSED_KEEP = 64


def trim_refused(refused_fd: int, keep: int) -> None:
    """Delete the oldest refused boxes beyond ``keep`` (only ours, only plain directories).

    Boxes are ordered by the time in their names; links and other accounts' boxes are
    counted but never deleted, and ``fs_tree.remove_tree`` never follows a link below.
    Best effort: errors are ignored.
    """
    boxes: list[tuple[int, str, int]] = []
    with contextlib.suppress(OSError):
        for name, st in fs.entries(refused_fd):
            m = _REFUSED_BOX.fullmatch(name)
            if m is not None and stat.S_ISDIR(st.st_mode):
                boxes.append((int(m.group(2)), name, st.st_uid))
    boxes.sort()
    for _, name, uid in boxes[: max(0, len(boxes) - keep)]:
        if uid == os.geteuid():
            fs_tree.remove_tree(refused_fd, name)


class Trimmer:
    """Trims one store's ``refused/<ns>/`` in a background thread (one at a time).

    ``walk_refused`` opens that directory (descriptors of the root down to it). A
    refusal during a trim makes it go round once more, so the bound holds once the
    thread is done (``wait``).
    """

    def __init__(self, walk_refused: Callable[[], AbstractContextManager[list[int]]]) -> None:
        self._walk_refused = walk_refused
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._done = threading.Event()
        self._done.set()

    def later(self) -> None:
        """Trim soon, in the background (again, if a trim is under way)."""
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
        self._done.clear()
        threading.Thread(target=self._trim, daemon=True, name="dynamo_dist-cache-trim").start()

    def _trim(self) -> None:
        while True:
            with contextlib.suppress(OSError), self._walk_refused() as fds:
                trim_refused(fds[-1], REFUSED_KEEP)
            with self._lock:
                if not self._again:
                    self._running = False
                    self._done.set()
                    return
                self._again = False

    def wait(self, timeout: float) -> bool:
        """Wait until no trim is under way; whether none is."""
        return self._done.wait(timeout)
