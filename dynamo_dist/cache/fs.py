"""The cache's one filesystem layer: every open, read, write, rename and removal.

Every directory the cache touches (the shared directory, a host copy, a clean room, the
local inductor cache) may hold what another account planted: links, FIFOs, devices,
files of other owners, names swapped between a check and a use. Rather than each module
remembering the rules, every filesystem call of the cache goes through this module
(``tests/unit/test_rules.py`` parses the cache modules and fails on any other), which:

* opens with ``O_NOFOLLOW | O_NONBLOCK`` (``O_DIRECTORY`` for directories), then checks
  the type (and, where asked, the owner) with ``fstat`` on the descriptor it returns, so
  a FIFO never blocks and a name swapped after the check changes nothing;
* reaches everything below a root from the root's descriptor, one directory at a time,
  and creates, renames and unlinks relative to such a descriptor;
* creates files with ``O_CREAT | O_EXCL`` and directories under unpredictable names;
* walks from a root down a path with one walker, :func:`walk`, the cache's only one
  (whole trees are walked and removed by ``cache/fs_tree.py``, built on this module).

Errors are ``OSError`` with the errno of the cause; callers decide what a failure means
(a refused entry, a local problem). The walker counts its operations on a store's
directory (``cache/fs_ops.py``) when asked; callers count the rest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from dynamo_dist.cache.fs_ops import tick

__all__ = [
    "CREATE_FLAGS",
    "DIR_FLAGS",
    "READ_FLAGS",
    "NotPrivate",
    "anonymous_file",
    "check_private",
    "chmod",
    "copy_file",
    "create_fd",
    "create_file",
    "entries",
    "fstat",
    "fsync",
    "lstat",
    "make_dir",
    "make_temp_dir",
    "names",
    "open_dir",
    "open_file",
    "open_root",
    "private_dir",
    "private_temp_dir",
    "read_file",
    "read_system_text",
    "remove",
    "rename",
    "stat_root",
    "touch",
    "untrusted_reason",
    "walk",
    "write_new",
]

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC


class NotPrivate(OSError):
    """A directory or file that another account owns or can write, where only ours will do."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(errno.EPERM, why, what)


# -- trust -------------------------------------------------------------------------------
def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_private(st: os.stat_result, what: str, root_ok: bool = True) -> None:
    """NotPrivate unless ``st`` is ours (or root's) and writable by no one else."""
    if not (st.st_uid == os.geteuid() or (root_ok and st.st_uid == 0)):
        raise NotPrivate(what, f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise NotPrivate(what, f"group- or other-writable (mode {stat.S_IMODE(st.st_mode):04o})")


def _component_problem(path: Path, st: os.stat_result, last: bool) -> str | None:
    if not _trusted_owner(st.st_uid):
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or root"
    if stat.S_ISLNK(st.st_mode):
        return None  # its own mode means nothing; its target is checked separately
    if st.st_mode & 0o022:
        # Others may create names in a sticky directory (/tmp) but not replace ours.
        if not last and st.st_mode & stat.S_ISVTX:
            return None
        return f"{path} is group- or other-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _chain_problem(path: Path, as_parent: bool = False) -> str | None:
    """The first component of ``path`` (absolute, from / down) that others could change."""
    parts = path.parts
    for i in range(1, len(parts) + 1):
        p = Path(*parts[:i])
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None  # not there yet: whoever creates it is checked next time
        problem = _component_problem(p, st, last=i == len(parts) and not as_parent)
        if problem:
            return problem
    return None


def untrusted_reason(path: str | os.PathLike[str], as_parent: bool = False) -> str | None:
    """Why files under ``path`` could have been written by another user, or None.

    Every component from / down must be owned by this user or root and not be
    group- or other-writable; a sticky world-writable directory (/tmp) is fine
    as a parent, never as ``path`` itself. Symlinks are checked on both sides:
    who could replace the link, and the directory it leads to. ``as_parent``: ``path``
    is the parent of what will be used, so it may be sticky too.
    """
    given = Path(os.path.abspath(path))
    problem = _chain_problem(given, as_parent)
    if problem is None:
        real = Path(os.path.realpath(given))
        if real != given:
            problem = _chain_problem(real, as_parent)
    return problem


# -- directories ---------------------------------------------------------------------------
def open_root(root: str | os.PathLike[str], create: bool = False, mode: int = 0o777) -> int:
    """A descriptor of a root the user chose (a link there is followed, once).

    Everything below it is reached from this descriptor and never through a link.
    ``O_NONBLOCK``: a FIFO given as the root fails (ENOTDIR) instead of blocking.
    """
    if create:
        os.makedirs(root, mode=mode, exist_ok=True)
    return os.open(root, _ROOT_FLAGS)


def open_dir(parent_fd: int, name: str, create_mode: int | None = None) -> int:
    """Directory ``name`` of ``parent_fd``, never through a link (created if asked).

    A planted link (``locks -> /home/victim``) or a FIFO fails with ELOOP or ENOTDIR,
    with a message that says so, instead of leading elsewhere or blocking.
    """
    if create_mode is not None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, create_mode, dir_fd=parent_fd)
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(e.errno, "not a plain directory (a symlink?)", name) from None
        raise


