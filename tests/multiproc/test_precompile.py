"""Precompiled warm starts: no Dynamo and no AOTAutograd on a restart, never less safe.

Real ranks, gloo, inductor. The cold job captures artifacts through the shared cache; a
warm job on fresh local directories loads them: it traces nothing, its losses are those
of plain ``torch.compile``, and a rank's shorter batch at the divergent step is served by
an artifact too. Every reason to fall back to Dynamo is provoked once, on every rank of
the group together, and counted.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch
from torch import nn
from torch.nn import functional as F

pytestmark = [pytest.mark.multiproc, pytest.mark.inductor, pytest.mark.timeout(600)]

HERE = __file__
VOCAB, DIM, SEQ = 64, 32, 16
DIVERGENT_STEP = 2


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + F.gelu(self.fc(self.norm(h)))
        out: torch.Tensor = self.head(h)
        return out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = h + F.gelu(self.fc(self.norm(h)))
        return out


class BlockLM(nn.Module):
    """Repeated blocks: each is captured on its own, one artifact for all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.head(h)
        return out


def _local_dirs(rank: int, local_base: str) -> None:
    """Each rank its own empty inductor cache, as if on its own host."""
    path = Path(local_base, f"rank{rank}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def _batch(step: int, rank: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    return x, torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def _counters() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {
        "frames_ok": int(counters["frames"]["ok"]),
        "aot_autograd": {k: int(v) for k, v in counters["aot_autograd"].items()},
        "inductor_compiles": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


def _precompiled_stats() -> dict[str, Any]:
    import dynamo_dist

    stats = dynamo_dist.stats()
    return {
        k: v for k, v in stats.items() if k.startswith("precompiled_") or k == "recompile_reasons"
    }


# -- rank programs -------------------------------------------------------------------------
def train(rank: int, world: int, shared: str, local_base: str, how: str, steps: str) -> Any:
    """``how``: ``outer`` (compile(DDP(m))), ``inner`` (DDP(compile(m))), ``plain``;
    ``-blocks`` after it: a model of repeated blocks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dynamo_dist

    _local_dirs(rank, local_base)
    torch.manual_seed(0)
    how, _, kind = how.partition("-")
    model = BlockLM() if kind == "blocks" else TinyLM()
    step_fn: Any
    if how == "outer":
        step_fn = dynamo_dist.compile(DDP(model), cache_dir=shared)
    elif how == "inner":
        step_fn = DDP(dynamo_dist.compile(model, cache_dir=shared))
    else:
        step_fn = torch.compile(DDP(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    evals = []
    for step in range(int(steps)):
        rows = 2 if step == DIVERGENT_STEP and rank == world - 1 else 4
        x, y = _batch(step, rank, rows)
        loss = F.cross_entropy(step_fn(x).reshape(-1, VOCAB), y.reshape(-1))
        # nanoGPT's order: the previous step's gradients are still there in the forward.
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 5 and rank == 0 and how != "plain":
            # Rank-0 evaluation: inside local(), through Dynamo on this rank alone.
            with dynamo_dist.local(), torch.no_grad():
                evals.append(float(step_fn(x).float().mean()))
    w = model.head.weight.detach().clone()
    w0 = w.clone()
    torch.distributed.broadcast(w0, 0)
    return {
        "ok": True,
        "losses": losses,
        "evals": evals,
        "params_equal": bool(torch.equal(w, w0)),
        **_counters(),
        **(_precompiled_stats() if how != "plain" else {}),
    }


#: A user global the forward of ScaleNet reads: a kept guard, checked at every call.
SCALE = int(os.environ.get("TEST_SCALE", "2"))

#: A module of the user's, edited between runs: the forward of its submodule class is
#: inlined by the trace, and is in neither the key nor the compiled module's class.
HELPER = """
from torch import nn


class Scale(nn.Module):
    def forward(self, t):
        return t * {factor}
"""


class HelperNet(nn.Module):
    def __init__(self, scale: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.scale(self.lin(x))
        return out


class ApplyNet(nn.Module):
    """``apply(x, fn)``: a function argument, guarded by identity (not serializable)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, fn: Any) -> torch.Tensor:
        out: torch.Tensor = fn(self.lin(x))
        return out


def _double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def _triple(t: torch.Tensor) -> torch.Tensor:
    return t * 3


class BreakNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        torch._dynamo.graph_break()
        return h.relu()


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * SCALE
        return out


class GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.gelu(self.lin(x))
        return out


