"""A hostile shared cache directory (issue 10, items 2, 3, 4, 7).

Every byte under the shared directory may have been written by someone else.
Each test plants what an attacker without the secret can plant and checks that
the store, the loader and the CLI neither follow it, hang on it, nor write or
delete through it. Single process and fast; the CLI runs in this process too.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import ranks

from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.entries import Entry, EntryRefused, EntryUntrusted
from dynamo_dist.cache.install import merge_into
from dynamo_dist.cache.lock import Locks
from dynamo_dist.cache.store import MARKER, DiskStore

KEY = "ab" + "c" * 38


def _room(tmp_path: Path, name: str = "room", payload: bytes = b"kernel") -> Path:
    room = tmp_path / name
    (room / "ab").mkdir(parents=True)
    (room / "ab" / "cabc.so").write_bytes(payload)
    (room / "fxgraph").mkdir()
    (room / "fxgraph" / "entry").write_bytes(b"pickled graph")
    return room


def _publish(store: DiskStore, tmp_path: Path, key: str = KEY, **extra: object) -> Path:
    store.put(
        key, ranks.members(_room(tmp_path, f"room-{key[:6]}")), {"created": time.time(), **extra}
    )
    return store.entry_dir(key)


def _edit_manifest(entry: Path, **changes: object) -> None:
    """What anyone can do to an unsigned entry: rewrite its manifest."""
    man = json.loads((entry / "manifest.json").read_text())
    man.update(changes)
    (entry / "manifest.json").unlink()
    (entry / "manifest.json").write_text(json.dumps(man))


def _redeclare(entry: Path) -> None:
    """Declare whatever artifact.tar now holds as the entry's artifact (no secret)."""
    data = (entry / "artifact.tar").read_bytes()
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _edit_manifest(entry, files={"artifact.tar": meta})


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _plant_artifact(entry: Path, data: bytes) -> None:
    (entry / "artifact.tar").unlink()
    (entry / "artifact.tar").write_bytes(data)
    _redeclare(entry)


# -- item 2: time of check, time of use --------------------------------------------------
@pytest.mark.parametrize("how", ["swap", "in-place"])
def test_artifact_changed_after_verify_is_not_unpacked(tmp_path, how):
    """The bytes extract() unpacks are the bytes that were hashed, not what is there later.

    get() verifies; an attacker then replaces artifact.tar (a new file renamed over
    it, or the same inode rewritten, same size) before extract() runs. Before the
    fix extract() reopened the path and unpacked the attacker's archive.
    """
    store = DiskStore(tmp_path / "c")
    entry_dir = _publish(store, tmp_path)
    entry = store.get(KEY)
    assert entry is not None
    art = entry_dir / "artifact.tar"
    evil = art.read_bytes().replace(b"kernel", b"EVIL!!")
    assert len(evil) == art.stat().st_size and evil != art.read_bytes()
    if how == "swap":
        (entry_dir / "new").write_bytes(evil)
        os.replace(entry_dir / "new", art)
    else:
        with open(art, "r+b") as fh:
            fh.write(evil)
    out = tmp_path / "out"
    with pytest.raises(EntryRefused, match="sha256"):
        extract(entry, out)
    assert not (out / "ab" / "cabc.so").exists()

    # The honest case still works: the same entry, untouched, unpacks what was hashed.
    store2 = DiskStore(tmp_path / "c2")
    _publish(store2, tmp_path / "second")
    good = store2.get(KEY)
    assert good is not None
    extract(good, tmp_path / "out2")
    assert (tmp_path / "out2" / "ab" / "cabc.so").read_bytes() == b"kernel"


