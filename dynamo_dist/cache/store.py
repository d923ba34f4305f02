"""The shared cache directory: looking entries up, publishing them atomically, trimming.

Layout under the root (one directory per entry, named by its key)::

    <root>/entries/<ns>/<kk>/<key>/manifest.json  # versions, key factors, sha256 per file, HMAC
    <root>/entries/<ns>/<kk>/<key>/artifact.tar   # inductor's own cache files for one graph
    <root>/locks/<ns>/<key>.<gen>.lock            # who is compiling it now (cache/lock.py)
    <root>/refused/<ns>/<key>.<ms>.<hex>/{entry,REFUSED}  # entries proven bad, and why (newest 64)

``<ns>`` is ``k2-<key id>`` for entries signed with a secret (the key id is derived
from the secret by scrypt, see ``cache/secret.key_id``), ``unsigned`` without one: jobs with
different secrets share nothing, so neither refuses (and evicts) the other's valid entries.

    <root>/DYNAMO_DIST_CACHE                  # marker: this directory is a cache (format)

An entry is built in a temporary directory beside its final place and renamed
into place, so readers see a whole entry or none. Nothing is unpickled before
the manifest's checksums (and, with ``DYNAMO_DIST_CACHE_SECRET``, its HMAC)
have been verified (``cache/verify.py``; the format is ``cache/entries.py``, the
archive ``cache/archive.py``).

Every byte under the root may have been written by someone else, so:

* files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` in fresh directories
  with unpredictable names, so nothing is ever written through a planted link;
* the root is opened once (a link there is the user's choice and is followed);
  every directory below it is walked from its parent's descriptor with
  ``O_NOFOLLOW`` (``fs.walk``), and every create, rename, unlink and utime is relative
  to such a descriptor, so a directory swapped for a link at any moment redirects nothing;
* without a secret, the unsigned namespace is created without group/other write
  whatever the umask (only who wrote an entry vouches for it);
* what is proven bad is moved aside (``refused/``), never deleted in place, and what
  is not readable here is a miss that stays for the ranks that can read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from dynamo_dist._log import get_logger
from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.archive import write_archive
from dynamo_dist.cache.entries import (
    ARTIFACT,
    FORMAT,
    MANIFEST,
    DirIdent,
    Entry,
    EntryRefused,
    EntryUnavailable,
    EntryUntrusted,
    dir_ident,
    namespace,
    sign,
)
from dynamo_dist.cache.fs_ops import FsOps, counting, tick
from dynamo_dist.cache.refused import Trimmer
from dynamo_dist.cache.rooms import Member
from dynamo_dist.cache.verify import entry_parts, read_bounded, verify_entry

log = get_logger("cache")

MARKER = "DYNAMO_DIST_CACHE"


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    for line in (fs.read_system_text("/proc/self/status") or "").splitlines():
        if line.startswith("Umask:"):
            with contextlib.suppress(ValueError, IndexError):
                return int(line.split()[1], 8)
    return 0o022


def _create_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write a new file in ``dir_fd``; never through a link, never over an existing file."""
    tick("writes", 2)
    fs.write_new(dir_fd, name, data, mode)