def fallbacks(rank: int, world: int, shared: str, local_base: str, helper_dir: str) -> Any:
    """Every model of the module above, compiled with the shared cache; outputs and stats.

    The warm run's environment changes what the capture saw: ``TEST_SCALE`` (a user
    global), the helper's source (edited by the test), ``TEST_PATCH_GELU`` (a torch
    function replaced, on the ranks listed).
    """
    import dynamo_dist

    _local_dirs(rank, local_base)
    sys.path.insert(0, helper_dir)
    helper = importlib.import_module("precompile_helper")
    patched = str(rank) in os.environ.get("TEST_PATCH_GELU", "").split(",")
    if patched:
        original = F.gelu

        def gelu(t: torch.Tensor, approximate: str = "none") -> torch.Tensor:
            return original(t, approximate=approximate) + 1.0

        F.gelu = gelu  # type: ignore[assignment]
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    out: dict[str, Any] = {"ok": True}
    apply = ApplyNet()
    c_apply = dynamo_dist.compile(apply, cache_dir=shared)
    ref = apply.lin(x)
    out["apply_double"] = bool(torch.allclose(c_apply(x, _double), ref * 2))
    out["apply_triple"] = bool(torch.allclose(c_apply(x, _triple), ref * 3))
    brk = BreakNet()
    out["break"] = bool(torch.allclose(dynamo_dist.compile(brk, cache_dir=shared)(x), brk(x)))
    hel = HelperNet(helper.Scale())
    out["helper"] = bool(torch.allclose(dynamo_dist.compile(hel, cache_dir=shared)(x), hel(x)))
    sca = ScaleNet()
    out["scale"] = bool(torch.allclose(dynamo_dist.compile(sca, cache_dir=shared)(x), sca(x)))
    gel = GeluNet()
    out["gelu"] = bool(torch.allclose(dynamo_dist.compile(gel, cache_dir=shared)(x), gel(x)))
    out.update(_precompiled_stats())
    out.update(_counters())
    return out


def gelu_only(rank: int, world: int, shared: str, local_base: str) -> Any:
    """One small module; ``TEST_NO_AOT=1`` plays a torch without a usable aot_compile."""
    import dynamo_dist

    _local_dirs(rank, local_base)
    if os.environ.get("TEST_NO_AOT") == "1":
        from torch._dynamo.aot_compile import AOTCompiledFunction

        del AOTCompiledFunction.disable_guard_check  # as in a torch that predates it
    torch.manual_seed(0)
    model = GeluNet()
    x = torch.randn(2, 4)
    same = bool(torch.allclose(dynamo_dist.compile(model, cache_dir=shared)(x), model(x)))
    return {"ok": True, "same": same, **_precompiled_stats(), **_counters()}


def switched(rank: int, world: int, local_base: str) -> Any:
    """A framework's own ``torch.compile``, under the switch, with the cache from the env."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dynamo_dist

    _local_dirs(rank, local_base)
    torch.manual_seed(0)
    model = TinyLM()
    with dynamo_dist.patch_torch_compile():
        step_fn = torch.compile(DDP(model))
    losses = []
    for step in range(4):
        x, y = _batch(step, rank, 4)
        loss = F.cross_entropy(step_fn(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        losses.append(loss.item())
    return {"ok": True, "losses": losses, **_precompiled_stats(), **_counters()}


def caching_precompile_control(rank: int, world: int) -> Any:
    """Torch's own ``caching_precompile``, the negative control of ``apply(x, fn)``."""
    torch._dynamo.config.caching_precompile = True
    apply = ApplyNet()
    compiled = torch.compile(apply)
    x = torch.randn(2, 4)
    ref = apply.lin(x)
    return {
        "ok": True,
        "apply_double": bool(torch.allclose(compiled(x, _double), ref * 2)),
        "apply_triple": bool(torch.allclose(compiled(x, _triple), ref * 3)),
    }


class StepNet(nn.Module):
    """Takes the step number: a scalar that changes at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * step
        return out


def scalar_steps(rank: int, world: int, shared: str, local_base: str) -> Any:
    """One artifact per step value, until the limit; then Dynamo, right all along."""
    import dynamo_dist

    _local_dirs(rank, local_base)
    torch.manual_seed(0)
    model = StepNet()
    compiled = dynamo_dist.compile(model, cache_dir=shared)
    x = torch.randn(2, 2)
    right = [bool(torch.allclose(compiled(x, step), model(x, step))) for step in range(2, 12)]
    return {"ok": True, "right": right, **_precompiled_stats()}


def fsdp(rank: int, world: int, shared: str, local_base: str) -> Any:
    """FSDP2 (fully_shard): not precompiled (its hooks gather parameters), counted."""
    from torch.distributed.fsdp import fully_shard

    import dynamo_dist

    _local_dirs(rank, local_base)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    compiled = dynamo_dist.compile(model, cache_dir=shared)
    for _ in range(3):
        compiled(torch.randn(4, 8)).sum().backward()
    return {"ok": True, **_precompiled_stats(), **_counters()}


# -- tests ---------------------------------------------------------------------------------
def _shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _ok(run: ranks.RankRun, world: int) -> list[dict[str, Any]]:
    out = []
    for r in range(world):
        res = run.rank(r)
        assert res.get("ok"), f"rank {r}: {res.get('traceback') or res}\n{run.output[-3000:]}"
        out.append(res)
    return out


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Plain torch.compile's run of each model, launched once per worker: the reference
    that the warm starts of both wrappings (``outer``, ``inner``) are compared with."""
    runs: dict[str, list[dict[str, Any]]] = {}

    def run(how: str) -> list[dict[str, Any]]:
        if how not in runs:
            tmp = tmp_path_factory.mktemp(how)
            launched = ranks.launch(HERE, "train", str(_shared(tmp)), tmp / "p", how, 30, tmp=tmp)
            runs[how] = _ok(launched, 2)
        return runs[how]

    return run


