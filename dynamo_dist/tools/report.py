"""The job report: every rank's counters in one table, printed by rank 0 at exit.

Ranks publish their stats to the job's key-value store when dynamo_dist shuts
down (explicitly or at interpreter exit); rank 0 waits a bounded time for the
others, so a crashed rank shows up as missing rather than hanging the exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dist import store as dist_store
from dynamo_dist.exchange import status

log = get_logger("report")

_PREFIX = "dynamo_dist/report/"

COLUMNS: list[tuple[str, str, str]] = [
    # (header, stats key, format); every header has its LEGEND entry
    ("rank", "rank", "d"),
    ("exchanges", "exchanges", "d"),
    ("hit rate", "hit_rate", ".1%"),
    ("forced", "forced_recompiles", "d"),
    ("diverg.", "divergences", "d"),
    ("traced", "frames_traced", "d"),
    ("built", "graphs_built", "d"),
    ("loaded", "graphs_loaded", "d"),
    ("loaded from", "loaded_from_text", "s"),
    ("recomp.", "recompiles", "d"),
    ("cost p50 us", "cost_p50_us", ".1f"),
    ("cost p99 us", "cost_p99_us", ".1f"),
    ("wait p50 us", "wait_p50_us", ".1f"),
    ("wait p99 us", "wait_p99_us", ".1f"),
    ("transport", "transport", "s"),
    ("publishes", "cache_publishes", "d"),
    ("build s saved", "build_seconds_saved", ".1f"),
    ("precomp.", "precompiled_calls", "d"),
    ("fallbacks", "precompiled_fallback_reasons", "s"),
]

#: What each column of the table means, printed under it (header -> definition).
LEGEND: dict[str, str] = {
    "rank": "global rank",
    "exchanges": "guard exchanges this rank took part in, over its groups: one per entry "
    "into a compiled frame inside a dynamo_dist.compile region (outside "
    "dynamo_dist.local()), one per call of a precompiled module",
    "hit rate": "share of Dynamo's guard checks (frames with compiled entries) that this "
    "rank's own guards passed, before the ranks agreed; 100% when none",
    "forced": "checks this rank's guards passed while another rank's failed: this rank "
    "recompiled with the others",
    "diverg.": "exchanges at which ranks guarded different frames (an error), plus mixed "
    "outcomes that policy strict refused",
    "traced": "frames Dynamo traced on this rank (a precompiled capture traces one)",
    "built": "graphs the backend (inductor) built on this rank (0 on a warm start that "
    "loaded everything)",
    "loaded": "graphs loaded instead of built: each is a cache hit",
    "loaded from": "where the loaded graphs came from: shared (the shared directory), "
    "host_copy (the copy a rank of this host left), precompiled (precompiled artifacts)",
    "recomp.": "frames or precompiled modules that needed another graph (their guards "
    "failed); reasons in the JSON (recompile_reasons) and below the table",
    "cost p50 us": "median of an exchange's own cost on this rank, in microseconds: the "
    "frame's identity, posting the record, combining the ranks' records, the verdict; "
    "not the wait (last 8192 exchanges per group)",
    "cost p99 us": "99th percentile of the same",
    "wait p50 us": "median time an exchange was blocked on the other ranks: until every "
    "rank of its host posted, then the host leaders' step across hosts (gloo: the "
    "all-reduce). It measures the others' lateness (uneven work between compiled calls), "
    "not dynamo_dist: the rank that arrives last waits about 0",
    "wait p99 us": "99th percentile of the same",
    "transport": "how the exchange ran: shm (shared memory, one host); shm+native or "
    "shm+gloo (shared memory within hosts, the leaders' native rounds or gloo across); "
    "gloo; none (a group of one rank)",
    "publishes": "graphs this rank compiled and published to the shared cache",
    "build s saved": "measured: the recorded build time of each loaded graph minus the time "
    "this rank took to load it (waiting included); negative if loading took longer",
    "precomp.": "calls that ran a precompiled artifact (no Dynamo)",
    "fallbacks": "why modules left the precompiled route (reason:count; each then traces "
    "with Dynamo on every start); - when none",
}

#: The verbose table's per-region rows (``regions`` in each rank's stats).
REGION_COLUMNS: list[tuple[str, str, str]] = [
    ("rank", "rank", "s"),
    ("exchanges", "exchanges", "d"),
    ("hits", "hits", "d"),
    ("misses", "misses", "d"),
    ("wait ms", "wait_ms_total", ".1f"),
    ("max wait ms", "wait_ms_max", ".2f"),
    ("frames", "frames", "d"),
    ("traced", "traced", "d"),
    ("built", "built", "d"),
    ("loaded", "loaded", "d"),
]

REGION_LEGEND: dict[str, str] = {
    "rank": "global rank",
    "exchanges": "guard exchanges for the region's frames on this rank",
    "hits": "of them, exchanges in which this rank's own guards passed",
    "misses": "of them, exchanges in which they did not, or the frame had no entry yet",
    "wait ms": "total milliseconds its exchanges were blocked on the other ranks",
    "max wait ms": "the longest single wait",
    "frames": "distinct frame identities exchanged (call sites, resume functions after "
    "graph breaks, grad modes)",
    "traced": "frames of the region Dynamo traced on this rank",
    "built": "of the region's graphs, those the backend built on this rank",
    "loaded": "of the region's graphs, those loaded instead (from any source)",
}


def with_derived(stats: dict[str, Any]) -> dict[str, Any]:
    out = dict(stats)
    ev = int(out.get("evaluations", 0) or 0)
    out["hit_rate"] = (ev - int(out.get("local_misses", 0) or 0)) / ev if ev else 1.0
    # Why modules left the precompiled route (each traces on every start), e.g.
    # "graph_break:1"; "-" when none did.
    fallbacks = out.get("precompiled_fallbacks")
    out["precompiled_fallback_reasons"] = _counts_text(fallbacks)
    # Where loaded graphs came from, e.g. "shared:2,host_copy:2"; "-" when none was.
    out["loaded_from_text"] = _counts_text(out.get("loaded_from"))
    return out


def _counts_text(counts: Any) -> str:
    """``{"a": 1, "b": 2}`` as ``a:1,b:2`` (zero counts left out); ``-`` when empty."""
    if not isinstance(counts, dict):
        return "-"
    return ",".join(f"{k}:{v}" for k, v in sorted(counts.items()) if v) or "-"


#: A rank's stats nest four levels (groups, a group, its ranks); far deeper is no report.
_MAX_NESTING = 16


def _nesting(value: Any) -> int:
    """How deep lists and objects nest in a JSON ``value`` (iterative: any depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _rows(columns: list[tuple[str, str, str]], records: list[dict[str, Any]]) -> list[str]:
    """A right-aligned table: a header, a rule, one row per record (``-``: no value)."""
    rows = [[h for h, _, _ in columns]]
    for rec in records:
        row = []
        for _, key, fmt in columns:
            v = rec.get(key)
            try:
                row.append(format(v, fmt) if v is not None else "-")
            except (TypeError, ValueError):
                row.append(str(v))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _legend(legend: dict[str, str], indent: str = "  ") -> list[str]:
    width = max(len(h) for h in legend)
    return [f"{indent}{h.ljust(width)}  {text}" for h, text in legend.items()]


def format_table(report: dict[str, Any], verbose: bool = False) -> str:
    """One row per rank, then the columns' legend; ranks that never reported are missing.

    ``verbose``: also each compiled region's exchanges, hits and waits, per rank.
    """
    by_rank: dict[str, dict[str, Any]] = report.get("ranks", {})
    lines = _rows(COLUMNS, [by_rank[r] for r in sorted(by_rank, key=int)])
    lines.extend(_group_lines(by_rank))
    lines.extend(_recompile_lines(by_rank))
    lines.append("columns:")
    lines.extend(_legend(LEGEND))
    if verbose:
        lines.extend(_region_lines(by_rank))
    missing = report.get("missing") or []
    head = f"dynamo_dist job report ({report.get('world_size', len(by_rank))} ranks)"
    stalled = report.get("stalled") or []
    if stalled:
        head += f"; ended by rank {report.get('ended_by')} (stall_abort): " + "; ".join(
            f"rank {s.get('rank')} (host {s.get('host', '?')}, pid {s.get('pid', '?')}) "
            f"silent for {s.get('silent_s', '?')}s at exchange #{s.get('seq', '?')}"
            for s in stalled
        )
    elif missing:
        head += f"; no report from ranks {missing} (exited early or crashed)"
    never = report.get("never_compiled") or []
    if never:
        head += f"; ranks {never} made no compiled call (nothing to report)"
    return head + "\n" + "\n".join(lines)


def _region_lines(by_rank: dict[str, dict[str, Any]]) -> list[str]:
    """Per compiled region (its label), a row per rank that exchanged for it."""
    regions: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(by_rank, key=int):
        # A record read from the job's store may hold anything: only objects are regions.
        of_rank = by_rank[r].get("regions")
        if not isinstance(of_rank, dict):
            continue
        for label, counts in of_rank.items():
            if isinstance(counts, dict):
                regions.setdefault(str(label), []).append({**counts, "rank": r})
    if not regions:
        return ["per region: none reported"]
    out = ["per region:"]
    for label in sorted(regions):
        out.append(f"  {label}")
        out.extend(f"    {line}" for line in _rows(REGION_COLUMNS, regions[label]))
    out.append("region columns:")
    out.extend(_legend(REGION_LEGEND))
    return out


#: Recompile reasons shown per rank below the table (all of them are in the JSON).
_REASONS_SHOWN = 3


def _recompile_lines(by_rank: dict[str, dict[str, Any]]) -> list[str]:
    """Each recompiling rank's most frequent reasons; ranks with the same reasons share a line."""
    by_reasons: dict[str, list[str]] = {}
    for r, st in by_rank.items():
        reasons = st.get("recompile_reasons")
        if not isinstance(reasons, dict) or not reasons:
            continue
        top = sorted(reasons.items(), key=lambda kv: (-_as_int(kv[1]), str(kv[0])))
        text = "; ".join(f"{k} ({v}x)" for k, v in top[:_REASONS_SHOWN])
        if len(top) > _REASONS_SHOWN:
            text += f"; {len(top) - _REASONS_SHOWN} more in the JSON"
        by_reasons.setdefault(text, []).append(r)
    if not by_reasons:
        return []
    out = ["recompile reasons:"]
    for text, rs in sorted(by_reasons.items(), key=lambda t: min(int(r) for r in t[1])):
        out.append(f"  ranks {','.join(sorted(rs, key=int))}: {text}")
    return out


def _as_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _group_lines(by_rank: dict[str, dict[str, Any]]) -> list[str]:
    """Per group (``group=``): each figure once if every member agrees, else per rank.

    Shown when the job used a group other than the whole world, or several groups.
    """
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r, st in by_rank.items():
        # A record read from the job's store may hold anything: only objects are groups.
        of_rank = st.get("groups")
        if not isinstance(of_rank, dict):
            continue
        for name, g in of_rank.items():
            if isinstance(g, dict):
                groups.setdefault(str(name), {})[r] = g
    if not groups or list(groups) == ["world"]:
        return []
    out = ["per group:"]
    for name in sorted(groups, key=lambda n: (n != "world", n)):
        members = groups[name]
        transport = next(iter(members.values())).get("transport", "?")
        parts = []
        for key, label in (
            ("exchanges", "exchanges"),
            ("compiles", "frames traced"),
            ("local_compiles", "local compiles"),
            ("divergences", "divergences"),
        ):
            values = {r: g.get(key, 0) for r, g in members.items()}
            if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) == 1:
                parts.append(f"{label} {next(iter(values.values()))}")
            else:
                per = " ".join(
                    f"r{r}={v}" for r, v in sorted(values.items(), key=lambda t: int(t[0]))
                )
                parts.append(f"{label} {per}")
        reported = ",".join(sorted(members, key=int))
        out.append(f"  {name} ({transport}; reported by ranks {reported}): " + ", ".join(parts))
    return out


