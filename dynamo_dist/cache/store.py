"""The shared cache directory: verified entries, atomic publishing, leader locks.

Layout under the root (one directory per entry, named by its key)::

    <root>/entries/<ns>/<kk>/<key>/manifest.json  # versions, key factors, sha256 per file, HMAC
    <root>/entries/<ns>/<kk>/<key>/artifact.tar   # inductor's own cache files for one graph
    <root>/locks/<ns>/<key>.<gen>.lock            # who is compiling it now (._cache_lock)
    <root>/refused/<ns>/<key>.<ms>.<hex>/{entry,REFUSED}  # entries proven bad, and why (newest 64)

``<ns>`` is ``k2-<key id>`` for entries signed with a secret (the key id is derived
from the secret by scrypt, see ``_secret.key_id``), ``unsigned`` without one: jobs with different
secrets share nothing, so neither refuses (and evicts) the other's valid entries.

    <root>/DYNAMO_DIST_CACHE                  # marker: this directory is a cache (format)

An entry is built in a temporary directory beside its final place and renamed
into place, so readers see a whole entry or none. Nothing is unpickled before
the manifest's checksums (and, with ``DYNAMO_DIST_CACHE_SECRET``, its HMAC)
have been verified.

Every byte under the root may have been written by someone else, so:

* files are opened once, with ``O_NOFOLLOW | O_NONBLOCK``, must be regular files
  of bounded size, and are hashed from that descriptor; ``extract`` unpacks a
  private copy of exactly the bytes it hashed (no check-then-reopen race);
* files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` in fresh directories
  with unpredictable names, so nothing is ever written through a planted link;
* the root is opened once (a link there is the user's choice and is followed);
  every directory below it is walked from its parent's descriptor with
  ``O_NOFOLLOW``, and every create, rename, unlink and utime is relative to such a
  descriptor, so a directory swapped for a link at any moment redirects nothing;
* without a secret only who wrote an entry vouches for it: every directory below
  the root and every file read must be this user's (or root's) and writable by
  nobody else, else the entry is a miss (``EntryUntrusted``), and the unsigned
  namespace is created without group/other write whatever the umask;
* ``merge_into`` installs into the local inductor cache without following links,
  and only into directories of this user;
* archives are plain tar (never decompressed), hold only regular files and
  directories with safe relative names, and lose setuid/setgid/sticky bits;
* every malformed input ends as ``EntryRefused`` (or a miss), never as another
  exception in the training job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import hmac
import json
import math
import os
import re
import reprlib
import secrets
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dynamo_dist._log import get_logger
from dynamo_dist.cache import fs
from dynamo_dist.cache.rooms import Member, tar_members
from dynamo_dist.cache.secret import NAMESPACE_PREFIX, key_id, signing_key

log = get_logger("cache")

FORMAT = 1
ARTIFACT = "artifact.tar"
MANIFEST = "manifest.json"
MARKER = "DYNAMO_DIST_CACHE"

# Bounds on what a reader accepts from the shared directory. Generous for real
# inductor caches, small enough that a hostile entry cannot exhaust memory or disk.
MAX_MANIFEST_BYTES = 1 << 20
MAX_ARTIFACT_BYTES = 16 << 30
MAX_MEMBERS = 100_000

# O_NONBLOCK: opening a planted FIFO must not block; regular files ignore it.
# A name the manifest may list: one plain component, nothing that leaves the entry.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class EntryRefused(Exception):
    """An entry failed verification; ``reason`` says why."""


class EntryUntrusted(EntryRefused):
    """An unsigned entry that someone other than this user (or root) could have written.

    Without a secret, only who wrote an entry vouches for it. Such an entry is not
    proven bad, and moving it aside may need rights we lack, so it is a miss: it
    is left where it is (``DiskStore.get`` returns None).
    """


class EntryUnavailable(Exception):
    """An entry that could not be read for a reason of this rank's, not the entry's.

    Permissions, exhausted descriptors or memory, an I/O error, an entry that vanished
    while being read (a concurrent prune or refusal), a full local disk while unpacking:
    nothing proves the entry bad, so it is a miss for this rank and stays where it is
    for the others. Only what is proven bad is an ``EntryRefused`` and moved aside.
    """


@dataclass
class FsOps:
    """File-system operations one process made on one store's directory, by kind.

    On a shared (network) file system every one of them is a round trip to the server
    that all ranks share, so at scale their number per entry, not bytes, is what the
    cache must keep small (see ``benchmarks/cache_fanout.py``). Counted where the store
    makes the call (cheap: an attribute increment), while ``counting`` names this
    store's counter on the calling thread.
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


