"""Exchanges confined to groups: pipeline stages, DeviceMesh submeshes, TP and FSDP2 stages.

Four ranks as 2 pipeline stages x 2 data-parallel replicas: stage 0 is ranks 0 and 1,
stage 1 is ranks 2 and 3, and rank ``r``'s peer in the other stage is ``r +- 2``.
The stages run different code, so each stage's module is compiled with
``group=`` its own stage's ranks: the guard exchange, the consensus and the cache
agreement then run within the stage only, and nothing is exchanged across stages.
Replica 1 (ranks 1 and 3) uses a different batch size from step 0, in both stages,
and changes it once more mid-run: without dynamo_dist its ranks would compile a
different number of graphs than replica 0's.

The rank programs below run under torchrun (see ``ranks.py``); each test launches
one and asserts on what every rank reported.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pytest
import ranks
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import ROOT, CountingBackend, error_result, result
from torch import nn

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

HERE = __file__
STEPS = 5
IN, HID = 6, 16
STAGE_RANKS = {0: [0, 1], 1: [2, 3]}  # the 2 x 2 layout: pipeline stage -> its ranks


def _batch_size(replica: int, step: int) -> int:
    """Replica 0 always 4; replica 1 6 from step 0, and 5 once (step 3)."""
    if replica == 0:
        return 4
    return 5 if step == 3 else 6


def _data(step: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both stages of one replica derive the same batch from (step, replica)."""
    g = torch.Generator().manual_seed(1000 * step + replica)
    x = torch.randn(_batch_size(replica, step), IN, generator=g)
    return x, x.sum(-1).sin()


