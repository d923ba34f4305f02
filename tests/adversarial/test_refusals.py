"""Refuse only what is proven bad (issue 14, items 2, 3 and 8).

A shared entry that this rank cannot read (permissions, a full local disk, an entry
pruned meanwhile) is a miss for this rank and stays in ``entries/`` for the others:
``DiskStore.get`` returns None with one warning, ``extract`` raises EntryUnavailable,
and nothing is moved to ``refused/``. What is proven bad (malformed manifest fields
included) is EntryRefused, and ``refused/`` stays bounded.

Real files and processes: an unreadable file is made by running the reader as another
user (we run as root) in a forked child, a full disk by RLIMIT_FSIZE in a forked child.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ranks
from fuzz_cases import Hang, deadline

from dynamo_dist.cache import key as cache_key
from dynamo_dist.cache import protocol
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.entries import Entry, EntryRefused, EntryUnavailable
from dynamo_dist.cache.refused import REFUSED_KEEP
from dynamo_dist.cache.store import DiskStore

KEY = "ab" + "c" * 38
NOBODY = 65534
SECRET = "refusals-secret-of-at-least-32-chars"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs readers as another user")


def _room(tmp: Path, payload: bytes = b"kernel") -> Path:
    room = tmp / "room"
    (room / "ab").mkdir(parents=True)
    (room / "ab" / "cabc.so").write_bytes(payload)
    (room / "fxgraph").mkdir()
    (room / "fxgraph" / "entry").write_bytes(b"pickled graph")
    return room


def _edit_manifest(entry: Path, change: dict[str, Any]) -> None:
    """Rewrite an entry's manifest with ``change`` applied (a new file, as a writer would)."""
    man = json.loads((entry / "manifest.json").read_text())
    man.update(change)
    (entry / "manifest.json").unlink()
    (entry / "manifest.json").write_text(json.dumps(man))


def _manifest(**extra: object) -> dict[str, Any]:
    return {
        "factors": cache_key.version_factors(),
        "owner": {"rank": 0},
        "compile_seconds": 1.5,
        "created": time.time(),
        "label": "f (t.py:1)",
        **extra,
    }


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="dd-refusals-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def in_child(fn: Callable[[], Any], uid: int | None = None, timeout: float = 60.0) -> Any:
    """``fn()``'s JSON result, run in a forked child (as ``uid`` if given).

    The child never returns into pytest: it reports through a pipe and _exits.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            out = json.dumps({"ok": fn()})
            code = 0
        except BaseException as e:
            out = json.dumps({"error": f"{type(e).__name__}: {e}"})
        try:
            os.write(w, out.encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        with deadline(timeout, "the child"):
            while chunk := os.read(r, 1 << 16):
                chunks.append(chunk)
            os.waitpid(pid, 0)
    except Hang:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(r)
    result = json.loads(b"".join(chunks) or b'{"error": "no answer"}')
    assert "error" not in result, result["error"]
    return result["ok"]


def _outcome(call: Callable[[], object]) -> str:
    """'ok', 'none', or the name of the exception ``call`` raised."""
    try:
        return "none" if call() is None else "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _refused(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("refused/*/*"))


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


# -- item 3: an unreadable manifest is not a bad manifest ---------------------------------
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_unreadable_manifest_is_a_miss_not_a_refusal(shared: Path, signed: bool) -> None:
    """EACCES on manifest.json used to refuse (and move away) a valid shared entry.

    Unsigned: the reader's own cache, with one file left root-only (copied by an admin
    tool, say). Signed: a group-shared cache (directories 0777) where a teammate's umask
    077 left the manifest 0600. Either way the reader cannot read it, nothing proves it
    bad, and the entry must stay for the ranks that can read it.
    """
    root = shared / "c"
    secret = SECRET if signed else None
    store = DiskStore(root, secret)
    store.check_usable()
    store.put(KEY, ranks.members(_room(shared)), _manifest())
    entry = store.entry_dir(KEY)
    if signed:
        for p in [root, *root.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o777)
    else:
        _chown_tree(root, NOBODY)
        os.chown(entry / "manifest.json", 0, 0)
    os.chmod(entry / "manifest.json", 0o600)

    def read() -> list[str]:
        reader = DiskStore(root, secret)
        got = [_outcome(lambda: reader.get(KEY)), _outcome(lambda: reader.verify(entry, KEY))]
        return got

    get_result, verify_result = in_child(read, uid=NOBODY)
    assert get_result == "none", get_result
    assert verify_result.startswith("EntryUnavailable"), verify_result
    assert (entry / "manifest.json").exists() and _refused(root) == []
    if signed:  # and whoever can read it still loads it (unsigned: only its owner may)
        assert store.get(KEY) is not None


def test_unreadable_artifact_is_unavailable_not_refused(shared: Path) -> None:
    """extract() as a user who may read the manifest but not the artifact."""
    root = shared / "c"
    store = DiskStore(root, SECRET)
    store.put(KEY, ranks.members(_room(shared)), _manifest())
    entry_dir = store.entry_dir(KEY)
    os.chmod(entry_dir / "artifact.tar", 0o600)
    out = shared / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)

    # verify() hashes the artifact as well, so get() already cannot read it: a miss.
    def read_get() -> str:
        return _outcome(lambda: DiskStore(root, SECRET).get(KEY))

    assert in_child(read_get, uid=NOBODY) == "none"
    # extract() of an entry verified earlier (by a rank that could read it): unavailable.
    manifest = json.loads((entry_dir / "manifest.json").read_text())

    def read_extract() -> str:
        entry = Entry(KEY, entry_dir, manifest, root=root, private=False)
        return _outcome(lambda: extract(entry, out / "dest"))

    got = in_child(read_extract, uid=NOBODY)
    assert got.startswith("EntryUnavailable"), got
    assert (entry_dir / "artifact.tar").exists() and _refused(root) == []


def test_unwritable_destination_is_unavailable(shared: Path) -> None:
    """EACCES while unpacking into the local directory is this rank's problem."""
    root = shared / "c"
    store = DiskStore(root, SECRET)
    store.put(KEY, ranks.members(_room(shared)), _manifest())
    entry = store.get(KEY)
    assert entry is not None
    local = shared / "local"
    local.mkdir()
    os.chown(local, NOBODY, NOBODY)  # the private copy can be made beside dest...
    (local / "dest").mkdir(mode=0o755)  # ...but dest itself is root's

    got = in_child(lambda: _outcome(lambda: extract(entry, local / "dest")), uid=NOBODY)
    assert got.startswith("EntryUnavailable"), got
    assert store.get(KEY) is not None and _refused(root) == []