@pytest.mark.parametrize("how", ["outer", "inner", "outer-blocks"])
def test_warm_start_traces_nothing_and_matches_plain(
    tmp_path: Path, how: str, plain_runs: Any
) -> None:
    shared = _shared(tmp_path)
    args = (str(shared),)
    calls_per_step = 3 if how.endswith("-blocks") else 1
    cold = _ok(ranks.launch(HERE, "train", *args, tmp_path / "c", how, 30, tmp=tmp_path), 2)
    warm = _ok(ranks.launch(HERE, "train", *args, tmp_path / "w", how, 30, tmp=tmp_path), 2)
    plain = plain_runs("plain-blocks" if how.endswith("-blocks") else "plain")
    for r in range(2):
        assert sum(c["precompiled_captures"] for c in cold) >= 1
        assert cold[r]["precompiled_fallbacks"] == {}, cold[r]
        w = warm[r]
        # The warm job: every artifact loaded, nothing traced, nothing compiled.
        assert w["precompiled_fallbacks"] == {}, w
        assert w["precompiled_captures"] == 0 and w["precompiled_loads"] >= 1, w
        assert w["frames_ok"] == 0, w
        assert w["aot_autograd"] == {}, w
        assert w["inductor_compiles"] == 0, w
        assert w["precompiled_calls"] == calls_per_step * (30 + len(w["evals"])), w
        assert w["params_equal"]
        # Plain torch.compile's numbers, step for step (the same kernels).
        assert w["losses"] == pytest.approx(plain[r]["losses"], rel=1e-5)
        assert cold[r]["losses"] == pytest.approx(plain[r]["losses"], rel=1e-5)
    # Loading built kernels needs no precompiled header (gcc, seconds, 150 MB).
    assert not list((tmp_path / "w").glob("rank*/precompiled_headers/*.gch"))
    # The last rank's shorter batch used the artifact captured for it by the cold job.
    assert warm[1]["precompiled_loads"] == 2
    # Why, as Dynamo words the failed guard (not GuardDebugInfo's repr).
    ((reason, n),) = warm[1]["recompile_reasons"].items()
    assert n == 1 and reason.startswith("precompiled guards failed: "), reason
    assert "size mismatch" in reason and "GuardDebugInfo" not in reason, reason
    assert warm[0]["evals"] == pytest.approx(cold[0]["evals"], rel=1e-5)


def _write_helper(helper_dir: Path, factor: int) -> None:
    helper_dir.mkdir(exist_ok=True)
    (helper_dir / "precompile_helper.py").write_text(HELPER.format(factor=factor))
    for cached in (helper_dir / "__pycache__").glob("*"):
        cached.unlink()


def test_every_fallback_reason_is_agreed_and_counted(tmp_path: Path) -> None:
    shared = _shared(tmp_path)
    helper_dir = tmp_path / "helper"
    _write_helper(helper_dir, 5)
    args = (str(shared),)
    cold = _ok(ranks.launch(HERE, "fallbacks", *args, tmp_path / "c", helper_dir, tmp=tmp_path), 2)
    for r in range(2):
        assert all(cold[r][k] for k in ("apply_double", "apply_triple", "break", "helper")), cold[r]
        assert cold[r]["precompiled_fallbacks"] == {"unserializable_guard": 1, "graph_break": 1}
    # Warm: the helper's source edited, the user global changed, gelu patched on rank 1.
    _write_helper(helper_dir, 7)
    env = {"TEST_SCALE": "3", "TEST_PATCH_GELU": "1"}
    warm = _ok(
        ranks.launch(HERE, "fallbacks", *args, tmp_path / "w", helper_dir, tmp=tmp_path, env=env),
        2,
    )
    for r in range(2):
        w = warm[r]
        # Right answers every time: the new helper, the new scale, each function.
        assert all(w[k] for k in ("apply_double", "apply_triple", "break", "helper", "scale"))
        assert w["gelu"], w
        reasons = w["precompiled_fallbacks"]
        assert reasons["unserializable_guard"] == 1 and reasons["graph_break"] == 1, w
        assert reasons["guard_miss"] == 1, w
        # The edited helper: the old artifact was refused, one for the new code captured.
        assert "source_changed" not in reasons and w["precompiled_stale"] == 1, w
    assert warm[1]["precompiled_fallbacks"]["torch_internals_changed"] == 1
    assert warm[0]["precompiled_fallbacks"]["other_rank"] == 1