@contextlib.contextmanager
def walk(
    root: str | os.PathLike[str] | int,
    parts: Sequence[str],
    create_mode: int | None = None,
    check: Callable[[os.stat_result, str], None] | None = None,
    counted: bool = False,
) -> Iterator[list[int]]:
    """Descriptors of ``root`` and of each of ``parts`` below it, walked without links.

    ``root`` is a path (opened, following a link there once) or a descriptor (used, not
    closed). With ``create_mode``, missing directories are created with that mode.
    ``check(st, where)`` is called on every directory below the root, with the
    ``fstat`` of the descriptor walked. ``counted``: each open, create and check is
    counted (``fs_ops.tick``) as an operation on the store's directory being worked on.
    All descriptors opened here are closed on exit.
    """
    count = tick if counted else _uncounted
    if isinstance(root, int):
        fds = [root]
        own = 1
    else:
        count("opens")
        fds = [open_root(root, create=create_mode is not None, mode=create_mode or 0o777)]
        own = 0
    try:
        for i, part in enumerate(parts):
            if create_mode is not None:
                count("writes")
            count("opens")
            fds.append(open_dir(fds[-1], part, create_mode))
            if check is not None:
                count("stats")
                check(os.fstat(fds[-1]), "/".join(parts[: i + 1]))
        yield fds
    finally:
        for fd in reversed(fds[own:]):
            os.close(fd)


def _uncounted(kind: str, n: int = 1) -> None:
    """Operations outside a store's directory (a local one, a root being set up)."""


