"""Issue 13, the hook's part: threads, the pending error, shutdown leaks, stances, statics.

In-process tests drive the C++ hook and an adopted Dynamo context directly; the rank
programs check the same promises on real ranks (shared-memory transport).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import types
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import ranks
import torch
from ranks import CountingBackend, result

import dynamo_dist
from dynamo_dist import _errors
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo import intercept
from dynamo_dist.dynamo.hook import _C
from dynamo_dist.exchange.stats import Counts


def _in_thread(fn: Any) -> Any:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, name="helper-thread")
    t.start()
    t.join()
    return out[0]


# -- in-process ---------------------------------------------------------------------------
def test_group_belongs_to_the_first_thread_that_exchanges() -> None:
    seen: list[int] = []
    hook = _C.GuardHook(lambda hit, ident: seen.append(ident) or hit)
    assert hook.owner_thread == 0 and hook.thread_ok()
    assert hook.exchange(True, 7) is True
    assert hook.owner_thread == threading.get_ident()
    err = _in_thread(lambda: hook.exchange(True, 8))
    assert isinstance(err, _errors.DynamoDistError)
    assert "helper-thread" in str(err) and "MainThread" in str(err)
    assert "dynamo_dist.local()" in str(err)
    assert _in_thread(hook.thread_ok) is False
    # The hook path (Dynamo's call) exchanges nothing for another thread and forces
    # the frame into the callback, which raises there.
    exit_ = _C.RegionEnter(1, hook)()
    try:
        assert hook(True) is True

        def foreign_call() -> bool:
            ex = _C.RegionEnter(1, hook)()
            try:
                return bool(hook(True))
            finally:
                ex()

        assert _in_thread(foreign_call) is False
    finally:
        exit_()
    assert len(seen) == 2 and seen[0] == 7  # the foreign call never reached the transport
    assert _C.pending_error() is None  # the owner thread is not poisoned


@contextlib.contextmanager
def _adopting(group: Any, region: int) -> Iterator[intercept.Adoption]:
    """torch.compile calls in the block adopted, then attached to ``group`` (as compile())."""
    adoption = intercept.Adoption("sync")
    with intercept.capturing(adoption):
        yield adoption
    adoption.attach(group, region)


def _adopted(fn: Any, **kwargs: Any) -> Any:
    group = types.SimpleNamespace(policy=None, info=None, counts=Counts(), hook=None)
    with _adopting(group, 12345) as adoption:
        compiled = torch.compile(fn, backend="eager", **kwargs)
    assert adoption.contexts
    return compiled


def test_pending_error_is_raised_fresh_and_undoes_the_enter_hooks() -> None:
    import torch._dynamo.config as dconfig

    f = _adopted(lambda x: x + 1, dynamic=False)
    assert dconfig.automatic_dynamic_shapes
    try:
        raise _errors.CollectiveTimeoutError("exchange #3 timed out", missing=[1])
    except _errors.CollectiveTimeoutError as e:
        original = e
    depth = len(list(_walk(original.__traceback__)))
    _C.set_pending_error(original)
    try:
        raised = []
        for _ in range(3):
            with pytest.raises(_errors.CollectiveTimeoutError) as info:
                f(torch.ones(2))
            raised.append(info.value)
            # dynamic=False's config patch (an enter hook) must not stay applied.
            assert dconfig.automatic_dynamic_shapes
        assert len({id(e) for e in raised}) == 3
        for e in raised:
            assert e is not original and e.__cause__ is original
            assert str(e) == str(original) and e.missing == [1]
        assert len(list(_walk(original.__traceback__))) == depth  # did not grow
    finally:
        _C.set_pending_error(None)
    torch.testing.assert_close(f(torch.ones(2)), torch.full((2,), 2.0))


def _walk(tb: Any) -> Any:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_pending_copy_falls_back_for_uncopyable_errors() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    err = Odd(1, 2)
    fresh = _errors.pending(err)
    assert isinstance(fresh, _errors.DynamoDistError) and fresh.__cause__ is err
    assert "1/2" in str(fresh)


def test_released_hook_breaks_the_cycle_and_passes_through() -> None:
    class Transport:
        def exchange(self, hit: bool, ident: int) -> bool:
            raise AssertionError("released hooks exchange nothing")

    tr = Transport()
    hook = _C.GuardHook(tr.exchange)
    tr.hook = hook  # type: ignore[attr-defined]  # the cycle: transport <-> C++ hook
    ref = weakref.ref(tr)
    hook.release()
    assert hook.exchange(False, 1) is False and hook.exchange(True, 1) is True
    del tr, hook
    gc.collect()
    assert ref() is None


def test_region_enter_from_many_threads_at_once() -> None:
    # The exit object (_C.region_exit) is created once at module init, never lazily on
    # a first call that could run Python code and switch threads halfway through.
    barrier = threading.Barrier(8)
    exits: list[Any] = []

    def enter() -> None:
        barrier.wait()
        ex = _C.RegionEnter(3)()
        exits.append(ex)
        ex()

    threads = [threading.Thread(target=enter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(exits) == 8 and {id(e) for e in exits} == {id(_C.region_exit)}


def _breaks(x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.graph_break()
    return x + 1


def _calls_two(x: torch.Tensor) -> torch.Tensor:
    # Dynamo's code for this frame calls _breaks (its graph break stops inlining) and
    # then the resume function: two frames entered from one Dynamo-generated caller.
    y = _breaks(x * 2)
    return y * 3


class _RecordingPolicy:
    """The callback's view of a policy, recording first-entry identities by frame name."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.first: list[tuple[str, int]] = []

    def check_thread(self) -> None:
        pass

    @dynamo_hook.transparent
    def exchange_first_entry(self, code: Any = None) -> bool:
        ident = dynamo_hook.identity(code)
        self.first.append((code.co_name, ident))
        return bool(self.hook.exchange(False, ident))

    def take_mixed(self) -> None:
        return None


