"""The shared cache's signing secret, and which directories the cache may trust.

The secret is read once, when ``dynamo_dist`` is imported, and removed from the
environment right away. Why: inductor writes a repro script into every pickled
graph it caches, and that script copies every environment variable whose name
contains DYNAMO, TORCH, INDUCTOR or TRITON. A secret left in the environment
would be published, in clear text, inside every shared cache entry (and every
local inductor cache), letting any reader of the directory sign forged entries.

Removing it from ``os.environ`` does not remove it from ``/proc/<pid>/environ``: the
block a process started with stays readable there (to this user, root, core dumps and
crash reporters) for as long as it runs. So a secret should come from a file
(``DYNAMO_DIST_CACHE_SECRET_FILE``); one that comes by variable still works, with one
warning, and ``dynamo-dist-run`` hands its workers a private file instead of the
variable (:func:`secret_file_for_workers`).

The secret must be strong (:func:`weakness`), and what the cache publishes is derived
from it by a slow KDF (:func:`signing_key`, :func:`key_id`): the key id names a
directory anyone can list and every manifest carries an HMAC, so a guessable secret,
or a cheap derivation, would let anyone who reads the cache recover it offline.

Without a secret nothing distinguishes our entries from anyone else's, so the
cache only trusts a directory nobody else can write: :func:`untrusted_reason`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import functools
import hashlib
import hmac
import os
import signal
import stat
from collections.abc import Iterator, Mapping

from dynamo_dist._config import CACHE_SECRET_ENV, CACHE_SECRET_FILE_ENV
from dynamo_dist._errors import ConfigError
from dynamo_dist._log import get_logger
from dynamo_dist.cache import fs
from dynamo_dist.cache.fs import untrusted_reason

#: A secret this long is accepted as it is (a passphrase, or any encoding of a key).
MIN_CHARS = 32
#: Shorter hex or base64 text is accepted if it decodes to this many bytes (128 bits).
MIN_BYTES = 16
#: scrypt's cost: 2**15 x 8 x 128 B = 32 MiB and about 70 ms on one server core, paid
#: once per process, and by every single guess at the secret from its key id.
KDF_N, KDF_R, KDF_P = 2**15, 8, 1
#: Names the purpose and the derivation's version: a new derivation gets a new salt
#: (and a new namespace prefix in ``_cache_store.namespace``), never a silent change.
KDF_SALT = b"dynamo_dist shared cache signing key, derivation 2"
_KDF_MAXMEM = 64 * 1024 * 1024
#: The namespace (under entries/, locks/, refused/) of a key id of this derivation...
NAMESPACE_PREFIX = "k2-"
#: ...and of the old one (an HMAC of a constant under the raw secret, cheap to test
#: guesses against): never read, removed by ``dynamo-dist cache prune``.
OLD_NAMESPACE_PREFIX = "k-"
#: Signals that end a launcher (each raises in Python): held while its secret file goes.
_ENDING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
#: How to make a good secret, for every message that refuses one.
HOW_TO_MAKE = (
    "make a random one with `dynamo-dist cache secret PATH` (then set "
    f"{CACHE_SECRET_FILE_ENV}=PATH on every host), or with `openssl rand -hex 32`"
)

_secret: str | None = None
_error: ConfigError | None = None
_from_file = False


def read_secret(environ: Mapping[str, str]) -> str | None:
    """The secret from ``DYNAMO_DIST_CACHE_SECRET`` or the file ``DYNAMO_DIST_CACHE_SECRET_FILE``.

    The file is preferred (it never enters any process's environment); it must be
    a regular file that only its owner can read, else ConfigError naming the fix.
    Either way the secret must be strong (:func:`check_strength`). Surrounding
    whitespace is dropped from both, so a file and a variable holding the same
    text give the same key.
    """
    value = (environ.get(CACHE_SECRET_ENV) or "").strip() or None
    path = environ.get(CACHE_SECRET_FILE_ENV) or None
    if path is None:
        if value is not None:
            check_strength(value, CACHE_SECRET_ENV)
        return value
    if value is not None:
        raise ConfigError(
            f"both {CACHE_SECRET_ENV} and {CACHE_SECRET_FILE_ENV} are set; set only one "
            f"(preferably {CACHE_SECRET_FILE_ENV})"
        )
    # Whoever could write the file, or replace it or a directory above it, could choose
    # the secret and sign entries the job then loads.
    problem = untrusted_reason(path) if _exists(path) else None
    if problem is not None:
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path}: another user could have written or replaced "
            f"it: {problem}. Fix: keep the secret in a file you own (chmod 600) in a "
            "directory only you can write, such as your home directory"
        )
    try:
        # Ours (or root's: a root-owned file only root could have written): a file of
        # someone else's that appeared after the check above is not our secret.
        fd, st = fs.open_file(None, path)
        if st.st_uid not in (os.geteuid(), 0):
            os.close(fd)
            raise ConfigError(
                f"{CACHE_SECRET_FILE_ENV}={path} is owned by uid {st.st_uid}, not by this "
                "user; keep the secret in a file of your own (chmod 600)"
            )
    except FileNotFoundError:
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path}: the file does not exist; create it with "
            f"`dynamo-dist cache secret {path}`"
        ) from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise ConfigError(
                f"{CACHE_SECRET_FILE_ENV}={path} is not a regular file; point it at a file "
                "holding the secret"
            ) from None
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path}: cannot open it ({e.strerror}); it must be a "
            "regular file (not a symlink) readable by this user"
        ) from None
    try:
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{CACHE_SECRET_FILE_ENV}={path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); anyone who reads it can sign cache "
                f"entries. Fix: chmod 600 {path}"
            )
        data = os.read(fd, 1 << 16)
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
        raise ConfigError(
            f"{CACHE_SECRET_FILE_ENV}={path} is empty; write a random secret to it: " + HOW_TO_MAKE
        )
    check_strength(secret, f"{CACHE_SECRET_FILE_ENV}={path}")
    return secret


def _decoded_size(text: str) -> int:
    """How many bytes ``text`` holds as hex, else as base64 (either alphabet, padding
    optional); 0 if neither. Hex first: short hex is also valid base64, and longer."""
    with contextlib.suppress(ValueError):
        return len(bytes.fromhex(text))
    b64 = text.rstrip("=").replace("-", "+").replace("_", "/")
    if len(b64) % 4 == 1:
        return 0
    try:
        return len(base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True))
    except (binascii.Error, ValueError):
        return 0


def weakness(secret: str) -> str | None:
    """What makes ``secret`` too easy to guess, or None if it is strong enough.

    Why a rule at all: the key id is public (a directory name) and every manifest's
    HMAC is readable, so a guessable secret can be found offline and then sign code
    every rank runs. At least :data:`MIN_CHARS` characters, or hex/base64 text of at
    least :data:`MIN_BYTES` bytes (what ``openssl rand -hex 16`` or ``-base64 16``
    print). The message never contains the secret itself.
    """
    if len(secret) >= MIN_CHARS:
        return None
    if _decoded_size(secret) >= MIN_BYTES:
        return None
    if not secret:
        return "it is empty"
    return (
        f"it is {len(secret)} characters long; at least {MIN_CHARS} characters are "
        f"needed, or hex/base64 text of at least {MIN_BYTES} random bytes"
    )


def check_strength(secret: str, source: str) -> None:
    """ConfigError for a weak secret, naming ``source`` (the variable or file) and the fix."""
    problem = weakness(secret)
    if problem is not None:
        raise ConfigError(
            f"{source}: the shared cache secret is too weak ({problem}): anyone who guesses "
            f"it can sign cache entries that every rank loads and runs. Fix: {HOW_TO_MAKE}"
        )


@functools.lru_cache(maxsize=8)
def _master_key(secret: str) -> bytes:
    """scrypt of ``secret``: slow on purpose, so computed once per process and secret."""
    check_strength(secret, "the shared cache secret")
    return hashlib.scrypt(
        secret.encode(),
        salt=KDF_SALT,
        n=KDF_N,
        r=KDF_R,
        p=KDF_P,
        maxmem=_KDF_MAXMEM,
        dklen=32,
    )


def signing_key(secret: str) -> bytes:
    """The key every manifest HMAC uses: derived from ``secret`` by scrypt, never the secret.

    A signature made with the raw secret would be a fast offline oracle for it.
    Raises ConfigError for a weak secret (see :func:`weakness`).
    """
    return hmac.new(_master_key(secret), b"manifest signatures", hashlib.sha256).digest()


def key_id(secret: str) -> str:
    """A short public name for ``secret`` (16 hex): the namespace its entries live in.

    Derived from the scrypt key, separately from :func:`signing_key`: it reveals
    neither, and checking one guess at the secret against it costs a full scrypt.
    """
    return hmac.new(_master_key(secret), b"key id", hashlib.sha256).hexdigest()[:16]


def take_from_environment() -> None:
    """Read the secret and delete ``DYNAMO_DIST_CACHE_SECRET`` from the environment.

    Called once at ``import dynamo_dist``, before anything compiles. An error is
    kept and raised when the shared cache is first used, not at import. (The
    variable stays in ``/proc/<pid>/environ`` regardless: :func:`cache_secret` warns.)
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
    """The secret read at import (None without one); ConfigError if it was misconfigured.

    Called when the shared cache is first used (and by the launcher and the CLI):
    a secret that came by variable is warned about here, once, where logging is set
    up and the user is watching, rather than at import.
    """
    if _error is not None:
        raise _error
    if _secret is not None and not _from_file:
        _warn_secret_in_environ()
    return _secret


@functools.cache
def _warn_secret_in_environ() -> None:
    """The one warning (per process) about a secret given by variable."""
    get_logger("cache").warning(
        "the shared cache secret came by the variable %s: it stays readable in "
        "/proc/%d/environ (to this user, root, core dumps and crash reporters) for as "
        "long as this process runs, although dynamo_dist removed it from os.environ. "
        "Fix: keep it in a file only you can read (`dynamo-dist cache secret PATH` makes "
        "one) and set %s=PATH instead; dynamo-dist-run does that for its workers, but "
        "its own environment still holds the variable",
        CACHE_SECRET_ENV,
        os.getpid(),
        CACHE_SECRET_FILE_ENV,
    )


def _secret_dir_base() -> str | None:
    """Where the launcher's private secret directory goes: ``$XDG_RUNTIME_DIR`` if it is
    private (a per-user tmpfs: the secret never reaches a disk), else the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _exists(runtime) and untrusted_reason(runtime) is None:
        return runtime
    return None


@contextlib.contextmanager
def secret_file_for_workers() -> Iterator[dict[str, str]]:
    """What a launcher adds to its workers' environment, for as long as they may start.

    When the secret came by variable: a fresh private directory (``mkdtemp``, 0700)
    holding the secret in a 0600 file, and ``{DYNAMO_DIST_CACHE_SECRET_FILE: path}``,
    so no worker ever has the secret in its environment (``/proc/<pid>/environ``).
    The file and directory are removed when the block exits, however it exits.
    Nothing when the secret came from a file (the workers inherit the variable and
    read the file themselves) or there is none.
    """
    if _secret is None or _error is not None or _from_file:
        yield {}
        return
    base = _secret_dir_base()
    try:
        where = str(fs.private_temp_dir("dynamo_dist-secret.", base))
    except fs.NotPrivate as e:
        raise ConfigError(
            f"cannot hand the secret to the workers in a private file under "
            f"{e.filename}: {e.strerror}. Fix: set TMPDIR to a directory only you can "
            f"write, or set {CACHE_SECRET_FILE_ENV} to a file of your own instead of "
            f"{CACHE_SECRET_ENV}"
        ) from None
    path = os.path.join(where, "cache.key")
    try:
        # Checked before the secret is written: another user who could replace the
        # directory could read it (and the workers would refuse the file anyway).
        problem = untrusted_reason(where)
        if problem is not None:
            raise ConfigError(
                f"cannot hand the secret to the workers in a private file under {where}: "
                f"{problem}. Fix: set TMPDIR to a directory only you can write, or set "
                f"{CACHE_SECRET_FILE_ENV} to a file of your own instead of {CACHE_SECRET_ENV}"
            )
        with fs.create_file(None, path, mode=0o600) as fh:
            fs.chmod(fh.fileno(), 0o600)  # readable by the workers whatever the umask
            fh.write((_secret + "\n").encode())
            fh.flush()
        yield {CACHE_SECRET_FILE_ENV: path}
    finally:
        # A second SIGTERM must not cut the clean-up short: held until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING_SIGNALS)
        try:
            with contextlib.suppress(OSError):
                fs.remove(None, path)
            with contextlib.suppress(OSError):  # left in place only if someone added to it
                fs.remove(None, where, directory=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _exists(path: str | os.PathLike[str]) -> bool:
    try:
        fs.lstat(None, path)
    except OSError:
        return False
    return True


__all__ = [
    "CACHE_SECRET_ENV",
    "CACHE_SECRET_FILE_ENV",
    "cache_secret",
    "check_strength",
    "key_id",
    "read_secret",
    "secret_file_for_workers",
    "signing_key",
    "take_from_environment",
    "untrusted_reason",
    "weakness",
]


def payload_mac(secret: str, data: bytes, purpose: str) -> bytes:
    """HMAC-SHA256 of a value posted in the job's key-value store, bound to ``purpose``.

    Why: any process that reaches the job's store can set any key, and profile payloads
    are unpickled. ``purpose`` (the store key) is length-prefixed into the MAC, so a
    payload signed for one key is refused under another (no replay of a view as the
    profile, nor across groups).
    """
    tag = purpose.encode()
    msg = b"dynamo_dist store payload\0" + len(tag).to_bytes(4, "big") + tag + data
    # The derived key, never the raw secret (the domain prefix keeps a payload's MAC
    # apart from a manifest's signature under the same key).
    return hmac.new(signing_key(secret), msg, hashlib.sha256).digest()
