"""Hugging Face Trainer with torch_compile=True; every torch.compile made a dynamo_dist.compile.

    DYNAMO_DIST_ALL_COMPILES=1 torchrun --standalone --nproc-per-node=2 \
        launch/frameworks/hf_trainer.py

A random-init GPT-2 (nothing downloaded) on 14 synthetic sequences, batches of 4,
``even_batches=False``: one rank's last batch is shorter. Without the variable that
rank alone recompiles; with it, both ranks print the same compiles. Needs
``pip install transformers accelerate``.
"""

from __future__ import annotations

import os
import tempfile

import torch
from _report import report
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 14

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def main() -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        torch_compile=True,
        torch_compile_backend="aot_eager",  # or inductor; aot_eager compiles in seconds on CPU
        accelerator_config={"even_batches": False},
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Tokens()).train()
    report(int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main()
