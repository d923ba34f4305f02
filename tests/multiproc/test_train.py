"""launch/train.py, the main job, runs to completion on 2 ranks with equal compile counts."""

from __future__ import annotations

import re

import pytest
from ranks import ROOT, torchrun

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]


def test_train_runs_to_completion():
    proc = torchrun(
        ROOT / "launch" / "train.py",
        "--steps",
        "12",
        "--short-every",
        "5",
        "--backend",
        "aot_eager",
        timeout=360,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "step   11" in proc.stdout
    lines = re.findall(r"\[rank (\d)\] guard evaluations .* compiles (\d+),", proc.stdout)
    assert sorted(r for r, _ in lines) == ["0", "1"], proc.stdout[-3000:]
    assert len({c for _, c in lines}) == 1, lines
    loss = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert loss[-1] < loss[0]