class Stage0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HID)
        self.mid = nn.Linear(HID, HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return h + torch.relu(self.mid(h)) / math.sqrt(HID)


class Stage1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Linear(HID, HID)
        self.out = nn.Linear(HID, 1)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.out(torch.tanh(self.mid(h)) + h).squeeze(-1)
        return F.mse_loss(z, y)


class TPStage0(nn.Module):
    """Stage 0 for tensor parallelism: ``up`` column-wise, ``down`` row-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HID)
        self.down = nn.Linear(HID, HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class TPStage1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HID, HID)
        self.down = nn.Linear(HID, HID)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.down(torch.relu(self.up(h))) + h
        return F.mse_loss(z.mean(-1), y)


def _all_reduce_grads(params: list[torch.nn.Parameter], group: Any) -> None:
    """Data-parallel sync within the stage: average the gradients over its replicas."""
    n = dist.get_world_size(group)
    for p in params:
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(local, group=group)
            local /= n


# -- rank programs -------------------------------------------------------------------
def pipeline(rank: int, world: int, layout: str) -> dict[str, Any]:
    """2 stages x 2 replicas; ``layout`` picks how the stage group is made.

    ``new_group``: ``dist.new_group`` per stage (created on every rank), gradients
    all-reduced on it. ``mesh``: a (pp, dp) DeviceMesh, ``group=mesh["dp"]``.
    ``fsdp``: as ``mesh``, with the stage sharded by FSDP2 (``fully_shard``) over
    ``mesh["dp"]`` instead of the all-reduce. ``mesh3d``: a (pp=2, dp=2, tp=1) mesh,
    ``group=mesh["dp", "tp"]`` (a 2-D submesh). ``tp``: a (pp=2, dp=1, tp=2) mesh whose
    stages are DTensor tensor-parallel over ``mesh["tp"]``, ``group=mesh["dp", "tp"]``.
    """
    stage, replica, group, pg, peer, module = _stage_setup(rank, world, layout)
    cb = CountingBackend()
    try:
        if layout == "switch":
            # Every torch.compile switched (DYNAMO_DIST_ALL_COMPILES=1): the program sets
            # its stage's group once, as the README says pipeline programs must.
            dynamo_dist.set_default_group(group)
            cstage = torch.compile(module, backend=cb)
        else:
            group_arg = None if layout == "world" else group
            cstage = dynamo_dist.compile(module, backend=cb, group=group_arg)
        losses = _train_stage(module, cstage, stage, replica, peer, layout, pg)
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e, stage=stage, missing=getattr(e, "missing", None))
    return result(
        cb,
        _finite(module, losses),
        stage=stage,
        replica=replica,
        losses=losses,
        group_ranks=_ranks_of(group),
    )


def _ranks_of(group: Any) -> list[int]:
    """The global ranks of a ProcessGroup or of a DeviceMesh (any number of dimensions)."""
    if hasattr(group, "mesh"):
        return sorted(group.mesh.flatten().tolist())
    return dist.get_process_group_ranks(group)


def pipeline_cached(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """:func:`pipeline` with inductor and the shared cache (``DYNAMO_DIST_CACHE_DIR``).

    Each stage's ranks agree on their own entries: one rank per stage compiles, the
    other loads, and no rank waits for the other stage's graphs.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"rank{rank}")
    stage, replica, group, pg, peer, module = _stage_setup(rank, world, "new_group")
    cstage = dynamo_dist.compile(module, group=group)
    losses = _train_stage(module, cstage, stage, replica, peer, "new_group", pg)
    return {"ok": _finite(module, losses), "stats": dynamo_dist.stats(), "stage": stage}


def _finite(module: nn.Module, losses: list[float]) -> bool:
    params = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    return all(bool(torch.isfinite(p).all()) for p in params) and all(
        math.isfinite(v) for v in losses
    )


def _stage_setup(rank: int, world: int, layout: str) -> tuple[int, int, Any, Any, int, nn.Module]:
    """This rank's stage, replica, group (to compile with), process group, peer and module."""
    assert world == 4
    if layout in ("new_group", "world", "switch"):
        groups = {s: dist.new_group(r) for s, r in STAGE_RANKS.items()}
        stage, replica = divmod(rank, 2)
        group: Any = groups[stage]
        pg = group
    elif layout in ("mesh3d", "tp"):
        from torch.distributed.device_mesh import init_device_mesh

        shape = (2, 2, 1) if layout == "mesh3d" else (2, 1, 2)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("pp", "dp", "tp"))
        stage, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        group = mesh["dp", "tp"]  # this stage's dp x tp ranks
        pg = mesh["dp"].get_group()
        if layout == "tp":
            # The one replica's two TP ranks must see the same batch: they both draw
            # replica 1's, whose size changes at step 3.
            replica = 1
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        stage, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        group = mesh["dp"]
        pg = group.get_group()
    peer = rank + 2 if stage == 0 else rank - 2
    torch.manual_seed(stage)  # the same initial weights on both replicas of a stage
    module: nn.Module
    if layout == "tp":
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        module = TPStage0() if stage == 0 else TPStage1()
        plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
        parallelize_module(module, mesh["tp"], plan)  # type: ignore[arg-type]
    else:
        module = Stage0() if stage == 0 else Stage1()
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(module, mesh=group)
    return stage, replica, group, pg, peer, module


def _train_stage(
    module: nn.Module, cstage: Any, stage: int, replica: int, peer: int, layout: str, pg: Any
) -> list[float]:
    """STEPS steps of one stage: forward, send/recv with the peer stage, backward, dp sync."""
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    losses: list[float] = []
    for step in range(STEPS):
        x, y = _data(step, replica)
        opt.zero_grad(set_to_none=True)
        if stage == 0:
            act = cstage(x)
            dist.send(act.detach().contiguous(), peer)
            grad = torch.empty_like(act)
            dist.recv(grad, peer)
            act.backward(grad)
        else:
            h = torch.empty(x.shape[0], HID)
            dist.recv(h, peer)
            h.requires_grad_()
            loss = cstage(h, y)
            loss.backward()
            assert h.grad is not None
            dist.send(h.grad.contiguous(), peer)
            losses.append(loss.item())
        if layout != "fsdp":
            _all_reduce_grads(list(module.parameters()), pg)
        opt.step()
    return losses


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HID)
        self.down = nn.Linear(HID, IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) + x


