"""Fuzzing precompiled artifacts, host copies, profiles and store payloads (issue 30, item 4).

The cases are ``fuzz_cases.py``'s: every target (entries, artifact files, host-local
copies, automatic-dynamic profiles, store payloads) mutated as written and mutated then
re-signed with the real secret. Each must end as a refusal or be handled: no crash, no
hang, nothing unverified loaded. Here 150 cases, as many as ``test_metadata_fuzz.py`` runs
(``DYNAMO_DIST_FUZZ_CACHE_CASES`` per target and variant, 15 by default;
``DYNAMO_DIST_FUZZ_SEED``); ten thousand with ``benchmarks/fuzz_cache.py --cases 10000
--seed N``. A failure names the command that replays its case.

Below them, one regression test per bug the fuzzing found: each failed before its fix.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fuzz_cases as fc
import pytest

from dynamo_dist.cache import artifact
from dynamo_dist.cache.artifact_file import decode
from dynamo_dist.dist import store as dist_store
from dynamo_dist.exchange import status
from dynamo_dist.tools import report

SEED = int(os.environ.get("DYNAMO_DIST_FUZZ_SEED", "30004"))
CASES = int(os.environ.get("DYNAMO_DIST_FUZZ_CACHE_CASES", "15"))


@pytest.fixture(scope="module")
def templates() -> Iterator[None]:
    fc.templates()
    try:
        yield
    finally:
        fc.cleanup_templates()


@pytest.mark.parametrize("variant", fc.VARIANTS)
@pytest.mark.parametrize("target", fc.TARGETS)
def test_fuzzed_inputs_are_refused_or_handled(
    tmp_path: Path, templates: None, target: str, variant: str
) -> None:
    seen: collections.Counter[str] = collections.Counter()
    failures = []
    for i in range(CASES):
        r = fc.run_case(target, variant, SEED, i, tmp_path)
        seen[r.status] += 1
        if r.status in fc.FAILURES:
            failures.append(
                f"{r.status}: {r.detail}\n  steps: {r.steps}\n  replay: python "
                f"benchmarks/fuzz_cache.py --seed {SEED} --case {target}:{variant}:{i}"
            )
    assert not failures, "\n".join(failures)
    assert seen["refused"] > 0, seen  # the mutations reach the refusals


# -- regressions ---------------------------------------------------------------------------
def _deeper(n: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` called ``n`` frames down, as the readers are in a training job."""
    return fn() if n <= 0 else _deeper(n - 1, fn)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_an_artifact_header_nested_too_deeply_is_not_an_artifact() -> None:
    """decode() let json.loads's RecursionError out, and load() with it (fuzz: artifact)."""
    head = _nested(100_000).encode()
    data = b"DDPC1\n" + len(head).to_bytes(8, "little") + head
    with pytest.raises(ValueError, match="nested too deeply"):
        _deeper(30, lambda: decode(data))
    loaded, failed = artifact.load(data, {})
    assert loaded is None and failed is not None and failed.reason == artifact.PACKAGE_ERROR


@pytest.mark.parametrize(
    "header",
    [
        '{"torch": "%s", "sources": [["m", Infinity, 2, "c"]], "dropped": []}',  # int(inf)
        '{"torch": "%s", "sources": [["m", 1, NEST, "c"]], "dropped": []}',
        '{"torch": "%s", "failed": NEST}',  # str() of it, past the recursion limit
        '{"torch": NEST}',
        '{"torch": "%s", "sources": [], "dropped": [["G[\'F\'].gelu", "F", [NEST]]]}',
    ],
    ids=["inf-line", "nested-line", "nested-failed", "nested-torch", "nested-identity"],
)
def test_an_artifact_header_of_any_json_is_a_reason_not_an_exception(header: str) -> None:
    """load() returned (None, Failed) for the errors it named, but int(inf) raised
    OverflowError, and str() of a list nested nearly as deep as json.loads allows raised
    RecursionError deep in a job's stack (fuzz: artifact)."""
    from dynamo_dist.dynamo import compat

    for nest in (900, 950, 985):
        text = header.replace("%s", compat.torch_version()).replace("NEST", _nested(nest))
        data = b"DDPC1\n" + len(text).to_bytes(8, "little") + text.encode() + b"blob"
        for depth in (0, 30, 60):
            loaded, failed = _deeper(depth, lambda data=data: artifact.load(data, {}))
            assert loaded is None and failed is not None, (nest, depth)


