"""``dynamo-dist cache ls|verify|prune|clear|init DIR``: look after a shared cache directory.

``dynamo-dist cache secret PATH`` writes a new random secret for it.

Deleting commands (``prune``, ``clear``) act only in a directory that carries the
cache marker (``DYNAMO_DIST_CACHE``, written when a job creates the cache, or by
``dynamo-dist cache init DIR`` for caches made before markers existed), and
never follow a link: a planted ``entries/zz -> /home/victim`` is unlinked, not
emptied.

Every byte under DIR may have been written by someone else, and jobs publish,
refuse and prune entries while these commands run. So:

* every directory below DIR is opened from its parent's descriptor with
  ``O_NOFOLLOW``; a name that vanished or turned into a file or a link between
  listing and reading is skipped, never a traceback;
* a directory that cannot be read (EACCES) ends the command with one line naming
  the path, the cause and the fix (DIR itself, ``entries/``), or is reported on
  the last line with a nonzero exit (anything deeper), after what could be read;
* everything printed that came from the directory (names, labels, versions,
  reasons) has its non-printable characters escaped, so a hostile entry cannot
  drive the terminal;
* ``created`` dates are not trusted beyond the present: a future or non-finite one
  falls back to the directory's mtime, and if that is in the future too the age
  is unknown, and such entries are pruned first;
* namespaces of the old key derivation (``k-<id>`` under ``entries/``, ``locks/``
  and ``refused/``, from before the secret went through scrypt) are never read
  again: ``ls`` mentions them and ``prune`` removes them (keeping a lock whose
  holder is seen alive on this host);
* leftovers count: incomplete publishes (``.tmp.*`` of a killed leader) are listed,
  pruned after an hour and cleared; refused boxes are listed, counted in
  ``--max-size`` and pruned before valid entries; ``clear`` keeps the lock files
  of live leaders (a lock that changed during a short watch).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import math
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_dist._config import CACHE_SECRET_ENV, CACHE_SECRET_FILE_ENV
from dynamo_dist._errors import ConfigError
from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.entries import ARTIFACT, FORMAT, EntryRefused
from dynamo_dist.cache.lock import look
from dynamo_dist.cache.secret import (
    OLD_NAMESPACE_PREFIX,
    cache_secret,
    read_secret,
    untrusted_reason,
)
from dynamo_dist.cache.store import MARKER, DiskStore, read_marker, write_marker

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
# A name that is gone, or is no (plain) directory any more: skipped, it is not ours to read.
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ESTALE)
TMP_PREFIX = ".tmp."
# An incomplete publish untouched this long belongs to a leader that died mid-publish.
STALE_TMP_S = 3600.0
# Lock holders touch their lock every 2 s; one that changed during this watch is live.
LOCK_WATCH_S = 5.0
# Clocks of hosts sharing a filesystem disagree by seconds: a date this little ahead is "now".
CLOCK_SLACK_S = 60.0
_MAX_TEXT = 200


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"--max-size {text!r}: expected e.g. 500M, 20G, 1048576")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


def parse_age(text: str) -> float:
    m = _AGE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"--older-than {text!r}: expected e.g. 30m, 12h, 7d")
    return (
        float(m.group(1))
        * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    )


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


def _say(line: str, err: bool = False) -> None:
    """Print one line, sanitised: every line may carry text from the cache directory."""
    print(clean(line, limit=1 << 16), file=sys.stderr if err else sys.stdout)


class _Fail(Exception):
    """Ends a command: ``str(self)`` is its one-line message (path, cause, fix)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _fix(err: int | None, write: bool = False, path: str = "DIR") -> str:
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


def _oserror_line(
    cmd: str, e: OSError, default: str, write: bool = False, doing: str = "cannot use"
) -> str:
    """One line: what failed on which path, why, and what the user can do about it."""
    where = e.filename if e.filename is not None else default
    fix = _fix(e.errno, write, str(where))
    return f"dynamo-dist cache {cmd}: {doing} {where}: {e.strerror or e}; {fix}"