def _tick(kind: str, n: int = 1) -> None:
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


#: Which directory was verified: (st_dev, st_ino, st_ctime_ns). The inode alone is not
#: enough: a pruned entry's inode is soon reused by the next one published.
DirIdent = tuple[int, int, int]


def _dir_ident(st: os.stat_result) -> DirIdent:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]
    # The cache root the entry was found under: ``extract`` walks from it without
    # following links. None: only the entry directory itself must not be a link.
    root: Path | None = field(default=None, repr=False)
    # Whether every directory and file must be this user's and writable by nobody else
    # (entries without a secret). None: so when the manifest carries no signature.
    private: bool | None = field(default=None, repr=False)
    # The identity (DirIdent) of the directory that was verified: a refusal moves only
    # that one, never an entry republished since (or changed: then it is checked anew).
    ident: DirIdent | None = field(default=None, repr=False)
    # The counter of the store it was read from: ``extract`` reads it again.
    ops: FsOps | None = field(default=None, repr=False)

    @property
    def must_be_private(self) -> bool:
        if self.private is not None:
            return self.private
        return "signature" not in self.manifest

    @property
    def artifact(self) -> Path:
        return self.path / ARTIFACT


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(manifest: dict[str, Any], secret: str) -> str:
    """The manifest's HMAC under the key scrypt derives from ``secret`` (never the secret
    itself: a signature under it would be a fast offline oracle for a guess)."""
    return hmac.new(signing_key(secret), _canonical(manifest), hashlib.sha256).hexdigest()


def namespace(secret: str | None) -> str:
    """The directory, under entries/, locks/ and refused/, of the entries ``secret`` signs.

    ``k2-``: the key id of the scrypt derivation. Namespaces of the old, cheap one
    (``k-<id>``) are never read again, and ``dynamo-dist cache prune`` removes them.
    """
    return "unsigned" if secret is None else f"{NAMESPACE_PREFIX}{key_id(secret)}"


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    for line in (fs.read_system_text("/proc/self/status") or "").splitlines():
        if line.startswith("Umask:"):
            with contextlib.suppress(ValueError, IndexError):
                return int(line.split()[1], 8)
    return 0o022


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


def _open_root(root: Path, create: bool = False, mode: int = 0o777) -> int:
    """A descriptor of the cache root.

    The root is the user's choice, so a link there is followed, once; everything
    below it is reached from this descriptor and never through a link.
    """
    _tick("opens")
    return fs.open_root(root, create, mode)


def _open_dir_at(parent_fd: int, name: str, create_mode: int | None = None) -> int:
    """Open directory ``name`` of ``parent_fd`` without following a link.

    With ``create_mode``, a missing directory is created with that mode (the umask
    can only remove bits from it). A planted link (``locks -> /home/victim``) fails
    with ELOOP or ENOTDIR instead of leading elsewhere.
    """
    if create_mode is not None:
        _tick("writes")
    _tick("opens")
    return fs.open_dir(parent_fd, name, create_mode)