def make_dir(dir_fd: int, name: str, mode: int) -> bool:
    """Create directory ``name``; whether this call created it (False: one was there)."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return False
    return True


def make_temp_dir(dir_fd: int, prefix: str) -> str:
    """A new directory ``<prefix><random>`` of ``dir_fd``, mode 0700; its name.

    The name is unpredictable and created by this call, so nothing can be planted in it
    or linked in its place before it is used.
    """
    for _ in range(16):
        name = f"{prefix}{secrets.token_hex(8)}"
        if make_dir(dir_fd, name, 0o700):
            return name
    raise OSError(errno.EEXIST, "no free temporary name", prefix)


def private_dir(base: Path, names: Sequence[str], tighten: bool = True) -> Path:
    """``base/names...``, each directory ours and writable by no one else; OSError if not.

    ``base`` (created with mode 0700 where missing) and every directory above it must be
    owned by this user or root and not writable by others (:func:`untrusted_reason`).
    Each name below it is created with mode 0700 where missing, opened without following
    a link, and must be ours and not group- or other-writable (NotPrivate: someone else
    could have filled it); with ``tighten`` it is then set to 0700. Every directory
    checked is checked on its open descriptor, and the last one's mtime is touched (in
    use: sweeps of old directories keep it).
    """
    os.makedirs(base, mode=0o700, exist_ok=True)
    problem = untrusted_reason(base, as_parent=bool(names))
    if problem is not None:
        raise NotPrivate(str(base), problem)
    fd = open_root(base)
    try:
        st = os.fstat(fd)
        problem = _component_problem(base, st, last=not names)
        if problem is not None:
            raise NotPrivate(str(base), problem)
        where = base
        for name in names:
            # Nobody else can even reach a directory whose parent they cannot search: one
            # of ours there that is writable by others held nothing of theirs.
            closed = st.st_uid == os.geteuid() and not st.st_mode & 0o011
            where = where / name
            make_dir(fd, name, 0o700)
            inner = open_dir(fd, name)
            os.close(fd)
            fd = inner
            st = os.fstat(fd)
            if not (closed and st.st_uid == os.geteuid()):
                check_private(st, str(where), root_ok=False)
            if tighten and stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
                st = os.fstat(fd)
        if names:
            with contextlib.suppress(OSError):  # a read-only cache is still private
                os.utime(fd)
    finally:
        os.close(fd)
    return base.joinpath(*names)


def private_temp_dir(prefix: str, under: str | None = None) -> Path:
    """A fresh directory of ours, mode 0700, with an unpredictable name (in the temp dir).

    NotPrivate unless the temp dir is private or sticky and its parents trusted: in a
    group-writable one, another member could rename ours away and put theirs in its place.
    """
    base = Path(under or tempfile.gettempdir())
    problem = untrusted_reason(base, as_parent=True)
    if problem is not None:
        raise NotPrivate(str(base), problem)
    with walk(base, ()) as (fd,):
        name = make_temp_dir(fd, prefix)
    return base / name


def names(dir_fd: int) -> list[str]:
    """The names in directory ``dir_fd`` (nothing is opened or followed)."""
    return os.listdir(dir_fd)


def entries(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of each entry of ``dir_fd``; links and FIFOs are never followed."""
    out = []
    for name in sorted(os.listdir(dir_fd)):
        with contextlib.suppress(FileNotFoundError):
            out.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
    return out


def stat_root(path: str | os.PathLike[str]) -> os.stat_result:
    """A root the user named, following a link there (their choice), as :func:`open_root`."""
    return os.stat(path)


def lstat(dir_fd: int | None, name: str | os.PathLike[str]) -> os.stat_result:
    """``name`` (of ``dir_fd``) as it is: a link is described, not followed."""
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def fstat(fd: int) -> os.stat_result:
    return os.fstat(fd)


def touch(fd: int) -> None:
    """Set the mtime of an open file or directory to now (a heartbeat, an in-use mark)."""
    os.utime(fd)


def chmod(fd: int, mode: int) -> None:
    os.fchmod(fd, mode)


def fsync(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


# -- files ---------------------------------------------------------------------------------
def open_file(
    dir_fd: int | None,
    name: str | os.PathLike[str],
    owner: int | None = None,
) -> tuple[int, os.stat_result]:
    """(fd, fstat) of regular file ``name``: no link, FIFO, socket or device, ever.

    Opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked on the descriptor: ELOOP for a
    link, EINVAL (``not a regular file``) for anything else that is not a regular file,
    EPERM (NotPrivate) when ``owner`` is given and the file is not that uid's.
    """
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(name))
        if owner is not None and st.st_uid != owner:
            raise NotPrivate(os.fsdecode(name), f"owned by uid {st.st_uid}, not uid {owner}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_file(
    dir_fd: int | None, name: str | os.PathLike[str], max_size: int, owner: int | None = None
) -> bytes:
    """The whole regular file ``name``, at most ``max_size`` bytes (EFBIG beyond)."""
    fd, st = open_file(dir_fd, name, owner)
    try:
        if st.st_size > max_size:
            raise OSError(errno.EFBIG, f"larger than {max_size} bytes", os.fsdecode(name))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_size + 1)
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise OSError(errno.EFBIG, f"larger than {max_size} bytes", os.fsdecode(name))
    return data


