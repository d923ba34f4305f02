"""The wrapper around Dynamo's frame callback: first-entry exchanges, policies, sticky errors.

Dynamo calls the C++ hook only for frames that already have compiled entries; the
first time a rank meets a frame (or after Dynamo's ``reset()``), it goes straight to
the callback. If we did nothing there, a rank holding entries would wait in an
exchange the fresh rank never joins: upstream's guard collectives hang or pair
unrelated frames exactly this way. So the wrapper runs the same exchange, with a local
"miss", before Dynamo compiles: every entry into a compiled frame is exchanged exactly
once on every rank, whatever its cache state.

The wrapper also tells each compile its group (``dist_local.compiling``: the consensus
and the cache agreement read it), or, inside ``dynamo_dist.local()``, to nobody. A
local compile runs against its own automatic-dynamic state, and the entries it adds
are not counted against the recompile limit of the calls outside ``local()``: on the
rank that evaluates, the training calls must hit the limit exactly when the other
ranks' do, or one rank would fall back to eager while the others compile.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from dynamo_dist import _errors
from dynamo_dist._log import get_logger
from dynamo_dist.dist import local as dist_local
from dynamo_dist.dist.local import GroupInfo
from dynamo_dist.dynamo import compat, names, patches, pgo
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C
from dynamo_dist.exchange.policy import Policy
from dynamo_dist.exchange.stats import Counts


class LocalEntries:
    """What ``dynamo_dist.local()`` compiled in this process: entry code, dynamic state."""

    def __init__(self) -> None:
        self.codes: dict[int, Any] = {}  # id -> code object (kept alive: ids stay unique)
        self.frames: set[Any] = set()  # frame code objects with at least one local entry
        self._views = threading.local()

    def code_state(self) -> dict[Any, Any]:
        """The automatic-dynamic view of this thread's local compiles (one per thread).

        ``local()`` is per thread: an evaluation thread's shapes must not make a dim
        dynamic in another thread's rank-local compiles, as they must not in training's.
        """
        view: dict[Any, Any] | None = getattr(self._views, "code_state", None)
        if view is None:
            view = self._views.code_state = {}
        return view

    def record(self, frame_code: Any, result: Any) -> None:
        code = getattr(getattr(result, "guarded_code", None), "code", None)
        if code is not None:
            self.codes[id(code)] = code
            self.frames.add(frame_code)

    def counts(self, frame: Any) -> tuple[int, int, int, int]:
        """``frame``'s cache entries that count toward its recompile limit, split in two.

        (local, local in total, lockstep, lockstep in total): "counting" entries are
        those Dynamo compares with ``recompile_limit`` (same ID_MATCH'd objects), the
        totals those it compares with ``accumulated_recompile_limit``.
        """
        if frame.f_code not in self.frames:
            return 0, 0, 0, 0
        out = [0, 0, 0, 0]
        try:
            for entry in compat.cache_entries(frame.f_code):
                base = 0 if id(compat.entry_code(entry)) in self.codes else 2
                out[base + 1] += 1
                out[base] += int(compat.same_id_matched_objs(frame, entry))
        except Exception:  # accounting must never break a compile
            return 0, 0, 0, 0
        return out[0], out[1], out[2], out[3]


local_entries = LocalEntries()


class SkippedCodes:
    """Code Dynamo chose not to compile again in this process, remembered across reset().

    Dynamo marks such code for good: ``SKIP`` (nothing to compile in it), and the callback
    is never called for it again, so no rank exchanges for it; or ``RUN_ONLY`` (the
    recompile limit), and each call runs a cached entry or eagerly, exchanged by the hook.
    ``torch._dynamo.reset()`` clears the mark and the entries. On a rank that resets
    alone, the next call reaches the callback, which would exchange a first entry the
    others never make (they still skip the code: a false ``RankDivergenceError`` against
    their next frame), or compile alone (they run eagerly at the limit: the compile's
    collectives wait for them). Replaying the decision keeps that rank where the others
    are (:meth:`GuardedCallback._replay`). Keyed by what the code is, not by its address:
    after a reset a rank builds the resume functions of a graph break anew, as new code
    objects the ranks that did not reset still skip.
    """

    def __init__(self) -> None:
        self._actions: dict[tuple[Any, ...], tuple[int, int]] = {}

    @staticmethod
    def _key(code: Any) -> tuple[Any, ...]:
        """The code's value: equal for the same code rebuilt, unequal for any other.

        CPython's code equality (``code_richcompare``) compares the name, first line,
        flags, argument counts, bytecode (unspecialised), constants by type and value
        with nested code recursively, names, local names, line and exception tables;
        file and qualified name are added here. File, line, name and bytecode alone
        made two lambdas on one line that call different methods (``t.size()``,
        ``t.sin()``: only ``co_names`` differ) share one decision. Not a hash of
        ``marshal.dumps``: its output depends on reference counts and interning.
        The key holds the code alive, as long as the decision lasts: the process.
        """
        return (code.co_filename, getattr(code, "co_qualname", code.co_name), code)

    def record(self, code: Any, result: Any) -> None:
        actions = compat.code_decision(result)
        if actions is not None:
            self._actions[self._key(code)] = actions

    def decided(self, code: Any) -> tuple[int, int] | None:
        """The earlier decision for ``code`` (None: Dynamo never decided for it)."""
        return self._actions.get(self._key(code))


skipped_codes = SkippedCodes()
# Decisions Dynamo made inside local(): replayed inside local() only, never code-wide.
local_skips = SkippedCodes()


def is_tracer_frame(frame: Any) -> bool:
    """Whether ``frame`` runs a profile or trace function of this thread (``sys.setprofile`` ...).

    The interpreter calls them on its own, inside a compiled call too, and Dynamo's frame
    callback sees their frames: on a rank with a profiler only. Exchanged like the
    program's frames, they would pair with the other ranks' next exchange of another
    frame (a false ``RankDivergenceError``); so they are skipped, with every frame they
    call, and never traced or exchanged. A profiler's C callback (``cProfile``) has no
    frame to see.

    Three kinds of function can be running as a tracer: the profile function, the global
    trace function (called at each new frame), and the *local* ones the global one
    returned for the frames it traces (``f_trace``: stdlib ``trace``, ``pdb``), called
    for their lines and returns. Each is matched by the code it runs (:func:`_code_of`).
    The frame's own ``f_back`` is not linked yet when Dynamo's callback sees it, and the
    frame being traced lies under the callback's own frames and Dynamo's wrappers: so the
    local ones of every frame on the stack are matched, and only while a trace function
    is set (without one, the interpreter calls no local one). A program calling its own
    tracer directly would be skipped there too. On first entries only, never per call.
    """
    code = frame.f_code
    trace = sys.gettrace()
    if any(fn is not None and _code_of(fn) is code for fn in (sys.getprofile(), trace)):
        return True
    if trace is None:
        return False
    caller: Any = sys._getframe(1)
    while caller is not None:
        local = caller.f_trace
        if local is not None and _code_of(local) is code:
            return True
        caller = caller.f_back
    return False


def _code_of(fn: Any) -> Any:
    """The Python code that calling ``fn`` runs first (None: C code, no frame to see).

    Through ``functools.partial``, bound methods, and objects whose class defines
    ``__call__``; a partial of a bound method of a callable object takes three steps.
    """
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        code = getattr(fn, "__code__", None)
        if code is not None:
            return code
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__func__"):  # a bound method
            fn = fn.__func__
        elif callable(fn):
            fn = type(fn).__call__
        else:
            return None
    return None


log = get_logger("runtime")
_warned: set[Any] = set()


class GuardedCallback:
    """Wraps Dynamo's frame callback: first-entry exchanges, policies, groups, sticky errors."""

    def __init__(
        self,
        inner: Callable[..., Any],
        policy: Policy | None,
        policy_name: str,
        group: GroupInfo | None,
        counts: Counts,
        before_compile: Callable[[Any], None] | None = None,
        region: int = -1,
    ) -> None:
        self._inner = inner
        self._region = region  # the compiled region (dynamo.hook): its compiles' label
        # Called with each frame about to be compiled, before Dynamo sees it (the shared
        # cache's automatic-dynamic profile files entries of closures there).
        self._before_compile = before_compile
        self._policy = policy  # None: a group of one rank, nobody to exchange with
        self._policy_name = policy_name
        self._group = group
        self._counts = counts
        # Dynamo's C++ get_backend() follows this chain to find the backend
        # that keys its cache entries; it must lead through us to the real one.
        self._torchdynamo_orig_backend = inner

    def __getattr__(self, name: str) -> Any:
        if name == "_inner" or name.startswith("__"):
            # Not set yet (copy.deepcopy, unpickling): never look it up through itself.
            raise AttributeError(name)
        return getattr(self._inner, name)

    @dynamo_hook.transparent
    def __call__(self, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        if is_tracer_frame(frame):
            return compat.skip_code(compat.skip_recursively())
        err = _C.pending_error()
        if err is not None:
            raise _errors.pending(err)
        if cache_entry is None:
            decided = skipped_codes.decided(frame.f_code)
            if decided is not None:
                return self._replay(frame, decided)
        if dist_local.is_local():  # inside local(), or in a forked child of a rank
            return self._local(frame, cache_entry, frame_state)
        policy = self._policy
        forced = False
        if policy is not None:
            # A thread other than the group's owner: the hook exchanged nothing for it
            # (and forced this call here); raise on this thread only.
            policy.check_thread()
            if cache_entry is None and compat.dynamo_would_trace(frame.f_code):
                # Called from here so that its skip=2 lands on the frame's caller.
                policy.exchange_first_entry(frame.f_code)
            outcome = policy.take_mixed()
            if outcome is not None:
                policy.handle_mixed(outcome, self._policy_name, frame, cache_entry)
                forced = outcome.hit  # this rank's guards passed; another rank's failed
        if self._before_compile is not None:
            try:
                self._before_compile(frame)
            except Exception:  # it must never stop a compile
                log.debug("the before-compile hook failed", exc_info=True)
        specific, total, _, _ = local_entries.counts(frame)
        mark = compat.last_compile_record() if cache_entry is not None else None
        with (
            dist_local.compiling(self._group, self._region),
            patches.recompile_headroom(specific, total),
        ):
            result = self._inner(frame, cache_entry, frame_state)
        skipped_codes.record(frame.f_code, result)
        if getattr(result, "guarded_code", None) is not None:
            self._counts.compiles += 1
            self._count_traced(cache_entry, mark, forced)
        return result

    def _count_traced(self, cache_entry: Any, mark: Any, forced: bool = False) -> None:
        """Count a frame Dynamo traced: a recompile (and why) if it had entries already."""
        reason = None
        if forced:
            reason = "forced: another rank's guards failed (policy sync)"
        elif cache_entry is not None:
            try:
                reason = compat.recompile_reason_since(mark)
            except Exception:  # accounting must never break a compile
                reason = "unknown"
        self._counts.count_traced(dynamo_hook.region_label(self._region), reason)

    @dynamo_hook.transparent
    def _replay(self, frame: Any, actions: tuple[int, int]) -> Any:
        """Dynamo's earlier decision for this code, which a ``reset()`` cleared (SkippedCodes).

        ``SKIP``: skipped again, with no exchange, as on the ranks that did not reset.
        ``RUN_ONLY``: those ranks still hold entries, and their hook exchanges every call;
        this rank joins each of those exchanges here, then runs the call eagerly without
        marking the code (so the next call comes back here), as they do after a miss or a
        forced one. Neither side reaches the policy, so the outcome is dropped.
        """
        if not compat.is_run_only(actions):
            return compat.skip_code(actions)
        policy = self._policy
        if policy is not None and not dist_local.is_local():
            policy.check_thread()
            policy.exchange_first_entry(frame.f_code)
            policy.take_mixed()
        return compat.run_eagerly_once()

    def _local(self, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        """Plain torch.compile on this rank: nothing exchanged, nothing shared with lockstep.

        Local entries get a recompile limit of their own. Were they to reach Dynamo's,
        Dynamo would mark the code object to run eagerly for good, lockstep calls
        included, on this rank only; so at the limit this call runs eagerly instead.

        A decision Dynamo makes for the whole code here (``SKIP``: nothing to compile for
        this rank-local input) is applied to this call only, and kept apart from the
        lockstep decisions (``local_skips``, replayed inside local() only). Marked on the
        code, the lockstep calls of this rank would skip it with no exchange while the
        other ranks compile and exchange it; recorded in ``skipped_codes``, a reset would
        replay it there. The lockstep calls decide for themselves, on every rank together.
        """
        dist_local.warn_forked_child()
        if cache_entry is None:
            decided = local_skips.decided(frame.f_code)
            if decided is not None:  # as Dynamo's mark would: no trace, for local calls
                return compat.decide_once(decided)
        local_same, local_total, lock_same, lock_total = local_entries.counts(frame)
        specific, accumulated = compat.recompile_limits()
        if local_same >= specific or local_total >= accumulated:
            if frame.f_code not in _warned:
                _warned.add(frame.f_code)
                log.warning(
                    "%s reached the recompile limit (%d) with entries compiled inside "
                    "dynamo_dist.local(); further rank-local calls that miss run eagerly (the "
                    "calls outside local() keep their own limit)",
                    names.describe_code(frame.f_code),
                    specific,
                )
            return compat.run_eagerly_once()
        mark = compat.last_compile_record() if cache_entry is not None else None
        with (
            dist_local.compiling(None, self._region),
            pgo.isolated_code_state(local_entries.code_state()),
            patches.recompile_headroom(lock_same, lock_total),
        ):
            result = self._inner(frame, cache_entry, frame_state)
        decided = compat.code_decision(result)
        if decided is not None:
            local_skips.record(frame.f_code, result)
            return compat.decide_once(decided)
        if getattr(result, "guarded_code", None) is not None:
            self._counts.local_compiles += 1
            self._count_traced(cache_entry, mark)
            local_entries.record(frame.f_code, result)
        return result
