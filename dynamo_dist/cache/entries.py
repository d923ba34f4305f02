"""What a cache entry is: its format, its manifest's checks, its signature.

An entry is a directory holding ``artifact.tar`` (inductor's own cache files for one
graph) and ``manifest.json`` (versions, key factors, the size and sha256 of each file
and, with ``DYNAMO_DIST_CACHE_SECRET``, an HMAC). Every manifest may have been written
by someone else, so :func:`check_manifest` is total: whatever the bytes, the answer is a
manifest whose every field the rest of the code reads has the right type, or
``EntryRefused``. Reading an entry's files from a directory is ``cache/verify.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_dist.cache.fs_ops import FsOps
from dynamo_dist.cache.secret import NAMESPACE_PREFIX, key_id, signing_key

__all__ = [
    "ARTIFACT",
    "FORMAT",
    "MANIFEST",
    "MAX_ARTIFACT_BYTES",
    "MAX_MANIFEST_BYTES",
    "DirIdent",
    "Entry",
    "EntryMissing",
    "EntryRefused",
    "EntryUnavailable",
    "EntryUntrusted",
    "canonical",
    "check_manifest",
    "dir_ident",
    "file_meta",
    "namespace",
    "short",
    "sign",
    "unavailable",
]

FORMAT = 1
ARTIFACT = "artifact.tar"
MANIFEST = "manifest.json"

# Bounds on what a reader accepts from the shared directory. Generous for real
# inductor caches, small enough that a hostile entry cannot exhaust memory or disk.
MAX_MANIFEST_BYTES = 1 << 20
MAX_ARTIFACT_BYTES = 16 << 30

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


class EntryMissing(EntryRefused):
    """A file of the entry is not there: proven bad, unless the entry itself vanished.

    An entry is published whole (renamed into place), so a missing file means it was
    damaged, or that a concurrent prune or refusal moved or deleted the entry while we
    read it. The reader, which knows where the entry should be, tells the two apart.
    """


# Errors of opening or reading that say something about this rank (rights, limits,
# hardware, a concurrent removal), not about the bytes of the entry.
def unavailable(what: str, e: OSError) -> EntryUnavailable:
    return EntryUnavailable(f"{what} cannot be read here ({e.strerror or e})")


#: Which directory was verified: (st_dev, st_ino, st_ctime_ns). The inode alone is not
#: enough: a pruned entry's inode is soon reused by the next one published.
DirIdent = tuple[int, int, int]


def dir_ident(st: os.stat_result) -> DirIdent:
    """The DirIdent of a directory's stat result."""
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


@dataclass
class Entry:
    """A verified entry: its key, its directory and its manifest, and how to read it again."""

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


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest without its signature, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(manifest: dict[str, Any], secret: str) -> str:
    """The manifest's HMAC under the key scrypt derives from ``secret`` (never the secret
    itself: a signature under it would be a fast offline oracle for a guess)."""
    return hmac.new(signing_key(secret), canonical(manifest), hashlib.sha256).hexdigest()


def namespace(secret: str | None) -> str:
    """The directory, under entries/, locks/ and refused/, of the entries ``secret`` signs.

    ``k2-``: the key id of the scrypt derivation. Namespaces of the old, cheap one
    (``k-<id>``) are never read again, and ``dynamo-dist cache prune`` removes them.
    """
    return "unsigned" if secret is None else f"{NAMESPACE_PREFIX}{key_id(secret)}"


def file_meta(manifest: dict[str, Any], name: str) -> tuple[int, str]:
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


def short(value: Any) -> str:
    """A value from a manifest, quoted short and bounded for a reason or a log line."""
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
        raise EntryRefused(f"unknown entry format {short(fmt)}")
    if not isinstance(manifest.get("key"), str):
        raise EntryRefused("manifest has no key")
    if not isinstance(manifest.get("factors", {}), dict):
        raise EntryRefused("manifest factors are not an object")
    owner = manifest.get("owner", {})
    if not isinstance(owner, dict):
        raise EntryRefused("manifest owner is not an object")
    rank = owner.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise EntryRefused(f"manifest owner rank is not an integer ({short(rank)})")
    seconds = manifest.get("compile_seconds", 0)
    if not _finite(seconds) or seconds < 0:
        raise EntryRefused(f"manifest compile_seconds is not a number >= 0 ({short(seconds)})")
    if "created" in manifest and not _finite(manifest["created"]):
        created = short(manifest["created"])
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


def check_manifest(
    raw: bytes, key: str | None, expect: dict[str, Any] | None, secret: str | None
) -> dict[str, Any]:
    """The manifest in ``raw`` if it is well formed, for ``key``, and signed by ``secret``.

    EntryRefused if it is not JSON, has a field of the wrong type, is for another key,
    was built against other versions (``expect``: the factors that must match), lacks
    the HMAC of ``secret`` (when there is one), or names a file outside the entry. The
    files themselves are checked against it by ``cache/verify.py``.
    """
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise EntryRefused(f"unreadable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise EntryRefused("manifest is not a JSON object")
    _check_fields(manifest)
    if key is not None and manifest["key"] != key:
        raise EntryRefused(f"manifest is for key {short(manifest['key'])}, not {key!r}")
    factors = manifest.get("factors", {})
    if expect:
        skew = {k: (factors.get(k), v) for k, v in expect.items() if factors.get(k) != v}
        if skew:
            what = ", ".join(f"{k} {short(a)} != {short(b)}" for k, (a, b) in sorted(skew.items()))
            raise EntryRefused(f"version skew: {what}")
    if secret is not None:
        sig = manifest.get("signature")
        # compare_digest raises TypeError on non-ASCII text: check the shape first.
        if not (
            isinstance(sig, str)
            and _SHA256.fullmatch(sig)
            and hmac.compare_digest(sig, sign(manifest, secret))
        ):
            raise EntryRefused("missing or wrong HMAC signature (DYNAMO_DIST_CACHE_SECRET)")
    files = manifest.get("files")
    if not isinstance(files, dict) or ARTIFACT not in files:
        raise EntryRefused(f"manifest does not list {ARTIFACT}")
    for name in files:
        # Only plain names inside the entry: "../../etc/shadow" would leak sizes.
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name == MANIFEST:
            raise EntryRefused(f"manifest names a file outside the entry: {short(name)}")
    return manifest
