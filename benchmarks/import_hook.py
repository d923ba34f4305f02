"""What the torch.compile switch's import hook costs a program that does not use it.

    python benchmarks/import_hook.py [--runs 200]

Times ``python -c pass`` with the installed ``dynamo_dist_switch.pth`` and with it
moved aside, interleaved, with ``DYNAMO_DIST_*`` unset; then the ``.pth`` line alone.
Needs write access to site-packages (run it in a virtual environment): the file is
moved back on exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()
    pth = os.path.join(sysconfig.get_paths()["purelib"], "dynamo_dist_switch.pth")
    if not os.path.exists(pth):
        raise SystemExit(f"{pth} not found: install dynamo_dist into this environment first")
    aside = pth + ".aside"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMO_DIST_")}

    def once() -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        return time.perf_counter() - t

    with_pth: list[float] = []
    without: list[float] = []
    try:
        for _ in range(args.runs):
            os.rename(pth, aside)
            without.append(once())
            os.rename(aside, pth)
            with_pth.append(once())
    finally:
        if os.path.exists(aside):
            os.rename(aside, pth)
    on, off = statistics.median(with_pth) * 1e3, statistics.median(without) * 1e3
    print(
        f"python -c pass: {on:.2f} ms with the hook, {off:.2f} ms without: "
        f"{on - off:+.3f} ms (median of {args.runs} each, interleaved)"
    )
    with open(pth) as fh:
        code = compile(fh.read().strip(), pth, "exec")
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        exec(code, {})
    print(f"the .pth line itself, compiled once: {(time.perf_counter() - t) / n * 1e6:.2f} us")


if __name__ == "__main__":
    main()
