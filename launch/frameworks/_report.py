"""What each framework example prints last: this rank's compiles, and whether switched."""

from __future__ import annotations

import torch
import torch._dynamo.callback as dynamo_callback

compiled: list[str] = []
dynamo_callback.on_compile_end(lambda args: compiled.append(str(args.compile_id)))


def report(rank: int) -> None:
    switched = bool(getattr(torch.compile, "__dynamo_dist_switch__", False))
    print(
        f"rank {rank}: {len(compiled)} compiles {compiled} "
        f"(torch.compile switched to dynamo_dist: {switched})",
        flush=True,
    )
