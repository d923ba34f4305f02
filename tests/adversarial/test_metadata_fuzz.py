"""Fuzzing the shared cache's metadata (issue 14, item 2): never fatal, never hangs.

A genuine entry is published with ``DiskStore.put`` (with and without a secret), then
its files, its directory, the lock file and the cache marker are mutated at random:
JSON values swapped for ``[]``, ``null``, ``"x"``, ``1e400``, huge ints, non-ASCII
or invalid text, deep nesting, keys dropped or added; bytes truncated, flipped,
appended; files replaced by directories, FIFOs, links to ``/dev/zero`` or to a
genuine copy, mode 000; the archive replaced by one holding links, devices or ``..``.

Invariants, for every case:

* ``DiskStore.get`` and ``extract`` raise nothing but EntryRefused/EntryUnavailable;
  ``SharedCache.compile`` raises nothing and returns what ``compile_fn`` returned;
* nothing hangs (every call runs under a SIGALRM deadline, so a hang fails the test);
* nothing unverified is loaded: whatever ``extract`` unpacks, and whatever
  ``SharedCache`` installs into the local inductor cache, is byte-identical to the
  files genuinely published.

Seeded: ``DYNAMO_DIST_FUZZ_SEED`` overrides the seed, ``DYNAMO_DIST_FUZZ_CASES`` the
number of cases; a failure names the seed, the case and its mutations.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ranks

from dynamo_dist.cache import key, protocol
from dynamo_dist.cache import secret as cache_secret
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.entries import EntryRefused, EntryUnavailable
from dynamo_dist.cache.lock import Locks, owner_record
from dynamo_dist.cache.store import MARKER, DiskStore, read_marker

SEED = int(os.environ.get("DYNAMO_DIST_FUZZ_SEED", "14014"))
CASES = int(os.environ.get("DYNAMO_DIST_FUZZ_CASES", "60"))
LOCK_CASES = int(os.environ.get("DYNAMO_DIST_FUZZ_LOCK_CASES", "12"))
VERBOSE = bool(os.environ.get("DYNAMO_DIST_FUZZ_VERBOSE"))
KEY = "ab" + "f" * 38
SECRET = "fuzz-secret-of-at-least-32-characters"
SENTINEL = object()
# Generous: only a hang reaches it (SharedCache waits at most its timeout for a lock).
DEADLINE_S = 60.0

GENUINE = {
    "ab/cabc.so": b"\x7fELF kernel " * 40,
    "fxgraph/ab/graph": b"pickled graph",
    "aotautograd/x/entry": b"\x80\x04 pickled aot",
}


class Hang(Exception):
    """A guarded call did not return in time."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise Hang in this thread after ``seconds`` (a blocked syscall is interrupted).

    pytest-timeout may use SIGALRM too: its handler and remaining time are restored.
    """

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


# -- mutations ---------------------------------------------------------------------------
_RAW = "\x00raw{}\x00"


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _junk_value(rng: random.Random, raws: list[str]) -> Any:
    """A value of a wrong type, or one the JSON module reads into something odd."""
    kind = rng.choice(
        ["[]", "null", "x", "1e400", "-1", "hugeint", "nonascii", "surrogate", "deep", "obj"]
    )
    raw = {
        "1e400": "1e400",
        "hugeint": "9" * rng.choice([30, 400, 4000]),
        "deep": _deep(rng.choice([100, 5000, 100_000])),
    }.get(kind)
    if raw is not None:
        raws.append(raw)
        return _RAW.format(len(raws) - 1)
    return {
        "[]": [],
        "null": None,
        "x": "x",
        "-1": -1,
        "nonascii": "é☃" * rng.randint(1, 40),
        "surrogate": "\udc80\ud800",
        "obj": {"rank": [], "size": "1"},
    }[kind]


def _dumps(obj: Any, raws: list[str]) -> bytes:
    text = json.dumps(obj)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(i)), raw)
    return text.encode("utf-8", "surrogatepass")


def _containers(obj: Any) -> list[Any]:
    """Every dict and list inside ``obj`` (``obj`` included), for picking where to mutate."""
    out = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            out.append(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            out.append(o)
            stack.extend(o)
    return out


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _clear(path: Path) -> None:
    """Remove whatever ``path`` is (file, link, FIFO, directory), never following links."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            for p in [path, *path.rglob("*")]:
                with contextlib.suppress(OSError):
                    if not os.path.islink(p):
                        os.chmod(p, 0o700 if p.is_dir() else 0o600)
            shutil.rmtree(path)
        else:
            os.unlink(path)


