"""Fast unit tests of the pure decision functions, no processes and no Dynamo.

The guard record and the fast-path decision exist twice, in C++ (the shared-memory
hook, ``csrc/guard_hook.h``) and in Python (``_collective.pack``/``unpack``/``decide``,
the gloo transport and the slow path). Both are checked against one table and
against each other on random records: a drift between them would make the two
transports give different verdicts for the same guard results.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
import types
from dataclasses import dataclass
from typing import Any

import pytest

from dynamo_dist import _C
from dynamo_dist._errors import RankDivergenceError
from dynamo_dist.exchange import shm as exchange_shm
from dynamo_dist.exchange.collective import Transport, percentiles
from dynamo_dist.exchange.record import MixedSlot, pack, unpack
from dynamo_dist.exchange.status import describe_missing
from dynamo_dist.tools.cache_cli import parse_age, parse_size
from dynamo_dist.tools.report import LEGEND, format_table, with_derived

M64 = (1 << 64) - 1


# -- the record and the decision: one table for C++ and Python ---------------------------
@dataclass(frozen=True)
class Case:
    """What every rank reports for one exchange, and what all ranks must conclude."""

    name: str
    records: list[tuple[bool, int]]  # (hit, identity) per rank
    outcome: str  # "hit", "miss" (fast path), "mixed", "mismatch" (slow path)


BIG = (1 << 62) - 1  # identities are 62-bit; the record keeps the low 31 bits
RECORDS = [
    Case("one rank hits", [(True, 7)], "hit"),
    Case("one rank misses", [(False, 7)], "miss"),
    Case("all hit", [(True, 7)] * 4, "hit"),
    Case("all miss", [(False, 7)] * 4, "miss"),
    Case("one of two misses", [(True, 7), (False, 7)], "mixed"),
    Case("one of eight hits", [(False, 9)] * 7 + [(True, 9)], "mixed"),
    Case("identity zero", [(True, 0), (True, 0)], "hit"),
    Case("largest 31-bit identity", [(True, 2**31 - 1)] * 3, "hit"),
    Case("62-bit identities", [(True, BIG), (True, BIG)], "hit"),
    Case("different frames, both hit", [(True, 7), (True, 8)], "mismatch"),
    Case("different frames, both miss", [(False, 1), (False, 2)], "mismatch"),
    Case("different frames and hits", [(True, 1), (False, 2)], "mismatch"),
    Case("frames differ in bit 30 only", [(True, 0), (True, 1 << 30)], "mismatch"),
    Case("one odd frame among many", [(True, 5)] * 6 + [(True, 4)], "mismatch"),
    # Documented limit: identities equal in their low 31 bits are the same frame.
    Case("frames equal modulo 2**31", [(True, 3), (True, 3 + (1 << 31))], "hit"),
]

# (all_hit, any_hit, identities_agree) that unpack must report for each outcome.
UNPACKED = {
    "hit": (True, True, True),
    "miss": (False, False, True),
    "mixed": (False, True, True),
}
# _C._fast_verdict: 1 all hit, 0 all missed, -1 the Python slow path decides.
FAST = {"hit": 1, "miss": 0, "mixed": -1, "mismatch": -1}


def _and(words: list[int]) -> int:
    return functools.reduce(lambda a, b: a & b, (w & M64 for w in words), M64)


def _py_word(records: list[tuple[bool, int]]) -> int:
    return _and([pack(h, i) for h, i in records])


def _cpp_word(records: list[tuple[bool, int]]) -> int:
    return _and([_C._pack_record(h, i) for h, i in records])


class _Decider(Transport):
    """Transport.decide without a process group: only the state decide touches."""

    def __init__(self) -> None:  # no super(): no dist, no group
        self.rank = 0
        self.divergences = 0
        self.mixed = 0
        self.mixed_slot = MixedSlot()
        self.broken = None

    def divergence_error(self, seq: int, ident: int, hit: bool) -> RankDivergenceError:
        return RankDivergenceError(f"mismatch at #{seq}", {})


@pytest.mark.parametrize("case", RECORDS, ids=[c.name for c in RECORDS])
def test_record_packing_is_identical_in_cpp_and_python(case: Case) -> None:
    for hit, ident in case.records:
        py = pack(hit, ident)
        assert -(1 << 63) <= py < (1 << 63), "pack must fit a signed int64 for torch"
        assert py & M64 == _C._pack_record(hit, ident), (hit, ident)


@pytest.mark.parametrize("case", RECORDS, ids=[c.name for c in RECORDS])
def test_cpp_fast_path_decides(case: Case) -> None:
    assert _C._fast_verdict(_cpp_word(case.records)) == FAST[case.outcome]


@pytest.mark.parametrize("case", RECORDS, ids=[c.name for c in RECORDS])
def test_python_unpack_and_decide(case: Case) -> None:
    word = _py_word(case.records)
    all_hit, any_hit, agree = unpack(word)
    if case.outcome == "mismatch":
        assert not agree
    else:
        assert (all_hit, any_hit, agree) == UNPACKED[case.outcome]

    # Every rank runs decide on the same reduced word, each with its own record.
    for r, (hit, ident) in enumerate(case.records):
        d = _Decider()
        signed = word - (1 << 64) if word >= (1 << 63) else word  # what torch hands back
        if case.outcome == "mismatch":
            with pytest.raises(RankDivergenceError):
                d.decide(3, ident, hit, signed)
            assert d.divergences == 1 and isinstance(d.broken, RankDivergenceError), r
            continue
        assert d.decide(3, ident, hit, signed) is (case.outcome == "hit"), r
        assert d.divergences == 0 and d.broken is None
        if case.outcome == "mixed":
            out = d.mixed_slot.peek()
            assert d.mixed == 1 and out is not None
            assert (out.seq, out.ident, out.hit) == (3, ident, hit)
            assert d.mixed_slot.take(2) is None, "an earlier exchange's call takes nothing"
            assert d.mixed_slot.take(3) is out and d.mixed_slot.take(3) is None
        else:
            assert d.mixed == 0 and d.mixed_slot.peek() is None


def _python_fast_verdict(word: int) -> int:
    """What the C++ fast path must return, derived from Python's unpack."""
    all_hit, any_hit, agree = unpack(word)
    if not agree or (any_hit and not all_hit):
        return -1
    return int(all_hit)


