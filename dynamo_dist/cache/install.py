"""Installing unpacked files into this rank's local inductor cache.

The local cache's files are later unpickled and dlopen'ed, so nothing is written through
a link and nothing lands in a directory of another account: ``dest`` is opened once
(the user chose it), every directory below it is walked with ``O_NOFOLLOW`` from its
parent's descriptor and must be ours, and each file is copied under a fresh name and
renamed into place within one directory descriptor. The source (a staging directory or
a clean room) is read with the one tree walker (``fs_tree.tree``), so only its regular
files are copied and none of its links is followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from dynamo_dist.cache import fs, fs_tree

__all__ = ["merge_into"]

#: ``fs_tree.tree`` enters directories of fewer names than this: 32 levels below ``src``.
_MAX_MERGE_DEPTH = 33


def merge_into(src: Path, dest: Path) -> list[tuple[tuple[str, ...], os.stat_result]]:
    """Copy files from ``src`` into ``dest`` atomically, keeping files already there.

    ``dest`` must be ours (OSError otherwise), and so must every directory below it;
    ``src`` is walked by descriptor without following links, and only its regular files
    are copied. Returns (relative path, fstat) of every file this call created (not
    those kept).
    """
    created: list[tuple[tuple[str, ...], os.stat_result]] = []
    with fs.walk(dest, (), create_mode=0o700) as (root_fd,):
        st = fs.fstat(root_fd)
        if st.st_uid != os.geteuid():
            raise OSError(
                errno.EPERM,
                f"refusing to install into a directory owned by uid {st.st_uid}",
                str(dest),
            )
        fds: dict[tuple[str, ...], int] = {(): root_fd}
        try:
            with (
                fs.walk(src, ()) as (src_fd,),
                contextlib.closing(fs_tree.tree(src_fd, _MAX_MERGE_DEPTH)) as found,
            ):
                for dir_fd, rel, fst in found:
                    if stat.S_ISREG(fst.st_mode):  # links, FIFOs, sockets: never copied
                        new = _install_file(dir_fd, rel, fds, dest)
                        if new is not None:
                            created.append((rel, new))
        finally:
            for rel, fd in fds.items():
                if rel:
                    os.close(fd)
    return created


def _install_file(
    src_dir_fd: int, rel: tuple[str, ...], fds: dict[tuple[str, ...], int], dest: Path
) -> os.stat_result | None:
    """Install file ``rel`` (in ``src_dir_fd``) at ``dest/rel``; see ``_install_at``."""
    try:
        fd, _ = fs.open_file(src_dir_fd, rel[-1])
    except FileNotFoundError:
        return None
    try:
        dir_fd = _dest_dir(fds, rel[:-1], dest)
        return _install_at(dir_fd, rel[-1], fd, dest.joinpath(*rel))
    finally:
        os.close(fd)


def _local_dir_at(parent_fd: int, name: str, where: Path) -> int:
    """Directory ``name`` of the local cache, created 0700 if missing; OSError unless ours.

    A link (``fxgraph -> /attacker/dir``) or a directory of another account would let
    someone else choose the files inductor later loads, so either refuses the merge.
    """
    try:
        fd = fs.open_dir(parent_fd, name, 0o700)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(
                e.errno, "refusing to install through a symlink (or non-directory)", str(where)
            ) from None
        raise
    st = fs.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(
            errno.EPERM,
            f"refusing to install into a directory owned by uid {st.st_uid}, not this user",
            str(where),
        )
    return fd


def _install_at(dir_fd: int, name: str, src_fd: int, where: Path) -> os.stat_result | None:
    """Copy the open regular file ``src_fd`` to ``name`` in ``dir_fd`` atomically.

    Inductor's files are content-addressed, so a regular file of ours under the name
    is the same file: it is kept (None). Anything else there (a link, another account's
    file) refuses. Returns the fstat of the file this call created.
    """
    try:
        st = fs.lstat(dir_fd, name)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            return None
        raise OSError(
            errno.EEXIST,
            "refusing to install over a symlink or a file not owned by this user",
            str(where),
        )
    sst = fs.fstat(src_fd)
    fs.copy_file(
        src_fd, dir_fd, name, stat.S_IMODE(sst.st_mode) & 0o755, (sst.st_atime_ns, sst.st_mtime_ns)
    )
    return fs.lstat(dir_fd, name)


def _dest_dir(fds: dict[tuple[str, ...], int], rel: tuple[str, ...], dest: Path) -> int:
    """The descriptor of ``dest/rel`` (walked, and cached in ``fds``), created as needed."""
    for i in range(1, len(rel) + 1):
        if rel[:i] not in fds:
            fds[rel[:i]] = _local_dir_at(fds[rel[: i - 1]], rel[i - 1], dest.joinpath(*rel[:i]))
    return fds[rel]
