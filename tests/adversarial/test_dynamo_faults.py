"""Issue 30, the Dynamo side: failure modes of one rank's process that must not pass for
divergences or hangs (one rank's reset() or profiler, threads in local(), a rank outside
a group disagreement, a forked child).

Each rank program runs on real ranks (gloo, Dynamo, the shared-memory exchange); the
test next to it asserts on what every rank reported.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, error_result, result

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

HERE = __file__


def _no_graph(x: Any) -> Any:
    """No tensor operation: Dynamo finds nothing to compile and marks the code skip."""
    return x


def _graph(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _breaks(x: torch.Tensor) -> torch.Tensor:
    """A graph, a break, then nothing to compile: Dynamo marks the resume function skip."""
    y = x * 3
    torch._dynamo.graph_break()
    return y


# -- reset() and sys.setprofile on one rank --------------------------------------------
def reset_with_skipped_frame(rank: int, world: int) -> dict[str, Any]:
    cb = CountingBackend()
    skipped = dynamo_dist.compile(_no_graph, backend=cb, timeout=20)
    breaks = dynamo_dist.compile(_breaks, backend=cb, timeout=20)
    compiled = dynamo_dist.compile(_graph, backend=cb, timeout=20)
    ok = True
    try:
        for step in range(6):
            if rank == 1 and step in (2, 4):
                torch._dynamo.reset()
            x = torch.full((4, 3), float(step))
            ok &= bool(torch.equal(skipped(x), x))
            ok &= bool(torch.allclose(breaks(x), x * 3))
            ok &= bool(torch.allclose(compiled(x), _graph(x)))
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e)
    return result(cb, ok)


# Two pairs of different functions, each pair on one line: same file, first line, qualified
# name and bytecode; they differ in the attribute they call (co_names).
_size_of, _sine_of = (lambda t: t.size()), (lambda t: t.sin())
_local_size_of, _cosine_of = (lambda t: t.size()), (lambda t: t.cos())


def skips_keyed_by_code(rank: int, world: int) -> dict[str, Any]:
    """Dynamo skips the first of each pair (nothing to compile); the second must still
    compile, in lockstep on every rank, and inside local() on rank 0 alone."""
    cb = CountingBackend()
    size_of, sine_of = (dynamo_dist.compile(f, backend=cb, timeout=20) for f in _LOCKSTEP)
    local_size_of, cosine_of = (dynamo_dist.compile(f, backend=cb, timeout=20) for f in _LOCAL)
    x = torch.ones(3)
    ok = True
    try:
        for _ in range(2):
            ok &= size_of(x) == x.size()
        before = cb.graphs
        for _ in range(3):
            ok &= bool(torch.allclose(sine_of(x), x.sin()))
        lockstep, before = cb.graphs - before, cb.graphs
        if rank == 0:
            with dynamo_dist.local():
                ok &= local_size_of(x) == x.size()
                ok &= bool(torch.allclose(cosine_of(x), x.cos()))
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e)
    return result(cb, ok, lockstep=lockstep, local=cb.graphs - before)


_LOCKSTEP, _LOCAL = (_size_of, _sine_of), (_local_size_of, _cosine_of)


def _scaled(x: torch.Tensor, k: int) -> torch.Tensor:
    return x * k


def reset_after_recompile_limit(rank: int, world: int) -> dict[str, Any]:
    """Both ranks reach the recompile limit (Dynamo: cached entries only), then rank 1
    resets: its entries are gone, while rank 0's hook still exchanges every call."""
    torch._dynamo.config.recompile_limit = 2
    cb = CountingBackend()
    scaled = dynamo_dist.compile(_scaled, backend=cb, dynamic=False, timeout=20)
    ok = True
    try:
        for step in range(9):
            if rank == 1 and step == 5:
                torch._dynamo.reset()
            k = step + 2 if step < 7 else 2  # at the end, a k rank 0 has an entry for
            x = torch.ones(3)
            ok &= bool(torch.allclose(scaled(x, k), x * k))
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e)
    return result(cb, ok)


