"""Programs whose framework calls torch.compile, under the switch (issue 16), 2 ranks.

* ``torch.compile`` called at import time, before ``init_process_group``, as frameworks
  do: the switch decides at the first call, which is a multi-rank one.
* Hugging Face ``Trainer(torch_compile=True)`` with ``even_batches=False``: the last
  batch of one rank is shorter. Without the switch that rank recompiles alone (the
  negative control); with it, both ranks compile the same frames in the same order.
* torchtitan-style regional compilation: each block compiled on its own with
  ``fullgraph=True``, turned on by ``dynamo-dist-run --all-compiles``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, result
from torch import nn

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

HERE = __file__
SWITCH = {"DYNAMO_DIST_ALL_COMPILES": "1"}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).sum()


# Compiled at import, before ranks.main() initializes the process group, as a framework
# that compiles in its constructor would (only when this rank program is the one run).
EARLY_BACKEND = CountingBackend()
#: The test's own: ``dynamo_dist`` compiles the early model with dynamo_dist.compile.
EARLY_COMPILER_ENV = "TEST_EARLY_COMPILER"


def _early_compile() -> Any:
    if os.environ.get(EARLY_COMPILER_ENV) == "dynamo_dist":
        import dynamo_dist

        return dynamo_dist.compile(_Net(), backend=EARLY_BACKEND)
    return torch.compile(_Net(), backend=EARLY_BACKEND)


EARLY = (
    _early_compile()
    if __name__ == "__main__" and sys.argv[1:2] in (["early_compile"], ["local_first"])
    else None
)


def early_compile(rank: int, world: int) -> dict[str, Any]:
    assert EARLY is not None
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(EARLY)
    for step in range(4):
        n = 3 if (step == 2 and rank == 1) else 4  # rank 1's short batch
        model(torch.randn(n, 8)).backward()
    switched = bool(getattr(torch.compile, "__dynamo_dist_switch__", False))
    return result(EARLY_BACKEND, True, switched=switched)


def local_first(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 evaluates inside local() before anyone trains (the README's pattern).

    Rank 0 then holds an entry for the frame and rank 1 none: their first training call
    is exchanged by the C++ hook on rank 0 and by the switch's callback on rank 1, and
    both must name the same frame and caller.
    """
    import dynamo_dist

    assert EARLY is not None
    if rank == 0:
        with dynamo_dist.local(), torch.no_grad():
            EARLY(torch.randn(3, 8))
    try:
        for _ in range(3):
            EARLY(torch.randn(4, 8)).backward()
    except dynamo_dist.DynamoDistError as e:
        return result(EARLY_BACKEND, False, error=type(e).__name__, message=str(e))
    return result(EARLY_BACKEND, True)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _Stack(nn.Module):
    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): _Block(dim) for i in range(n)})
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return self.head(x).mean()


