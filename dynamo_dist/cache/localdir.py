"""This rank's local inductor cache directory, made private, or replaced by one that is.

Verified entries are unpacked there, clean rooms and profiles are staged there, and
inductor compiles and loads kernels from it: a directory someone else created or can
write would be a way to get code run on this rank. Every use of the shared cache goes
through :func:`private_local_dir` first; a compile that must not happen in a directory
others can fill calls :func:`require_private_local_dir`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dynamo_dist._errors import ConfigError
from dynamo_dist.cache import fs, fs_tree
from dynamo_dist.cache.stats import warn_once
from dynamo_dist.dynamo import inductor

__all__ = ["local_inductor_dir", "private_local_dir", "require_private_local_dir"]


def local_inductor_dir() -> Path:
    """This rank's inductor cache directory as inductor sees it now."""
    return Path(inductor.cache_dir())


def _private_problem(path: Path) -> str | None:
    """Why ``path`` is no private directory of ours (created 0700 if absent), or None.

    The whole tree is looked at once per process (by descriptor, bounded): a directory
    its owner made private after someone else could write it (torch creates it with
    the umask: 0775 under umask 002) may hold their files, which inductor would load.
    """
    try:
        fs.private_dir(path.parent, (path.name,))
        if path not in _trees_checked:
            problem = fs_tree.foreign_in_tree(path)
            if problem is not None:
                return problem
            _trees_checked.add(path)
    except OSError as e:
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    return None


#: Local directories whose whole tree was found ours (once per process: a tree that is
#: ours, under a private top, cannot gain someone else's files afterwards).
_trees_checked: set[Path] = set()


def _replacement_dirs() -> list[tuple[Path, tuple[str, ...]]]:
    """Where this user's ranks keep inductor's cache when the configured one is not private."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = os.path.expanduser("~")
    out: list[tuple[Path, tuple[str, ...]]] = []
    if xdg and os.path.isabs(xdg):
        out.append((Path(xdg), ("dynamo_dist", "inductor")))
    if home and os.path.isabs(home):
        out.append((Path(home), (".cache", "dynamo_dist", "inductor")))
    return out


def private_local_dir() -> Path | None:
    """This rank's inductor cache directory, private: the configured one, or a replacement.

    Verified entries are unpacked there, clean rooms and profiles are staged there, and
    inductor compiles and loads kernels from it, so a directory someone else created
    first (the default is under /tmp, where a co-tenant can pre-create
    ``torchinductor_<user>``) or can write would be a way to get code run. When the
    configured directory is not private, this process (every rank of this user on the
    host alike) switches inductor to ``$XDG_CACHE_HOME/dynamo_dist/inductor`` (or
    ``~/.cache/dynamo_dist/inductor``), created 0700 and checked all the way down, and
    says so once; failing that, to a fresh private temporary directory. None only if
    even that fails: then nothing is staged, led or loaded here.
    """
    path = Path(
        os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor.default_cache_dir())
    )
    reason = _private_problem(path)
    if reason is None:
        _use_private_headers(path)
        return path
    for base, names in _replacement_dirs():
        with contextlib.suppress(OSError):
            parent = fs.private_dir(base, names[:-1], tighten=False)
            new = fs.private_dir(parent, names[-1:])
            if new != path and _private_problem(new) is None:  # its whole tree too
                return _switch_to(new, path, reason)
    with contextlib.suppress(OSError):
        # A fresh directory in the temp dir, only if that is a sticky or private parent
        # (in a group-writable one, another member could rename ours away and put theirs
        # in its place); made once per process, then found private like any other.
        return _switch_to(fs.private_temp_dir("dynamo_dist-inductor-"), path, reason)
    warn_once(
        f"local:{path}",
        "local inductor cache %s is not private (%s), and no private replacement could be "
        "made; the shared cache is not used by this rank. Fix: set TORCHINDUCTOR_CACHE_DIR "
        "to a new, empty directory of your own.",
        path,
        reason,
    )
    return None


def require_private_local_dir() -> Path:
    """:func:`private_local_dir`, or ConfigError: no compile in a directory others can fill.

    Where neither the configured directory nor any replacement is private (an unusable
    home and a group-writable temp dir), compiling there would load whatever a co-tenant
    put there, so the compile stops with the cause and the fix instead.
    """
    local = private_local_dir()
    if local is None:
        raise ConfigError(
            "TORCHINDUCTOR_CACHE_DIR: the local inductor cache "
            f"{inductor.cache_dir()} is not private to this user and no private "
            "replacement could be made ($XDG_CACHE_HOME, ~/.cache, the temp dir); with a "
            "shared cache nothing is compiled where another user could plant files. Fix: "
            "set TORCHINDUCTOR_CACHE_DIR to a new, empty directory of your own"
        )
    return local


def _use_private_headers(local: Path) -> None:
    """Inductor's precompiled headers go under ``local`` (private), not under /tmp.

    Inductor keeps them in ``/tmp/torchinductor_<user>/precompiled_headers`` whatever
    ``TORCHINDUCTOR_CACHE_DIR`` says, and compiles every CPU kernel with ``-include`` of
    a header found there: one planted there would be built into every kernel a leader
    publishes (found by the adversarial review of issue 26).
    """
    if local in _headers_moved:
        return  # once per directory: this runs at every compile
    with contextlib.suppress(OSError):
        headers = fs.private_dir(local, ("precompiled_headers",))
        inductor.use_precompiled_header_dir(str(headers))
        _headers_moved.clear()
        _headers_moved.add(local)


#: The private directory inductor's precompiled headers were last moved under.
_headers_moved: set[Path] = set()


def _switch_to(new: Path, old: Path, reason: str) -> Path:
    inductor.use_cache_dir(str(new))
    _use_private_headers(new)
    warn_once(
        f"local:{old}",
        "local inductor cache %s is not private (%s): nothing is compiled, staged or loaded "
        "there; this process uses %s instead (mode 0700). Fix: set TORCHINDUCTOR_CACHE_DIR "
        "to a new, empty directory of your own.",
        old,
        reason,
        new,
    )
    return new