def profile_on_one_rank(rank: int, world: int, tracer: str) -> dict[str, Any]:
    cb = CountingBackend()
    compiled = dynamo_dist.compile(_graph, backend=cb, timeout=20)
    breaks = dynamo_dist.compile(_breaks, backend=cb, timeout=20)
    profiler = _Profiler()
    kind, fn = _TRACERS[tracer](profiler)
    ok = True
    try:
        for step in range(8):
            if rank == 1 and step == 2:
                sys.setprofile(fn if kind == "profile" else None)
                sys.settrace(fn if kind == "trace" else None)
            if rank == 1 and step == 6:
                sys.setprofile(None)
                sys.settrace(None)
            # One rank's shapes change while the other rank profiles: a mixed exchange.
            n = 5 if (step == 3 and rank == 0) or step == 5 else 4
            x = torch.full((n, 3), float(step))
            ok &= bool(torch.allclose(compiled(x), _graph(x)))
            ok &= bool(torch.allclose(breaks(x), x * 3))
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e)
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return result(cb, ok, profiled=len(profiler.calls))


class _Profiler:
    """A Python profile (or trace) function that calls helpers of its own, as real ones do."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _note(self, name: str) -> None:
        self.calls.append(name)

    def event(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            self._note(frame.f_code.co_name)
        return self.event

    def global_event(self, frame: Any, event: str, arg: Any) -> Any:
        """A global trace function that returns another, per-frame one (stdlib ``trace``)."""
        self._note(frame.f_code.co_name)
        return self.local_event

    def local_event(self, frame: Any, event: str, arg: Any) -> Any:
        self._note(event)
        return self.local_event


def _partial_event(profiler: _Profiler, frame: Any, event: str, arg: Any) -> Any:
    """A tracer given as ``functools.partial``: its frames' code is this function's."""
    profiler._note(event)
    return functools.partial(_partial_event, profiler)


#: Each tracer: which hook it is set with, and the callable given to it.
_TRACERS: dict[str, Callable[[_Profiler], tuple[str, Any]]] = {
    "profile": lambda p: ("profile", p.event),
    "trace": lambda p: ("trace", p.event),
    "trace_local": lambda p: ("trace", p.global_event),
    "profile_partial": lambda p: ("profile", functools.partial(_partial_event, p)),
    "trace_partial": lambda p: ("trace", functools.partial(_partial_event, p)),
}


# -- two threads compiling inside local() ------------------------------------------------
class _ShapeBackend:
    """Records, per thread, which dims of the graph's first input are symbolic (dynamic)."""

    def __init__(self) -> None:
        self.graphs: dict[str, list[list[bool]]] = {}
        self._lock = threading.Lock()

    def __call__(self, gm: Any, example_inputs: list[Any]) -> Any:
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        shape = next(v.shape for v in values if isinstance(v, torch.Tensor))
        with self._lock:
            seen = self.graphs.setdefault(threading.current_thread().name, [])
            seen.append([isinstance(s, torch.SymInt) for s in shape])
        return gm.forward


