"""The artifact file: its bytes (a header and the serialized artifact) and its place on disk.

An artifact file is ``DDPC1`` magic, an 8-byte header length, a JSON header (what the
capture recorded: its label, CPU ISA, torch version, inlined sources, dropped guards;
or a failure that cannot succeed for the key) and the serialized artifact. It sits
under ``dynamo_dist_precompiled/<key>.bin`` of the inductor cache in effect (a clean
room, or the rank's local cache), where the cache entry's kernels are too: the entry
carries it to the other ranks with them. Whether an artifact is safe to use is
``cache/artifact.py``'s job; this module only writes, reads and removes the file.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from dynamo_dist.cache import fs
from dynamo_dist.dynamo import inductor

__all__ = ["decode", "discard", "encode", "local_artifacts", "read_stored", "write_stored"]

#: Where an artifact sits in an inductor cache directory (a clean room, the local cache).
ARTIFACT_DIR = "dynamo_dist_precompiled"
_MAGIC = b"DDPC1\n"
#: Generous: a GPT-2's artifact is a few MiB (graphs and generated code, no weights).
MAX_ARTIFACT_BYTES = 1 << 30


# -- bytes ----------------------------------------------------------------------------------
def encode(header: dict[str, Any], artifact: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return _MAGIC + len(head).to_bytes(8, "little") + head + artifact


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, artifact bytes); ValueError if ``data`` is not an artifact file."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 8:
        raise ValueError("not a dynamo_dist precompiled artifact")
    n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
    start = len(_MAGIC) + 8
    if n > len(data) - start:
        raise ValueError("truncated artifact header")
    try:
        header = json.loads(data[start : start + n])
    except RecursionError:  # nested deeper than the interpreter's recursion limit
        raise ValueError("artifact header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("artifact header is not an object")
    return header, data[start + n :]


# -- on disk --------------------------------------------------------------------------------
def _artifact_dir(create: bool) -> tuple[int, bool]:
    """The artifact directory in the inductor cache in effect now, opened (fd, ok)."""
    base = inductor.cache_dir()
    try:
        fd = fs.open_root(base, create=create, mode=0o700)
    except OSError:
        return -1, False
    try:
        sub = fs.open_dir(fd, ARTIFACT_DIR, 0o700 if create else None)
    except OSError:
        return -1, False
    finally:
        os.close(fd)
    return sub, True


def read_stored(name: str) -> bytes | None:
    """The stored file ``name`` of this user, or None if there is none."""
    fd, ok = _artifact_dir(create=False)
    if not ok:
        return None
    try:
        return fs.read_file(fd, name, MAX_ARTIFACT_BYTES, owner=os.geteuid())
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        return None
    finally:
        os.close(fd)


def write_stored(name: str, data: bytes) -> None:
    """Write ``name`` (mode 0600) unless it is there: the same key is the same content."""
    fd, ok = _artifact_dir(create=True)
    if not ok:
        raise OSError(errno.EACCES, "cannot open the artifact directory")
    try:
        fs.write_new(fd, name, data, mode=0o600)
    except FileExistsError:
        pass  # written by an earlier run of the same key: same content
    finally:
        os.close(fd)


def discard(key: str) -> None:
    """Remove a stored artifact that cannot be loaded: the next start installs it again."""
    fd, ok = _artifact_dir(create=False)
    if not ok:
        return
    try:
        fs.remove(fd, f"{key}.bin")
    except OSError:
        pass
    finally:
        os.close(fd)


def local_artifacts(local: Path) -> list[str]:
    """The artifact files in a local inductor cache (for the cache CLI and tests)."""
    try:
        with fs.walk(local, (ARTIFACT_DIR,)) as fds:
            return sorted(fs.names(fds[-1]))
    except OSError:
        return []
