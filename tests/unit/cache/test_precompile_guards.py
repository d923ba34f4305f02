"""The precompiled route's guard policy and artifact format, without compiling anything.

Which guards the filter drops (only torch's own globals), how a dropped guard is found
again by name at load (never evaluated as code), and what a damaged artifact file gives.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from dynamo_dist.cache import artifact as pa
from dynamo_dist.cache import artifact_file as af

USER_SCALE = 3


def _user_fn(t: torch.Tensor) -> torch.Tensor:
    return t


class _Source:
    def __init__(self, global_name: str | None = None, base: Any = None) -> None:
        self.global_name = global_name
        self.base = base


def _entry(name: str, value: Any, is_global: bool, root: str | None) -> Any:
    """A stand-in for Dynamo's GuardFilterEntry (the fields the filter reads)."""
    source = _Source(base=_Source(global_name=root)) if root else _Source()
    return types.SimpleNamespace(
        name=name,
        has_value=True,
        value=value,
        guard_type="ID_MATCH",
        derived_guard_types=(),
        is_global=is_global,
        orig_guard=types.SimpleNamespace(originating_source=source),
    )


def test_only_torch_globals_are_dropped_and_recorded() -> None:
    dropped: list[pa.GuardRecord] = []
    keep = pa.guard_filter(dropped)
    entries = [
        _entry("G['F'].gelu", F.gelu, True, "F"),  # torch's function: dropped
        _entry(
            "G['__import_torch_dot_nn_dot_modules_dot_linear']",
            None,
            True,
            "__import_torch_dot_nn_dot_modules_dot_linear",
        ),
        _entry("G['_user_fn']", _user_fn, True, "_user_fn"),  # the user's: kept
        _entry("G['USER_SCALE']", USER_SCALE, True, "USER_SCALE"),  # a constant: kept
        _entry("G['weights']", torch.ones(2), True, "weights"),  # a tensor global: kept
        _entry("G['layer']", torch.nn.Linear(2, 2), True, "layer"),  # a module global: kept
        _entry("L['fn']", F.relu, False, None),  # a local, even torch's: kept
    ]
    assert keep(entries) == [False, False, True, True, True, True, True]
    assert [r.name for r in dropped] == [
        "G['F'].gelu",
        "G['__import_torch_dot_nn_dot_modules_dot_linear']",
    ]
    assert dropped[0].identity[1:3] == ("torch._C._nn", "gelu")


def test_a_dropped_guard_is_checked_at_every_call_by_identity() -> None:
    """``ACT = torch.relu`` rebound to ``torch.tanh`` after the capture: a guard miss."""
    dropped: list[pa.GuardRecord] = []
    pa.guard_filter(dropped)([_entry("G['ACT']", torch.relu, True, "ACT")])
    assert [r.name for r in dropped] == ["G['ACT']"]
    scope: dict[str, Any] = {"ACT": torch.relu}
    check, why = pa.dropped_check(dropped, scope)
    assert check is not None and why is None and check.ok()
    scope["ACT"] = torch.tanh
    assert not check.ok() and check.changed() is not None
    scope["ACT"] = torch.relu
    assert check.ok()
    del scope["ACT"]
    assert not check.ok()


def test_values_of_torch_types_are_kept() -> None:
    """A dtype (or any value) in a user global is not torch's code: never dropped."""
    dropped: list[pa.GuardRecord] = []
    keep = pa.guard_filter(dropped)
    assert keep([_entry("G['DT']", torch.float64, True, "DT")]) == [True]
    assert pa.identity(torch.float64) != pa.identity(torch.float32)


def test_a_dropped_guard_is_resolved_again_by_name() -> None:
    dropped: list[pa.GuardRecord] = []
    pa.guard_filter(dropped)([_entry("G['F'].gelu", F.gelu, True, "F")])
    assert pa.dropped_changed(dropped, {"F": F}) is None
    # The same name naming something else now (a monkeypatched torch function).
    patched = types.SimpleNamespace(gelu=lambda t: t)
    assert "was torch._C._nn.gelu" in (pa.dropped_changed(dropped, {"F": patched}) or "")
    assert "no longer resolves" in (pa.dropped_changed(dropped, {}) or "")


@pytest.mark.parametrize(
    "name",
    [
        "G['F'].gelu()",  # a call
        "G['F'].__class__.__subclasses__()",
        "G['F'] + 1",
        "__import__('os').system('true')",
        "G['F'][0:1]",
    ],
)
def test_a_name_is_never_evaluated(name: str) -> None:
    record = pa.GuardRecord(name, "ID_MATCH", ("function", "x", "y", ""))
    why = pa.dropped_changed([record], {"F": F})
    assert why is not None and "no longer resolves" in why


def test_aliases_resolve_only_to_torch_modules() -> None:
    import torch.nn.modules.linear as linear

    ok = pa.GuardRecord(
        "G['__import_torch_dot_nn_dot_modules_dot_linear']",
        "MODULE_MATCH",
        pa.identity(linear),
    )
    assert pa.dropped_changed([ok], {}) is None
    other = pa.GuardRecord("G['__import_os']", "MODULE_MATCH", ("module", "os"))
    assert "not torch's" in (pa.dropped_changed([other], {}) or "")


def test_artifact_file_roundtrip_and_damage() -> None:
    blob = af.encode({"a": 1}, b"payload")
    assert af.decode(blob) == ({"a": 1}, b"payload")
    for bad in (b"", b"nope", blob[:10], af._MAGIC + (10**9).to_bytes(8, "little") + b"{}"):
        with pytest.raises(ValueError):
            af.decode(bad)
    art, failed = pa.load(b"garbage", {})
    assert art is None and failed is not None and failed.reason == pa.PACKAGE_ERROR
    # A recorded failure is given back as such, without loading anything.
    art, failed = pa.load(af.encode({"failed": pa.GRAPH_BREAK, "detail": "d"}), {})
    assert art is None and failed == pa.Failed(pa.GRAPH_BREAK, "d")
    # Another torch's artifact is not used.
    art, failed = pa.load(af.encode({"torch": "0.0", "sources": [], "dropped": []}), {})
    assert failed is not None and failed.reason == pa.TORCH_CHANGED


def test_a_source_change_is_found() -> None:
    from dynamo_dist.cache import artifact as mod
    from dynamo_dist.dynamo import artifacts

    first, last = 1, 5
    checksum = artifacts.hash_sourcelines(mod, first, last)
    assert pa.sources_changed([(mod.__name__, first, last, checksum)]) is None
    assert "changed" in (pa.sources_changed([(mod.__name__, first, last, "0" * 8)]) or "")
    assert "not imported" in (pa.sources_changed([("no_such_module_x", 1, 2, "x")]) or "")