@contextlib.contextmanager
def _dir_fds(
    root: Path,
    parts: Sequence[str],
    create_mode: int | None = None,
    check: bool = False,
) -> Iterator[list[int]]:
    """Descriptors of ``root`` and of each of ``parts`` below it, walked without links.

    With ``check``, every directory below the root must be ours and writable by
    nobody else (EntryUntrusted), checked with fstat on the descriptor walked.
    All descriptors are closed on exit.
    """
    fds = [_open_root(root, create=create_mode is not None, mode=create_mode or 0o777)]
    try:
        for i, part in enumerate(parts):
            fds.append(_open_dir_at(fds[-1], part, create_mode))
            if check:
                _tick("stats")
                _check_private(fs.fstat(fds[-1]), "/".join(parts[: i + 1]))
        yield fds
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _create_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write a new file in ``dir_fd``; never through a link, never over an existing file."""
    _tick("writes", 2)
    fs.write_new(dir_fd, name, data, mode)


class _Missing(EntryRefused):
    """A file of the entry is not there: proven bad, unless the entry itself vanished.

    An entry is published whole (renamed into place), so a missing file means it was
    damaged, or that a concurrent prune or refusal moved or deleted the entry while we
    read it. The reader, which knows where the entry should be, tells the two apart.
    """


# Errors of opening or reading that say something about this rank (rights, limits,
# hardware, a concurrent removal), not about the bytes of the entry.
def _unavailable(what: str, e: OSError) -> EntryUnavailable:
    return EntryUnavailable(f"{what} cannot be read here ({e.strerror or e})")


def _open_regular(
    path: Path | str,
    max_size: int,
    what: str,
    dir_fd: int | None = None,
    private: bool = False,
) -> tuple[int, int]:
    """(fd, size) of a regular file at ``path`` (relative to ``dir_fd``).

    Links, FIFOs, sockets and devices (``artifact.tar -> /dev/zero``) are refused
    (EntryRefused) before a byte is read, and so are files larger than ``max_size``;
    a missing file is a ``_Missing`` (an EntryRefused the caller may downgrade). With
    ``private``, the file must also be ours and writable by nobody else
    (EntryUntrusted), checked on the descriptor that is then read. A regular file
    that cannot be opened or examined for a reason of ours (EACCES, EMFILE, EIO, no
    memory) is EntryUnavailable: nothing proves it bad.
    """
    _tick("opens")
    _tick("stats")
    try:
        fd, st = fs.open_file(dir_fd, path)
    except FileNotFoundError:
        raise _Missing(f"{what} is missing") from None
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
            raise _Missing(f"{what} is missing") from None
        except OSError:
            raise _unavailable(what, e) from None
        if not stat.S_ISREG(st.st_mode):
            raise EntryRefused(f"{what} is not a regular file") from None
        raise _unavailable(what, e) from None
    try:
        if private:
            _check_private(st, what)
        if st.st_size > max_size:
            raise EntryRefused(f"{what} is too large ({st.st_size} > {max_size} bytes)")
    except OSError as e:
        os.close(fd)
        raise _unavailable(what, e) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_file(
    path: Path | str,
    max_size: int,
    what: str,
    dir_fd: int | None = None,
    private: bool = False,
) -> bytes:
    """The whole (bounded, regular) file at ``path``, read from one descriptor.

    EntryRefused for what the file is (see ``_open_regular``) or a size over
    ``max_size``; EntryUnavailable when it cannot be read for a reason of ours (EIO,
    no memory).
    """
    fd, _ = _open_regular(path, max_size, what, dir_fd, private)
    _tick("reads")
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_size + 1)
    except OSError as e:
        raise _unavailable(what, e) from None
    except MemoryError:
        raise EntryUnavailable(f"{what}: out of memory while reading it") from None
    if len(data) > max_size:
        raise EntryRefused(f"{what} is too large (more than {max_size} bytes)")
    return data


def _entry_parts(root: Path | None, path: Path) -> tuple[Path, list[str]]:
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
def _open_entry(root: Path | None, path: Path, private: bool) -> Iterator[int]:
    """A descriptor of the entry directory ``path``, reached without following links.

    EntryRefused if a link or a non-directory is on the way (proven bad);
    EntryUnavailable if the entry is not there (moved or pruned meanwhile: nothing to
    refuse) or cannot be opened for a reason of ours (EACCES, EMFILE). With
    ``private``, EntryUntrusted unless every directory below the root is ours and
    writable by nobody else.
    """
    start, parts = _entry_parts(root, path)
    with contextlib.ExitStack() as stack:
        try:
            fds = stack.enter_context(_dir_fds(start, parts, check=private))
        except FileNotFoundError:
            raise EntryUnavailable("entry directory is gone (pruned or moved meanwhile?)") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise EntryRefused(
                    f"a directory on the way to the entry is a symlink ({e})"
                ) from None
            raise _unavailable("entry directory", e) from None
        yield fds[-1]


def _entry_moved(root: Path | None, path: Path, entry_fd: int) -> bool:
    """Whether the directory open as ``entry_fd`` is no longer the entry at ``path``.

    A concurrent prune (removed: no links left) or refusal (renamed away) explains a
    file that vanished while the entry was read; only an entry still in place with a
    file missing is proven incomplete.
    """
    _tick("stats", 2)
    try:
        ours = fs.fstat(entry_fd)
        if ours.st_nlink == 0:
            return True
        start, parts = _entry_parts(root, path)
        with _dir_fds(start, parts[:-1]) as fds:
            there = fs.lstat(fds[-1], parts[-1])
    except OSError:
        return True
    return (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino)


def _hash_fd(fd: int, size: int, copy: IO[bytes] | None = None) -> str:
    """sha256 of exactly ``size`` bytes read from ``fd`` (copied to ``copy`` as read).

    Reads at most ``size + 1`` bytes, so a file that grows while it is read is
    refused rather than read forever; one that shrinks is refused as truncated.
    """
    h = hashlib.sha256()
    left = size
    while left > 0:
        _tick("reads")
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            raise EntryRefused(f"file shrank while being read ({size - left} of {size} bytes)")
        h.update(block)
        if copy is not None:
            copy.write(block)
        left -= len(block)
    _tick("reads")
    if os.read(fd, 1):
        raise EntryRefused("file grew while being read")
    return h.hexdigest()


def _file_meta(manifest: dict[str, Any], name: str) -> tuple[int, str]:
    """The declared (size, sha256) of ``name``; EntryRefused if absent or malformed."""
    if not isinstance(manifest, dict):
        raise EntryRefused("manifest is not a JSON object")
    files = manifest.get("files")
    meta = files.get(name) if isinstance(files, dict) else None
    if not isinstance(meta, dict):
        raise EntryRefused(f"manifest does not list {name}")
    size, digest = meta.get("size"), meta.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise EntryRefused(f"manifest has no valid size for {name}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise EntryRefused(f"manifest has no valid sha256 for {name}")
    return size, digest


# Values from the manifest quoted in a reason: a short, bounded repr (a 1 MiB string or a
# list nested thousands deep must neither flood the log nor raise RecursionError).
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _finite(value: Any) -> bool:
    """Whether ``value`` is a JSON number that float() takes and that is finite.

    json.loads gives inf for 1e400, and float() of a 400-digit int overflows.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_fields(manifest: dict[str, Any]) -> None:
    """EntryRefused unless every field the rest of the code reads has the right type.

    The loader reads ``compile_seconds`` and ``owner["rank"]`` (float(), .get()), the
    CLI ``created``, ``label`` and ``factors``: a wrong type there would raise in the
    training job or the CLI long after verification, so it is refused here. Absent
    optional fields are fine (their readers have defaults).
    """
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt != FORMAT:
        raise EntryRefused(f"unknown entry format {_short(fmt)}")
    if not isinstance(manifest.get("key"), str):
        raise EntryRefused("manifest has no key")
    if not isinstance(manifest.get("factors", {}), dict):
        raise EntryRefused("manifest factors are not an object")
    owner = manifest.get("owner", {})
    if not isinstance(owner, dict):
        raise EntryRefused("manifest owner is not an object")
    rank = owner.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise EntryRefused(f"manifest owner rank is not an integer ({_short(rank)})")
    seconds = manifest.get("compile_seconds", 0)
    if not _finite(seconds) or seconds < 0:
        raise EntryRefused(f"manifest compile_seconds is not a number >= 0 ({_short(seconds)})")
    if "created" in manifest and not _finite(manifest["created"]):
        created = _short(manifest["created"])
        raise EntryRefused(f"manifest created is not a finite number ({created})")
    if not isinstance(manifest.get("label", ""), str):
        raise EntryRefused("manifest label is not text")
    try:
        # Text the CLI prints or the log writes must be encodable: no lone surrogates.
        json.dumps(manifest, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise EntryRefused("manifest holds text that is not valid Unicode") from None
    except (ValueError, RecursionError) as e:  # nesting too deep to re-encode
        raise EntryRefused(f"manifest cannot be re-encoded ({type(e).__name__})") from None


# Boxes a reader's refusal creates: <key>.<milliseconds>.<16 hex digits>.
_REFUSED_BOX = re.compile(r"(.{1,64})\.([0-9]{1,20})\.[0-9a-f]{16}")
REFUSED_KEEP = 64


def _trim_refused(refused_fd: int, keep: int) -> None:
    """Delete the oldest refused boxes beyond ``keep`` (only ours, only plain directories).

    Runs after each refusal, so ``refused/<ns>/`` cannot grow without bound (a broken
    or hostile writer refused again and again). Boxes are ordered by the time in
    their names; links and other accounts' boxes are counted but never deleted, and
    ``rmtree(dir_fd=...)`` never follows a link below. Best effort: errors are ignored.
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
            fs.remove_tree(refused_fd, name)


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
        self._trim_lock = threading.Lock()
        self._trim_running = False
        self._trim_again = False
        self._trim_done = threading.Event()
        self._trim_done.set()
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
        with counting(self.ops), _dir_fds(self.root, parts, mode) as fds:
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
            # A planted link here would move every namespace elsewhere: _open_dir_at refuses it.
            fd = _open_dir_at(root_fd, "entries")
            try:
                os.close(_open_dir_at(fd, self.namespace, self._mkdir_mode()))
            finally:
                os.close(fd)
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
        could have written a directory or file of the entry.
        """
        with counting(self.ops):
            return self._verify_total(path, key, expect, None)

    def _verify_total(
        self,
        path: Path,
        key: str | None,
        expect: dict[str, Any] | None,
        ident: list[DirIdent] | None,
    ) -> dict[str, Any]:
        """``verify``, appending the verified directory's identity (DirIdent) to ``ident``.

        ``get`` refuses only the directory it verified, not one published in its place
        meanwhile.
        """
        try:
            return self._verify(path, key, expect, ident)
        except (EntryRefused, EntryUnavailable):
            raise
        except (OSError, MemoryError) as e:  # ours, not the entry's
            raise EntryUnavailable(f"entry cannot be read here ({type(e).__name__}: {e})") from None
        except Exception as e:  # a hostile entry must never crash the training job
            raise EntryRefused(f"malformed entry ({type(e).__name__}: {e})") from None

    def _verify(
        self,
        path: Path,
        key: str | None,
        expect: dict[str, Any] | None,
        ident: list[DirIdent] | None = None,
    ) -> dict[str, Any]:
        private = self.secret is None
        with _open_entry(self.root, path, private) as entry_fd:
            if ident is not None:
                _tick("stats")
                st = fs.fstat(entry_fd)
                ident.append(_dir_ident(st))
            try:
                return self._verify_at(entry_fd, key, expect, private)
            except _Missing as e:
                if _entry_moved(self.root, path, entry_fd):
                    raise EntryUnavailable(
                        f"{e}: the entry was moved or pruned while being read"
                    ) from None
                raise

    def _verify_at(
        self, entry_fd: int, key: str | None, expect: dict[str, Any] | None, private: bool
    ) -> dict[str, Any]:
        raw = _read_file(MANIFEST, MAX_MANIFEST_BYTES, MANIFEST, entry_fd, private)
        try:
            manifest = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise EntryRefused(f"unreadable manifest ({type(e).__name__}: {e})") from None
        if not isinstance(manifest, dict):
            raise EntryRefused("manifest is not a JSON object")
        _check_fields(manifest)
        if key is not None and manifest["key"] != key:
            raise EntryRefused(f"manifest is for key {_short(manifest['key'])}, not {key!r}")
        factors = manifest.get("factors", {})
        if expect:
            skew = {k: (factors.get(k), v) for k, v in expect.items() if factors.get(k) != v}
            if skew:
                what = ", ".join(
                    f"{k} {_short(a)} != {_short(b)}" for k, (a, b) in sorted(skew.items())
                )
                raise EntryRefused(f"version skew: {what}")
        if self.secret is not None:
            sig = manifest.get("signature")
            # compare_digest raises TypeError on non-ASCII text: check the shape first.
            if not (
                isinstance(sig, str)
                and _SHA256.fullmatch(sig)
                and hmac.compare_digest(sig, sign(manifest, self.secret))
            ):
                raise EntryRefused("missing or wrong HMAC signature (DYNAMO_DIST_CACHE_SECRET)")
        files = manifest.get("files")
        if not isinstance(files, dict) or ARTIFACT not in files:
            raise EntryRefused(f"manifest does not list {ARTIFACT}")
        for name in files:
            # Only plain names inside the entry: "../../etc/shadow" would leak sizes.
            if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name == MANIFEST:
                raise EntryRefused(f"manifest names a file outside the entry: {_short(name)}")
        for name in sorted(files):
            size, digest = _file_meta(manifest, name)
            fd, actual = _open_regular(name, min(size, MAX_ARTIFACT_BYTES), name, entry_fd, private)
            try:
                if actual != size:
                    raise EntryRefused(f"{name} is truncated ({actual} of {size} bytes)")
                try:
                    got = _hash_fd(fd, size)
                except OSError as e:
                    raise _unavailable(name, e) from None
                if not hmac.compare_digest(got, digest):
                    raise EntryRefused(f"{name} does not match its sha256 (corrupt or tampered)")
            finally:
                os.close(fd)
        return manifest

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
        _tick("stats")
        try:  # a hint only: verify walks without links
            fs.lstat(None, path / MANIFEST)
        except OSError:
            return None
        ident: list[DirIdent] = []
        try:
            manifest = self._verify_total(path, key, expect, ident)
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
        _tick("writes", 4)
        start, parts = _entry_parts(self.root, path)
        with contextlib.suppress(OSError), contextlib.ExitStack() as stack:
            (*_, parent_fd) = stack.enter_context(_dir_fds(start, parts[:-1]))
            if ident is not None:
                st = fs.lstat(parent_fd, parts[-1])
                if _dir_ident(st) != ident:
                    return False  # not the entry we verified: moved or replaced meanwhile
            (*_, refused_fd) = stack.enter_context(
                self.walk("refused", self.namespace, create=True)
            )
            # 0700 while it is filled, so nothing can be planted in it.
            box = fs.make_temp_dir(refused_fd, f"{parts[-1][:64]}.{int(time.time() * 1000)}.")
            box_fd = _open_dir_at(refused_fd, box)
            stack.callback(os.close, box_fd)
            try:
                fs.rename(parent_fd, parts[-1], box_fd, "entry")
            except OSError:
                fs.remove(refused_fd, box, directory=True)  # someone else moved it first
                return False
            _create_at(box_fd, "REFUSED", (reason + "\n").encode())
            fs.chmod(box_fd, self._open_mode())
            self._trim_refused_later()
            return True
        return False

    def _trim_refused_later(self) -> None:
        """Trim ``refused/<ns>/`` in a background thread (one per store at a time).

        Deleting a box costs as much as its files (a hostile entry can hold many), so
        it never runs on the compile's path. A refusal during a trim makes it go round
        once more, so the bound holds once the thread is done (``trimmed()``).
        """
        with self._trim_lock:
            if self._trim_running:
                self._trim_again = True
                return
            self._trim_running = True

        def trim() -> None:
            while True:
                with contextlib.suppress(OSError), self.walk("refused", self.namespace) as fds:
                    _trim_refused(fds[-1], REFUSED_KEEP)
                with self._trim_lock:
                    if not self._trim_again:
                        self._trim_running = False
                        self._trim_done.set()
                        return
                    self._trim_again = False

        self._trim_done.clear()
        threading.Thread(target=trim, daemon=True, name="dynamo_dist-cache-trim").start()

    def trimmed(self, timeout: float) -> bool:
        """Wait until no trim of ``refused/`` is under way (for tests and tools)."""
        return self._trim_done.wait(timeout)

    # -- writing ---------------------------------------------------------------
    def put(self, key: str, members: Iterable[Member], manifest: dict[str, Any]) -> int:
        """Publish ``members`` (open files, see ``_cache_rooms``) as entry ``key``; bytes written.

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
        host-local copy of a shared entry (see ``_cache_protocol``).
        """
        with counting(self.ops):
            self._make_entries()
        with self.walk("entries", self.namespace, key[:2], create=True) as fds:
            return self._put_at(fds[-1], key, lambda tmp_fd: _fill_copy(tmp_fd, manifest, artifact))

    def _put_at(self, shard_fd: int, key: str, fill: Callable[[int], int]) -> int:
        # A name nobody can predict, 0700 while filled: nobody can plant links in it.
        tmp = fs.make_temp_dir(shard_fd, f".tmp.{key}.")
        try:
            tmp_fd = _open_dir_at(shard_fd, tmp)
            try:
                _tick("writes", 4)
                size = fill(tmp_fd)
                fs.chmod(tmp_fd, self._open_mode())
            finally:
                os.close(tmp_fd)
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
            fs.remove_tree(shard_fd, tmp)

    def _fill(
        self, tmp_fd: int, key: str, members: Iterable[Member], manifest: dict[str, Any]
    ) -> int:
        """Write artifact.tar and manifest.json into the private directory ``tmp_fd``."""
        with fs.create_file(tmp_fd, ARTIFACT, writable=True) as out:
            with tarfile.open(fileobj=out, mode="w:") as tar:
                tar_members(tar, iter(members))
            out.flush()
            fs.fsync(out.fileno())
            size = out.seek(0, os.SEEK_END)
            out.seek(0)
            digest = _hash_fd(out.fileno(), size)
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
                fs.remove_tree(shard_fd, name)


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
        marker = json.loads(_read_file(root / MARKER, 4096, MARKER))
    except (OSError, ValueError, EntryRefused, EntryUnavailable):  # any failure: no marker
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("format"), int) else None


