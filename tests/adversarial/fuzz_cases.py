"""Seeded fuzz cases for everything dynamo_dist reads that someone else may have written
(issue 30, item 4): shared cache entries, precompiled artifact files, host-local copies,
automatic-dynamic profiles, and values read from the job's key-value store.

Five targets, each in two variants:

* ``entry``: an entry of the shared directory (manifest, artifact tar, the files' types);
  read with ``DiskStore.get``, unpacked with ``extract``.
* ``artifact``: a precompiled artifact file (``DDPC1`` header and serialized artifact) in
  the rank's local inductor cache, read with ``artifact_file.read_stored`` and
  ``artifact.load`` (torch's own deserializer is replaced by a recorder: the bytes it
  gets are the signed entry's, and what matters here is that every check before it ran).
* ``hostcopy``: the host-local copy of an entry (fan-out), found by ``HostSite.look`` and
  unpacked as ``follow.stage`` does; also the host directory itself (``HostCopies.store``).
* ``profile``: an automatic-dynamic profile entry (a pickled code state), read with
  ``profile_store.read_newest``.
* ``store``: values of the job's key-value store: status records (``status._parse`` and
  what reads them), cache agreement verdicts (``Agreement.agree``), profile payloads
  (``Profiles._share`` then the load's unpickling), profile views (``Profiles._view``),
  job report records (``report.publish_and_collect``) and group-setup records
  (``group._pending`` and the crossed-setup check).

Variants: ``plain`` mutates the bytes as an attacker without the secret could (bit flips,
truncation, extension, fields of the wrong type, huge lengths, deep nesting, ``..`` and
absolute names, links, FIFOs, devices, duplicated members and keys, wrong versions, a
MAC under another key); ``resigned`` makes the same kinds of mutations and then signs
the result with the job's real secret (the manifest's HMAC, the store payload's MAC), so
every signature passes and only the parsers stand between the bytes and the job. Status
records, agreement verdicts, reports and group-setup records carry no MAC: their
re-signed variant is the profile payloads and views, which do.

Every case ends as one of:

* ``refused``: the documented refusal path (EntryRefused and a counted refusal, a
  ``Failed`` artifact, a counted store payload refusal, a record read as an error);
* ``handled``: accepted (the bytes verified, or the mutation changed nothing that
  matters), or a miss that proves nothing bad (EntryUnavailable, an untrusted entry);
* ``Crash``: any other exception escaped to the caller;
* ``Hang``: the case did not finish within its deadline (SIGALRM);
* ``Unverified``: something was loaded, installed or returned that an independent
  check finds unverified (a manifest whose HMAC or sha256 does not match, a file
  unpacked that the verified archive does not hold, a link or a file outside the
  destination, an artifact used although its header failed a check, a pickle global
  resolved, an agreement counted as "yes" from a value that is not one).

``run_case(target, variant, seed, index, work)`` is deterministic for its arguments.
Used by ``test_cache_fuzz.py`` (a few hundred cases) and ``benchmarks/fuzz_cache.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import stat
import sys
import tarfile
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dynamo_dist.cache import entries, fanout, key, profile_store
from dynamo_dist.cache import secret as cache_secret
from dynamo_dist.cache.agree import _NO, Agreement
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.artifact_file import ARTIFACT_DIR, encode, read_stored
from dynamo_dist.cache.entries import EntryRefused, EntryUnavailable
from dynamo_dist.cache.fanout import HostCopies, HostSite, host_copy_dir
from dynamo_dist.cache.rooms import ROOMS, bytes_member
from dynamo_dist.cache.stats import CacheStats
from dynamo_dist.cache.store import DiskStore
from dynamo_dist.cache.turn import Turn
from dynamo_dist.dist import store as dist_store
from dynamo_dist.dist.local import GroupInfo

TARGETS = ("entry", "artifact", "hostcopy", "profile", "store")
VARIANTS = ("plain", "resigned")
SECRET = "fuzz-cases-secret-of-at-least-32-characters"
OTHER_SECRET = "another-fuzz-secret-of-at-least-32-chars"
KEY = "cd" + "e" * 38
#: Per case; only a hang reaches it (the slowest real case takes well under a second).
DEADLINE_S = float(os.environ.get("DYNAMO_DIST_FUZZ_DEADLINE", "20"))

GENUINE = {
    "ab/cabc.so": b"\x7fELF kernel " * 40,
    "fxgraph/ab/graph": b"pickled graph",
    "aotautograd/x/entry": b"\x80\x04 pickled aot",
}


class Crash(Exception):
    """An exception other than the documented refusal escaped to the caller."""


class Hang(BaseException):
    """A case did not finish within its deadline.

    A BaseException, as KeyboardInterrupt is: the readers turn any Exception into a
    refusal (``verify_entry``, ``extract``), which would hide a hang as a refusal.
    """


class Unverified(Exception):
    """Something unverified was loaded, installed or returned."""


@dataclasses.dataclass
class Outcome:
    kind: str  # "refused" or "handled"
    detail: str


def refused(detail: str) -> Outcome:
    return Outcome("refused", detail)


def handled(detail: str) -> Outcome:
    return Outcome("handled", detail)


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise Hang in this (main) thread after ``seconds``; restores an outer timer."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"{what} did not return within {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    old_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if old_left:
            signal.setitimer(signal.ITIMER_REAL, max(old_left - (time.monotonic() - t0), 0.01))


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# -- the canary: a global that must never be resolved by any loader ------------------------
_CANARY = types.ModuleType("dd_fuzz_canary")
_canary_hits: list[str] = []
sys.modules.setdefault("dd_fuzz_canary", _CANARY)


def _canary_boom(*args: Any) -> None:
    _canary_hits.append("called")


_canary_boom.__module__ = "dd_fuzz_canary"
_canary_boom.__qualname__ = _canary_boom.__name__ = "boom"
_CANARY.boom = _canary_boom  # type: ignore[attr-defined]


class _Evil:
    """Pickles as a call of ``dd_fuzz_canary.boom``: a loader that resolves it is caught."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_canary_boom, ("x",))


# -- generic mutations ----------------------------------------------------------------------
_RAW = "\x00raw{}\x00"


def _deep(n: int, open_: str = "[", close: str = "]") -> str:
    return open_ * n + close * n


def junk_value(rng: random.Random, raws: list[str]) -> Any:
    """A value of a wrong type, a huge one, or one JSON reads into something odd."""
    kind = rng.choice(
        [
            *("[]", "null", "x", "1e400", "-1e400", "-1", "0", "true", "hugeint", "float"),
            *("nonascii", "surrogate", "deep", "deepobj", "obj", "longstr", "dotdot", "abs"),
            *("nan", "bigneg", "list-of-lists"),
        ]
    )
    raw = {
        "1e400": "1e400",
        "-1e400": "-1e400",
        "nan": "NaN",
        "hugeint": "9" * rng.choice([30, 400, 4000]),
        "bigneg": "-" + "9" * 25,
        "deep": _deep(rng.choice([50, 900, 985, 5000, 100_000])),
        "deepobj": '{"a":' * 600 + "1" + "}" * 600,
    }.get(kind)
    if raw is not None:
        raws.append(raw)
        return _RAW.format(len(raws) - 1)
    return {
        "[]": [],
        "null": None,
        "x": "x",
        "-1": -1,
        "0": 0,
        "true": True,
        "float": 2.5,
        "nonascii": "é☃" * rng.randint(1, 40),
        "surrogate": "\udc80\ud800",
        "obj": {"rank": [], "size": "1", "sha256": 5},
        "longstr": "L" * rng.choice([300, 70_000]),
        "dotdot": "../../etc/passwd",
        "abs": "/etc/passwd",
        "list-of-lists": [[1, 2, 3, 4]] * 3,
    }[kind]


def dumps_raw(obj: Any, raws: list[str]) -> bytes:
    text = json.dumps(obj)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(i)), raw)
    return text.encode("utf-8", "surrogatepass")