def test_cpp_and_python_agree_on_random_records() -> None:
    rng = random.Random(20240611)
    for _ in range(3000):
        world = rng.randint(1, 9)
        pool = [rng.getrandbits(rng.choice([3, 31, 62])) for _ in range(rng.randint(1, 3))]
        records = [(rng.random() < 0.8, rng.choice(pool)) for _ in range(world)]
        py, cpp = _py_word(records), _cpp_word(records)
        assert py == cpp, records
        assert _C._fast_verdict(cpp) == _python_fast_verdict(py), records
    # Arbitrary words, not only ANDs of valid records, decide the same way too.
    for _ in range(3000):
        word = rng.getrandbits(64)
        assert _C._fast_verdict(word) == _python_fast_verdict(word), hex(word)


# -- percentiles -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("samples", "want"),
    [
        ([], (0.0, 0.0)),
        ([1500], (1.5, 1.5)),
        ([1000 * i for i in range(1, 101)], (51.0, 100.0)),
        ([1000 * i for i in range(100, 0, -1)], (51.0, 100.0)),  # unsorted
        ([1234, 5678], (5.68, 5.68)),  # rounded to 2 decimals
        ([10] * 99 + [10**9], (0.01, 1e6)),  # one outlier in 100
        ([10] * 200 + [10**9], (0.01, 0.01)),  # below the 99th
    ],
)
def test_percentiles(samples: list[int], want: tuple[float, float]) -> None:
    named = {"wait_p50_us": want[0], "wait_p99_us": want[1]}
    assert percentiles(samples, "wait") == named
    assert percentiles(iter(samples), "wait") == named  # any iterable, e.g. a generator
    assert percentiles(samples, "cost") == {"cost_p50_us": want[0], "cost_p99_us": want[1]}


