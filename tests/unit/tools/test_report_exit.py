"""Rank 0's exit report: it never waits for a rank that is gone, and never fails the exit.

A real TCPStore; the status board is a function returning records, as the board's
snapshot does.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from dynamo_dist.tools import report


@pytest.fixture
def store() -> Any:
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))


@pytest.mark.timeout(120)
def test_a_rank_whose_status_stopped_changing_is_not_waited_for(store: Any) -> None:
    # Rank 1 was SIGKILLed: its record stays as it was. Rank 0 would otherwise wait the
    # whole 600 s (the test's timeout ends it first); it lists rank 1 as missing.
    frozen = {0: {"time": 5.0}, 1: {"time": 1.0, "state": "running"}}
    out = report.publish_and_collect(
        store, 1, 0, 2, {"compiles": 1}, 600.0, None, records=lambda: frozen, silent_after=1.0
    )
    assert out is not None and out["missing"] == [1] and "1" not in out["ranks"]


@pytest.mark.timeout(120)
def test_a_rank_that_keeps_publishing_its_status_is_waited_for(store: Any) -> None:
    # Rank 1 is alive (still finishing its steps): its record changes at every look, and
    # its report arrives after several silent_after periods.
    looks = {"n": 0}

    def board() -> dict[int, dict[str, Any]]:
        looks["n"] += 1
        return {0: {"time": 0.0}, 1: {"time": float(looks["n"])}}

    def publish_later() -> None:
        while looks["n"] < 4:
            time.sleep(0.05)
        peer = dist.TCPStore("127.0.0.1", store.port, 1, False)
        peer.set("dynamo_dist/report/2/1", json.dumps({"rank": 1, "compiles": 1}))

    t = threading.Thread(target=publish_later)
    t.start()
    out = report.publish_and_collect(
        store, 2, 0, 2, {"compiles": 1}, 600.0, None, records=board, silent_after=0.5
    )
    t.join()
    assert out is not None and out["missing"] == [] and out["ranks"]["1"]["compiles"] == 1


@pytest.mark.parametrize("bad", ["a directory", "a NUL"])
def test_a_report_path_that_cannot_be_written_leaves_nothing_and_raises_nothing(
    tmp_path: Path, store: Any, bad: str
) -> None:
    (tmp_path / "report.json").mkdir()
    path = str(tmp_path / "report.json") + ("\0x" if bad == "a NUL" else "")
    out = report.publish_and_collect(store, 3, 0, 1, {"compiles": 1}, 1.0, path)
    assert out is not None
    # No temporary file left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
