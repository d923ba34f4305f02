"""``dynamo-dist cache ls|verify|prune|clear|init DIR``: look after a shared cache directory.

Deleting commands (``prune``, ``clear``) act only in a directory that carries the
cache marker (``DYNAMO_DIST_CACHE``, written when a job creates the cache, or by
``dynamo-dist cache init DIR`` for caches made before markers existed), and
never follow a link: a planted ``entries/zz -> /home/victim`` is unlinked, not
emptied.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._cache_store import (
    ARTIFACT,
    FORMAT,
    MARKER,
    DiskStore,
    EntryRefused,
    read_marker,
    write_marker,
)
from ._config import CACHE_SECRET_ENV
from ._errors import ConfigError
from ._secret import cache_secret

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


def _store(path: str) -> DiskStore:
    if not os.path.isdir(path):
        raise SystemExit(f"dynamo-dist cache: {path} is not a directory")
    try:
        return DiskStore(path, cache_secret())  # read (and removed from the env) at import
    except ConfigError as e:
        raise SystemExit(f"dynamo-dist cache: {e}") from None


def _tree_size(path: Path) -> int:
    """Bytes of the files under ``path``, counted without following any link."""
    total = 0
    for top, _dirs, files in os.walk(path):  # followlinks=False
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def _entry_info(store: DiskStore, path: Path) -> dict[str, Any]:
    size = _tree_size(path)
    try:
        manifest = store.verify(path, key=path.name)
        problem = None
    except EntryRefused as e:
        manifest, problem = {}, str(e)
    created = manifest.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        try:
            created = os.lstat(path).st_mtime
        except OSError:
            created = time.time()
    factors = manifest.get("factors")
    return {
        "key": path.name,
        "path": path,
        "size": size,
        "age": time.time() - created,
        "torch": str(factors.get("torch", "?")) if isinstance(factors, dict) else "?",
        "label": str(manifest.get("label", "")),
        "problem": problem,
    }


def _remove_at(root: Path, parts: Sequence[str]) -> None:
    """Delete ``root/parts...`` without following links anywhere below ``root``.

    Each directory on the way is opened with O_NOFOLLOW (a symlinked shard fails
    with ELOOP instead of leading elsewhere); the last part is unlinked if it is
    not a directory, else removed by ``shutil.rmtree(dir_fd=...)``, whose
    descriptor-based walk never descends into a link.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = nxt
        name = parts[-1]
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def _try_remove(root: Path, parts: Sequence[str]) -> bool:
    try:
        _remove_at(root, parts)
    except FileNotFoundError:
        return True  # gone already (another prune, or a job's refuse)
    except OSError as e:
        print(f"dynamo-dist cache: could not remove {root.joinpath(*parts)}: {e}", file=sys.stderr)
        return False
    return True