def tensor_parallel(rank: int, world: int) -> dict[str, Any]:
    """A DTensor tensor-parallel stage on a (dp=2, tp=2) mesh, compiled with ``group=mesh``.

    The two ranks of a TP pair see the same batch; the two replicas (dp) see different
    batch sizes, as in :func:`pipeline`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    replica = mesh.get_local_rank("dp")
    torch.manual_seed(0)
    model = MLP()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    cb = CountingBackend()
    cmodel = dynamo_dist.compile(model, backend=cb, group=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        x, y = _data(step, replica)
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(cmodel(x).mean(-1), y)
        loss.backward()
        _all_reduce_grads(list(model.parameters()), mesh["dp"].get_group())
        opt.step()
        losses.append(loss.item())
    return result(
        cb,
        all(math.isfinite(v) for v in losses),
        replica=replica,
        losses=losses,
        group_ranks=sorted(mesh.mesh.flatten().tolist()),
    )


def _f(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


def overlapping_groups(rank: int, world: int) -> dict[str, Any]:
    """Two groups per rank on a (dp=2, tp=2) mesh, called in an order that differs by replica.

    ``f`` is compiled for the rank's tp group, ``g`` for its dp group. Replica 0 calls
    ``f`` then ``g`` every step, replica 1 ``g`` then ``f``: SPMD within each group,
    but not across the world. In each group one rank changes its input size once.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    cb_f, cb_g = CountingBackend(), CountingBackend()

    def g(x: torch.Tensor) -> torch.Tensor:
        return x.cos().sum(0) - 1

    cf = dynamo_dist.compile(_f, backend=cb_f, group=mesh["tp"])
    cg = dynamo_dist.compile(g, backend=cb_g, group=mesh["dp"])
    ok = True
    for step in range(STEPS):
        xf = torch.randn(5 if (tp == 1 and step == 2) else 4, 3)
        xg = torch.randn(7 if (dp == 1 and step == 3) else 6, 2)
        calls = [(cf, _f, xf), (cg, g, xg)]
        for compiled, eager, x in calls if dp == 0 else calls[::-1]:
            ok &= bool(torch.allclose(compiled(x), eager(x), atol=1e-5))
    return result(
        cb_f,
        ok,
        g_graphs=cb_g.graphs,
        g_dynamic=cb_g.dynamic,
        tp_ranks=mesh["tp"].mesh.tolist(),
        dp_ranks=mesh["dp"].mesh.tolist(),
    )


def disagree(rank: int, world: int) -> dict[str, Any]:
    """Ranks 0 and 2 compile for the whole world; rank 1 for the group of ranks 0 and 1."""
    assert world == 3
    pair = dist.new_group([0, 1])  # created on every rank, as new_group requires
    cb = CountingBackend()
    try:
        cf = dynamo_dist.compile(_f, backend=cb, group=pair if rank == 1 else dist.group.WORLD)
        for _ in range(3):
            cf(torch.randn(4, 3))
    except Exception as e:
        return error_result(cb, e, dd_error=isinstance(e, dynamo_dist.DynamoDistError))
    return result(cb, True)


# -- tests -----------------------------------------------------------------------------
def _assert_per_group(run: ranks.RankRun, stage_ranks: dict[int, list[int]]) -> None:
    """Equal compiles within each group, and each rank exchanged within its group only."""
    for s, members in stage_ranks.items():
        res = {r: run.rank(r) for r in members}
        for r, one in res.items():
            assert one["ok"], f"rank {r}: {one}"
            assert one["group_ranks"] == members, (r, one["group_ranks"])
        graphs = {r: one["graphs"] for r, one in res.items()}
        assert len(set(graphs.values())) == 1, f"group {s}: compile counts differ: {graphs}"
        dynamic = {r: one["dynamic"] for r, one in res.items()}
        assert len({str(d) for d in dynamic.values()}) == 1, f"group {s}: {dynamic}"
        compiles = {r: one["stats"]["compiles"] for r, one in res.items()}
        assert len(set(compiles.values())) == 1, f"group {s}: stats compiles differ: {compiles}"
        for r, one in res.items():
            groups = one["stats"]["groups"]
            # One group per rank, its own: no world group, so no exchange
            # with the ranks of the other stage.
            assert len(groups) == 1, f"rank {r}: {groups}"
            (g,) = groups.values()
            assert g["ranks"] == members, f"rank {r}: {groups}"
            assert g["exchanges"] == one["stats"]["exchanges"] > 0, f"rank {r}: {one['stats']}"
            assert g["compiles"] == one["stats"]["compiles"], f"rank {r}: {one['stats']}"
            assert g["divergences"] == 0, f"rank {r}: {groups}"


