"""The shared cache directory: verified entries, atomic publishing, leader locks.

Layout under the root (one directory per entry, named by its key)::

    <root>/entries/<ns>/<kk>/<key>/manifest.json  # versions, key factors, sha256 per file, HMAC
    <root>/entries/<ns>/<kk>/<key>/artifact.tar   # inductor's own cache files for one graph
    <root>/locks/<ns>/<key>.lock                  # who is compiling it right now
    <root>/refused/<ns>/<key>.<time>              # entries refused (corrupt, tampered, skewed)

``<ns>`` is ``k-<key id>`` for entries signed with a secret (the key id is derived
from the secret, see :func:`key_id`), ``unsigned`` without one: jobs with different
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
* files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` in directories from
  ``mkdtemp``, so nothing is ever written through a planted link;
* archives are plain tar (never decompressed), hold only regular files and
  directories with safe relative names, and lose setuid/setgid/sticky bits;
* every malformed input ends as ``EntryRefused`` (or a miss), never as another
  exception in the training job.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ._log import get_logger
from ._proc import pid_alive

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
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A name the manifest may list: one plain component, nothing that leaves the entry.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class EntryRefused(Exception):
    """An entry failed verification; ``reason`` says why."""


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def artifact(self) -> Path:
        return self.path / ARTIFACT


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(manifest: dict[str, Any], secret: str) -> str:
    return hmac.new(secret.encode(), _canonical(manifest), hashlib.sha256).hexdigest()


def key_id(secret: str) -> str:
    """A short public name for ``secret``: an HMAC of a constant, so it reveals nothing."""
    return hmac.new(secret.encode(), b"dynamo_dist key id", hashlib.sha256).hexdigest()[:16]


def namespace(secret: str | None) -> str:
    """The directory, under entries/, locks/ and refused/, of the entries ``secret`` signs."""
    return "unsigned" if secret is None else f"k-{key_id(secret)}"


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _private_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory with an unpredictable name (mkdtemp).

    mkdtemp creates it 0700, so nothing can be planted in it while it is filled;
    callers widen it with ``_open_up`` only after writing.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _open_up(path: Path) -> None:
    """Give a directory of ours the usual umask mode: readers on other accounts need it."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fchmod(fd, 0o777 & ~_umask())
    finally:
        os.close(fd)


def _real_dir(path: Path) -> Path:
    """Create ``path`` if needed and insist it is a directory, not a link to one.

    A planted symlink (``entries/zz -> /home/victim``) would otherwise make us
    write, or later delete, wherever it points.
    """
    path.mkdir(parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ELOOP, "not a plain directory (a symlink?)", str(path))
    return path


