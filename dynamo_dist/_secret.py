"""The shared cache's signing secret, and which directories the cache may trust.

The secret is read once, when ``dynamo_dist`` is imported, and removed from the
environment right away. Why: inductor writes a repro script into every pickled
graph it caches, and that script copies every environment variable whose name
contains DYNAMO, TORCH, INDUCTOR or TRITON. A secret left in the environment
would be published, in clear text, inside every shared cache entry (and every
local inductor cache), letting any reader of the directory sign forged entries.

Without a secret nothing distinguishes our entries from anyone else's, so the
cache only trusts a directory nobody else can write: :func:`untrusted_reason`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ._config import CACHE_SECRET_ENV, CACHE_SECRET_FILE_ENV
from ._errors import ConfigError

_secret: str | None = None
_error: ConfigError | None = None
_from_file = False


def read_secret(environ: Mapping[str, str]) -> str | None:
    """The secret from ``DYNAMO_DIST_CACHE_SECRET`` or the file ``DYNAMO_DIST_CACHE_SECRET_FILE``.

    The file is preferred (it never enters any process's environment); it must be
    a regular file that only its owner can read, else ConfigError naming the fix.
    """
    value = environ.get(CACHE_SECRET_ENV) or None
    path = environ.get(CACHE_SECRET_FILE_ENV) or None
    if path is None:
        return value
    if value is not None:
        raise ConfigError(
            f"both {CACHE_SECRET_ENV} and {CACHE_SECRET_FILE_ENV} are set; set only one "
            f"(preferably {CACHE_SECRET_FILE_ENV})"
        )
    # Whoever could write the file, or replace it or a directory above it, could choose
    # the secret and sign entries the job then loads.
    problem = untrusted_reason(path) if os.path.lexists(path) else None
    if problem is not None:
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path}: another user could have written or replaced "
            f"it: {problem}. Fix: keep the secret in a file you own (chmod 600) in a "
            "directory only you can write, such as your home directory"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path}: the file does not exist; create it with a "
            f"random secret (e.g. `openssl rand -hex 32 > {path} && chmod 600 {path}`)"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path}: cannot open it ({e.strerror}); it must be a "
            "regular file (not a symlink) readable by this user"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(
                f"{CACHE_SECRET_FILE_ENV}={path} is not a regular file; point it at a file "
                "holding the secret"
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{CACHE_SECRET_FILE_ENV}={path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); anyone who reads it can sign cache "
                f"entries. Fix: chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(1 << 16)
    finally:
        os.close(fd)
    try:
        secret = data.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path} is not text; write a text secret "
            "(e.g. `openssl rand -hex 32`)"
        ) from None
    if not secret:
        raise ConfigError(f"{CACHE_SECRET_FILE_ENV}={path} is empty; write a random secret to it")
    return secret


def take_from_environment() -> None:
    """Read the secret and delete ``DYNAMO_DIST_CACHE_SECRET`` from the environment.

    Called once at ``import dynamo_dist``, before anything compiles. An error is
    kept and raised when the shared cache is first used, not at import.
    """
    global _secret, _error, _from_file
    _from_file = bool(os.environ.get(CACHE_SECRET_FILE_ENV))
    try:
        _secret = read_secret(os.environ)
    except ConfigError as e:
        _secret, _error = None, e
    # os.environ.pop unsets it in the C environment too: subprocesses (inductor's
    # compile workers) do not inherit it either.
    os.environ.pop(CACHE_SECRET_ENV, None)


def cache_secret() -> str | None:
    """The secret read at import (None without one); ConfigError if it was misconfigured."""
    if _error is not None:
        raise _error
    return _secret


def secret_environment() -> dict[str, str]:
    """What a launcher must put back into its workers' environment (each removes it again).

    Nothing when the secret came from a file: ``DYNAMO_DIST_CACHE_SECRET_FILE`` stays
    in the environment and each worker reads the file itself, so the secret never
    enters any process's environment.
    """
    if _secret is None or _error is not None or _from_file:
        return {}
    return {CACHE_SECRET_ENV: _secret}


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


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


def _chain_problem(path: Path) -> str | None:
    """The first component of ``path`` (absolute, from / down) that others could change."""
    parts = path.parts
    for i in range(1, len(parts) + 1):
        p = Path(*parts[:i])
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None  # not there yet: whoever creates it is checked next time
        problem = _component_problem(p, st, last=i == len(parts))
        if problem:
            return problem
    return None


def untrusted_reason(path: str | os.PathLike[str]) -> str | None:
    """Why files under ``path`` could have been written by another user, or None.

    Every component from / down must be owned by this user or root and not be
    group- or other-writable; a sticky world-writable directory (/tmp) is fine
    as a parent, never as ``path`` itself. Symlinks are checked on both sides:
    who could replace the link, and the directory it leads to.
    """
    given = Path(os.path.abspath(path))
    problem = _chain_problem(given)
    if problem is None:
        real = Path(os.path.realpath(given))
        if real != given:
            problem = _chain_problem(real)
    return problem


__all__ = [
    "CACHE_SECRET_ENV",
    "CACHE_SECRET_FILE_ENV",
    "cache_secret",
    "read_secret",
    "secret_environment",
    "take_from_environment",
    "untrusted_reason",
]


def payload_mac(secret: str, data: bytes, purpose: str) -> bytes:
    """HMAC-SHA256 of a value posted in the job's key-value store, bound to ``purpose``.

    Why: any process that reaches the job's store can set any key, and profile payloads
    are unpickled. ``purpose`` (the store key) is length-prefixed into the MAC, so a
    payload signed for one key is refused under another (no replay of a view as the
    profile, nor across groups).
    """
    import hashlib
    import hmac

    tag = purpose.encode()
    msg = b"dynamo_dist store payload\0" + len(tag).to_bytes(4, "big") + tag + data
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()