def _guarded(cmd: str, fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``fn`` that ends with a one-line message and a nonzero exit, never a traceback.

    Whatever is in the directory, and whatever moves in it meanwhile, the user gets
    the path, the cause and what to do.
    """

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _Fail as e:
            _say(str(e), err=True)
            return e.code
        except OSError as e:
            writes = cmd in ("prune", "clear", "init", "secret")
            _say(_oserror_line(cmd, e, args.dir, write=writes), True)
            return 2
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the promise is: no traceback, ever
            _say(
                f"dynamo-dist cache {cmd}: {args.dir}: unexpected {type(e).__name__}: {e}; "
                "please report this as a bug (with the output of `dynamo-dist cache ls`)",
                err=True,
            )
            return 1

    return run


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _age(s: float | None) -> str:
    if s is None:
        return "?"
    for unit, sec in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= sec:
            return f"{s / sec:.1f}{unit}"
    return f"{s:.0f}s"


# -- reading the directory without following links -----------------------------------
@dataclass
class _Item:
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


class _Cache:
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
            raise _Fail(_oserror_line(cmd, e, root)) from None
        if not stat.S_ISDIR(st.st_mode):
            raise _Fail(
                f"dynamo-dist cache {cmd}: {root} is not a directory; give the cache directory"
            )
        try:
            self.store = DiskStore(root, cache_secret())  # read (and removed from env) at import
        except ConfigError as e:
            raise _Fail(f"dynamo-dist cache {cmd}: {e}") from None
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
            if e.errno in _GONE and (parts or not required):
                return []
            e.filename = str(self.path(parts))
            if required:
                raise _Fail(
                    _oserror_line(self.cmd, e, str(self.root), doing="cannot read")
                ) from None
            if all(p != e.filename for p, _ in self.unreadable):
                self.unreadable.append((e.filename, e))
            return []

    def subdirs(self, parts: Sequence[str], required: bool = False) -> list[str]:
        return [n for n, st in self.children(parts, required) if stat.S_ISDIR(st.st_mode)]

    def tree(self, parts: Sequence[str]) -> tuple[int, float | None]:
        """(bytes of regular files, newest mtime) under ``root/parts``, without links.

        (0, None) if it vanished. Deep or hostile trees end the count, not the command.
        """
        size, newest = 0, None
        with contextlib.suppress(OSError, RecursionError), self.walk(parts[:-1]) as parent:
            top = fs.lstat(parent, parts[-1])
            newest = top.st_mtime
            if not stat.S_ISDIR(top.st_mode):
                return (top.st_size if stat.S_ISREG(top.st_mode) else 0), newest
            for st in fs_tree.tree_stats(parent, parts[-1]):  # no links followed
                newest = max(newest, st.st_mtime)
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
        return size, newest

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

    def entries(self) -> Iterator[_Item]:
        """Entries of this secret's namespace, verified; vanished ones skipped."""
        for shard in self.shards(all_namespaces=False):
            for name, st in self.children(shard):
                if stat.S_ISDIR(st.st_mode) and not name.startswith(TMP_PREFIX):
                    item = self._entry((*shard, name), st)
                    if item is not None:
                        yield item

    def _entry(self, parts: tuple[str, ...], st: os.stat_result) -> _Item | None:
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
        return _Item(
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

    def tmps(self) -> Iterator[_Item]:
        """Incomplete publishes (``.tmp.<key>.<hex>``) of every namespace."""
        for shard in self.shards(all_namespaces=True):
            for name, st in self.children(shard):
                if name.startswith(TMP_PREFIX) and stat.S_ISDIR(st.st_mode):
                    size, newest = self.tree((*shard, name))
                    if newest is not None:
                        yield _Item("tmp", (*shard, name), size, self.age(None, newest))

    def refused(self) -> Iterator[_Item]:
        """Refused boxes (``refused/<ns>/<box>``) of every namespace: never read again."""
        for ns in self.subdirs(("refused",)):
            for name, _st in self.children(("refused", ns)):
                size, newest = self.tree(("refused", ns, name))
                if newest is not None:
                    yield _Item("refused", ("refused", ns, name), size, self.age(None, newest))

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
            f"{e.strerror or e}; the output above is incomplete: {_fix(e.errno, path=path)}"
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


# -- deleting without following links --------------------------------------------------
def _remove_at(root: Path, parts: Sequence[str]) -> None:
    """Delete ``root/parts...`` without following links anywhere below ``root``.

    Each directory on the way is opened with O_NOFOLLOW (a symlinked shard fails
    with ELOOP instead of leading elsewhere); the last part is removed by descriptor
    (``_cache_fs.remove_tree``), which never follows a link nor opens a FIFO.
    OSError (ENOTEMPTY) if something could not be removed (a job publishing into it).
    """
    with fs.walk(root, parts[:-1]) as fds:
        fs.lstat(fds[-1], parts[-1])  # gone: ENOENT, as before
        errors: list[OSError] = []
        if not fs_tree.remove_tree(fds[-1], parts[-1], errors=errors):
            raise errors[0] if errors else OSError(errno.ENOTEMPTY, "could not remove all of it")


def _try_remove(cmd: str, root: Path, parts: Sequence[str]) -> bool:
    """Remove ``root/parts``; False (with a line saying why and what to do) if it stays.

    A job may publish into a directory while it is being removed (ENOTEMPTY): tried
    again a few times, then reported.
    """
    for attempt in range(4):
        try:
            _remove_at(root, parts)
            return True
        except OSError as e:
            if e.errno in _GONE:
                return True  # gone already (another prune, or a job's refuse)
            if e.errno == errno.ENOTEMPTY and attempt < 3:
                continue
            e.filename = str(root.joinpath(*parts))
            _say(_oserror_line(cmd, e, str(root), write=True, doing="could not remove"), err=True)
            return False
    return False  # (not reached: the last attempt returns)


def _require_marker(args: argparse.Namespace, what: str) -> str | None:
    """Why ``args.dir`` must not be touched by ``what``, or None if it is a marked cache."""
    marker = read_marker(Path(args.dir))
    if marker is None:
        return (
            f"dynamo-dist cache {what}: {args.dir} has no valid {MARKER} marker, so it is not "
            f"known to be a dynamo_dist cache; nothing was deleted. If it is one (made before "
            f"markers existed), mark it once with: dynamo-dist cache init {args.dir}"
        )
    if marker["format"] != FORMAT:
        return (
            f"dynamo-dist cache {what}: {args.dir} is a format {marker['format']!r} cache; this "
            f"dynamo_dist uses format {FORMAT}; nothing was deleted"
        )
    return None


def _marked(args: argparse.Namespace, what: str) -> None:
    """Raise _Fail unless ``args.dir`` is a marked cache of our format."""
    marker = Path(args.dir) / MARKER
    if read_marker(Path(args.dir)) is None and _exists(marker):
        try:
            os.close(fs.open_file(None, marker)[0])
        except OSError as e:
            if e.errno not in _GONE:
                raise _Fail(_oserror_line(what, e, str(marker))) from None
    refusal = _require_marker(args, what)
    if refusal:
        raise _Fail(refusal)


def _exists(path: Path) -> bool:
    try:
        fs.lstat(None, path)
    except OSError:
        return False
    return True


# -- commands ------------------------------------------------------------------------
def _finish(cache: _Cache, code: int) -> int:
    line = cache.incomplete_line()
    if line is None:
        return code
    _say(line, err=True)
    return code or 1


def _row(it: _Item) -> str:
    if it.kind == "tmp":
        valid, what = "TMP", f"(incomplete publish {it.name})"
    else:
        valid = "yes" if it.problem is None else "NO"
        what = it.label + (f"  ({it.problem})" if it.problem else "")
    if it.age is None:
        what += "  (age unknown: dated in the future)"
    key = it.name[len(TMP_PREFIX) :] if it.kind == "tmp" else it.name
    return (
        f"{clean(key)[:12]:14s} {_human(it.size):>10s} {_age(it.age):>7s} "
        f"{clean(it.torch, 14):14s} {valid:5s} {what}"
    )


def cmd_ls(args: argparse.Namespace) -> int:
    cache = _Cache("ls", args.dir)
    rows = list(cache.entries())
    tmps = list(cache.tmps())
    refused = list(cache.refused())
    _say(f"{'key':14s} {'size':>10s} {'age':>7s} {'torch':14s} {'valid':5s} graph")
    for it in (*rows, *tmps):
        _say(_row(it))
    total = sum(r.size for r in rows)
    _say(
        f"{len(rows)} entries, {_human(total)}; "
        f"{len(tmps)} incomplete publishes, {_human(sum(t.size for t in tmps))}; "
        f"{len(refused)} refused, {_human(sum(r.size for r in refused))}"
    )
    old = _old_namespaces(cache)
    if old:
        _say(
            f"{len(old)} namespaces of the old key derivation ({', '.join(map(_rel, old[:3]))}"
            f"{' ...' if len(old) > 3 else ''}): never read again; `dynamo-dist cache prune` "
            "removes them"
        )
    return _finish(cache, 0)


def cmd_verify(args: argparse.Namespace) -> int:
    cache = _Cache("verify", args.dir)
    bad = n = 0
    for it in cache.entries():
        n += 1
        if it.problem:
            bad += 1
            _say(f"BAD {it.name}: {it.problem}")
    signed = "with" if cache.store.secret else "without"
    _say(f"{n - bad} of {n} entries valid (checked {signed} {CACHE_SECRET_ENV})")
    return _finish(cache, 1 if bad else 0)


def _oldest_first(items: list[_Item]) -> list[_Item]:
    """Unknown ages first (they cannot be trusted to be young), then oldest first."""
    return sorted(items, key=lambda r: (r.age is not None, -(r.age or 0.0)))


def cmd_prune(args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        _say("dynamo-dist cache prune: give --max-size and/or --older-than", err=True)
        return 2
    cache = _Cache("prune", args.dir)
    _marked(args, "prune")
    old_ok = _prune_old_namespaces(cache)
    rows = _oldest_first(list(cache.entries()))
    boxes = _oldest_first(list(cache.refused()))
    stale = [t for t in cache.tmps() if t.age is not None and t.age > STALE_TMP_S]
    # Refused boxes are never read again: they go before any valid entry.
    candidates = [*boxes, *rows]
    removed: list[_Item] = []
    if args.older_than is not None:
        removed += [r for r in candidates if r.age is None or r.age > args.older_than]
    kept = [r for r in candidates if r not in removed]
    if args.max_size is not None:
        total = sum(r.size for r in kept)
        for r in list(kept):  # refused first, then unknown ages, then oldest first
            if total <= args.max_size:
                break
            removed.append(r)
            kept.remove(r)
            total -= r.size
    failed = [r for r in (*stale, *removed) if not _try_remove("prune", cache.root, r.parts)]
    stale = [r for r in stale if r not in failed]
    kept += [r for r in removed if r in failed]
    removed = [r for r in removed if r not in failed]
    unknown = sum(1 for r in removed if r.age is None)
    if unknown:
        _say(
            f"{unknown} entries or refused boxes had an unknown age (dated in the future) "
            "and were pruned first"
        )
    ents = [r for r in removed if r.kind == "entry"]
    refd = [r for r in removed if r.kind == "refused"]
    left = [r for r in kept if r.kind == "entry"]
    _say(
        f"removed {len(ents)} entries ({_human(sum(r.size for r in ents))}), "
        f"{len(refd)} refused ({_human(sum(r.size for r in refd))}), "
        f"{len(stale)} stale incomplete publishes ({_human(sum(r.size for r in stale))}); "
        f"{len(left)} left ({_human(sum(r.size for r in left))})"
        + (f"; {len(failed)} could not be removed (see above)" if failed else "")
    )
    return _finish(cache, 1 if failed or not old_ok else 0)


def _rel(parts: Sequence[str]) -> str:
    return "/".join(parts)


def _old_namespaces(cache: _Cache) -> list[tuple[str, str]]:
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


def _prune_old_namespaces(cache: _Cache) -> bool:
    """Remove the old derivation's namespaces, one line each; False if one stays.

    A lock whose holder is seen alive on this host (an old dynamo_dist job still
    running) is kept, and so is its directory, as ``clear`` keeps live locks.
    """
    ok = True
    for parts in _old_namespaces(cache):
        size, _ = cache.tree(parts)
        live = 0
        if parts[0] == "locks":  # children() of a link or a file: [] (never followed)
            for name, st in cache.children(parts):
                lock = (*parts, name)
                if stat.S_ISREG(st.st_mode) and _alive_by_identity(cache, lock):
                    live += 1
                else:
                    ok = _try_remove("prune", cache.root, lock) and ok
            if live:
                _say(f"kept {_rel(parts)} of the old key derivation: {live} live locks in it")
                continue
        if _try_remove("prune", cache.root, parts):
            _say(f"removed {_rel(parts)} ({_human(size)}): a namespace of the old key derivation")
        else:
            ok = False
    return ok


_LockMap = dict[tuple[str, ...], tuple[int, int]]


def _lock_files(cache: _Cache) -> tuple[_LockMap, list[tuple[str, ...]]]:
    """(lock files with their (inode, mtime_ns), other things under locks/ to remove)."""
    locks: _LockMap = {}
    other: list[tuple[str, ...]] = []
    for ns, st in cache.children(("locks",)):
        if stat.S_ISREG(st.st_mode):  # locks/<key>.lock, before namespaces
            locks[("locks", ns)] = (st.st_ino, st.st_mtime_ns)
        elif not stat.S_ISDIR(st.st_mode):
            other.append(("locks", ns))  # a link is unlinked, never followed
        else:
            for name, lst in cache.children(("locks", ns)):
                if stat.S_ISREG(lst.st_mode):
                    locks[("locks", ns, name)] = (lst.st_ino, lst.st_mtime_ns)
                else:
                    other.append(("locks", ns, name))
    return locks, other


def _lock_state(cache: _Cache, parts: tuple[str, ...]) -> tuple[int, int] | None:
    try:
        with cache.walk(parts[:-1]) as fd:
            st = fs.lstat(fd, parts[-1])
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _alive_by_identity(cache: _Cache, parts: tuple[str, ...]) -> bool:
    """Whether the lock names a process of this host seen running as the lock's owner.

    Such a holder may just be frozen for a while (swapping, stopped); the jobs wait
    for it far longer than ``clear`` watches, so ``clear`` keeps its lock too.
    """
    try:
        with cache.walk(parts[:-1]) as dir_fd:
            holder = look(dir_fd, parts[-1], 0)
    except OSError:
        return False
    return holder is not None and holder.alive_by_identity() is True


def _remove_lock_if_unchanged(cache: _Cache, parts: tuple[str, ...], was: tuple[int, int]) -> bool:
    """Unlink a dead lock only if it is still the file watched (same inode and mtime).

    Checked by the directory's descriptor just before the unlink: a lock taken again
    meanwhile (a new leader, under the same name) is a new inode and stays.
    """
    try:
        with cache.walk(parts[:-1]) as fd:
            st = fs.lstat(fd, parts[-1])
            if (st.st_ino, st.st_mtime_ns) != was:
                return False
            fs.remove(fd, parts[-1])
    except OSError as e:
        if e.errno not in _GONE:
            e.filename = str(cache.root.joinpath(*parts))
            _say(_oserror_line("clear", e, str(cache.root), write=True, doing="could not remove"))
        return False
    return True


def cmd_clear(args: argparse.Namespace) -> int:
    cache = _Cache("clear", args.dir)
    _marked(args, "clear")
    # Every namespace: rotating the secret means clearing the old key's entries too.
    n = sum(1 for shard in cache.shards(all_namespaces=True) for _ in _entry_names(cache, shard))
    tmps = len(list(cache.tmps()))
    refused = len(list(cache.refused()))
    # A live leader's lock must stay, else a second leader compiles the same graph. No
    # clocks are compared: a holder touches its lock every 2 s, so a live lock changes
    # (mtime, or inode when re-taken) during the watch; a dead one does not.
    locks, other = _lock_files(cache)
    if locks:
        _say(f"watching {len(locks)} lock files for {LOCK_WATCH_S:.0f} s to keep live ones")
        sys.stdout.flush()
        time.sleep(LOCK_WATCH_S)
    dead = {
        p: was
        for p, was in locks.items()
        if _lock_state(cache, p) == was and not _alive_by_identity(cache, p)
    }
    ok = True
    for name in ("entries", "refused"):
        if _exists(cache.root / name):
            ok = _try_remove("clear", cache.root, [name]) and ok
    # locks/ is never removed wholesale: a leader may have taken a lock since it was
    # listed. Only the dead locks go (each checked again at its unlink), and junk.
    removed = sum(_remove_lock_if_unchanged(cache, p, was) for p, was in dead.items())
    for parts in other:
        ok = _try_remove("clear", cache.root, parts) and ok
    for ns, st in cache.children(("locks",)):
        if stat.S_ISDIR(st.st_mode):
            _rmdir_if_empty(cache, ("locks", ns))
    _rmdir_if_empty(cache, ("locks",))
    live = len(locks) - removed
    _say(
        f"removed {n} entries, {tmps} incomplete publishes, {refused} refused and "
        f"{removed} stale locks from {args.dir}; kept {live} live locks"
    )
    return _finish(cache, 0 if ok else 1)


def _entry_names(cache: _Cache, shard: tuple[str, ...]) -> list[str]:
    return [
        n
        for n, st in cache.children(shard)
        if stat.S_ISDIR(st.st_mode) and not n.startswith(TMP_PREFIX)
    ]


def _rmdir_if_empty(cache: _Cache, parts: tuple[str, ...]) -> None:
    with contextlib.suppress(OSError), cache.walk(parts[:-1]) as fd:
        fs.remove(fd, parts[-1], directory=True)  # fails (kept) while a live lock is in it


def cmd_init(args: argparse.Namespace) -> int:
    """Mark a directory as a cache: for caches made before markers, or a new one."""
    root = Path(args.dir)
    with fs.walk(root, (), create_mode=0o777) as (fd,):
        names = fs.names(fd)
    known = {"entries", "locks", "refused", MARKER}
    other = sorted(n for n in names if n not in known and not n.startswith(".probe."))
    if other and not args.force:
        _say(
            f"dynamo-dist cache init: {args.dir} holds {', '.join(other[:5])}"
            f"{' ...' if len(other) > 5 else ''}, which a cache does not; "
            "not marking it (add --force if it really is the cache)",
            err=True,
        )
        return 2
    if write_marker(root):
        _say(f"marked {args.dir} as a dynamo_dist cache (format {FORMAT})")
    else:
        _say(f"{args.dir} is already marked ({MARKER})")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    """Write a new random secret (32 bytes, hex) to a new file only this user can read.

    Created with O_EXCL and O_NOFOLLOW, mode 0600: an existing file (someone's
    secret, or a link planted to make us overwrite one) is never replaced.
    """
    path = Path(args.dir)
    # The directories above it, judged as jobs will judge the file (read_secret).
    problem = None if _exists(path) else untrusted_reason(path)
    if problem is not None:
        raise _Fail(
            f"dynamo-dist cache secret: not writing a secret to {path}: {problem}, so "
            "another user could replace the file (and jobs would refuse it). Fix: choose "
            "a directory only you can write, such as your home directory"
        )
    try:
        fd = fs.create_fd(None, path, 0o600)
    except FileExistsError:
        raise _Fail(
            f"dynamo-dist cache secret: {path} already exists (as a file or a link); "
            "not overwriting it. Fix: give a new path, or remove the old file first if "
            "no job needs that secret any more"
        ) from None
    try:
        fs.chmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    except BaseException:
        fs.remove(None, path)
        raise
    finally:
        os.close(fd)
    try:
        read_secret({CACHE_SECRET_FILE_ENV: str(path)})  # jobs accept what was written
    except ConfigError as e:  # e.g. a directory above it changed meanwhile
        fs.remove(None, path)
        raise _Fail(f"dynamo-dist cache secret: {e}; the file was removed") from None
    shown = clean(os.path.abspath(path))
    _say(f"wrote a new random secret to {shown} (mode 0600). Use it on every host of a job")
    _say("(copy it over a private channel, keeping mode 0600):")
    _say(f"  export {CACHE_SECRET_FILE_ENV}={shown}")
    _say(
        "dynamo-dist-run passes that variable on to its workers. A new secret starts a new, "
        "empty namespace in the cache: entries signed with another secret are not read."
    )
    return 0


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="inspect and maintain a shared cache directory")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, fn, text in (
        ("ls", cmd_ls, "list entries, incomplete publishes and refused entries"),
        ("verify", cmd_verify, "check every manifest, checksum and signature (exit 1 on problems)"),
        ("clear", cmd_clear, "remove every entry and dead lock (only in a marked cache)"),
    ):
        p = csub.add_parser(name, help=text)
        p.add_argument("dir")
        p.set_defaults(func=_guarded(name, fn))
    p = csub.add_parser("prune", help="remove refused boxes, then the oldest entries")
    p.add_argument("dir")
    p.add_argument("--max-size", type=parse_size, help="keep at most this much (e.g. 20G)")
    p.add_argument("--older-than", type=parse_age, help="remove entries older than (e.g. 7d)")
    p.set_defaults(func=_guarded("prune", cmd_prune))
    p = csub.add_parser(
        "init", help=f"mark DIR as a cache ({MARKER}), e.g. one made before markers existed"
    )
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="mark it even if it holds other files")
    p.set_defaults(func=_guarded("init", cmd_init))
    p = csub.add_parser(
        "secret", help="write a new random secret to PATH (mode 0600; never overwrites)"
    )
    p.add_argument("dir", metavar="PATH")
    p.set_defaults(func=_guarded("secret", cmd_secret))


__all__ = ["ARTIFACT", "add_parser", "clean"]