def _safe_member(m: tarfile.TarInfo) -> str | None:
    """Why member ``m`` may not be unpacked, or None if it is a plain file or directory."""
    if not (m.isreg() or m.isdir()) or m.issparse():
        return "is not a regular file or directory"
    # Relative, normalised, one component at a time: no "/abs", "..", "a//b", "./a".
    if "\0" in m.name or "\\" in m.name or any(p in ("", ".", "..") for p in m.name.split("/")):
        return "has an unsafe name"
    return None


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
    size, digest = _file_meta(entry.manifest, ARTIFACT)
    private = entry.must_be_private
    with _open_entry(entry.root, entry.path, private) as entry_fd:
        try:
            fd, actual = _open_regular(
                ARTIFACT, min(size, MAX_ARTIFACT_BYTES), ARTIFACT, entry_fd, private
            )
        except _Missing as e:
            if _entry_moved(entry.root, entry.path, entry_fd):
                raise EntryUnavailable(f"{e}: the entry was moved or pruned meanwhile") from None
            raise
    try:
        if actual != size:
            raise EntryRefused(f"{ARTIFACT} is truncated ({actual} of {size} bytes)")
        # Read errors of the shared file and write errors of the private copy (a full
        # local disk) are OSErrors: extract() makes them EntryUnavailable.
        with fs.anonymous_file(dest.parent) as copy:
            got = _hash_fd(fd, size, copy)
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


