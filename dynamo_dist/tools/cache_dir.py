"""The cache directory as ``dynamo-dist cache`` sees it, and how the commands speak.

Every byte under the directory may have been written by someone else, and jobs
publish, refuse and prune entries while a command runs. This module owns reading it
(by descriptors, each directory opened from its parent with ``O_NOFOLLOW``; what
vanished meanwhile skipped, what cannot be read remembered for the last line) and
printing what came from it (control characters escaped, one line per failure with
the path, the cause and the fix). The commands that list, delete and create
(``cache_cli``, ``cache_remove``, ``cache_init``) all build on it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_dist._errors import ConfigError
from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.entries import EntryRefused
from dynamo_dist.cache.secret import OLD_NAMESPACE_PREFIX, cache_secret
from dynamo_dist.cache.store import DiskStore

# A name that is gone, or is no (plain) directory any more: skipped, it is not ours to read.
GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ESTALE)
TMP_PREFIX = ".tmp."
# Clocks of hosts sharing a filesystem disagree by seconds: a date this little ahead is "now".
CLOCK_SLACK_S = fs_tree.FUTURE_SLACK_S
_MAX_TEXT = 200


# -- output --------------------------------------------------------------------------
def clean(value: object, limit: int = _MAX_TEXT) -> str:
    """``value`` as printable text: control characters escaped (``\\x1b``), long text cut.

    Names, labels and reasons come from a directory anyone may write: printed raw,
    an escape sequence could rewrite the terminal (hide a line, fake a "valid").
    Plain text is unchanged.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def say(line: str, err: bool = False) -> None:
    """Print one line, sanitised: every line may carry text from the cache directory."""
    print(clean(line, limit=1 << 16), file=sys.stderr if err else sys.stdout)


