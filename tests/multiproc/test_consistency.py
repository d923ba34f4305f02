"""Rank consistency on real ranks: equal compiles, divergence errors, no silent hangs.

The rank programs below run under torchrun (see ``ranks.py``); each test launches
one and asserts on what every rank reported.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, error_result, result

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

HERE = __file__


def _f(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


# -- rank programs: the foundation ---------------------------------------------------
def divergent_shape(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(6):
        n = 5 if (rank == 1 and step == 3) else 4
        x = torch.full((n, 3), float(step + 1))
        ok &= bool(torch.allclose(cf(x), _f(x), atol=1e-5))
    from torch._dynamo.utils import counters

    from dynamo_dist.dynamo.hook import current_hook

    return result(
        cb,
        ok,
        hook_type=type(current_hook()).__name__,
        counters=dict(counters["dynamo_dist"]),  # read by tests/test_events.py
        **ranks.shm_segment(),
    )


def long_loop(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(300):
        n = 7 if (rank == world - 1 and step == 150) else 4
        x = torch.full((n, 2), float(step % 5))
        ok &= bool(torch.allclose(cf(x), _f(x), atol=1e-5))
    return result(cb, ok)


def module_and_method(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    cm = dynamo_dist.compile(model, backend=cb)
    ok = True
    for step in range(4):
        n = 3 if (rank == 0 and step == 2) else 2
        x = torch.randn(n, 3)
        ok &= bool(torch.allclose(cm(x), model(x), atol=1e-5))
    return result(cb, ok, module_type=type(cm).__name__)


# -- rank programs: rank-consistent compile decisions ----------------------------------
def per_rank_batches(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    sizes = [[4, 4, 6, 6, 8], [4, 5, 6, 7, 8]][rank % 2]
    ok = True
    for n in sizes:
        x = torch.randn(n, 3)
        ok &= bool(torch.allclose(cf(x), _f(x), atol=1e-5))
    return result(cb, ok)


def int_argument(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor, k: int) -> torch.Tensor:
        return x + torch.ones(k).sum()

    cg = dynamo_dist.compile(g, backend=cb)
    data = [[3, 3, 7], [3, 4, 9]][rank % 2]
    ok = True
    for k in data:
        x = torch.randn(5)
        ok &= bool(torch.allclose(cg(x, k), g(x, k), atol=1e-5))
    return result(cb, ok)


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
        ok &= bool(torch.allclose(cg(x, y), g(x, y), atol=1e-5))
    return result(cb, ok)


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
        ok &= bool(torch.allclose(cg(x), g(x), atol=1e-5))
    return result(cb, ok)


def dim_mismatch(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()

    def g(x: torch.Tensor) -> torch.Tensor:
        return x.sum() + 1

    cg = dynamo_dist.compile(g, backend=cb)
    shapes = [[(4, 3), (4, 3), (5, 3)], [(4, 3, 2), (4, 3), (6, 3)]][rank % 2]
    ok = True
    for s in shapes:
        x = torch.randn(*s)
        ok &= bool(torch.allclose(cg(x), g(x), atol=1e-5))
    return result(cb, ok)


def reset_on_one_rank(rank: int, world: int) -> dict[str, Any]:
    """Asymmetric cache state: rank 1 drops its cache entries mid-run."""
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    ok = True
    for step in range(6):
        if rank == 1 and step == 3:
            torch._dynamo.reset()
        x = torch.full((4, 3), float(step))
        ok &= bool(torch.allclose(cf(x), _f(x), atol=1e-5))
    return result(cb, ok)


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
        return error_result(cb, e, ranks=sorted(e.ranks))
    return result(cb, True)


def extra_call(rank: int, world: int, timeout: str) -> dict[str, Any]:
    """Rank 0 calls the compiled function once more than the others (SPMD violation)."""
    t = float(timeout)
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, timeout=t)
    x = torch.randn(4, 3)
    for _ in range(3):
        cf(x)
    if rank == 0:
        t0 = time.monotonic()
        try:
            cf(x)
        except dynamo_dist.CollectiveTimeoutError as e:
            return error_result(cb, e, missing=e.missing, waited=time.monotonic() - t0)
        finally:
            ranks.signal_peers("extra_call_done")
        return result(cb, True)
    # The others stay alive, in no exchange, until rank 0 has its error.
    ranks.wait_for_peer("extra_call_done", timeout=t + 120)
    return result(cb, True)


def _die_once_published(rank: int) -> None:
    """Exit abruptly, but only once the status board shows this rank's last exchange.

    The survivor's error names the dead rank from the board; waiting for the
    publication (instead of sleeping) orders the two events.
    """
    from dynamo_dist.dist import runtime as dist_runtime

    rt = dist_runtime.current()
    assert rt is not None and rt.board is not None
    board, seq = rt.board, ranks.world_transport(rt).position()[0]
    ranks.wait_until(
        lambda: board.snapshot()[rank].get("seq") == seq,
        timeout=60,
        what=f"rank {rank} publishing exchange #{seq}",
    )
    os._exit(17)


def killed_rank(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, timeout=60)
    x = torch.randn(4, 3)
    t0 = 0.0
    shm: dict[str, Any] = {}
    try:
        for step in range(50):
            if rank == world - 1 and step == 10:
                _die_once_published(rank)
            if step == 1:  # the runtime (and its segment) exists after the first call
                shm = ranks.shm_segment()
            t0 = time.monotonic()
            cf(x)
    except dynamo_dist.CollectiveTimeoutError as e:
        return error_result(cb, e, missing=e.missing, waited=time.monotonic() - t0, **shm)
    return result(cb, True, **shm)


def policy_strict(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, policy="strict")
    try:
        for step in range(4):
            n = 5 if (rank == 1 and step == 2) else 4
            cf(torch.randn(n, 3))
    except dynamo_dist.RankDivergenceError as e:
        return error_result(cb, e, ranks={str(k): v for k, v in e.ranks.items()})
    return result(cb, True)


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
    return result(cb, True, warnings=records)


def policy_off(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb, policy="off")
    for step in range(4):
        n = 5 if (rank == 1 and step == 2) else 4
        cf(torch.randn(n, 3))
    return result(cb, True)


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
        ok &= bool(torch.allclose(cg(x, k), g(x, k), atol=1e-5))
    return result(cb, ok)


# -- tests -----------------------------------------------------------------------------
def _assert_consistent(run: ranks.RankRun, nproc: int = 2) -> None:
    res = [run.rank(r) for r in range(nproc)]
    for r, one in enumerate(res):
        assert one["ok"], f"rank {r}: {one}"
    graphs = [one["graphs"] for one in res]
    assert len(set(graphs)) == 1, f"compile counts differ across ranks: {graphs}"
    dynamic = [one["dynamic"] for one in res]
    assert all(d == dynamic[0] for d in dynamic), f"dynamic decisions differ: {dynamic}"


TRANSPORTS = pytest.mark.parametrize("transport", ["shm", "gloo"])


def _env(transport: str) -> dict[str, str]:
    return {"DYNAMO_DIST_TRANSPORT": transport}


@TRANSPORTS
def test_divergent_shape_recompiles_on_all_ranks(tmp_path, transport):
    run = ranks.launch(HERE, "divergent_shape", tmp=tmp_path, env=_env(transport))
    _assert_consistent(run)
    assert run.rank(0)["stats"]["forced_recompiles"] == 1
    assert run.rank(1)["stats"]["forced_recompiles"] == 0
    assert run.rank(0)["graphs"] == 2
    assert run.rank(0)["stats"]["transport"] == transport
    assert run.rank(0)["hook_type"] == "Router"


def test_long_loop_one_divergent_step(tmp_path):
    run = ranks.launch(HERE, "long_loop", tmp=tmp_path)
    _assert_consistent(run)
    st = run.rank(0)["stats"]
    assert st["exchanges"] == 300
    assert st["mixed_outcomes"] >= 1


def test_module_compiles_consistently(tmp_path):
    run = ranks.launch(HERE, "module_and_method", tmp=tmp_path)
    _assert_consistent(run)
    assert run.rank(0)["module_type"] == "OptimizedModule"


@pytest.mark.parametrize(
    "program",
    ["per_rank_batches", "int_argument", "speculation_divergence", "graph_break", "dim_mismatch"],
)
def test_same_compile_decisions(tmp_path, program):
    _assert_consistent(ranks.launch(HERE, program, tmp=tmp_path))


@TRANSPORTS
def test_reset_on_one_rank_does_not_hang(tmp_path, transport):
    run = ranks.launch(HERE, "reset_on_one_rank", tmp=tmp_path, env=_env(transport))
    _assert_consistent(run)
    assert run.rank(0)["stats"]["forced_recompiles"] == 1
    assert run.rank(1)["stats"]["first_entry_exchanges"] == 2


@TRANSPORTS
def test_different_call_order_raises_divergence(tmp_path, transport):
    run = ranks.launch(HERE, "different_order", tmp=tmp_path, env=_env(transport))
    for r in (0, 1):
        res = run.rank(r)
        assert res["error"] == "RankDivergenceError", res
        assert "rank 0" in res["message"] and "rank 1" in res["message"]
        assert "_f (test_consistency.py" in res["message"], res["message"]
        assert "g (test_consistency.py" in res["message"], res["message"]
        assert res["ranks"] == [0, 1]


@TRANSPORTS
def test_extra_call_times_out_naming_the_rank(tmp_path, transport):
    run = ranks.launch(HERE, "extra_call", 4, tmp=tmp_path, env=_env(transport))
    res = run.rank(0)
    assert res["error"] == "CollectiveTimeoutError", res
    assert res["missing"] == [1]
    assert "rank 1" in res["message"] and "#3" in res["message"]
    assert res["waited"] >= 4
    assert run.rank(1)["ok"]


@TRANSPORTS
def test_killed_rank_reports_clear_error(tmp_path, transport):
    # torchrun's agent stops the survivors once it notices a dead worker; a slower
    # monitor gives the survivor time to report, as it would under a real launcher
    # configured not to tear the job down at once.
    run = ranks.launch(
        HERE,
        "killed_rank",
        tmp=tmp_path,
        env=_env(transport),
        torchrun_args=["--monitor-interval", "3"],
    )
    res = run.rank(0)
    assert res["error"] == "CollectiveTimeoutError", res
    assert res["missing"] == [1]
    assert "rank 1" in res["message"]


def test_policy_strict_raises_with_reasons(tmp_path):
    run = ranks.launch(HERE, "policy_strict", tmp=tmp_path)
    for r in (0, 1):
        res = run.rank(r)
        assert res["error"] == "RankDivergenceError", res
        assert "ranks [1] missed" in res["message"]
        assert "size mismatch" in res["message"]
        assert res["ranks"]["1"]["hit"] is False and res["ranks"]["0"]["hit"] is True


def test_policy_warn_logs_reasons_and_syncs(tmp_path):
    run = ranks.launch(HERE, "policy_warn", tmp=tmp_path)
    _assert_consistent(run)
    for r in (0, 1):
        warnings = run.rank(r)["warnings"]
        assert len(warnings) == 1, warnings
        assert "ranks [1] missed" in warnings[0] and "size mismatch" in warnings[0]


def test_policy_off_installs_nothing(tmp_path):
    run = ranks.launch(HERE, "policy_off", tmp=tmp_path)
    for r in (0, 1):
        assert run.rank(r)["stats"]["installed"] is False
    # Without the hook ranks compile different numbers of graphs: the failure mode we fix.
    assert run.rank(0)["graphs"] != run.rank(1)["graphs"]


def test_recompile_limit_falls_back_together(tmp_path):
    run = ranks.launch(HERE, "recompile_limit", tmp=tmp_path)
    _assert_consistent(run)
    assert run.rank(0)["graphs"] == 3


if __name__ == "__main__":
    ranks.main(globals())