def _require_marker(args: argparse.Namespace, what: str) -> str | None:
    """Why ``args.dir`` must not be touched by ``what``, or None if it is a marked cache."""
    marker = read_marker(Path(args.dir))
    if marker is None:
        return (
            f"dynamo-dist cache {what}: {args.dir} has no valid {MARKER} marker, so it is not "
            f"known to be a dynamo_dist cache; nothing was deleted. If it is one (made before "
            f"markers existed), mark it once with: dynamo-dist cache init {args.dir}"
        )
    if marker["format"] != FORMAT:
        return (
            f"dynamo-dist cache {what}: {args.dir} is a format {marker['format']} cache; this "
            f"dynamo_dist uses format {FORMAT}; nothing was deleted"
        )
    return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _age(s: float) -> str:
    for unit, sec in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= sec:
            return f"{s / sec:.1f}{unit}"
    return f"{s:.0f}s"


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    rows = [_entry_info(store, p) for p in store.iter_entries()]
    print(f"{'key':14s} {'size':>10s} {'age':>7s} {'torch':14s} {'valid':5s} graph")
    for r in rows:
        valid = "yes" if r["problem"] is None else "NO"
        print(
            f"{r['key'][:12]:14s} {_human(r['size']):>10s} {_age(r['age']):>7s} "
            f"{r['torch']:14s} {valid:5s} {r['label']}"
            + (f"  ({r['problem']})" if r["problem"] else "")
        )
    total = sum(r["size"] for r in rows)
    print(f"{len(rows)} entries, {_human(total)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    bad = 0
    n = 0
    for p in store.iter_entries():
        n += 1
        info = _entry_info(store, p)
        if info["problem"]:
            bad += 1
            print(f"BAD {p.name}: {info['problem']}")
    signed = "with" if store.secret else "without"
    print(f"{n - bad} of {n} entries valid (checked {signed} {CACHE_SECRET_ENV})")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        print("dynamo-dist cache prune: give --max-size and/or --older-than", file=sys.stderr)
        return 2
    store = _store(args.dir)
    refusal = _require_marker(args, "prune")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    rows = sorted((_entry_info(store, p) for p in store.iter_entries()), key=lambda r: -r["age"])
    removed = []
    if args.older_than is not None:
        removed += [r for r in rows if r["age"] > args.older_than]
    kept = [r for r in rows if r not in removed]
    if args.max_size is not None:
        total = sum(r["size"] for r in kept)
        for r in list(kept):  # oldest first
            if total <= args.max_size:
                break
            removed.append(r)
            kept.remove(r)
            total -= r["size"]
    failed = 0
    for r in removed:
        rel = r["path"].relative_to(store.root)
        failed += not _try_remove(store.root, rel.parts)
    print(
        f"removed {len(removed) - failed} entries ({_human(sum(r['size'] for r in removed))}); "
        f"{len(kept)} left ({_human(sum(r['size'] for r in kept))})"
    )
    return 1 if failed else 0


def cmd_clear(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    refusal = _require_marker(args, "clear")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    # Every namespace: rotating the secret means clearing the old key's entries too.
    n = sum(1 for _ in store.iter_all_entries())
    ok = True
    for name in ("entries", "refused", "locks"):
        if os.path.lexists(store.root / name):
            ok = _try_remove(store.root, [name]) and ok
    print(f"removed {n} entries from {args.dir}")
    return 0 if ok else 1


def cmd_init(args: argparse.Namespace) -> int:
    """Mark a directory as a cache: for caches made before markers, or a new one."""
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    known = {"entries", "locks", "refused", MARKER}
    other = sorted(n for n in os.listdir(root) if n not in known and not n.startswith(".probe."))
    if other and not args.force:
        print(
            f"dynamo-dist cache init: {args.dir} holds {', '.join(other[:5])}"
            f"{' ...' if len(other) > 5 else ''}, which a cache does not; "
            "not marking it (add --force if it really is the cache)",
            file=sys.stderr,
        )
        return 2
    if write_marker(root):
        print(f"marked {args.dir} as a dynamo_dist cache (format {FORMAT})")
    else:
        print(f"{args.dir} is already marked ({MARKER})")
    return 0


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="inspect and maintain a shared cache directory")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, fn, text in (
        ("ls", cmd_ls, "list entries: size, age, torch version, validity"),
        ("verify", cmd_verify, "check every manifest, checksum and signature (exit 1 on problems)"),
        ("clear", cmd_clear, "remove every entry (only in a directory marked as a cache)"),
    ):
        p = csub.add_parser(name, help=text)
        p.add_argument("dir")
        p.set_defaults(func=fn)
    p = csub.add_parser("prune", help="remove the oldest entries")
    p.add_argument("dir")
    p.add_argument("--max-size", type=parse_size, help="keep at most this much (e.g. 20G)")
    p.add_argument("--older-than", type=parse_age, help="remove entries older than (e.g. 7d)")
    p.set_defaults(func=cmd_prune)
    p = csub.add_parser(
        "init", help=f"mark DIR as a cache ({MARKER}), e.g. one made before markers existed"
    )
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="mark it even if it holds other files")
    p.set_defaults(func=cmd_init)


__all__ = ["ARTIFACT", "add_parser"]