def _containers(obj: Any) -> list[Any]:
    out, stack = [], [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            out.append(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            out.append(o)
            stack.extend(o)
    return out


def mutate_doc(rng: random.Random, doc: Any, known_keys: list[str]) -> tuple[bytes, str]:
    """``doc`` (parsed JSON) with one structural mutation, serialized; and what was done."""
    raws: list[str] = []
    op = rng.choice(["value"] * 4 + ["drop", "add", "top", "dupkey", "rename"])
    spots = _containers(doc)
    if op == "top" or not spots:
        return dumps_raw(junk_value(rng, raws), raws), "top"
    spot = rng.choice(spots)
    if isinstance(spot, dict) and spot:
        k = rng.choice(sorted(spot))
        if op == "drop":
            del spot[k]
        elif op == "add":
            name = rng.choice([*known_keys, "extra", "é", "\udc80", "../x", ""])
            spot[name + rng.choice(["", str(rng.randint(0, 9))])] = junk_value(rng, raws)
        elif op == "rename":
            spot[rng.choice(["../" + k, k + "\x00", k.upper(), "/" + k])] = spot.pop(k)
        elif op == "dupkey":
            # A duplicated key: JSON takes the last one; the first carries junk.
            text = dumps_raw(doc, raws).decode("utf-8", "surrogatepass")
            dup = (
                json.dumps(k)
                + ": "
                + dumps_raw(junk_value(rng, raws), raws).decode("utf-8", "surrogatepass")
            )
            if text.startswith("{") and len(text) > 2:
                return ("{" + dup + ", " + text[1:]).encode("utf-8", "surrogatepass"), f"dup:{k}"
            return text.encode("utf-8", "surrogatepass"), f"dup:{k}"
        else:
            spot[k] = junk_value(rng, raws)
        return dumps_raw(doc, raws), f"{op}:{k!r:.40}"
    if isinstance(spot, list) and spot:
        i = rng.randrange(len(spot))
        if op == "drop":
            del spot[i]
        elif op == "add":
            spot.append(junk_value(rng, raws))
        else:
            spot[i] = junk_value(rng, raws)
        return dumps_raw(doc, raws), f"{op}:[{i}]"
    return dumps_raw(junk_value(rng, raws), raws), "top"


def mutate_raw(rng: random.Random, data: bytes, cap: int = 1 << 20) -> tuple[bytes, str]:
    """Byte-level: flips, truncation, extension, emptiness, repetition, over a cap."""
    b = bytearray(data)
    op = rng.choice(["flip", "flip", "truncate", "append", "empty", "insert", "repeat", "cap"])
    if op == "flip" and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == "truncate" and b:
        del b[rng.randrange(len(b)) :]
    elif op == "append":
        b += rng.randbytes(rng.randint(1, 3000))
    elif op == "insert" and b:
        at = rng.randrange(len(b))
        b[at:at] = rng.choice([b"\x00", b"\xff" * 8, b'"', b"[" * 100, rng.randbytes(16)])
    elif op == "repeat":
        b = b * rng.choice([2, 3])
    elif op == "cap":
        b = b + b" " * (cap + 1 - len(b)) if len(b) <= cap else b
    else:
        b = bytearray()
    return bytes(b), f"bytes:{op}"


# -- files on disk ------------------------------------------------------------------------
def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def clear(path: Path) -> None:
    """Remove whatever ``path`` is, never following links."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            for p in [path, *path.rglob("*")]:
                with contextlib.suppress(OSError):
                    if not os.path.islink(p):
                        os.chmod(p, 0o700 if p.is_dir() else 0o600)
            shutil.rmtree(path)
        else:
            os.unlink(path)


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    clear(path)
    path.write_bytes(data)
    os.chmod(path, mode)


NOBODY = 65534


def _specials(where: str, names: list[str]) -> list[str]:
    keep = ("S_ISREG", "S_ISDIR", "S_ISLNK")
    return [
        n
        for n in names
        if not any(getattr(stat, k)(os.lstat(os.path.join(where, n)).st_mode) for k in keep)
    ]


def mutate_type(rng: random.Random, path: Path, outside: Path) -> str:
    """Replace ``path`` by a link, a FIFO, a directory, a device link; or change its owner
    or mode (an unsigned entry must be ours and writable by nobody else)."""
    ops = ["dir", "fifo", "devzero", "link-copy", "link-other", "socket-ish", "mode666", "mode000"]
    if os.geteuid() == 0:
        ops.append("chown")
    op = rng.choice(ops)
    if op in ("mode666", "mode000"):
        if os.path.lexists(path) and not os.path.islink(path):
            os.chmod(path, 0 if op == "mode000" else 0o666 if not path.is_dir() else 0o777)
        return f"type:{op}"
    if op == "chown":
        if os.path.lexists(path):
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        return "type:chown"
    copy = outside / f"copy-{rng.randrange(1 << 30)}"
    if op == "link-copy" and is_regular(path):
        shutil.copyfile(path, copy)
    elif op == "link-copy" and path.is_dir() and not path.is_symlink():
        # Links copied as links; FIFOs and devices left out (copying would open them).
        shutil.copytree(path, copy, symlinks=True, ignore=_specials)
    clear(path)
    if op == "dir":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif op == "fifo":
        os.mkfifo(path)
    elif op == "devzero":
        path.symlink_to("/dev/zero")
    elif op == "socket-ish":
        path.symlink_to("/dev/null")
    elif op == "link-copy":
        path.symlink_to(copy)
    else:
        sibling = sorted(p for p in path.parent.iterdir() if p != path)
        path.symlink_to(sibling[0] if sibling else "/etc/hostname")
    return f"type:{op}"


# -- tar archives -------------------------------------------------------------------------
def make_tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.GNU_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=fmt) as tar:
        for info, data in members:
            if data is not None and info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _reg(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def genuine_members(files: dict[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [_reg(name, data) for name, data in sorted(files.items())]


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])


#: Members named to escape, confuse or overflow the unpacking (the name is the whole case).
_EVIL_NAMES = {
    "dotdot": "../evil",
    "nested-dotdot": "ab/../../evil",
    "long-name": "ab/" + "e" * 300,
    "long-path": "/".join(["d" * 200] * 6),
    "gnu-long": "ab/" + "g" * 150 + "/../../../gnu-evil",
    "nul-name": "ab/ev\x00il",
    "backslash": "ab\\..\\..\\evil",
    "dot": "./ab/evil",
    "double-slash": "ab//evil",
    "empty-name": "",
    "nonutf8": "ab/\udcff\udcfe",
}


def evil_tar(
    rng: random.Random, files: dict[str, bytes], work: Path, outside: Path
) -> tuple[bytes, str]:
    """The genuine files and one member (or header) that must never be unpacked as is."""
    kind = rng.choice(
        [
            *("symlink", "hardlink", "fifo", "chrdev", "blkdev", "dotdot", "absolute"),
            *("nested-dotdot", "file-and-dir", "dir-then-file", "twice", "long-name"),
            *("long-path", "negative", "huge-size", "pax-dotdot", "pax-absolute", "gnu-long"),
            *("setuid", "nul-name", "backslash", "dot", "double-slash", "empty-name", "gzip"),
            *("not-tar", "empty-tar", "only-evil", "header-field", "sparse", "many", "twice-dir"),
            *("symlink-then-file", "nonutf8"),
        ]
    )
    members = genuine_members(files)
    fmt = tarfile.GNU_FORMAT
    evil = tarfile.TarInfo("ab/evil")
    payload: bytes | None = b"evil"
    if kind == "symlink":
        evil.type, evil.linkname, payload = tarfile.SYMTYPE, str(outside / "target"), None
    elif kind == "symlink-then-file":
        link = tarfile.TarInfo("ab/via")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        members.append((link, None))
        evil.name = "ab/via/evil"
    elif kind == "hardlink":
        evil.type, evil.linkname, payload = tarfile.LNKTYPE, "/etc/passwd", None
    elif kind == "fifo":
        evil.type, payload = tarfile.FIFOTYPE, None
    elif kind in ("chrdev", "blkdev"):
        evil.type = tarfile.CHRTYPE if kind == "chrdev" else tarfile.BLKTYPE
        evil.devmajor, evil.devminor, payload = 1, 5, None
    elif kind in _EVIL_NAMES:
        evil.name = _EVIL_NAMES[kind]
    elif kind == "absolute":
        evil.name = str(work / "abs-evil")
    elif kind == "file-and-dir":
        evil.name = sorted(files)[0] + "/evil"
    elif kind == "dir-then-file":
        d = tarfile.TarInfo("ab/d")
        d.type = tarfile.DIRTYPE
        members.append((d, None))
        evil.name = "ab/d"
    elif kind == "twice":
        evil.name = sorted(files)[0]
    elif kind == "twice-dir":
        d = tarfile.TarInfo("ab")
        d.type = tarfile.DIRTYPE
        members.append((d, None))
        evil.name = "ab/second"
    elif kind == "pax-dotdot":
        fmt = tarfile.PAX_FORMAT
        evil.pax_headers = {"path": "../pax-evil"}
    elif kind == "pax-absolute":
        fmt = tarfile.PAX_FORMAT
        evil.pax_headers = {"path": str(work / "pax-abs-evil")}
    elif kind == "setuid":
        evil.mode = 0o6777
    elif kind == "sparse":
        evil.type = tarfile.GNUTYPE_SPARSE
    elif kind == "many":
        members += [_reg(f"m/{i}", b"") for i in range(rng.choice([300, 1000]))]
    if kind in ("gzip", "not-tar", "empty-tar", "negative", "huge-size", "header-field"):
        base = make_tar(members)
        if kind == "gzip":
            import gzip

            return gzip.compress(base), kind
        if kind == "not-tar":
            return rng.randbytes(rng.choice([0, 10, 512, 5000])), kind
        if kind == "empty-tar":
            return b"\0" * 1024, kind
        data = bytearray(base)
        offsets = [i for i in range(0, len(data) - 511, 512) if data[i + 257 : i + 262] == b"ustar"]
        at = rng.choice(offsets)
        header = data[at : at + 512]
        if kind == "negative":
            header[124:136] = b"\xff" * 12
        elif kind == "huge-size":
            header[124:136] = b"\x80" + b"\0" * 3 + (1 << 62).to_bytes(8, "big")
        else:
            field = rng.choice([(0, 100), (124, 12), (156, 1), (157, 100), (100, 8), (345, 155)])
            start, n = field
            for _ in range(rng.randint(1, 4)):
                header[start + rng.randrange(n)] = rng.choice(
                    [
                        0,
                        0x2F,
                        0x2E,
                        0x31,
                        0x32,
                        0x33,
                        0x34,
                        0x36,
                        0x4C,
                        0x4B,
                        0x53,
                        rng.randrange(256),
                    ]
                )
        _fix_checksum(header)
        data[at : at + 512] = header
        return bytes(data), kind
    if kind == "only-evil":
        members = []
    if payload is not None and evil.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        members.append((evil, payload))
    else:
        members.append((evil, None))
    try:
        return make_tar(members, fmt), kind
    except (ValueError, UnicodeError) as e:  # tarfile cannot even write it
        return make_tar(
            genuine_members(files)
        ) + b"\0" * 512, f"{kind}:unwritable({type(e).__name__})"


def tar_files(data: bytes) -> dict[str, bytes] | None:
    """The regular members of a plain tar (the oracle's own reading), or None if unreadable."""
    try:
        out: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if m.isreg():
                    f = tar.extractfile(m)
                    out[m.name] = f.read() if f is not None else b""
        return out
    except (tarfile.TarError, ValueError, OSError, EOFError):
        return None


# -- the independent checks ----------------------------------------------------------------
def _finite(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def check_verified_entry(
    entry_dir: Path, returned: dict[str, Any], secret: str | None, expect: dict[str, Any]
) -> bytes:
    """What an independent reader finds at ``entry_dir``: Unverified unless it verifies.

    Returns the artifact's bytes (the verified archive).
    """

    def bad(why: str) -> Unverified:
        return Unverified(f"get() returned an entry that does not verify: {why}")

    man_path = entry_dir / entries.MANIFEST
    if not is_regular(man_path) or os.path.islink(entry_dir):
        raise bad("manifest.json is not a regular file (or the entry is a link)")
    raw = man_path.read_bytes()
    try:
        man = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"manifest unreadable ({e})") from None
    if not isinstance(man, dict):
        raise bad("manifest not an object")
    if json.dumps(man, sort_keys=True) != json.dumps(returned, sort_keys=True):
        raise bad("returned manifest differs from the file")
    if secret is not None:
        sig = man.get("signature")
        if not (isinstance(sig, str) and hmac.compare_digest(sig, entries.sign(man, secret))):
            raise bad("HMAC does not match")
    fmt = man.get("format")
    if type(fmt) is not int or fmt != entries.FORMAT:
        raise bad(f"format {fmt!r:.40}")
    if man.get("key") != KEY_OF.get(entry_dir.name, entry_dir.name):
        raise bad("key")
    factors = man.get("factors", {})
    if not isinstance(factors, dict) or any(factors.get(k) != v for k, v in expect.items()):
        raise bad("factors")
    owner = man.get("owner", {})
    if not isinstance(owner, dict) or not (
        owner.get("rank") is None or type(owner.get("rank")) is int
    ):
        raise bad("owner")
    seconds = man.get("compile_seconds", 0)
    if not _finite(seconds) or seconds < 0:
        raise bad("compile_seconds")
    if "created" in man and not _finite(man["created"]):
        raise bad("created")
    if not isinstance(man.get("label", ""), str):
        raise bad("label")
    files = man.get("files")
    if not isinstance(files, dict) or entries.ARTIFACT not in files:
        raise bad("files")
    art = b""
    for name, meta in files.items():
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..", entries.MANIFEST):
            raise bad(f"file name {name!r:.40}")
        p = entry_dir / name
        if not is_regular(p):
            raise bad(f"{name} not a regular file")
        data = p.read_bytes()
        if not isinstance(meta, dict) or meta.get("size") != len(data):
            raise bad(f"{name} size")
        if meta.get("sha256") != hashlib.sha256(data).hexdigest():
            raise bad(f"{name} sha256")
        if name == entries.ARTIFACT:
            art = data
    if secret is None:
        for p in [entry_dir, *(entry_dir / n for n in files)]:
            st = os.lstat(p)
            if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
                raise bad(f"unsigned {p.name} not private")
    return art


#: Entry directory name -> the key its manifest must name (profiles have their own keys).
KEY_OF: dict[str, str] = {}


def check_unpacked(out: Path, archive: bytes, only: dict[str, bytes] | None) -> int:
    """Everything under ``out`` is a plain file or directory of the verified ``archive``
    (and of ``only`` when given: the genuine files), byte for byte; the number of files."""
    members = tar_files(archive)
    if members is None:
        members = {}
    n = 0
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = str(p.relative_to(out))
            if stat.S_ISDIR(st.st_mode):
                if st.st_mode & 0o7022:
                    raise Unverified(f"unpacked directory {rel} has mode {st.st_mode:o}")
                continue
            if not stat.S_ISREG(st.st_mode):
                raise Unverified(f"unpacked {rel} is not a regular file ({st.st_mode:o})")
            if st.st_mode & 0o7022:
                raise Unverified(f"unpacked {rel} has mode {st.st_mode:o}")
            data = p.read_bytes()
            if members.get(rel) != data:
                raise Unverified(f"unpacked {rel} is not what the verified archive holds")
            if only is not None and only.get(rel) != data:
                raise Unverified(f"unpacked {rel} was never published")
            n += 1
    return n


def check_nothing_outside(work: Path, allowed: set[str]) -> None:
    """Nothing was written into ``work`` beside the case's own directories."""
    extra = sorted(p.name for p in work.iterdir() if p.name not in allowed)
    if extra:
        raise Unverified(f"written outside the destination: {extra}")


# -- templates (built once per process) ----------------------------------------------------
class Templates:
    """Genuine entries, artifact files, profiles and store payloads to mutate."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.expect = key.version_factors()
        self.entry: dict[str | None, tuple[bytes, bytes]] = {}
        for secret in (None, SECRET):
            self.entry[secret] = self._publish(secret, KEY, GENUINE)
        import torch  # noqa: F401  (the artifact's dropped guards name torch's functions)

        from dynamo_dist.cache import artifact

        self.artifact_mod = artifact
        self.f_globals = _artifact_globals()
        self.artifact = encode(_artifact_header(artifact), b"serialized artifact " * 8)
        self.artifact_failed = encode(
            {"failed": "graph_break", "detail": "Unsupported: x", "label": "f (fuzz.py:1)"}
        )
        self.job, self.group = "fuzz-job", "world"
        self.pickle = pickle.dumps(small_state())
        self.profile_key = profile_store._key(self.job, self.group, 1)
        self.profile_key2 = profile_store._key(self.job, self.group, 2)
        KEY_OF[self.profile_key] = self.profile_key
        KEY_OF[self.profile_key2] = self.profile_key2
        self.profile: dict[str | None, tuple[bytes, bytes]] = {}
        for secret in (None, SECRET):
            self.profile[secret] = self._publish(
                secret, self.profile_key, None, self.pickle, profile=True
            )

    def _publish(
        self,
        secret: str | None,
        k: str,
        files: dict[str, bytes] | None,
        pkl: bytes = b"",
        profile: bool = False,
    ) -> tuple[bytes, bytes]:
        root = self.base / f"tpl-{len(list(self.base.iterdir()))}"
        store = DiskStore(root / "c", secret)
        store.check_usable()
        manifest = {
            "factors": self.expect,
            "owner": {"rank": 0, "host": "h", "pid": 1, "job": ""},
            "label": "f (fuzz.py:1)",
            "compile_seconds": 2.5,
            "created": 1.7e9,
        }
        if profile:
            manifest["factors"] = {**self.expect, "profile": self.job, "group": self.group}
            assert store.put(k, _fixed_member(profile_store.PROFILE_FILE, pkl), manifest) > 0
        else:
            room = root / "room"
            for name, data in (files or {}).items():
                (room / name).parent.mkdir(parents=True, exist_ok=True)
                (room / name).write_bytes(data)
                os.utime(room / name, (FIXED_TIME, FIXED_TIME))  # the tar holds mtimes
            ROOMS.record_room(room)
            assert store.put(k, ROOMS.members(room), manifest) > 0
        d = store.entry_dir(k)
        return (d / entries.MANIFEST).read_bytes(), (d / entries.ARTIFACT).read_bytes()


#: Every time a template holds (tar mtimes, a status record's clock): the same bytes in
#: every run, so a case's byte-level mutation means the same thing in every run.
FIXED_TIME = 1_700_000_000.0


def _fixed_member(name: str, data: bytes) -> Iterator[Any]:
    """``rooms.bytes_member`` with a fixed mtime."""
    for member in bytes_member(name, data):
        os.utime(member[1], (FIXED_TIME, FIXED_TIME))
        yield name, member[1], os.fstat(member[1])


def small_state() -> dict[Any, Any]:
    from torch._dynamo.pgo import CodeId, CodeState, FrameStateSizeEntry

    out: dict[Any, Any] = {}
    for i in (1, 2):
        entries_ = defaultdict(
            FrameStateSizeEntry, {"L['x']": FrameStateSizeEntry(size=(4, 3), stride=(3, 1))}
        )
        out[CodeId("f.py", i, "f", "0" * 16)] = CodeState(automatic_dynamic=entries_)
    return out


def _artifact_globals() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    return {"torch": torch, "F": F, "__name__": "fuzz_model"}


_SOURCE_LINES = (1, 12)


def _artifact_header(artifact: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from dynamo_dist.dynamo import artifacts, compat

    here = sys.modules[__name__]
    first, last = _SOURCE_LINES
    dropped = [
        ("G['F'].gelu", "FUNCTION_MATCH", artifact.identity(F.gelu)),
        ("G['torch'].nn.functional.relu", "ID_MATCH", artifact.identity(torch.nn.functional.relu)),
        (
            "G['__import_torch_dot_nn_dot_functional'].silu",
            "FUNCTION_MATCH",
            artifact.identity(F.silu),
        ),
    ]
    return {
        "label": "f (fuzz.py:1)",
        "isa": ["avx2"],
        "torch": compat.torch_version(),
        "sources": [[here.__name__, first, last, artifacts.hash_sourcelines(here, first, last)]],
        "dropped": [[n, t, list(i)] for n, t, i in dropped],
    }


_templates: Templates | None = None
_template_dir: Path | None = None


def templates() -> Templates:
    global _templates, _template_dir
    if _templates is None:
        import tempfile

        _template_dir = Path(tempfile.mkdtemp(prefix="dd-fuzz-templates-"))
        os.chmod(_template_dir, 0o700)
        _templates = Templates(_template_dir)
    return _templates


def cleanup_templates() -> None:
    global _templates, _template_dir
    if _template_dir is not None:
        clear(_template_dir)
    _templates = _template_dir = None


# -- entries: placing, mutating, re-signing ------------------------------------------------
def place_entry(root: Path, secret: str | None, k: str, manifest: bytes, art: bytes) -> Path:
    """An entry as ``DiskStore.put`` leaves it (written directly: no fsync, no tar)."""
    d = root / "entries" / entries.namespace(secret) / k[:2] / k
    d.mkdir(parents=True, mode=0o755)
    for p in [root, *d.relative_to(root).parents, d.relative_to(root)]:
        os.chmod(root / p, 0o755)
    (d / entries.MANIFEST).write_bytes(manifest)
    (d / entries.ARTIFACT).write_bytes(art)
    os.chmod(d / entries.MANIFEST, 0o644)
    os.chmod(d / entries.ARTIFACT, 0o644)
    return d


_MANIFEST_KEYS = [
    "format",
    "key",
    "factors",
    "owner",
    "label",
    "compile_seconds",
    "created",
    "files",
    "signature",
    "size",
    "sha256",
]


def mutate_manifest(rng: random.Random, d: Path, t: Templates) -> str:
    path = d / entries.MANIFEST
    if not is_regular(path):
        return "manifest:skipped"
    raw = path.read_bytes()
    op = rng.choice(["doc"] * 5 + ["raw", "version", "files", "key", "size"])
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if op == "raw" or not isinstance(doc, dict):
        data, what = mutate_raw(rng, raw)
    elif op == "version":
        which = rng.choice(["format", "factors", "torch"])
        if which == "format":
            doc["format"] = rng.choice([0, 2, 1.0, "1", True, 10**30])
        elif which == "factors":
            f = doc.get("factors")
            doc["factors"] = {**(f if isinstance(f, dict) else {}), "torch": "0.0.1"}
        else:
            f = doc.get("factors")
            if isinstance(f, dict) and f:
                f.pop(rng.choice(sorted(f)))
        data, what = json.dumps(doc).encode(), f"version:{which}"
    elif op == "files":
        files = doc.get("files")
        name = rng.choice(
            [
                "../../etc/shadow",
                "/etc/shadow",
                "a/b",
                ".",
                "..",
                "manifest.json",
                "x" * 200,
                "ok.bin",
                "",
            ]
        )
        if isinstance(files, dict):
            files[name] = {"sha256": "0" * 64, "size": rng.choice([0, 10**12, -1])}
        data, what = json.dumps(doc).encode(), f"files:{name[:20]}"
    elif op == "key":
        doc["key"] = rng.choice(["ab" + "0" * 38, "", "../" + KEY, KEY.upper()])
        data, what = json.dumps(doc).encode(), "key"
    elif op == "size":
        files = doc.get("files")
        meta = files.get(entries.ARTIFACT) if isinstance(files, dict) else None
        if isinstance(meta, dict):
            was = meta.get("size")
            grown = was + 1 if isinstance(was, int) else 1
            meta["size"] = rng.choice([0, 1, 2**63, 2**64 + 5, -5, 1 << 40, grown])
        data, what = json.dumps(doc).encode(), "size"
    else:
        data, what = mutate_doc(rng, doc, _MANIFEST_KEYS)
    os.unlink(path)
    path.write_bytes(data)
    return f"manifest:{what}"


def mutate_entry(
    rng: random.Random, d: Path, t: Templates, work: Path, outside: Path, files: dict[str, bytes]
) -> str:
    target = rng.choice(["manifest"] * 4 + ["artifact"] * 4 + ["type", "dir", "extra"])
    if not d.is_dir() or d.is_symlink():
        return f"{target}:skipped"
    if target == "manifest":
        return mutate_manifest(rng, d, t)
    art = d / entries.ARTIFACT
    if target == "artifact":
        if rng.random() < 0.5:
            data, kind = evil_tar(rng, files, work, outside)
            replace_file(art, data)
            return f"artifact:evil:{kind}"
        if not is_regular(art):
            return "artifact:skipped"
        data, what = mutate_raw(rng, art.read_bytes(), cap=1 << 16)
        art.write_bytes(data)  # in place, as a corrupting writer would
        return f"artifact:{what}"
    if target == "type":
        which = rng.choice([entries.MANIFEST, entries.ARTIFACT])
        return f"type:{which}:{mutate_type(rng, d / which, outside)}"
    if target == "extra":
        name = rng.choice(["extra.bin", "REFUSED", "..tmp", ".hidden"])
        (d / name).write_bytes(b"planted")
        return f"extra:{name}"
    return f"dir:{mutate_type(rng, d, outside)}"


def resign(rng: random.Random, d: Path, secret: str) -> str:
    """Declare the artifact as it now is and sign the manifest with the real secret."""
    man_path, art = d / entries.MANIFEST, d / entries.ARTIFACT
    if not is_regular(man_path):
        return "resign:skipped"
    try:
        man = json.loads(man_path.read_bytes())
    except (ValueError, RecursionError):
        return "resign:skipped(not json)"
    if not isinstance(man, dict):
        return "resign:skipped(not an object)"
    if is_regular(art) and rng.random() < 0.9:
        data = art.read_bytes()
        files = man.get("files")
        if not isinstance(files, dict):
            files = man["files"] = {} if rng.random() < 0.5 else files
        if isinstance(files, dict):
            files[entries.ARTIFACT] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
    man.pop("signature", None)
    try:
        man["signature"] = entries.sign(man, secret)
        text = json.dumps(man).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError, TypeError) as e:
        return f"resign:skipped({type(e).__name__})"
    os.unlink(man_path)
    man_path.write_bytes(text)
    return "resigned"


def read_and_unpack(
    store: DiskStore,
    k: str,
    out: Path,
    secret: str | None,
    t: Templates,
    genuine_only: dict[str, bytes] | None,
) -> Outcome:
    """``DiskStore.get`` then ``extract``, each checked; the outcome."""
    try:
        entry = store.get(k, expect=t.expect)
    except EntryRefused as e:
        return refused(f"get: {type(e).__name__}")
    except EntryUnavailable as e:  # get() documents None for these; a leak is a crash
        raise Crash(f"get() raised EntryUnavailable ({e})") from None
    if entry is None:
        return handled("get: miss")
    art = check_verified_entry(entry.path, entry.manifest, secret, t.expect)
    try:
        extract(entry, out)
    except (EntryRefused, EntryUnavailable) as e:
        check_unpacked(out, art, genuine_only) if out.exists() else 0
        return (
            refused(f"extract: {type(e).__name__}")
            if isinstance(e, EntryRefused)
            else handled("extract: unavailable")
        )
    n = check_unpacked(out, art, genuine_only)
    return handled(f"loaded {n} files")


# -- target: entry -------------------------------------------------------------------------
def case_entry(rng: random.Random, work: Path, resigned: bool, log: list[str]) -> Outcome:
    t = templates()
    secret = SECRET if resigned or rng.random() < 0.5 else None
    log.append(f"secret={'yes' if secret else 'no'}")
    root, outside, out = work / "root", work / "outside", work / "out"
    outside.mkdir()
    d = place_entry(root, secret, KEY, *t.entry[secret])
    for _ in range(rng.choice([1, 1, 2, 3])):
        log.append(mutate_entry(rng, d, t, work, outside, GENUINE))
    if resigned:
        assert secret is not None
        log.append(resign(rng, d, secret))
    # Signed and not re-signed: whatever loads must be the genuine files.
    only = GENUINE if not resigned and secret is not None else None
    result = read_and_unpack(DiskStore(root, secret), KEY, out, secret, t, only)
    check_nothing_outside(work, {"root", "outside", "out"})
    return result


# -- target: artifact ----------------------------------------------------------------------
_ARTIFACT_KEYS = ["label", "isa", "torch", "sources", "dropped", "failed", "detail"]


def mutate_artifact_bytes(rng: random.Random, data: bytes, t: Templates) -> tuple[bytes, str]:
    magic, n_at = b"DDPC1\n", 6
    n = int.from_bytes(data[n_at : n_at + 8], "little")
    head, blob = data[n_at + 8 : n_at + 8 + n], data[n_at + 8 + n :]
    op = rng.choice(["header"] * 6 + ["magic", "length", "blob", "raw", "guard", "source", "torch"])
    if op == "magic":
        new = rng.choice([b"DDPC2\n", b"DDPC0\n", b"", b"ddpc1\n", b"DDPC1"])
        return new + data[len(magic) :], "magic"
    if op == "length":
        k = rng.choice([0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1, 2**32])
        return magic + k.to_bytes(8, "little") + head + blob, f"length:{k}"
    if op == "blob":
        b, what = mutate_raw(rng, blob)
        return magic + n.to_bytes(8, "little") + head + b, f"blob:{what}"
    if op == "raw":
        return mutate_raw(rng, data)
    try:
        header = json.loads(head)
        if not data.startswith(magic) or not isinstance(header, dict):
            raise ValueError("not an artifact file any more")
    except (ValueError, RecursionError):  # mutated before: bytes only from here on
        return mutate_raw(rng, data)
    dropped = header.get("dropped")
    if (
        op == "guard"
        and isinstance(dropped, list)
        and dropped
        and all(isinstance(r, list) and len(r) == 3 for r in dropped)
    ):
        rec = rng.choice(dropped)
        rec[0] = rng.choice(
            [
                "G['os'].system",
                "G['torch'].__class__.__subclasses__",
                "G['__import_os'].system",
                "G['__import_subprocess'].run",
                "G['__builtins_dict__']['eval']",
                "G['torch']" + ".nn" * 2000,
                "G['torch'][" + "9" * 5000 + "]",
                "G['torch'].nn.functional.gelu; import os",
                "G[__import__('os')]",
                "G['" + "\\'" * 20000 + "']",
                "G['torch'].nn.functional.tanh",
                "G['__import_torch_dot_nonexistent_dot_mod'].x",
                "G['F'].gelu",
                "",
            ]
        )
        if rng.random() < 0.3:
            rec[2] = rng.choice(
                [[], ["function", "torch.nn.functional", "tanh", ""], "x", [[]], [1e308]]
            )
        return encode(header, blob), f"guard:{rec[0][:30]!r}"
    sources = header.get("sources")
    if (
        op == "source"
        and isinstance(sources, list)
        and sources
        and isinstance(sources[0], list)
        and len(sources[0]) == 4
    ):
        src = sources[0]
        i = rng.randrange(4)
        src[i] = rng.choice(
            ["os", "builtins", "nonexistent.module", -1, 0, 10**9, 1e300, "x", None, [], src[i]]
        )
        return encode(header, blob), f"source[{i}]"
    if op == "torch":
        header["torch"] = rng.choice(["1.0", "", None, 2.9, f"{header.get('torch')}+x"])
        return encode(header, blob), "torch"
    raw, what = mutate_doc(rng, header, _ARTIFACT_KEYS)
    return magic + len(raw).to_bytes(8, "little") + raw + blob, f"header:{what}"


def header_ok(data: bytes, t: Templates) -> bool:
    """The oracle: an artifact whose header every check before deserialization accepts."""
    from dynamo_dist.dynamo import artifacts, compat

    art = t.artifact_mod
    try:
        if not data.startswith(b"DDPC1\n") or len(data) < 14:
            return False
        n = int.from_bytes(data[6:14], "little")
        if n > len(data) - 14:
            return False
        header = json.loads(data[14 : 14 + n])
        if not isinstance(header, dict) or header.get("failed") is not None:
            return False
        if header.get("torch") != compat.torch_version():
            return False
        for m, a, b, c in header["sources"]:
            mod = sys.modules.get(str(m))
            if mod is None or artifacts.hash_sourcelines(mod, int(a), int(b)) != str(c):
                return False
        for name, _, ident in header["dropped"]:
            obj = art._resolve(str(name), t.f_globals)
            ident = tuple(str(x) for x in ident)
            if ident and art.identity(obj) != ident:
                return False
        return True
    except Exception:
        return False


def case_artifact(rng: random.Random, work: Path, resigned: bool, log: list[str]) -> Outcome:
    t = templates()
    local, outside = work / "local", work / "outside"
    local.mkdir(mode=0o700)
    outside.mkdir()
    genuine = t.artifact if rng.random() < 0.85 else t.artifact_failed
    data = genuine
    for _ in range(rng.choice([1, 1, 2])):
        data, what = mutate_artifact_bytes(rng, data, t)
        log.append(what)
    name = f"{KEY}.bin"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(local)
    if resigned:
        # Carried in a signed entry, as a leader publishes it, re-signed around the
        # mutated bytes: the entry verifies, unpacks and installs; only load() is left.
        from dynamo_dist.cache.install import merge_into

        files = {**GENUINE, f"{ARTIFACT_DIR}/{name}": data}
        root = work / "root"
        d = place_entry(root, SECRET, KEY, t.entry[SECRET][0], make_tar(genuine_members(files)))
        log.append(resign(random.Random(0), d, SECRET))
        staging = work / "staging"
        got = read_and_unpack(DiskStore(root, SECRET), KEY, staging, SECRET, t, files)
        if got.detail != f"loaded {len(files)} files":
            raise RuntimeError(f"harness: the re-signed carrier entry did not load: {got}")
        merge_into(staging, local)
    else:
        where = local / ARTIFACT_DIR
        where.mkdir(mode=0o700)
        (where / name).write_bytes(data)
        os.chmod(where / name, 0o600)
        if rng.random() < 0.25:
            log.append(mutate_type(rng, where / name, outside))
        elif rng.random() < 0.05:
            with open(where / name, "r+b") as fh:  # larger than any artifact (sparse)
                fh.truncate((1 << 30) + 1)
            log.append("huge")
    try:
        stored = read_stored(name)
    except OSError as e:  # precompiled._obtain: the route falls back (package_error)
        return refused(f"read_stored: {type(e).__name__}: {e.strerror or e}")
    if stored is None:
        return handled("read_stored: none")
    calls: list[bytes] = []

    def deserialize(blob: bytes, f_globals: dict[str, Any], isa: Any) -> Any:
        calls.append(blob)
        return object()

    _canary_hits.clear()
    with patched(t.artifact_mod.artifacts, "aot_deserialize", deserialize):
        loaded, failed = t.artifact_mod.load(stored, dict(t.f_globals))
    if _canary_hits:
        raise Unverified(f"the canary was resolved: {_canary_hits}")
    if loaded is not None:
        if not calls or not header_ok(stored, t):
            raise Unverified("load() used an artifact whose header fails the checks")
        return handled("loaded")
    if calls:
        return refused(f"load: deserialize: {failed and failed.reason}")
    if failed is None:
        raise Crash("load() returned neither an artifact nor a reason")
    return refused(f"load: {failed.reason}")


# -- target: hostcopy ----------------------------------------------------------------------
def case_hostcopy(rng: random.Random, work: Path, resigned: bool, log: list[str]) -> Outcome:
    t = templates()
    secret = SECRET if resigned or rng.random() < 0.5 else None
    local, outside, staging = work / "local", work / "outside", work / "staging"
    local.mkdir(mode=0o700)
    outside.mkdir()
    counts = CacheStats()
    shared = DiskStore(work / "shared", secret)
    if not resigned and rng.random() < 0.15:
        # The host directory itself: planted, replaced, shared.
        host_copy_dir(local)
        hosts = local / "dynamo_dist" / "hosts"
        victim = rng.choice(
            [hosts, hosts / fanout.host_tag(), hosts / fanout.host_tag() / fanout.run_tag()]
        )
        log.append(f"hostdir:{victim.name[:8]}:{mutate_type(rng, victim, outside)}")
        with patched(fanout, "private_local_dir", lambda: local):
            copies = HostCopies(str(shared.root), shared, True)
            try:
                got = copies.store()
            except Exception as e:
                raise Crash(f"HostCopies.store raised {type(e).__name__}: {e}") from e
        check_nothing_outside(work, {"local", "outside"})
        if got is None:
            return refused("no private host directory")
        if not str(got.root).startswith(str(local)):
            raise Unverified(f"host copies kept outside the local cache: {got.root}")
        return handled("host directory usable")
    host = DiskStore(host_copy_dir(local), secret)
    d = place_entry(host.root, secret, KEY, *t.entry[secret])
    os.chmod(host.root, 0o700)
    for _ in range(rng.choice([1, 1, 2, 3])):
        log.append(mutate_entry(rng, d, t, work, outside, GENUINE))
    if resigned:
        assert secret is not None
        log.append(resign(rng, d, secret))
    turn = Turn(0, counts, Agreement(1.0, False), 1, None)
    site = HostSite(host, KEY, "f (fuzz.py:1)", turn, counts)
    try:
        found = site.look()
    except Exception as e:
        raise Crash(f"HostSite.look raised {type(e).__name__}: {e}") from e
    check_nothing_outside(work, {"local", "outside"})
    if found is None or found == (None, None):
        if counts.cache_refused:
            return refused("host copy refused")
        return handled("host copy: miss")
    role, entry = found
    if role != "load" or entry is None:
        raise Crash(f"unexpected look() result {found!r:.80}")
    art = check_verified_entry(entry.path, entry.manifest, secret, t.expect)
    only = GENUINE if not resigned and secret is not None else None
    try:
        extract(entry, staging)  # as follow.stage unpacks it
    except EntryRefused:
        check_unpacked(staging, art, only) if staging.exists() else 0
        return refused("host copy: extract refused")
    except EntryUnavailable:
        return handled("host copy: unavailable")
    n = check_unpacked(staging, art, only)
    check_nothing_outside(work, {"local", "outside", "staging"})
    return handled(f"host copy loaded {n} files")


# -- target: profile -----------------------------------------------------------------------
def evil_pickle(rng: random.Random, t: Templates) -> tuple[bytes, str]:
    """A code state pickle that is forged, malformed or too costly to build."""
    from torch._dynamo.pgo import CodeId, CodeState, FrameStateSizeEntry

    kind = rng.choice(
        [
            *("canary-key", "canary-value", "canary-entry", "set", "bytes", "proto0", "proto5"),
            *("deep-tuple", "deep-list", "memo-bomb", "doubling", "wide", "bad-codeid", "bad-size"),
            *("flip", "truncate", "append", "huge-unicode", "huge-memo", "not-dict", "dup-key"),
            *("int-keys", "none-state", "persistent-id", "global-os"),
        ]
    )
    state = small_state()
    if kind in ("flip", "truncate", "append"):
        return mutate_raw(rng, t.pickle)[0], kind
    if kind == "canary-key":
        state[_Evil()] = next(iter(state.values()))
    elif kind == "canary-value":
        state[next(iter(state))] = _Evil()
    elif kind == "canary-entry":
        next(iter(state.values())).automatic_dynamic["L['x']"] = _Evil()
    elif kind == "set":
        next(iter(state.values())).automatic_dynamic["L['x']"].size = {1, 2}
    elif kind == "bytes":
        next(iter(state.values())).automatic_dynamic["L['x']"].size = (b"x" * 100,)
    elif kind == "proto0":
        return pickle.dumps(state, protocol=0), kind
    elif kind == "proto5":
        return pickle.dumps(state, protocol=5), kind
    elif kind == "deep-tuple":
        n = rng.choice([1000, 50_000])
        return b"\x80\x02" + b"(" * n + b"t" * n + b".", kind  # MARK ... TUPLE, nested
    elif kind == "deep-list":
        n = rng.choice([1000, 50_000])
        return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".", kind
    elif kind == "memo-bomb":
        shared = tuple(range(1000))
        state = {
            CodeId("f.py", i, "f", "0"): CodeState(
                automatic_dynamic={"L['x']": FrameStateSizeEntry(size=shared)}
            )
            for i in range(200)
        }
    elif kind == "doubling":
        x: Any = (1, 2)
        for _ in range(60):
            x = (x, x)
        next(iter(state.values())).automatic_dynamic["L['x']"].size = x
    elif kind == "wide":
        next(iter(state.values())).automatic_dynamic["L['x']"].size = tuple(
            range(rng.choice([1000, 60_000]))
        )
    elif kind == "bad-codeid":
        junk = rng.choice([None, -1, 10**40, "x" * 100_000, (1, 2), 1.5, float("inf")])
        f = rng.choice(["filename", "firstlineno", "name", "file_hash"])
        cid = CodeId("f.py", 1, "f", "0" * 16)
        object.__setattr__(cid, f, junk)  # CodeId may be a frozen dataclass
        state = {cid: next(iter(state.values()))}
        kind += f":{f}"
    elif kind == "bad-size":
        e = next(iter(state.values())).automatic_dynamic["L['x']"]
        e.size = rng.choice([None, "x", 5, (None, "x"), (10**40,), (-1,), (1.5,), ((1,),), [4, 3]])
        e.stride = rng.choice([e.stride, "x", (1e400,)])
    elif kind == "huge-unicode":
        return b"\x80\x04X\xff\xff\xff\xffabc.", kind
    elif kind == "huge-memo":
        return b"\x80\x04}r\xff\xff\xff\x7f.", kind  # LONG_BINPUT at 2**31 - 1
    elif kind == "not-dict":
        return pickle.dumps(rng.choice([[1, 2], "x", None, 5, (state,)])), kind
    elif kind == "dup-key":
        # The state's items set twice (SETITEMS again, after the PROTO header is dropped).
        data = pickle.dumps(state, protocol=2)
        return data[:-1] + data[2:-1] + b".", kind
    elif kind == "int-keys":
        state = {k * (2**61 - 1): v for k, v in zip(range(1, 3), state.values(), strict=False)}
    elif kind == "none-state":
        next(iter(state.values())).automatic_dynamic = None  # type: ignore[assignment]
    elif kind == "persistent-id":
        return b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00P0\n.", kind
    elif kind == "global-os":
        return b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.", kind
    try:
        return pickle.dumps(state), kind
    except Exception as e:  # cannot even be written (a lambda, a recursion)
        return t.pickle + b"junk", f"{kind}:unpicklable({type(e).__name__})"


def case_profile(rng: random.Random, work: Path, resigned: bool, log: list[str]) -> Outcome:
    from dynamo_dist.dynamo import pgo, pgo_pickle

    t = templates()
    secret = SECRET if resigned or rng.random() < 0.5 else None
    root, local, outside = work / "root", work / "local", work / "outside"
    local.mkdir(mode=0o700)
    outside.mkdir()
    manifest, art = t.profile[secret]
    newer = rng.random() < 0.2  # a genuine generation 1 and a mutated generation 2
    k = t.profile_key2 if newer else t.profile_key
    if newer:
        place_entry(root, secret, t.profile_key, manifest, art)
        man = json.loads(manifest)
        man["key"] = k
        man.pop("signature", None)
        if secret:
            man["signature"] = entries.sign(man, secret)
        manifest = json.dumps(man).encode()
    d = place_entry(root, secret, k, manifest, art)
    pkl_files = {profile_store.PROFILE_FILE: t.pickle}
    if resigned or rng.random() < 0.5:
        data, kind = evil_pickle(rng, t)
        log.append(f"pickle:{kind}")
        pkl_files = {profile_store.PROFILE_FILE: data}
        members = genuine_members(pkl_files)
        if rng.random() < 0.1:
            members = rng.choice([[], genuine_members({"other.pkl": data}), members + members])
            log.append("members")
        replace_file(d / entries.ARTIFACT, make_tar(members))
    if not resigned or rng.random() < 0.3:
        for _ in range(rng.choice([0, 1, 1, 2]) if resigned else rng.choice([1, 2])):
            log.append(mutate_entry(rng, d, t, work, outside, pkl_files))
    if resigned:
        assert secret is not None
        log.append(resign(rng, d, secret))
    counts = CacheStats()
    cache = types.SimpleNamespace(
        enabled=True, store=DiskStore(root, secret), counts=counts, root=str(root)
    )
    profile = profile_store.GroupProfile(t.job, t.group, True)
    _canary_hits.clear()
    with patched(profile_store, "private_local_dir", lambda: local):
        try:
            found = profile_store.read_newest(cache, profile)  # type: ignore[arg-type]
        except Exception as e:
            raise Crash(f"read_newest raised {type(e).__name__}: {e}") from e
    if _canary_hits:
        raise Unverified(f"the canary was resolved: {_canary_hits}")
    check_nothing_outside(work, {"root", "local", "outside"})
    if found is None:
        if counts.cache_refused:
            return refused("profile refused")
        return handled("profile: none")
    generation, data = found
    got_key = t.profile_key if generation == 1 else k
    entry_dir = root / "entries" / entries.namespace(secret) / got_key[:2] / got_key
    verified = check_verified_entry(
        entry_dir, json.loads((entry_dir / entries.MANIFEST).read_bytes()), secret, {}
    )
    if tar_files(verified) is None or tar_files(verified).get(profile_store.PROFILE_FILE) != data:  # type: ignore[union-attr]
        raise Unverified("read_newest returned bytes the verified entry does not hold")
    try:
        pgo.dynamic_marks(pgo_pickle.loads(data))
    except Exception as e:
        raise Unverified(f"read_newest returned a profile that does not load ({e})") from None
    if _canary_hits:
        raise Unverified(f"the canary was resolved: {_canary_hits}")
    return handled(f"profile {generation} loaded" + (" (genuine)" if data == t.pickle else ""))


# -- target: store -------------------------------------------------------------------------
class FakeStore:
    """The job's store as a dict: what ``get`` returns is what a forger ``set``."""

    def __init__(self) -> None:
        self.d: dict[str, Any] = {}

    def set(self, k: str, v: Any) -> None:
        self.d[k] = v if not isinstance(v, str) else v.encode()

    def get(self, k: str) -> Any:
        return self.d[k]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.d for k in keys)

    def multi_get(self, keys: list[str]) -> list[Any]:
        return [self.d[k] for k in keys]

    def add(self, k: str, n: int) -> int:
        v = int(self.d.get(k, b"0")) + n
        self.d[k] = str(v).encode()
        return v

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        if not self.check(keys):
            raise RuntimeError("wait timed out")

    def set_timeout(self, t: Any) -> None:
        pass


STORE_KINDS = ("status", "agreement", "profile", "view", "report", "setup")
SIGNED_KINDS = ("profile", "view")


def _genuine_payload(kind: str, t: Templates) -> bytes:
    if kind == "status":
        return json.dumps(
            {
                "seq": 3, "frame": "f (m.py:1)", "group": "world",
                "channels": {"world": {"seq": 3, "frame": "f (m.py:1)", "epoch": 7}},
                "local": False, "state": "running", "host": "h", "pid": 11, "time": FIXED_TIME,
            }
        ).encode()  # fmt: skip
    if kind == "agreement":
        return b"2"
    if kind == "profile":
        return (1).to_bytes(4, "big") + t.pickle
    if kind == "view":
        return (1).to_bytes(4, "big") + t.pickle
    if kind == "report":
        return json.dumps(
            {
                "rank": 1, "exchanges": 10, "evaluations": 10, "local_misses": 1,
                "compiles": 2, "p50_us": 12.5, "transport": "tcp", "cache_loads": 1,
                "precompiled_fallbacks": {"graph_break": 1},
                "groups": {"world": {"exchanges": 10, "transport": "tcp", "compiles": 2},
                           "ranks 0,1": {"exchanges": 3, "transport": "shm"}},
            }
        ).encode()  # fmt: skip
    return json.dumps({"ranks": [0, 1], "state": "waiting", "where": "m.py:3"}).encode()


def mutate_payload(rng: random.Random, kind: str, raw: bytes, t: Templates) -> tuple[Any, str]:
    """A forged value for ``kind``: the bytes (or another type) a reader may get."""
    op = rng.choice(
        ["doc"] * 5
        + ["raw", "raw", "type", "over-cap"]
        + (["pickle"] * 4 if kind in SIGNED_KINDS else [])
    )
    if op == "type":
        return rng.choice(["a str", 5, None, memoryview(raw), bytearray(raw), [raw]]), "type"
    if op == "over-cap":
        return raw + b" " * (dist_store.MAX_STORE_PAYLOAD_BYTES + 1 - len(raw)), "over-cap"
    if op == "raw":
        return mutate_raw(rng, raw)
    if op == "pickle":
        data, what = evil_pickle(rng, t)
        prefix = rng.choice(
            [raw[:4], (0).to_bytes(4, "big"), (7).to_bytes(4, "big"), b"\xff" * 4, b""]
        )
        return prefix + data, f"pickle:{what}"
    if kind in SIGNED_KINDS:
        return mutate_raw(rng, raw)
    if kind == "agreement":
        return rng.choice(
            [
                b"-1",
                b"1e400",
                b"9" * 5000,
                b"x",
                b"",
                b" 2 ",
                b"2\x00",
                b"0x2",
                str(_NO).encode(),
                b"1_0",
                b"\xff",
                "٣".encode(),
            ]
        ), "verdict"
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # mutated before: bytes only from here on
        return mutate_raw(rng, raw)
    return mutate_doc(
        rng,
        doc,
        [
            "seq",
            "frame",
            "group",
            "channels",
            "time",
            "state",
            "local",
            "pid",
            "host",
            "groups",
            "ranks",
            "where",
            "error",
            "exchanges",
            "transport",
        ],
    )


def _read_status(raw: Any) -> Outcome:
    from dynamo_dist.exchange import status, watch

    rec = status._parse(raw)
    if not isinstance(rec, dict):
        raise Crash(f"_parse returned a {type(rec).__name__}")
    board = {0: {}, 1: rec}
    status.describe_missing(board, "world", 3, 10.0)
    status.describe_missing(board, "ranks 0,1", 1, 10.0)
    watch.Stale(1, 12.0, rec).describe()
    # What the stall warning reads of a record (collective.warn_stall).
    now = time.time()
    _ = (
        rec.get("state", "running") == "running"
        and rec.get("channels") is not None
        and now - float(rec.get("time", now)) <= 10.0
        and bool(rec.get("local"))
    )
    if "error" in rec:
        return refused("status: unusable record")
    return handled("status: record")


def _read_agreement(raw: Any, log: list[str]) -> Outcome:
    store = FakeStore()
    group = GroupInfo("world", "w", 2, None, (0, 1))
    agreement = Agreement(1.0, True)
    agreement._store_client, agreement._store_opened = store, True
    base = agreement._base(1, group)
    store.d[f"{base}/n"] = b"1"  # the other rank said ok
    store.d[f"{base}/all"] = raw  # ...and a forger set the verdict
    # This rank's report completes the count and posts the verdict: set it back.
    real_set = store.set

    def set_(k: str, v: Any) -> None:
        if k != f"{base}/all":
            real_set(k, v)

    store.set = set_  # type: ignore[method-assign]
    before = dist_store.refused_count()
    ok = agreement.agree(KEY, 1, True, group)
    if not isinstance(ok, bool):
        raise Crash(f"agree returned {ok!r:.40}")
    try:
        truth = (
            isinstance(raw, bytes | bytearray | memoryview)
            and len(bytes(raw)) <= dist_store.MAX_STORE_PAYLOAD_BYTES
            and int(bytes(raw)) < _NO
        )
    except ValueError:
        truth = False
    if ok and not truth:
        raise Unverified(f"agreement counted {raw!r:.40} as every rank saying yes")
    if ok:
        return handled("agreement: yes")
    return (
        refused("agreement: no")
        if dist_store.refused_count() > before or not truth
        else handled("agreement: no")
    )


def _profiles(t: Templates) -> Any:
    from dynamo_dist.cache.profile import Profiles

    counts = CacheStats()
    cache = types.SimpleNamespace(
        counts=counts,
        timeout=1.0,
        root="fuzz",
        agreement=types.SimpleNamespace(drop_client=lambda: None),
    )
    return Profiles(cache), counts  # type: ignore[arg-type]


def _read_profile(raw: Any, name: str, secret: str | None, t: Templates) -> Outcome:
    from dynamo_dist.dynamo import pgo, pgo_pickle

    profiles, counts = _profiles(t)
    store = FakeStore()
    store.d[name] = raw
    profile = profile_store.GroupProfile(t.job, t.group, False)
    profile.store, profile.base, profile.ranks = store, name, (0, 1)
    group = GroupInfo("world", "w", 2, None, (0, 1))
    with (
        patched(cache_secret, "_secret", secret),
        patched(cache_secret, "_error", None),
        patched(cache_secret, "_from_file", True),
    ):
        found = profiles._share(group, profile, None)
    if found is None:
        return (
            refused("profile payload refused")
            if counts.store_payloads_refused
            else handled("profile: none")
        )
    _, data = found
    # Profiles.load: the bytes came from the store, so a failure is a counted refusal.
    try:
        state = pgo_pickle.loads(data)
        pgo.dynamic_marks(state)
    except ValueError:
        return refused("profile payload: not a code state")
    if secret is not None:
        body = dist_store.unseal(raw, secret, name)  # the oracle: signed under this key
        if body[4:] != data:
            raise Unverified("a profile payload was used that its MAC does not cover")
    return handled("profile payload loaded")


def _read_view(raw: Any, name: str, secret: str | None, t: Templates) -> Outcome:
    profiles, counts = _profiles(t)
    profile = profile_store.GroupProfile(t.job, t.group, True)
    profile.ranks = (0, 1)
    view = profiles._view(profile, raw, secret, name)
    if view is None:
        return refused("view refused") if counts.store_payloads_refused else handled("view: empty")
    from dynamo_dist.dynamo import pgo, pgo_pickle

    pgo.dynamic_marks(view)
    pgo_pickle.checked(pgo.union({}, [view]))
    if secret is not None:
        dist_store.unseal(raw, secret, name)
    return handled("view merged")


def _read_report(raw: Any) -> Outcome:
    from dynamo_dist.tools import report

    store = FakeStore()
    store.d["dynamo_dist/report/1/1"] = raw
    before = dist_store.refused_count()
    out = report.publish_and_collect(
        store,
        1,
        0,
        2,
        json.loads(_genuine_payload("report", templates())),
        0.05,
        None,
        started=lambda: {0, 1},
    )
    if not isinstance(out, dict):
        raise Crash("publish_and_collect returned no report on rank 0")
    report.format_table(out)
    json.dumps(out, default=str)
    if dist_store.refused_count() > before:
        return refused("report record refused")
    return handled("report: row") if "1" in out["ranks"] else refused("report: missing")


def _read_setup(raw: Any) -> Outcome:
    import torch.distributed as dist

    from dynamo_dist._errors import RankDivergenceError
    from dynamo_dist.dist import group as dist_group

    store = FakeStore()
    store.d["setup/1"] = raw
    before = dist_store.refused_count()
    view = dist_group._pending(store, "setup/", 1)
    if view is not None and not isinstance(view, dict):
        raise Crash(f"_pending returned a {type(view).__name__}")
    with patched(dist, "get_rank", lambda *a: 0), patched(dist, "get_world_size", lambda *a: 4):
        dist_group._where(1, view)
        try:
            dist_group._refuse_crossed_setups(
                (0, 1), {"ranks": [0, 1], "where": "m.py:1"}, {1: view}, [1]
            )
        except RankDivergenceError:
            return refused("setup: divergence raised")
    if view is None:
        return (
            refused("setup record refused")
            if dist_store.refused_count() > before
            else handled("setup: none")
        )
    return handled("setup: record")


def case_store(rng: random.Random, work: Path, resigned: bool, log: list[str]) -> Outcome:
    t = templates()
    kind = rng.choice(SIGNED_KINDS if resigned else STORE_KINDS)
    secret = SECRET if resigned or (kind in SIGNED_KINDS and rng.random() < 0.5) else None
    name = f"dynamo_dist/cache/profile/0/w/1{'/view/1' if kind == 'view' else ''}"
    log.append(f"{kind} secret={'yes' if secret else 'no'}")
    raw: Any = _genuine_payload(kind, t)
    for _ in range(rng.choice([1, 1, 2])):
        raw, what = mutate_payload(
            rng, kind, raw if isinstance(raw, bytes) else _genuine_payload(kind, t), t
        )
        log.append(what)
    if kind in SIGNED_KINDS and secret is not None and isinstance(raw, bytes):
        if resigned:
            raw = dist_store.seal(raw, secret, name)
            log.append("resealed")
        else:
            how = rng.choice(["none", "other-key", "other-secret", "genuine-mac"])
            if how == "other-key":
                raw = dist_store.seal(raw, secret, name + "/x")
            elif how == "other-secret":
                raw = dist_store.seal(raw, OTHER_SECRET, name)
            elif how == "genuine-mac":
                raw = dist_store.seal(_genuine_payload(kind, t), secret, name)[:32] + raw
            log.append(f"mac:{how}")
    if kind == "status":
        return _read_status(raw)
    if kind == "agreement":
        return _read_agreement(raw, log)
    if kind == "profile":
        return _read_profile(raw, name, secret, t)
    if kind == "view":
        return _read_view(raw, name, secret, t)
    if kind == "report":
        return _read_report(raw)
    return _read_setup(raw)


# -- running ---------------------------------------------------------------------------------
CASES: dict[str, Callable[[random.Random, Path, bool, list[str]], Outcome]] = {
    "entry": case_entry,
    "artifact": case_artifact,
    "hostcopy": case_hostcopy,
    "profile": case_profile,
    "store": case_store,
}


@dataclasses.dataclass
class Result:
    target: str
    variant: str
    index: int
    status: str  # refused, handled, crash, hang, unverified
    detail: str
    steps: list[str]
    seconds: float


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep thousands of refusal warnings out of the output; restore what a case changes."""
    logger = logging.getLogger("dynamo_dist")
    level = logger.level
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if env is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = env


#: Frames below a case: the readers run deep in a training job's stack (torch, the
#: user's loop, atexit), where a value nested nearly as deep as json.loads allows can
#: no longer be printed or compared; at the top of a fresh interpreter it still can.
STACK_DEPTH = 80


def at_depth(n: int, fn: Callable[[], Outcome]) -> Outcome:
    return fn() if n <= 0 else at_depth(n - 1, fn)


def run_case(target: str, variant: str, seed: int, index: int, tmp: Path) -> Result:
    """One case: deterministic for (target, variant, seed, index)."""
    rng = random.Random(f"{seed}:{target}:{variant}:{index}")
    work = tmp / f"{target}-{variant}-{index}"
    work.mkdir(mode=0o700)
    steps: list[str] = []
    t0 = time.perf_counter()
    try:
        with quiet(), deadline(DEADLINE_S, f"{target} case {index}"):
            templates()
            out = at_depth(
                STACK_DEPTH, lambda: CASES[target](rng, work, variant == "resigned", steps)
            )
        status, detail = out.kind, out.detail
    except Hang as e:
        status, detail = "hang", str(e)
    except Unverified as e:
        status, detail = "unverified", str(e)
    except Crash as e:
        status, detail = "crash", str(e)
    except Exception as e:
        status, detail = "crash", f"{type(e).__name__}: {str(e)[:300]} at {_where(e)}"
    finally:
        with contextlib.suppress(OSError):
            clear(work)
    return Result(target, variant, index, status, detail, steps, time.perf_counter() - t0)


FAILURES = ("crash", "hang", "unverified")


def _where(e: BaseException) -> str:
    """The innermost frame of dynamo_dist (else the innermost one) an exception left."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/dynamo_dist/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})" if f is not None else "?"
