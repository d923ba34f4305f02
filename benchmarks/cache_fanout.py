"""Shared-file-system operations per cache entry, with and without fan-out, and a model.

    python benchmarks/cache_fanout.py --hosts 2 --ranks-per-host 4            # direct, fast
    python benchmarks/cache_fanout.py --hosts 2 --ranks-per-host 4 --program inductor

Each host is emulated by its own torchrun agent (``--nnodes=H --node-rank=i``, static
rendezvous on 127.0.0.1; distinct GROUP_RANK), and the ranks of one host share one
local cache directory, as the ranks of a real host share /tmp. Every run starts from an
empty shared cache: one rank leads the graph's compile and publishes it, the others get
it. Each rank reports the operations its shared store counted (``shared_fs_*`` in the
cache stats: opens, stats, listings, reads, writes on the shared directory, setup
excluded) and its role: the leader (published), a host's fetcher (fetched the entry for
its host), or a follower (everyone else).

Programs:

* ``direct`` (default): ``SharedCache.compile`` with a compile that writes one file where
  inductor would and then holds for ``--hold`` seconds: the entry path exactly, without
  inductor's cost. Run twice per mode, holding 0 s and ``--hold`` s, so that per-entry
  operations (hold 0) and polling operations per second of a compile elsewhere (the
  waiting role's extra operations over its extra seconds of waiting) are told apart.
* ``inductor``: ``dynamo_dist.compile`` of a small module with inductor (one run per
  mode; the wait is inductor's compile). The group's first rank also looks up the
  automatic-dynamic profile in the shared directory (one stat when there is none).

Modes: ``before`` sets DYNAMO_DIST_CACHE_FANOUT=0 (every rank reads the shared entry and
polls its lock, as before fan-out), ``after`` the default. The model then gives, for
``--model-hosts`` x ``--model-ranks``: ops per entry = leader + (hosts - 1) x fetcher
(+ 0 x followers) after, leader + (ranks - 1) x follower before; and shared-FS polls per
second while a graph compiles elsewhere. Nothing is asserted; every process started is
killed when the run ends, fails or times out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _launch import agent_commands, free_port

KEY = "fb" * 20


# -- rank side -----------------------------------------------------------------------
def _worker(out: Path, program: str, hold: float) -> None:
    import torch
    import torch.distributed as dist

    host = os.environ["GROUP_RANK"]
    local = Path(os.environ["BENCH_LOCAL"]) / f"host{host}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(local)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    t0 = time.monotonic()
    if program == "direct":
        from dynamo_dist._config import resolve
        from dynamo_dist.cache import key, protocol
        from dynamo_dist.dist import local as dist_local
        from dynamo_dist.dynamo import inductor

        cfg = resolve()
        cache = protocol.SharedCache(
            os.environ["DYNAMO_DIST_CACHE_DIR"], 600.0, 30.0, agree=True, fanout=cfg.cache_fanout
        )

        def compile_fn() -> str:
            d = Path(inductor.cache_dir())
            (d / "fxgraph").mkdir(parents=True, exist_ok=True)
            (d / "fxgraph" / f"graph-{KEY}").write_text("compiled")
            time.sleep(hold)
            return "compiled"

        group = dist_local.GroupInfo("world", "world", world)
        cache.compile(KEY, key.version_factors(), compile_fn, "bench (direct)", group=group)
        stats = cache.stats()
    else:
        import dynamo_dist

        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        with torch.no_grad():
            dynamo_dist.compile(model)(torch.randn(4, 8))
        stats = dynamo_dist.stats()
    seconds = time.monotonic() - t0
    (out / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "host": int(host), "seconds": seconds, "stats": stats})
    )
    dist.barrier()  # no rank exits (tearing the store down) before all have written
    dist.destroy_process_group()


# -- launcher side -----------------------------------------------------------------------
def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """End each agent's whole process group (the agent and its ranks), then reap."""
    for p in procs:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


def _run(args: argparse.Namespace, mode: str, hold: float, base: Path) -> list[dict[str, Any]]:
    """One job of ``args.hosts`` agents; each rank's result."""
    work = Path(tempfile.mkdtemp(prefix=f"{mode}-{hold:g}-", dir=base))
    out, local, cache = work / "out", work / "local", work / "cache"
    out.mkdir()
    local.mkdir(mode=0o700)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DYNAMO_DIST_CACHE_DIR": str(cache),
        "DYNAMO_DIST_CACHE_FANOUT": "0" if mode == "before" else "1",
        "DYNAMO_DIST_CACHE_FOLLOWERS": "wait",  # the ranks wait for the leader's entry
        "BENCH_LOCAL": str(local),
    }
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    log = (work / "output.txt").open("wb")
    try:
        worker = [__file__, "--worker", str(out), "--program", args.program, "--hold", str(hold)]
        for cmd in agent_commands(args.hosts, args.ranks_per_host, worker, port):
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a host's agent failed; see {work / 'output.txt'}")
    finally:
        _kill(procs)
        log.close()
    results = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    if len(results) != args.hosts * args.ranks_per_host:
        raise RuntimeError(f"only {len(results)} ranks reported; see {work / 'output.txt'}")
    return results


