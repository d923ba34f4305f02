"""Leader locks of the shared cache: one compiler per graph, taken over only from the dead.

A lock is a file ``locks/<ns>/<key>.<gen>.lock`` created with ``O_CREAT | O_EXCL``;
the highest generation present is the graph's leader. Three choices make it safe on a
shared filesystem that many hosts, containers and attackers write to:

* **Takeover is a compare-and-swap.** A waiter that finds generation ``g`` dead does
  not delete it (two breakers would each delete, then each create, and both lead): it
  creates generation ``g + 1``, again with ``O_EXCL``, so of any number of breakers of
  the same dead lock exactly one wins. The dead files are removed by the winner when
  it releases, never by a loser, and a holder only ever unlinks its own inode.
* **Liveness never compares clocks.** The holder touches its file every
  ``HEARTBEAT_S``; a waiter records, on its own monotonic clock, when it last saw the
  file's mtime *change*. No beat for ``stale_after`` seconds means dead, whatever
  the two hosts' clocks say (a clock 300 s ahead used to break a live leader's lock).
  The file is opened before each look, so NFS revalidates its cached attributes.
  What a process saw is remembered for as long as it runs, by all of its waits: a lock
  found silent once is not waited out again at every later miss of its key (issue 30:
  a planted lock this job could not take over cost ``stale_after`` per miss).
* **Identities are valid across PID namespaces.** A pid means something only in its
  namespace (two containers sharing a hostname both have a pid 1), so a lock names
  its holder by host, boot id, PID namespace, pid and start time
  (:func:`._proc.identity`); only a holder of this host, boot and namespace is
  checked directly, and found dead at once. Found alive (and running as the lock
  file's owner), a leader is waited for ``ALIVE_GRACE`` times longer before silence
  counts (a host's fetcher is not: taking it over costs a read, not a compile). Found
  stopped (SIGSTOP, a debugger) at every look for ``STOPPED_AFTER`` seconds, and silent
  as long, it is given up: a stopped orphan of an earlier job, its launcher killed, is
  never resumed, and one resumed after a takeover only compiles the graph again.
  Elastic restart counts are not used: they are per agent, not per job.

Everything in a lock file was written by someone who could write the directory, so
its content is only ever advice; a lock that cannot be read or parsed is a holder with
no name that never beats, and one that is not a regular file (a directory, a FIFO, a
link) is no lock of ours at all: it is taken over at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_dist.cache import fs
from dynamo_dist.cache.fs_ops import FsOps, counting, tick
from dynamo_dist.cache.store import DiskStore
from dynamo_dist.dist import proc as dist_proc

__all__ = ["HEARTBEAT_S", "Holder", "Lock", "Locks", "Watch", "look", "owner_record"]

HEARTBEAT_S = 2.0
# How many times longer a silent holder is waited for when its process is seen alive.
ALIVE_GRACE = 4
# Seconds of silence after which a holder seen stopped here is taken over: a few missed
# heartbeats, far less than ``stale_after`` (which the waiters' timeout may not outlast).
STOPPED_AFTER = 3 * HEARTBEAT_S
# More generations than takeovers a real graph ever needs; a directory holding more
# was filled by someone else, and the cache then costs a local compile, not a hang.
MAX_GENERATIONS = 64
_MAX_LOCK_BYTES = 1 << 16


def owner_record(rank: int) -> dict[str, Any]:
    """What a lock says about its holder: for people (rank, host) and for liveness."""
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "proc": dist_proc.identity(),
        "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def _plain(value: Any, limit: int = 200) -> str:
    """A value from a lock file, made printable and short (it goes into log lines)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape", "replace").decode("ascii", "replace")
    return text[:limit]


@dataclass(frozen=True)
class Holder:
    """One look at the lock of a key: its generation, its file, and what it claims."""

    gen: int
    inode: tuple[int, int]  # (st_dev, st_ino): which file, across renames and reuse
    beat: int  # st_mtime_ns: changes with every heartbeat
    record: dict[str, Any]
    uid: int | None = None  # the lock file's owner: who could have written the record
    regular: bool = True  # a regular file: only those are ever locks of ours

    def describe(self) -> str:
        r = self.record
        return f"rank {_plain(r.get('rank'))} ({_plain(r.get('host'))}, pid {_plain(r.get('pid'))})"

    def state_by_identity(self) -> dist_proc.ProcessState | None:
        """Exited, running or stopped when the holder's process can be checked from
        here, else None."""
        return dist_proc.identity_state(self.record.get("proc"), self.uid)

    def alive_by_identity(self) -> bool | None:
        """True/False when the holder's process can be checked from here, else None."""
        return dist_proc.identity_alive(self.record.get("proc"), self.uid)

    def stopped_by_identity(self) -> bool:
        """Whether the holder's process is seen here, stopped (it cannot beat)."""
        return self.state_by_identity() == "stopped"

    def dead_by_identity(self) -> bool:
        """Whether the holder is known dead without waiting for missed heartbeats."""
        return self.alive_by_identity() is False