@pytest.mark.parametrize("layout", ["new_group", "mesh", "mesh3d", "tp"])
def test_pipeline_stages_exchange_within_their_group(tmp_path, layout):
    run = ranks.launch(HERE, "pipeline", layout, tmp=tmp_path, nproc=4, timeout=500)
    _assert_per_group(run, STAGE_RANKS)
    # Both replicas trained every step (the last stage records the loss).
    for r in (2, 3):
        assert len(run.rank(r)["losses"]) == STEPS


def test_pipeline_stages_under_the_switch_exchange_within_the_default_group(tmp_path):
    run = ranks.launch(
        HERE,
        "pipeline",
        "switch",
        tmp=tmp_path,
        nproc=4,
        timeout=500,
        env={"DYNAMO_DIST_ALL_COMPILES": "1"},
    )
    _assert_per_group(run, STAGE_RANKS)


def test_pipeline_stages_without_group_time_out(tmp_path):
    """The control: compiled for the whole world, stage 0's first exchange waits for stage 1,
    whose ranks wait in ``recv`` for stage 0's activations. Nothing pairs them: it can only
    time out, naming the stage-1 ranks."""
    run = ranks.launch(
        HERE,
        "pipeline",
        "world",
        tmp=tmp_path,
        nproc=4,
        timeout=400,
        env={"DYNAMO_DIST_TIMEOUT": "12", "DYNAMO_DIST_STALL_WARNING": "4"},
    )
    for r in (0, 1):
        res = run.rank(r)
        assert res["error"] == "CollectiveTimeoutError", res
        assert "[2, 3]" in res["message"], res["message"]
    # Before that, the stall warning (4 s, under the 12 s timeout) named the fix.
    assert "stalled at guard exchange" in run.output, run.output[-3000:]
    assert "`group=`" in run.output, run.output[-3000:]


@pytest.mark.inductor
def test_pipeline_stages_share_the_cache_within_their_group(tmp_path):
    cache = tmp_path / "cache"
    run = ranks.launch(
        HERE,
        "pipeline_cached",
        str(tmp_path / "local"),
        tmp=tmp_path,
        nproc=4,
        timeout=500,
        # The graph route's entries, within each stage's group.
        env={
            "DYNAMO_DIST_CACHE_DIR": str(cache),
            "DYNAMO_DIST_LOG": "INFO",
            "DYNAMO_DIST_PRECOMPILE": "0",
        },
    )
    for s, members in STAGE_RANKS.items():
        st = {}
        for r in members:
            res = run.rank(r)
            assert res["ok"], res
            st[r] = res["stats"]
        # Every graph of the stage compiled by one of its ranks and loaded by the other.
        assert len({x["compiles"] for x in st.values()}) == 1, f"stage {s}: {st}"
        publishes = sum(x["cache_publishes"] for x in st.values())
        assert publishes >= 1, f"stage {s}: {st}"
        assert sum(x["cache_loads"] for x in st.values()) == publishes, f"stage {s}: {st}"
        ran_inductor = sorted(x["inductor_compiles"] > 0 for x in st.values())
        assert ran_inductor == [False, True], f"stage {s}: one rank compiles, one loads: {st}"
        assert all(len(x["groups"]) == 1 for x in st.values()), f"stage {s}: {st}"


def test_fsdp2_stage_exchanges_within_dp_group(tmp_path):
    run = ranks.launch(HERE, "pipeline", "fsdp", tmp=tmp_path, nproc=4, timeout=500)
    _assert_per_group(run, STAGE_RANKS)


