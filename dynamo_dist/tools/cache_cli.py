"""``dynamo-dist cache ls|verify|prune|clear|init DIR``: look after a shared cache directory.

``dynamo-dist cache secret PATH`` writes a new random secret for it.

Deleting commands (``prune``, ``clear``) act only in a directory that carries the
cache marker (``DYNAMO_DIST_CACHE``, written when a job creates the cache, or by
``dynamo-dist cache init DIR`` for caches made before markers existed), and
never follow a link: a planted ``entries/zz -> /home/victim`` is unlinked, not
emptied.

Every byte under DIR may have been written by someone else, and jobs publish,
refuse and prune entries while these commands run. So:

* every directory below DIR is opened from its parent's descriptor with
  ``O_NOFOLLOW``; a name that vanished or turned into a file or a link between
  listing and reading is skipped, never a traceback;
* a directory that cannot be read (EACCES) ends the command with one line naming
  the path, the cause and the fix (DIR itself, ``entries/``), or is reported on
  the last line with a nonzero exit (anything deeper), after what could be read;
* everything printed that came from the directory (names, labels, versions,
  reasons) has its non-printable characters escaped, so a hostile entry cannot
  drive the terminal;
* ``created`` dates are not trusted beyond the present: a future or non-finite one
  falls back to the directory's mtime, and if that is in the future too the age
  is unknown, and such entries are pruned first;
* namespaces of the old key derivation (``k-<id>`` under ``entries/``, ``locks/``
  and ``refused/``, from before the secret went through scrypt) are never read
  again: ``ls`` mentions them and ``prune`` removes them (keeping a lock whose
  holder is seen alive on this host);
* leftovers count: incomplete publishes (``.tmp.*`` of a killed leader) are listed,
  pruned after an hour (an mtime dated in the future counts as the file's ctime, which
  nobody can set) and cleared; refused boxes are listed, counted in
  ``--max-size`` and pruned before valid entries; ``clear`` keeps the lock files
  of live leaders (a lock that changed during a short watch).

This module parses the arguments, runs each command guarded (one line, never a
traceback) and holds the two reports, ``ls`` and ``verify``; reading the directory
is ``cache_dir``, deleting ``cache_remove``, and creating ``cache_init``.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from typing import Any

from dynamo_dist._config import CACHE_SECRET_ENV
from dynamo_dist.cache.store import MARKER
from dynamo_dist.tools.cache_dir import (
    TMP_PREFIX,
    CacheDir,
    Fail,
    Item,
    clean,
    finish,
    human,
    human_age,
    old_namespaces,
    oserror_line,
    rel,
    say,
)
from dynamo_dist.tools.cache_init import cmd_init, cmd_secret
from dynamo_dist.tools.cache_remove import cmd_clear, cmd_prune

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"--max-size {text!r}: expected e.g. 500M, 20G, 1048576")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


def parse_age(text: str) -> float:
    m = _AGE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"--older-than {text!r}: expected e.g. 30m, 12h, 7d")
    return (
        float(m.group(1))
        * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    )


def _guarded(cmd: str, fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``fn`` that ends with a one-line message and a nonzero exit, never a traceback.

    Whatever is in the directory, and whatever moves in it meanwhile, the user gets
    the path, the cause and what to do.
    """

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except Fail as e:
            say(str(e), err=True)
            return e.code
        except OSError as e:
            writes = cmd in ("prune", "clear", "init", "secret")
            say(oserror_line(cmd, e, args.dir, write=writes), True)
            return 2
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the promise is: no traceback, ever
            say(
                f"dynamo-dist cache {cmd}: {args.dir}: unexpected {type(e).__name__}: {e}; "
                "please report this as a bug (with the output of `dynamo-dist cache ls`)",
                err=True,
            )
            return 1

    return run


def _row(it: Item) -> str:
    if it.kind == "tmp":
        valid, what = "TMP", f"(incomplete publish {it.name})"
    else:
        valid = "yes" if it.problem is None else "NO"
        what = it.label + (f"  ({it.problem})" if it.problem else "")
    if it.age is None:
        what += "  (age unknown: dated in the future)"
    key = it.name[len(TMP_PREFIX) :] if it.kind == "tmp" else it.name
    return (
        f"{clean(key)[:12]:14s} {human(it.size):>10s} {human_age(it.age):>7s} "
        f"{clean(it.torch, 14):14s} {valid:5s} {what}"
    )


def cmd_ls(args: argparse.Namespace) -> int:
    cache = CacheDir("ls", args.dir)
    rows = list(cache.entries())
    tmps = list(cache.tmps())
    refused = list(cache.refused())
    say(f"{'key':14s} {'size':>10s} {'age':>7s} {'torch':14s} {'valid':5s} graph")
    for it in (*rows, *tmps):
        say(_row(it))
    total = sum(r.size for r in rows)
    say(
        f"{len(rows)} entries, {human(total)}; "
        f"{len(tmps)} incomplete publishes, {human(sum(t.size for t in tmps))}; "
        f"{len(refused)} refused, {human(sum(r.size for r in refused))}"
    )
    old = old_namespaces(cache)
    if old:
        say(
            f"{len(old)} namespaces of the old key derivation ({', '.join(map(rel, old[:3]))}"
            f"{' ...' if len(old) > 3 else ''}): never read again; `dynamo-dist cache prune` "
            "removes them"
        )
    return finish(cache, 0)


def cmd_verify(args: argparse.Namespace) -> int:
    cache = CacheDir("verify", args.dir)
    bad = n = 0
    for it in cache.entries():
        n += 1
        if it.problem:
            bad += 1
            say(f"BAD {it.name}: {it.problem}")
    signed = "with" if cache.store.secret else "without"
    say(f"{n - bad} of {n} entries valid (checked {signed} {CACHE_SECRET_ENV})")
    return finish(cache, 1 if bad else 0)


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="inspect and maintain a shared cache directory")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, fn, text in (
        ("ls", cmd_ls, "list entries, incomplete publishes and refused entries"),
        ("verify", cmd_verify, "check every manifest, checksum and signature (exit 1 on problems)"),
        ("clear", cmd_clear, "remove every entry and dead lock (only in a marked cache)"),
    ):
        p = csub.add_parser(name, help=text)
        p.add_argument("dir")
        p.set_defaults(func=_guarded(name, fn))
    p = csub.add_parser("prune", help="remove refused boxes, then the oldest entries")
    p.add_argument("dir")
    p.add_argument("--max-size", type=parse_size, help="keep at most this much (e.g. 20G)")
    p.add_argument("--older-than", type=parse_age, help="remove entries older than (e.g. 7d)")
    p.set_defaults(func=_guarded("prune", cmd_prune))
    p = csub.add_parser(
        "init", help=f"mark DIR as a cache ({MARKER}), e.g. one made before markers existed"
    )
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="mark it even if it holds other files")
    p.set_defaults(func=_guarded("init", cmd_init))
    p = csub.add_parser(
        "secret", help="write a new random secret to PATH (mode 0600; never overwrites)"
    )
    p.add_argument("dir", metavar="PATH")
    p.set_defaults(func=_guarded("secret", cmd_secret))


__all__ = ["add_parser"]