#: When this process first saw each lock file, by (generation, inode), with the mtime it
#: has now, on this process's monotonic clock. Shared by all of the process's waits, so
#: silence seen during one miss of a key still counts at the next: a lock found stale
#: that this rank cannot take over (a co-tenant's, in a directory it cannot write) is not
#: waited out again for ``stale_after`` at every later miss (issue 30).
_FIRST_SEEN: dict[tuple[int, tuple[int, int]], tuple[int, float]] = {}
#: When this process first saw each lock's holder stopped, at every look since: a holder
#: seen running again is forgotten here (a sampling profiler or a debugger stops a live
#: leader for moments; only a holder that stays stopped is given up early).
_FIRST_STOPPED: dict[tuple[int, tuple[int, int]], float] = {}
#: More lock files than one process waits on; past this the memory starts again (a
#: forgotten lock costs one more wait, never a wrong verdict).
_MAX_REMEMBERED = 4096


class Watch:
    """One waiter's judge of a key's holder, timed on this process's own clock.

    ``alive_grace``: how many times ``stale_after`` a silent holder whose process is seen
    alive is waited for (see :meth:`dead`).
    """

    def __init__(self, stale_after: float, alive_grace: int = ALIVE_GRACE) -> None:
        self.stale_after = stale_after
        self.alive_grace = alive_grace

    def silent_for(self, holder: Holder) -> float:
        """Seconds since this process first saw ``holder`` with its present mtime.

        0 at the first look: a lock's mtime says nothing about when it last beat on
        this host's clock, only a change of it does.
        """
        now = time.monotonic()
        ident = (holder.gen, holder.inode)
        seen = _FIRST_SEEN.get(ident)
        if seen is not None and seen[0] == holder.beat:
            return now - seen[1]
        if len(_FIRST_SEEN) >= _MAX_REMEMBERED:
            _FIRST_SEEN.clear()
        _FIRST_SEEN[ident] = (holder.beat, now)
        return 0.0

    def stopped_for(self, holder: Holder, state: dist_proc.ProcessState | None) -> float:
        """Seconds ``holder`` has been seen stopped at every look; 0 if not now.

        ``state``: this look's :meth:`Holder.state_by_identity`.
        """
        ident = (holder.gen, holder.inode)
        if state != "stopped":
            _FIRST_STOPPED.pop(ident, None)
            return 0.0
        now = time.monotonic()
        if len(_FIRST_STOPPED) >= _MAX_REMEMBERED:
            _FIRST_STOPPED.clear()
        return now - _FIRST_STOPPED.setdefault(ident, now)

    def dead(self, holder: Holder) -> bool:
        """Not a lock file, dead by identity, or silent for longer than ``stale_after``.

        A holder alive by identity (this host, boot and PID namespace, running as the
        lock file's owner) gets ``alive_grace`` times longer: a live leader whose
        heartbeat stalls (swapping, frozen) is most likely stuck, and the waiters'
        timeout deals with that; but a lock that never beats is not kept for ever on
        the word of a file.
        """
        silent = self.silent_for(holder)
        if not holder.regular:
            return True  # a directory, FIFO or link: nothing of ours ever made it
        state = holder.state_by_identity()
        if state == "exited":
            return True
        # Stopped and silent all along: an orphan nobody will resume. Both clocks, since
        # a live leader may be silent (holding the GIL) and stopped a moment.
        early = min(STOPPED_AFTER, self.stale_after)
        if self.stopped_for(holder, state) > early and silent > early:
            return True
        limit = self.stale_after * (self.alive_grace if state is not None else 1)
        return silent > limit

    def reason(self, holder: Holder) -> str:
        """Why :meth:`dead` gave ``holder`` up, for a log line."""
        if not holder.regular:
            return "its lock is a directory, FIFO or link: never a lock of ours"
        state = holder.state_by_identity()
        if state == "exited":
            return "its process has exited"
        silent = f"no heartbeat for {self.silent_for(holder):.0f}s"
        if self.stopped_for(holder, state) > 0:
            return f"{silent}, its process stopped (SIGSTOP, a debugger, an earlier job's orphan)"
        if state is not None:
            return f"{silent}, though its process is still there: frozen or swapping"
        return silent


_LOCK_NAME = re.compile(r"^(?P<key>[0-9a-f]{8,128})\.(?P<gen>\d{1,6})\.lock$")