# Bounds on member names, checked before anything is written, so that a name the
# local filesystem cannot hold proves the archive bad rather than looking like a local
# failure (ENAMETOOLONG) later. Inductor's names are far shorter.
_MAX_NAME_COMPONENT = 255
_MAX_NAME = 1024


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
                    dirs: dict[tuple[str, ...], int] = {(): root_fd}
                    try:
                        for m in members:
                            parts = tuple(m.name.split("/"))
                            if m.isdir():
                                _dest_dir(dirs, parts, dest, private=False)
                                continue
                            parent = _dest_dir(dirs, parts[:-1], dest, private=False)
                            data = tar.extractfile(m)
                            with fs.create_file(parent, parts[-1], data, m.mode & 0o755):
                                pass
                    finally:
                        for rel, fd in dirs.items():
                            if rel:
                                os.close(fd)
            except OSError as e:
                raise EntryUnavailable(
                    f"cannot unpack into {dest} ({e.strerror or e}); free space or fix "
                    "the local cache directory"
                ) from None
    except tarfile.TarError as e:
        raise EntryRefused(f"unreadable archive ({e})") from None


def _local_dir_at(parent_fd: int, name: str, where: Path) -> int:
    """Directory ``name`` of the local cache, created 0700 if missing; OSError unless ours.

    A link (``fxgraph -> /attacker/dir``) or a directory of another account would let
    someone else choose the files inductor later loads, so either refuses the merge.
    """
    try:
        fd = _open_dir_at(parent_fd, name, 0o700)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(
                e.errno, "refusing to install through a symlink (or non-directory)", str(where)
            ) from None
        raise
    st = fs.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(
            errno.EPERM,
            f"refusing to install into a directory owned by uid {st.st_uid}, not this user",
            str(where),
        )
    return fd


