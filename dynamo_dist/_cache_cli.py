"""``dynamo-dist cache ls|verify|prune|clear DIR``: look after a shared cache directory."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ._cache_store import ARTIFACT, DiskStore, EntryRefused
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


def _entry_info(store: DiskStore, path: Path) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    try:
        manifest = store.verify(path, key=path.name)
        problem = None
    except EntryRefused as e:
        manifest, problem = {}, str(e)
    created = manifest.get("created") or path.stat().st_mtime
    return {
        "key": path.name,
        "path": path,
        "size": size,
        "age": time.time() - created,
        "torch": manifest.get("factors", {}).get("torch", "?"),
        "label": manifest.get("label", ""),
        "problem": problem,
    }


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
    for r in removed:
        shutil.rmtree(r["path"], ignore_errors=True)
    print(
        f"removed {len(removed)} entries ({_human(sum(r['size'] for r in removed))}); "
        f"{len(kept)} left ({_human(sum(r['size'] for r in kept))})"
    )
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    n = 0
    # Every namespace: rotating the secret means clearing the old key's entries too.
    for p in list(store.iter_all_entries()):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    for d in (store.refused.parent, store.locks.parent):
        shutil.rmtree(d, ignore_errors=True)
    print(f"removed {n} entries from {args.dir}")
    return 0


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="inspect and maintain a shared cache directory")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, fn, text in (
        ("ls", cmd_ls, "list entries: size, age, torch version, validity"),
        ("verify", cmd_verify, "check every manifest, checksum and signature (exit 1 on problems)"),
        ("clear", cmd_clear, "remove every entry"),
    ):
        p = csub.add_parser(name, help=text)
        p.add_argument("dir")
        p.set_defaults(func=fn)
    p = csub.add_parser("prune", help="remove the oldest entries")
    p.add_argument("dir")
    p.add_argument("--max-size", type=parse_size, help="keep at most this much (e.g. 20G)")
    p.add_argument("--older-than", type=parse_age, help="remove entries older than (e.g. 7d)")
    p.set_defaults(func=cmd_prune)


__all__ = ["ARTIFACT", "add_parser"]
