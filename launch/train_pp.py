"""launch/train.py's transformer LM, pipeline-parallel x data-parallel, on a 2-D DeviceMesh.

    torchrun --standalone --nproc-per-node=4 launch/train_pp.py

The ranks form a (pp, dp) mesh: ``--pp`` pipeline stages (2 by default) times
``world / pp`` data-parallel replicas. Each stage holds a slice of the model's
blocks (the first also the embeddings, the last the head) and passes activations
forward and their gradients back with plain send/recv; within a stage the
replicas sync gradients with DDP over the stage's dp group.

The stages run different code, so each is compiled with ``group=mesh["dp"]``:
its guard exchange, consensus and cache agreement run among the ranks of that
stage only, never across stages. The last replica gets a different batch size
from step 0 (uneven data shards) and a shorter one every ``--short-every``-th
step; every rank of a stage still ends with the same number of compiles.

Runs on CPU/gloo by default and on GPUs/NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from train import Block, rank_device, synthetic_batch  # launch/train.py, next to this script

import dynamo_dist


class Stage(nn.Module):
    """Blocks ``[lo, hi)`` of the LM; stage 0 embeds the tokens, the last stage has the head."""

    def __init__(self, args: argparse.Namespace, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.tok = nn.Embedding(args.vocab, args.dim) if first else None
        self.pos = nn.Parameter(torch.zeros(1, args.seq, args.dim)) if first else None
        self.blocks = nn.ModuleList(Block(args.dim, args.heads) for _ in range(lo, hi))
        self.norm = nn.LayerNorm(args.dim) if last else None
        self.head = nn.Linear(args.dim, args.vocab, bias=False) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok is not None and self.pos is not None:
            x = self.tok(x) + self.pos[:, : x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        if self.norm is not None and self.head is not None:
            x = self.head(self.norm(x))
        return x


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pp", type=int, default=2, help="pipeline stages (world size / pp replicas)")
    p.add_argument("--batch", type=int, default=8, help="per-replica batch size")
    p.add_argument(
        "--last-batch",
        type=int,
        default=6,
        help="batch size of the last replica, from step 0 (uneven data shards)",
    )
    p.add_argument(
        "--short-batch",
        type=int,
        default=4,
        help="batch size of the last replica on every --short-every-th step",
    )
    p.add_argument("--short-every", type=int, default=10)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4, help="blocks, split evenly over the stages")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--backend",
        default="inductor" if cuda else "eager",
        help="torch.compile backend (default: inductor on cuda, eager on cpu)",
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dist-backend", default=None, help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--policy", default=None, help="dynamo_dist policy (sync, strict, warn, off)")
    p.add_argument("--no-compile", action="store_true")
    return p.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist_backend = args.dist_backend or ("nccl" if args.device == "cuda" else "gloo")
    dist.init_process_group(dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.pp or args.layers < args.pp:
        raise SystemExit(
            f"--pp {args.pp} must divide the world size ({world}) and be at most --layers "
            f"({args.layers})"
        )
    device = rank_device(args.device)
    dp = world // args.pp
    mesh = init_device_mesh(device.type, (args.pp, dp), mesh_dim_names=("pp", "dp"))
    stage, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    first, last = stage == 0, stage == args.pp - 1
    # The global ranks of this replica's neighbouring stages.
    prev_rank = int(mesh.mesh[stage - 1, replica]) if not first else None
    next_rank = int(mesh.mesh[stage + 1, replica]) if not last else None
    printer = int(mesh.mesh[-1, 0])  # the last stage of replica 0 prints the loss

    bounds = [round(i * args.layers / args.pp) for i in range(args.pp + 1)]
    torch.manual_seed(stage)
    model = Stage(args, bounds[stage], bounds[stage + 1], first, last).to(device)
    ddp = DDP(
        model,
        process_group=mesh["dp"].get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
    )
    step_fn = (
        ddp
        if args.no_compile
        else dynamo_dist.compile(ddp, backend=args.backend, policy=args.policy, group=mesh["dp"])
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss = torch.tensor(float("nan"))
    t_start = time.perf_counter()
    for step in range(args.steps):
        short = args.short_every > 0 and step % args.short_every == args.short_every - 1
        batch = args.batch
        if replica == dp - 1 and dp > 1:
            batch = args.short_batch if short else args.last_batch
        # Every stage of a replica draws the same batch: stage 0 uses the tokens, the
        # last stage the targets.
        x, y = synthetic_batch(step, replica, batch, args.seq, args.vocab, device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if first:
            inp = x
        else:
            inp = torch.empty(batch, args.seq, args.dim, device=device)
            dist.recv(inp, prev_rank)
            inp.requires_grad_()
        out = step_fn(inp)
        if last:
            loss = F.cross_entropy(out.reshape(-1, args.vocab), y.reshape(-1))
            loss.backward()
        else:
            dist.send(out.detach().contiguous(), next_rank)
            grad = torch.empty_like(out)
            dist.recv(grad, next_rank)
            out.backward(grad)
        if not first:
            assert inp.grad is not None
            dist.send(inp.grad.contiguous(), prev_rank)
        opt.step()
        if rank == printer:
            note = f" (replica {dp - 1} batch {args.short_batch})" if short and dp > 1 else ""
            ms = 1e3 * (time.perf_counter() - t0)
            print(f"step {step:4d}  loss {loss.item():.4f}  {ms:8.1f} ms{note}", flush=True)
    elapsed = time.perf_counter() - t_start
    st = dynamo_dist.stats()
    mine = {
        "rank": rank,
        "stage": stage,
        "replica": replica,
        "loss": loss.item() if last else None,
        "stats": st,
    }
    lines: list[dict[str, object] | None] = [None] * world
    dist.all_gather_object(lines, mine)
    if rank == 0:
        final = {s["replica"]: s["loss"] for s in lines if s is not None and s["loss"] is not None}
        print(
            f"done: {args.steps} steps in {elapsed:.1f}s on a (pp={args.pp}, dp={dp}) mesh; "
            f"final loss {final.get(0, float('nan')):.4f} "
            f"(uniform guess would be {math.log(args.vocab):.2f})"
        )
        for s in lines:
            assert s is not None
            sst: dict[str, object] = s["stats"]  # type: ignore[assignment]
            groups: dict[str, dict[str, object]] = sst.get("groups") or {}  # type: ignore[assignment]
            members = [g.get("ranks") for g in groups.values()]
            print(
                f"[rank {s['rank']}] stage {s['stage']} replica {s['replica']}: "
                f"steps {args.steps}, loss {final.get(s['replica'], float('nan')):.4f}, "
                f"compiles {sst.get('compiles', 0)}, exchanges {sst.get('exchanges', 0)}, "
                f"exchange groups {members}",
                flush=True,
            )
    dynamo_dist.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
