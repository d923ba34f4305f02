"""Per-call cost of a guard exchange, measured side by side in one run.

    python benchmarks/guard_exchange.py            # 2 and 4 ranks, one host
    python benchmarks/guard_exchange.py --nproc 2 --calls 3000
    python benchmarks/guard_exchange.py --regional 32 --regional 80   # per-block compiles

For each rank count it starts the ranks with torchrun and, on the same compiled
function, times a compiled call with: no hook; upstream's
``torch.compiler.set_enable_guard_collectives(True)``; dynamo_dist over gloo;
dynamo_dist over shared memory (where available); and a bare gloo all_reduce
of one int. Medians of per-call times; ratios are taken within the same run.

``--regional N`` times torchtitan-style regional compilation instead: a model of N
blocks of one user-defined class, each block compiled on its own with
``fullgraph=True`` (torchtitan's ``apply_compile``), so a forward step makes N
compiled calls. It compares a step with plain torch.compile and with every
torch.compile switched to dynamo_dist (``dynamo_dist.patch_torch_compile()``, as
``--all-compiles`` does), over shared memory and over gloo, and counts the guard
exchanges per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _launch import agent_commands

MODES = ["no hook", "upstream hook", "dynamo_dist gloo", "dynamo_dist shm", "bare all_reduce"]


def _world_transport() -> Any:
    """The running job's whole-world guard transport (None outside a job)."""
    from dynamo_dist.dist import runtime

    rt = runtime.current()
    world = tuple(range(rt.world_size)) if rt is not None else ()
    return rt.groups[world].transport if rt is not None and world in rt.groups else None


def _median_us(fn, calls: int) -> float:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e3