def test_full_local_disk_while_unpacking_keeps_the_entry(tmp_path: Path) -> None:
    """A local write failing with EFBIG (as ENOSPC would) is a miss, never a refusal.

    RLIMIT_FSIZE makes every write past 4 KiB fail (SIGXFSZ ignored), here the private
    copy of the artifact that extract() unpacks.
    """
    limit = 4096
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    store.put(KEY, ranks.members(_room(tmp_path, payload=os.urandom(8 * 1024))), _manifest())
    dest = tmp_path / "local" / "dest"
    dest.parent.mkdir(mode=0o700)

    def unpack() -> str:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        reader = DiskStore(root)
        entry = reader.get(KEY, expect=cache_key.version_factors())
        assert entry is not None
        return _outcome(lambda: extract(entry, dest))

    got = in_child(unpack)
    assert got.startswith("EntryUnavailable"), got
    assert _refused(root) == []
    entry = store.get(KEY, expect=cache_key.version_factors())
    assert entry is not None
    extract(entry, tmp_path / "again")  # with room to write, the same entry unpacks
    assert (tmp_path / "again" / "ab" / "cabc.so").stat().st_size == 8 * 1024


def test_exhausted_descriptors_are_a_miss_not_a_refusal(tmp_path: Path) -> None:
    """EMFILE while opening manifest.json proves nothing about the entry."""
    root = tmp_path / "c"
    store = DiskStore(root)
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    path = store.entry_dir(KEY)

    def read() -> list[str]:
        # Fill every free descriptor up to the highest in use, then allow exactly the
        # five directories get() walks (root, entries, <ns>, <kk>, <key>): the manifest
        # is the first open to fail with EMFILE.
        highest = max(int(n) for n in os.listdir("/proc/self/fd"))
        fd = os.open("/dev/null", os.O_RDONLY)
        while fd <= highest:
            fd = os.open("/dev/null", os.O_RDONLY)
        os.close(fd)  # now the lowest free descriptor
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (fd + 5, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )
        reader = DiskStore(root)
        return [_outcome(lambda: reader.get(KEY)), _outcome(lambda: reader.verify(path, KEY))]

    get_result, verify_result = in_child(read)
    assert get_result == "none", get_result
    assert verify_result.startswith("EntryUnavailable"), verify_result
    assert "Too many open files" in verify_result
    assert _refused(root) == [] and store.get(KEY) is not None