def threads_in_local(rank: int, world: int) -> dict[str, Any]:
    """Two threads take turns compiling one function inside local(), each on its own shapes.

    The training call sees (4, 3). Thread b then sees (5, 3): dim 0 varies in its view.
    Thread a then sees (4, 7): in its own view only dim 1 varied, never dim 0.
    """
    backend = _ShapeBackend()
    compiled = dynamo_dist.compile(_graph, backend=backend, timeout=30)
    compiled(torch.ones(4, 3))  # joins the group, on the main thread
    b_done = threading.Event()
    errors: list[str] = []

    def run(shape: tuple[int, int], after: threading.Event | None) -> None:
        try:
            if after is not None:
                assert after.wait(60), "thread b never finished"
            with dynamo_dist.local():
                compiled(torch.ones(*shape))
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            b_done.set()

    threads = [
        threading.Thread(target=run, name="a", args=((4, 7), b_done)),
        threading.Thread(target=run, name="b", args=((5, 3), None)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    compiled(torch.ones(4, 3))  # the group still agrees after the threads' local compiles
    return {"ok": not errors, "errors": errors, "graphs": backend.graphs}


# -- a rank outside a group disagreement ------------------------------------------------
def outside_a_disagreement(rank: int, world: int) -> dict[str, Any]:
    """Ranks 0 and 1 disagree about a group; rank 2 waits for rank 0 in another group.

    Rank 0 sets up ranks 0,1 and rank 1 the whole world: each waits for the other, and
    both fail. Rank 2 sets up ranks 0,2, which rank 0 will now never join.
    """
    import torch.distributed as dist

    assert world == 3
    groups = {r: dist.new_group(m) for r, m in ((0, [0, 1]), (2, [0, 2]))}  # on every rank
    cb = CountingBackend()
    try:
        cf = dynamo_dist.compile(
            _graph, backend=cb, group=groups.get(rank, dist.group.WORLD), timeout=40
        )
        cf(torch.ones(4, 3))
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e)
    return result(cb, True)


# -- a forked child that calls compiled code ---------------------------------------------
def _other(x: torch.Tensor) -> torch.Tensor:
    return x - 3


def _in_child(compiled: Any) -> dict[str, Any]:
    """The child's compiled calls: hits, a miss and a first entry, then what it logged.

    ``compiled()`` gives the two compiled functions (compiling them, in a child forked
    before anything was compiled: its one warning may come then).
    """
    import logging

    warnings: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("dynamo_dist").addHandler(Grab())
    ok = True
    try:
        cf, late = compiled()
        for n in (4, 4, 7, 4):  # hits, then a size no rank compiled
            x = torch.full((n, 3), 2.0)
            ok &= bool(torch.allclose(cf(x), _graph(x)))
        x = torch.ones(4, 3)
        ok &= bool(torch.allclose(late(x), _other(x)))  # first called here, in the child
        return {"ok": ok, "warnings": warnings}
    except BaseException as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "warnings": warnings}