def _interleaved_added(plain: Any, compiled: Any, x: Any, calls: int, rounds: int = 15) -> list:
    """What dynamo_dist adds per compiled call, in interleaved rounds.

    Each round times a block of plain ``torch.compile`` calls with no guard-complete hook
    installed, then a block of ``dynamo_dist.compile`` calls, and keeps the difference of
    their medians: drifts of a shared machine (other processes, frequency) hit both sides
    of a round alike, and the spread over rounds shows what is left of them.
    """
    from dynamo_dist.dynamo import patches

    per = max(200, calls // rounds)
    added = []
    for _ in range(rounds):
        router = patches.set_guard_complete_hook(None)
        try:
            base = _median_us(lambda: plain(x), per)
        finally:
            patches.set_guard_complete_hook(router)
        added.append(_median_us(lambda: compiled(x), per) - base)
    return added


def _finish(out: str, results: dict[str, Any]) -> None:
    """Gather every rank's results into ``out`` (rank 0 writes it), then leave the group."""
    import torch.distributed as dist

    gathered: list[dict[str, float | None] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def worker(out: str, calls: int) -> None:
    import torch
    import torch.distributed as dist

    import dynamo_dist

    dist.init_process_group("gloo")
    x = torch.ones(4)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t + 1

    results: dict[str, Any] = {}
    plain = torch.compile(fn, backend="eager")
    for _ in range(50):
        plain(x)
    dist.barrier()
    results["no hook"] = _median_us(lambda: plain(x), calls)

    dist.barrier()
    prev = torch.compiler.set_enable_guard_collectives(True)
    for _ in range(20):
        plain(x)
    results["upstream hook"] = _median_us(lambda: plain(x), max(200, calls // 5))
    torch.compiler.set_enable_guard_collectives(prev)

    for transport in ("gloo", "shm"):
        dist.barrier()
        os.environ["DYNAMO_DIST_TRANSPORT"] = transport
        compiled = dynamo_dist.compile(fn, backend="eager")
        tr = _world_transport()
        if tr is None or tr.name not in (transport, f"{transport}+gloo", f"{transport}+native"):
            results[f"dynamo_dist {transport}"] = None
        else:
            for _ in range(50):
                compiled(x)
            results[f"dynamo_dist {transport}"] = _median_us(lambda c=compiled: c(x), calls)
            # The exchange alone, as timed inside the hook (no Dynamo call overhead): its
            # own cost and its wait for the other rank, medians.
            st = dynamo_dist.stats()
            results[f"exchange {transport}"] = (st["cost_p50_us"], st["wait_p50_us"])
            if transport == "shm":
                results["added shm rounds"] = _interleaved_added(plain, compiled, x, calls)
        dynamo_dist.shutdown()
        torch._dynamo.reset()

    dist.barrier()
    pg = dist.new_group(backend="cpu:gloo")
    one = torch.zeros(1, dtype=torch.int64)
    for _ in range(50):
        dist.all_reduce(one, group=pg)
    results["bare all_reduce"] = _median_us(lambda: dist.all_reduce(one, group=pg), calls)

    _finish(out, results)


REGIONAL_MODES = ["torch.compile", "dynamo_dist shm", "dynamo_dist gloo"]


def regional_worker(out: str, steps: int, blocks: int) -> None:
    """Per-step times with and without the switch, interleaved in rounds (noise hits both)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import dynamo_dist

    class Block(nn.Module):  # user-defined: Dynamo traces it (torch.nn-only code it skips)
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.lin = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.lin(x))

    dist.init_process_group("gloo")
    x = torch.randn(2, 8)
    results: dict[str, float | None] = {}

    def build() -> list[nn.Module]:
        torch.manual_seed(0)
        return [torch.compile(Block(8), backend="eager", fullgraph=True) for _ in range(blocks)]

    def step(layers: list[nn.Module]) -> None:
        with torch.no_grad():
            h = x
            for layer in layers:
                h = layer(h)

    rounds = 10
    for transport in ("shm", "gloo"):
        mode = f"dynamo_dist {transport}"
        os.environ["DYNAMO_DIST_TRANSPORT"] = transport
        plain = build()
        with dynamo_dist.patch_torch_compile():
            switched = build()
        for layers in (plain, switched):
            for _ in range(20):
                step(layers)
        tr = _world_transport()
        if tr is None or tr.name not in (transport, f"{transport}+gloo", f"{transport}+native"):
            results[mode] = None
        else:
            before = dynamo_dist.stats()["exchanges"]
            samples: dict[str, list[float]] = {"plain": [], "switched": []}
            for _ in range(rounds):
                for name, layers in (("plain", plain), ("switched", switched)):
                    dist.barrier()
                    samples[name].append(
                        _median_us(lambda layers=layers: step(layers), max(5, steps // rounds))
                    )
            stats = dynamo_dist.stats()
            n_switched = rounds * max(5, steps // rounds)
            results[mode] = statistics.median(samples["switched"])
            results[f"{mode} baseline"] = statistics.median(samples["plain"])
            results[f"{mode} exchanges/step"] = (stats["exchanges"] - before) / n_switched
            results[f"{mode} exchange p50"] = stats.get("cost_p50_us")
        dynamo_dist.shutdown()
        torch._dynamo.reset()

    _finish(out, results)


def run_regional(nproc: int, steps: int, blocks: int) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DYNAMO_DIST_LOG": "ERROR"}
        (cmd,) = agent_commands(1, nproc, [__file__, "--worker", out, "--calls", str(steps)])
        subprocess.run(
            [*cmd, "--regional", str(blocks)],
            check=True,
            env=env,
            timeout=1800,
            stdout=subprocess.DEVNULL,
        )
        per_rank = json.loads(Path(out).read_text())
    keys = [
        f"{m} {what}".strip()
        for m in REGIONAL_MODES[1:]
        for what in ("", "baseline", "exchanges/step", "exchange p50")
    ]
    return {
        k: (None if any(r.get(k) is None for r in per_rank) else max(r[k] for r in per_rank))
        for k in keys
    }


def report_regional(nproc: int, steps: int, blocks: int) -> None:
    res = run_regional(nproc, steps, blocks)
    print(
        f"\n{nproc} ranks, one host, {os.cpu_count()} cores: {blocks} blocks compiled one by "
        f"one (fullgraph), so {blocks} compiled calls per forward step; median us per step "
        "(max over ranks), plain and switched interleaved in rounds"
    )
    for m in REGIONAL_MODES[1:]:
        v, base = res[m], res[f"{m} baseline"]
        if v is None or base is None:
            print(f"  {m:18s}      n/a")
            continue
        per = res[f"{m} exchanges/step"] or 0.0
        print(
            f"  {m:18s} {v:9.1f}  torch.compile {base:9.1f}: adds {v - base:8.1f} us/step = "
            f"{(v - base) / blocks:6.1f} us per block call; {per:.0f} exchanges/step; "
            f"{v / base:4.2f}x torch.compile's step"
        )
        p50 = res[f"{m} exchange p50"]
        if p50 is not None:
            print(f"  {'':18s} the exchange's own cost (p50 in the hook): {p50:.1f} us")


def run(nproc: int, calls: int, hosts: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DYNAMO_DIST_LOG": "ERROR"}
        worker = [__file__, "--worker", out, "--calls", str(calls)]
        # Several hosts: torchrun agents on this machine, as if on several hosts.
        agents = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            for cmd in agent_commands(hosts, nproc, worker)
        ]
        for a in agents:
            if a.wait(timeout=1800) != 0:
                raise SystemExit("a benchmark agent failed")
        per_rank = json.loads(Path(out).read_text())
    # The slowest rank bounds the step: report the max over ranks of each median.
    summary: dict[str, Any] = {
        m: (max(r[m] for r in per_rank) if per_rank[0].get(m) is not None else None) for m in MODES
    }
    for m in ("exchange gloo", "exchange shm"):  # (cost, wait): each its max over ranks
        pairs = [r.get(m) for r in per_rank]
        summary[m] = [max(col) for col in zip(*pairs, strict=True)] if all(pairs) else None
    rounds = [r.get("added shm rounds") for r in per_rank]
    if all(rounds):
        summary["added shm rounds"] = [max(col) for col in zip(*rounds, strict=True)]
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, action="append", help="rank counts (default 2 and 4)")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument(
        "--hosts",
        type=int,
        action="append",
        help="simulated hosts for the hierarchical run (default 2, with 2 ranks each)",
    )
    p.add_argument(
        "--regional",
        type=int,
        action="append",
        metavar="N",
        help="time regional compilation instead: N blocks compiled one by one (repeatable)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.regional:
            regional_worker(args.worker, args.calls, args.regional[0])
        else:
            worker(args.worker, args.calls)
        return
    if args.regional:
        for blocks in args.regional:
            for nproc in args.nproc or [2]:
                report_regional(nproc, max(50, args.calls // blocks), blocks)
        return
    runs = [(n, 1) for n in (args.nproc or [2, 4])]
    runs += [(2, h) for h in (args.hosts if args.hosts is not None else [2]) if h > 1]
    for nproc, hosts in runs:
        res = run(nproc, args.calls, hosts)
        where = "one host" if hosts == 1 else f"{hosts} simulated hosts x {nproc} ranks"
        print(
            f"\n{nproc * hosts} ranks, {where}, {os.cpu_count()} cores: "
            "median us per compiled call (max over ranks)"
        )
        base, up, bare = res["no hook"], res["upstream hook"], res["bare all_reduce"]
        for m in MODES:
            v = res[m]
            label = "dynamo_dist shm+native" if (m == "dynamo_dist shm" and hosts > 1) else m
            if v is None:
                print(f"  {label:20s}      n/a")
                continue
            extra = ""
            if m.startswith("dynamo_dist") and base is not None and up is not None:
                added = v - base
                # Overheads are compared with ours floored at 1 us: below that the
                # difference is lost in run-to-run noise.
                extra = (
                    f"  adds {added:7.1f} us; total {up / v:5.1f}x and overhead "
                    f"{(up - base) / max(added, 1.0):7.1f}x cheaper than upstream"
                )
                if bare:
                    extra += f"; {v / bare:4.2f}x a bare all_reduce"
            exch = res.get("exchange " + m.split()[-1]) if m.startswith("dynamo_dist") else None
            if exch is not None:
                cost, wait = exch
                extra += f"\n  {'':20s} in the hook: own cost p50 {cost:7.1f} us, wait for "
                extra += f"the peers p50 {wait:7.1f} us"
                if bare:
                    extra += f" (a bare all_reduce: {bare:7.1f} us)"
            print(f"  {label:20s} {v:9.1f}{extra}")
        rounds = res.get("added shm rounds")
        if rounds:
            label = "shm+native" if hosts > 1 else "shm"
            print(
                f"  dynamo_dist {label} adds, interleaved with plain torch.compile: median "
                f"{statistics.median(rounds):.2f} us per call (rounds {min(rounds):.2f} to "
                f"{max(rounds):.2f}; {len(rounds)} rounds, max over ranks)"
            )


if __name__ == "__main__":
    main()
