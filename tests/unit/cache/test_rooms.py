"""Clean rooms: an entry holds only files this process wrote (``_cache_rooms``).

The leader used to complete an entry with kernels found in its local inductor cache,
which a co-tenant could have filled before its owner ran ``chmod 700``: the planted
files were signed and ran on every host. Now only files recorded when this process
wrote them (in a room, or installed from a verified entry) are copied or published,
each checked on its open descriptor.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from dynamo_dist.cache import fanout, fs, rooms
from dynamo_dist.cache.rooms import Built, tar_members
from dynamo_dist.dynamo import inductor


def _room(built: Built, local: Path, key: str, files: dict[str, bytes]) -> Path:
    room = built.make_room(local, key)
    for rel, data in files.items():
        (room / rel).parent.mkdir(parents=True, exist_ok=True)
        (room / rel).write_bytes(data)
    built.record_room(room)
    return room


def _published(built: Built, room: Path, tmp_path: Path) -> dict[str, bytes]:
    with open(tmp_path / "out.tar", "w+b") as fh:
        with tarfile.open(fileobj=fh, mode="w:") as tar:
            tar_members(tar, built.members(room))
        fh.seek(0)
        with tarfile.open(fileobj=fh, mode="r:") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


@pytest.fixture
def local(tmp_path: Path) -> Path:
    d = tmp_path / "local"
    d.mkdir(mode=0o700)
    return d


def test_a_kernel_built_in_an_earlier_room_completes_a_later_entry(
    local: Path, tmp_path: Path
) -> None:
    """Inductor keeps built kernels in memory: a later graph only re-writes the .cpp."""
    built = Built()
    _room(built, local, "a" * 40, {"ej/k.cpp": b"src", "ej/k.so": b"ELF own"})
    later = _room(built, local, "b" * 40, {"ej/k.cpp": b"src", "xy/g.cpp": b"g", "xy/g.so": b"G"})
    (local / "ej").mkdir()
    (local / "ej" / "k.so").write_bytes(b"PLANTED")  # never a source of an entry
    assert built.complete(later) == 1
    assert _published(built, later, tmp_path) == {
        "ej/k.cpp": b"src",
        "ej/k.so": b"ELF own",
        "xy/g.cpp": b"g",
        "xy/g.so": b"G",
    }


def test_nothing_is_taken_from_the_local_cache(local: Path, tmp_path: Path) -> None:
    """The attack of issue 26, row 1: a planted probe source and library in the local
    cache (the probe ran outside any room) went into the signed entry."""
    probes = sorted(inductor.isa_probe_sources())
    if not probes:
        pytest.skip("this torch's ISA probe sources are not recognised")
    built = Built()
    (local / "pq").mkdir()
    (local / "pq" / "probe.cpp").write_text(probes[0] + "\n")
    (local / "pq" / "probe.so").write_bytes(b"ATTACKER")
    (local / "ab").mkdir()
    (local / "ab" / "graph.so").write_bytes(b"ATTACKER")
    room = _room(built, local, "c" * 40, {"ab/graph.cpp": b"kernel"})
    assert built.complete(room) == 0
    assert _published(built, room, tmp_path) == {"ab/graph.cpp": b"kernel"}


def test_the_probe_travels_from_the_room_it_ran_in(local: Path, tmp_path: Path) -> None:
    probes = sorted(inductor.isa_probe_sources())
    if not probes:
        pytest.skip("this torch's ISA probe sources are not recognised")
    built = Built()
    _room(built, local, "d" * 40, {"pq/probe.cpp": probes[0].encode(), "pq/probe.so": b"ELF p"})
    later = _room(built, local, "e" * 40, {"ab/g.cpp": b"k", "ab/g.so": b"K"})
    built.complete(later)
    assert _published(built, later, tmp_path)["pq/probe.so"] == b"ELF p"


def test_files_installed_from_a_verified_entry_count_as_written(
    local: Path, tmp_path: Path
) -> None:
    built = Built()
    (local / "ej").mkdir()
    (local / "ej" / "k.so").write_bytes(b"ELF verified")
    built.record_installed(local, [(("ej", "k.so"), os.stat(local / "ej" / "k.so"))])
    room = _room(built, local, "f" * 40, {"ej/k.cpp": b"src"})
    assert built.complete(room) == 1
    assert _published(built, room, tmp_path)["ej/k.so"] == b"ELF verified"


def test_a_recorded_file_changed_since_is_neither_copied_nor_published(
    local: Path, tmp_path: Path
) -> None:
    built = Built()
    first = _room(built, local, "1" * 40, {"ej/k.cpp": b"s", "ej/k.so": b"ELF"})
    os.unlink(first / "ej" / "k.so")
    (first / "ej" / "k.so").write_bytes(b"EVIL")  # another inode
    later = _room(built, local, "2" * 40, {"ej/k.cpp": b"s"})
    assert built.complete(later) == 0
    with pytest.raises(OSError, match="changed since"):
        _published(built, first, tmp_path)


@pytest.mark.timeout(60)
def test_links_fifos_and_foreign_files_in_a_room_are_not_recorded(local: Path) -> None:
    built = Built()
    room = built.make_room(local, "3" * 40)
    (room / "ok.cpp").write_text("k")
    os.mkfifo(room / "hang.cpp")
    (room / "link.so").symlink_to("/etc/passwd")
    (room / "theirs.so").write_text("x")
    os.chown(room / "theirs.so", 3000, 3000)
    assert built.record_room(room) == 1
    assert [m.rel for m in built.rooms[room].values()] == [("ok.cpp",)]


def test_a_room_is_not_made_under_a_directory_someone_else_can_write(tmp_path: Path) -> None:
    built = Built()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    with pytest.raises(OSError, match="writable"):
        built.make_room(shared, "4" * 40)
    theirs = tmp_path / "theirs"
    (theirs / "dynamo_dist").mkdir(parents=True, mode=0o700)
    os.chmod(theirs, 0o755)
    os.chown(theirs / "dynamo_dist", 3000, 3000)
    with pytest.raises(OSError, match="owned by uid 3000"):
        built.make_room(theirs, "5" * 40)


# -- sweeping directories dated in the future (issue 30) ------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _swept_dir(local: Path, kind: str) -> tuple[Path, float, ModuleType, Callable[[], object]]:
    """A directory ``kind`` sweeps, left by a dead process: (it, keep for, module, sweep)."""
    dead = _dead_pid()
    if kind == "room":
        base = fs.private_dir(local, ("dynamo_dist", "cleanroom"))
        return (
            base / f"{'a' * 40}.{dead}.x1",
            rooms.ROOM_SWEEP_AGE_S,
            rooms,
            lambda: Built().make_room(local, "b" * 40),  # a new process's first room
        )
    if kind == "staging":

        def sweep_staging() -> None:
            with fs.walk(local, ()) as (fd,):
                rooms.sweep(fd, ".dd-staging.", 3, rooms.STAGING_SWEEP_AGE_S)

        name = f".dd-staging.{'a' * 12}.{dead}.x1"
        return local / name, rooms.STAGING_SWEEP_AGE_S, rooms, sweep_staging
    hosts = fs.private_dir(local, ("dynamo_dist", "hosts", fanout.host_tag()))
    return hosts / ("0" * 16), fanout.HOST_RUN_KEEP_S, fanout, lambda: fanout.host_copy_dir(local)


@pytest.mark.parametrize("kind", ["room", "staging", "host-run"])
def test_a_directory_dated_in_the_future_ages_from_its_first_sight(
    local: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A clean room, a staging directory or another run's host copies whose mtime lay
    ahead of the clock (written before the clock was stepped back, or set by hand) was
    never old enough to sweep. Its age now counts from when it is first seen, by this
    process and the later ones (it is re-dated to now): swept as late as the rule says,
    never sooner."""
    old, keep, module, sweep = _swept_dir(local, kind)
    (old / "sub").mkdir(parents=True, mode=0o700)
    ahead = time.time() + 10 * 365 * 86400
    os.utime(old, (ahead, ahead))
    sweep()
    assert old.exists(), "first seen just now: young"
    assert old.stat().st_mtime <= time.time() + 1, "its age counts from its first sight"
    real = time.time
    monkeypatch.setattr(module, "time", SimpleNamespace(time=lambda: real() + keep / 2))
    sweep()
    assert old.exists(), "not old yet"
    monkeypatch.setattr(module, "time", SimpleNamespace(time=lambda: real() + keep + 60))
    sweep()
    assert not old.exists(), "as old as the rule says, its owner dead: swept"


def test_a_foreign_directory_dated_in_the_future_ages_from_this_process_first_sight(
    tmp_path: Path,
) -> None:
    """One that is not ours is not re-dated: its age counts from this process's first
    sight of it, on its monotonic clock."""
    from dynamo_dist.cache import fs_tree

    d = tmp_path / "theirs"
    d.mkdir()
    ahead = time.time() + 86400
    os.utime(d, (ahead, ahead))
    if os.geteuid() == 0:
        os.chown(d, 3000, 3000)
    with fs.walk(tmp_path, ()) as (fd,):
        first = fs_tree.untouched_for(fd, "theirs", os.lstat(d), time.time())
        time.sleep(0.05)
        later = fs_tree.untouched_for(fd, "theirs", os.lstat(d), time.time())
    assert first < later < 3600 and os.lstat(d).st_mtime == ahead
