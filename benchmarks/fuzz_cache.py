"""Seeded fuzzing of what the cache and the job's store read (issue 30, item 4).

    python benchmarks/fuzz_cache.py --cases 10000 --seed 30004
    python benchmarks/fuzz_cache.py --case store:plain:17 --seed 30004   # one case, its steps

Runs ``--cases`` cases spread evenly over the targets and variants of
``tests/adversarial/fuzz_cases.py`` (shared cache entries, precompiled artifact files,
host-local copies, automatic-dynamic profiles, store payloads; each mutated as written,
and mutated then re-signed with the real secret), one process, deterministic by seed:
case ``i`` of a target and variant is the same case whatever ``--cases`` is. Prints a
table per target and variant: cases, refused, handled, crashes, hangs, unverified loads,
and milliseconds per case; then every failing case with the command that replays it.
Exits 1 if any case crashed, hung or loaded something unverified.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "adversarial")]

COLUMNS = ("cases", "refused", "handled", "crashes", "hangs", "unverified", "ms/case", "max ms")
_STATUS = {"crash": "crashes", "hang": "hangs", "unverified": "unverified"}


def _table(rows: dict[str, dict[str, float]]) -> str:
    head = ["target", *COLUMNS]
    lines = [head]
    for name, row in rows.items():
        lines.append([name, *(f"{row[c]:.1f}" if "ms" in c else str(int(row[c])) for c in COLUMNS)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.insert(len(out) - 1, out[1])
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", type=int, default=10_000, help="cases in all (default 10000)")
    p.add_argument("--seed", type=int, default=30004)
    p.add_argument("--targets", default="", help="comma-separated subset of the targets")
    p.add_argument("--case", default="", help="run one case, TARGET:VARIANT:INDEX, and show it")
    p.add_argument("--json", default="", help="also write the table and failures here")
    p.add_argument("--max-failures-shown", type=int, default=30)
    args = p.parse_args()

    import fuzz_cases as fc

    tmp = Path(tempfile.mkdtemp(prefix="dd-fuzz-cache-"))
    os.chmod(tmp, 0o700)
    try:
        if args.case:
            target, variant, index = args.case.split(":")
            r = fc.run_case(target, variant, args.seed, int(index), tmp)
            print(json.dumps({k: v for k, v in vars(r).items()}, indent=2, default=str))
            return 1 if r.status in fc.FAILURES else 0
        targets = [t for t in args.targets.split(",") if t] or list(fc.TARGETS)
        slots = [(t, v) for t in targets for v in fc.VARIANTS]
        per = {
            s: args.cases // len(slots) + (1 if i < args.cases % len(slots) else 0)
            for i, s in enumerate(slots)
        }
        rows: dict[str, dict[str, float]] = {}
        failures: list[dict[str, object]] = []
        total = collections.Counter[str]()
        total_max = 0.0
        t_all = time.perf_counter()
        t0 = time.perf_counter()
        fc.templates()
        setup_s = time.perf_counter() - t0
        for (target, variant), n in per.items():
            counts = collections.Counter[str]()
            seconds = slowest = 0.0
            for i in range(n):
                r = fc.run_case(target, variant, args.seed, i, tmp)
                counts[_STATUS.get(r.status, r.status)] += 1
                seconds += r.seconds
                slowest = max(slowest, r.seconds)
                if r.status in fc.FAILURES:
                    failures.append(
                        {
                            "case": f"{target}:{variant}:{i}",
                            "status": r.status,
                            "detail": r.detail,
                            "steps": r.steps,
                        }
                    )
            row = {c: counts.get(c, 0) for c in COLUMNS[1:-2]}
            row["cases"] = n
            row["ms/case"] = 1000 * seconds / max(n, 1)
            row["max ms"] = 1000 * slowest
            rows[f"{target}/{variant}"] = row
            total.update({**{c: row[c] for c in COLUMNS[1:-2]}, "cases": n, "seconds": seconds})
            total_max = max(total_max, slowest)
            print(f"  {target}/{variant}: {n} cases, {seconds:.1f}s", file=sys.stderr, flush=True)
        rows["total"] = {
            **{c: total.get(c, 0) for c in COLUMNS[:-2]},
            "ms/case": 1000 * total["seconds"] / max(total["cases"], 1),
            "max ms": 1000 * total_max,
        }
        wall = time.perf_counter() - t_all
        cases = total["cases"]
        print(
            f"fuzz_cache: seed {args.seed}, {cases} cases, {wall:.0f}s wall ({setup_s:.1f}s setup)"
        )
        print(_table(rows))
        for f in failures[: args.max_failures_shown]:
            print(f"\n{f['status']}: {f['case']}: {f['detail']}\n  steps: {f['steps']}")
            print(
                f"  replay: python benchmarks/fuzz_cache.py --seed {args.seed} --case {f['case']}"
            )
        if len(failures) > args.max_failures_shown:
            print(f"\n... and {len(failures) - args.max_failures_shown} more failures")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"seed": args.seed, "wall_s": wall, "rows": rows, "failures": failures},
                    indent=2,
                )
            )
        return 1 if failures else 0
    finally:
        fc.cleanup_templates()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
