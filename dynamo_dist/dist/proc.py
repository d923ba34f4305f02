"""This process among the job's: whether a local process still runs (segment sweeping,
cache-lock takeover), and which start of the job this is."""

from __future__ import annotations

import os
import socket
from typing import Literal

#: What :func:`identity_state` tells of a process.
ProcessState = Literal["exited", "running", "stopped"]


def restart_count() -> str:
    """torchrun's restart count (``"0"`` outside torchrun): the one reading of it.

    Every key this job writes in its store, and every host copy it keeps, is per
    restart: an earlier attempt's must never count for this one.
    """
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def pid_alive(pid: int) -> bool:
    """False for a pid that is gone or a zombie (exited, not yet reaped by its launcher)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False  # OverflowError: no such pid can exist
    except PermissionError:
        return True
    return _run_state(pid) not in ("Z", "X")


def _run_state(pid: int) -> str | None:
    """The process's state letter (field 3 of /proc/PID/stat): R, S, T (stopped), Z, ..."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[0]
    except IndexError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int | str) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat).

    With the boot id and the PID namespace it names one process for good: a pid
    reused after the process died has another start time.
    """
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    """The PID namespace pids in this /proc are valid in; None if /proc is not ours.

    A process that entered a new PID namespace without mounting its own /proc sees
    another namespace's pids there: then no pid can be checked.
    """
    stat = _read("/proc/self/stat")
    if stat is None or stat.split(" ", 1)[0] != str(os.getpid()):
        return None
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def identity() -> dict[str, object]:
    """This process, named so that any process on any host can tell whether it is alive.

    A pid alone means nothing outside its PID namespace: two containers that share a
    hostname (or a host's network) each have a pid 1. So the pid comes with the kernel's
    boot id and the PID namespace it is valid in, and with its start time, which tells
    a live process from a later one that reuses its pid.
    """
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pid_namespace(),
        "pid": os.getpid(),
        "start": _start_ticks("self"),
    }


_PID_LIMIT = 1 << 22  # Linux's pid_max can be at most 2**22


def identity_alive(ident: object, uid: int | None = None) -> bool | None:
    """Whether the process named by :func:`identity` still runs; None if it cannot be told
    (see :func:`identity_state`)."""
    state = identity_state(ident, uid)
    return None if state is None else state != "exited"


def identity_state(ident: object, uid: int | None = None) -> ProcessState | None:
    """The process named by :func:`identity`: exited, running or stopped; None if it
    cannot be told.

    Stopped is a signal's stop (SIGSTOP, SIGTSTP: ``T``) or a debugger's (``t``): such a
    process cannot beat or make progress until someone resumes it, which for the orphan
    of an earlier job (its launcher gone) is never.

    Only a process of this host, kernel boot and PID namespace can be checked here (the
    host too: cloned VMs share a boot id and the initial namespace's inode); anything
    else, and anything malformed (identities are read from shared, writable files), is
    None: the caller then judges by heartbeats. With ``uid`` (the owner of the file the
    identity came from), a live process is only vouched for if it runs as that uid, so
    a planted file naming someone else's process (pid 1, say) proves nothing.
    """
    if not isinstance(ident, dict):
        return None
    host, boot, pidns, pid, start = (
        ident.get(k) for k in ("host", "boot", "pidns", "pid", "start")
    )
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < _PID_LIMIT:
        return None
    if not all(isinstance(v, str) and v for v in (host, boot, pidns)):
        return None
    if host != socket.gethostname() or boot != _read("/proc/sys/kernel/random/boot_id"):
        return None
    if pidns != _pid_namespace():
        return None
    if not pid_alive(pid):
        return "exited"
    now = _start_ticks(pid)
    if now is None or not isinstance(start, int) or isinstance(start, bool):
        return None
    if now != start:
        return "exited"  # the pid was reused: ours is gone
    if uid is not None:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                return None
        except OSError:
            return None
    return "stopped" if _run_state(pid) in ("T", "t") else "running"