def _install_at(dir_fd: int, name: str, src_fd: int, where: Path) -> os.stat_result | None:
    """Copy the open regular file ``src_fd`` to ``name`` in ``dir_fd`` atomically.

    Inductor's files are content-addressed, so a regular file of ours under the name
    is the same file: it is kept (None). Anything else there (a link, another account's
    file) refuses. Returns the fstat of the file this call created.
    """
    try:
        st = fs.lstat(dir_fd, name)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            return None
        raise OSError(
            errno.EEXIST,
            "refusing to install over a symlink or a file not owned by this user",
            str(where),
        )
    sst = fs.fstat(src_fd)
    fs.copy_file(
        src_fd, dir_fd, name, stat.S_IMODE(sst.st_mode) & 0o755, (sst.st_atime_ns, sst.st_mtime_ns)
    )
    return fs.lstat(dir_fd, name)


def merge_into(src: Path, dest: Path) -> list[tuple[tuple[str, ...], os.stat_result]]:
    """Copy files from ``src`` into ``dest`` atomically, keeping files already there.

    ``dest`` is the rank's local inductor cache, whose files are later unpickled and
    dlopen'ed, so nothing is written through a link: ``dest`` is opened once (the
    user chose it), every directory below it is walked with O_NOFOLLOW from its
    parent's descriptor and must be ours (OSError otherwise), and each file is
    renamed into place within one directory descriptor. ``src`` is walked by
    descriptor without following links, and only its regular files are copied.
    Returns (relative path, fstat) of every file this call created (not those kept).
    """
    created: list[tuple[tuple[str, ...], os.stat_result]] = []
    with fs.walk(dest, (), create_mode=0o700) as (root_fd,):
        st = fs.fstat(root_fd)
        if st.st_uid != os.geteuid():
            raise OSError(
                errno.EPERM,
                f"refusing to install into a directory owned by uid {st.st_uid}",
                str(dest),
            )
        fds: dict[tuple[str, ...], int] = {(): root_fd}
        try:
            with fs.walk(src, ()) as (src_fd,):
                _merge_at(src_fd, (), fds, dest, created)
        finally:
            for rel, fd in fds.items():
                if rel:
                    os.close(fd)
    return created