def test_unavailable_entry_warns_once(shared: Path) -> None:
    """Waiters call get() in a loop: one warning per key, not one per poll."""
    root = shared / "c"
    store = DiskStore(root, SECRET)
    store.put(KEY, ranks.members(_room(shared)), _manifest())
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o777)
    os.chmod(store.entry_dir(KEY) / "manifest.json", 0o600)

    def poll() -> list[Any]:
        seen: list[str] = []

        class Records(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record.getMessage())

        handler = Records(level=logging.WARNING)
        logging.getLogger("dynamo_dist.cache").addHandler(handler)
        reader = DiskStore(root, SECRET)
        got = [reader.get(KEY) for _ in range(5)]
        return [got, seen]

    got, seen = in_child(poll, uid=NOBODY)
    assert got == [None] * 5
    assert len(seen) == 1 and KEY[:12] in seen[0] and "Permission denied" in seen[0], seen


# -- item 2: fields the loader and the CLI read must have their types ---------------------
@pytest.mark.parametrize(
    "change",
    [
        {"compile_seconds": "x"},
        {"compile_seconds": 1e400},
        {"compile_seconds": -1},
        {"compile_seconds": 10**400},
        {"compile_seconds": True},
        {"owner": []},
        {"owner": None},
        {"owner": {"rank": "0"}},
        {"owner": {"rank": 1.5}},
        {"created": "yesterday"},
        {"created": 1e400},
        {"created": 10**400},
        {"label": []},
        {"factors": []},
        {"factors": None},
        {"format": True},
        {"format": 1.0},
        {"key": None},
        {"label": "\udc80"},
    ],
    ids=lambda c: repr(c)[:48],
)
def test_manifest_fields_of_the_wrong_type_are_refused(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """Values read after verification (float(compile_seconds), owner.get) were not checked."""
    store = DiskStore(tmp_path / "c")
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    path = store.entry_dir(KEY)
    _edit_manifest(path, change)
    with pytest.raises(EntryRefused, match=r"manifest|format"):
        store.verify(path, KEY)
    with pytest.raises(EntryRefused):
        store.get(KEY)
    assert not path.exists() and len(_refused(store.root)) == 1


@pytest.mark.parametrize(
    "change",
    [{"compile_seconds": "x"}, {"owner": []}, {"compile_seconds": 1e400}, {"owner": {"rank": []}}],
    ids=lambda c: repr(c)[:48],
)
def test_a_loader_never_raises_on_manifest_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    """compile_seconds "x" or owner [] in a manifest that otherwise verified crashed compile()."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local"))
    root = tmp_path / "c"
    store = DiskStore(root)
    store.check_usable()
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    path = store.entry_dir(KEY)
    _edit_manifest(path, change)
    cache = protocol.SharedCache(str(root), 1.0, 30.0, agree=False)
    with deadline(60, "SharedCache.compile"):
        got = cache.compile(KEY, cache_key.version_factors(), lambda: "compiled", "f (t.py:1)")
    assert got == "compiled"
    assert cache.stats()["cache_loads"] == 0 and cache.stats()["cache_refused"] == 1


@pytest.mark.parametrize(
    "sig", ["é" * 64, "x", 5, None, "0" * 64 + "\n"], ids=lambda c: repr(c)[:24]
)
def test_malformed_signatures_are_refused(tmp_path: Path, sig: object) -> None:
    store = DiskStore(tmp_path / "c", SECRET)
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    path = store.entry_dir(KEY)
    man = json.loads((path / "manifest.json").read_text())
    man["signature"] = sig
    (path / "manifest.json").unlink()
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EntryRefused, match="signature"):
        store.verify(path, KEY)


@pytest.mark.parametrize(
    "document",
    [b"[]", b"null", b'"x"', b"1e400", b"", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000],
    ids=["list", "null", "string", "1e400", "empty", "not-utf8", "nested-100000"],
)
def test_manifests_that_are_not_objects_are_refused(tmp_path: Path, document: bytes) -> None:
    store = DiskStore(tmp_path / "c")
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    path = store.entry_dir(KEY)
    (path / "manifest.json").unlink()
    (path / "manifest.json").write_bytes(document)
    with pytest.raises(EntryRefused, match="manifest"):
        store.get(KEY)
    assert len(_refused(store.root)) == 1


def test_a_missing_artifact_in_an_entry_in_place_is_refused(tmp_path: Path) -> None:
    """The complement of a vanished entry: a file missing from an entry still there."""
    store = DiskStore(tmp_path / "c")
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    (store.entry_dir(KEY) / "artifact.tar").unlink()
    with pytest.raises(EntryRefused, match="missing"):
        store.get(KEY)
    assert len(_refused(store.root)) == 1


@pytest.mark.parametrize("what", ["manifest.json", "artifact.tar"])
def test_a_fifo_in_an_entry_never_blocks(tmp_path: Path, what: str) -> None:
    """A FIFO where a file must be is refused at once (opened O_NONBLOCK, never read)."""
    store = DiskStore(tmp_path / "c")
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    path = store.entry_dir(KEY)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / what).unlink()
    os.mkfifo(path / what)
    with deadline(20, f"reading a FIFO {what}"):
        with pytest.raises(EntryRefused, match="not a regular file"):
            store.verify(path, KEY)
        if what == "artifact.tar":
            with pytest.raises(EntryRefused, match="not a regular file"):
                extract(Entry(KEY, path, manifest, root=store.root), tmp_path / "out")
        with pytest.raises(EntryRefused):
            store.get(KEY)
    assert len(_refused(store.root)) == 1


def test_a_vanished_entry_is_a_miss(tmp_path: Path) -> None:
    """An entry pruned between get() and extract() is not refused (nothing proves it bad)."""
    store = DiskStore(tmp_path / "c")
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    entry = store.get(KEY)
    assert entry is not None
    shutil.rmtree(entry.path)
    with pytest.raises(EntryUnavailable):
        extract(entry, tmp_path / "out")
    assert _refused(store.root) == []


def test_an_entry_republished_after_verify_is_not_refused(
    tmp_path: Path,
) -> None:
    """Pruned and republished between verify and unpack: the new, valid entry was refused
    (its artifact did not match the old manifest)."""
    store = DiskStore(tmp_path / "c")
    store.put(KEY, ranks.members(_room(tmp_path)), _manifest())
    old = store.get(KEY)
    assert old is not None
    shutil.rmtree(old.path)
    shutil.rmtree(tmp_path / "room")
    store.put(KEY, ranks.members(_room(tmp_path, payload=b"another kernel")), _manifest())
    with pytest.raises(EntryRefused, match="sha256"):  # the old manifest, the new bytes
        extract(old, tmp_path / "out")
    assert not store.refuse(old.path, "what the loader does then", ident=old.ident)
    assert _refused(store.root) == []
    assert store.get(KEY) is not None  # the new entry stays, and verifies


# -- item 8: refused/ is bounded ----------------------------------------------------------
def test_refused_keeps_at_most_the_newest_boxes_and_only_deletes_ours(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    old = 1_000_000_000_000  # milliseconds: older than any real refusal
    store.refused.mkdir(parents=True, exist_ok=True)
    foreign = store.refused / f"{'f' * 40}.{old}.{'0' * 16}"
    (foreign / "entry").mkdir(parents=True)
    _chown_tree(foreign, 3000)  # another account's box: counted, never deleted
    link = store.refused / f"{'e' * 40}.{old + 1}.{'0' * 16}"
    link.symlink_to(victim)  # a planted link named like a box: never followed
    unrelated = store.refused / "notes.txt"
    unrelated.write_text("not a box")
    n = REFUSED_KEEP + 6
    keys = [f"{i:02x}" + "d" * 38 for i in range(n)]
    for i, key in enumerate(keys):
        (store.entry_dir(key)).mkdir(parents=True)
        (store.entry_dir(key) / "manifest.json").write_text("{}")
        store.refuse(store.entry_dir(key), f"reason {i}")
        time.sleep(0.002)  # distinct milliseconds in the box names
    assert store._trimmer.wait(60)  # trimming runs in the background, off the compile's path
    boxes = [p for p in store.refused.iterdir() if p.is_dir() and not p.is_symlink()]
    ours = sorted(p for p in boxes if p.stat().st_uid == os.geteuid())
    assert len(ours) == REFUSED_KEEP
    kept = {p.name.split(".")[0] for p in ours}
    assert kept == set(keys[-REFUSED_KEEP:])  # the newest are kept
    assert foreign.is_dir() and (foreign / "entry").is_dir()
    assert link.is_symlink() and (victim / "precious").read_text() == "x"
    assert unrelated.read_text() == "not a box"
    for p in ours:
        assert stat.S_ISDIR(os.lstat(p / "entry").st_mode)