def _create(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a new file; never through a link, never over an existing file."""
    fd = os.open(path, _CREATE_FLAGS, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _open_regular(path: Path, max_size: int, what: str) -> tuple[int, int]:
    """(fd, size) of a regular file at ``path``, else EntryRefused.

    Links, FIFOs and devices (``artifact.tar -> /dev/zero``) are refused before a
    byte is read, and so are files larger than ``max_size``.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise EntryRefused(f"{what} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EntryRefused(f"{what} is a symlink") from None
        raise EntryRefused(f"{what} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EntryRefused(f"{what} is not a regular file")
        if st.st_size > max_size:
            raise EntryRefused(f"{what} is too large ({st.st_size} > {max_size} bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_small(path: Path, max_size: int, what: str) -> bytes:
    """The whole (bounded, regular) file at ``path``, read from one descriptor."""
    fd, _ = _open_regular(path, max_size, what)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_size + 1)
    if len(data) > max_size:
        raise EntryRefused(f"{what} is too large (more than {max_size} bytes)")
    return data


def _hash_fd(fd: int, size: int, copy: IO[bytes] | None = None) -> str:
    """sha256 of exactly ``size`` bytes read from ``fd`` (copied to ``copy`` as read).

    Reads at most ``size + 1`` bytes, so a file that grows while it is read is
    refused rather than read forever; one that shrinks is refused as truncated.
    """
    h = hashlib.sha256()
    left = size
    while left > 0:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            raise EntryRefused(f"file shrank while being read ({size - left} of {size} bytes)")
        h.update(block)
        if copy is not None:
            copy.write(block)
        left -= len(block)
    if os.read(fd, 1):
        raise EntryRefused("file grew while being read")
    return h.hexdigest()


def _file_meta(manifest: dict[str, Any], name: str) -> tuple[int, str]:
    """The declared (size, sha256) of ``name``; EntryRefused if absent or malformed."""
    files = manifest.get("files")
    meta = files.get(name) if isinstance(files, dict) else None
    if not isinstance(meta, dict):
        raise EntryRefused(f"manifest does not list {name}")
    size, digest = meta.get("size"), meta.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise EntryRefused(f"manifest has no valid size for {name}")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise EntryRefused(f"manifest has no valid sha256 for {name}")
    return size, digest


class DiskStore:
    """Entries on a (shared) filesystem. ``get`` verifies, ``put`` publishes atomically."""

    def __init__(self, root: str | os.PathLike[str], secret: str | None = None) -> None:
        self.root = Path(root)
        self.secret = secret or None
        self.namespace = namespace(self.secret)
        self.entries = self.root / "entries" / self.namespace
        self.locks = self.root / "locks" / self.namespace
        self.refused = self.root / "refused" / self.namespace
        self.marker = self.root / MARKER

    def check_usable(self) -> None:
        """Raise OSError (with the reason) unless entries can be written here.

        A job that creates the cache also writes its marker, which ``cache
        clear`` and ``prune`` require before deleting anything.
        """
        self._make_entries()
        for d in (self.locks.parent, self.locks, self.refused.parent, self.refused):
            _real_dir(d)
        # mkstemp: unpredictable name, O_CREAT|O_EXCL|O_NOFOLLOW, so no planted link
        # is written through.
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=self.root)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)

    def _make_entries(self) -> None:
        """Create ``entries/``; whoever creates it creates the cache and marks it."""
        top = self.root / "entries"
        new = not os.path.lexists(top)
        _real_dir(top)  # a planted link here would move every namespace elsewhere
        _real_dir(self.entries)
        if new:
            write_marker(self.root)

    def entry_dir(self, key: str) -> Path:
        return self.entries / key[:2] / key

    # -- reading ---------------------------------------------------------------
    def verify(
        self, path: Path, key: str | None = None, expect: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The manifest of the entry at ``path`` if it is intact, else EntryRefused.

        Total: whatever is on disk, the answer is a manifest or EntryRefused.
        """
        try:
            return self._verify(path, key, expect)
        except EntryRefused:
            raise
        except Exception as e:  # a hostile entry must never crash the training job
            raise EntryRefused(f"malformed entry ({type(e).__name__}: {e})") from None

    def _verify(self, path: Path, key: str | None, expect: dict[str, Any] | None) -> dict[str, Any]:
        if os.path.islink(path):
            raise EntryRefused("entry directory is a symlink")
        try:
            manifest = json.loads(_read_small(path / MANIFEST, MAX_MANIFEST_BYTES, MANIFEST))
        except ValueError as e:
            raise EntryRefused(f"unreadable manifest ({e})") from None
        if not isinstance(manifest, dict):
            raise EntryRefused("manifest is not a JSON object")
        if manifest.get("format") != FORMAT:
            raise EntryRefused(f"unknown entry format {manifest.get('format')!r}")
        if key is not None and manifest.get("key") != key:
            raise EntryRefused(f"manifest is for key {manifest.get('key')!r}, not {key!r}")
        factors = manifest.get("factors", {})
        if not isinstance(factors, dict):
            raise EntryRefused("manifest factors are not an object")
        if expect:
            skew = {k: (factors.get(k), v) for k, v in expect.items() if factors.get(k) != v}
            if skew:
                what = ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in sorted(skew.items()))
                raise EntryRefused(f"version skew: {what}")
        if self.secret is not None:
            sig = manifest.get("signature")
            if not isinstance(sig, str) or not hmac.compare_digest(
                sig, sign(manifest, self.secret)
            ):
                raise EntryRefused("missing or wrong HMAC signature (DYNAMO_DIST_CACHE_SECRET)")
        files = manifest.get("files")
        if not isinstance(files, dict) or ARTIFACT not in files:
            raise EntryRefused(f"manifest does not list {ARTIFACT}")
        for name in files:
            # Only plain names inside the entry: "../../etc/shadow" would leak sizes.
            if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name == MANIFEST:
                raise EntryRefused(f"manifest names a file outside the entry: {name!r}")
        for name in sorted(files):
            size, digest = _file_meta(manifest, name)
            fd, actual = _open_regular(path / name, min(size, MAX_ARTIFACT_BYTES), name)
            try:
                if actual != size:
                    raise EntryRefused(f"{name} is truncated ({actual} of {size} bytes)")
                if not hmac.compare_digest(_hash_fd(fd, size), digest):
                    raise EntryRefused(f"{name} does not match its sha256 (corrupt or tampered)")
            finally:
                os.close(fd)
        return manifest

    def get(self, key: str, expect: dict[str, Any] | None = None) -> Entry | None:
        """The verified entry for ``key``; a bad one is moved aside (EntryRefused)."""
        path = self.entry_dir(key)
        if not os.path.lexists(path / MANIFEST):
            return None
        try:
            manifest = self.verify(path, key, expect)
        except EntryRefused as e:
            self.refuse(path, str(e))
            raise
        return Entry(key, path, manifest)

    def refuse(self, path: Path, reason: str) -> None:
        """Move a bad entry aside so the next reader recompiles instead of re-refusing it.

        Nothing is written into the refused entry (its files may be links): it is
        renamed into a fresh directory of ours, and the reason goes beside it.
        """
        with contextlib.suppress(OSError):
            _real_dir(self.refused)
            stamp = f"{path.name}.{int(time.time() * 1000)}."
            box = _private_dir(self.refused, stamp)
            try:
                os.rename(path, box / "entry")
            except OSError:
                shutil.rmtree(box, ignore_errors=True)  # someone else moved it first
                return
            _create(box / "REFUSED", (reason + "\n").encode())
            _open_up(box)

    # -- writing ---------------------------------------------------------------
    def put(self, key: str, artifact_dir: Path, manifest: dict[str, Any]) -> int:
        """Publish the files of ``artifact_dir`` as entry ``key``; returns bytes written.

        Losing a race to another publisher of the same key is fine: both entries
        describe the same graph, and the first one wins.
        """
        final = self.entry_dir(key)
        self._make_entries()
        shard = _real_dir(final.parent)
        # mkdtemp: a name nobody can predict and plant links in (it is 0700 while filled).
        tmp = _private_dir(shard, f".tmp.{key}.")
        try:
            artifact = tmp / ARTIFACT
            fd = os.open(artifact, (_CREATE_FLAGS & ~os.O_WRONLY) | os.O_RDWR, 0o644)
            with os.fdopen(fd, "w+b") as out:
                with tarfile.open(fileobj=out, mode="w:") as tar:
                    for f in sorted(p for p in artifact_dir.rglob("*") if p.is_file()):
                        rel = f.relative_to(artifact_dir)
                        if rel.parts[0] in ("locks", "dynamo_dist"):
                            continue
                        tar.add(f, arcname=str(rel))
                out.flush()
                os.fsync(out.fileno())
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
            _create(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            _open_up(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if os.path.lexists(final / MANIFEST):
                    return 0  # someone else published it first
                raise
            _fsync_dir(shard)
            return size
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- leader locks ------------------------------------------------------------
    def try_lock(self, key: str, owner: dict[str, Any]) -> Lock | None:
        _real_dir(self.locks)
        path = self.locks / f"{key}.lock"
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as fh:
            json.dump({**owner, "time": time.time()}, fh)
        return Lock(path)

    def lock_owner(self, key: str) -> tuple[dict[str, Any], float] | None:
        """(owner record, seconds since its last heartbeat), or None if unlocked."""
        path = self.locks / f"{key}.lock"
        try:
            st = os.lstat(path)
        except OSError:
            return None
        # A lock that exists but cannot be read (garbage, a FIFO, a link) is an owner
        # we cannot name: waiters still time out or break it once its mtime is stale.
        owner: Any = {}
        with contextlib.suppress(OSError, ValueError, RecursionError, EntryRefused):
            owner = json.loads(_read_small(path, 1 << 16, "lock") or b"{}")
        if not isinstance(owner, dict):
            owner = {}
        return owner, time.time() - st.st_mtime

    def break_lock(self, key: str) -> None:
        path = self.locks / f"{key}.lock"
        stale = self.locks / f"{key}.stale.{os.getpid()}"
        with contextlib.suppress(OSError):
            os.replace(path, stale)
            stale.unlink()

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


def _plain_subdirs(path: Path) -> list[Path]:
    """Subdirectories of ``path`` that are real directories, sorted; [] if unreadable.

    Neither ``path`` itself nor its children are followed when they are links.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return []
        with os.scandir(path) as it:
            return sorted(Path(d.path) for d in it if d.is_dir(follow_symlinks=False))
    except OSError:
        return []


def write_marker(root: Path) -> bool:
    """Mark ``root`` as a dynamo_dist cache; False if it already carries a marker.

    ``dynamo-dist cache clear`` and ``prune`` delete only in marked directories,
    so a typo'd path or a directory that merely has an ``entries/`` is safe.
    """
    try:
        _create(root / MARKER, json.dumps({"format": FORMAT}).encode() + b"\n")
    except FileExistsError:
        return False
    return True


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of the cache at ``root``, or None if it has no (valid) marker."""
    try:
        marker = json.loads(_read_small(root / MARKER, 4096, MARKER))
    except (OSError, ValueError, EntryRefused):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("format"), int) else None


class Lock:
    """A held leader lock with a heartbeat: its mtime says the owner is alive."""

    HEARTBEAT_S = 2.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, daemon=True, name="dynamo_dist-cache-lock"
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError, NotImplementedError):
                os.utime(self.path, follow_symlinks=False)

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _safe_member(m: tarfile.TarInfo) -> str | None:
    """Why member ``m`` may not be unpacked, or None if it is a plain file or directory."""
    if not (m.isreg() or m.isdir()) or m.issparse():
        return "is not a regular file or directory"
    # Relative, normalised, one component at a time: no "/abs", "..", "a//b", "./a".
    if "\0" in m.name or "\\" in m.name or any(p in ("", ".", "..") for p in m.name.split("/")):
        return "has an unsafe name"
    return None


def extract(entry: Entry, dest: Path) -> int:
    """Unpack an entry's verified artifact into ``dest``; returns bytes read.

    The artifact is opened once (no links, FIFOs or devices) and copied into a
    private anonymous file while it is hashed; the hash must match the verified
    manifest, and only that copy is unpacked. So the bytes unpacked are exactly
    the bytes checked, even if the shared file is swapped or rewritten after
    ``verify``. Anything unsafe in the archive refuses the entry (EntryRefused).
    """
    size, digest = _file_meta(entry.manifest, ARTIFACT)
    dest.mkdir(parents=True, exist_ok=True)
    fd, actual = _open_regular(entry.artifact, min(size, MAX_ARTIFACT_BYTES), ARTIFACT)
    try:
        if actual != size:
            raise EntryRefused(f"{ARTIFACT} is truncated ({actual} of {size} bytes)")
        with tempfile.TemporaryFile(dir=dest.parent) as copy:
            got = _hash_fd(fd, size, copy)
            if not hmac.compare_digest(got, digest):
                raise EntryRefused(f"{ARTIFACT} does not match its sha256 (changed after verify?)")
            copy.seek(0)
            _unpack(copy, dest, size)
    finally:
        os.close(fd)
    return size


def _unpack(fileobj: IO[bytes], dest: Path, size: int) -> None:
    """Unpack a plain (never decompressed) tar of files and directories into ``dest``."""
    try:
        # "r:" : no transparent decompression, so 30 KB cannot become 200 MiB.
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for m in tar:
                if len(members) >= MAX_MEMBERS:
                    raise EntryRefused(f"archive has more than {MAX_MEMBERS} members")
                why = _safe_member(m)
                if why:
                    raise EntryRefused(f"archive member {m.name!r} {why}")
                total += m.size
                if total > size:  # a plain tar holds no more than it weighs
                    raise EntryRefused("archive unpacks to more than its own size")
                # No setuid/setgid/sticky, no group/other write: plain cache files.
                m.mode = (m.mode & 0o755) | (0o700 if m.isdir() else 0o600)
                members.append(m)
            root = dest.resolve()
            for m in members:
                target = (dest / m.name).resolve()
                if target != root and not str(target).startswith(str(root) + os.sep):
                    raise EntryRefused(f"archive member {m.name!r} escapes the cache directory")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; the checks above still hold
                tar.extractall(dest, members=members)
    except tarfile.TarError as e:
        raise EntryRefused(f"unreadable archive ({e})") from None


def merge_into(src: Path, dest: Path) -> None:
    """Move files from ``src`` into ``dest`` atomically, keeping files already there.

    Inductor's cache files are content-addressed, so an existing file is the
    same file; os.replace per file means a concurrent reader never sees half.
    """
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / f.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.dd{os.getpid()}")
        shutil.copy2(f, tmp)
        os.replace(tmp, target)


_PID_LIMIT = 1 << 22  # Linux's pid_max can be at most 2**22


def alive_on_this_host(owner: dict[str, Any]) -> bool | None:
    """Whether the owner process lives (None when it runs on another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    # Lock files are written by others: anything but a plausible pid is no answer
    # (a huge int or 1e400 would overflow os.kill).
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < _PID_LIMIT:
        return None
    return pid_alive(pid)