# -- describe_missing ----------------------------------------------------------------------
def _st(seq: int, frame: str | None, **extra: Any) -> dict[str, Any]:
    """A published status whose latest exchange is of the ``world`` group."""
    return {
        "seq": seq,
        "frame": frame,
        "group": "world",
        "channels": {"world": {"seq": seq, "frame": frame, "epoch": seq}},
        **extra,
    }


def test_describe_missing_names_each_rank_and_why() -> None:
    now = time.time()
    elsewhere = {
        "seq": 9,
        "frame": "stage (s.py:4)",
        "group": "ranks 8,9",
        "channels": {
            "world": {"seq": 5, "frame": "f (a.py:1)", "epoch": 1},
            "ranks 8,9": {"seq": 9, "frame": "stage (s.py:4)", "epoch": 2},
        },
        "state": "running",
        "time": now,
    }
    board: dict[int, dict[str, Any]] = {
        4: _st(5, "f (a.py:1)", state="running", time=now),
        0: _st(5, "f (a.py:1)", state="running", time=now),
        1: {},
        2: _st(3, "g (b.py:2)", state="exited", time=now),
        3: _st(4, None, state="running", time=now),
        5: _st(5, "f (a.py:1)", state="running", time=now - 100),
        6: {"error": "store unreachable"},
        7: _st(6, "h (c.py:3)"),  # no state or time: running, fresh
        8: elsewhere,
        9: {**elsewhere, "channels": {"ranks 8,9": elsewhere["channels"]["ranks 8,9"]}},
    }
    missing, lines = describe_missing(board, "world", my_seq=5, stale_after=30)
    assert missing == [1, 2, 3, 5, 6, 9]
    assert lines == [
        "rank 0: arrived, at exchange #5 at f (a.py:1)",
        "rank 1: never published a status (not started, or no exchange yet)",
        "rank 2: exited after exchange #3 at g (b.py:2)",
        "rank 3: last at exchange #4 at no frame yet",
        "rank 4: arrived, at exchange #5 at f (a.py:1)",
        "rank 5: last at exchange #5 at f (a.py:1), silent for 100s",
        "rank 6: never published a status (not started, or no exchange yet)",
        "rank 7: arrived, at exchange #6 at h (c.py:3)",
        "rank 8: arrived, at exchange #5 at f (a.py:1) (latest: exchange #9 of group "
        "ranks 8,9 at stage (s.py:4))",
        "rank 9: last at exchange #0 at no frame yet (latest: exchange #9 of group "
        "ranks 8,9 at stage (s.py:4))",
    ]


def test_describe_missing_empty_board() -> None:
    assert describe_missing({}, "world", 1, 10) == ([], [])


# -- the job report table --------------------------------------------------------------
def test_with_derived_hit_rate() -> None:
    assert with_derived({"evaluations": 10, "local_misses": 3})["hit_rate"] == 0.7
    assert with_derived({})["hit_rate"] == 1.0  # nothing evaluated: nothing missed
    assert with_derived({"evaluations": None, "local_misses": None})["hit_rate"] == 1.0
    original = {"evaluations": 4}
    with_derived(original)
    assert "hit_rate" not in original  # a copy, not a mutation