def test_tensor_parallel_stage_on_dp_tp_mesh(tmp_path):
    run = ranks.launch(HERE, "tensor_parallel", tmp=tmp_path, nproc=4, timeout=500)
    _assert_per_group(run, {0: [0, 1, 2, 3]})
    # TP partners see the same batch and hold the same replicated loss.
    assert run.rank(0)["losses"] == pytest.approx(run.rank(1)["losses"])


def test_overlapping_groups_in_any_interleaving(tmp_path):
    run = ranks.launch(HERE, "overlapping_groups", tmp=tmp_path, nproc=4, timeout=500)
    res = {r: run.rank(r) for r in range(4)}
    for r, one in res.items():
        assert one["ok"], f"rank {r}: {one}"
        groups = sorted(g["ranks"] for g in one["stats"]["groups"].values())
        assert groups == sorted([one["tp_ranks"], one["dp_ranks"]]), f"rank {r}: {groups}"
    for members, key in [
        ([0, 1], "graphs"),
        ([2, 3], "graphs"),
        ([0, 2], "g_graphs"),
        ([1, 3], "g_graphs"),
    ]:
        counts = {r: res[r][key] for r in members}
        assert len(set(counts.values())) == 1, f"{key} differ within group {members}: {counts}"
        dyn_key = "dynamic" if key == "graphs" else "g_dynamic"
        dynamic = {r: res[r][dyn_key] for r in members}
        assert len({str(d) for d in dynamic.values()}) == 1, f"group {members}: {dynamic}"
        entries = {}
        for r in members:
            (entry,) = [g for g in res[r]["stats"]["groups"].values() if g["ranks"] == members]
            assert entry["exchanges"] > 0 and entry["divergences"] == 0, f"rank {r}: {entry}"
            entries[r] = entry
        exchanges = {r: e["exchanges"] for r, e in entries.items()}
        assert len(set(exchanges.values())) == 1, f"group {members}: {exchanges}"


def test_ranks_disagreeing_about_a_group_get_an_error(tmp_path):
    run = ranks.launch(
        HERE,
        "disagree",
        tmp=tmp_path,
        nproc=3,
        timeout=400,
        env={"DYNAMO_DIST_TIMEOUT": "120"},
    )
    for r in range(3):
        res = run.rank(r)
        assert not res["ok"], f"rank {r} ran with a group its peers disagree about: {res}"
        assert res["dd_error"], f"rank {r}: not a DynamoDistError: {res}"
        # A clear error, not the timeout after waiting for a rank that never comes.
        assert res["error"] != "CollectiveTimeoutError", f"rank {r}: {res['message']}"
        # It names the disagreement: the group and the two ranks that set up different ones.
        msg = res["message"]
        assert "group" in msg.lower() and "rank 0" in msg and "rank 1" in msg, f"rank {r}: {msg}"


def test_train_pp_example_runs(tmp_path):
    proc = ranks.torchrun(
        ROOT / "launch" / "train_pp.py",
        "--steps",
        "6",
        "--short-every",
        "3",
        nproc=4,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = re.findall(
        r"\[rank (\d)\] stage (\d) replica (\d): steps (\d+), loss ([^,]+), compiles (\d+), "
        r"exchanges \d+, exchange groups (.*)",
        proc.stdout,
    )
    assert sorted(int(r) for r, *_ in lines) == [0, 1, 2, 3], proc.stdout[-3000:]
    by_stage: dict[str, set[str]] = {}
    for _, stage, _, steps, loss, compiles, groups in lines:
        assert steps == "6"
        assert math.isfinite(float(loss))
        assert groups == str([STAGE_RANKS[int(stage)]]), f"stage {stage}: {groups}"
        by_stage.setdefault(stage, set()).add(compiles)
    assert sorted(by_stage) == ["0", "1"]
    for stage, counts in by_stage.items():
        assert len(counts) == 1, f"stage {stage}: compile counts differ: {counts}"
        assert int(next(iter(counts))) > 0


if __name__ == "__main__":
    ranks.main(globals())
