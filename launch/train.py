"""A small transformer language model trained with DDP and dynamo_dist.compile.

    torchrun --standalone --nproc-per-node=2 launch/train.py

Runs on CPU/gloo by default and on GPUs/NCCL when CUDA is available. Some
steps give ranks different batch sizes (the short last batch of an epoch,
uneven data shards): exactly the case where plain torch.compile lets one rank
recompile while the others do not. dynamo_dist keeps them in step.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

import dynamo_dist


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def synthetic_batch(
    step: int, rank: int, batch: int, seq: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences following t[i+1] = (3 t[i] + 1) mod vocab: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    seqs = [start]
    for _ in range(seq):
        seqs.append((seqs[-1] * 3 + 1) % vocab)
    data = torch.cat(seqs, dim=1).to(device)
    return data[:, :-1], data[:, 1:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    p.add_argument(
        "--short-batch",
        type=int,
        default=6,
        help="batch size of the last rank on every --short-every-th step",
    )
    p.add_argument("--short-every", type=int, default=10)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist-backend", default=None, help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--policy", default=None, help="dynamo_dist policy (sync, strict, warn, off)")
    p.add_argument("--no-compile", action="store_true")
    return p.parse_args(argv)


def rank_device(kind: str) -> torch.device:
    """This rank's device of ``kind``; on cuda, set as the current device.

    More ranks than GPUs (a single-GPU test box) share the devices round-robin.
    """
    if kind != "cuda":
        return torch.device(kind)
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


@record
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist_backend = args.dist_backend or ("nccl" if args.device == "cuda" else "gloo")
    dist.init_process_group(dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device(args.device)
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.layers, args.heads, args.seq).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = (
        ddp
        if args.no_compile
        else dynamo_dist.compile(ddp, backend=args.backend, policy=args.policy)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    t_start = time.perf_counter()
    for step in range(args.steps):
        short = args.short_every > 0 and step % args.short_every == args.short_every - 1
        batch = args.short_batch if (short and rank == world - 1) else args.batch
        x, y = synthetic_batch(step, rank, batch, args.seq, args.vocab, device)
        t0 = time.perf_counter()
        logits = step_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            note = f" (rank {world - 1} batch {args.short_batch})" if short else ""
            ms = 1e3 * (time.perf_counter() - t0)
            print(
                f"step {step:4d}  loss {loss.item():.4f}  {ms:8.1f} ms{note}",
                flush=True,
            )
    elapsed = time.perf_counter() - t_start
    st = dynamo_dist.stats()
    lines: list[dict[str, object] | None] = [None] * world
    dist.all_gather_object(lines, st)
    if rank == 0:
        print(
            f"done: {args.steps} steps in {elapsed:.1f}s; final loss {loss.item():.4f} "
            f"(uniform guess would be {math.log(args.vocab):.2f})"
        )
        for s in lines:
            assert s is not None
            print(
                f"[rank {s.get('rank')}] guard evaluations {s.get('evaluations', 0)}, "
                f"exchanges {s.get('exchanges', 0)}, local misses {s.get('local_misses', 0)}, "
                f"forced recompiles {s.get('forced_recompiles', 0)}, "
                f"compiles {s.get('compiles', 0)}, exchange p50 {s.get('p50_us', 0)} us",
                flush=True,
            )
    dynamo_dist.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
