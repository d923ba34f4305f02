"""The shared cache directory: verified entries, atomic publishing, leader locks.

Layout under the root (one directory per entry, named by its key)::

    <root>/entries/<ns>/<kk>/<key>/manifest.json  # versions, key factors, sha256 per file, HMAC
    <root>/entries/<ns>/<kk>/<key>/artifact.tar   # inductor's own cache files for one graph
    <root>/locks/<ns>/<key>.lock                  # who is compiling it right now
    <root>/refused/<ns>/<key>.<time>              # entries refused (corrupt, tampered, skewed)

``<ns>`` is ``k-<key id>`` for entries signed with a secret (the key id is derived
from the secret, see :func:`key_id`), ``unsigned`` without one: jobs with different
secrets share nothing, so neither refuses (and evicts) the other's valid entries.

An entry is built in a temporary directory beside its final place and renamed
into place, so readers see a whole entry or none. Nothing is unpickled before
the manifest's checksums (and, with ``DYNAMO_DIST_CACHE_SECRET``, its HMAC)
have been verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._log import get_logger
from ._proc import pid_alive

log = get_logger("cache")

FORMAT = 1
ARTIFACT = "artifact.tar"
MANIFEST = "manifest.json"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


class DiskStore:
    """Entries on a (shared) filesystem. ``get`` verifies, ``put`` publishes atomically."""

    def __init__(self, root: str | os.PathLike[str], secret: str | None = None) -> None:
        self.root = Path(root)
        self.secret = secret or None
        self.namespace = namespace(self.secret)
        self.entries = self.root / "entries" / self.namespace
        self.locks = self.root / "locks" / self.namespace
        self.refused = self.root / "refused" / self.namespace

    def check_usable(self) -> None:
        """Raise OSError (with the reason) unless entries can be written here."""
        for d in (self.entries, self.locks, self.refused):
            d.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".probe.{socket.gethostname()}.{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()

    def entry_dir(self, key: str) -> Path:
        return self.entries / key[:2] / key

    # -- reading ---------------------------------------------------------------
    def verify(
        self, path: Path, key: str | None = None, expect: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The manifest of the entry at ``path`` if it is intact, else EntryRefused."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise EntryRefused(f"unreadable manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise EntryRefused(f"unknown entry format {manifest.get('format')!r}")
        if key is not None and manifest.get("key") != key:
            raise EntryRefused(f"manifest is for key {manifest.get('key')!r}, not {key!r}")
        if expect:
            factors = manifest.get("factors", {})
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
        for name, meta in manifest.get("files", {}).items():
            f = path / name
            try:
                size = f.stat().st_size
            except OSError:
                raise EntryRefused(f"{name} is missing") from None
            if size != meta.get("size"):
                raise EntryRefused(f"{name} is truncated ({size} of {meta.get('size')} bytes)")
            if _sha256(f) != meta.get("sha256"):
                raise EntryRefused(f"{name} does not match its sha256 (corrupt or tampered)")
        return manifest

    def get(self, key: str, expect: dict[str, Any] | None = None) -> Entry | None:
        """The verified entry for ``key``; a bad one is moved aside (EntryRefused)."""
        path = self.entry_dir(key)
        if not (path / MANIFEST).exists():
            return None
        try:
            manifest = self.verify(path, key, expect)
        except EntryRefused as e:
            self.refuse(path, str(e))
            raise
        return Entry(key, path, manifest)

    def refuse(self, path: Path, reason: str) -> None:
        """Move a bad entry aside so the next reader recompiles instead of re-refusing it."""
        self.refused.mkdir(parents=True, exist_ok=True)
        dest = self.refused / f"{path.name}.{int(time.time() * 1000)}.{os.getpid()}"
        with contextlib.suppress(OSError):
            os.replace(path, dest)
            (dest / "REFUSED").write_text(reason + "\n")

    # -- writing ---------------------------------------------------------------
    def put(self, key: str, artifact_dir: Path, manifest: dict[str, Any]) -> int:
        """Publish the files of ``artifact_dir`` as entry ``key``; returns bytes written.

        Losing a race to another publisher of the same key is fine: both entries
        describe the same graph, and the first one wins.
        """
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp.{key}.{socket.gethostname()}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            artifact = tmp / ARTIFACT
            with tarfile.open(artifact, "w") as tar:
                for f in sorted(p for p in artifact_dir.rglob("*") if p.is_file()):
                    rel = f.relative_to(artifact_dir)
                    if rel.parts[0] in ("locks", "dynamo_dist"):
                        continue
                    tar.add(f, arcname=str(rel))
            _fsync(artifact)
            manifest = {
                **manifest,
                "format": FORMAT,
                "key": key,
                "files": {ARTIFACT: {"sha256": _sha256(artifact), "size": artifact.stat().st_size}},
            }
            if self.secret is not None:
                manifest["signature"] = sign(manifest, self.secret)
            man = tmp / MANIFEST
            man.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync(man)
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / MANIFEST).exists():
                    return 0  # someone else published it first
                raise
            _fsync_dir(final.parent)
            return (final / ARTIFACT).stat().st_size
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- leader locks ------------------------------------------------------------
    def try_lock(self, key: str, owner: dict[str, Any]) -> Lock | None:
        self.locks.mkdir(parents=True, exist_ok=True)
        path = self.locks / f"{key}.lock"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as fh:
            json.dump({**owner, "time": time.time()}, fh)
        return Lock(path)

    def lock_owner(self, key: str) -> tuple[dict[str, Any], float] | None:
        """(owner record, seconds since its last heartbeat), or None if unlocked."""
        path = self.locks / f"{key}.lock"
        try:
            st = path.stat()
            owner = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return None
        return owner, time.time() - st.st_mtime

    def break_lock(self, key: str) -> None:
        path = self.locks / f"{key}.lock"
        stale = self.locks / f"{key}.stale.{os.getpid()}"
        with contextlib.suppress(OSError):
            os.replace(path, stale)
            stale.unlink()

    def iter_entries(self) -> Iterator[Path]:
        if not self.entries.is_dir():
            return
        for sub in sorted(self.entries.iterdir()):
            if sub.is_dir():
                for e in sorted(sub.iterdir()):
                    if e.is_dir() and not e.name.startswith(".tmp."):
                        yield e

    def iter_all_entries(self) -> Iterator[Path]:
        """Entries of every namespace, and of the layout before namespaces (for ``clear``)."""
        top = self.root / "entries"
        if not top.is_dir() or top.is_symlink():
            return
        for ns in sorted(top.iterdir()):
            if ns.is_symlink() or not ns.is_dir():
                continue
            # Before namespaces: entries/<kk>/<key>; now: entries/<ns>/<kk>/<key>.
            subs = [ns] if len(ns.name) == 2 else sorted(ns.iterdir())
            for sub in subs:
                if sub.is_symlink() or not sub.is_dir():
                    continue
                for e in sorted(sub.iterdir()):
                    if e.is_dir() and not e.is_symlink():
                        yield e


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
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def extract(entry: Entry, dest: Path) -> int:
    """Unpack an entry's verified artifact into ``dest``; returns bytes read."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(entry.artifact) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            # Only plain files inside dest: an archive must never write elsewhere.
            target = (dest / m.name).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep):
                raise EntryRefused(f"archive member {m.name!r} escapes the cache directory")
        tar.extractall(dest, members=members)
    return entry.artifact.stat().st_size


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


def alive_on_this_host(owner: dict[str, Any]) -> bool | None:
    """Whether the owner process lives (None when it runs on another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid", 0) or 0)
    return pid_alive(pid) if pid > 0 else None
