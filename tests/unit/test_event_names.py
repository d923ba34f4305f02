"""Every event the package emits is listed in ``EVENTS``, and every listed one reaches the trace.

The call sites are read from the package's syntax trees: ``emit("name", ...)``, and the
emit helpers that build the name from their first argument (``emit_precompiled("load")``
emits ``precompiled_load``). A child process with ``TORCH_TRACE`` set then emits each
listed event through the real path, and the trace file (what tlparse reads) must hold
every one of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_dist.dynamo.events import EVENTS

PKG = Path(__file__).resolve().parents[2] / "dynamo_dist"


def _emit_name(call: ast.Call) -> ast.expr | None:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    return call.args[0] if name == "emit" and call.args else None


def emitted_names() -> set[str]:
    """Every event name the package can emit, from its call sites."""
    trees = [ast.parse(p.read_text()) for p in PKG.rglob("*.py")]
    names: set[str] = set()
    helpers: dict[str, str] = {}  # helper function -> the prefix before its first parameter
    for tree in trees:
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for call in ast.walk(fn):
                arg = _emit_name(call) if isinstance(call, ast.Call) else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    head, tail = arg.values[0], arg.values[-1]
                    assert isinstance(head, ast.Constant) and isinstance(tail, ast.FormattedValue)
                    assert isinstance(tail.value, ast.Name)
                    assert tail.value.id == fn.args.args[0].arg, ast.unparse(call)
                    helpers[fn.name] = str(head.value)
                elif arg is not None:
                    raise AssertionError(f"event name not readable: {ast.unparse(call)}")
    for tree in trees:
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                prefix = helpers.get(call.func.id)
                if prefix is not None and call.args:
                    arg = call.args[0]
                    assert isinstance(arg, ast.Constant), ast.unparse(call)
                    names.add(prefix + str(arg.value))
    return names


def test_every_emitted_event_is_listed_and_every_listed_one_is_emitted() -> None:
    emitted = emitted_names()
    assert emitted - set(EVENTS) == set(), "emitted but missing from EVENTS"
    assert set(EVENTS) - emitted == set(), "listed in EVENTS but never emitted"
    assert len(EVENTS) == len(set(EVENTS))


def test_an_unlisted_event_is_not_emitted(caplog: pytest.LogCaptureFixture) -> None:
    from dynamo_dist.dynamo import events

    events.emit("no_such_event", x=1)
    assert "not in dynamo_dist's EVENTS" in caplog.text


CHILD = """
import json, sys
import torch
from dynamo_dist.dynamo import events
for name in json.loads(sys.argv[1]):
    events.emit(name, probe=name)
print(json.dumps(dict(torch._dynamo.utils.counters["dynamo_dist"])))
"""


@pytest.mark.timeout(120)
def test_each_listed_event_reaches_the_trace_and_the_counters(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    env = {"TORCH_TRACE": str(trace), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(PKG.parent)}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(list(EVENTS))],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    counters = json.loads(run.stdout.strip().splitlines()[-1])
    text = "".join(p.read_text(errors="replace") for p in trace.glob("*"))
    for name in EVENTS:
        assert f"dynamo_dist_{name}" in text, name
        assert counters.get(name) == 1, (name, counters)