def read_system_text(path: str, limit: int = 1 << 20) -> str | None:
    """A small kernel-provided text file (``/proc/cpuinfo``, cgroup limits), or None."""
    try:
        return read_file(None, path, limit).decode(errors="replace")
    except OSError:
        return None


def create_file(
    dir_fd: int | None,
    name: str | os.PathLike[str],
    data: bytes | IO[bytes] | None = None,
    mode: int = 0o644,
    writable: bool = False,
) -> IO[bytes]:
    """A new file ``name`` (``O_CREAT | O_EXCL | O_NOFOLLOW``), filled, fsynced, open.

    Never written through a planted link, never over an existing file. ``data``: bytes,
    or a file object copied from its current position. Returns the open file (``w+b``
    with ``writable``, else ``wb``); the caller closes it.
    """
    flags = (CREATE_FLAGS & ~os.O_WRONLY) | os.O_RDWR if writable else CREATE_FLAGS
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    fh = os.fdopen(fd, "w+b" if writable else "wb")
    try:
        if isinstance(data, bytes):
            fh.write(data)
        elif data is not None:
            while block := data.read(1 << 20):
                fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    except BaseException:
        fh.close()
        raise
    return fh


def create_fd(dir_fd: int | None, name: str | os.PathLike[str], mode: int = 0o644) -> int:
    """A new, empty file ``name`` (``O_CREAT | O_EXCL | O_NOFOLLOW``), open for writing."""
    return os.open(name, CREATE_FLAGS, mode, dir_fd=dir_fd)


def write_new(
    dir_fd: int | None, name: str | os.PathLike[str], data: bytes, mode: int = 0o644
) -> None:
    """:func:`create_file` for a whole small file, closed at once."""
    create_file(dir_fd, name, data, mode).close()


def copy_file(
    src_fd: int, dst_dir_fd: int, name: str, mode: int, times_ns: tuple[int, int] | None = None
) -> int:
    """Copy the open regular file ``src_fd`` (from its start) to new file ``name``; bytes.

    Written under an unpredictable ``O_EXCL`` name beside it, fsynced, given ``mode`` and
    ``times_ns``, then renamed into place by descriptor: readers see all of it or none.
    """
    tmp = f".{name[:100]}.dd{secrets.token_hex(8)}"
    os.lseek(src_fd, 0, os.SEEK_SET)
    with os.fdopen(os.dup(src_fd), "rb") as src:
        out = create_file(dst_dir_fd, tmp, src, 0o600)
    try:
        with out:
            os.fchmod(out.fileno(), mode)
            if times_ns is not None:
                os.utime(out.fileno(), ns=times_ns)
            size = out.tell()
        os.rename(tmp, name, src_dir_fd=dst_dir_fd, dst_dir_fd=dst_dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dst_dir_fd)
        raise
    return size


def anonymous_file(dir_path: str | os.PathLike[str] | None) -> IO[bytes]:
    """A read-write file with no name (nobody can open, link or swap it), ``w+b``.

    On the filesystem of ``dir_path`` (``O_TMPFILE``), so a large artifact does not sit in
    memory; in memory (``memfd``) without a directory or where O_TMPFILE is unsupported.
    """
    if dir_path is not None:
        with contextlib.suppress(OSError, AttributeError):
            fd = os.open(dir_path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            return os.fdopen(fd, "w+b")
    return os.fdopen(os.memfd_create("dynamo_dist", os.MFD_CLOEXEC), "w+b")


def rename(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Rename by directory descriptors (no path is resolved again)."""
    os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def remove(dir_fd: int | None, name: str | os.PathLike[str], directory: bool = False) -> None:
    """Unlink ``name`` (a link itself, never its target), or rmdir an empty directory."""
    if directory:
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
