"""``built`` without a shared cache: the graphs the backend built, counted per region.

Without a cache directory nothing counted builds, so the report's ``built`` read ``-``
although the backend compiled every graph. Real ranks, gloo, the eager backend: a
function at two static shapes (a recompile), one with a graph break (two graphs), and
one under the switch first called inside ``local()`` (rank-0 evaluation before the
first step: built before its group is joined), checked against Dynamo's own count of
the graphs it handed to the backend.
"""

from __future__ import annotations

from typing import Any

import pytest
import ranks
import torch

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

HERE = __file__


def scaled(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0)


def broken(x: torch.Tensor) -> torch.Tensor:
    y = x.relu()
    torch._dynamo.graph_break()
    return y + 1


def evaluated(x: torch.Tensor) -> torch.Tensor:
    return x.cos() * 3


def no_cache_job(rank: int, world: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    import dynamo_dist

    f = dynamo_dist.compile(scaled, backend="eager", dynamic=False)
    g = dynamo_dist.compile(broken, backend="eager")
    for n in (4, 4, 6):
        f(torch.ones(n, 3))
    g(torch.ones(4))
    with dynamo_dist.patch_torch_compile():
        h = torch.compile(evaluated, backend="eager", dynamic=False)
    with dynamo_dist.local():
        h(torch.ones(4))  # before the group is joined: built, counted for it
    h(torch.ones(6))
    return {"stats": dynamo_dist.stats(), "graphs": int(counters["stats"]["unique_graphs"])}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def shared_graph_job(rank: int, world: int) -> dict[str, Any]:
    """Blocks compiled each on its own (regional compilation) share one graph, whether
    attached to the group (counting their builds) or never (an evaluation copy only
    ever called inside local(), still pending)."""
    from torch._dynamo.utils import counters

    import dynamo_dist

    train, evaluation = [Block() for _ in range(3)], [Block() for _ in range(3)]
    with dynamo_dist.patch_torch_compile():
        for b in train + evaluation:
            b.compile(backend="eager", fullgraph=True)
    x = torch.ones(2, 4)
    with torch.no_grad():
        for b in train:
            x = b(x)
        with dynamo_dist.local():
            for b in evaluation:
                x = b(x)
    return {"stats": dynamo_dist.stats(), "graphs": int(counters["stats"]["unique_graphs"])}


def test_attached_and_pending_blocks_share_one_graph(tmp_path) -> None:
    run = ranks.launch(HERE, "shared_graph_job", tmp=tmp_path, env={}, timeout=240)
    assert run.returncode == 0, run.output[-4000:]
    for r in (0, 1):
        assert run.rank(r)["graphs"] == 1, run.rank(r)
        assert run.rank(r)["stats"]["graphs_built"] == 1, run.rank(r)


def test_built_counts_the_backends_graphs_without_a_cache(tmp_path) -> None:
    run = ranks.launch(HERE, "no_cache_job", tmp=tmp_path, env={}, timeout=240)
    assert run.returncode == 0, run.output[-4000:]
    for r in (0, 1):
        s, graphs = run.rank(r)["stats"], run.rank(r)["graphs"]
        assert "cache_publishes" not in s, s  # no shared cache here
        assert graphs == 6, graphs  # scaled twice, broken's two graphs, evaluated twice
        assert s["graphs_built"] == graphs, s
        built = {label: g.get("built", 0) for label, g in s["regions"].items()}
        assert sorted(built.values()) == [1, 1, 2, 2], built
        assert any("scaled" in label for label in built) and any(
            "broken" in label for label in built
        )


if __name__ == "__main__":
    ranks.main(globals())
