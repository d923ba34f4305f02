"""dynamo_dist as a drop-in for ``torch.compile`` in a real training script (issue 12).

The main rank program is a nanoGPT-style ``train.py`` of our own: a tiny GPT made
of user-defined modules, compiled and then wrapped in DDP, AdamW, gradient
accumulation with ``no_sync()``, and an evaluation under ``torch.no_grad()`` and
``model.eval()`` that only rank 0 runs every few iterations (nanoGPT's
``if iter_num % eval_interval == 0 and master_process: losses = estimate_loss()``).

* With ``@dynamo_dist.local()`` on ``estimate_loss`` the job runs to the end, and
  the lockstep (training) compile counts are equal on every rank.
* Without it, the evaluation call of rank 0 meets a training call of rank 1 at the
  same exchange: the frame identity carries grad mode, so every rank gets a
  ``RankDivergenceError`` naming the fix instead of a hang.

The second program is a stall the identity cannot catch (same grad mode, one call
more on rank 0): the stall warning must be logged before the timeout error.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, error_result, result
from torch import nn
from torch.nn import functional as F

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

HERE = __file__

STALL_MESSAGE = "stalled at guard exchange"


# -- a tiny GPT, user code all the way down (Dynamo traces it inside DDP) ------------
VOCAB, BLOCK, EMBD, HEADS, LAYERS = 32, 8, 16, 2, 2


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(EMBD, 3 * EMBD)
        self.c_proj = nn.Linear(EMBD, EMBD)
        self.resid_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(EMBD, dim=2)
        q = q.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        k = k.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        v = v.view(b, t, HEADS, c // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(EMBD, 4 * EMBD)
        self.c_proj = nn.Linear(4 * EMBD, EMBD)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(EMBD)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(EMBD)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer: int = LAYERS) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, EMBD)
        self.wpe = nn.Embedding(BLOCK, EMBD)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList([Block() for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(EMBD)
        self.lm_head = nn.Linear(EMBD, VOCAB, bias=False)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def _local_inductor_cache(rank: int, cache_dir: str) -> None:
    """Each rank gets its own empty inductor cache next to the shared one, as on its own host."""
    base = os.path.join(os.path.dirname(os.path.abspath(cache_dir)), "inductor-local")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"rank{rank}")


# -- rank programs -----------------------------------------------------------------------
def nanogpt(rank: int, world: int, mode: str, cache_dir: str) -> dict[str, Any]:
    """nanoGPT's train.py in miniature; ``mode`` is ``local`` (annotated) or ``plain``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert mode in ("local", "plain"), mode
    master_process = rank == 0
    torch.manual_seed(1337 + rank)  # as nanoGPT: DDP broadcasts rank 0's weights anyway
    cb = CountingBackend()
    if cache_dir == "-":
        compile_args: dict[str, Any] = {"backend": cb}
        max_iters, eval_interval, eval_iters, n_layer = 6, 2, 2, LAYERS
    else:
        _local_inductor_cache(rank, cache_dir)
        compile_args = {"backend": "inductor", "cache_dir": cache_dir}
        # gcc builds every kernel: one block keeps each graph's compile short.
        max_iters, eval_interval, eval_iters, n_layer = 3, 2, 1, 1
    batch_size, grad_accum = 4, 2

    def get_batch(split: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = 1_000_003 * ("train", "val").index(split) + 1009 * rank + step
        g = torch.Generator().manual_seed(seed)
        data = torch.randint(0, VOCAB, (batch_size, BLOCK + 1), generator=g)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    model: Any = GPT(n_layer)
    model = dynamo_dist.compile(model, **compile_args)  # nanoGPT: compile, then wrap
    model = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = get_batch(split, 1000 + k)
                _, loss = model(x, y)
                losses[k] = loss.item()
            out[split] = float(losses.mean())
        model.train()
        return out

    if mode == "local":  # the one-line change: @dynamo_dist.local() on estimate_loss
        estimate_loss = dynamo_dist.local()(estimate_loss)

    evals: list[dict[str, float]] = []
    train_losses: list[float] = []
    iter_num = 0
    try:
        while iter_num < max_iters:
            if iter_num % eval_interval == 0 and master_process:
                evals.append(estimate_loss())
            for micro_step in range(grad_accum):
                x, y = get_batch("train", iter_num * grad_accum + micro_step)
                sync = micro_step == grad_accum - 1
                with nullcontext() if sync else model.no_sync():
                    _, loss = model(x, y)
                    loss = loss / grad_accum
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_losses.append(loss.item() * grad_accum)
            iter_num += 1
    except (dynamo_dist.RankDivergenceError, dynamo_dist.CollectiveTimeoutError) as e:
        return error_result(cb, e, iters=iter_num, evals=evals, train_losses=train_losses)
    # DDP kept the replicas identical: every rank ends with rank 0's weights.
    digest = float(sum(p.detach().double().sum() for p in model.parameters()))
    return result(cb, True, iters=iter_num, evals=evals, train_losses=train_losses, digest=digest)


def _f(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


def stall(rank: int, world: int) -> dict[str, Any]:
    """Same grad mode, different call counts: rank 0 calls once more and waits alone."""
    records: list[tuple[int, str]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)  # timeout and stall_warning from the environment
    # After compile(): dynamo_dist adds its own stderr handler only to a logger that has none.
    logging.getLogger("dynamo_dist").addHandler(Grab(level=logging.DEBUG))
    x = torch.randn(4, 3)

    def stalls() -> list[str]:
        return [m for lvl, m in records if lvl == logging.WARNING and STALL_MESSAGE in m]

    if rank == 0:
        try:
            for _ in range(3):
                cf(x)
        except dynamo_dist.CollectiveTimeoutError as e:
            # Read the log before anything else can be logged.
            before = stalls()
            return error_result(
                cb, e, missing=e.missing, stall_warnings_before_error=before, all=stalls()
            )
        finally:
            ranks.signal_peers("rank0_done")
        return result(cb, True, all=stalls())
    for _ in range(2):
        cf(x)
    # Alive, in no exchange, until rank 0 has its error.
    ranks.wait_for_peer("rank0_done", timeout=200)
    return result(cb, True, all=stalls())


# -- tests -----------------------------------------------------------------------------
def _nanogpt_env(timeout: int) -> dict[str, str]:
    # A hang ends after ``timeout`` seconds, not after the default 900.
    return {"DYNAMO_DIST_TIMEOUT": str(timeout)}


def _assert_local_run_completes(run: ranks.RankRun, precompiled: bool = False) -> None:
    """``precompiled``: the module runs precompiled artifacts (a shared cache), not Dynamo."""
    res = [run.rank(r) for r in (0, 1)]
    for r, one in enumerate(res):
        assert one["ok"], f"rank {r}: {one}\n{run.output[-4000:]}"
        assert one["iters"] > 0
        assert all(math.isfinite(v) for v in one["train_losses"]), one["train_losses"]
    # Rank 0's evaluations exchanged nothing: both ranks saw the same lockstep exchanges.
    exchanges = [one["stats"]["exchanges"] for one in res]
    assert len(set(exchanges)) == 1, f"exchange counts differ: {exchanges}"
    assert all(one["stats"]["divergences"] == 0 for one in res)
    if precompiled:
        stats = [one["stats"] for one in res]
        assert all(s["precompiled_fallbacks"] == {} for s in stats), stats
        calls = [s["precompiled_calls"] for s in stats]
        # Rank 0's evaluation calls ran its own (no_grad, eval-mode) artifact on top.
        assert calls[1] == 2 * res[1]["iters"] and calls[0] > calls[1], calls
        assert stats[0]["precompiled_captures"] + stats[0]["precompiled_loads"] >= 2, stats
    else:
        compiles = [one["stats"]["compiles"] for one in res]
        assert len(set(compiles)) == 1 and compiles[0] >= 1, f"training compiles: {compiles}"
        assert [one["stats"]["groups"]["world"]["compiles"] for one in res] == compiles
        assert res[0]["stats"]["local_compiles"] >= 1, res[0]["stats"]
        assert res[1]["stats"]["local_compiles"] == 0, res[1]["stats"]
    # Only rank 0 evaluated, every eval_interval iterations from iteration 0 on.
    assert len(res[0]["evals"]) >= 2 and res[1]["evals"] == []
    for ev in res[0]["evals"]:
        assert all(math.isfinite(v) for v in ev.values()), ev
    assert res[0]["digest"] == pytest.approx(res[1]["digest"], rel=1e-6)


def test_nanogpt_with_local_eval_completes(tmp_path):
    run = ranks.launch(
        HERE, "nanogpt", "local", "-", tmp=tmp_path, env=_nanogpt_env(300), timeout=420
    )
    _assert_local_run_completes(run)


@pytest.mark.inductor
@pytest.mark.timeout(900)
def test_nanogpt_with_local_eval_and_shared_cache_completes(tmp_path):
    # Each inductor graph takes gcc seconds, minutes on a loaded machine: rank 1 waits at
    # its first training exchange while rank 0 compiles its evaluation graph.
    cache = tmp_path / "cache"
    run = ranks.launch(
        HERE, "nanogpt", "local", cache, tmp=tmp_path, env=_nanogpt_env(600), timeout=840
    )
    _assert_local_run_completes(run, precompiled=True)
    stats = [run.rank(r)["stats"] for r in (0, 1)]
    assert all(s["cache_fallbacks"] == 0 for s in stats), stats
    # The training artifact went through the shared cache: one rank built, the other loaded.
    assert sum(s["cache_publishes"] for s in stats) >= 1, stats
    assert sum(s["cache_loads"] for s in stats) >= 1, stats


@pytest.mark.parametrize(
    "cache", ["-", pytest.param("cache", marks=pytest.mark.inductor)], ids=["nocache", "cache"]
)
def test_nanogpt_without_local_fails_fast(tmp_path, cache):
    cache_dir = "-" if cache == "-" else tmp_path / "cache"
    run = ranks.launch(
        HERE, "nanogpt", "plain", cache_dir, tmp=tmp_path, env=_nanogpt_env(120), timeout=360
    )
    for r in (0, 1):
        res = run.rank(r)
        assert res["error"] != "CollectiveTimeoutError", f"rank {r} hung until the timeout: {res}"
        assert res["error"] == "RankDivergenceError", f"rank {r}: {res}\n{run.output[-4000:]}"
        msg = res["message"]
        assert "dynamo_dist.local()" in msg, msg
        # It names the frame, each rank and each rank's grad mode.
        assert "GPT.forward (test_dropin.py:" in msg and "rank 0" in msg and "rank 1" in msg, msg
        assert "grad disabled" in msg and "grad enabled" in msg, msg
        # Rank 0's first evaluation call, at iteration 0, is the one that diverges.
        assert res["iters"] == 0, res
    assert run.rank(0)["evals"] == []


def test_stall_warning_comes_before_timeout(tmp_path):
    env = {"DYNAMO_DIST_TIMEOUT": "20", "DYNAMO_DIST_STALL_WARNING": "5"}
    run = ranks.launch(HERE, "stall", tmp=tmp_path, env=env, timeout=400)
    res = run.rank(0)
    assert res["error"] == "CollectiveTimeoutError", f"{res}\n{run.output[-4000:]}"
    assert res["missing"] == [1], res
    tail = run.output[-4000:]
    assert len(res["stall_warnings_before_error"]) == 1, f"{res['all']}\n{tail}"
    assert len(res["all"]) == 1, f"one warning, not one per poll: {res['all']}"
    assert STALL_MESSAGE in run.output, "dynamo_dist's own handler did not print the warning"
    assert run.rank(1)["ok"], run.rank(1)
    assert run.rank(1)["all"] == [], "rank 1 never waited at an exchange"


if __name__ == "__main__":
    ranks.main(globals())