def fork_a_child(rank: int, world: int, when: str) -> dict[str, Any]:
    """Each rank forks a child that calls compiled code, then trains on, paired.

    ``when``: "after" its first compiled calls (its runtime runs), or "before" anything
    was compiled (a DataLoader iterator made before the model: the child inherits the
    initialized process group and no runtime, and compiles its own functions).
    """
    import json
    import os
    import signal

    cb = CountingBackend()
    ok = True

    def compile_both() -> tuple[Any, Any]:
        return (
            dynamo_dist.compile(_graph, backend=cb, timeout=30),
            dynamo_dist.compile(_other, backend=cb, timeout=30),
        )

    def first_calls() -> bool:
        x = torch.ones(4, 3)
        return all(bool(torch.allclose(cf(x), _graph(x))) for _ in range(3))

    if when == "after":
        cf, late = compile_both()
        ok &= first_calls()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, and never return into the program
        os.close(read)
        signal.alarm(120)
        try:
            made = compile_both if when == "before" else lambda: (cf, late)
            os.write(write, json.dumps(_in_child(made)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        child = json.loads(fh.read() or "{}")
    os.waitpid(pid, 0)
    ranks.signal_peers(f"child_of_{rank}_done")
    ranks.wait_for_peer(f"child_of_{1 - rank}_done")
    try:
        if when == "before":
            cf, late = compile_both()
            ok &= first_calls()
        for step in range(4):
            n = 5 if (rank == 1 and step == 1) else 4  # a mixed exchange, after the fork
            x = torch.full((n, 3), float(step))
            ok &= bool(torch.allclose(cf(x), _graph(x)))
            ok &= bool(torch.allclose(late(x), _other(x)))
    except dynamo_dist.DynamoDistError as e:
        return error_result(cb, e, child=child)
    return result(cb, ok, child=child)


def _assert_paired(run: ranks.RankRun) -> list[dict[str, Any]]:
    res = [run.rank(r) for r in (0, 1)]
    for one in res:
        assert one["ok"], (one.get("error"), one.get("message"), one.get("traceback"))
    exchanges = [one["stats"]["exchanges"] for one in res]
    assert exchanges[0] == exchanges[1], exchanges
    return res


def test_reset_on_one_rank_replays_dynamos_skips(tmp_path: Any) -> None:
    """Rank 1 resets twice; the frames Dynamo skipped stay skipped there, unexchanged."""
    run = ranks.launch(HERE, "reset_with_skipped_frame", tmp=tmp_path, timeout=200)
    res = _assert_paired(run)
    # Each reset forces both ranks to recompile the two frames with graphs, together.
    assert res[0]["graphs"] == res[1]["graphs"] == 2 + 2 * 2, res


def test_a_skip_decision_is_never_shared_by_different_code(tmp_path: Any) -> None:
    run = ranks.launch(HERE, "skips_keyed_by_code", tmp=tmp_path, timeout=200)
    res = _assert_paired(run)
    # As plain torch.compile: one graph for t.sin() on each rank, one for t.cos() on 0.
    assert res[0]["lockstep"] == res[1]["lockstep"] == 1, res
    assert (res[0]["local"], res[1]["local"]) == (1, 0), res


def test_reset_on_one_rank_at_the_recompile_limit(tmp_path: Any) -> None:
    run = ranks.launch(HERE, "reset_after_recompile_limit", tmp=tmp_path, timeout=200)
    res = _assert_paired(run)
    # Two entries each, then eager on both ranks: rank 1 compiles nothing alone.
    assert res[0]["graphs"] == res[1]["graphs"] == 2, res


@pytest.mark.parametrize("tracer", sorted(_TRACERS))
def test_profile_or_trace_function_on_one_rank(tmp_path: Any, tracer: str) -> None:
    run = ranks.launch(HERE, "profile_on_one_rank", tracer, tmp=tmp_path, timeout=200)
    res = _assert_paired(run)
    assert res[1]["profiled"] > 0 and res[0]["profiled"] == 0, res
    assert res[0]["graphs"] == res[1]["graphs"], res


def test_threads_in_local_keep_their_own_automatic_dynamic_state(tmp_path: Any) -> None:
    run = ranks.launch(HERE, "threads_in_local", tmp=tmp_path, timeout=200)
    for r in (0, 1):
        res = run.rank(r)
        assert res["ok"], res
        # Dim 0 varied in thread b's calls only: thread a's graph keeps it static.
        assert res["graphs"] == {
            "MainThread": [[False, False]],
            "b": [[True, False]],
            "a": [[False, True]],
        }, res["graphs"]


def test_a_rank_outside_a_group_disagreement_fails_at_once(tmp_path: Any) -> None:
    run = ranks.launch(HERE, "outside_a_disagreement", tmp=tmp_path, nproc=3, timeout=240)
    for r in (0, 1):
        res = run.rank(r)
        assert res["error"] == "RankDivergenceError", res
    res = run.rank(2)
    # Not CollectiveTimeoutError after waiting out the timeout for a rank that failed.
    assert res["error"] == "RankDivergenceError", res
    msg = res["message"]
    assert "rank 0 failed to set up" in msg and "ranks 0-1" in msg and "ranks 0,2" in msg, msg


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_forked_child_never_joins_its_parents_channel(tmp_path: Any, when: str) -> None:
    run = ranks.launch(HERE, "fork_a_child", when, tmp=tmp_path, timeout=240)
    res = _assert_paired(run)
    assert res[0]["graphs"] == res[1]["graphs"], res
    # 3 calls, then per step one call of each function; plus the first entry of late.
    assert res[0]["stats"]["exchanges"] == 3 + 4 * 2, res[0]["stats"]
    for r, one in enumerate(res):
        child = one["child"]
        assert child["ok"], (r, child)
        (warning,) = child["warnings"]
        assert f"forked from rank {r}" in warning and "plain torch.compile" in warning, warning


if __name__ == "__main__":
    ranks.main(globals())
