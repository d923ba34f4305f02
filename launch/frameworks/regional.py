"""torchtitan-style regional compilation: each transformer block compiled on its own.

    dynamo-dist-run --all-compiles --standalone --nproc-per-node=2 launch/frameworks/regional.py

torchtitan's ``apply_compile`` compiles every block on its own with ``fullgraph=True``
(``block.compile(...)``, ``nn.Module.compile``, at commit a9c5edc); the README shows
torchtitan itself under the switch, and this is the same pattern without torchtitan.
All blocks share one compiled graph; rank 1's shorter sequence at step 2 makes that
graph dynamic, on both ranks together under the switch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from _report import report
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, n_layers: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): Block(dim, heads) for i in range(n_layers)})
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return self.head(x).mean()


def apply_compile(model: Model) -> None:
    """torchtitan's: each block compiled separately, fullgraph."""
    for layer_id, block in model.layers.named_children():
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        model.layers.register_module(layer_id, compiled)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Model()
    apply_compile(model)
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    for step in range(6):
        seq = 12 if (step == 2 and rank == 1) else 16
        loss = ddp(torch.randn(4, seq, 32))
        loss.backward()
        opt.step()
        opt.zero_grad()
    report(rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