def mutate_json(rng: random.Random, path: Path) -> str:
    if not _is_regular(path):
        return "json:skipped"
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return "json:skipped"
    raws: list[str] = []
    op = rng.choice(["value", "value", "value", "drop", "add", "top"])
    spots = _containers(doc)
    if op == "top" or not spots:
        doc = _junk_value(rng, raws)
        op = "top"
    else:
        spot = rng.choice(spots)
        if isinstance(spot, dict) and spot:
            k = rng.choice(sorted(spot))
            if op == "drop":
                del spot[k]
            elif op == "add":
                spot[rng.choice(["extra", "é", "files", "\udc80"]) + str(rng.randint(0, 9))] = (
                    _junk_value(rng, raws)
                )
            else:
                spot[k] = _junk_value(rng, raws)
            op = f"{op}:{k!r}"
        elif isinstance(spot, list) and spot:
            spot[rng.randrange(len(spot))] = _junk_value(rng, raws)
        else:
            doc = _junk_value(rng, raws)
            op = "top"
    data = _dumps(doc, raws)
    os.unlink(path)
    path.write_bytes(data)
    return f"json:{op}:{data[:60]!r}"


def mutate_bytes(rng: random.Random, path: Path) -> str:
    if not _is_regular(path):
        return "bytes:skipped"
    data = bytearray(path.read_bytes())
    op = rng.choice(["truncate", "flip", "append", "empty"])
    if op == "truncate" and data:
        del data[rng.randrange(len(data)) :]
    elif op == "flip" and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "append":
        data += rng.randbytes(rng.randint(1, 2000))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))  # in place: the same inode, as a corrupting writer would
    return f"bytes:{op}"


def mutate_type(rng: random.Random, path: Path, outside: Path) -> str:
    op = rng.choice(["dir", "fifo", "devzero", "link-copy", "link-other", "chmod000"])
    if op == "chmod000":
        if os.path.lexists(path) and not os.path.islink(path):
            os.chmod(path, 0)
        return "type:chmod000"
    copy = outside / f"copy-{rng.randrange(1 << 30)}"
    if op == "link-copy" and _is_regular(path):
        shutil.copyfile(path, copy)  # a genuine copy, reached through a link: still refused
    elif op == "link-copy" and os.path.isdir(path) and not os.path.islink(path):
        shutil.copytree(path, copy, symlinks=True)
    _clear(path)
    if op == "dir":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif op == "fifo":
        os.mkfifo(path)
    elif op == "devzero":
        path.symlink_to("/dev/zero")
    elif op == "link-copy":
        path.symlink_to(copy)
    else:
        sibling = sorted(p for p in path.parent.iterdir() if p != path)
        path.symlink_to(sibling[0] if sibling else "/etc/hostname")
    return f"type:{op}"