def per_block(rank: int, world: int, n_blocks: str) -> dict[str, Any]:
    """torchtitan's apply_compile: each block compiled alone, fullgraph, then DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dynamo_dist

    torch.manual_seed(0)
    model = _Stack(16, int(n_blocks))
    cb = CountingBackend()
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, backend=cb, fullgraph=True))
    ddp = DDP(model)
    exchanges = []
    for step in range(4):
        seq = 5 if (step == 2 and rank == 1) else 6  # one rank's shorter sequence
        before = dynamo_dist.stats().get("exchanges", 0)
        ddp(torch.randn(2, seq, 16)).backward()
        exchanges.append(dynamo_dist.stats().get("exchanges", 0) - before)
    switched = bool(getattr(torch.compile, "__dynamo_dist_switch__", False))
    return result(cb, True, switched=switched, exchanges=exchanges)


def hf_trainer(rank: int, world: int, outdir: str) -> dict[str, Any]:
    """Trainer(torch_compile=True) on a random-init GPT-2, synthetic data, nothing downloaded."""
    import torch._dynamo.callback as dynamo_callback
    from torch._dynamo.utils import counters
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    compiled: list[str] = []
    dynamo_callback.on_compile_end(lambda args: compiled.append(str(args.compile_id)))

    class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 14  # batches of 4, 4, 4, 2: rank 1's second batch is the short one

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    args = TrainingArguments(
        output_dir=outdir,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        torch_compile=True,
        torch_compile_backend="aot_eager",
        accelerator_config={"even_batches": False},
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens())
    out = trainer.train()
    switched = bool(getattr(torch.compile, "__dynamo_dist_switch__", False))
    stats: dict[str, Any] = {}
    if switched:
        import dynamo_dist

        stats = dynamo_dist.stats()
    return {
        "ok": True,
        "switched": switched,
        "compiled": compiled,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "loss": out.training_loss,
        "stats": stats,
    }


# -- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["switch", "compile", "plain"])
def test_compiled_before_init_process_group_decides_at_the_first_call(tmp_path, how):
    """torch.compile under the switch, or dynamo_dist.compile (a module-level decorator,
    a framework's constructor), before init_process_group: joined at the first call."""
    env = {"switch": SWITCH, "compile": {EARLY_COMPILER_ENV: "dynamo_dist"}, "plain": None}[how]
    run = ranks.launch(HERE, "early_compile", tmp=tmp_path, env=env, timeout=300)
    res = [run.rank(r) for r in (0, 1)]
    assert all(r["ok"] for r in res), run.output[-4000:]
    graphs = [r["graphs"] for r in res]
    if how != "plain":
        assert all(r["switched"] for r in res) == (how == "switch")
        assert graphs[0] == graphs[1] == 2, graphs  # rank 0 recompiled with rank 1
        assert all(r["stats"]["compiles"] == 2 for r in res), res
        assert res[0]["stats"]["forced_recompiles"] >= 1, res[0]["stats"]
    else:  # the negative control: plain torch.compile
        assert not any(r["switched"] for r in res)
        assert graphs == [1, 2], graphs


def test_rank0_local_evaluation_before_training_under_the_switch(tmp_path):
    env = {**SWITCH, "DYNAMO_DIST_TIMEOUT": "60"}
    run = ranks.launch(HERE, "local_first", tmp=tmp_path, env=env, timeout=300)
    res = [run.rank(r) for r in (0, 1)]
    assert all(r["ok"] for r in res), [r.get("message") for r in res]
    assert res[0]["stats"]["local_compiles"] == 1  # kept out of the training calls' limit
    assert res[0]["stats"]["compiles"] == res[1]["stats"]["compiles"] >= 1


def test_hf_trainer_compiles_the_same_on_every_rank_only_with_the_switch(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    runs = {}
    for name, env in (("switch", SWITCH), ("plain", None)):
        out = tmp_path / name
        run = ranks.launch(HERE, "hf_trainer", out, tmp=tmp_path, env=env, timeout=480)
        runs[name] = [run.rank(r) for r in (0, 1)]
        assert all(r["ok"] for r in runs[name]), run.output[-4000:]
    on, off = runs["switch"], runs["plain"]
    assert all(r["switched"] for r in on) and not any(r["switched"] for r in off)
    # With the switch: the same frames compiled in the same order, the same graphs.
    assert on[0]["compiled"] == on[1]["compiled"], json.dumps(on, default=str)[:3000]
    assert on[0]["unique_graphs"] == on[1]["unique_graphs"]
    assert on[0]["stats"]["compiles"] == on[1]["stats"]["compiles"] > 0
    assert on[0]["stats"]["forced_recompiles"] > 0, on[0]["stats"]  # rank 0 followed rank 1
    # Without it (negative control): rank 1 recompiled for its short batch, rank 0 did not.
    assert off[0]["compiled"] != off[1]["compiled"]
    assert len(off[0]["compiled"]) < len(off[1]["compiled"])
    assert off[0]["unique_graphs"] < off[1]["unique_graphs"]


def test_torchtitan_style_per_block_compile_under_the_launcher_flag(tmp_path):
    n = 12  # more blocks than the recompile limit (8): they must share graphs
    run = ranks.launch(
        HERE,
        "per_block",
        n,
        tmp=tmp_path,
        launcher=[sys.executable, "-m", "dynamo_dist.tools.launch", "--all-compiles"],
        env={k: v for k, v in os.environ.items() if k != "DYNAMO_DIST_ALL_COMPILES"},
        timeout=300,
    )
    res = [run.rank(r) for r in (0, 1)]
    assert all(r["ok"] for r in res), run.output[-4000:]
    assert all(r["switched"] for r in res)
    # One block class, n compiled instances: the blocks share their graphs, as with plain
    # torch.compile (so the count does not grow with n). Two graphs (block 0's input does
    # not require grad, the others' do), then two dynamic ones for rank 1's shorter
    # sequence, on both ranks together (rank 0's guards passed; it was made to recompile).
    assert res[0]["graphs"] == res[1]["graphs"] == 4, [r["graphs"] for r in res]
    assert res[0]["stats"]["compiles"] == res[1]["stats"]["compiles"] == 4
    assert res[0]["stats"]["forced_recompiles"] >= 1, res[0]["stats"]
    # One exchange per block call per step: the cost regional compilation pays.
    assert res[0]["exchanges"] == res[1]["exchanges"] == [n] * 4, res[0]["exchanges"]


if __name__ == "__main__":
    ranks.main(globals())
