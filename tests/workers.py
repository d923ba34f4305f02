"""Rank programs for the multi-process tests, run under torchrun.

``python -m torch.distributed.run ... tests/workers.py SCENARIO OUTDIR`` runs
``SCENARIO`` on every rank and writes ``OUTDIR/rank<R>.json`` with what that
rank saw (compile counts, stats, outputs, or the error it raised), so tests
assert on facts gathered from every rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import dynamo_dist

SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {}


def scenario(fn: Callable[[int, int], dict[str, Any]]) -> Callable[[int, int], dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


class CountingBackend:
    """Counts graphs and records, per graph, whether any input is symbolic (dynamic)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.dynamic: list[bool] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1

        def symbolic(a: Any) -> bool:
            if isinstance(a, torch.SymInt):
                return True
            return isinstance(a, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in a.shape)

        self.dynamic.append(any(symbolic(a) for a in example_inputs))
        return gm.forward


def _result(cb: CountingBackend, ok: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "graphs": cb.graphs,
        "dynamic": cb.dynamic,
        "ok": ok,
        "stats": dynamo_dist.stats(),
        **extra,
    }


def _error_result(cb: CountingBackend, e: BaseException, **extra: Any) -> dict[str, Any]:
    return _result(cb, False, error=type(e).__name__, message=str(e), **extra)