class Locks:
    """The leader locks of one cache directory (``locks/<ns>/`` of ``store``)."""

    def __init__(self, store: DiskStore) -> None:
        self.store = store

    def path(self, key: str, gen: int) -> Path:
        """Where generation ``gen`` of ``key``'s lock is, for messages."""
        return self.store.locks / f"{key}.{gen}.lock"

    def holder(self, key: str) -> Holder | None:
        """The highest generation of ``key``'s lock, or None if nobody holds it.

        OSError if the locks directory cannot be used. A look creates nothing (the
        waiters poll it): no locks directory yet means no holder.
        """
        try:
            with self.store.walk("locks", self.store.namespace) as fds:
                gens = self._generations(fds[-1], key)
                for gen in sorted(gens, reverse=True):
                    found = look(fds[-1], f"{key}.{gen}.lock", gen)
                    if found is not None:
                        return found
        except FileNotFoundError:
            pass
        return None

    def acquire(self, key: str, owner: dict[str, Any], over: Holder | None = None) -> Lock | None:
        """The lock of ``key``: generation 0 if free, or the one after ``over`` (dead).

        None when another process got there first. OSError if locks are unusable here
        (including a directory holding more than ``MAX_GENERATIONS`` generations).
        """
        gen = 0 if over is None else over.gen + 1
        if gen >= MAX_GENERATIONS:
            raise OSError(f"more than {MAX_GENERATIONS} lock generations for {key[:12]}")
        with self.store.walk("locks", self.store.namespace, create=True) as fds:
            name = f"{key}.{gen}.lock"
            tick("writes", 2)
            try:
                fd = fs.create_fd(fds[-1], name, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, json.dumps({**owner, "gen": gen}).encode())
                # Its own descriptors: heartbeat and release touch only this inode in this
                # directory, whatever the names become.
                return Lock(key, gen, fd=fd, dir_fd=os.dup(fds[-1]), ops=self.store.ops)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    fs.remove(fds[-1], name)
                raise

    @staticmethod
    def _generations(dir_fd: int, key: str) -> list[int]:
        gens = []
        tick("listdirs")
        for name in fs.names(dir_fd):
            m = _LOCK_NAME.match(name)
            if m and m["key"] == key:
                gens.append(int(m["gen"]))
        return gens


def look(dir_fd: int, name: str, gen: int) -> Holder | None:
    """One look at lock file ``name``; None if it vanished meanwhile.

    A regular file is opened (O_NONBLOCK: a FIFO never blocks; opening makes NFS
    revalidate the attributes) and read from that descriptor. Anything else is a
    holder without a record.
    """
    tick("opens")
    tick("stats")
    try:
        fd, st = fs.open_file(dir_fd, name)
    except FileNotFoundError:
        return None
    except OSError:  # a link, a FIFO, a directory, or unreadable: judged by its metadata
        try:
            st = fs.lstat(dir_fd, name)
        except FileNotFoundError:
            return None
        regular = stat.S_ISREG(st.st_mode)
        return Holder(gen, (st.st_dev, st.st_ino), st.st_mtime_ns, {}, st.st_uid, regular)
    try:
        record: Any = {}
        tick("reads")
        with contextlib.suppress(OSError, ValueError, RecursionError):
            record = json.loads(os.read(fd, _MAX_LOCK_BYTES) or b"{}")
    finally:
        os.close(fd)
    if not isinstance(record, dict):
        record = {}
    return Holder(gen, (st.st_dev, st.st_ino), st.st_mtime_ns, record, st.st_uid)


class Lock:
    """A held leader lock with a heartbeat: its mtime changes while the owner lives."""

    def __init__(self, key: str, gen: int, fd: int, dir_fd: int, ops: FsOps | None = None) -> None:
        self.key = key
        self.gen = gen
        self.name = f"{key}.{gen}.lock"
        self._fd = fd
        self._dir_fd = dir_fd
        self._ops = ops
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, daemon=True, name="dynamo_dist-cache-lock"
        )
        self._thread.start()

    def _beat(self) -> None:
        with counting(self._ops):
            while not self._stop.wait(HEARTBEAT_S):
                tick("writes")
                with contextlib.suppress(OSError, NotImplementedError):
                    fs.touch(self._fd)

    def note(self, record: dict[str, Any]) -> None:
        """Rewrite the record in the lock file (advice for its readers, like all of it).

        A reader may see it half-written: it then reads no record, which every reader
        already handles (a holder with no name). Best effort.
        """
        if self._stop.is_set():
            return
        data = json.dumps({**record, "gen": self.gen}).encode()
        with counting(self._ops), contextlib.suppress(OSError):
            tick("writes", 2)
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        """Unlink our own file (only while the name is still our inode), then the dead ones.

        Lower generations were superseded by this one: their holders were dead, so
        removing them takes nothing from anyone. Ascending order: a newcomer never sees
        a lower generation without the higher one it yields to.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()  # the heartbeat must not touch a closed (reused) descriptor
        _tick_to(self._ops, "writes", 1 + self.gen)
        _tick_to(self._ops, "stats", 2)
        try:
            for gen in range(self.gen):
                with contextlib.suppress(OSError):
                    fs.remove(self._dir_fd, f"{self.key}.{gen}.lock")
            with contextlib.suppress(OSError):
                ours = fs.fstat(self._fd)
                there = fs.lstat(self._dir_fd, self.name)
                if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
                    fs.remove(self._dir_fd, self.name)
        finally:
            os.close(self._fd)
            os.close(self._dir_fd)


def _tick_to(ops: FsOps | None, kind: str, n: int) -> None:
    with counting(ops):
        tick(kind, n)


def stale_after(timeout: float) -> float:
    """Seconds without a heartbeat after which a holder counts as dead."""
    return max(30.0, timeout / 4) if math.isfinite(timeout) else 30.0
