"""Reading an entry from a directory others write to: reached without links, each file
opened once, hashed from that descriptor against the manifest.

Every byte under the cache root may have been written by someone else, so:

* files are opened once, with ``O_NOFOLLOW | O_NONBLOCK``, must be regular files of
  bounded size, and are hashed from that descriptor (``cache/archive.py`` unpacks a
  private copy of exactly the bytes it hashed: no check-then-reopen race);
* the entry is reached from the root's descriptor, one directory at a time with
  ``O_NOFOLLOW`` (``fs.walk``), so a directory swapped for a link redirects nothing;
* without a secret only who wrote an entry vouches for it: every directory below the
  root and every file read must be this user's (or root's) and writable by nobody
  else, else the entry is a miss (``EntryUntrusted``);
* every malformed input ends as ``EntryRefused`` (proven bad) or ``EntryUnavailable``
  (this rank's problem), never as another exception in the training job.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dynamo_dist.cache import fs
from dynamo_dist.cache.entries import (
    MANIFEST,
    MAX_ARTIFACT_BYTES,
    MAX_MANIFEST_BYTES,
    DirIdent,
    EntryMissing,
    EntryRefused,
    EntryUnavailable,
    EntryUntrusted,
    check_manifest,
    dir_ident,
    file_meta,
    unavailable,
)
from dynamo_dist.cache.fs_ops import tick

__all__ = [
    "entry_moved",
    "hash_fd",
    "open_entry",
    "open_regular",
    "read_bounded",
    "verify_entry",
]


def _private_owner(uid: int) -> bool:
    """Whether files owned by ``uid`` can only have been written by us (or root)."""
    return uid in (os.geteuid(), 0)


def _check_private(st: os.stat_result, what: str) -> None:
    """EntryUntrusted unless ``st`` is ours (or root's) and writable by nobody else.

    Applied to the descriptor that is then used (fstat), so a name swapped after
    the check changes nothing.
    """
    if not _private_owner(st.st_uid):
        raise EntryUntrusted(
            f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or "
            "root, and without a secret nothing else vouches for it"
        )
    if st.st_mode & 0o022:
        raise EntryUntrusted(
            f"{what} is group- or other-writable (mode {stat.S_IMODE(st.st_mode):04o}), "
            "and without a secret nothing else vouches for it"
        )


def open_regular(
    path: Path | str,
    max_size: int,
    what: str,
    dir_fd: int | None = None,
    private: bool = False,
) -> tuple[int, int]:
    """(fd, size) of a regular file at ``path`` (relative to ``dir_fd``).

    Links, FIFOs, sockets and devices (``artifact.tar -> /dev/zero``) are refused
    (EntryRefused) before a byte is read, and so are files larger than ``max_size``;
    a missing file is an ``EntryMissing`` (an EntryRefused the caller may downgrade).
    With ``private``, the file must also be ours and writable by nobody else
    (EntryUntrusted), checked on the descriptor that is then read. A regular file
    that cannot be opened or examined for a reason of ours (EACCES, EMFILE, EIO, no
    memory) is EntryUnavailable: nothing proves it bad.
    """
    tick("opens")
    tick("stats")
    try:
        fd, st = fs.open_file(dir_fd, path)
    except FileNotFoundError:
        raise EntryMissing(f"{what} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EntryRefused(f"{what} is a symlink") from None
        if e.errno == errno.EINVAL:
            raise EntryRefused(f"{what} is not a regular file") from None
        # ENXIO (a socket), ENODEV (a device without a driver), EACCES, EMFILE...:
        # what is there decides whether the entry or this rank is to blame.
        try:
            st = fs.lstat(dir_fd, path)
        except FileNotFoundError:
            raise EntryMissing(f"{what} is missing") from None
        except OSError:
            raise unavailable(what, e) from None
        if not stat.S_ISREG(st.st_mode):
            raise EntryRefused(f"{what} is not a regular file") from None
        raise unavailable(what, e) from None
    try:
        if private:
            _check_private(st, what)
        if st.st_size > max_size:
            raise EntryRefused(f"{what} is too large ({st.st_size} > {max_size} bytes)")
    except OSError as e:
        os.close(fd)
        raise unavailable(what, e) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bounded(
    path: Path | str,
    max_size: int,
    what: str,
    dir_fd: int | None = None,
    private: bool = False,
) -> bytes:
    """The whole (bounded, regular) file at ``path``, read from one descriptor.

    EntryRefused for what the file is (see ``open_regular``) or a size over
    ``max_size``; EntryUnavailable when it cannot be read for a reason of ours (EIO,
    no memory).
    """
    fd, _ = open_regular(path, max_size, what, dir_fd, private)
    tick("reads")
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_size + 1)
    except OSError as e:
        raise unavailable(what, e) from None
    except MemoryError:
        raise EntryUnavailable(f"{what}: out of memory while reading it") from None
    if len(data) > max_size:
        raise EntryRefused(f"{what} is too large (more than {max_size} bytes)")
    return data


def entry_parts(root: Path | None, path: Path) -> tuple[Path, list[str]]:
    """(directory to start from, names to walk below it) to reach entry ``path``.

    Under ``root``: the root and every name below it, so no link on the way is
    followed. Elsewhere (an entry given by path alone): its parent as given.
    """
    if root is not None:
        with contextlib.suppress(ValueError):
            parts = list(path.relative_to(root).parts)
            if parts and ".." not in parts:
                return root, parts
    return path.parent, [path.name]


@contextlib.contextmanager
def open_entry(root: Path | None, path: Path, private: bool) -> Iterator[int]:
    """A descriptor of the entry directory ``path``, reached without following links.

    EntryRefused if a link or a non-directory is on the way (proven bad);
    EntryUnavailable if the entry is not there (moved or pruned meanwhile: nothing to
    refuse) or cannot be opened for a reason of ours (EACCES, EMFILE). With
    ``private``, EntryUntrusted unless every directory below the root is ours and
    writable by nobody else.
    """
    start, parts = entry_parts(root, path)
    check = _check_private if private else None
    with contextlib.ExitStack() as stack:
        try:
            fds = stack.enter_context(fs.walk(start, parts, check=check, counted=True))
        except FileNotFoundError:
            raise EntryUnavailable("entry directory is gone (pruned or moved meanwhile?)") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise EntryRefused(
                    f"a directory on the way to the entry is a symlink ({e})"
                ) from None
            raise unavailable("entry directory", e) from None
        yield fds[-1]


def entry_moved(root: Path | None, path: Path, entry_fd: int) -> bool:
    """Whether the directory open as ``entry_fd`` is no longer the entry at ``path``.

    A concurrent prune (removed: no links left) or refusal (renamed away) explains a
    file that vanished while the entry was read; only an entry still in place with a
    file missing is proven incomplete.
    """
    tick("stats", 2)
    try:
        ours = fs.fstat(entry_fd)
        if ours.st_nlink == 0:
            return True
        start, parts = entry_parts(root, path)
        with fs.walk(start, parts[:-1], counted=True) as fds:
            there = fs.lstat(fds[-1], parts[-1])
    except OSError:
        return True
    return (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino)


def hash_fd(fd: int, size: int, copy: IO[bytes] | None = None) -> str:
    """sha256 of exactly ``size`` bytes read from ``fd`` (copied to ``copy`` as read).

    Reads at most ``size + 1`` bytes, so a file that grows while it is read is
    refused rather than read forever; one that shrinks is refused as truncated.
    """
    h = hashlib.sha256()
    left = size
    while left > 0:
        tick("reads")
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            raise EntryRefused(f"file shrank while being read ({size - left} of {size} bytes)")
        h.update(block)
        if copy is not None:
            copy.write(block)
        left -= len(block)
    tick("reads")
    if os.read(fd, 1):
        raise EntryRefused("file grew while being read")
    return h.hexdigest()


def verify_entry(
    root: Path | None,
    path: Path,
    key: str | None,
    expect: dict[str, Any] | None,
    secret: str | None,
    ident: list[DirIdent] | None = None,
) -> dict[str, Any]:
    """The manifest of the entry at ``path`` (under ``root``) if it is intact.

    Total: whatever is on disk, the answer is a manifest, EntryRefused (proven bad:
    malformed, skewed, unsigned, corrupt, a link or device where a file must be) or
    EntryUnavailable (not readable here and now: permissions, descriptors, memory, I/O
    errors, an entry moved or pruned while being read). Without a ``secret``,
    EntryUntrusted (an EntryRefused) when anyone but this user (or root) could have
    written a directory or file of the entry. The verified directory's identity
    (DirIdent) is appended to ``ident``: a refusal moves only that one, not one
    published in its place meanwhile.
    """
    try:
        return _verify(root, path, key, expect, secret, ident)
    except (EntryRefused, EntryUnavailable):
        raise
    except (OSError, MemoryError) as e:  # ours, not the entry's
        raise EntryUnavailable(f"entry cannot be read here ({type(e).__name__}: {e})") from None
    except Exception as e:  # a hostile entry must never crash the training job
        raise EntryRefused(f"malformed entry ({type(e).__name__}: {e})") from None


def _verify(
    root: Path | None,
    path: Path,
    key: str | None,
    expect: dict[str, Any] | None,
    secret: str | None,
    ident: list[DirIdent] | None,
) -> dict[str, Any]:
    private = secret is None
    with open_entry(root, path, private) as entry_fd:
        if ident is not None:
            tick("stats")
            ident.append(dir_ident(fs.fstat(entry_fd)))
        try:
            raw = read_bounded(MANIFEST, MAX_MANIFEST_BYTES, MANIFEST, entry_fd, private)
            manifest = check_manifest(raw, key, expect, secret)
            for name in sorted(manifest["files"]):
                _verify_file(entry_fd, manifest, name, private)
            return manifest
        except EntryMissing as e:
            if entry_moved(root, path, entry_fd):
                raise EntryUnavailable(
                    f"{e}: the entry was moved or pruned while being read"
                ) from None
            raise


def _verify_file(entry_fd: int, manifest: dict[str, Any], name: str, private: bool) -> None:
    """EntryRefused unless file ``name`` of the entry has the size and sha256 listed."""
    size, digest = file_meta(manifest, name)
    fd, actual = open_regular(name, min(size, MAX_ARTIFACT_BYTES), name, entry_fd, private)
    try:
        if actual != size:
            raise EntryRefused(f"{name} is truncated ({actual} of {size} bytes)")
        try:
            got = hash_fd(fd, size)
        except OSError as e:
            raise unavailable(name, e) from None
        if not hmac.compare_digest(got, digest):
            raise EntryRefused(f"{name} does not match its sha256 (corrupt or tampered)")
    finally:
        os.close(fd)
