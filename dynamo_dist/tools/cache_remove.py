"""``dynamo-dist cache prune|clear DIR``: deleting from a shared cache, never via a link.

Both act only in a directory that carries the cache marker of this format, and never
follow a link: each directory on the way is opened with ``O_NOFOLLOW`` and the last
part is removed by descriptor, so a planted ``entries/zz -> /home/victim`` is
unlinked, not emptied. ``prune`` removes refused boxes, stale incomplete publishes
and the old key derivation's namespaces before any valid entry; ``clear`` removes
everything but the lock files of live leaders (a lock that changed during a short
watch, or whose holder is seen alive on this host).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.entries import FORMAT
from dynamo_dist.cache.lock import look
from dynamo_dist.cache.store import MARKER, read_marker
from dynamo_dist.tools.cache_dir import (
    GONE,
    TMP_PREFIX,
    CacheDir,
    Fail,
    Item,
    exists,
    finish,
    human,
    old_namespaces,
    oserror_line,
    rel,
    say,
)

# An incomplete publish untouched this long belongs to a leader that died mid-publish.
STALE_TMP_S = 3600.0
# Lock holders touch their lock every 2 s; one that changed during this watch is live.
LOCK_WATCH_S = 5.0


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
            if e.errno in GONE:
                return True  # gone already (another prune, or a job's refuse)
            if e.errno == errno.ENOTEMPTY and attempt < 3:
                continue
            e.filename = str(root.joinpath(*parts))
            say(oserror_line(cmd, e, str(root), write=True, doing="could not remove"), err=True)
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
    """Raise Fail unless ``args.dir`` is a marked cache of our format."""
    marker = Path(args.dir) / MARKER
    if read_marker(Path(args.dir)) is None and exists(marker):
        try:
            os.close(fs.open_file(None, marker)[0])
        except OSError as e:
            if e.errno not in GONE:
                raise Fail(oserror_line(what, e, str(marker))) from None
    refusal = _require_marker(args, what)
    if refusal:
        raise Fail(refusal)


def _oldest_first(items: list[Item]) -> list[Item]:
    """Unknown ages first (they cannot be trusted to be young), then oldest first."""
    return sorted(items, key=lambda r: (r.age is not None, -(r.age or 0.0)))


def cmd_prune(args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        say("dynamo-dist cache prune: give --max-size and/or --older-than", err=True)
        return 2
    cache = CacheDir("prune", args.dir)
    _marked(args, "prune")
    old_ok = _prune_old_namespaces(cache)
    rows = _oldest_first(list(cache.entries()))
    boxes = _oldest_first(list(cache.refused()))
    tmps = list(cache.tmps())
    stale = [t for t in tmps if t.age is not None and t.age > STALE_TMP_S]
    ahead = sum(1 for t in tmps if t.age is None)
    # Refused boxes are never read again: they go before any valid entry.
    candidates = [*boxes, *rows]
    removed: list[Item] = []
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
        say(
            f"{unknown} entries or refused boxes had an unknown age (dated in the future) "
            "and were pruned first"
        )
    if ahead:
        say(
            f"{ahead} incomplete publishes are dated ahead of this host's clock even by their "
            "change time (ctime), so their age is unknown and they were kept: this host's "
            "clock is likely behind the file server's; fix it (NTP) and prune again"
        )
    ents = [r for r in removed if r.kind == "entry"]
    refd = [r for r in removed if r.kind == "refused"]
    left = [r for r in kept if r.kind == "entry"]
    say(
        f"removed {len(ents)} entries ({human(sum(r.size for r in ents))}), "
        f"{len(refd)} refused ({human(sum(r.size for r in refd))}), "
        f"{len(stale)} stale incomplete publishes ({human(sum(r.size for r in stale))}); "
        f"{len(left)} left ({human(sum(r.size for r in left))})"
        + (f"; {len(failed)} could not be removed (see above)" if failed else "")
    )
    return finish(cache, 1 if failed or not old_ok else 0)


def _prune_old_namespaces(cache: CacheDir) -> bool:
    """Remove the old derivation's namespaces, one line each; False if one stays.

    A lock whose holder is seen alive on this host (an old dynamo_dist job still
    running) is kept, and so is its directory, as ``clear`` keeps live locks.
    """
    ok = True
    for parts in old_namespaces(cache):
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
                say(f"kept {rel(parts)} of the old key derivation: {live} live locks in it")
                continue
        if _try_remove("prune", cache.root, parts):
            say(f"removed {rel(parts)} ({human(size)}): a namespace of the old key derivation")
        else:
            ok = False
    return ok


_LockMap = dict[tuple[str, ...], tuple[int, int]]


def _lock_files(cache: CacheDir) -> tuple[_LockMap, list[tuple[str, ...]]]:
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


def _lock_state(cache: CacheDir, parts: tuple[str, ...]) -> tuple[int, int] | None:
    try:
        with cache.walk(parts[:-1]) as fd:
            st = fs.lstat(fd, parts[-1])
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _alive_by_identity(cache: CacheDir, parts: tuple[str, ...]) -> bool:
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


def _remove_lock_if_unchanged(
    cache: CacheDir, parts: tuple[str, ...], was: tuple[int, int]
) -> bool:
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
        if e.errno not in GONE:
            e.filename = str(cache.root.joinpath(*parts))
            say(oserror_line("clear", e, str(cache.root), write=True, doing="could not remove"))
        return False
    return True


def cmd_clear(args: argparse.Namespace) -> int:
    cache = CacheDir("clear", args.dir)
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
        say(f"watching {len(locks)} lock files for {LOCK_WATCH_S:.0f} s to keep live ones")
        sys.stdout.flush()
        time.sleep(LOCK_WATCH_S)
    dead = {
        p: was
        for p, was in locks.items()
        if _lock_state(cache, p) == was and not _alive_by_identity(cache, p)
    }
    ok = True
    for name in ("entries", "refused"):
        if exists(cache.root / name):
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
    say(
        f"removed {n} entries, {tmps} incomplete publishes, {refused} refused and "
        f"{removed} stale locks from {args.dir}; kept {live} live locks"
    )
    return finish(cache, 0 if ok else 1)


def _entry_names(cache: CacheDir, shard: tuple[str, ...]) -> list[str]:
    return [
        n
        for n, st in cache.children(shard)
        if stat.S_ISDIR(st.st_mode) and not n.startswith(TMP_PREFIX)
    ]


def _rmdir_if_empty(cache: CacheDir, parts: tuple[str, ...]) -> None:
    with contextlib.suppress(OSError), cache.walk(parts[:-1]) as fd:
        fs.remove(fd, parts[-1], directory=True)  # fails (kept) while a live lock is in it
