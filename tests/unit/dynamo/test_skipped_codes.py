"""``callback.SkippedCodes``: which code objects share one of Dynamo's decisions."""

from __future__ import annotations

from typing import Any

from dynamo_dist.dynamo import compat
from dynamo_dist.dynamo.callback import SkippedCodes

SOURCE = """
size_of, sine_of = (lambda t: t.size()), (lambda t: t.sin())
zero, one = (lambda: 0), (lambda: 1)
def outer():
    return lambda t: t.size()
def outer2():
    return lambda t: t.sin()
"""


def _codes() -> dict[str, Any]:
    """The functions of SOURCE, compiled anew (new code objects) on each call."""
    space: dict[str, Any] = {}
    exec(compile(SOURCE, "model.py", "exec"), space)
    return {k: v.__code__ for k, v in space.items() if callable(v)}


def test_distinct_code_never_shares_a_decision() -> None:
    """Same file, line, qualified name and bytecode, other names, constants or nested code."""
    codes = _codes()
    line = codes["outer2"].co_firstlineno  # only the nested code differs:
    outer = codes["outer"].replace(co_name="outer2", co_qualname="outer2", co_firstlineno=line)
    skipped = SkippedCodes()
    for name in ("size_of", "zero"):
        skipped.record(codes[name], compat.skip_code(compat.skip_recursively()))
    skipped.record(outer, compat.skip_code(compat.skip_recursively()))
    assert skipped.decided(codes["size_of"]) is not None
    assert skipped.decided(codes["sine_of"]) is None  # co_names
    assert skipped.decided(codes["one"]) is None  # co_consts
    assert skipped.decided(codes["outer2"]) is None  # the nested lambda's code


def test_the_same_code_rebuilt_keeps_its_decision() -> None:
    """What a reset rank rebuilds (a graph break's resume functions) is new, equal code."""
    skipped = SkippedCodes()
    skipped.record(_codes()["size_of"], compat.skip_code(compat.skip_recursively()))
    again = _codes()["size_of"]
    assert skipped.decided(again) == compat.skip_recursively()