def publish_and_collect(
    store: Any,
    generation: int,
    rank: int,
    world_size: int,
    stats: dict[str, Any],
    wait_s: float,
    path: str | None,
    started: Callable[[], set[int]] | None = None,
    records: Callable[[], dict[int, dict[str, Any]]] | None = None,
    silent_after: float = 12.0,
    verbose: bool = False,
) -> dict[str, Any] | None:
    """Publish this rank's stats; on rank 0 collect everyone's, log the table, write ``path``.

    ``generation`` numbers dynamo_dist runtimes within the job (a program may shut
    one down and start another), so a report never mixes in an earlier one's stats.
    ``started()``: the ranks that ever started dynamo_dist (made a compiled call); rank
    0 does not wait for the others, which have no stats to give, and says so (None:
    every rank counts as started). ``records()``: the status board; a rank whose record
    stays unchanged for ``silent_after`` while rank 0 waits (killed, or stopped) is not
    waited for any longer: a live rank, even one still training, changes its record
    every heartbeat, and a dead one would hold rank 0's exit for the whole wait, past
    the launcher's grace period.
    ``verbose``: the table has the per-region rows.
    """
    prefix = f"{_PREFIX}{generation}/"
    try:
        store.set(f"{prefix}{rank}", json.dumps(with_derived(stats), default=str))
    except Exception as e:
        log.debug("could not publish the report: %s", e)
        return None
    if rank != 0:
        return None
    keys = [f"{prefix}{r}" for r in range(world_size)]
    deadline = time.monotonic() + wait_s
    with_timeout = getattr(store, "set_timeout", None)
    if with_timeout is not None:
        with_timeout(timedelta(seconds=max(1.0, wait_s)))
    by_rank: dict[str, dict[str, Any]] = {}
    refused: set[int] = set()  # over the store's size cap: listed as missing, read once
    never: set[int] = set()
    silent = _Silence(records, silent_after)
    next_look = time.monotonic()
    while True:
        if time.monotonic() >= next_look:
            # Checked again each second: a rank may start its runtime while we wait.
            known = started() if started is not None else set(range(world_size))
            never = set(range(world_size)) - known - {rank} - refused
            silent.look()
            next_look = time.monotonic() + 1.0
        for r, key in enumerate(keys):
            if str(r) not in by_rank and r not in refused:
                _read_record(store, r, key, by_rank, refused)
        waiting = set(range(world_size)) - {int(r) for r in by_rank} - refused - never
        waiting -= silent.gone
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    never -= {int(r) for r in by_rank}
    report = {
        "world_size": world_size,
        "created": time.time(),
        "ranks": by_rank,
        "missing": [r for r in range(world_size) if str(r) not in by_rank and r not in never],
        "never_compiled": sorted(never),
    }
    log.info("%s", format_table(report, verbose))
    _write(report, path)
    return report


