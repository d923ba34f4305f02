"""``dynamo_dist.local()``: compiled code that only some ranks run.

What it promises, each checked on real ranks: nothing inside it waits for other ranks;
the lockstep calls around it keep their exchange sequence, their recompile limit and
their automatic-dynamic state; and it is reentrant, per thread, a context manager and a
decorator (checked in-process, first).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, error_result, result

import dynamo_dist
from dynamo_dist.dist import local as dist_local


# -- in-process: the context manager itself ------------------------------------------------
def test_local_is_reentrant_per_thread_and_a_decorator() -> None:
    assert not dist_local.is_local()
    with dynamo_dist.local():
        assert dist_local.is_local()
        with dynamo_dist.local():
            assert dist_local.is_local()
        assert dist_local.is_local()
        seen: list[bool] = []
        t = threading.Thread(target=lambda: seen.append(dist_local.is_local()))
        t.start()
        t.join()
        assert seen == [False]  # per thread
    assert not dist_local.is_local()

    @dynamo_dist.local()
    def evaluate() -> bool:
        return dist_local.is_local()

    assert evaluate() and evaluate()  # a decorator, reusable
    assert not dist_local.is_local()
    with pytest.raises(ZeroDivisionError), dynamo_dist.local():
        _ = 1 / 0
    assert not dist_local.is_local()  # left on errors too


def test_local_compiles_like_torch_compile_in_one_process() -> None:
    cb = CountingBackend()
    f = dynamo_dist.compile(lambda x: x * 3 + 1, backend=cb)
    with dynamo_dist.local():
        torch.testing.assert_close(f(torch.ones(2)), torch.full((2,), 4.0))
    assert cb.graphs == 1


# -- rank programs ----------------------------------------------------------------------------
def _step(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).sum(0) * 2


def local_keeps_lockstep(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 makes extra compiled calls inside local(), with shapes that would change
    the lockstep calls' automatic-dynamic state and fill their recompile limit."""
    import torch._dynamo.config as dconfig

    dconfig.recompile_limit = 3
    cb = CountingBackend()
    f = dynamo_dist.compile(_step, backend=cb)
    local_shapes = [5, 6, 7, 9]  # would make dim 0 dynamic, and exceed the limit of 3
    lockstep_shapes = [4, 4, 8, 8, 4]
    outs = []
    local_graphs: set[int] = set()
    for i, n in enumerate(lockstep_shapes):
        if rank == 0 and i < len(local_shapes):
            before = cb.graphs
            with dynamo_dist.local():
                f(torch.ones(local_shapes[i], 3))
                f(torch.ones(local_shapes[i], 3))  # twice: a hit inside local()
            local_graphs.update(range(before, cb.graphs))
        outs.append(float(f(torch.full((n, 3), float(i))).sum()))
    stats = dynamo_dist.stats()
    lockstep = [d for g, d in enumerate(cb.dynamic) if g not in local_graphs]
    return result(
        cb,
        True,
        outs=outs,
        lockstep_dynamic=lockstep,
        local_graphs=len(local_graphs),
        exchanges=stats["exchanges"],
    )


