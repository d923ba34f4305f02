"""An entry's payload: the tar written on publish, and its verified extraction.

``artifact.tar`` holds inductor's own cache files for one graph. It is read by every
rank and may have been written (or rewritten since verification) by someone else, so:

* it is plain tar, never decompressed (``r:``: 30 KB cannot become 200 MiB);
* ``extract`` unpacks a private, nameless copy of exactly the bytes it hashed against
  the verified manifest, never the shared file itself (no check-then-reopen race);
* it may hold only regular files and directories with safe relative names, checked
  all before anything is written, and they lose setuid/setgid/sticky bits;
* every malformed archive ends as ``EntryRefused``, every local failure (a full disk)
  as ``EntryUnavailable``, never as another exception in the training job.
"""

from __future__ import annotations

import hmac
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from dynamo_dist.cache import fs
from dynamo_dist.cache.entries import (
    ARTIFACT,
    MAX_ARTIFACT_BYTES,
    Entry,
    EntryMissing,
    EntryRefused,
    EntryUnavailable,
    file_meta,
)
from dynamo_dist.cache.fs_ops import counting, tick
from dynamo_dist.cache.rooms import Member, tar_members
from dynamo_dist.cache.verify import entry_moved, hash_fd, open_entry, open_regular

__all__ = ["MAX_MEMBERS", "extract", "write_archive"]

MAX_MEMBERS = 100_000

# Bounds on member names, checked before anything is written, so that a name the
# local filesystem cannot hold proves the archive bad rather than looking like a local
# failure (ENAMETOOLONG) later. Inductor's names are far shorter.
_MAX_NAME_COMPONENT = 255
_MAX_NAME = 1024


def write_archive(dir_fd: int, members: Iterable[Member]) -> tuple[int, str]:
    """Write ``members`` (open files, see ``cache/rooms.py``) as a new ``artifact.tar``.

    Created in ``dir_fd`` (a private directory being filled), fsynced, then hashed from
    its descriptor: (size, sha256) for the manifest.
    """
    with fs.create_file(dir_fd, ARTIFACT, writable=True) as out:
        with tarfile.open(fileobj=out, mode="w:") as tar:
            tar_members(tar, iter(members))
        out.flush()
        fs.fsync(out.fileno())
        size = out.seek(0, os.SEEK_END)
        out.seek(0)
        return size, hash_fd(out.fileno(), size)


def extract(entry: Entry, dest: Path, keep: IO[bytes] | None = None) -> int:
    """Unpack an entry's verified artifact into ``dest``; returns bytes read.

    The artifact is opened once (no links, FIFOs or devices, reached from the
    cache root without following links) and copied into a private anonymous file
    while it is hashed; the hash must match the verified manifest, and only that
    copy is unpacked. So the bytes unpacked are exactly the bytes checked, even if
    the shared file is swapped or rewritten after ``verify``. An unsigned entry must
    still be ours and writable by nobody else (EntryUntrusted), directories and file
    alike.

    Total, like ``verify``: EntryRefused only for what proves the entry bad (a
    link or device for the artifact, a size or sha256 that does not match, an
    unreadable or unsafe archive); EntryUnavailable for what is this rank's problem
    (creating ``dest`` or the private copy, ENOSPC/EFBIG/EDQUOT/EACCES while
    unpacking, an I/O error reading the shared file, an entry moved or pruned
    meanwhile), so the caller must not refuse the shared entry for it. On either
    error ``dest`` may hold part of the archive: the caller discards it.

    ``keep``: a file that receives the verified bytes too (before unpacking), for a
    copy of the entry elsewhere (``DiskStore.put_copy``) without reading it again.
    """
    try:
        with counting(entry.ops):
            return _extract(entry, dest, keep)
    except (EntryRefused, EntryUnavailable):
        raise
    except (OSError, MemoryError) as e:
        raise EntryUnavailable(f"cannot unpack here ({type(e).__name__}: {e})") from None
    except Exception as e:  # a hostile archive must never crash the training job
        raise EntryRefused(f"malformed entry ({type(e).__name__}: {e})") from None


def _extract(entry: Entry, dest: Path, keep: IO[bytes] | None) -> int:
    """``extract`` without the classification of unexpected errors."""
    size, digest = file_meta(entry.manifest, ARTIFACT)
    private = entry.must_be_private
    with open_entry(entry.root, entry.path, private) as entry_fd:
        try:
            fd, actual = open_regular(
                ARTIFACT, min(size, MAX_ARTIFACT_BYTES), ARTIFACT, entry_fd, private
            )
        except EntryMissing as e:
            if entry_moved(entry.root, entry.path, entry_fd):
                raise EntryUnavailable(f"{e}: the entry was moved or pruned meanwhile") from None
            raise
    try:
        if actual != size:
            raise EntryRefused(f"{ARTIFACT} is truncated ({actual} of {size} bytes)")
        # Read errors of the shared file and write errors of the private copy (a full
        # local disk) are OSErrors: extract() makes them EntryUnavailable.
        with fs.anonymous_file(dest.parent) as copy:
            got = hash_fd(fd, size, copy)
            if not hmac.compare_digest(got, digest):
                raise EntryRefused(f"{ARTIFACT} does not match its sha256 (changed after verify?)")
            if keep is not None:
                copy.seek(0)
                while block := copy.read(1 << 20):
                    keep.write(block)
            copy.seek(0)
            _unpack(copy, dest, size)
    finally:
        os.close(fd)
    return size


