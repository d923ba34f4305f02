"""A plain accelerate training loop whose Accelerator compiles the model (``--dynamo_backend``).

    DYNAMO_DIST_ALL_COMPILES=1 accelerate launch --multi_gpu --num_processes 2 \
        --dynamo_backend aot_eager launch/frameworks/accelerate_loop.py

(On a machine without GPUs add ``ACCELERATE_USE_CPU=true``: accelerate's ``--cpu``
starts one process only.) ``even_batches=False`` gives one rank a shorter last batch;
under the switch both ranks recompile for it together. Needs ``pip install accelerate``.
"""

from __future__ import annotations

import os

import torch
from _report import report
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def main() -> None:
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(14, 16), torch.randn(14, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, loader)  # compiles the model
    sizes: list[int] = []
    for _ in range(2):
        for x, y in loader:
            sizes.append(len(x))
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
    print("batch sizes", sizes)
    report(int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main()