def test_format_table_rows_columns_and_missing_ranks() -> None:
    rank = {
        "exchanges": 1200,
        "evaluations": 1000,
        "local_misses": 5,  # hit rate 99.5%
        "forced_recompiles": 2,
        "divergences": 0,
        "frames_traced": 3,
        "graphs_built": 0,
        "graphs_loaded": 2,
        "loaded_from": {"host_copy": 1, "shared": 1, "precompiled": 0},
        "recompiles": 1,
        "recompile_reasons": {"tensor 'x' size mismatch at index 0. expected 4, actual 6": 1},
        "cost_p50_us": 1.25,
        "cost_p99_us": 3.0,
        "wait_p50_us": 12.345,
        "wait_p99_us": 80.0,
        "transport": "shm",
        "cache_publishes": 0,
        "build_seconds_saved": 4.25,
        "precompiled_calls": 30,
        "precompiled_fallbacks": {"graph_break": 1},
    }
    report = {
        "world_size": 12,
        "ranks": {
            "10": {**rank, "rank": 10},
            "2": {**rank, "rank": 2, "exchanges": "n/a", "transport": None},
        },
        "missing": [5, 7],
    }
    report["ranks"] = {r: with_derived(st) for r, st in report["ranks"].items()}
    lines = format_table(report).splitlines()
    assert lines[0] == (
        "dynamo_dist job report (12 ranks); no report from ranks [5, 7] (exited early or crashed)"
    )
    header, rule, first, second, reasons_title, reasons = lines[1:7]
    assert lines[7] == "columns:"  # then the legend (tests/unit/tools/test_report.py)
    assert header.split() == [
        "rank",
        "exchanges",
        "hit",
        "rate",
        "forced",
        "diverg.",
        "traced",
        "built",
        "loaded",
        "loaded",
        "from",
        "recomp.",
        "cost",
        "p50",
        "us",
        "cost",
        "p99",
        "us",
        "wait",
        "p50",
        "us",
        "wait",
        "p99",
        "us",
        "transport",
        "publishes",
        "build",
        "s",
        "saved",
        "precomp.",
        "fallbacks",
    ]
    assert set(rule.replace(" ", "")) == {"-"}
    # Ranks sorted as numbers; a value that cannot take its format is printed as is.
    assert first.split() == [
        "2",
        "n/a",
        "99.5%",
        "2",
        "0",
        "3",
        "0",
        "2",
        "host_copy:1,shared:1",
        "1",
        "1.2",
        "3.0",
        "12.3",
        "80.0",
        "-",
        "0",
        "4.2",
        "30",
        "graph_break:1",
    ]
    assert second.split()[:3] == ["10", "1200", "99.5%"]
    # Every column is right-aligned to one width.
    assert len({len(line) for line in lines[1:5]}) == 1
    # Ranks with the same recompile reasons share one line below the table.
    assert reasons_title == "recompile reasons:"
    assert reasons == (
        "  ranks 2,10: tensor 'x' size mismatch at index 0. expected 4, actual 6 (1x)"
    )
    # Every column of the compile accounting is defined in the legend.
    assert {"traced", "built", "loaded", "loaded from", "recomp.", "build s saved"} <= set(LEGEND)


def test_format_table_without_ranks_or_missing() -> None:
    text = format_table({"ranks": {}})
    assert text.splitlines()[0] == "dynamo_dist job report (0 ranks)"
    assert len(text.splitlines()) == 4 + len(LEGEND)  # title, header, rule, the legend


# -- cache CLI arguments -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("1K", 1024),
        ("1k", 1024),
        ("1KB", 1024),
        ("1KiB", 1024),
        ("500M", 500 * 2**20),
        ("20G", 20 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("2T", 2 * 2**40),
        (" 3 M ", 3 * 2**20),
        ("10b", 10),
    ],
)
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "lots", "1X", "-1K", "1 K B B", "K", "1.2.3G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--max-size") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("30s", 30.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
        ("7D", 604800.0),
        ("2w", 1209600.0),
        ("1.5h", 5400.0),
        (" 7d ", 604800.0),
        ("0s", 0.0),
    ],
)
def test_parse_age(text: str, want: float) -> None:
    assert parse_age(text) == want


@pytest.mark.parametrize("text", ["", "7", "d", "7y", "7 days", "-1d", "1h30m"])
def test_parse_age_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--older-than") as info:
        parse_age(text)
    assert repr(text) in str(info.value)


# -- host grouping ---------------------------------------------------------------------------
TORCHRUN_VARS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _topology(
    monkeypatch: pytest.MonkeyPatch,
    others: list[tuple[str, int]],
    me: int,
    env: dict[str, str] | None,
) -> exchange_shm.Topology:
    """exchange_shm.topology on rank ``me`` of ``len(others)`` ranks; ``others[me]`` is replaced
    by what this rank really reports, so the host key and LOCAL_RANK logic are exercised."""
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in (env or {}).items():
        monkeypatch.setenv(var, value)

    def all_gather_objects(group: Any, obj: Any) -> list[Any]:
        out: list[Any] = list(others)
        out[me] = obj
        return out

    monkeypatch.setattr(exchange_shm, "all_gather_objects", all_gather_objects)
    monkeypatch.setattr(exchange_shm, "dist", types.SimpleNamespace(get_rank=lambda: me))
    return exchange_shm.topology(None, list(range(len(others))))


