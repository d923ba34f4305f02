"""Lightning: a LightningModule compiled with torch.compile, fitted with DDP on 2 processes.

    DYNAMO_DIST_ALL_COMPILES=1 python launch/frameworks/lightning_fit.py

Lightning starts the second process itself (its DDP launcher re-runs this script), and
the variable reaches it. 14 samples in batches of 4 without a distributed sampler's
padding: one rank's last batch is shorter. Needs ``pip install lightning``.
"""

from __future__ import annotations

import lightning as L
import torch
from _report import report
from torch import nn


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Uneven(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Rank r's share of 14 samples: 8 on rank 0, 6 on rank 1 (batches 4+4, 4+2)."""

    def __init__(self, rank: int) -> None:
        self.n = 8 if rank == 0 else 6
        self.data = torch.utils.data.TensorDataset(torch.randn(self.n, 16), torch.randn(self.n, 1))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i]  # type: ignore[no-any-return]


def main() -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = torch.compile(Net(), backend="aot_eager")
    loader = torch.utils.data.DataLoader(Uneven(trainer.global_rank), batch_size=4)
    trainer.fit(model, loader)
    report(trainer.global_rank)


if __name__ == "__main__":
    main()
