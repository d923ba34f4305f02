"""Clean rooms: where a leader compiles, and the record of every file this process wrote.

A leader compiles each graph in a *clean room*, a fresh private directory set as
``TORCHINDUCTOR_CACHE_DIR`` for the compile, so everything inductor writes for the graph
lands in one place. What is published, and signed, is only what this process wrote:

* after the compile, :meth:`Built.record_room` walks the room (by descriptor, no link
  followed) and records each regular file of ours with its inode, size and mtime;
* files an entry needs that the compile did not write again (a C++ kernel built for an
  earlier graph of this process, the CPU ISA probe's binaries) are copied in only from
  this process's earlier rooms, or from files this process itself installed from a
  verified entry (:meth:`Built.record_installed`): never from the local inductor cache
  or any other directory, whose files someone else may have planted (a co-tenant who
  could write ``torchinductor_<user>`` before its owner ran ``chmod 700``);
* :meth:`Built.members` opens every file to publish without following links and checks
  on that descriptor that it is still the regular file, of our uid, with the inode
  recorded: the very bytes that go into the signed archive.

Rooms are removed at exit (what inductor compiled may read files under them until
then); rooms and staging directories of processes that died are swept by the next
process on the host that leads (named by pid, checked on this host, and old).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.dist.proc import pid_alive
from dynamo_dist.dynamo import inductor

__all__ = ["ROOMS", "Built", "FileMark", "Member", "sweep"]

#: One file of an entry: its name in the archive, its open descriptor and its fstat.
Member = tuple[str, int, os.stat_result]

#: Top-level directories of a room that are never published: inductor's lock files,
#: and our own directory (host copies, rooms) should a room ever be the local cache.
_NOT_PUBLISHED = ("locks", "dynamo_dist")
#: Probe sources are a few hundred bytes; anything larger is not one.
_PROBE_MAX_BYTES = 64 << 10
#: A room lives as long as its process; one of a dead process this old is swept.
ROOM_SWEEP_AGE_S = 6 * 3600
#: A staging directory lives at most one agreement (``timeout``).
STAGING_SWEEP_AGE_S = 3600


@dataclass(frozen=True)
class FileMark:
    """A file this process wrote: where, and the identity it had when written."""

    base: Path
    rel: tuple[str, ...]
    dev: int
    ino: int
    size: int
    mtime_ns: int

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
        ) and (st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode))


@dataclass
class Built:
    """Everything this process compiled or installed, by path relative to a cache dir."""

    rooms: dict[Path, dict[tuple[str, ...], FileMark]] = field(default_factory=dict)
    #: The newest file of ours under each relative path, in any room or install.
    latest: dict[tuple[str, ...], FileMark] = field(default_factory=dict)
    #: Relative paths of the CPU ISA probe's sources (``.cpp``), once seen.
    probes: set[tuple[str, ...]] = field(default_factory=set)
    swept: set[Path] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- rooms ---------------------------------------------------------------------------
    def make_room(self, local: Path, key: str) -> Path:
        """A fresh private room for one compile, under ``local`` (which must be private)."""
        base = fs.private_dir(local, ("dynamo_dist", "cleanroom"))
        with fs.walk(base, ()) as (base_fd,):
            if base not in self.swept:
                self.swept.add(base)
                sweep(base_fd, "", 1, ROOM_SWEEP_AGE_S)
            name = fs.make_temp_dir(base_fd, f"{key[:40]}.{os.getpid()}.")
        room = base / name
        with self.lock:
            self.rooms[room] = {}
        return room

    def record_room(self, room: Path) -> int:
        """Record the regular files of ours that the compile wrote in ``room``; how many."""
        marks = {m.rel: m for m in _scan(room, room)}
        probes = inductor.isa_probe_sources()
        with self.lock:
            self.rooms.setdefault(room, {}).update(marks)
            for m in marks.values():
                self.latest[m.rel] = m
        for m in marks.values():
            if m.rel[-1].endswith(".cpp") and probes and _small_text(m) in probes:
                self.probes.add(m.rel)
        return len(marks)

    def record_installed(
        self, local: Path, created: list[tuple[tuple[str, ...], os.stat_result]]
    ) -> None:
        """Record files this process created in ``local`` from a verified entry."""
        with self.lock:
            for rel, st in created:
                self.latest.setdefault(rel, _mark(local, rel, st))
        probes = inductor.isa_probe_sources()
        for rel, st in created:
            if rel[-1].endswith(".cpp") and probes and _small_text(_mark(local, rel, st)) in probes:
                self.probes.add(rel)

    def complete(self, room: Path) -> int:
        """Copy in the built files ``room``'s graph needs that its compile did not write.

        * Inductor keeps compiled C++ kernels in memory by source hash: a kernel built
          for an earlier graph is only written again as ``.cpp`` for a later graph, never
          rebuilt, so its ``.so`` is in an earlier room (or was installed).
        * The CPU ISA probe runs once per process, yet every process that loads a kernel
          runs it: without its binaries a fresh host spends a gcc run per ISA before the
          first kernel loads, so every entry carries them.

        Only from files this process recorded, each checked on its descriptor
        (:meth:`FileMark.matches`); a file that fails the check is not copied. Returns how
        many files were copied.
        """
        with self.lock:
            have = dict(self.rooms.get(room, {}))
            wanted = {_built_of(rel) for rel in have if rel[-1].endswith(".cpp")}
            for rel in self.probes:
                wanted |= {rel, _built_of(rel)}
            todo = [self.latest[rel] for rel in sorted(wanted - set(have)) if rel in self.latest]
        copied = 0
        for mark in todo:
            new = _copy_mark(mark, room)
            if new is not None:
                copied += 1
                with self.lock:
                    self.rooms[room][mark.rel] = new
        return copied

    def members(self, room: Path) -> Iterator[Member]:
        """The files to publish from ``room``: each open, checked against its record.

        Raises OSError if a recorded file is no longer the one this process wrote (its
        inode, size, mtime or owner changed): an entry is never built from it.
        """
        with self.lock:
            marks = sorted(self.rooms.get(room, {}).values(), key=lambda m: m.rel)
        for mark in marks:
            fd, st = _open_mark(mark)
            try:
                yield "/".join(mark.rel), fd, st
            finally:
                os.close(fd)

    def remove_rooms(self) -> None:
        with self.lock:
            rooms = list(self.rooms)
            self.rooms.clear()
            self.latest.clear()
        for room in rooms:
            fs_tree.remove_path(room, owner=os.geteuid())


#: This process's record. Process-wide by nature: a kernel built in one cache's room may
#: complete another's entry, and inductor's in-memory kernel cache is process-wide too.
ROOMS = Built()
atexit.register(ROOMS.remove_rooms)


def _built_of(source: tuple[str, ...]) -> tuple[str, ...]:
    """The shared library inductor builds from C++ source ``<dir>/<hash>.cpp``."""
    return (*source[:-1], source[-1].removesuffix(".cpp") + ".so")


def _mark(base: Path, rel: tuple[str, ...], st: os.stat_result) -> FileMark:
    return FileMark(base, rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _scan(base: Path, room: Path) -> Iterator[FileMark]:
    """Regular files of ours under ``room`` (by descriptor), as marks relative to ``base``."""
    with fs.walk(room, ()) as (fd,):
        yield from _scan_at(fd, base, (), 0)


def _scan_at(dir_fd: int, base: Path, rel: tuple[str, ...], depth: int) -> Iterator[FileMark]:
    if depth > 32:
        return
    for name, st in fs.entries(dir_fd):
        if not rel and name in _NOT_PUBLISHED:
            continue
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError):
                sub = fs.open_dir(dir_fd, name)
                try:
                    yield from _scan_at(sub, base, (*rel, name), depth + 1)
                finally:
                    os.close(sub)
        elif stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            yield _mark(base, (*rel, name), st)


def _open_mark(mark: FileMark) -> tuple[int, os.stat_result]:
    """The recorded file, open; OSError unless it is still exactly what was recorded."""
    with fs.walk(mark.base, mark.rel[:-1]) as fds:
        fd, st = fs.open_file(fds[-1], mark.rel[-1], owner=os.geteuid())
    if not mark.matches(st):
        os.close(fd)
        raise fs.NotPrivate("/".join(mark.rel), "changed since this process wrote it")
    return fd, st


def _small_text(mark: FileMark) -> str | None:
    """The stripped text of a small recorded file, else None (never blocks)."""
    if mark.size > _PROBE_MAX_BYTES:
        return None
    try:
        fd, _ = _open_mark(mark)
    except OSError:
        return None
    try:
        return os.read(fd, _PROBE_MAX_BYTES + 1).decode(errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _copy_mark(mark: FileMark, room: Path) -> FileMark | None:
    """Copy a recorded file into ``room`` under the same relative path; its new mark."""
    try:
        fd, st = _open_mark(mark)
    except OSError:
        return None
    try:
        with fs.walk(room, mark.rel[:-1], create_mode=0o700) as fds:
            mode = 0o755 if mark.rel[-1].endswith(".so") else 0o644
            fs.copy_file(fd, fds[-1], mark.rel[-1], mode, (st.st_atime_ns, st.st_mtime_ns))
            return _mark(room, mark.rel, fs.lstat(fds[-1], mark.rel[-1]))
    except OSError:
        return None
    finally:
        os.close(fd)


def tar_members(tar: tarfile.TarFile, members: Iterator[Member]) -> None:
    """Add each member to ``tar`` from its open descriptor (never by path)."""
    for name, fd, st in members:
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mode = stat.S_IMODE(st.st_mode) & 0o755
        info.mtime = int(st.st_mtime)
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as fh:
            tar.addfile(info, fh)


def bytes_member(name: str, data: bytes) -> Iterator[Member]:
    """One in-memory file as a member (a profile), through an anonymous private file."""
    with fs.anonymous_file(None) as fh:
        fh.write(data)
        fh.flush()
        yield name, fh.fileno(), fs.fstat(fh.fileno())


def sweep(base_fd: int, prefix: str, pid_at: int, max_age: float) -> None:
    """Remove directories ``prefix*`` of ``base_fd`` left by dead processes of ours.

    The pid is field ``pid_at`` of the name split at dots. Old as well as dead: a
    local cache shared by containers (another PID namespace) must not lose a live
    process's directory to a pid that means something else here. So a dead pid proves
    nothing either, and a directory dated ahead of the clock (stepped back since) is as
    old as the time since it was first seen, not older.
    """
    now = time.time()
    with contextlib.suppress(OSError):
        for name, st in fs.entries(base_fd):
            parts = name.split(".")
            if not name.startswith(prefix) or len(parts) <= pid_at:
                continue
            if not parts[pid_at].isdigit() or not stat.S_ISDIR(st.st_mode):
                continue
            pid = int(parts[pid_at])
            if pid == os.getpid():
                continue
            # A date ahead of the clock counts from its first sight (fs_tree.untouched_for).
            old = fs_tree.untouched_for(base_fd, name, st, now) > max_age
            if old and not pid_alive(pid):
                fs_tree.remove_tree(base_fd, name, owner=os.geteuid())


def staging_dir(local: Path, key: str) -> Path:
    """A fresh private directory directly inside the private ``local`` for one unpack."""
    with fs.walk(local, ()) as (fd,):
        if local not in ROOMS.swept:
            ROOMS.swept.add(local)
            sweep(fd, ".dd-staging.", 3, STAGING_SWEEP_AGE_S)
        name = fs.make_temp_dir(fd, f".dd-staging.{key[:12]}.{os.getpid()}.")
    return local / name