def _evil_tar(rng: random.Random) -> tuple[bytes, str]:
    """The genuine files plus one member that must never be unpacked."""
    kind = rng.choice(
        [
            *("symlink", "hardlink", "fifo", "chrdev", "blkdev", "dotdot", "absolute"),
            *("nested-dotdot", "file-and-dir", "twice", "long-name", "negative"),
        ]
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sorted(GENUINE.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("ab/evil")
        payload = b"evil"
        if kind == "symlink":
            evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            evil.type, evil.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "fifo":
            evil.type = tarfile.FIFOTYPE
        elif kind in ("chrdev", "blkdev"):
            evil.type = tarfile.CHRTYPE if kind == "chrdev" else tarfile.BLKTYPE
            evil.devmajor, evil.devminor = 1, 5
        elif kind == "dotdot":
            evil.name = "../evil"
        elif kind == "absolute":
            evil.name = "/tmp/dd-fuzz-evil"
        elif kind == "nested-dotdot":
            evil.name = "ab/../../evil"
        elif kind == "file-and-dir":
            evil.name = "ab/cabc.so/evil"
        elif kind == "twice":
            evil.name = "ab/cabc.so"
        elif kind == "long-name":
            evil.name = "ab/" + "e" * 300
        if evil.isreg():
            evil.size = len(payload)
            tar.addfile(evil, io.BytesIO(payload))
        else:
            tar.addfile(evil)
    data = buf.getvalue()
    if kind == "negative":  # a base-256 size of -1 in the last header written
        data = _negative_size_tar()
    return data, kind


def _negative_size_tar() -> bytes:
    info = tarfile.TarInfo("ab/neg")
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[124:136] = b"\xff" * 12  # size: base-256, negative
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\0" * 1024


def _redeclare(entry: Path, data: bytes) -> bool:
    """Declare ``data`` as the artifact in the manifest (what an unsigned writer can do)."""
    man_path = entry / "manifest.json"
    if not _is_regular(man_path):
        return False
    try:
        man = json.loads(man_path.read_bytes())
        man["files"]["artifact.tar"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    except (ValueError, RecursionError, TypeError, KeyError):
        return False
    os.unlink(man_path)
    man_path.write_text(json.dumps(man))
    return True


def mutate_artifact(rng: random.Random, entry: Path) -> str:
    art = entry / "artifact.tar"
    data, kind = _evil_tar(rng)
    _clear(art)
    art.write_bytes(data)
    if rng.random() < 0.7 and _redeclare(entry, data):
        return f"evil-tar:{kind}:redeclared"
    return f"evil-tar:{kind}"


def mutate_entry(rng: random.Random, entry: Path, outside: Path) -> str:
    """Mutations of the entry directory and its contents."""
    target = rng.choice(["manifest"] * 4 + ["artifact"] * 3 + ["dir", "extra"])
    if target == "manifest":
        path = entry / "manifest.json"
        fn = rng.choice([mutate_json, mutate_json, mutate_bytes, "type"])
    elif target == "artifact":
        path = entry / "artifact.tar"
        fn = rng.choice([mutate_bytes, mutate_bytes, "type", "evil"])
    elif target == "extra":
        extra = entry / rng.choice(["extra.bin", "REFUSED", "..tmp"])
        with contextlib.suppress(OSError):
            extra.write_bytes(b"planted")
        return f"extra:{extra.name}"
    else:
        path, fn = entry, "type"
    if not os.path.lexists(entry) or (path != entry and not os.path.isdir(entry)):
        return f"{target}:skipped"
    if fn == "type":
        return f"{target}:{mutate_type(rng, path, outside)}"
    if fn == "evil":
        return f"{target}:{mutate_artifact(rng, entry)}"
    assert callable(fn)
    return f"{target}:{fn(rng, path)}"


def mutate_file(rng: random.Random, path: Path, outside: Path) -> str:
    """Mutations of one metadata file (the lock, the marker)."""
    fn = rng.choice([mutate_json, mutate_json, mutate_json, mutate_bytes, "type"])
    if fn == "type":
        return mutate_type(rng, path, outside)
    assert callable(fn)
    return fn(rng, path)


# -- invariants --------------------------------------------------------------------------
def _room(where: Path) -> Path:
    for name, data in GENUINE.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
    return where


def _publish(root: Path, secret: str | None, work: Path) -> DiskStore:
    store = DiskStore(root, secret)
    store.check_usable()
    manifest = {
        "factors": key.version_factors(),
        "owner": {"rank": 0, "host": socket.gethostname(), "pid": os.getpid(), "job": ""},
        "label": "f (fuzz.py:1)",
        "compile_seconds": 2.5,
        "created": time.time(),
    }
    assert store.put(KEY, ranks.members(_room(work / "room")), manifest) > 0
    return store


def assert_only_genuine(tree: Path, complete: bool) -> None:
    """Every file under ``tree`` is a genuine one, byte for byte (all of them if ``complete``)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        if Path(dirpath) == tree and "dynamo_dist" in dirnames:
            # dynamo_dist's own area of the local cache (clean rooms, the host-local
            # copies of entries, verified again before use): inductor never reads it.
            dirnames.remove("dynamo_dist")
        for name in filenames + dirnames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                continue
            rel = str(p.relative_to(tree))
            assert stat.S_ISREG(st.st_mode), f"{rel} is not a regular file (mode {st.st_mode:o})"
            assert rel in GENUINE, f"{rel} was installed but never published"
            assert p.read_bytes() == GENUINE[rel], f"{rel} differs from what was published"
            seen.add(rel)
    if complete:
        assert seen == set(GENUINE), f"missing {sorted(set(GENUINE) - seen)}"


def check_store(root: Path, secret: str | None, out: Path) -> str:
    """get() and extract(): only EntryRefused/EntryUnavailable, only genuine bytes unpacked."""
    store = DiskStore(root, secret)
    try:
        with deadline(DEADLINE_S, "DiskStore.get"):
            entry = store.get(KEY, expect=key.version_factors())
    except (EntryRefused, EntryUnavailable) as e:
        return f"get: {type(e).__name__}"
    if entry is None:
        return "get: miss"
    try:
        with deadline(DEADLINE_S, "extract"):
            extract(entry, out)
    except (EntryRefused, EntryUnavailable) as e:
        assert_only_genuine(out, complete=False)
        return f"extract: {type(e).__name__}: {e}"
    assert_only_genuine(out, complete=True)
    return "loaded"


def check_compile(root: Path, local: Path, timeout: float = 1.0) -> str:
    """SharedCache.compile returns compile_fn's result; only genuine files get installed."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(local)  # restored by the fixture

    def compile_fn() -> object:
        return SENTINEL

    with deadline(DEADLINE_S, "SharedCache"):
        cache = protocol.SharedCache(str(root), timeout=timeout, wait_log_interval=30, agree=False)
        got = cache.compile(KEY, key.version_factors(), compile_fn, "f (fuzz.py:1)")
    assert got is SENTINEL, got
    if local.exists():
        assert_only_genuine(local, complete=cache.counts.cache_loads > 0)
    return "loads={cache_loads} refused={cache_refused} fallbacks={cache_fallbacks}".format(
        **cache.stats()
    )


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the warnings of hundreds of refusals out of the output; restore the environment."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    logger = logging.getLogger("dynamo_dist")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _use_secret(monkeypatch: pytest.MonkeyPatch, secret: str | None) -> None:
    """What DYNAMO_DIST_CACHE_SECRET_FILE sets at import, for SharedCache."""
    monkeypatch.setattr(cache_secret, "_secret", secret)
    monkeypatch.setattr(cache_secret, "_error", None)


def _run_cases(
    name: str, n: int, case: Callable[[random.Random, Path, list[str]], None], tmp: Path
) -> None:
    for i in range(n):
        rng = random.Random(f"{SEED}:{name}:{i}")
        work = tmp / f"{name}-{i}"
        work.mkdir()
        log: list[str] = []
        try:
            case(rng, work, log)
        except BaseException as e:
            raise AssertionError(
                f"fuzz case failed: DYNAMO_DIST_FUZZ_SEED={SEED} ({name} case {i}); "
                f"steps: {log}; {type(e).__name__}: {e}"
            ) from e
        finally:
            _clear(work)
        if VERBOSE:
            print(f"{name} {i}: {log}")


# -- the tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
def test_fuzzed_entries_never_crash_hang_or_load_unverified_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: None, secret: str | None
) -> None:
    _use_secret(monkeypatch, secret)

    def case(rng: random.Random, work: Path, log: list[str]) -> None:
        n_mut = rng.choice([1, 1, 2, 3])
        sub = rng.randrange(1 << 62)
        # The same mutations on two copies: one for the store, one for SharedCache (the
        # store-level get may move its copy to refused/).
        for which in ("store", "shared"):
            outside = work / f"outside-{which}"
            outside.mkdir()
            store = _publish(work / which, secret, work / f"pub-{which}")
            r = random.Random(sub)
            for _ in range(n_mut):
                step = mutate_entry(r, store.entry_dir(KEY), outside)
                if which == "store":
                    log.append(step)
        log.append(check_store(work / "store", secret, work / "out"))
        log.append(check_compile(work / "shared", work / "local"))

    _run_cases(f"entry-{'signed' if secret else 'unsigned'}", CASES, case, tmp_path)


def test_fuzzed_marker_never_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: None
) -> None:
    _use_secret(monkeypatch, None)

    def case(rng: random.Random, work: Path, log: list[str]) -> None:
        outside = work / "outside"
        outside.mkdir()
        root = work / "c"
        _publish(root, None, work / "pub")
        for _ in range(rng.choice([1, 2])):
            log.append(mutate_file(rng, root / MARKER, outside))
        with deadline(DEADLINE_S, "read_marker"):
            marker = read_marker(root)
        assert marker is None or isinstance(marker, dict)
        log.append(check_compile(root, work / "local"))

    _run_cases("marker", max(CASES // 3, 1), case, tmp_path)


# No lock mutation fails today. Should one fail after the lock rewrite, it is marked
# xfail(reason="lock rewrite in progress") here, not fixed in the reading code.
@pytest.mark.parametrize("i", range(LOCK_CASES))
def test_fuzzed_lock_never_crashes_or_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: None, i: int
) -> None:
    """A planted or damaged lock costs at most the wait timeout and a local compile.

    Black box: whatever the lock file is, compile() returns compile_fn's result within
    the deadline. No entry is published, so every rank must get past the lock.
    """
    _use_secret(monkeypatch, None)
    rng = random.Random(f"{SEED}:lock:{i}")
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    outside = tmp_path / "outside"
    outside.mkdir()
    lock = Locks(store).acquire(KEY, owner_record(1))
    assert lock is not None
    content = (store.locks / f"{KEY}.0.lock").read_bytes()
    lock.release()
    lock_path = store.locks / f"{KEY}.0.lock"
    lock_path.write_bytes(content)
    log = [mutate_file(rng, lock_path, outside) for _ in range(rng.choice([1, 2]))]
    if rng.random() < 0.3:  # a lock left long ago: no heartbeat
        with contextlib.suppress(OSError):
            os.utime(lock_path, (1e9, 1e9), follow_symlinks=False)
        log.append("stale")
    try:
        log.append(check_compile(root, tmp_path / "local", timeout=0.3))
    except BaseException as e:
        raise AssertionError(
            f"fuzz case failed: DYNAMO_DIST_FUZZ_SEED={SEED} (lock case {i}); "
            f"steps: {log}; {type(e).__name__}: {e}"
        ) from e
    if VERBOSE:
        print(f"lock {i}: {log}")