class DiskStore:
    """Entries on a (shared) filesystem. ``get`` verifies, ``put`` publishes atomically.

    Every name below the root is reached from a descriptor of the root, one
    directory at a time with ``O_NOFOLLOW``, and every create, rename and unlink
    is relative to such a descriptor: a directory swapped for a link at any moment
    (``locks -> /home/victim``) fails the walk instead of redirecting a write.
    """

    def __init__(self, root: str | os.PathLike[str], secret: str | None = None) -> None:
        self.root = Path(root)
        self.secret = secret or None
        self.namespace = namespace(self.secret)
        self.entries = self.root / "entries" / self.namespace
        self.locks = self.root / "locks" / self.namespace
        self.refused = self.root / "refused" / self.namespace
        self.marker = self.root / MARKER
        # Keys already reported untrusted: waiters call get() in a loop, one line is enough.
        self._untrusted_seen: set[str] = set()
        # Keeps refused/<ns>/ bounded, off the compile's path.
        self._trimmer = Trimmer(lambda: self.walk("refused", self.namespace))
        # File-system operations this process made here (see FsOps).
        self.ops = FsOps()

    # -- modes -------------------------------------------------------------------
    @property
    def _unsigned(self) -> bool:
        return self.namespace == "unsigned"

    def _mkdir_mode(self) -> int:
        """Mode for new directories: never group/other-writable without a secret.

        Unsigned entries are trusted only if nobody else could have written them, so
        their directories must not be shared-writable whatever the umask. Signed
        namespaces keep the umask's mode: a group may share a signed cache.
        """
        return 0o755 if self._unsigned else 0o777

    def _open_mode(self) -> int:
        """The final mode of a directory we filled privately (0700) and now publish."""
        return self._mkdir_mode() & ~_umask()

    @contextlib.contextmanager
    def walk(self, *parts: str, create: bool = False) -> Iterator[list[int]]:
        """Descriptors of the root and ``parts`` below it (created if ``create``), no links.

        What the caller does inside the block is counted in ``ops`` too.
        """
        mode = self._mkdir_mode() if create else None
        with counting(self.ops), fs.walk(self.root, parts, mode, counted=True) as fds:
            yield fds

    def check_usable(self) -> None:
        """Raise OSError (with the reason) unless entries can be written here.

        A job that creates the cache also writes its marker, which ``cache
        clear`` and ``prune`` require before deleting anything.
        """
        with counting(self.ops):
            self._check_usable()

    def _check_usable(self) -> None:
        self._make_entries()
        for top in ("locks", "refused"):
            with self.walk(top, self.namespace, create=True):
                pass
        with self.walk() as (root_fd,):
            # An unpredictable name, O_CREAT|O_EXCL|O_NOFOLLOW: no planted link is written through.
            probe = f".probe.{secrets.token_hex(8)}"
            try:
                fs.write_new(root_fd, probe, b"ok", 0o600)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    fs.remove(root_fd, probe)

    def _make_entries(self) -> None:
        """Create ``entries/``; whoever creates it creates the cache and marks it."""
        with self.walk(create=True) as (root_fd,):
            new = fs.make_dir(root_fd, "entries", self._mkdir_mode())
            # A planted link here would move every namespace elsewhere: the walk refuses it.
            with (
                fs.walk(root_fd, ("entries",), counted=True) as (_, fd),
                fs.walk(fd, (self.namespace,), self._mkdir_mode(), counted=True),
            ):
                pass
            if new:
                with contextlib.suppress(FileExistsError):
                    _create_at(root_fd, MARKER, json.dumps({"format": FORMAT}).encode() + b"\n")

    def entry_dir(self, key: str) -> Path:
        return self.entries / key[:2] / key

    # -- reading ---------------------------------------------------------------
    def verify(
        self, path: Path, key: str | None = None, expect: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The manifest of the entry at ``path`` if it is intact.

        Total: whatever is on disk, the answer is a manifest, EntryRefused (proven
        bad: malformed, skewed, unsigned, corrupt, a link or device where a file must
        be) or EntryUnavailable (not readable here and now: permissions, descriptors,
        memory, I/O errors, an entry moved or pruned while being read). Without a
        secret, EntryUntrusted (an EntryRefused) when anyone but this user (or root)
        could have written a directory or file of the entry (see ``verify_entry``).
        """
        with counting(self.ops):
            return verify_entry(self.root, path, key, expect, self.secret)

    def get(self, key: str, expect: dict[str, Any] | None = None) -> Entry | None:
        """The verified entry for ``key``, or None (a miss); EntryRefused if proven bad.

        * Proven bad (see ``verify``): moved aside into ``refused/``, so the next
          reader recompiles instead of re-refusing it, and EntryRefused is raised.
        * Not readable here and now (EntryUnavailable: EACCES, EMFILE, EIO, an entry
          moved or pruned while read): a miss (None) with one warning per key, and
          the entry stays where it is for the ranks that can read it. Never raised:
          a local problem must not destroy a shared entry, nor cost more than a
          local compile.
        * Unsigned and writable by someone else (EntryUntrusted): a miss (None) with
          one warning per key, left in place: not proven bad, and moving it may need
          rights we lack.
        """
        with counting(self.ops):
            return self._get(key, expect)

    def _get(self, key: str, expect: dict[str, Any] | None) -> Entry | None:
        path = self.entry_dir(key)
        tick("stats")
        try:  # a hint only: verify walks without links
            fs.lstat(None, path / MANIFEST)
        except OSError:
            return None
        ident: list[DirIdent] = []
        try:
            manifest = verify_entry(self.root, path, key, expect, self.secret, ident)
        except EntryUntrusted as e:
            self._warn_miss(key, f"not loading shared cache entry {key[:12]}: {e}; compiling")
            return None
        except EntryUnavailable as e:
            self._warn_miss(
                key,
                f"cannot read shared cache entry {key[:12]} ({e}); compiling locally and "
                "leaving the entry in place for the ranks that can read it",
            )
            return None
        except EntryRefused as e:
            self.refuse(path, str(e), ident=ident[0] if ident else None)
            raise
        return Entry(
            key,
            path,
            manifest,
            root=self.root,
            private=self.secret is None,
            ident=ident[0] if ident else None,
            ops=self.ops,
        )

    def _warn_miss(self, key: str, message: str) -> None:
        """One warning per key: waiters call get() in a loop, one line is enough."""
        if key not in self._untrusted_seen:
            self._untrusted_seen.add(key)
            log.warning("%s", message)

    def refuse(self, path: Path, reason: str, ident: DirIdent | None = None) -> bool:
        """Move a bad entry aside so the next reader recompiles instead of re-refusing it.

        Nothing is written into the refused entry (its files may be links): it is
        renamed, by directory descriptors, into a fresh directory of ours with an
        unpredictable name, and the reason goes beside it. With ``ident`` (the
        DirIdent that was verified), a directory there now that is not that
        one (republished meanwhile) is left alone. ``refused/<ns>/`` keeps at most
        ``REFUSED_KEEP`` boxes: a hostile or broken writer must not fill the disk.
        True if this call moved it.
        """
        with counting(self.ops):
            return self._refuse(path, reason, ident)

    def _refuse(self, path: Path, reason: str, ident: DirIdent | None) -> bool:
        tick("writes", 4)
        start, parts = entry_parts(self.root, path)
        with contextlib.suppress(OSError), contextlib.ExitStack() as stack:
            (*_, parent_fd) = stack.enter_context(fs.walk(start, parts[:-1], counted=True))
            if ident is not None:
                st = fs.lstat(parent_fd, parts[-1])
                if dir_ident(st) != ident:
                    return False  # not the entry we verified: moved or replaced meanwhile
            (*_, refused_fd) = stack.enter_context(
                self.walk("refused", self.namespace, create=True)
            )
            # 0700 while it is filled, so nothing can be planted in it.
            box = fs.make_temp_dir(refused_fd, f"{parts[-1][:64]}.{int(time.time() * 1000)}.")
            (_, box_fd) = stack.enter_context(fs.walk(refused_fd, (box,), counted=True))
            try:
                fs.rename(parent_fd, parts[-1], box_fd, "entry")
            except OSError:
                fs.remove(refused_fd, box, directory=True)  # someone else moved it first
                return False
            _create_at(box_fd, "REFUSED", (reason + "\n").encode())
            fs.chmod(box_fd, self._open_mode())
            self._trimmer.later()
            return True
        return False

    # -- writing ---------------------------------------------------------------
    def put(self, key: str, members: Iterable[Member], manifest: dict[str, Any]) -> int:
        """Publish ``members`` (open files, see ``cache/rooms.py``) as entry ``key``; bytes written.

        Losing a race to another publisher of the same key is fine: both entries
        describe the same graph, and the first one wins.
        """
        with counting(self.ops):
            self._make_entries()
        with self.walk("entries", self.namespace, key[:2], create=True) as fds:
            return self._put_at(
                fds[-1], key, lambda tmp_fd: self._fill(tmp_fd, key, members, manifest)
            )

    def put_copy(self, key: str, manifest: dict[str, Any], artifact: IO[bytes]) -> int:
        """Publish here, unchanged, an entry verified in another store; returns bytes written.

        ``manifest`` is the verified one (signature and all) and ``artifact`` the private
        copy of exactly the bytes that were hashed against it, so a reader of this store
        verifies the copy as it would the original (same secret, same checks). For the
        host-local copy of a shared entry (see ``cache/protocol.py``).
        """
        with counting(self.ops):
            self._make_entries()
        with self.walk("entries", self.namespace, key[:2], create=True) as fds:
            return self._put_at(fds[-1], key, lambda tmp_fd: _fill_copy(tmp_fd, manifest, artifact))

    def _put_at(self, shard_fd: int, key: str, fill: Callable[[int], int]) -> int:
        # A name nobody can predict, 0700 while filled: nobody can plant links in it.
        tmp = fs.make_temp_dir(shard_fd, f".tmp.{key}.")
        try:
            with fs.walk(shard_fd, (tmp,), counted=True) as (_, tmp_fd):
                tick("writes", 4)
                size = fill(tmp_fd)
                fs.chmod(tmp_fd, self._open_mode())
            for attempt in range(2):
                try:
                    fs.rename(shard_fd, tmp, shard_fd, key)
                    break
                except OSError:
                    with contextlib.suppress(OSError):
                        fs.lstat(shard_fd, f"{key}/{MANIFEST}")
                        return 0  # someone else published it first
                    if attempt:
                        raise
                    # A directory without a manifest (or not a directory) holds the name:
                    # never an entry (entries appear whole), so it goes aside, once.
                    self.refuse(self.entry_dir(key), "no manifest: left by a failed publish")
            fs.fsync(shard_fd)
            _remove_abandoned_publishes(shard_fd, key)
            return size
        finally:
            fs_tree.remove_tree(shard_fd, tmp)

    def _fill(
        self, tmp_fd: int, key: str, members: Iterable[Member], manifest: dict[str, Any]
    ) -> int:
        """Write artifact.tar and manifest.json into the private directory ``tmp_fd``."""
        size, digest = write_archive(tmp_fd, members)
        manifest = {
            **manifest,
            "format": FORMAT,
            "key": key,
            "files": {ARTIFACT: {"sha256": digest, "size": size}},
        }
        if self.secret is not None:
            manifest["signature"] = sign(manifest, self.secret)
        _create_at(tmp_fd, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return size

    def iter_entries(self) -> Iterator[Path]:
        """Entry directories; links are never followed (they are not entries)."""
        for sub in _plain_subdirs(self.entries):
            for e in _plain_subdirs(sub):
                if not e.name.startswith(".tmp."):
                    yield e

    def iter_all_entries(self) -> Iterator[Path]:
        """Entries of every namespace, and of the layout before namespaces (for ``clear``).

        Links are never followed, at any level.
        """
        for ns in _plain_subdirs(self.root / "entries"):
            # Before namespaces: entries/<kk>/<key>; now: entries/<ns>/<kk>/<key>.
            subs = [ns] if len(ns.name) == 2 else _plain_subdirs(ns)
            for sub in subs:
                for e in _plain_subdirs(sub):
                    if not e.name.startswith(".tmp."):
                        yield e


def _fill_copy(tmp_fd: int, manifest: dict[str, Any], artifact: IO[bytes]) -> int:
    """Write ``artifact`` (from its start) and ``manifest`` as they are into ``tmp_fd``."""
    artifact.seek(0)
    with fs.create_file(tmp_fd, ARTIFACT, artifact) as out:
        size = out.tell()
    _create_at(tmp_fd, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return size


#: A publish takes seconds; a temporary directory this old was left by a killed leader.
ABANDONED_PUBLISH_S = 3600.0


def _remove_abandoned_publishes(shard_fd: int, key: str) -> None:
    """Remove ``.tmp.<key>.*`` directories of this shard left by leaders killed mid-publish.

    Only for the key just published (its entry now exists, so no publisher of it is
    still needed), only plain directories, only when untouched for an hour (or dated in
    the future: a clock cannot make one immortal); removed by descriptor, so a link or a
    FIFO planted inside is unlinked, never followed or opened. ``dynamo-dist cache
    prune`` catches the rest.
    """
    now = time.time()
    with contextlib.suppress(OSError):
        for name, st in fs.entries(shard_fd):
            if not name.startswith(f".tmp.{key}.") or not stat.S_ISDIR(st.st_mode):
                continue
            if abs(now - st.st_mtime) > ABANDONED_PUBLISH_S:
                fs_tree.remove_tree(shard_fd, name)


def _plain_subdirs(path: Path) -> list[Path]:
    """Subdirectories of ``path`` that are real directories, sorted; [] if unreadable.

    Neither ``path`` itself nor its children are followed when they are links.
    """
    try:
        if not stat.S_ISDIR(fs.lstat(None, path).st_mode):
            return []
        with fs.walk(path, ()) as (fd,):
            return [path / n for n, st in fs.entries(fd) if stat.S_ISDIR(st.st_mode)]
    except OSError:
        return []


def write_marker(root: Path) -> bool:
    """Mark ``root`` as a dynamo_dist cache; False if it already carries a marker.

    ``dynamo-dist cache clear`` and ``prune`` delete only in marked directories,
    so a typo'd path or a directory that merely has an ``entries/`` is safe.
    """
    try:
        fs.write_new(None, root / MARKER, json.dumps({"format": FORMAT}).encode() + b"\n")
    except FileExistsError:
        return False
    return True


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of the cache at ``root``, or None if it has no (valid) marker."""
    try:
        marker = json.loads(read_bounded(root / MARKER, 4096, MARKER))
    except (OSError, ValueError, EntryRefused, EntryUnavailable):  # any failure: no marker
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("format"), int) else None
