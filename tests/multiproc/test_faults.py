"""Faults as users meet them: a rank stopped inside a DDP training loop.

A SIGSTOPped rank leaves the others in DDP's gradient all-reduce, torch's own
collective, which would wait out gloo's 30-minute timeout in silence. The status board's
stall watch names the stopped rank from the survivors' board thread; with
``stall_abort`` the survivor writes the job report and exits with status 75, and
torchrun ends the job.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import pytest
import ranks
import torch

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]

HERE = __file__


def stopped_in_ddp(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    )
    compiled = dynamo_dist.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1000):
        if rank == 1 and step == 5:
            print(f"rank 1 stops itself at step {step}, pid {os.getpid()}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        loss = compiled(torch.randn(4, 8)).pow(2).mean()
        loss.backward()  # rank 0 waits here, in DDP's all-reduce
        opt.step()
        opt.zero_grad()
    return {"ok": True}


def test_a_stopped_rank_is_named_and_stall_abort_ends_the_job(tmp_path: Any) -> None:
    report = tmp_path / "report.json"
    env = {
        "DYNAMO_DIST_STALL_WARNING": "1",
        "DYNAMO_DIST_STATUS_INTERVAL": "0.5",
        "DYNAMO_DIST_STALL_ABORT": "1",
        "DYNAMO_DIST_REPORT": str(report),
    }
    # torchrun, as users run it: it is what ends the job when a rank exits.
    run = ranks.launch(HERE, "stopped_in_ddp", tmp=tmp_path, env=env, torchrun_args=[], timeout=300)
    out = run.output
    assert run.returncode != 0, out[-3000:]
    pid = re.search(r"rank 1 stops itself at step 5, pid (\d+)", out)
    assert pid, out[-3000:]
    named = re.search(
        rf"rank 1 \(host [^,]+, pid {pid.group(1)}\) has not published its status for \d+s", out
    )
    assert named, out[-3000:]
    assert "stall_abort: ending rank 0 with exit status 75" in out
    assert re.search(r"exitcode\s*:\s*75", out), out[-3000:]  # torchrun's failure summary
    data = json.loads(report.read_text())
    assert data["ended_by"] == 0 and [s["rank"] for s in data["stalled"]] == [1]
    assert data["stalled"][0]["pid"] == int(pid.group(1))


def one_rank_never_compiles(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    # Ranks 0 and 1 compile in their own group (a pipeline stage, say); rank 2 never
    # makes a compiled call, so it never starts dynamo_dist and has nothing to report.
    stage = dist.new_group([0, 1])
    if rank < 2:
        compiled = dynamo_dist.compile(lambda x: x * 2, backend="eager", group=stage)
        compiled(torch.ones(3))
    dist.barrier()
    if rank < 2:
        dynamo_dist.shutdown()  # the report, as at exit
    return {"ok": True}


def test_a_rank_that_never_compiles_is_reported_as_such_not_as_crashed(tmp_path: Any) -> None:
    report = tmp_path / "report.json"
    run = ranks.launch(
        HERE,
        "one_rank_never_compiles",
        tmp=tmp_path,
        nproc=3,
        env={"DYNAMO_DIST_REPORT": str(report)},
    )
    assert all(run.rank(r)["ok"] for r in range(3))
    data = json.loads(report.read_text())
    assert data["never_compiled"] == [2] and sorted(data["ranks"]) == ["0", "1"], data
    assert "ranks [2] made no compiled call" in run.output
    assert "exited early or crashed" not in run.output


if __name__ == "__main__":
    ranks.main(globals())