def _f(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


# -- issue 2: the foundation -------------------------------------------------
@scenario
def divergent_shape(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(6):
        n = 5 if (rank == 1 and step == 3) else 4
        x = torch.full((n, 3), float(step + 1))
        ok &= bool(torch.allclose(cf(x), _f(x)))
    from dynamo_dist._hook import current_hook

    return _result(cb, ok, hook_type=type(current_hook()).__name__)


@scenario
def long_loop(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(300):
        n = 7 if (rank == world - 1 and step == 150) else 4
        x = torch.full((n, 2), float(step % 5))
        ok &= bool(torch.allclose(cf(x), _f(x)))
    return _result(cb, ok)


@scenario
def module_and_method(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    cm = dynamo_dist.compile(model, backend=cb)
    ok = True
    for step in range(4):
        n = 3 if (rank == 0 and step == 2) else 2
        x = torch.randn(n, 3)
        ok &= bool(torch.allclose(cm(x), model(x)))
    return _result(cb, ok, module_type=type(cm).__name__)


# -- issue 3: rank-consistent compile decisions ---------------------------------
@scenario
def per_rank_batches(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    sizes = [[4, 4, 6, 6, 8], [4, 5, 6, 7, 8]][rank % 2]
    ok = True
    for n in sizes:
        x = torch.randn(n, 3)
        ok &= bool(torch.allclose(cf(x), _f(x)))
    return _result(cb, ok)


@scenario
def int_argument(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor, k: int) -> torch.Tensor:
        return x + torch.ones(k).sum()

    cg = dynamo_dist.compile(g, backend=cb)
    data = [[3, 3, 7], [3, 4, 9]][rank % 2]
    ok = True
    for k in data:
        x = torch.randn(5)
        ok &= bool(torch.allclose(cg(x, k), g(x, k)))
    return _result(cb, ok)


@scenario
def speculation_divergence(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        zx = x.shape  # noqa: F841
        zy = y.shape  # noqa: F841
        return x.sum() + y.sum()

    cg = dynamo_dist.compile(g, backend=cb)
    data = [[4, 4], [3, 4]][rank % 2]
    ok = True
    for n in data:
        x, y = torch.randn(n), torch.randn(n)
        ok &= bool(torch.allclose(cg(x, y), g(x, y)))
    return _result(cb, ok)


@scenario
def graph_break(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor) -> torch.Tensor:
        y = x.sin() * 2
        torch._dynamo.graph_break()
        return y.cos() + x.shape[0]

    cg = dynamo_dist.compile(g, backend=cb)
    data = [[4, 4, 4, 6], [4, 5, 4, 6]][rank % 2]
    ok = True
    for n in data:
        x = torch.randn(n, 2)
        ok &= bool(torch.allclose(cg(x), g(x)))
    return _result(cb, ok)


@scenario
def dim_mismatch(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor) -> torch.Tensor:
        return x.sum() + 1

    cg = dynamo_dist.compile(g, backend=cb)
    shapes = [[(4, 3), (4, 3), (5, 3)], [(4, 3, 2), (4, 3), (6, 3)]][rank % 2]
    ok = True
    for s in shapes:
        x = torch.randn(*s)
        ok &= bool(torch.allclose(cg(x), g(x)))
    return _result(cb, ok)


@scenario
def reset_on_one_rank(rank: int, world: int) -> dict[str, Any]:
    """Asymmetric cache state: rank 1 drops its cache entries mid-run."""
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(6):
        if rank == 1 and step == 3:
            torch._dynamo.reset()
        x = torch.full((4, 3), float(step))
        ok &= bool(torch.allclose(cf(x), _f(x)))
    return _result(cb, ok)


@scenario
def different_order(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor) -> torch.Tensor:
        return x.cos() - 1

    cf = dynamo_dist.compile(_f, backend=cb)
    cg = dynamo_dist.compile(g, backend=cb)
    x = torch.randn(4, 3)
    cf(x)
    cg(x)
    try:
        for _ in range(3):
            if rank == 0:
                cf(x)
                cg(x)
            else:
                cg(x)
                cf(x)
    except dynamo_dist.RankDivergenceError as e:
        return _error_result(cb, e, ranks=sorted(e.ranks))
    return _result(cb, True)


@scenario
def extra_call(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 calls the compiled function once more than the others (SPMD violation)."""
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, timeout=float(os.environ.get("DD_T", "4")))
    x = torch.randn(4, 3)
    for _ in range(3):
        cf(x)
    if rank == 0:
        t0 = time.monotonic()
        try:
            cf(x)
        except dynamo_dist.CollectiveTimeoutError as e:
            return _error_result(
                cb,
                e,
                missing=e.missing,
                waited=time.monotonic() - t0,
            )
        return _result(cb, True)
    # The others stay alive (not in any exchange) well past the timeout.
    time.sleep(float(os.environ.get("DD_T", "4")) + 6)
    return _result(cb, True)


@scenario
def killed_rank(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, timeout=60)
    x = torch.randn(4, 3)
    t0 = 0.0
    try:
        for step in range(50):
            if rank == world - 1 and step == 10:
                time.sleep(3)  # let the status board publish, then die abruptly
                os._exit(17)
            t0 = time.monotonic()
            cf(x)
    except dynamo_dist.CollectiveTimeoutError as e:
        return _error_result(
            cb,
            e,
            missing=e.missing,
            waited=time.monotonic() - t0,
        )
    return _result(cb, True)


@scenario
def policy_strict(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, policy="strict")
    try:
        for step in range(4):
            n = 5 if (rank == 1 and step == 2) else 4
            cf(torch.randn(n, 3))
    except dynamo_dist.RankDivergenceError as e:
        return _error_result(
            cb,
            e,
            ranks={str(k): v for k, v in e.ranks.items()},
        )
    return _result(cb, True)


@scenario
def policy_warn(rank: int, world: int) -> dict[str, Any]:
    import logging

    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, policy="warn")
    logging.getLogger("dynamo_dist").addHandler(Grab(level=logging.WARNING))
    for step in range(4):
        n = 5 if (rank == 1 and step == 2) else 4
        cf(torch.randn(n, 3))
    return _result(cb, True, warnings=records)


@scenario
def policy_off(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, policy="off")
    for step in range(4):
        n = 5 if (rank == 1 and step == 2) else 4
        cf(torch.randn(n, 3))
    return _result(cb, True)


@scenario
def recompile_limit(rank: int, world: int) -> dict[str, Any]:
    torch._dynamo.config.recompile_limit = 3
    cb = CountingBackend()

    def g(x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k

    cg = dynamo_dist.compile(g, backend=cb, dynamic=False)
    ok = True
    for step in range(10):
        k = step + 2 if rank == 1 else 2  # rank 1 misses every step
        x = torch.randn(3)
        ok &= bool(torch.allclose(cg(x, k), g(x, k)))
    return _result(cb, ok)


# -- issue 5: transports ---------------------------------------------------------
@scenario
def transports_agree(rank: int, world: int) -> dict[str, Any]:
    """Both transports, driven directly, against an oracle every rank can compute."""
    import random

    from dynamo_dist import _runtime
    from dynamo_dist._collective import GlooExchange, new_gloo_group
    from dynamo_dist._shm import ShmTransport, topology

    n = int(os.environ.get("DD_N", "100000"))
    n_gloo = int(os.environ.get("DD_N_GLOO", str(n)))
    group = new_gloo_group(120)
    gloo = GlooExchange(group, 60, 30, None, str)
    topo = topology(group)
    shm = ShmTransport(group, topo, 60, 30, None, str)
    shm_hook = shm.make_hook()

    def plan(step: int) -> list[bool]:
        rng = random.Random(step)
        miss_rate = rng.choice([0.0, 0.0, 0.01, 0.3])
        return [rng.random() >= miss_rate for _ in range(world)]

    mismatches = {"gloo": 0, "shm": 0}
    verdicts = {"gloo": 0, "shm": 0}
    for step in range(max(n, n_gloo)):
        hits = plan(step)
        want = all(hits)
        ident = 1000 + step % 7
        if step < n:
            got = shm_hook.exchange(hits[rank], ident)
            mismatches["shm"] += got != want
            verdicts["shm"] += got
        if step < n_gloo:
            got = gloo.exchange(hits[rank], ident)
            mismatches["gloo"] += got != want
            verdicts["gloo"] += got
    _ = _runtime
    return {
        "ok": True,
        "mismatches": mismatches,
        "verdicts": verdicts,
        "transport": shm.transport,
        "hosts": topo.hosts,
        "local_world": topo.local_world,
        "mixed": shm.mixed,
    }


# -- issue 6: launcher and report --------------------------------------------------
@scenario
def echo_config(rank: int, world: int) -> dict[str, Any]:
    from dynamo_dist import _config

    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    cf(torch.randn(4, 3))
    cfg = _config.resolve()
    return _result(
        cb,
        True,
        policy=cfg.policy,
        timeout=cfg.timeout,
        report=cfg.report,
        cache_dir=cfg.cache_dir,
        world=world,
        env={k: v for k, v in os.environ.items() if k.startswith("DYNAMO_DIST_")},
    )


@scenario
def report_run(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    for step in range(8):
        n = 5 if (rank == 1 and step in (3, 6)) else 4
        cf(torch.randn(n, 3))
    final = dynamo_dist.stats()
    dynamo_dist.shutdown()  # publishes this rank's stats; rank 0 writes the report
    return _result(cb, True, final=final)


# -- issue 4: shared precompile cache -----------------------------------------------
def _local_inductor_cache(rank: int) -> None:
    """Each rank gets its own empty inductor cache, as if on its own host."""
    base = os.environ["DD_LOCAL_BASE"]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"rank{rank}")


@scenario
def cache_job(rank: int, world: int) -> dict[str, Any]:
    _local_inductor_cache(rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    cm = dynamo_dist.compile(model)
    x = torch.randn(4, 8)
    t0 = time.perf_counter()
    y = cm(x)
    y.sum().backward()
    first_step = time.perf_counter() - t0
    grad = model[0].weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    ok = bool(torch.allclose(y, model(x), atol=1e-5)) and bool(
        torch.allclose(grad, model[0].weight.grad, atol=1e-5)
    )
    return {"ok": ok, "stats": dynamo_dist.stats(), "first_step": first_step}


@scenario
def cache_recompile(rank: int, world: int) -> dict[str, Any]:
    """A per-rank batch size forces a recompile: both ranks must key it identically."""
    _local_inductor_cache(rank)
    cf = dynamo_dist.compile(lambda x: (x.sin() * 2).sum(0))
    ok = True
    for step, n in enumerate([4, 4, 6 if rank == 1 else 4, 5]):
        x = torch.full((n, 3), float(step))
        ok &= bool(torch.allclose(cf(x), (x.sin() * 2).sum(0)))
    return {"ok": ok, "stats": dynamo_dist.stats()}


@scenario
def cache_leader_dies(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 takes the lock and dies (or hangs) inside inductor; rank 1 must not wait forever."""
    _local_inductor_cache(rank)
    how = os.environ.get("DD_LEADER", "dies")
    if rank == 0:

        def leader_fails(graph: Any) -> None:
            if how == "dies":
                os._exit(9)
            time.sleep(float(os.environ.get("DD_HANG", "20")))

        torch._inductor.config.post_grad_custom_pre_pass = leader_fails
    else:
        time.sleep(4)  # let rank 0 take the lock first
    cf = dynamo_dist.compile(lambda x: (x.sin() * 2).cos())
    x = torch.randn(16)
    t0 = time.perf_counter()
    ok = bool(torch.allclose(cf(x), (x.sin() * 2).cos()))
    return {"ok": ok, "stats": dynamo_dist.stats(), "waited": time.perf_counter() - t0}


def main() -> None:
    name, outdir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = SCENARIOS[name](rank, world)
    except BaseException as e:
        result = {
            "ok": False,
            "error": type(e).__name__,
            "message": str(e),
            "traceback": traceback.format_exc(),
        }
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh, default=str)
    # Exit without tearing the group down collectively: some scenarios leave
    # peers dead or out of step on purpose.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
