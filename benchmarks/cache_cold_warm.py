"""Cold and warm starts of a 2-rank job with inductor, side by side in one run.

    python benchmarks/cache_cold_warm.py

Every rank gets its own empty local inductor cache, as if each ran on its own
host. Compared: plain torch.compile; plain torch.compile with one shared
TORCHINDUCTOR_CACHE_DIR; dynamo_dist.compile(cache_dir=...). "warm" is a
second job: for plain torch.compile on the same hosts (local caches kept),
for the shared inductor directory on the same directory, and for dynamo_dist
on fresh hosts (empty local caches) with the same shared cache directory.
Printed per rank: inductor compiles (FX graphs lowered by inductor) and the
time to the end of the first training step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(out: str, mode: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT / "launch"))
    from train import TinyLM, synthetic_batch

    import dynamo_dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    vocab, seq = 128, 32
    model = TinyLM(vocab, 64, 2, 4, seq)
    if mode == "dynamo_dist":
        step_fn = dynamo_dist.compile(model, cache_dir=os.environ["BENCH_SHARED"])
    else:
        step_fn = torch.compile(model)
    x, y = synthetic_batch(0, rank, 8, seq, vocab, torch.device("cpu"))
    dist.barrier()
    t0 = time.perf_counter()
    loss = F.cross_entropy(step_fn(x).reshape(-1, vocab), y.reshape(-1))
    loss.backward()
    first = time.perf_counter() - t0
    res = {
        "rank": rank,
        "first_step_s": first,
        "inductor_compiles": int(counters["inductor"]["fxgraph_cache_miss"]),
    }
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dynamo_dist.shutdown()
    dist.destroy_process_group()


def job(
    mode: str, local_dirs: list[str] | None, shared_inductor: str | None, shared_cache: str | None
) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DYNAMO_DIST_LOG": "ERROR"}
        if shared_cache:
            env["BENCH_SHARED"] = shared_cache
        if shared_inductor:
            env["TORCHINDUCTOR_CACHE_DIR"] = shared_inductor
        else:
            # Per-rank local caches: a wrapper sets TORCHINDUCTOR_CACHE_DIR from LOCAL_RANK.
            env["BENCH_LOCAL_DIRS"] = json.dumps(local_dirs)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            __file__,
            "--worker",
            out,
            "--mode",
            mode,
        ]
        subprocess.run(
            cmd,
            check=True,
            env=env,
            timeout=1800,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker")
    p.add_argument("--mode")
    args = p.parse_args()
    if args.worker:
        dirs = os.environ.get("BENCH_LOCAL_DIRS")
        if dirs:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = json.loads(dirs)[int(os.environ["LOCAL_RANK"])]
        worker(args.worker, args.mode)
        return
    base = Path(tempfile.mkdtemp(prefix="dd_bench_"))

    def local(tag: str) -> list[str]:
        return [str(base / tag / f"rank{r}") for r in range(2)]

    rows = []
    rows.append(("torch.compile", "cold", job("plain", local("plain"), None, None)))
    rows.append(("torch.compile", "warm (same hosts)", job("plain", local("plain"), None, None)))
    shared_ind = str(base / "shared_inductor")
    rows.append(
        (
            "torch.compile + shared TORCHINDUCTOR_CACHE_DIR",
            "cold",
            job("plain", None, shared_ind, None),
        )
    )
    rows.append(
        (
            "torch.compile + shared TORCHINDUCTOR_CACHE_DIR",
            "warm",
            job("plain", None, shared_ind, None),
        )
    )
    shared = str(base / "dd_cache")
    rows.append(
        (
            "dynamo_dist.compile(cache_dir=...)",
            "cold",
            job("dynamo_dist", local("dd1"), None, shared),
        )
    )
    rows.append(
        (
            "dynamo_dist.compile(cache_dir=...)",
            "warm (fresh hosts)",
            job("dynamo_dist", local("dd2"), None, shared),
        )
    )
    print(f"2 ranks, {os.cpu_count()} cores, TinyLM (2 layers, d=64), inductor on CPU")
    print(
        f"{'configuration':48s} {'start':18s} {'inductor compiles r0/r1':>24s} "
        f"{'first step s r0/r1':>20s}"
    )
    cold_time: dict[str, float] = {}
    for name, start, res in rows:
        comp = "/".join(str(r["inductor_compiles"]) for r in res)
        times = [r["first_step_s"] for r in res]
        slowest = max(times)
        if start == "cold":
            cold_time[name] = slowest
        ratio = f"  ({slowest / cold_time[name]:.2f}x cold)" if start != "cold" else ""
        print(
            f"{name:48s} {start:18s} {comp:>24s} {'/'.join(f'{t:.1f}' for t in times):>20s}{ratio}"
        )


if __name__ == "__main__":
    main()