def _safe_member(m: tarfile.TarInfo) -> str | None:
    """Why member ``m`` may not be unpacked, or None if it is a plain file or directory."""
    if not (m.isreg() or m.isdir()) or m.issparse():
        return "is not a regular file or directory"
    # Relative, normalised, one component at a time: no "/abs", "..", "a//b", "./a".
    if "\0" in m.name or "\\" in m.name or any(p in ("", ".", "..") for p in m.name.split("/")):
        return "has an unsafe name"
    return None


def _plan_members(tar: tarfile.TarFile, size: int) -> list[tarfile.TarInfo]:
    """The members to unpack, each checked; EntryRefused for anything unsafe or contradictory.

    Beyond ``_safe_member``: names that fit any filesystem, no negative sizes, no file
    listed twice, and no name that is both a file and a directory (``a`` then
    ``a/b``). A member that passes cannot fail to unpack into an empty directory for
    a reason of the archive's, so any OSError while unpacking is this rank's.
    """
    members: list[tarfile.TarInfo] = []
    files: set[str] = set()
    dirs: set[str] = set()
    total = 0
    for m in tar:
        if len(members) >= MAX_MEMBERS:
            raise EntryRefused(f"archive has more than {MAX_MEMBERS} members")
        why = _safe_member(m)
        if why:
            raise EntryRefused(f"archive member {m.name!r:.200} {why}")
        parts = m.name.split("/")
        try:
            lengths = [len(os.fsencode(p)) for p in parts]
        except UnicodeError:
            raise EntryRefused(f"archive member {m.name!r:.200} has an unsafe name") from None
        if max(lengths) > _MAX_NAME_COMPONENT or sum(lengths) + len(parts) > _MAX_NAME:
            raise EntryRefused(f"archive member {m.name[:200]!r}... has a name too long")
        if m.size < 0:
            raise EntryRefused(f"archive member {m.name!r:.200} has a negative size")
        total += m.size
        if total > size:  # a plain tar holds no more than it weighs
            raise EntryRefused("archive unpacks to more than its own size")
        parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if m.isreg():
            if m.name in dirs:
                raise EntryRefused(f"archive member {m.name!r:.200} is a file and a directory")
            if m.name in files:
                raise EntryRefused(f"archive member {m.name!r:.200} is listed twice")
            files.add(m.name)
        elif m.name in files:
            raise EntryRefused(f"archive member {m.name!r:.200} is a file and a directory")
        else:
            dirs.add(m.name)
        if parents & files:
            raise EntryRefused(f"archive member {m.name!r:.200} is inside a file")
        dirs |= parents
        # No setuid/setgid/sticky, no group/other write: plain cache files.
        m.mode = (m.mode & 0o755) | (0o700 if m.isdir() else 0o600)
        members.append(m)
    return members


def _unpack(fileobj: IO[bytes], dest: Path, size: int) -> None:
    """Unpack a plain (never decompressed) tar of files and directories into ``dest``.

    ``dest`` is a fresh private directory. Every member is checked before anything is
    written (EntryRefused for an unreadable or unsafe archive), then written through the
    filesystem layer, relative to ``dest``'s descriptor: directories 0700, files with
    ``O_EXCL | O_NOFOLLOW``. EntryUnavailable when writing fails (ENOSPC, EFBIG, EDQUOT,
    EACCES: the local side's problem, not the archive's).
    """
    try:
        # "r:" : no transparent decompression, so 30 KB cannot become 200 MiB.
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            members = _plan_members(tar, size)
            try:
                with fs.walk(dest, (), create_mode=0o700) as (root_fd,):
                    _write_members(tar, members, root_fd)
            except OSError as e:
                raise EntryUnavailable(
                    f"cannot unpack into {dest} ({e.strerror or e}); free space or fix "
                    "the local cache directory"
                ) from None
    except tarfile.TarError as e:
        raise EntryRefused(f"unreadable archive ({e})") from None


def _write_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root_fd: int) -> None:
    """Write the checked ``members`` below the directory ``root_fd``, by descriptor."""
    dirs: dict[tuple[str, ...], int] = {(): root_fd}
    try:
        for m in members:
            parts = tuple(m.name.split("/"))
            if m.isdir():
                _dest_dir(dirs, parts)
                continue
            parent = _dest_dir(dirs, parts[:-1])
            data = tar.extractfile(m)
            with fs.create_file(parent, parts[-1], data, m.mode & 0o755):
                pass
    finally:
        for rel, fd in dirs.items():
            if rel:
                os.close(fd)


def _dest_dir(fds: dict[tuple[str, ...], int], rel: tuple[str, ...]) -> int:
    """The descriptor of directory ``rel`` (walked, cached in ``fds``), created 0700."""
    for i in range(1, len(rel) + 1):
        if rel[:i] not in fds:
            # Counted with the store's operations, as it always was.
            tick("writes")
            tick("opens")
            fds[rel[:i]] = fs.open_dir(fds[rel[: i - 1]], rel[i - 1], 0o700)
    return fds[rel]