@pytest.mark.parametrize(
    "record",
    [
        {"seq": 1, "time": "x"},
        {"seq": 1, "time": 1e400},
        {"seq": 1, "time": 10**400},
        {"seq": "3"},
        {"seq": 1, "channels": {"world": True}},
        {"seq": 1, "channels": {"world": {"frame": "f"}}},
        {"seq": 1, "channels": {"world": {"seq": float("inf")}}},
        {"seq": 1, "channels": ["world"]},
        {"seq": 1, "state": ["exited"]},
    ],
    ids=lambda r: json.dumps(r)[:40],
)
def test_a_status_record_with_a_field_of_another_type_is_refused(record: dict[str, Any]) -> None:
    """describe_missing raised (float("x"), a channel without its seq, int(inf)) in place
    of the timeout error it explains, for a record any process could post (fuzz: store)."""
    before = dist_store.refused_count()
    raw = json.dumps(record).encode() if "1e400" not in str(record) else b'{"seq":1,"time":1e400}'
    parsed = status._parse(raw)
    assert set(parsed) == {"error"}
    assert dist_store.refused_count() == before + 1
    missing, lines = status.describe_missing({0: {}, 1: parsed}, "world", 1, 10.0)
    assert missing == [0, 1] and "never published" in lines[1]


def test_a_genuine_status_record_still_parses() -> None:
    board = status.StatusBoard.__new__(status.StatusBoard)
    board._describe, board._state = str, "running"
    raw = board._payload({"world": (3, 7, 2), "ranks 0,1": (1, 0, 1)}, False).encode()
    parsed = status._parse(raw)
    assert parsed["seq"] == 3 and parsed["channels"]["world"]["frame"] == "7"
    assert status.describe_missing({1: parsed}, "world", 3, 10.0)[0] == []


@pytest.mark.parametrize(
    "groups",
    [[], {"world": 5}, {"g": {"exchanges": []}, "h": {"exchanges": {}}}, {"g": None}],
    ids=["list", "int-group", "unhashable", "none-group"],
)
def test_report_groups_of_another_type_do_not_break_the_job_report(groups: Any) -> None:
    """format_table (rank 0, at shutdown) raised on a rank's record whose groups were not
    objects of objects, or held lists where it compared figures (fuzz: store)."""
    store = fc.FakeStore()
    store.set(f"{report._PREFIX}3/1", json.dumps({"compiles": 1, "groups": groups}))
    out = report.publish_and_collect(store, 3, 0, 2, {"compiles": 1}, 5.0, None)
    assert out is not None and set(out["ranks"]) == {"0", "1"}
    assert "dynamo_dist job report" in report.format_table(out)


def test_a_report_record_nested_too_deeply_is_refused() -> None:
    """str() of a list nested nearly as deep as json.loads allows (a figure the table
    formats with str) exceeded the recursion limit in format_table at shutdown, deep in
    the stack (fuzz: store)."""
    for nest in (900, 950, 985):
        for depth in (0, 30, 60):
            store = fc.FakeStore()
            store.set(f"{report._PREFIX}4/1", '{"exchanges": ' + _nested(nest) + "}")
            out = _deeper(
                depth,
                lambda store=store: report.publish_and_collect(
                    store, 4, 0, 2, {"compiles": 1}, 0.1, None, started=lambda: {0, 1}
                ),
            )
            assert out is not None and list(out["ranks"]) == ["0"] and out["missing"] == [1]
    store.set(f"{report._PREFIX}5/1", '{"exchanges": ' + _nested(20) + "}")
    before = dist_store.refused_count()
    report.publish_and_collect(store, 5, 0, 2, {"compiles": 1}, 0.1, None)
    assert dist_store.refused_count() == before + 1  # counted, not silently dropped


@pytest.mark.parametrize(
    "record",
    [
        {"ranks": 5, "state": "waiting"},
        {"ranks": [], "state": "waiting"},
        {"ranks": ["0", "1"], "state": "failed"},
        {"ranks": [0, True], "state": "failed"},
        {"ranks": [0, 1], "state": "waiting", "where": 3},
        {"ranks": None, "state": "failed", "error": []},
    ],
    ids=lambda r: json.dumps(r)[:40],
)
def test_a_group_setup_record_with_a_field_of_another_type_is_refused(
    monkeypatch: pytest.MonkeyPatch, record: dict[str, Any]
) -> None:
    """group_name (in the setup's wait and its errors) raised TypeError on a forged
    record's ranks, in place of the timeout or divergence error (fuzz: store)."""
    import torch.distributed as dist

    from dynamo_dist.dist import group as dist_group

    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    store = fc.FakeStore()
    store.set("setup/1", json.dumps(record))
    before = dist_store.refused_count()
    view = dist_group._pending(store, "setup/", 1)
    assert view is None and dist_store.refused_count() == before + 1
    dist_group._refuse_crossed_setups((0, 1), {"ranks": [0, 1], "where": "m.py:1"}, {1: view}, [1])
    assert "has not set up" in dist_group._where(1, view)
    store.set("setup/1", json.dumps({"ranks": [0, 1, 2], "state": "waiting", "where": "x"}))
    assert dist_group._pending(store, "setup/", 1) is not None
