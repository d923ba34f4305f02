"""How many filesystem operations this process made on a store's directory.

On a shared (network) file system every open, stat, listing, read and write is a round
trip to the server that all ranks share, so at scale their number per entry, not bytes,
is what the cache must keep small (see ``benchmarks/cache_fanout.py``). The counter of a
store is named for the calling thread by :func:`counting`; the filesystem layer's walker
(``fs.walk(..., counted=True)``) and the store's, the verifier's and the locks' calls
:func:`tick` it where they make an operation (cheap: an attribute increment). Apart from
the filesystem layer, so that counting is one idea with one home.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["FsOps", "counting", "tick"]


@dataclass
class FsOps:
    """File-system operations one process made on one store's directory, by kind.

    Counted where the operation is made, while ``counting`` names this store's counter
    on the calling thread.
    """

    opens: int = 0  # files and directories opened (the walk opens each level)
    stats: int = 0  # stat, lstat, fstat
    listdirs: int = 0  # scandir, listdir
    reads: int = 0  # read calls
    writes: int = 0  # creates, writes, mkdirs, renames, unlinks, utimes

    @property
    def total(self) -> int:
        return self.opens + self.stats + self.listdirs + self.reads + self.writes

    def as_dict(self, prefix: str) -> dict[str, int]:
        out = {f"{prefix}{k}": v for k, v in dataclasses.asdict(self).items()}
        out[f"{prefix}total"] = self.total
        return out


_counting = threading.local()


def tick(kind: str, n: int = 1) -> None:
    """Count ``n`` operations of ``kind`` for the store this thread is working on, if any."""
    ops = getattr(_counting, "ops", None)
    if ops is not None:
        setattr(ops, kind, getattr(ops, kind) + n)


@contextlib.contextmanager
def counting(ops: FsOps | None) -> Iterator[None]:
    """Count this thread's file-system operations into ``ops`` (None: not at all)."""
    prev = getattr(_counting, "ops", None)
    _counting.ops = ops
    try:
        yield
    finally:
        _counting.ops = prev