def local_on_rank0_only_never_waits(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 runs a compiled function inside local() while rank 1 waits in the store:
    if local() exchanged anything, rank 0 would stall until the timeout."""
    cb = CountingBackend()
    f = dynamo_dist.compile(_step, backend=cb, timeout=60)
    f(torch.ones(4, 3))
    if rank == 0:
        with dynamo_dist.local():
            for n in (3, 4, 5):
                f(torch.ones(n, 3))
        ranks.signal_peers("local_done")
    else:
        ranks.wait_for_peer("local_done", timeout=120)
    f(torch.ones(4, 3))
    return result(cb, True)


def local_models_and_limits(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 alone compiles a model inside local() and drives a shared one past the
    recompile limit inside local(); the training calls after it must stay in lockstep."""
    import torch._dynamo.config as dconfig

    dconfig.recompile_limit = 3
    cb = CountingBackend()
    f = dynamo_dist.compile(_step, backend=cb, timeout=60)
    f(torch.ones(4, 3))
    if rank == 0:
        with dynamo_dist.local():
            # A model only this rank compiles: it must not shift the regions of models
            # compiled later on every rank (their ids are part of every exchange).
            ema = dynamo_dist.compile(lambda x: torch.cos(x).sum(), backend=cb)
            ema(torch.ones(4))
            with torch.no_grad():
                for nd in range(1, 7):  # 6 rank-local shapes: past the limit of 3
                    f(torch.ones(*([2] * nd)))
    g = dynamo_dist.compile(lambda x: torch.tan(x).sum(), backend=cb)
    outs = []
    for shape in [(4, 3), (5, 3), (4, 4, 3), (4, 3)]:
        outs.append(float(g(torch.ones(3))))
        outs.append(float(f(torch.ones(*shape)).sum()))
    return result(cb, True, outs=outs)


def _postprocess(x: Any) -> Any:
    """A graph for a tensor; for a list nothing to compile (Dynamo would skip the code)."""
    if isinstance(x, torch.Tensor):
        return x.sin() * 2
    return x


def local_skip_stays_local(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 alone calls a function inside local() with an input Dynamo finds nothing to
    compile in, before and after the lockstep calls compiled it; the lockstep calls of
    that function (and the next one) must still be exchanged on every rank."""
    cb = CountingBackend()
    post = dynamo_dist.compile(_postprocess, backend=cb, timeout=30)
    step = dynamo_dist.compile(_step, backend=cb, timeout=30)
    outs: list[float] = []
    kept = True
    try:
        for phase in range(2):
            if rank == 0:
                with dynamo_dist.local():
                    for _ in range(2):  # the second call replays the local decision
                        kept &= post([1.0, float(phase)]) == [1.0, float(phase)]
            for i in range(3):
                x = torch.full((4, 3), float(i + phase))
                outs += [float(post(x).sum()), float(step(x).sum())]
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e)
    return result(cb, kept, outs=outs)


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_local_calls_leave_the_lockstep_calls_alone(tmp_path) -> None:
    run = ranks.launch(__file__, "local_keeps_lockstep", tmp=tmp_path, timeout=240)
    r0, r1 = run.rank(0), run.rank(1)
    assert r0["ok"] and r1["ok"], run.output[-3000:]
    # Same exchange sequence, same lockstep compiles, same graphs (static vs dynamic).
    assert r0["exchanges"] == r1["exchanges"] == 5
    assert r0["stats"]["compiles"] == r1["stats"]["compiles"]
    assert r0["stats"]["local_compiles"] >= 2 and r1["stats"]["local_compiles"] == 0
    assert r0["local_graphs"] == r0["stats"]["local_compiles"]
    assert r0["graphs"] - r0["local_graphs"] == r1["graphs"] == r1["stats"]["compiles"]
    # Rank 0's local shapes (5, 6, 7, 9) would have made dim 0 dynamic for its next
    # lockstep compile, and filled the recompile limit (3): neither happened.
    assert r0["lockstep_dynamic"] == r1["lockstep_dynamic"]
    assert r0["outs"] == r1["outs"]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_local_calls_on_one_rank_never_wait(tmp_path) -> None:
    run = ranks.launch(__file__, "local_on_rank0_only_never_waits", tmp=tmp_path, timeout=240)
    for r in (0, 1):
        assert run.rank(r)["ok"], run.rank(r)
    assert run.rank(0)["stats"]["exchanges"] == run.rank(1)["stats"]["exchanges"] == 2


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_local_models_and_local_recompile_limit_keep_lockstep(tmp_path) -> None:
    run = ranks.launch(__file__, "local_models_and_limits", tmp=tmp_path, timeout=240)
    r0, r1 = run.rank(0), run.rank(1)
    assert r0["ok"] and r1["ok"], (r0, r1)
    assert r0["stats"]["compiles"] == r1["stats"]["compiles"]
    assert r0["stats"]["exchanges"] == r1["stats"]["exchanges"]
    assert r0["stats"]["divergences"] == r1["stats"]["divergences"] == 0
    assert r0["outs"] == r1["outs"]
    assert "reached the recompile limit" in run.output


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_a_skip_decided_inside_local_stays_out_of_lockstep(tmp_path) -> None:
    run = ranks.launch(__file__, "local_skip_stays_local", tmp=tmp_path, timeout=240)
    r0, r1 = run.rank(0), run.rank(1)
    for one in (r0, r1):
        assert one["ok"], (one.get("error"), one.get("message"))
    # Both lockstep phases exchange both functions' calls on both ranks: 6 + 6.
    assert r0["stats"]["exchanges"] == r1["stats"]["exchanges"] == 12, (r0, r1)
    assert r0["graphs"] == r1["graphs"] == 2, (r0, r1)
    assert r0["outs"] == r1["outs"]


if __name__ == "__main__":
    ranks.main(globals())
