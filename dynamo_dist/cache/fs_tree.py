"""Whole trees by descriptor: the one tree walker, and what is built on it.

Part of the cache's filesystem layer, built only from the primitives of ``cache/fs.py``
(it makes no filesystem call of its own). A tree under the cache (a shared entry, a
clean room, a host copy, the local inductor cache) may hold what another account
planted, so a walk here:

* goes from the top's descriptor down, one directory at a time with ``O_NOFOLLOW``, and
  looks at every entry with ``lstat``: a link is seen as a link, never followed, and a
  FIFO, socket or device is never opened (nothing planted can block or redirect it);
* keeps one descriptor per level open at a time, and stops at a depth bound, so a deep
  planted tree ends the walk, never the caller (no RecursionError, no EMFILE).

:func:`tree` is that walk; :func:`foreign_in_tree`, :func:`tree_stats` and the local
install of an entry (``cache/install.py``) read trees with it. :func:`remove_tree`
removes one depth last, with checks of its own (an identity check between the look and
the open, an owner filter), so it keeps its own descent. :func:`untouched_for` is how
long a directory has been left alone, for the sweeps that remove old ones.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NamedTuple

from dynamo_dist.cache import fs

__all__ = [
    "MAX_TREE_DEPTH",
    "MAX_TREE_ENTRIES",
    "Found",
    "foreign_in_tree",
    "remove_path",
    "remove_tree",
    "tree",
    "tree_stats",
    "untouched_for",
]

#: How deep a walk descends; a deeper planted tree is left (and reported).
MAX_TREE_DEPTH = 64
#: How many entries :func:`foreign_in_tree` looks at before it calls a tree unknowable.
MAX_TREE_ENTRIES = 1_000_000
#: How far ahead of this host's clock an mtime may be and still be believed: clocks of
#: NFS clients and servers drift by seconds. Further ahead, the clock was stepped back
#: since (a VM that booted hours ahead, then NTP) or the date was set (``touch -d``).
FUTURE_SLACK_S = 60.0
#: Directories met with an mtime too far ahead that could not be re-dated, by (device,
#: inode, mtime): when this process first saw them, on its monotonic clock.
_first_seen: dict[tuple[int, int, int], float] = {}


class Found(NamedTuple):
    """One entry met by :func:`tree`."""

    dir_fd: int  # the directory it is in: open while the caller handles the entry
    rel: tuple[str, ...]  # its names below the top, its own last
    st: os.stat_result  # its lstat: a link is described, not followed


def tree(
    top_fd: int,
    max_depth: int = MAX_TREE_DEPTH,
    skip: tuple[type[OSError], ...] = (FileNotFoundError,),
) -> Generator[Found, None, None]:
    """Everything below the directory ``top_fd``, depth first, by descriptor.

    Each entry is yielded (sorted by name, with its lstat) before the walk enters it, if
    it is a directory with fewer than ``max_depth`` names below the top; what vanished
    since the listing is left out. A directory whose opening fails with an error in
    ``skip`` is not entered; other errors propagate. The descriptors it opens are closed
    when the walk ends or is closed (``contextlib.closing``); ``top_fd`` is not.
    """
    for name, st in fs.entries(top_fd):
        yield from _below(top_fd, (name,), st, max_depth, skip)


def _below(
    fd: int,
    rel: tuple[str, ...],
    st: os.stat_result,
    max_depth: int,
    skip: tuple[type[OSError], ...],
) -> Generator[Found, None, None]:
    yield Found(fd, rel, st)
    if not stat.S_ISDIR(st.st_mode) or len(rel) >= max_depth:
        return
    try:
        sub = fs.open_dir(fd, rel[-1])
    except skip:
        return
    try:
        for name, child in fs.entries(sub):
            yield from _below(sub, (*rel, name), child, max_depth, skip)
    finally:
        os.close(sub)


def foreign_in_tree(root: Path) -> str | None:
    """Why something under ``root`` may be someone else's, or None if all of it is ours.

    Walked by :func:`tree`: a file or directory of another uid is named. Modes are not
    judged: under a top that is ours and closed to others, directories inductor made
    0775 under umask 002 are out of everyone else's reach. A tree deeper than
    ``MAX_TREE_DEPTH`` or with more than ``MAX_TREE_ENTRIES`` entries is not vouched for.
    """
    me = os.geteuid()
    with fs.walk(root, ()) as (top,), contextlib.closing(tree(top, skip=())) as found:
        for seen, (_, rel, st) in enumerate(found, 1):
            where = "/".join((str(root), *rel))
            if seen > MAX_TREE_ENTRIES:
                parent = "/".join((str(root), *rel[:-1]))
                return f"{parent} holds more than {MAX_TREE_ENTRIES} files"
            if st.st_uid != me:
                return f"{where} is owned by uid {st.st_uid}, not this user"
            if stat.S_ISDIR(st.st_mode) and len(rel) >= MAX_TREE_DEPTH:
                return f"{where} is nested too deep to check"
    return None


def tree_stats(dir_fd: int, name: str) -> Iterator[os.stat_result]:
    """The lstat of everything below directory ``name`` of ``dir_fd``, by :func:`tree`.

    What vanishes meanwhile, or cannot be opened, is left out. Stops at
    ``MAX_TREE_DEPTH``: a deep planted tree ends the count, never the caller.
    """
    try:
        fd = fs.open_dir(dir_fd, name)
    except OSError:
        return
    try:
        with contextlib.closing(tree(fd, skip=(OSError,))) as found:
            for each in found:
                yield each.st
    finally:
        os.close(fd)


def untouched_for(dir_fd: int, name: str, st: os.stat_result, now: float) -> float:
    """Seconds directory ``name`` of ``dir_fd`` (``st``: its lstat) has been left alone.

    From its mtime, unless that lies more than ``FUTURE_SLACK_S`` ahead of ``now``: such a
    date never grows old, so the sweeps kept the directory for good (issue 30). Nothing
    says who left it or when, so its age counts from when it is first seen here: a
    directory of ours is re-dated to now (by descriptor, the same inode), so this
    process and every later one count from then; any other from this process's first
    sight of it. Never more than the truth: a sweep removes nothing sooner than it would
    have with a right clock.
    """
    if st.st_mtime <= now + FUTURE_SLACK_S:
        return max(0.0, now - st.st_mtime)
    if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            fd = fs.open_dir(dir_fd, name)
            try:
                now_st = fs.fstat(fd)
                if (now_st.st_dev, now_st.st_ino) == (st.st_dev, st.st_ino):
                    fs.touch(fd)
                    return 0.0
            finally:
                os.close(fd)
    ident = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if len(_first_seen) >= 4096:
        _first_seen.clear()  # forgetting costs a later sweep, never a wrong removal
    return time.monotonic() - _first_seen.setdefault(ident, time.monotonic())


def remove_tree(
    dir_fd: int, name: str, owner: int | None = None, errors: list[OSError] | None = None
) -> bool:
    """Remove directory ``name`` of ``dir_fd`` and everything in it, by descriptor.

    Never follows a link (a link is unlinked, its target untouched), never opens a FIFO,
    socket or device (they are unlinked unopened), so nothing planted can block it or
    redirect it. With ``owner``, only entries of that uid are removed (in a private
    directory, a file of someone else's is evidence, not ours to delete), and their
    directories are kept. Best effort: whether all of ``name`` is gone; ``errors``
    receives each error met (a caller that reports them says why something stayed).
    """
    return _remove_tree(dir_fd, name, owner, 0, [] if errors is None else errors)


def _remove_tree(
    dir_fd: int, name: str, owner: int | None, depth: int, errors: list[OSError]
) -> bool:
    try:
        st = fs.lstat(dir_fd, name)
    except FileNotFoundError:
        return True
    except OSError as e:
        errors.append(e)
        return False
    if owner is not None and st.st_uid != owner:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return _unlink_noting(dir_fd, name, False, errors)
    if depth >= MAX_TREE_DEPTH:
        errors.append(OSError(errno.ELOOP, "nested too deep to remove", name))
        return False
    try:
        fd = fs.open_dir(dir_fd, name)
    except FileNotFoundError:
        return True
    except OSError as e:
        errors.append(e)
        return False
    try:
        inner = fs.fstat(fd)
        if (inner.st_dev, inner.st_ino) != (st.st_dev, st.st_ino):
            return False  # swapped between the look and the open
        whole = True
        for child in fs.names(fd):
            whole = _remove_tree(fd, child, owner, depth + 1, errors) and whole
    except OSError as e:
        errors.append(e)
        whole = False
    finally:
        os.close(fd)
    return whole and _unlink_noting(dir_fd, name, True, errors)


def _unlink_noting(dir_fd: int, name: str, directory: bool, errors: list[OSError]) -> bool:
    """Unlink (or rmdir) ``name``; whether it is gone, the error noted if not."""
    try:
        fs.remove(dir_fd, name, directory)
    except FileNotFoundError:
        pass
    except OSError as e:
        errors.append(e)
        return False
    return True


def remove_path(path: Path, owner: int | None = None) -> bool:
    """:func:`remove_tree` of ``path`` (its parent reached by path, once)."""
    try:
        parent = fs.open_root(path.parent)
    except OSError:
        return False
    try:
        return remove_tree(parent, path.name, owner)
    finally:
        os.close(parent)