def _env(group: int, local: int, local_world: int = 2) -> dict[str, str]:
    return {
        "GROUP_RANK": str(group),
        "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": str(local_world),
    }


def test_hosts_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    others = [("group0", 0), ("group0", 1), ("group1", 0), ("group1", 1)]
    topo = _topology(monkeypatch, others, me=3, env=_env(1, 1))
    assert topo == exchange_shm.Topology(
        local_rank=1,
        local_world=2,
        hosts=2,
        local_ranks=[2, 3],
        leaders=[0, 2],
        group_ranks=[0, 1, 2, 3],
    )


def test_hosts_interleaved_over_global_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    others = [("group0", 0), ("group1", 0), ("group0", 1), ("group1", 1)]
    topo = _topology(monkeypatch, others, me=2, env=_env(0, 1))
    assert (topo.local_rank, topo.local_ranks, topo.leaders) == (1, [0, 2], [0, 1])


def test_local_rank_order_wins_over_global_order(monkeypatch: pytest.MonkeyPatch) -> None:
    others = [("group0", 1), ("group0", 0)]
    topo = _topology(monkeypatch, others, me=0, env=_env(0, 1))
    assert (topo.local_rank, topo.local_ranks, topo.leaders) == (1, [1, 0], [1])


def test_inconsistent_local_ranks_fall_back_to_global_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    others = [("group0", 0), ("group0", 0), ("group0", 5)]
    topo = _topology(monkeypatch, others, me=1, env=_env(0, 0, 3))
    assert (topo.local_rank, topo.local_world, topo.local_ranks) == (1, 3, [0, 1, 2])


@pytest.mark.parametrize(
    "env",
    [None, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}],  # none, or GROUP_RANK missing
    ids=["no torchrun variables", "partial torchrun variables"],
)
def test_hosts_without_torchrun_variables_use_host_identity(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None
) -> None:
    here = exchange_shm._host_identity()
    assert here and "/" in here  # hostname/boot id
    others = [(here, -1), ("elsewhere/other-boot", -1), (here, -1), ("elsewhere/other-boot", -1)]
    topo = _topology(monkeypatch, others, me=2, env=env)
    assert topo == exchange_shm.Topology(
        local_rank=1,
        local_world=2,
        hosts=2,
        local_ranks=[0, 2],
        leaders=[0, 1],
        group_ranks=list(range(len(others))),
    )


def test_format_table_shows_each_group_once() -> None:
    """A pipeline job's report: one line per group, a figure once when members agree."""

    def stage(name: str, compiles: int) -> dict[str, Any]:
        return {
            "groups": {
                name: {
                    "transport": "shm",
                    "exchanges": 7,
                    "compiles": compiles,
                    "local_compiles": 0,
                    "divergences": 0,
                }
            }
        }

    report = {
        "world_size": 4,
        "ranks": {
            "0": stage("ranks 0,1", 2),
            "1": stage("ranks 0,1", 2),
            "2": stage("ranks 2,3", 2),
            "3": stage("ranks 2,3", 3),
        },
    }
    lines = format_table(report).splitlines()
    i = lines.index("per group:")
    assert lines[i + 1 : lines.index("columns:")] == [
        "  ranks 0,1 (shm; reported by ranks 0,1): exchanges 7, frames traced 2, local "
        "compiles 0, divergences 0",
        "  ranks 2,3 (shm; reported by ranks 2,3): exchanges 7, frames traced r2=2 r3=3, local "
        "compiles 0, divergences 0",
    ]
    world_only = {"ranks": {"0": {"groups": {"world": stage("world", 1)["groups"]["world"]}}}}
    assert "per group:" not in format_table(world_only)
