"""``dynamo-dist cache init DIR`` and ``dynamo-dist cache secret PATH``: the commands that create.

``init`` writes the cache marker (``DYNAMO_DIST_CACHE``) that the deleting commands
require, for caches made before markers existed; ``secret`` writes a new random
secret to a new file only this user can read, judged as jobs will judge it. Neither
ever replaces a file that is there.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from dynamo_dist._config import CACHE_SECRET_FILE_ENV
from dynamo_dist._errors import ConfigError
from dynamo_dist.cache import fs
from dynamo_dist.cache.entries import FORMAT
from dynamo_dist.cache.secret import read_secret, untrusted_reason
from dynamo_dist.cache.store import MARKER, write_marker
from dynamo_dist.tools.cache_dir import Fail, clean, exists, say


def cmd_init(args: argparse.Namespace) -> int:
    """Mark a directory as a cache: for caches made before markers, or a new one."""
    root = Path(args.dir)
    with fs.walk(root, (), create_mode=0o777) as (fd,):
        names = fs.names(fd)
    known = {"entries", "locks", "refused", MARKER}
    other = sorted(n for n in names if n not in known and not n.startswith(".probe."))
    if other and not args.force:
        say(
            f"dynamo-dist cache init: {args.dir} holds {', '.join(other[:5])}"
            f"{' ...' if len(other) > 5 else ''}, which a cache does not; "
            "not marking it (add --force if it really is the cache)",
            err=True,
        )
        return 2
    if write_marker(root):
        say(f"marked {args.dir} as a dynamo_dist cache (format {FORMAT})")
    else:
        say(f"{args.dir} is already marked ({MARKER})")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    """Write a new random secret (32 bytes, hex) to a new file only this user can read.

    Created with O_EXCL and O_NOFOLLOW, mode 0600: an existing file (someone's
    secret, or a link planted to make us overwrite one) is never replaced.
    """
    path = Path(args.dir)
    # The directories above it, judged as jobs will judge the file (read_secret).
    problem = None if exists(path) else untrusted_reason(path)
    if problem is not None:
        raise Fail(
            f"dynamo-dist cache secret: not writing a secret to {path}: {problem}, so "
            "another user could replace the file (and jobs would refuse it). Fix: choose "
            "a directory only you can write, such as your home directory"
        )
    try:
        fd = fs.create_fd(None, path, 0o600)
    except FileExistsError:
        raise Fail(
            f"dynamo-dist cache secret: {path} already exists (as a file or a link); "
            "not overwriting it. Fix: give a new path, or remove the old file first if "
            "no job needs that secret any more"
        ) from None
    try:
        fs.chmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    except BaseException:
        fs.remove(None, path)
        raise
    finally:
        os.close(fd)
    try:
        read_secret({CACHE_SECRET_FILE_ENV: str(path)})  # jobs accept what was written
    except ConfigError as e:  # e.g. a directory above it changed meanwhile
        fs.remove(None, path)
        raise Fail(f"dynamo-dist cache secret: {e}; the file was removed") from None
    shown = clean(os.path.abspath(path))
    say(f"wrote a new random secret to {shown} (mode 0600). Use it on every host of a job")
    say("(copy it over a private channel, keeping mode 0600):")
    say(f"  export {CACHE_SECRET_FILE_ENV}={shown}")
    say(
        "dynamo-dist-run passes that variable on to its workers. A new secret starts a new, "
        "empty namespace in the cache: entries signed with another secret are not read."
    )
    return 0
