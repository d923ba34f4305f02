"""Single-process tests of the C++ hook, its installation, and dynamo_dist.compile."""

from __future__ import annotations
import __future__

import types
from typing import Any

import pytest
import ranks
import torch
from torch._C._dynamo.eval_frame import set_guard_complete_hook

import dynamo_dist
from dynamo_dist import _C
from dynamo_dist.dynamo import hook as dynamo_hook


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    _C.set_pending_error(None)
    torch._dynamo.reset()


class Counter:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_extension_is_native():
    assert _C.__file__.endswith(".so")
    hook = _C.GuardHook(lambda hit, ident: hit)
    assert type(hook).__module__ == "dynamo_dist._C"
    assert hook.counters() == {
        "evaluations": 0,
        "local_misses": 0,
        "forced_recompiles": 0,
        "hook_exchanges": 0,
    }


def test_install_is_reversible_and_idempotent():
    previous = lambda hit: hit  # noqa: E731
    set_guard_complete_hook(previous)
    try:
        hook = _C.GuardHook(lambda hit, ident: hit)
        assert dynamo_hook.install(hook) is previous
        assert dynamo_hook.current_hook() is hook
        assert dynamo_hook.install(hook) is None  # idempotent: already ours
        dynamo_hook.uninstall(hook, previous)
        assert dynamo_hook.current_hook() is previous
        dynamo_hook.uninstall(hook, previous)  # idempotent
        assert dynamo_hook.current_hook() is previous
    finally:
        set_guard_complete_hook(None)


def test_uninstall_keeps_a_hook_installed_after_ours():
    hook = _C.GuardHook(lambda hit, ident: hit)
    later = lambda hit: hit  # noqa: E731
    prev = dynamo_hook.install(hook)
    set_guard_complete_hook(later)
    dynamo_hook.uninstall(hook, prev)
    assert dynamo_hook.current_hook() is later
    set_guard_complete_hook(None)


def _in_region(fn, region: int = 1):
    exit_region = _C.RegionEnter(region)()
    try:
        return fn()
    finally:
        exit_region()


def test_hook_verdict_forces_recompile_inside_a_region():
    calls: list[tuple[bool, int]] = []

    def exchange(hit: bool, ident: int) -> bool:
        calls.append((hit, ident))
        return False  # another rank "missed"

    cb = Counter()
    f = torch.compile(lambda x: x + 1, backend=cb)
    x = torch.ones(3)
    hook = _C.GuardHook(exchange)
    with ranks.hook_installed(hook):
        f(x)  # first compile: no entries yet, the hook is not called
        _in_region(lambda: f(x))
    assert cb.graphs == 2
    assert calls and calls[0][0] is True
    assert hook.counters()["forced_recompiles"] == 1


def test_hook_passes_through_outside_regions():
    hook = _C.GuardHook(lambda hit, ident: False)
    cb = Counter()
    f = torch.compile(lambda x: x * 2, backend=cb)
    with ranks.hook_installed(hook):
        for _ in range(3):
            f(torch.ones(2))
    assert cb.graphs == 1
    assert hook.counters()["evaluations"] == 2
    assert hook.counters()["hook_exchanges"] == 0


def test_exchange_error_never_aborts_and_reaches_the_user():
    class Boom(RuntimeError):
        pass

    def exchange(hit: bool, ident: int) -> bool:
        raise Boom("exchange failed")

    f = torch.compile(lambda x: x - 1, backend="eager")
    hook = _C.GuardHook(exchange)
    with ranks.hook_installed(hook):
        f(torch.ones(2))
        _in_region(lambda: f(torch.ones(2)))  # the hook keeps the error, Dynamo recompiles
        assert isinstance(_C.pending_error(), Boom)
        with pytest.raises(Boom):
            _in_region(lambda: f(torch.ones(2)))


def test_identity_depends_on_region_and_call_site():
    @dynamo_hook.transparent
    def probe() -> int:
        return dynamo_hook.identity()

    a = _in_region(probe, region=1)
    b = _in_region(probe, region=2)
    assert a != b
    assert 0 <= a < 2**62
    assert _in_region(probe, region=1) == a
    assert "called from" in dynamo_hook.describe_identity(a)


