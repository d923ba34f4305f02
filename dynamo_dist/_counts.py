"""Adding up counters kept in several places: numbers add, nested counts merge.

A rank's compile accounting is counted where each thing happens: frames traced by the
frame callback (per group, ``exchange/stats.py``), graphs built and loaded by the cache
(per cache directory, ``cache/stats.py``), and both under ``regions``. The report shows
one figure per key, so the records are added with this one function.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add", "capped"]

#: Distinct keys one count table (recompile reasons) may grow to; later ones are "other".
MAX_KEYS = 32
#: A key of such a table is cut to this many characters.
MAX_KEY_CHARS = 200


def add(a: Any, b: Any) -> Any:
    """``a + b`` for numbers, key by key (recursively) for dicts; otherwise ``b`` wins.

    Neither argument is changed. None counts as nothing.
    """
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = add(out.get(k), v)
        return out
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return a + b
    return b


def capped(table: dict[str, int], key: str, n: int = 1) -> None:
    """``table[key] += n``, with at most ``MAX_KEYS`` keys: later new keys count as "other".

    For tables keyed by text users never chose (Dynamo's recompile reasons carry sizes),
    so that a job recompiling for every batch size keeps a bounded report.
    """
    key = key[:MAX_KEY_CHARS]
    if key not in table and len(table) >= MAX_KEYS:
        key = "other"
    table[key] = table.get(key, 0) + n
