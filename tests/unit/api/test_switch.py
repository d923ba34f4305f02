"""The torch.compile switch in one process (issue 16): coverage, undo, and the import hook.

Multi-rank behaviour (frameworks, decided at the first call) is in tests/test_frameworks.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dynamo_dist
from dynamo_dist import _switch

ORIGINAL = torch.compile


@pytest.fixture(autouse=True)
def _restore_torch_compile():
    assert torch.compile is ORIGINAL, "a test left torch.compile switched"
    yield
    while _switch.is_on():
        _switch._turn_off()
    torch.compile = ORIGINAL
    _switch._state.installed = None


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) * 2


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.sin() + 1


def test_every_form_of_torch_compile_goes_through_the_switch_and_runs_as_plain_in_one_process():
    x = torch.randn(4, 3)
    net = _Net()
    expect = net(x)
    with dynamo_dist.patch_torch_compile():
        assert torch.compile is not ORIGINAL and torch.compile.__wrapped__ is ORIGINAL
        as_function = torch.compile(_f, backend="eager")
        as_module = torch.compile(net, backend="eager")

        @torch.compile
        def bare(x: torch.Tensor) -> torch.Tensor:
            return x * 3

        @torch.compile(backend="eager", dynamic=False)
        def with_args(x: torch.Tensor) -> torch.Tensor:
            return x - 1

        by_method = _Net()
        by_method.load_state_dict(net.state_dict())
        by_method.compile(backend="eager")
    assert torch.compile is ORIGINAL  # the context manager undid it

    # torch's own objects: an OptimizedModule, with the original module's state dict keys
    assert isinstance(as_module, torch._dynamo.eval_frame.OptimizedModule)
    assert list(as_module.state_dict()) == [f"_orig_mod.{k}" for k in net.state_dict()]
    ctx = as_module.dynamo_ctx
    assert any(getattr(h, "__self__", None) is not None for h in ctx.enter_exit_hooks)

    torch.testing.assert_close(as_function(x), _f(x))
    torch.testing.assert_close(as_module(x), expect)
    torch.testing.assert_close(bare(x), x * 3)
    torch.testing.assert_close(with_args(x), x - 1)
    torch.testing.assert_close(by_method(x), expect)
    # A single process decided "plain" at the first call: our hooks are gone, and the
    # context is left as plain torch.compile builds it.
    plain_ctx = ORIGINAL(_Net(), backend="eager").dynamo_ctx
    assert len(ctx.enter_exit_hooks) == len(plain_ctx.enter_exit_hooks)
    assert not any(getattr(h, "__self__", None) is not None for h in ctx.enter_exit_hooks)
    assert dynamo_dist.stats()["world_size"] == 1


def test_disable_and_dynamo_dists_own_compiles_pass_straight_through():
    net = _Net()
    with dynamo_dist.patch_torch_compile():
        assert torch.compile(net, disable=True) is net
        # dynamo_dist.compile calls torch.compile itself: adopted once, not twice.
        compiled = dynamo_dist.compile(net, backend="eager")
    hooks = compiled.dynamo_ctx.enter_exit_hooks
    owners = {id(h.__self__) for h in hooks if getattr(h, "__self__", None) is not None}
    assert len(owners) == 1, hooks  # one adoption (dynamo_dist.compile's), not a second


def test_undo_restores_when_outermost_and_passes_through_under_another_wrapper():
    first = dynamo_dist.patch_torch_compile()
    ours = torch.compile
    again = dynamo_dist.patch_torch_compile()  # already on: owns nothing
    again.undo()
    assert torch.compile is ours and _switch.is_on()

    calls: list[str] = []

    def theirs(*args, **kwargs):  # another library's wrapper, outside ours
        calls.append("theirs")
        return ours(*args, **kwargs)

    theirs.__wrapped__ = ours  # type: ignore[attr-defined]
    torch.compile = theirs
    first.undo()
    assert torch.compile is theirs, "ours was not the outermost wrapper: theirs stays"
    assert not _switch.is_on()
    compiled = torch.compile(_Net(), backend="eager")
    assert calls == ["theirs"]
    # Pass-through: exactly torch's, no adoption.
    assert not any(
        getattr(h, "__self__", None) is not None for h in compiled.dynamo_ctx.enter_exit_hooks
    )

    # On again: ours is still in their chain, so it is switched back on, not wrapped twice.
    patch = dynamo_dist.patch_torch_compile()
    assert torch.compile is theirs and _switch.is_on()
    compiled = torch.compile(_Net(), backend="eager")
    adopted = [h for h in compiled.dynamo_ctx.enter_exit_hooks if getattr(h, "__self__", None)]
    assert len(adopted) == 2  # our first and last hook, once
    patch.undo()
    torch.compile = ORIGINAL


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.lin(x))


def _unique_graphs(make) -> int:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layers = [make(_Block()) for _ in range(12)]  # more than the recompile limit (8)
    h = torch.randn(2, 8)
    with torch.no_grad():
        for layer in layers:
            h = layer(h)
    return int(counters["stats"]["unique_graphs"])


def test_per_block_compiles_share_one_graph_under_the_switch():
    # torchtitan's apply_compile: every block compiled on its own, fullgraph. Plain
    # torch.compile compiles one graph for all of them (equal backends share entries).
    assert _unique_graphs(lambda b: ORIGINAL(b, backend="eager", fullgraph=True)) == 1
    with dynamo_dist.patch_torch_compile():
        assert _unique_graphs(lambda b: torch.compile(b, backend="eager", fullgraph=True)) == 1


@pytest.mark.inductor
@pytest.mark.parametrize("precompile", [True, False], ids=["precompiled", "graphs"])
def test_per_block_compiles_share_one_graph_through_the_shared_cache(tmp_path, precompile):
    cache = str(tmp_path / "cache")
    before = dynamo_dist.stats()

    def make(block: torch.nn.Module) -> torch.nn.Module:
        return dynamo_dist.compile(
            block,
            fullgraph=True,
            config=dynamo_dist.Config(cache_dir=cache, precompile=precompile),
        )

    graphs = _unique_graphs(make)
    if not precompile:
        assert graphs == 1
        return
    # One artifact, obtained once, runs all 12 blocks: Dynamo traced the block once, for
    # the capture (none where it was loaded: this host may keep a copy of an earlier run).
    after = dynamo_dist.stats()
    got = [after[k] - before.get(k, 0) for k in ("precompiled_captures", "precompiled_loads")]
    assert sum(got) == 1, got
    assert graphs == got[0]
    assert after["precompiled_calls"] - before.get("precompiled_calls", 0) == 12


def test_a_reference_taken_while_on_passes_through_after_undo():
    with dynamo_dist.patch_torch_compile():
        saved = torch.compile  # `from torch import compile` in a module imported here
        decorator = torch.compile(backend="eager")
    x = torch.randn(3)
    torch.testing.assert_close(saved(_f, backend="eager")(x), _f(x))
    torch.testing.assert_close(decorator(_f)(x), _f(x))


def test_a_wrapper_without_wrapped_gets_ours_on_top_when_switched_on_again():
    real = torch.compile
    patch = dynamo_dist.patch_torch_compile()
    ours = torch.compile

    def theirs(model=None, **kwargs):  # captured ours; no __wrapped__ to follow
        return ours(model, **kwargs)

    torch.compile = theirs
    patch.undo()
    assert torch.compile is theirs
    dynamo_dist.patch_torch_compile()
    assert torch.compile is not theirs and torch.compile.__wrapped__ is theirs
    compiled = torch.compile(_Net(), backend="eager")
    adopted = [h for h in compiled.dynamo_ctx.enter_exit_hooks if getattr(h, "__self__", None)]
    assert len(adopted) == 2, "adopted once: the inner copy of ours passed through"
    _switch._turn_off()
    assert torch.compile is theirs
    torch.compile = real


def test_switched_modules_copy_and_pickle_like_torchs():
    import copy
    import io
    import pickle

    x = torch.randn(4, 3)
    with dynamo_dist.patch_torch_compile():
        fresh = torch.compile(_Net(), backend="eager")
        called = torch.compile(_Net(), backend="eager")
    called(x)
    for compiled in (fresh, called):
        expect = compiled(x)
        torch.testing.assert_close(copy.deepcopy(compiled)(x), expect)
        torch.testing.assert_close(pickle.loads(pickle.dumps(compiled))(x), expect)
        buf = io.BytesIO()
        torch.save(compiled, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), expect)


def test_compiles_from_several_threads_leave_dynamo_unpatched():
    import threading

    import torch._dynamo as dynamo

    before = dynamo.optimize

    def work() -> None:
        for i in range(100):
            torch.compile(lambda a, i=i: a + i, backend="eager")

    with dynamo_dist.patch_torch_compile():
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert dynamo.optimize is before
    plain = dynamo.optimize("eager")
    assert not any(getattr(h, "__self__", None) for h in plain.enter_exit_hooks)


def test_set_default_group_rejects_what_is_not_a_group():
    with pytest.raises(TypeError, match="ProcessGroup or a DeviceMesh; got str"):
        dynamo_dist.set_default_group("world")
    dynamo_dist.set_default_group(None)


# -- the import hook, in fresh interpreters ----------------------------------------------
PROBE = textwrap.dedent(
    """
    import importlib.resources, json, sys
    early = {m: m in sys.modules for m in ("torch", "dynamo_dist", "_dynamo_dist_switch")}
    import torch
    # torch's own loader stays on the module (resources and pkgutil read it)
    assert importlib.resources.files("torch").joinpath("version.py").read_text()
    print(json.dumps({"early": early,
                      "switched": bool(getattr(torch.compile, "__dynamo_dist_switch__", False))}))
    """
)


def _probe(env: dict[str, str], tmp: Path) -> dict[str, object]:
    import json

    base = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMO_DIST_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, **env},
        cwd=tmp,  # not the source tree: what is installed is what runs
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_import_hook_is_inert_without_the_variable(tmp_path):
    out = _probe({}, tmp_path)
    assert out["early"] == {"torch": False, "dynamo_dist": False, "_dynamo_dist_switch": False}
    assert out["switched"] is False
    out = _probe({"DYNAMO_DIST_ALL_COMPILES": "false"}, tmp_path)  # what the launcher exports
    assert out["switched"] is False and out["early"]["torch"] is False


def test_import_hook_switches_torch_compile_when_torch_is_imported(tmp_path):
    out = _probe({"DYNAMO_DIST_ALL_COMPILES": "1"}, tmp_path)
    # The hook itself imported neither torch nor dynamo_dist at interpreter start.
    assert out["early"] == {"torch": False, "dynamo_dist": False, "_dynamo_dist_switch": True}
    assert out["switched"] is True


def test_import_hook_reads_the_profile_and_reports_a_bad_value_without_breaking_torch(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("all_compiles = true\n")
    assert _probe({"DYNAMO_DIST_CONFIG": str(profile)}, tmp_path)["switched"] is True
    out = _probe({"DYNAMO_DIST_ALL_COMPILES": "maybe"}, tmp_path)
    assert out["switched"] is False
    assert "DYNAMO_DIST_ALL_COMPILES" in str(out["stderr"]) and "maybe" in str(out["stderr"])
    assert "switch stays off" in str(out["stderr"])


def test_launcher_flag_turns_the_switch_on_for_the_workers():
    from dynamo_dist import _config
    from dynamo_dist.tools import launch as tools_launch

    args = tools_launch.parser().parse_args(["--all-compiles", "--nproc-per-node=2", "train.py"])
    cfg = tools_launch.resolve(args)
    assert cfg.all_compiles is True
    assert _config.to_env(cfg)["DYNAMO_DIST_ALL_COMPILES"] == "true"
    cfg = tools_launch.resolve(tools_launch.parser().parse_args(["train.py"]))
    assert cfg.all_compiles is False