# -- item 3: no writes through links -----------------------------------------------------
def test_refuse_does_not_write_through_a_planted_link(tmp_path):
    """refuse() used to write REFUSED into the (attacker's) entry, following a link there."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    store = DiskStore(tmp_path / "c")
    entry = _publish(store, tmp_path)
    _edit_manifest(entry, format=99)  # any reason to refuse
    os.symlink(victim, entry / "REFUSED")
    with pytest.raises(EntryRefused, match="format"):
        store.get(KEY)
    assert victim.read_text() == "precious\n"
    assert not entry.exists()
    (box,) = list(store.refused.iterdir())
    assert (box / "REFUSED").is_file() and not (box / "REFUSED").is_symlink()
    assert "format" in (box / "REFUSED").read_text()


def test_usability_probe_does_not_write_through_a_planted_link(tmp_path):
    """The probe had a predictable name (.probe.<host>.<pid>); a link there was written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    root = tmp_path / "c"
    root.mkdir()
    os.symlink(victim, root / f".probe.{socket.gethostname()}.{os.getpid()}")
    DiskStore(root).check_usable()
    assert victim.read_text() == "precious\n"


class _PlantingStore(DiskStore):
    """Plants manifest.json -> victim in the leader's temporary directory mid-publish.

    ``put`` reads ``self.secret`` after writing the archive and before writing the
    manifest: the moment an attacker who can guess (or list) the temporary
    directory would plant a link there.
    """

    victim: Path
    tmp_names: list[str]

    @property  # type: ignore[override]
    def secret(self) -> str | None:
        shard = getattr(self, "entries", None)
        if shard is not None and (shard / KEY[:2]).is_dir():
            for d in (shard / KEY[:2]).iterdir():
                if d.name.startswith(".tmp.") and d.is_dir() and not d.is_symlink():
                    self.tmp_names.append(d.name)
                    if not os.path.lexists(d / "manifest.json"):
                        os.symlink(self.victim, d / "manifest.json")
        return None

    @secret.setter
    def secret(self, value: str | None) -> None:
        pass


def test_leader_temp_dir_is_unpredictable_and_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    store = _PlantingStore(tmp_path / "c")
    store.victim, store.tmp_names = victim, []
    # Refusing to publish (OSError) is fine; writing through the link is not.
    with contextlib.suppress(OSError):
        store.put(KEY, ranks.members(_room(tmp_path)), {"created": time.time()})
    assert victim.read_text() == "precious\n"
    assert store.tmp_names, "the planting hook did not run"
    predictable = f".tmp.{KEY}.{socket.gethostname()}.{os.getpid()}"
    assert predictable not in store.tmp_names


# -- item 7: unsafe inputs, with or without a secret -------------------------------------
def test_manifest_file_names_cannot_leave_the_entry(tmp_path):
    """A name like ../../victim was stat()ed and its size reported: an information leak."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * 12345)
    store = DiskStore(tmp_path / "c")
    entry = _publish(store, tmp_path)
    man = json.loads((entry / "manifest.json").read_text())
    rel = os.path.relpath(victim, entry)
    for bad in (rel, str(victim), "manifest.json", "a/../artifact.tar"):
        files = {**man["files"], bad: {"sha256": "0" * 64, "size": 0}}
        _edit_manifest(entry, files=files)
        with pytest.raises(EntryRefused, match="outside the entry") as e:
            store.verify(entry, KEY)
        assert "12345" not in str(e.value)


def test_malformed_manifests_are_refused_not_raised(tmp_path):
    store = DiskStore(tmp_path / "c")
    entry = _publish(store, tmp_path)
    good = json.loads((entry / "manifest.json").read_text())
    for change in (
        {"files": []},
        {"files": {}},  # nothing verified would be unpacked unchecked
        {"files": {"artifact.tar": "x"}},
        {"files": {"artifact.tar": {"size": "1", "sha256": "0" * 64}}},
        {"factors": "x"},
    ):
        _edit_manifest(entry, **{**good, **change})
        with pytest.raises(EntryRefused):
            store.verify(entry, KEY, expect={"torch": "x"} if "factors" in change else None)
    (entry / "manifest.json").unlink()
    (entry / "manifest.json").write_text("[1, 2]")
    with pytest.raises(EntryRefused):
        store.verify(entry, KEY)


_NO_HANG = r"""
import json, os, sys, time
from pathlib import Path
from dynamo_dist.cache.entries import EntryRefused
from dynamo_dist.cache.store import DiskStore
root = Path(sys.argv[1]); key = sys.argv[2]
store = DiskStore(root)
entry = store.entry_dir(key)
out = {}
def attempt(name):
    t0 = time.monotonic()
    try:
        store.verify(entry, key)
        out[name] = "accepted"
    except EntryRefused as e:
        out[name] = "refused: " + str(e)
    print(name, out[name], flush=True)