def test_identity_includes_the_callee_on_both_paths() -> None:
    from dynamo_dist.dynamo import hook as dynamo_hook

    seen: list[int] = []
    hook = _C.GuardHook(lambda hit, ident: seen.append(ident) or hit)
    policy = _RecordingPolicy(hook)
    group = types.SimpleNamespace(policy=policy, info=None, counts=Counts(), hook=hook)
    router = _C.Router()
    torch._dynamo.reset()
    with ranks.hook_installed(router):  # type: ignore[arg-type]
        with _adopting(group, 777):
            f = torch.compile(_calls_two, backend="eager")
        f(torch.ones(2))  # first entries: the callback path
        first = [ident for _, ident in policy.first]
        names = [name for name, _ in policy.first]
        del seen[:]
        f(torch.ones(2))  # every frame has entries now: the hook path
    torch._dynamo.reset()
    assert names[0] == "_calls_two" and "_breaks" in names and len(names) >= 3, names
    # The same frames get the same identities through the hook as through the callback.
    assert seen == first, (names, seen, first)
    # _breaks and the resume function share their (Dynamo-generated) caller but are
    # different frames.
    assert len(set(first)) == len(first), names
    assert "_breaks" in dynamo_hook.describe_identity(first[names.index("_breaks")])


def test_hook_finds_the_callee_from_generators_c_calls_and_deep_stacks() -> None:
    """The hook's callee lookup must agree with the callback's wherever the call comes from."""

    seen: list[int] = []
    hook = _C.GuardHook(lambda hit, ident: seen.append(ident) or hit)
    policy = _RecordingPolicy(hook)
    group = types.SimpleNamespace(policy=policy, info=None, counts=Counts(), hook=hook)
    torch._dynamo.reset()
    with ranks.hook_installed(_C.Router()):  # type: ignore[arg-type]
        with _adopting(group, 778):
            f = torch.compile(lambda x: x + 1, backend="eager")

        def call() -> None:
            f(torch.ones(2))

        def gen() -> Any:
            while True:
                call()
                yield

        def deep(n: int) -> None:
            a = b = c = d = e = g2 = n  # noqa: F841  (bigger frames: the stack spills into new chunks)
            if n == 0:
                call()
            else:
                deep(n - 1)

        call()  # first entry
        (expected,) = [ident for _, ident in policy.first]
        del seen[:]
        call()
        g = gen()
        next(g)
        next(g)
        list(map(lambda _: call(), range(2)))  # called from C
        for n in (10, 200, 600):
            deep(n)
        assert _C._pending_callee_code() is None  # outside the hook: nothing pending
    torch._dynamo.reset()
    assert len(seen) == 8 and set(seen) == {expected}, (seen, expected)


