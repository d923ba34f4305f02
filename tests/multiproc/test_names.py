"""Compiled modules are named by the class and forward users wrote, on 2 real ranks (issue 31).

``nn.Module.compile()`` hands torch.compile the bound ``Module._call_impl``; without the
naming, every block of a model read ``Module._call_impl (module.py:1782)`` in errors,
``cache ls`` and the structured trace.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, error_result, result
from torch import nn

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]

HERE = __file__
SWITCH = {"DYNAMO_DIST_ALL_COMPILES": "1"}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): _Block() for i in range(2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return x


def _forward_line(cls: type) -> str:
    """``Class.forward (test_names.py:N)``: the name a compiled ``cls`` must be shown by."""
    code = cls.forward.__code__
    where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return f"{cls.__qualname__}.forward ({where})"


# -- rank programs ---------------------------------------------------------------------
def strict_miss(rank: int, world: int, how: str) -> dict[str, Any]:
    """Rank 1's shorter batch at step 2 misses a guard; policy strict makes that an error.

    ``how``: ``module_compile`` (``block.compile()`` under the switch: torchtitan's), or
    ``compile`` (``dynamo_dist.compile(block)``), or ``ddp`` (``dynamo_dist.compile(DDP(model))``).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = _Stack()
    cb = CountingBackend()
    run: Any = model
    if how == "module_compile":
        model.layers["1"].compile(backend=cb)
    elif how == "compile":
        model.layers["1"] = dynamo_dist.compile(model.layers["1"], backend=cb, policy="strict")
    else:
        run = dynamo_dist.compile(DDP(model), backend=cb, policy="strict")
    try:
        for step in range(4):
            n = 3 if (rank == 1 and step == 2) else 2
            run(torch.randn(n, 4))
    except dynamo_dist.RankDivergenceError as e:
        return error_result(cb, e)
    return result(cb, True)


def cached_blocks(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """Every block compiled with ``block.compile()`` under the switch, with a shared cache."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"rank{rank}")
    torch.manual_seed(0)
    model = _Stack()
    for block in model.layers.values():
        block.compile()
    x = torch.randn(2, 4)
    ok = bool(torch.allclose(model(x), model.layers["1"].forward(model.layers["0"].forward(x))))
    return {"ok": ok, "stats": dynamo_dist.stats()}


# -- tests -----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["module_compile", "compile", "ddp"])
def test_an_error_names_the_module_class_and_forward(tmp_path, how):
    env = {**SWITCH, "DYNAMO_DIST_POLICY": "strict"} if how == "module_compile" else None
    run = ranks.launch(HERE, "strict_miss", how, tmp=tmp_path, env=env, timeout=300)
    block, stack = _forward_line(_Block), _forward_line(_Stack)
    expected = {
        # The first call comes from the parent's forward: its place in the model is known.
        "module_compile": f"{block} at layers.1 [compile #1 of group",
        # Compiled in a running job, from no module's call: the place is not known.
        "compile": f"{block} [compile #1 of group",
        "ddp": f"{stack} in DistributedDataParallel [compile #1 of group",
    }[how]
    for r in (0, 1):
        res = run.rank(r)
        assert res["error"] == "RankDivergenceError", res
        assert expected in res["message"], res["message"]
        assert "of Module._call_impl" not in res["message"], res["message"]


@pytest.mark.inductor
def test_cache_ls_names_each_block_by_its_class_and_place(tmp_path):
    cache = tmp_path / "cache"
    env = {**SWITCH, "DYNAMO_DIST_CACHE_DIR": str(cache)}
    run = ranks.launch(
        HERE, "cached_blocks", str(tmp_path / "local"), tmp=tmp_path, env=env, timeout=360
    )
    assert all(run.rank(r)["ok"] for r in (0, 1)), run.output[-4000:]
    listed = ranks.cli("ls", str(cache))
    assert listed.returncode == 0, listed
    # The blocks share one graph (one class, one forward): the first block compiled it.
    assert re.search(re.escape(f"{_forward_line(_Block)} at layers.0"), listed.stdout), (
        listed.stdout
    )
    assert "_call_impl" not in listed.stdout, listed.stdout


if __name__ == "__main__":
    ranks.main(globals())