class Fail(Exception):
    """Ends a command: ``str(self)`` is its one-line message (path, cause, fix)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def fix_for(err: int | None, write: bool = False, path: str = "DIR") -> str:
    """What the user can do about ``err`` (an errno)."""
    if err in (errno.EACCES, errno.EPERM):
        if write:
            return "run this as a user who may write there (the cache's owner, or root)"
        return f"run this as a user who may read it, or ask its owner to: chmod -R a+rX {path}"
    if err == errno.EROFS:
        return "the filesystem is mounted read-only; prune or clear it where it is writable"
    if err in (errno.ENOENT, errno.ENOTDIR):
        return "check the path (it may have been moved or deleted meanwhile)"
    if err == errno.ELOOP:
        return "a directory inside the cache is a symlink; remove the link"
    return "check the filesystem (and retry)"


def oserror_line(
    cmd: str, e: OSError, default: str, write: bool = False, doing: str = "cannot use"
) -> str:
    """One line: what failed on which path, why, and what the user can do about it."""
    where = e.filename if e.filename is not None else default
    fix = fix_for(e.errno, write, str(where))
    return f"dynamo-dist cache {cmd}: {doing} {where}: {e.strerror or e}; {fix}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_age(s: float | None) -> str:
    if s is None:
        return "?"
    for unit, sec in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= sec:
            return f"{s / sec:.1f}{unit}"
    return f"{s:.0f}s"


# -- reading the directory without following links -----------------------------------
@dataclass
class Item:
    """One thing under the cache that takes space: an entry, a refused box or a .tmp dir."""

    kind: str  # "entry", "refused" or "tmp"
    parts: tuple[str, ...]  # below the root
    size: int
    age: float | None  # None: unknown (dated in the future)
    torch: str = "?"
    label: str = ""
    problem: str | None = None

    @property
    def name(self) -> str:
        return self.parts[-1]


class CacheDir:
    """The cache directory as this command sees it: read by descriptors, never via links.

    ``unreadable`` collects what could not be read below ``entries/<ns>`` (reported
    on the last line); anything that vanished meanwhile is silently skipped.
    """

    def __init__(self, cmd: str, root: str) -> None:
        self.cmd = cmd
        self.root = Path(root)
        self.unreadable: list[tuple[str, OSError]] = []
        self.now = time.time()
        try:
            st = fs.stat_root(self.root)  # the root is the user's choice: a link is followed
        except OSError as e:
            raise Fail(oserror_line(cmd, e, root)) from None
        if not stat.S_ISDIR(st.st_mode):
            raise Fail(
                f"dynamo-dist cache {cmd}: {root} is not a directory; give the cache directory"
            )
        try:
            self.store = DiskStore(root, cache_secret())  # read (and removed from env) at import
        except ConfigError as e:
            raise Fail(f"dynamo-dist cache {cmd}: {e}") from None
        self.children((), required=True)

    @contextlib.contextmanager
    def walk(self, parts: Sequence[str]) -> Iterator[int]:
        """A descriptor of ``root/parts``, each part opened with O_NOFOLLOW from its parent."""
        with fs.walk(self.root, parts) as fds:
            yield fds[-1]

    def path(self, parts: Sequence[str]) -> Path:
        return self.root.joinpath(*parts)

    def children(
        self, parts: Sequence[str], required: bool = False
    ) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of what is in ``root/parts``, sorted; [] if it is gone or a link.

        Unreadable: fatal if ``required`` (nothing sensible can be said without it),
        else remembered for the last line.
        """
        try:
            with self.walk(parts) as fd:
                return fs.entries(fd)  # what vanished since listed is left out
        except OSError as e:
            if e.errno in GONE and (parts or not required):
                return []
            e.filename = str(self.path(parts))
            if required:
                raise Fail(oserror_line(self.cmd, e, str(self.root), doing="cannot read")) from None
            if all(p != e.filename for p, _ in self.unreadable):
                self.unreadable.append((e.filename, e))
            return []

    def subdirs(self, parts: Sequence[str], required: bool = False) -> list[str]:
        return [n for n, st in self.children(parts, required) if stat.S_ISDIR(st.st_mode)]

    def tree(self, parts: Sequence[str], by_ctime: bool = False) -> tuple[int, float | None]:
        """(bytes of regular files, newest mtime) under ``root/parts``, without links.

        (0, None) if it vanished. Deep or hostile trees end the count, not the command.
        ``by_ctime``: an mtime ahead of the clock counts as the file's ctime instead.
        """
        size, newest = 0, None
        with contextlib.suppress(OSError, RecursionError), self.walk(parts[:-1]) as parent:
            top = fs.lstat(parent, parts[-1])
            newest = self._stamp(top, by_ctime)
            if not stat.S_ISDIR(top.st_mode):
                return (top.st_size if stat.S_ISREG(top.st_mode) else 0), newest
            for st in fs_tree.tree_stats(parent, parts[-1]):  # no links followed
                newest = max(newest, self._stamp(st, by_ctime))
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
        return size, newest

    def _stamp(self, st: os.stat_result, by_ctime: bool) -> float:
        """When ``st`` last changed: its mtime, or with ``by_ctime`` its ctime if the mtime
        lies ahead of the clock. A ctime cannot be set (``touch -d`` sets it to now): it is
        the file system's own record of the last change, on its clock."""
        if by_ctime and st.st_mtime > self.now + CLOCK_SLACK_S:
            return st.st_ctime
        return st.st_mtime

    # -- what is where ---------------------------------------------------------------
    def shards(self, all_namespaces: bool) -> Iterator[tuple[str, ...]]:
        """``entries/<ns>/<kk>`` (and ``entries/<kk>`` of the layout before namespaces)."""
        ns_now = self.store.namespace
        names = self.subdirs(("entries",), required=True)
        if not all_namespaces:
            names = [n for n in names if n == ns_now]
        for ns in names:
            if len(ns) == 2 and all_namespaces:  # before namespaces: entries/<kk>/<key>
                yield ("entries", ns)
                continue
            for kk in self.subdirs(("entries", ns)):
                yield ("entries", ns, kk)

    def entries(self) -> Iterator[Item]:
        """Entries of this secret's namespace, verified; vanished ones skipped."""
        for shard in self.shards(all_namespaces=False):
            for name, st in self.children(shard):
                if stat.S_ISDIR(st.st_mode) and not name.startswith(TMP_PREFIX):
                    item = self._entry((*shard, name), st)
                    if item is not None:
                        yield item

    def _entry(self, parts: tuple[str, ...], st: os.stat_result) -> Item | None:
        path = self.path(parts)
        manifest: Any = {}
        problem = None
        try:
            manifest = self.store.verify(path, key=parts[-1])
        except EntryRefused as e:
            problem = str(e)
        except Exception as e:  # whatever the store raises: one row
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is not None and not self._still_there(parts, st):
            return None  # pruned or refused while we read it
        if not isinstance(manifest, dict):
            manifest = {}
        size, _ = self.tree(parts)
        factors = manifest.get("factors")
        torch = factors.get("torch", "?") if isinstance(factors, dict) else "?"
        label = manifest.get("label", "")
        return Item(
            "entry",
            parts,
            size,
            self.age(manifest.get("created"), st.st_mtime),
            torch=torch if isinstance(torch, str) else "?",
            label=label if isinstance(label, str) else "?",
            problem=problem,
        )

    def _still_there(self, parts: tuple[str, ...], st: os.stat_result) -> bool:
        try:
            with self.walk(parts[:-1]) as fd:
                now = fs.lstat(fd, parts[-1])
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def tmps(self) -> Iterator[Item]:
        """Incomplete publishes (``.tmp.<key>.<hex>``) of every namespace.

        Aged by their files' ctimes where an mtime lies ahead of the clock: a publish
        dated in the future (set by hand, or written before the clock was stepped back)
        was never old enough to prune (issue 30), and its publisher, if any, cannot be
        named (the name carries none) to be proven dead.
        """
        for shard in self.shards(all_namespaces=True):
            for name, st in self.children(shard):
                if name.startswith(TMP_PREFIX) and stat.S_ISDIR(st.st_mode):
                    size, newest = self.tree((*shard, name), by_ctime=True)
                    if newest is not None:
                        yield Item("tmp", (*shard, name), size, self.age(None, newest))

    def refused(self) -> Iterator[Item]:
        """Refused boxes (``refused/<ns>/<box>``) of every namespace: never read again."""
        for ns in self.subdirs(("refused",)):
            for name, _st in self.children(("refused", ns)):
                size, newest = self.tree(("refused", ns, name))
                if newest is not None:
                    yield Item("refused", ("refused", ns, name), size, self.age(None, newest))

    def age(self, created: object, mtime: float | None) -> float | None:
        """Seconds since ``created``, else since ``mtime``; None if both lie in the future.

        A future ``created`` would make an entry unprunable forever; a future mtime too
        (a clock far ahead, or someone's touch): such an entry's age is unknown.
        """
        for when in (_finite(created), mtime):
            if when is not None and when <= self.now + CLOCK_SLACK_S:
                return max(0.0, self.now - when)
        return None

    def incomplete_line(self) -> str | None:
        """The last line when parts could not be read, or None."""
        if not self.unreadable:
            return None
        path, e = self.unreadable[0]
        more = f" and {len(self.unreadable) - 1} more" if len(self.unreadable) > 1 else ""
        return (
            f"dynamo-dist cache {self.cmd}: could not read {path}{more}: "
            f"{e.strerror or e}; the output above is incomplete: {fix_for(e.errno, path=path)}"
        )


def _finite(value: object) -> float | None:
    """``value`` as a finite number of seconds, or None (strings, NaN, 1e400, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


def exists(path: Path) -> bool:
    try:
        fs.lstat(None, path)
    except OSError:
        return False
    return True


# -- what every command ends with ------------------------------------------------------
def finish(cache: CacheDir, code: int) -> int:
    line = cache.incomplete_line()
    if line is None:
        return code
    say(line, err=True)
    return code or 1


def rel(parts: Sequence[str]) -> str:
    return "/".join(parts)


def old_namespaces(cache: CacheDir) -> list[tuple[str, str]]:
    """``entries/k-*``, ``locks/k-*`` and ``refused/k-*``: the old derivation's namespaces.

    Their key ids were a cheap HMAC of the raw secret (an offline oracle for it), and
    no job of this version reads them; anything by that name is listed, link or not
    (a link is unlinked, never followed).
    """
    return [
        (top, name)
        for top in ("entries", "locks", "refused")
        for name, _st in cache.children((top,))
        if name.startswith(OLD_NAMESPACE_PREFIX)
    ]