# -- rank programs ------------------------------------------------------------------------
def _fn(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _other(x: torch.Tensor) -> torch.Tensor:
    return x - 3


def two_threads(rank: int, world: int) -> dict[str, Any]:
    """The main thread trains; a second thread calls compiled code, then does it inside local()."""
    cb = CountingBackend()
    f = dynamo_dist.compile(_fn, backend=cb)
    g = dynamo_dist.compile(_other, backend=cb)
    for _ in range(3):
        f(torch.ones(4))
    errors: dict[str, str] = {}

    def second() -> None:
        for name, fn in (("hit", f), ("first_entry", g)):
            try:
                fn(torch.ones(4))
                errors[name] = "no error"
            except _errors.DynamoDistError as e:
                errors[name] = str(e)
        with dynamo_dist.local():
            for _ in range(20):
                f(torch.ones(4))
                g(torch.ones(4))

    t = threading.Thread(target=second, name="eval-thread")
    t.start()
    # Concurrently with the second thread's local() calls: the owner keeps exchanging.
    outs = [float(f(torch.ones(4)).sum()) for _ in range(20)]
    t.join()
    outs += [float(g(torch.ones(4)).sum()) for _ in range(3)]
    return result(cb, True, errors=errors, outs=outs)


def stances(rank: int, world: int) -> dict[str, Any]:
    """Each set_stance mode that bypasses the frame callback, with a miss on rank 1 only."""
    cb = CountingBackend()
    f = dynamo_dist.compile(_fn, backend=cb)
    f(torch.ones(4))
    counts: dict[str, Any] = {}
    for stance in ("eager_on_recompile", "fail_on_recompile", "eager_then_compile"):
        n = 4 if rank == 0 else 5 + len(counts)  # rank 1 misses
        outcome = "ok"
        with torch.compiler.set_stance(stance):
            try:
                f(torch.ones(n))
                f(torch.ones(4))
                h = dynamo_dist.compile(lambda x: x.cos(), backend=cb)  # a new frame
                h(torch.ones(3))
                h(torch.ones(3))
            except Exception as e:
                outcome = type(e).__name__
        counts[stance] = {"exchanges": dynamo_dist.stats()["exchanges"], "outcome": outcome}
    f(torch.ones(4))  # default stance again: still paired
    counts["after"] = {"exchanges": dynamo_dist.stats()["exchanges"]}
    return result(cb, True, counts=counts)


def shutdown_frees_transport(rank: int, world: int) -> dict[str, Any]:
    from dynamo_dist.dist import runtime

    f = dynamo_dist.compile(_fn, backend="eager")
    f(torch.ones(4))
    rt = runtime.current()
    transport = ranks.world_transport(rt)
    assert rt is not None and transport is not None
    name = transport.name
    ref = weakref.ref(transport)
    del transport
    del rt
    dynamo_dist.shutdown()
    del f
    gc.collect()
    return {"ok": True, "transport": name, "alive": ref() is not None}


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_second_thread_gets_an_error_unless_local(tmp_path) -> None:
    run = ranks.launch(__file__, "two_threads", tmp=tmp_path, timeout=240)
    r0, r1 = run.rank(0), run.rank(1)
    assert r0["ok"] and r1["ok"], run.output[-3000:]
    for r in (r0, r1):
        for path in ("hit", "first_entry"):
            msg = r["errors"][path]
            assert "eval-thread" in msg and "MainThread" in msg, msg
            assert "dynamo_dist.local()" in msg
    assert r0["stats"]["exchanges"] == r1["stats"]["exchanges"]
    assert r0["stats"]["divergences"] == r1["stats"]["divergences"] == 0
    assert r0["outs"] == r1["outs"]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_stances_keep_exchanges_aligned(tmp_path) -> None:
    run = ranks.launch(__file__, "stances", tmp=tmp_path, timeout=240)
    r0, r1 = run.rank(0), run.rank(1)
    assert r0["ok"] and r1["ok"], run.output[-3000:]
    assert r0["counts"] == r1["counts"], (r0["counts"], r1["counts"])
    assert "Timeout" not in run.output


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_shutdown_frees_the_transport(tmp_path) -> None:
    run = ranks.launch(__file__, "shutdown_frees_transport", tmp=tmp_path, timeout=240)
    for r in (0, 1):
        rec = run.rank(r)
        assert rec["ok"], rec
        assert rec["transport"] == "shm" and rec["alive"] is False, rec


if __name__ == "__main__":
    ranks.main(globals())


def test_a_region_left_entered_never_routes_to_a_freed_hook() -> None:
    # torch can raise in its own `finally` before it runs the exit hooks, leaving the
    # region entered; the entry keeps its hook alive (this used to read freed memory).
    router = _C.Router()
    exit_ = _C.RegionEnter(41, _C.GuardHook(lambda hit, ident: hit))()
    gc.collect()
    for _ in range(5):
        _C.GuardHook(lambda hit, ident: 1 / 0)  # would reuse the freed hook's memory
    assert router(True) is True
    exit_()


def test_release_while_another_thread_waits_in_the_exchange() -> None:
    # Shutdown (at exit, say) releases the hook while a thread waits in its exchange
    # without the GIL: the waiter keeps the segment until it returns (it used to be
    # unmapped under it).
    name = f"/dd_test_release_{os.getpid()}"
    shm0 = _C.ShmExchange(name, True, 0, 2, False, 30.0, 60.0)
    shm1 = _C.ShmExchange(name, False, 1, 2, False, 30.0, 60.0)
    shm0.unlink()
    hook = _C.GuardHook(shm0, lambda *a: a[3])
    got: list[Any] = []

    def waiter() -> None:
        try:
            got.append(hook.exchange(True, 7))
        except BaseException as e:  # reported to the test
            got.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while shm0.waiting_for() < 0.2 and time.monotonic() < deadline:
        time.sleep(0.05)
    hook.release()
    del shm0
    gc.collect()
    shm1.abort()  # the peer gives up: the waiter returns through its slow path
    t.join(30)
    assert not t.is_alive() and len(got) == 1, got
    del shm1
