"""Names of compiled code (``dynamo/names.py``): the class and forward users wrote, its place."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from dynamo_dist.dynamo import hook, names


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.seen: list[str | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _record(self)
        return self.lin(x)


@torch._dynamo.disable  # run as dynamo_dist runs it: outside any trace
def _record(block: Block) -> None:
    """What dynamo_dist finds at a first call made from the parent's forward."""
    block.seen.append(names.find_place(block._call_impl))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): Block() for i in range(3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return x


def _site(cls: type) -> str:
    code = cls.forward.__code__
    where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return f"{cls.__qualname__}.forward ({where})"


def test_a_module_is_named_by_its_class_and_forward_however_it_is_handed_over() -> None:
    block = Block()
    compiled = torch.compile(block, backend="eager")
    # nn.Module.compile() hands torch.compile the bound Module._call_impl.
    for fn in (block, block._call_impl, block._wrapped_call_impl, block.__call__, compiled):
        assert names.describe_callable(fn) == _site(Block), fn


def test_wrappers_are_named_after_the_module_they_wrap() -> None:
    model = Model()
    assert names.describe_callable(nn.DataParallel(model)) == f"{_site(Model)} in DataParallel"
    wrapped = checkpoint_wrapper(Block())
    assert names.describe_callable(wrapped._call_impl) == f"{_site(Block)} in CheckpointWrapper"


def test_functions_and_methods_keep_their_own_names() -> None:
    def step(x: torch.Tensor) -> torch.Tensor:
        return x

    line = step.__code__.co_firstlineno
    expected = f"{step.__qualname__} (test_names.py:{line})"
    assert names.describe_callable(step) == expected
    assert names.describe_callable(Block().forward) == _site(Block)


def test_the_place_is_found_from_the_parents_call() -> None:
    model = Model()
    model.layers["1"] = checkpoint_wrapper(model.layers["1"])
    model.layers.register_module("2", torch.compile(model.layers["2"], backend="eager"))
    wrapped: Any = nn.DataParallel(model)
    wrapped(torch.randn(1, 2))
    # Wrappers' own attributes (module, _checkpoint_wrapped_module, _orig_mod) are left out.
    blocks = [model.layers["0"], model.layers["1"].get_submodule("_checkpoint_wrapped_module")]
    blocks.append(model.layers["2"].get_submodule("_orig_mod"))
    assert [b.seen for b in blocks] == [["layers.0"], ["layers.1"], ["layers.2"]]


def test_no_place_outside_a_parents_call() -> None:
    model = Model()
    assert names.find_place(model.layers["0"]) is None  # no module call on the stack
    assert names.find_place(model) is None
    assert names.find_place(lambda x: x) is None
    assert names.describe_callable(model.layers["0"], "layers.0") == f"{_site(Block)} at layers.0"


def test_the_region_label_is_the_name_with_its_compile_number() -> None:
    region = hook.register_region(f"{_site(Block)} at layers.3", "names-test")
    label = hook.region_label(region)
    assert label == f"{_site(Block)} at layers.3 [compile #1 of group names-test]"