def _merge_at(
    src_fd: int,
    rel: tuple[str, ...],
    fds: dict[tuple[str, ...], int],
    dest: Path,
    created: list[tuple[tuple[str, ...], os.stat_result]],
) -> None:
    for name, st in fs.entries(src_fd):
        if stat.S_ISDIR(st.st_mode):
            if len(rel) < 32:
                with contextlib.suppress(FileNotFoundError):
                    sub = fs.open_dir(src_fd, name)
                    try:
                        _merge_at(sub, (*rel, name), fds, dest, created)
                    finally:
                        os.close(sub)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # links, FIFOs, sockets: never copied
        try:
            fd, _ = fs.open_file(src_fd, name)
        except FileNotFoundError:
            continue
        try:
            dir_fd = _dest_dir(fds, rel, dest)
            new = _install_at(dir_fd, name, fd, dest.joinpath(*rel, name))
        finally:
            os.close(fd)
        if new is not None:
            created.append(((*rel, name), new))


def _dest_dir(
    fds: dict[tuple[str, ...], int], rel: tuple[str, ...], dest: Path, private: bool = True
) -> int:
    """The descriptor of ``dest/rel`` (walked, and cached in ``fds``), created as needed."""
    for i in range(1, len(rel) + 1):
        if rel[:i] not in fds:
            where = dest.joinpath(*rel[:i])
            if private:
                fds[rel[:i]] = _local_dir_at(fds[rel[: i - 1]], rel[i - 1], where)
            else:
                fds[rel[:i]] = _open_dir_at(fds[rel[: i - 1]], rel[i - 1], 0o700)
    return fds[rel]