def _role(s: dict[str, Any]) -> str:
    if s["cache_publishes"]:
        return "leader"
    if s["cache_host_fetches"]:
        return "fetcher"
    return "follower"


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Shared-FS operations of one job: total, per host, per rank, mean per role."""
    by_role: dict[str, list[int]] = {}
    seconds: dict[str, list[float]] = {}
    per_host: dict[int, int] = {}
    for r in results:
        ops = r["stats"]["shared_fs_total"]
        by_role.setdefault(_role(r["stats"]), []).append(ops)
        seconds.setdefault(_role(r["stats"]), []).append(r["seconds"])
        per_host[r["host"]] = per_host.get(r["host"], 0) + ops
    entries = max(1, sum(r["stats"]["cache_publishes"] for r in results))
    return {
        "entries": entries,
        "total": sum(r["stats"]["shared_fs_total"] for r in results),
        "per_host": per_host,
        "per_rank": {r["rank"]: r["stats"]["shared_fs_total"] for r in results},
        "role": {k: sum(v) / len(v) for k, v in by_role.items()},
        # Mean seconds each role spent in the compile (waiting, for all but the leader).
        "seconds": {k: sum(v) / len(v) for k, v in seconds.items()},
        "roles": {k: len(v) for k, v in by_role.items()},
        "kinds": {
            k: sum(r["stats"][f"shared_fs_{k}"] for r in results)
            for k in ("opens", "stats", "listdirs", "reads", "writes")
        },
        "host_loads": sum(r["stats"]["cache_host_loads"] for r in results),
        "loads": sum(r["stats"]["cache_loads"] for r in results),
    }


def _print(mode: str, hold: float, s: dict[str, Any]) -> None:
    roles = ", ".join(f"{k} {v:.0f} ({s['roles'][k]} ranks)" for k, v in sorted(s["role"].items()))
    held = f" hold {hold:4.1f}s" if hold else ""
    print(f"{mode:6s}{held}: {s['total']:5d} shared-FS ops for {s['entries']} entry")
    print(f"       per host: {s['per_host']}")
    print(f"       per rank: {s['per_rank']}")
    print(f"       per role (mean): {roles}")
    print(
        f"       by kind: {s['kinds']}; loads {s['loads']}, of which from the host copy "
        f"{s['host_loads']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--ranks-per-host", type=int, default=4)
    p.add_argument("--program", choices=("direct", "inductor"), default="direct")
    p.add_argument("--hold", type=float, default=5.0, help="seconds the direct compile takes")
    p.add_argument("--model-hosts", type=int, default=128)
    p.add_argument("--model-ranks", type=int, default=8, help="ranks per host in the model")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.program, args.hold)
        return
    holds = [0.0, args.hold] if args.program == "direct" else [0.0]
    print(
        f"{args.hosts} emulated hosts x {args.ranks_per_host} ranks, program {args.program}; "
        "shared-FS operations (setup excluded) for one entry"
    )
    runs: dict[tuple[str, float], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cache_fanout-") as base:
        for mode in ("before", "after"):
            for hold in holds:
                runs[mode, hold] = s = _summary(_run(args, mode, hold, Path(base)))
                _print(mode, hold, s)
    h, r = args.model_hosts, args.model_ranks
    print(f"\nmodel: {h} hosts x {r} ranks = {h * r} ranks, one entry")
    for mode in ("before", "after"):
        s0 = runs[mode, 0.0]
        lead = s0["role"].get("leader", 0.0)
        if mode == "before":
            per = s0["role"].get("follower", 0.0)
            total = lead + (h * r - 1) * per
            how = f"leader {lead:.0f} + {h * r - 1} followers x {per:.0f}"
        else:
            per = s0["role"].get("fetcher", 0.0)
            total = lead + (h - 1) * per
            how = f"leader {lead:.0f} + {h - 1} fetchers x {per:.0f} + {h * (r - 1)} followers x 0"
        line = f"  {mode:6s}: {total:8.0f} ops per entry ({how})"
        if len(holds) > 1:
            waiting = "follower" if mode == "before" else "fetcher"
            s1 = runs[mode, args.hold]
            waited = s1["seconds"].get(waiting, 0.0) - s0["seconds"].get(waiting, 0.0)
            ops = s1["role"].get(waiting, 0.0) - s0["role"].get(waiting, 0.0)
            rate = ops / waited if waited > 0 else float("nan")
            pollers = h * r - 1 if mode == "before" else h - 1
            line += (
                f"; while a graph compiles elsewhere: {rate:.2f} ops/s per waiting {waiting}, "
                f"{rate * (r if mode == 'before' else 1):.2f} per host, "
                f"{rate * pollers:.0f} ops/s on the shared FS"
            )
        print(line)
    from dynamo_dist.cache.protocol import LOCK_LOOK_S, SHARED_POLL_S, SHARED_POLL_UNBOUNDED_S

    # By design, once the backoff reached its cap (lock looks are ~7 operations each).
    print(
        f"  lock looks per second while a graph compiles elsewhere, by design: before "
        f"{h * r - 1} waiting ranks x 1/{SHARED_POLL_UNBOUNDED_S:g}s = "
        f"{(h * r - 1) / SHARED_POLL_UNBOUNDED_S:.0f}/s (plus an entry stat each); after "
        f"{h - 1} fetchers x 1/{LOCK_LOOK_S:g}s = {(h - 1) / LOCK_LOOK_S:.1f}/s, plus "
        f"{h - 1} x 1/{SHARED_POLL_S:g}s = {(h - 1) / SHARED_POLL_S:.0f} manifest stats/s "
        f"(per host: {1 / SHARED_POLL_S + 7 / LOCK_LOOK_S:.1f} ops/s)"
    )


if __name__ == "__main__":
    main()