man = json.loads((entry / "manifest.json").read_text())
art = entry / "artifact.tar"
os.rename(art, entry / "real.tar")
# artifact.tar -> /dev/zero, declared empty: the old reader hashed forever.
os.symlink("/dev/zero", art)
man["files"]["artifact.tar"]["size"] = 0
(entry / "manifest.json").unlink(); (entry / "manifest.json").write_text(json.dumps(man))
attempt("devzero")
os.unlink(art); os.mkfifo(art)
attempt("artifact-fifo")
os.unlink(art); os.rename(entry / "real.tar", art)
(entry / "manifest.json").unlink(); os.mkfifo(entry / "manifest.json")
attempt("manifest-fifo")
from dynamo_dist.cache.lock import Locks
os.mkfifo(store.locks / (key + ".0.lock"))
print("lock", Locks(store).holder(key) is not None, flush=True)
print("RESULT", json.dumps(out), flush=True)
"""


def test_devices_and_fifos_do_not_hang_the_reader(tmp_path):
    """/dev/zero or a FIFO in place of an entry file used to hang the training job."""
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    _publish(store, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _NO_HANG, str(store.root), KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        text, _ = proc.communicate()
        pytest.fail(f"the reader hung on a planted device or FIFO; got so far:\n{text}")
    result = next(line for line in text.splitlines() if line.startswith("RESULT "))
    verdicts = json.loads(result[len("RESULT ") :])
    assert set(verdicts) == {"devzero", "artifact-fifo", "manifest-fifo"}
    assert all(v.startswith("refused") for v in verdicts.values()), verdicts
    assert "lock True" in text  # a FIFO lock reads as an unnamed owner, without blocking


def test_compressed_archives_are_not_decompressed(tmp_path):
    """tarfile.open() guessed compression: 20 KB of gzip became 20 MiB on the local disk."""
    store = DiskStore(tmp_path / "c")
    entry_dir = _publish(store, tmp_path)
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb") as gz:
        gz.write(_tar([(tarfile.TarInfo("ab/bomb"), bytes(20 << 20))]))
    assert len(bomb.getvalue()) < 100_000
    _plant_artifact(entry_dir, bomb.getvalue())
    entry = store.get(KEY)
    assert entry is not None  # checksums match: only the archive itself is hostile
    out = tmp_path / "out"
    with pytest.raises(EntryRefused):
        extract(entry, out)
    assert not (out / "ab" / "bomb").exists()


def test_unpacked_files_lose_setuid_and_shared_write_bits(tmp_path):
    store = DiskStore(tmp_path / "c")
    entry_dir = _publish(store, tmp_path)
    suid = tarfile.TarInfo("ab/suid")
    suid.mode = 0o4777
    sgid_dir = tarfile.TarInfo("sg")
    sgid_dir.type, sgid_dir.mode = tarfile.DIRTYPE, 0o3777
    _plant_artifact(entry_dir, _tar([(suid, b"#!/bin/sh\n"), (sgid_dir, b"")]))
    entry = store.get(KEY)
    assert entry is not None
    out = tmp_path / "out"
    extract(entry, out)
    for p in (out / "ab" / "suid", out / "sg"):
        mode = os.lstat(p).st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), oct(mode)
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), oct(mode)


@pytest.mark.parametrize(
    "kind", ["symlink", "hardlink", "fifo", "device", "absolute", "dotdot", "dotslash"]
)
def test_only_plain_members_are_unpacked(tmp_path, kind):
    store = DiskStore(tmp_path / "c")
    entry_dir = _publish(store, tmp_path)
    info = tarfile.TarInfo("ab/x")
    data = b"x"
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "victim")
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "ab/cabc.so"
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 5
    else:
        info.name = {"absolute": str(tmp_path / "abs"), "dotdot": "ab/../../up", "dotslash": "./x"}[
            kind
        ]
    _plant_artifact(entry_dir, _tar([(info, data)]))
    entry = store.get(KEY)
    assert entry is not None
    with pytest.raises(EntryRefused, match="archive member"):
        extract(entry, tmp_path / "out")
    assert not (tmp_path / "abs").exists() and not (tmp_path / "up").exists()


# -- item 4: the CLI never deletes outside the cache -------------------------------------
_cli = ranks.cli  # in this process: a subprocess per call would import torch anew


def _victim(tmp_path: Path) -> Path:
    home = tmp_path / "home" / "victim"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.tex").write_text("precious")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("key")
    old = time.time() - 30 * 86400
    for p in (home / "Documents", home / ".ssh"):
        os.utime(p, (old, old))
    return home


def _victim_intact(home: Path) -> bool:
    return (home / "Documents" / "thesis.tex").read_text() == "precious" and (
        home / ".ssh" / "id_ed25519"
    ).exists()


def test_cli_clear_and_prune_never_follow_links(tmp_path):
    home = _victim(tmp_path)
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    if not (store.root / MARKER).exists():  # (only for running this test on older code)
        (store.root / MARKER).write_text('{"format": 1}')
    _publish(store, tmp_path)
    os.symlink(home, store.entries / "zz")  # a symlinked shard
    os.symlink(home, store.entries / KEY[:2] / ("ab" + "d" * 38))  # a symlinked entry
    p = _cli("prune", str(store.root), "--older-than", "1d")
    assert p.returncode == 0, p.stderr
    assert _victim_intact(home)
    (store.locks / "x.lock").write_text("{}")
    store.locks.rename(store.root / "locks.real")
    os.symlink(home, store.locks)  # a symlinked locks/ too
    c = _cli("clear", str(store.root))
    assert c.returncode == 0, c.stderr
    assert _victim_intact(home)
    assert not os.path.lexists(store.entries / "zz") and not os.path.lexists(store.locks)
    assert not list(store.iter_entries())


def test_a_job_marks_the_cache_it_creates_and_only_that(tmp_path):
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    assert json.loads((store.root / MARKER).read_text()) == {"format": 1}
    old = tmp_path / "old"  # a cache from before markers: not marked behind the user's back
    (old / "entries").mkdir(parents=True)
    DiskStore(old).check_usable()
    assert not (old / MARKER).exists()


def test_cli_refuses_to_delete_in_an_unmarked_directory(tmp_path):
    """clear on a directory that is not a cache deleted its subdirectories and exited 0."""
    d = tmp_path / "project"
    (d / "entries" / "data" / "run1").mkdir(parents=True)
    (d / "entries" / "data" / "run1" / "results.csv").write_text("1,2\n")
    (d / "locks").mkdir()
    (d / "locks" / "keep").write_text("x")
    for args in (("clear", str(d)), ("prune", str(d), "--older-than", "1s")):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert str(d) in r.stderr and "cache init" in r.stderr
        assert (d / "entries" / "data" / "run1" / "results.csv").exists()
        assert (d / "locks" / "keep").exists()
    # Adopting an old cache: init refuses a directory with foreign files unless forced.
    (d / "notes.txt").write_text("x")
    assert _cli("init", str(d)).returncode == 2
    assert not (d / MARKER).exists()
    (d / "notes.txt").unlink()
    i = _cli("init", str(d))
    assert i.returncode == 0 and json.loads((d / MARKER).read_text())["format"] == 1
    assert _cli("clear", str(d)).returncode == 0
    assert not (d / "entries").exists() and not (d / "locks").exists()


# -- review: parents swapped for links, unsigned trust inside the root, local installs --
ATTACKER = 3000  # another account's uid: we run as root, so chown makes files "theirs"


def _chown_tree(path: Path, uid: int = ATTACKER) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _swap_for_link(path: Path, target: Path) -> Path:
    """What the attacker does to a directory of the shared root: rename it away, link it."""
    moved = path.with_name(path.name + ".moved")
    if path.exists():
        os.rename(path, moved)
    os.symlink(target, path)
    return moved


@pytest.mark.parametrize("level", ["top", "namespace"])
def test_no_writes_through_symlinked_parent_directories(tmp_path, level):
    """locks/, refused/, entries/ (or their <ns>) swapped for links to a victim's dirs.

    Before the fix the victim job created <key>.lock there, wrote REFUSED (with text
    from the attacker's manifest) there, moved the attacker's entry tree there, and
    moved a tree out of the victim's directory into refused/.
    """
    victim, theirs = tmp_path / "victim", tmp_path / "theirs"
    victim.mkdir()
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    entry = _publish(store, tmp_path)
    _edit_manifest(entry, format=99, note="attacker text")  # any reason to refuse
    # The victim's own tree, shaped like an entry, where entries/ will lead.
    mine = theirs / ("unsigned" if level == "top" else "") / KEY[:2] / KEY
    mine.mkdir(parents=True)
    (mine / "manifest.json").write_text('{"format": 99}')
    # A link as the last component (locks/<ns>) was caught; a link above it was not.
    # Leave refused/<ns> real there, to show a victim's tree is not moved into it.
    for d in (store.locks, store.refused) if level == "top" else (store.locks,):
        _swap_for_link(d.parent if level == "top" else d, victim)
    _swap_for_link(store.entries.parent if level == "top" else store.entries, theirs)
    with contextlib.suppress(OSError):
        lock = Locks(store).acquire(KEY, {"rank": 0})
        if lock is not None:
            lock.release()
    with pytest.raises(EntryRefused, match=r"format|symlink"):
        store.get(KEY)
    assert sorted(victim.rglob("*")) == []
    assert (mine / "manifest.json").read_text() == '{"format": 99}'


def test_publish_and_refuse_do_not_follow_a_symlinked_shard(tmp_path):
    """entries/<ns>/<kk> -> victim: put() wrote the entry there, refuse() moved it from there."""
    victim = tmp_path / "victim"
    (victim / KEY).mkdir(parents=True)
    (victim / KEY / "manifest.json").write_text("{}")  # what a refusal would move away
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    shard = store.entry_dir(KEY).parent
    shard.mkdir()
    _swap_for_link(shard, victim)
    with contextlib.suppress(OSError):
        store.put(KEY, ranks.members(_room(tmp_path)), {"created": time.time()})
    with contextlib.suppress(EntryRefused):
        store.get(KEY)
    assert sorted(p.name for p in victim.rglob("*")) == [KEY, "manifest.json"]
    assert not list(tmp_path.joinpath("c", "refused").rglob("manifest.json"))


def test_lock_release_only_touches_our_own_lock(tmp_path):
    """Release used to unlink <key>.lock through a swapped locks/<ns>."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / f"{KEY}.0.lock").write_text("victim's file\n")
    store = DiskStore(tmp_path / "c")
    lock = Locks(store).acquire(KEY, {"rank": 0})
    assert lock is not None
    moved = _swap_for_link(store.locks, victim)
    time.sleep(0.01)
    lock.release()
    assert (victim / f"{KEY}.0.lock").read_text() == "victim's file\n"
    assert not (moved / f"{KEY}.0.lock").exists()  # our own lock went, by descriptor


class _Records(logging.Handler):
    """Collects records (dynamo_dist's logger may not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _plant_unsigned(root: Path, tmp_path: Path, how: str) -> Path:
    """An entry a second account plants in an unsigned cache: valid tar, recomputed sha256."""
    donor = DiskStore(tmp_path / "donor")
    src = _publish(donor, tmp_path, torch_version="victim's")
    dest = root / "entries" / "unsigned" / KEY[:2] / KEY
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest)
    if how == "attacker-owned":
        _chown_tree(dest.parent)
    elif how == "attacker-file":
        os.chown(dest / "artifact.tar", ATTACKER, ATTACKER)
    elif how == "writable-dir":
        os.chmod(root / "entries", 0o777)
    return dest


@pytest.mark.parametrize("how", ["attacker-owned", "attacker-file", "writable-dir"])
def test_unsigned_entries_must_be_ours_all_the_way_down(tmp_path, how):
    """Without a secret, trust only what nobody else could have written under the root.

    The victim made the cache under umask 000, an attacker planted an entry, and the
    victim then chmod 700'ed the root as advised: get() returned the planted entry
    and extract() unpacked it. Now it is a miss, and the entry is left where it is
    (not proven bad, and moving it may need rights we lack).
    """
    root = tmp_path / "c"
    old = os.umask(0)
    try:
        DiskStore(root).check_usable()
    finally:
        os.umask(old)
    planted = _plant_unsigned(root, tmp_path, how)
    os.chmod(root, 0o700)
    store = DiskStore(root)
    records = _Records()
    logging.getLogger("dynamo_dist.cache").addHandler(records)
    try:
        assert store.get(KEY) is None
        assert store.get(KEY) is None  # a waiter asks again and again: one line is enough
    finally:
        logging.getLogger("dynamo_dist.cache").removeHandler(records)
    assert [r.levelno for r in records.records] == [logging.WARNING]
    assert KEY[:12] in records.records[0].getMessage()
    assert (planted / "manifest.json").exists()
    with pytest.raises(EntryUntrusted):
        store.verify(planted, KEY)
    manifest = json.loads((planted / "manifest.json").read_text())
    with pytest.raises(EntryUntrusted):
        extract(Entry(KEY, planted, manifest, root=root), tmp_path / "out")
    assert not (tmp_path / "out" / "ab" / "cabc.so").exists()


def test_unsigned_store_never_creates_shared_writable_paths(tmp_path):
    """Under umask 000 the unsigned namespace used to come out 0777, open to planting."""
    root = tmp_path / "c"
    old = os.umask(0)
    try:
        store = DiskStore(root)
        store.check_usable()
        _publish(store, tmp_path)
        lock = Locks(store).acquire("e" * 40, {"rank": 0})
        assert lock is not None
        lock.release()
        bad = DiskStore(root)
        _publish(bad, tmp_path, key="ef" + "0" * 38)
        _edit_manifest(bad.entry_dir("ef" + "0" * 38), format=99)
        os.chmod(bad.entry_dir("ef" + "0" * 38) / "manifest.json", 0o644)  # else untrusted
        with pytest.raises(EntryRefused):
            bad.get("ef" + "0" * 38)
    finally:
        os.umask(old)
    for p in [root, *root.rglob("*")]:
        assert not os.lstat(p).st_mode & 0o022, p
    got = store.get(KEY)  # and our own entries still load
    assert got is not None
    extract(got, tmp_path / "out")
    assert (tmp_path / "out" / "ab" / "cabc.so").read_bytes() == b"kernel"


def test_merge_into_does_not_follow_planted_links(tmp_path):
    """merge_into followed links in the local cache (and in src) and wrote through them."""
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    os.chown(attacker, ATTACKER, ATTACKER)
    src = _room(tmp_path)
    (src / "ab" / "passwd").symlink_to("/etc/passwd")  # never copied
    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    os.symlink(attacker, local / "fxgraph")
    with pytest.raises(OSError, match=r"link|owned"):
        merge_into(src, local)
    assert list(attacker.iterdir()) == []

    # A directory of another account, or a link where a file goes: refused too.
    for plant in ("foreign-dir", "file-link"):
        local = tmp_path / f"local-{plant}"
        (local / "ab").mkdir(parents=True, mode=0o700)
        if plant == "foreign-dir":
            os.chown(local / "ab", ATTACKER, ATTACKER)
        else:
            (attacker / "evil.so").write_bytes(b"evil")
            (local / "ab" / "cabc.so").symlink_to(attacker / "evil.so")
        with pytest.raises(OSError, match=r"link|owned"):
            merge_into(src, local)
        assert (attacker / "evil.so").read_bytes() == b"evil" if plant == "file-link" else True

    # The honest case: files land as regular files of ours; existing ones are kept.
    local = tmp_path / "local-ok"
    (local / "ab").mkdir(parents=True, mode=0o700)
    (local / "ab" / "cabc.so").write_bytes(b"kernel")
    merge_into(src, local)
    assert (local / "fxgraph" / "entry").read_bytes() == b"pickled graph"
    assert not (local / "ab" / "passwd").exists()
    names = sorted(p.name for p in local.rglob("*"))
    assert names == ["ab", "cabc.so", "entry", "fxgraph"]