def test_no_aot_compile_and_a_damaged_artifact_fall_back(tmp_path: Path) -> None:
    shared = _shared(tmp_path)
    local = tmp_path / "local"
    env = {"TEST_NO_AOT": "1"}
    old = _ok(ranks.launch(HERE, "gelu_only", str(shared), local, tmp=tmp_path, env=env), 2)
    for res in old:
        assert res["same"] and res["precompiled_fallbacks"] == {"no_aot_compile": 1}, res
    cold = _ok(ranks.launch(HERE, "gelu_only", str(shared), local, tmp=tmp_path), 2)
    assert all(r["same"] and r["precompiled_fallbacks"] == {} for r in cold), cold
    # The artifact files in each rank's own cache, damaged (a full disk, a bad copy).
    files = list(local.glob("rank*/dynamo_dist_precompiled/*.bin"))
    assert len(files) == 2, files
    for f in files:
        f.write_bytes(f.read_bytes()[:100])
    warm = _ok(ranks.launch(HERE, "gelu_only", str(shared), local, tmp=tmp_path), 2)
    for res in warm:
        assert res["same"] and res["precompiled_fallbacks"] == {"package_error": 1}, res
    # The damaged files were removed: the next start installs the shared entry again.
    again = _ok(ranks.launch(HERE, "gelu_only", str(shared), local, tmp=tmp_path), 2)
    for res in again:
        assert res["same"] and res["precompiled_fallbacks"] == {}, res
        assert res["precompiled_loads"] == 1 and res["frames_ok"] == 0, res


def test_switched_torch_compile_takes_the_precompiled_route(tmp_path: Path) -> None:
    env = {"DYNAMO_DIST_CACHE_DIR": str(_shared(tmp_path))}
    cold = _ok(ranks.launch(HERE, "switched", tmp_path / "c", tmp=tmp_path, env=env), 2)
    warm = _ok(ranks.launch(HERE, "switched", tmp_path / "w", tmp=tmp_path, env=env), 2)
    for c, w in zip(cold, warm, strict=True):
        assert c["precompiled_calls"] == 4 and c["precompiled_fallbacks"] == {}, c
        assert w["precompiled_calls"] == 4 and w["precompiled_loads"] == 1, w
        assert w["frames_ok"] == 0 and w["aot_autograd"] == {}, w
        assert w["losses"] == c["losses"]


def test_apply_with_two_functions_is_right_where_caching_precompile_is_not(
    tmp_path: Path,
) -> None:
    """The control: torch's caching_precompile drops the guard on ``fn`` and runs
    ``double`` for ``triple`` in one process; the precompiled route keeps that guard (the
    module falls back, test_every_fallback_reason_is_agreed_and_counted), so it cannot."""
    run = ranks.launch(HERE, "caching_precompile_control", tmp=tmp_path, nproc=1)
    res = _ok(run, 1)[0]
    assert res["apply_double"]
    if res["apply_triple"]:
        pytest.skip("this torch's caching_precompile keeps the guard: no control to show")
    assert not res["apply_triple"]


def test_a_scalar_changing_at_every_call_stops_at_the_recompile_limit(tmp_path: Path) -> None:
    run = ranks.launch(HERE, "scalar_steps", str(_shared(tmp_path)), tmp_path / "l", tmp=tmp_path)
    for res in _ok(run, 2):
        assert all(res["right"]), res
        assert res["precompiled_fallbacks"] == {"recompile_limit": 1}, res
        assert res["precompiled_calls"] == 8, res


def test_fsdp2_modules_fall_back_counted(tmp_path: Path) -> None:
    shared = _shared(tmp_path)
    run = ranks.launch(HERE, "fsdp", str(shared), tmp_path / "l", tmp=tmp_path)
    for res in _ok(run, 2):
        assert res["precompiled_fallbacks"] == {"unsupported_module": 1}, res
        assert res["precompiled_calls"] == 0 and res["frames_ok"] > 0, res


if __name__ == "__main__":
    ranks.main(globals())