def _read_record(
    store: Any, r: int, key: str, by_rank: dict[str, dict[str, Any]], refused: set[int]
) -> None:
    """Rank ``r``'s report record into ``by_rank`` once it is there; a refused one into
    ``refused`` (over the store's size cap, or nested too deeply: listed as missing)."""
    try:
        if store.check([key]):
            record = json.loads(dist_store.checked(store.get(key), "report record"))
            if _nesting(record) > _MAX_NESTING:
                # Printing it would exceed the recursion limit (str() of a list
                # nested nearly as deep as json.loads allows), at shutdown.
                raise dist_store.PayloadRefused("report record nested too deeply")
            by_rank[str(r)] = record if isinstance(record, dict) else {}
    except dist_store.PayloadRefused as e:
        dist_store.refuse("report record", e)
        refused.add(r)
    except Exception:
        pass


class _Silence:
    """Ranks whose status record has not changed for ``after`` seconds of rank 0's wait."""

    def __init__(
        self, records: Callable[[], dict[int, dict[str, Any]]] | None, after: float
    ) -> None:
        self._records = records
        self._after = after
        self._ages = status.RecordAges()
        self.gone: set[int] = set()

    def look(self) -> None:
        if self._records is None:
            return
        try:
            board = self._records()
        except Exception as e:  # the store going away: wait as before
            log.debug("could not read the status board: %s", e)
            return
        now = time.monotonic()
        for r, rec in board.items():
            stamp = rec.get("time") if isinstance(rec, dict) else None
            age = self._ages.age(r, stamp, now)
            if age is None:
                self.gone.discard(r)
            elif stamp is not None and age >= self._after:
                self.gone.add(r)


def write_stall_report(
    rank: int,
    world_size: int,
    stats: dict[str, Any],
    stalled: list[dict[str, Any]],
    path: str | None,
) -> dict[str, Any]:
    """The report of a job ended by ``stall_abort``: this rank's stats and the stalled ranks.

    The other ranks cannot publish theirs (they wait for the stalled rank, in a
    collective), so the report has one rank's row, and the stalled ranks as the cause.
    """
    report = {
        "world_size": world_size,
        "created": time.time(),
        "ranks": {str(rank): with_derived(stats)},
        "missing": [r for r in range(world_size) if r != rank],
        "stalled": stalled,
        "ended_by": rank,
    }
    log.error("%s", format_table(report))
    _write(report, path)
    return report


def _write(report: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        with contextlib.suppress(OSError, ValueError):
            os.unlink(tmp)
        log.warning("could not write the job report to %r: %s; the table above has it", path, e)


def load(path: str) -> dict[str, Any]:
    with open(path) as fh:
        report: dict[str, Any] = json.load(fh)
    return report