def test_single_process_compile_matches_torch_compile():
    def fn(x, y):
        return torch.sin(x) @ y + 1

    x, y = torch.randn(4, 5), torch.randn(5, 3)
    got = dynamo_dist.compile(fn, backend="eager")(x, y)
    want = torch.compile(fn, backend="eager")(x, y)
    torch.testing.assert_close(got, want)
    assert dynamo_dist.stats()["installed"] is False


def test_single_process_module_and_decorator():
    model = torch.nn.Linear(3, 2)
    cm = dynamo_dist.compile(model, backend="aot_eager")
    x = torch.randn(5, 3)
    torch.testing.assert_close(cm(x), model(x))
    assert type(cm).__name__ == "OptimizedModule"

    @dynamo_dist.compile(backend="eager")
    def double(t):
        return t * 2

    torch.testing.assert_close(double(x), x * 2)


@pytest.mark.inductor
def test_single_process_inductor():
    def fn(x):
        return torch.nn.functional.gelu(x) * 3

    x = torch.randn(16, 16)
    torch.testing.assert_close(dynamo_dist.compile(fn)(x), fn(x))


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"model": 3}, TypeError, ["model", "callable"]),
        ({"policy": "sometimes"}, ValueError, ["policy", "sync", "strict", "warn", "off"]),
        ({"timeout": 0}, ValueError, ["timeout", "positive"]),
        ({"timeout": -5.0}, ValueError, ["timeout", "positive"]),
        ({"timeout": "10"}, ValueError, ["timeout"]),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    args = {"model": lambda x: x, **kwargs}
    model = args.pop("model")
    with pytest.raises(exc) as info:
        dynamo_dist.compile(model, **args)
    for w in words:
        assert w in str(info.value)


def test_public_api():
    """Exactly the documented names are public, each resolves, and nothing else leaks.

    The docstring of ``dynamo_dist`` promises that everything else is private, so an
    added or dropped name must be a deliberate change to this list.
    """
    public = {
        "CollectiveTimeoutError",
        "Config",
        "ConfigError",
        "DynamoDistError",
        "RankDivergenceError",
        "TorchCompilePatch",
        "__version__",
        "compile",
        "local",
        "patch_torch_compile",
        "set_default_group",
        "shutdown",
        "stats",
    }
    assert sorted(dynamo_dist.__all__) == sorted(public)
    for name in public:
        assert getattr(dynamo_dist, name) is not None, name
    exported = {
        n
        for n, v in vars(dynamo_dist).items()
        if not n.startswith("_") and not isinstance(v, (types.ModuleType, __future__._Feature))
    }
    assert exported == public - {"__version__"}, exported ^ (public - {"__version__"})
    assert dynamo_dist.compile.__module__ == "dynamo_dist._api"
    assert issubclass(dynamo_dist.CollectiveTimeoutError, TimeoutError)
    for err in ("CollectiveTimeoutError", "ConfigError", "RankDivergenceError"):
        assert issubclass(getattr(dynamo_dist, err), dynamo_dist.DynamoDistError), err


def test_the_callee_probe_exists_wherever_the_package_installs():
    """The hook reads the pending callee through CPython 3.11-3.13's frame layout; a build
    without the probe would leave the callee out of every identity (consistent, but blind
    to resume functions). ``requires-python`` stops where the probe stops."""
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    cap = re.search(r'requires-python = ">=3\.11,<3\.(\d+)"', (root / "pyproject.toml").read_text())
    probe = re.search(r"PY_VERSION_HEX < 0x030(\w)0000", (root / "csrc/guard_hook.cpp").read_text())
    assert cap and probe and int(cap.group(1)) == int(probe.group(1), 16)
    assert _C.HAS_CALLEE_PROBE is (sys.version_info < (3, int(cap.group(1))))


def test_transparent_frames_leave_the_identity_unchanged():
    """One more frame of ours between the caller and the exchange changes nothing."""

    @dynamo_hook.transparent
    def wrapper() -> int:
        return dynamo_hook.identity()

    @dynamo_hook.transparent
    def wrapper_of_wrapper() -> int:
        return wrapper()

    def site(via: Any) -> int:
        return int(via())  # the one call site both identities name

    assert site(wrapper) == site(wrapper_of_wrapper)
    assert site(wrapper) != wrapper()  # another caller: another identity
