"""Every private torch API dynamo_dist uses, in one place.

Each function names the torch versions it is known to work with (CI runs 2.13 on
CPU; the GPU hosts run 2.11; the package supports >= 2.9). Anything that patches
torch does so in a scoped, restorable way: it returns what it replaced.

Sections, in the order of the architecture (hook -> exchange -> policy -> consensus
-> cache): add new shims to the section of the module that needs them.
"""

from __future__ import annotations

import json
import threading
import types
from typing import Any

# -- observability (tlparse, counters) ----------------------------------------------------


def trace_artifact(name: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as a structured-trace artifact (shown by tlparse with TORCH_TRACE).

    ``torch._logging.trace_structured``: torch 2.2+; the ``artifact`` form with
    ``metadata_fn``/``payload_fn`` is stable from 2.4 through 2.13. A no-op (cheap)
    when no structured trace is being written.
    """
    from torch._logging._internal import trace_structured

    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"dynamo_dist_{name}", "encoding": "json"},
        payload_fn=lambda: json.dumps(payload, default=str, sort_keys=True),
        # Our events happen outside any compile (guard exchanges, cache waits).
        expect_trace_id=False,
    )


def bump_counter(group: str, name: str, by: int = 1) -> None:
    """``torch._dynamo.utils.counters[group][name] += by`` (torch 2.0 through 2.13)."""
    from torch._dynamo.utils import counters

    counters[group][name] += by


# -- hook, exchange, policy, consensus (Dynamo) ---------------------------------------------

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import AbstractContextManager  # noqa: E402

# Supported torch versions for every shim below: >= 2.9 (the package's floor), run on
# 2.11 on the GPU hosts and 2.13 in CI. A shim that needs a newer API says so.


def set_guard_complete_hook(hook: object | None) -> object | None:
    """Install ``hook`` as Dynamo's guard-complete hook and return the previous one.

    ``torch._C._dynamo.eval_frame.set_guard_complete_hook``: torch 2.9 through 2.13.
    Callers restore what this returns (see ``_hook.install``/``uninstall``).
    """
    from typing import cast

    from torch._C._dynamo.eval_frame import set_guard_complete_hook as set_hook

    # Dynamo's stub wants its Protocol; the C++ hook is a pybind11 callable of that shape.
    return set_hook(cast(Any, hook))


def is_dynamo_output(code: Any) -> bool:
    """Whether ``code`` is bytecode Dynamo generated (its layout depends on compile history).

    ``torch._dynamo.convert_frame.output_codes.seen_ids``: torch 2.9 through 2.13.
    """
    try:
        from torch._dynamo.convert_frame import output_codes
    except ImportError:  # pragma: no cover
        return False
    return id(code) in output_codes.seen_ids


def guard_failure_reasons(frame: Any, cache_entry: Any) -> list[str]:
    """Dynamo's own reasons why ``frame`` failed the guards of its cache entries.

    ``torch._dynamo.guards.get_and_maybe_log_recompilation_reasons``: torch 2.9 through
    2.11 take the first cache entry (a linked list); 2.12 and 2.13 take the list of
    entries (``torch._C._dynamo.eval_frame._debug_get_cache_entry_list``). Raises on an
    unknown torch; callers turn that into a generic reason.
    """
    import inspect
    from typing import cast

    import torch
    from torch._dynamo.guards import get_and_maybe_log_recompilation_reasons as reasons_fn

    first = next(iter(inspect.signature(reasons_fn).parameters))
    if first == "cache_entries":  # torch >= 2.12 takes the list of entries
        entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(frame.f_code)
        reasons = reasons_fn(entries, frame, cast(Any, None), skip_logging=True)
    else:  # older torch walks the linked list from the first entry
        reasons = reasons_fn(cache_entry, frame, cast(Any, None), skip_logging=True)
    return [str(r) for r in reasons]


def dynamo_would_trace(code: Any) -> bool:
    """Whether Dynamo would trace ``code``: not disabled, and not skip-listed.

    ``torch._dynamo.config.disable`` and ``torch._dynamo.trace_rules.check``: torch 2.9
    through 2.13. Skip-listed code never gets cache entries, so it is never exchanged.
    """
    from torch._dynamo import config as dconfig
    from torch._dynamo import trace_rules

    if dconfig.disable:
        return False
    try:
        return not trace_rules.check(code)
    except Exception:
        return True


_optimize_lock = threading.RLock()  # wrapping_optimize windows, one thread at a time


def wrapping_optimize(
    wrap: Callable[[Any], Any], backend: Callable[[Any], Any] | None = None
) -> AbstractContextManager[None]:
    """While active, pass every context ``torch._dynamo.optimize`` builds through ``wrap``.

    ``backend``, if given, replaces the backend object torch.compile built from its
    arguments (``inductor`` with ``mode`` and ``options``, say) with ``backend(built)``.
    ``torch.compile`` ends with ``torch._dynamo.optimize(backend=..., ...)(model)`` in torch
    2.9 through 2.13. Patched for the duration of the ``with`` block only, and restored on
    exit. Windows of different threads take turns (a lock): interleaved, their saves and
    restores would leave ``optimize`` patched for good. Within a window, only this
    thread's calls are wrapped.
    """
    import contextlib

    import torch._dynamo as dynamo

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        with _optimize_lock:
            original = dynamo.optimize
            owner = threading.get_ident()

            def optimize(*args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() != owner:
                    return original(*args, **kwargs)
                if backend is not None and "backend" in kwargs:
                    kwargs["backend"] = backend(kwargs["backend"])
                return wrap(original(*args, **kwargs))

            dynamo.optimize = optimize
            try:
                yield
            finally:
                dynamo.optimize = original

    return scope()


def default_store() -> Any:
    """The job's key-value store (raises when there is none).

    ``torch.distributed.distributed_c10d._get_default_store``: torch 2.9 through 2.13.
    """
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def inductor_backend(mode: str | None, options: dict[str, Any] | None, dynamic: bool | None) -> Any:
    """The backend object ``torch.compile(backend="inductor", ...)`` builds.

    ``torch._TorchCompileInductorWrapper(mode, options, dynamic)``: torch 2.9 through 2.13.
    """
    from typing import cast

    import torch

    return cast(Any, torch._TorchCompileInductorWrapper)(mode, options, dynamic)


def is_inductor_backend(backend: Any) -> bool:
    """Whether ``backend`` is what ``torch.compile(backend="inductor")`` built (not AOTI).

    ``torch._TorchCompileInductorWrapper``: torch 2.9 through 2.13.
    """
    import torch

    return type(backend) is getattr(torch, "_TorchCompileInductorWrapper", None)


def _compiler_collective(gather: Callable[[Any, Any], list[Any]]) -> Callable[[Any], None]:
    """Dynamo's ``OutputGraph.run_compiler_collective``, without the accelerator device context.

    ``gather(group, obj)`` is the object all-gather over the compile's group. Mirrors torch
    2.9 through 2.13: ``root_tx.distributed_state``, ``speculation_log`` and
    ``exc.CompileCollectiveRestartAnalysis``.
    """

    def run_compiler_collective(self: Any) -> None:
        import logging

        from torch._dynamo import exc

        tx = self.root_tx
        if tx is None:
            raise AssertionError("root_tx must not be None")
        ds = tx.distributed_state
        if ds is not None and ds.all_states is None:
            logging.getLogger("dynamo_dist.consensus").debug(
                "compiler collective: %s", ds.local_state
            )
            ds.all_states = gather(ds.compile_pg, ds.local_state)
            # Tracing may diverge from here with the merged information.
            tx.speculation_log.clear()
            raise exc.CompileCollectiveRestartAnalysis

    return run_compiler_collective


def install_compiler_collectives(
    group_for_compile: Callable[[], Any | None],
    gather: Callable[[Any, Any], list[Any]],
) -> Callable[[], None] | None:
    """Turn on Dynamo's compiler collectives, over the group ``group_for_compile()`` names.

    Dynamo asks ``get_compile_pg()`` once per compile; the answer is the group of the
    compile in progress (None: this compile talks to nobody, e.g. one inside
    ``dynamo_dist.local()`` or plain ``torch.compile`` code elsewhere). None when this
    torch has no compiler collectives. Sets ``torch._dynamo.config.enable_compiler_collectives``,
    replaces ``torch._dynamo.convert_frame.get_compile_pg`` and
    ``OutputGraph.run_compiler_collective`` (upstream enters a device context that CPU/gloo
    jobs lack): torch 2.9 through 2.13.
    """
    try:
        import torch._dynamo.config as dconfig
        import torch._dynamo.convert_frame as convert_frame
        from torch._dynamo.output_graph import OutputGraph
    except ImportError:  # pragma: no cover
        return None
    if (
        not hasattr(dconfig, "enable_compiler_collectives")
        or not hasattr(OutputGraph, "run_compiler_collective")
        or not hasattr(convert_frame, "get_compile_pg")
    ):
        return None
    saved_config = dconfig.enable_compiler_collectives
    saved_get = convert_frame.get_compile_pg
    saved_method = OutputGraph.__dict__["run_compiler_collective"]
    dconfig.enable_compiler_collectives = True
    convert_frame.get_compile_pg = group_for_compile
    OutputGraph.run_compiler_collective = _compiler_collective(gather)  # type: ignore[method-assign,assignment]

    def restore() -> None:
        dconfig.enable_compiler_collectives = saved_config
        convert_frame.get_compile_pg = saved_get
        OutputGraph.run_compiler_collective = saved_method  # type: ignore[method-assign]

    return restore


def cache_entries(code: Any) -> list[Any]:
    """Dynamo's cache entries for ``code``, most recently used first.

    ``torch._C._dynamo.eval_frame._debug_get_cache_entry_list``: torch 2.9 through 2.13.
    """
    import torch

    return list(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code))


def entry_code(entry: Any) -> Any:
    """The bytecode a cache entry runs (``_CacheEntry.code``: torch 2.9 through 2.13)."""
    return getattr(entry, "code", None)


def same_id_matched_objs(frame: Any, entry: Any) -> bool:
    """Whether ``entry`` counts toward ``frame``'s recompile limit.

    ``torch._dynamo.cache_size._has_same_id_matched_objs``: torch 2.9 through 2.13.
    """
    from torch._dynamo.cache_size import _has_same_id_matched_objs

    return bool(_has_same_id_matched_objs(frame, entry))


def recompile_headroom(specific: int, accumulated: int) -> AbstractContextManager[None]:
    """Raise Dynamo's recompile limits by the given numbers of entries for one compile.

    ``torch._dynamo.config.recompile_limit`` / ``accumulated_recompile_limit`` (their
    ``config.patch``): torch 2.9 through 2.13. Restored on exit.
    """
    import contextlib

    import torch._dynamo.config as dconfig

    if not specific and not accumulated:
        return contextlib.nullcontext()
    patch: Any = dconfig.patch(
        recompile_limit=dconfig.recompile_limit + specific,
        accumulated_recompile_limit=dconfig.accumulated_recompile_limit + accumulated,
    )
    return patch


def recompile_limits() -> tuple[int, int]:
    """(``recompile_limit``, ``accumulated_recompile_limit``): torch 2.9 through 2.13."""
    import torch._dynamo.config as dconfig

    return int(dconfig.recompile_limit), int(dconfig.accumulated_recompile_limit)


def run_eagerly_once() -> Any:
    """What a frame callback returns to run this call eagerly, leaving the code compilable.

    ``ConvertFrameReturn(FrameExecStrategy(SKIP, DEFAULT), apply_to_code=False)`` in
    ``torch._dynamo.types``: torch 2.9 through 2.13.
    """
    from torch._dynamo.types import ConvertFrameReturn, FrameAction, FrameExecStrategy

    return ConvertFrameReturn(
        frame_exec_strategy=FrameExecStrategy(FrameAction.SKIP, FrameAction.DEFAULT),
        apply_to_code=False,
    )


class isolated_code_state:
    """Run a compile against its own automatic-dynamic state, keeping another one aside.

    ``torch._dynamo.pgo.get_code_state()`` (the process's ``CodeId -> CodeState`` map that
    automatic dynamic updates in place): torch 2.9 through 2.13. ``view`` is the state to
    compile against (a dict, filled from a copy of the current state when empty); on exit
    it holds what the compile learned and the current state is restored.
    """

    def __init__(self, view: dict[Any, Any]) -> None:
        self._view = view
        self._saved: dict[Any, Any] | None = None

    def __enter__(self) -> None:
        import copy

        from torch._dynamo.pgo import get_code_state

        state = get_code_state()
        self._saved = dict(state)
        if not self._view:
            self._view.update(copy.deepcopy(self._saved))
        state.clear()
        state.update(self._view)

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.pgo import get_code_state

        state = get_code_state()
        self._view.clear()
        self._view.update(state)
        state.clear()
        state.update(self._saved or {})


# -- automatic-dynamic profile (Dynamo PGO) ---------------------------------------------------
#
# ``torch._dynamo.pgo``'s process-wide code state (``get_code_state()``: a defaultdict of
# ``CodeId -> CodeState``) and ``torch.compiler.config.job_id``: torch 2.9 through 2.13.


def compiler_job_id() -> str | None:
    """The user's ``torch.compiler.config.job_id`` (None when unset); never written here."""
    import torch.compiler

    job = getattr(torch.compiler.config, "job_id", None)
    return job if isinstance(job, str) and job else None


def pgo_state() -> dict[Any, Any]:
    """The process's live code state (``get_code_state()``), updated in place by Dynamo."""
    from torch._dynamo.pgo import get_code_state

    return get_code_state()


def pgo_dynamic_marks(state: dict[Any, Any] | None = None) -> frozenset[str]:
    """What a code state marks dynamic: one string per (frame, source) that varies.

    Only these marks change what a restart compiles (a static size seen again compiles
    the same graph with or without a profile), so only a new mark is worth publishing.
    ``state`` defaults to the live one.
    """
    marks = set()
    for code_id, code_state in list((pgo_state() if state is None else state).items()):
        for source, entry in list(code_state.automatic_dynamic.items()):
            shown = entry.render()
            if "?" in shown or "dynamic" in shown:
                marks.add(f"{code_id}|{source}|{shown}")
    return frozenset(marks)


def pgo_dumps(state: dict[Any, Any] | None = None) -> bytes:
    """A code state (default: the live one), pickled as ``torch._dynamo.pgo`` pickles it."""
    import pickle

    return pickle.dumps(pgo_state() if state is None else state)


def pgo_union(base: dict[Any, Any], others: list[dict[Any, Any]]) -> dict[Any, Any]:
    """A copy of ``base`` with ``others`` merged in, as Dynamo merges sizes.

    A dimension one rank saw vary is dynamic in the result (``FrameStateSizeEntry |=``,
    pgo's own merge). For frames without a graph (``DDP.forward`` before the module
    call), compiler collectives do not run, so each rank's view can differ; the union
    is what every rank needs on restart. An entry that cannot be merged (another
    dimensionality) keeps the live value.
    """
    import copy

    merged = copy.deepcopy(base)
    for state in others:
        for code_id, code_state in state.items():
            mine = merged.get(code_id)
            if mine is None:
                merged[code_id] = copy.deepcopy(code_state)
                continue
            for source, entry in code_state.automatic_dynamic.items():
                have = mine.automatic_dynamic.get(source)
                if have is None:
                    mine.automatic_dynamic[source] = copy.deepcopy(entry)
                    continue
                try:
                    have |= entry
                except Exception:  # a shape pgo cannot merge stays as it is
                    continue
    return merged


#: A closure's stable name in a published profile: its ``CodeId.closure_hash`` is
#: ``hash()`` of code objects, salted per process (PYTHONHASHSEED), so it never matches
#: in the next process; this prefix marks the stable form that replaces it.
_CLOSURE_SIG = "dd-closure:"


def _pgo_fields(cls: str) -> set[str]:
    """The dataclass fields of ``torch._dynamo.pgo.<cls>`` in this torch.

    ``CodeId.closure_hash`` and ``FrameStateSizeEntry.excluded_sizes`` /
    ``excluded_scalar`` are in torch 2.13 but not in 2.11 (GPU hosts): code that
    reads or builds them asks first.
    """
    import dataclasses

    import torch._dynamo.pgo as pgo

    return {f.name for f in dataclasses.fields(getattr(pgo, cls))}


def pgo_closure_ids(closure: Any) -> tuple[int, str] | None:
    """(Dynamo's per-process closure hash, a stable name) of a frame's closure, or None.

    The stable name lists, per cell, what pgo hashes (the code object of a callable
    cell), by file content hash, line and name, the same for the same code in any process.
    """
    if not closure or not _pgo_fields("CodeId") >= {"closure_hash"}:
        return None  # torch 2.11's pgo names a closure's frame by its code alone
    from torch._dynamo.pgo import _get_cell_hash_content, _hash_containing_file

    contents: tuple[Any, ...] = tuple(_get_cell_hash_content(c) for c in closure)
    parts = []
    for code in contents:
        if isinstance(code, types.CodeType):
            parts.append(
                f"{_hash_containing_file(code.co_filename)}:{code.co_firstlineno}:{code.co_name}"
            )
        else:
            parts.append("-")
    return hash(contents), _CLOSURE_SIG + "|".join(parts)


def pgo_stable(state: dict[Any, Any], names: dict[int, str]) -> dict[Any, Any]:
    """A copy of ``state`` whose closure hashes are replaced by stable names (``names``).

    A closure hash this process never named (a frame compiled before dynamo_dist saw it)
    cannot be carried to another process: its frame is left out.
    """
    import copy
    import dataclasses

    out = copy.deepcopy(state)
    for code_id in list(out):
        closure = getattr(code_id, "closure_hash", None)
        if closure is None or isinstance(closure, str):
            continue
        state_of = out.pop(code_id)
        if closure in names:
            out[dataclasses.replace(code_id, closure_hash=names[closure])] = state_of
    return out


#: The only globals a code state pickle may name (what pgo's own pickles contain).
_PGO_GLOBALS = {
    ("collections", "defaultdict"),
    ("torch._dynamo.pgo", "CodeState"),
    ("torch._dynamo.pgo", "CodeId"),
    ("torch._dynamo.pgo", "FrameStateSizeEntry"),
    ("torch._dynamo.pgo", "AutoDynamic"),
    ("torch._dynamo.pgo", "AutoUnset"),
    ("torch._dynamo.pgo", "InferStride"),
}


#: The pickle opcodes a code state may use: what ``pickle.dumps`` (protocols 2 to 5)
#: writes for dicts, lists, tuples, numbers, strings and pgo's classes. No sets, bytes,
#: extensions or persistent ids: nothing pgo writes, and less for a forged pickle to use.
_PGO_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE",
        "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        "SHORT_BINUNICODE", "BINUNICODE",
        "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "EMPTY_DICT",
        "EMPTY_LIST", "APPEND", "APPENDS",
        "SETITEM", "SETITEMS", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
        "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    }
)  # fmt: skip
#: Opcodes that build nothing: they fill a dict or an object already built (whose
#: items were counted when pushed), or frame the stream. Every other opcode counts one
#: object (MARK too: it starts a list), a memo reference to a container the whole
#: container, every shared element again; memoizing is free, but the memo may never
#: hold more entries than objects were built (a pickler memoizes each object once).
_PGO_FREE_OPCODES = frozenset(
    {"PROTO", "FRAME", "STOP", "SETITEM", "SETITEMS", "APPEND", "APPENDS", "BUILD"}
)
_PGO_MEMO_OPCODES = frozenset({"MEMOIZE", "BINPUT", "LONG_BINPUT"})
_INT64 = 1 << 63


class _Budget:
    """How many objects a code state may still build; TooManyObjects once past the cap."""

    __slots__ = ("cap", "used")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def spend(self) -> None:
        self.used += 1
        if self.used > self.cap:
            from dynamo_dist.dist.limits import TooManyObjects

            raise TooManyObjects(self.used, self.cap)


def _children(obj: Any) -> Any:
    """An iterator over what ``obj`` refers to (None for an atom), for :func:`_weigh`."""
    import enum
    import itertools

    if isinstance(obj, enum.Enum):
        return None  # ``AutoDynamic.token``: one process-wide member, never copied
    if type(obj) is tuple or type(obj) is list:
        return iter(obj)
    if isinstance(obj, dict):
        return itertools.chain.from_iterable(obj.items())
    if not isinstance(obj, type) and isinstance(getattr(obj, "__dict__", None), dict):
        return itertools.chain.from_iterable(vars(obj).items())
    return None


def _weigh(obj: Any, budget: _Budget) -> None:
    """Spend one object of ``budget`` per object reachable from ``obj``, repeats included.

    That is what a memo reference to a container costs once the state is rebuilt (each
    reference becomes a copy); a reference to an atom (a string, a number, a class) is
    shared as it is and costs nothing. Iterative, and it stops at the cap: cycles and
    deep nesting cost at most the budget.
    """
    first = _children(obj)
    if first is None:
        return
    budget.spend()
    stack = [first]
    while stack:
        child = next(stack[-1], _pgo_end)
        if child is _pgo_end:
            stack.pop()
            continue
        budget.spend()
        it = _children(child)
        if it is not None:
            stack.append(it)


_pgo_end = object()


def _pgo_key_ok(key: Any) -> bool:
    """Whether ``key`` may be a dict key in a code state: a str, or a CodeId of atoms.

    Hashing a key costs its size (a shared tuple hashed once per reference), and ints
    are trivially made to collide (``n`` and ``n + 2**61 - 1``), making each insertion
    cost the dict's size. pgo's keys are strings and CodeIds of strings and small ints.
    """
    if type(key) is str:
        return True
    from torch._dynamo.pgo import CodeId

    if type(key) is not CodeId:
        return False
    fields = vars(key)
    return len(fields) <= 8 and all(
        v is None or type(v) is str or (type(v) is int and -_INT64 <= v < _INT64)
        for v in fields.values()
    )


def _pgo_unpickler() -> type[Any]:
    """The restricted, counting unpickler of code states (built once, on first use).

    The pure-Python unpickler, with a dispatch table of :data:`_PGO_OPCODES` only, each
    counted against a :class:`_Budget`: its memo is a dict (the C unpickler grows an
    array to the largest memo index a pickle names, 8 bytes per index), and a counter
    can stop it at the cap wherever the pickle's memo references lead.
    """
    global _PgoUnpickler
    if _PgoUnpickler is not None:
        return _PgoUnpickler
    import pickle
    import pickletools
    from collections import defaultdict
    from collections.abc import Callable

    from torch._dynamo.pgo import CodeId, CodeState, FrameStateSizeEntry, InferStride

    base: dict[int, Callable[[Any], None]] = pickle._Unpickler.dispatch
    # BUILD may fill only these, and only instances this pickle created: an enum member
    # (``AutoDynamic.token``, what ``AutoDynamic.__new__`` returns) is process-wide, and
    # filling its ``__dict__`` would change pgo for the whole process.
    fillable = (CodeId, CodeState, FrameStateSizeEntry, InferStride)

    def created(self: Any) -> None:
        obj = self.stack[-1]
        if type(obj) in fillable:
            self.created[id(obj)] = obj  # kept alive: its id names it until the load ends

    class _Refusing(dict[int, Callable[[Any], None]]):
        def __missing__(self, code: int) -> Callable[[Any], None]:
            raise pickle.UnpicklingError(f"opcode {bytes([code])!r} is not in a code state")

    def counted(load: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            self.budget.spend()
            load(self)

        return run

    def reference(load: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            load(self)
            _weigh(self.stack[-1], self.budget)

        return run

    def keyed(load: Callable[[Any], None], items: Callable[[Any], list[Any]]) -> Any:
        def run(self: Any) -> None:
            for key in items(self):
                if not _pgo_key_ok(key):
                    raise pickle.UnpicklingError(
                        f"a code state's dict key is a {type(key).__name__}"
                    )
            load(self)

        return run

    def memoize(load: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            load(self)
            if len(self.memo) > self.budget.used:
                raise pickle.UnpicklingError("a code state memoizes more than it builds")

        return run

    def reduce(load: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            func, args = self.stack[-2], self.stack[-1]
            # defaultdict(factory, items) would fill (and hash) without SETITEMS' checks.
            if func is defaultdict and (type(args) is not tuple or len(args) > 1):
                raise pickle.UnpicklingError("a code state's defaultdict takes a factory only")
            self.budget.spend()
            load(self)
            created(self)

        return run

    def newobj(load: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            self.budget.spend()
            load(self)
            created(self)

        return run

    def build(load: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            inst, state = self.stack[-2], self.stack[-1]
            if self.created.get(id(inst)) is not inst or type(state) is not dict:
                raise pickle.UnpicklingError(
                    f"a code state may not fill a {type(inst).__name__} it did not create"
                )
            load(self)

        return run

    table = _Refusing()
    for op in pickletools.opcodes:
        if op.name not in _PGO_OPCODES:
            continue
        code = op.code.encode("latin-1")[0]
        load = base[code]
        if op.name in ("BINGET", "LONG_BINGET"):
            table[code] = reference(load)
        elif op.name == "SETITEM":
            table[code] = keyed(load, lambda u: [u.stack[-2]])
        elif op.name == "SETITEMS":
            table[code] = keyed(load, lambda u: u.stack[0::2])
        elif op.name == "REDUCE":
            table[code] = reduce(load)
        elif op.name == "NEWOBJ":
            table[code] = newobj(load)
        elif op.name == "BUILD":
            table[code] = build(load)
        elif op.name in _PGO_MEMO_OPCODES:
            table[code] = memoize(load)
        elif op.name in _PGO_FREE_OPCODES:
            table[code] = load
        else:
            table[code] = counted(load)

    class Unpickler(pickle._Unpickler):
        dispatch = table

        def __init__(self, data: bytes, budget: _Budget) -> None:
            import io

            super().__init__(io.BytesIO(data))
            self.budget = budget
            self.created: dict[int, Any] = {}

        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in _PGO_GLOBALS:
                raise ValueError(f"a code state may not name {module}.{name}")
            return super().find_class(module, name)

    _PgoUnpickler = Unpickler
    return Unpickler


_PgoUnpickler: type[Any] | None = None


def pgo_loads(data: bytes, max_objects: int | None = None) -> dict[Any, Any]:
    """Unpickle a code state, refusing any global but pgo's own classes (ValueError).

    The bytes were verified (signed, or from a private directory) before they got here;
    the restricted unpickler is a second wall: a forged profile cannot name ``os.system``.
    Unpickling and rebuilding each stop as soon as they have built ``max_objects``
    objects (default ``MAX_STORE_OBJECTS``), a shared object counted at every reference
    (``TooManyObjects``, a ValueError): a small pickle whose memo references expand to
    millions of objects costs at most the cap.
    """
    from dynamo_dist.dist.limits import MAX_STORE_OBJECTS

    cap = MAX_STORE_OBJECTS if max_objects is None else max_objects
    try:
        state = _pgo_unpickler()(data, _Budget(cap)).load()
    except ValueError:
        raise
    except Exception as e:  # truncated or malformed: the same answer, one exception type
        raise ValueError(f"not a code state pickle ({type(e).__name__}: {e})"[:300]) from None
    try:
        return _pgo_rebuilt(state, _Budget(cap))
    except ValueError:
        raise
    except Exception as e:  # a missing field, a repr too deep to show: still ValueError
        raise ValueError(f"not a code state ({type(e).__name__}: {e})"[:300]) from None


def pgo_checked(state: dict[Any, Any], max_objects: int | None = None) -> dict[Any, Any]:
    """``state`` rebuilt from checked fields, within ``max_objects`` (ValueError if not).

    For a state built here from checked ones (the union of other ranks' views): what
    the writer keeps must stay under the cap a loaded state is held to.
    """
    from dynamo_dist.dist.limits import MAX_STORE_OBJECTS

    budget = _Budget(MAX_STORE_OBJECTS if max_objects is None else max_objects)
    return _pgo_rebuilt(state, budget)


#: Each size entry counts one object per this many characters of its source and its
#: frame's id: its dynamic mark (``pgo_dynamic_marks``, kept for the process's life)
#: repeats them, so long strings shared by many entries cost what they will occupy.
_PGO_STR_UNIT = 256


def _pgo_rebuilt(state: Any, budget: _Budget | None = None) -> dict[Any, Any]:
    """A fresh code state built from ``state``'s checked fields only (ValueError if any is off).

    Unpickled objects can carry anything their classes allow: a ``defaultdict`` whose
    factory is another class, a size that is a string, extra attributes. Dynamo would
    trip over those mid-compile, on every restart. So every field is checked against
    what pgo itself writes, and the state is rebuilt from new objects.

    Every object built spends one of ``budget`` (default: ``MAX_STORE_OBJECTS``), at
    every reference: a size tuple shared by many entries through the pickle memo is one
    object unpickled but a copy per entry here, so the count stops the rebuild at the
    cap (``TooManyObjects``) instead of after the expansion.
    """
    import reprlib
    from collections import defaultdict

    from torch._dynamo.pgo import (
        AutoDynamic,
        AutoUnset,
        CodeId,
        CodeState,
        FrameStateSizeEntry,
        InferStride,
    )

    if budget is None:
        from dynamo_dist.dist.limits import MAX_STORE_OBJECTS

        budget = _Budget(MAX_STORE_OBJECTS)
    spend = budget.spend

    def bad(what: str, value: Any) -> ValueError:
        shown = reprlib.repr(value)[:80]  # bounded: a forged value may be huge or deep
        return ValueError(f"a code state's {what} is {type(value).__name__}: {shown}")

    def number(v: Any) -> bool:
        return type(v) in (int, float, bool)

    def text(length: int) -> None:
        for _ in range(length // _PGO_STR_UNIT + 1):
            spend()

    def atom(v: Any, what: str, stride: bool = False) -> Any:
        spend()
        if isinstance(v, AutoDynamic | AutoUnset) or type(v) is int:
            return v
        if stride and type(v) is InferStride and type(getattr(v, "dim", None)) is int:
            return InferStride(v.dim)
        raise bad(what, v)

    def shape(v: Any, what: str, stride: bool = False) -> Any:
        spend()
        if isinstance(v, AutoDynamic | AutoUnset):
            return v
        if type(v) is not tuple:
            raise bad(what, v)
        return tuple(atom(x, what, stride) for x in v)

    def small(v: Any) -> bool:
        return type(v) is int and -_INT64 <= v < _INT64

    def excluded_sizes(v: Any) -> Any:
        if v is None:
            return None
        spend()
        if type(v) is not tuple:
            raise bad("excluded sizes", v)
        out = []
        for x in v:
            spend()
            if x is not None and type(x) is not int:
                raise bad("excluded sizes", v)
            out.append(x)
        return tuple(out)

    if not isinstance(state, dict):
        raise bad("top level", state)
    closures = "closure_hash" in _pgo_fields("CodeId")
    exclusions = _pgo_fields("FrameStateSizeEntry") >= {"excluded_sizes", "excluded_scalar"}
    out: defaultdict[Any, Any] = defaultdict(CodeState)
    for code_id, code_state in state.items():
        spend()
        if type(code_id) is not CodeId or type(code_state) is not CodeState:
            raise ValueError("a code state maps CodeId to CodeState")
        fields = (code_id.filename, code_id.firstlineno, code_id.name, code_id.file_hash)
        if [type(f) for f in fields] != [str, int, str, str] or not small(fields[1]):
            raise bad("frame id", code_id)
        closure = getattr(code_id, "closure_hash", None)
        if closure is not None and type(closure) is not str and not small(closure):
            raise bad("closure id", closure)
        id_text = len(fields[0]) + len(fields[2]) + len(fields[3])
        sizes = code_state.automatic_dynamic
        if not isinstance(sizes, dict):
            raise bad("sizes", sizes)
        spend()
        entries: defaultdict[str, Any] = defaultdict(FrameStateSizeEntry)
        for source, e in sizes.items():
            spend()
            if type(source) is not str or type(e) is not FrameStateSizeEntry:
                raise bad("size entry", e)
            text(len(source) + id_text)  # what its dynamic mark will repeat
            scalar = e.scalar
            spend()
            if not (isinstance(scalar, AutoDynamic | AutoUnset) or number(scalar)):
                raise bad("scalar", scalar)
            excluded = excluded_sizes(getattr(e, "excluded_sizes", None))
            excluded_scalar = getattr(e, "excluded_scalar", None)
            if excluded_scalar is not None and not number(excluded_scalar):
                raise bad("excluded scalar", excluded_scalar)
            extra: dict[str, Any] = (
                {"excluded_sizes": excluded, "excluded_scalar": excluded_scalar}
                if exclusions
                else {}
            )
            entries[source] = FrameStateSizeEntry(
                scalar=scalar,
                size=shape(e.size, "size"),
                stride=shape(e.stride, "stride", stride=True),
                **extra,
            )
        if isinstance(closure, str):
            text(len(closure))
        out[CodeId(*fields, closure) if closures else CodeId(*fields)] = CodeState(
            automatic_dynamic=entries
        )
    return out


def pgo_merge(state: dict[Any, Any], pending: dict[tuple[Any, ...], Any]) -> int:
    """Add ``state``'s frames to the process's code state; frames it knows already win.

    Frames of closures (a stable name for ``closure_hash``) go to ``pending`` instead,
    keyed by (file hash, line, name, stable name): :func:`pgo_adopt` files them under
    this process's hash when the frame is about to compile. Returns how many frames
    were taken. Called before the first compile of the group, so normally the process
    state is empty; a frame compiled earlier in this process (plain torch.compile,
    another group) keeps what this process learned.
    """
    from torch._dynamo.pgo import get_code_state

    live = get_code_state()
    added = 0
    for code_id, code_state in state.items():
        closure = getattr(code_id, "closure_hash", None)
        if isinstance(closure, str):
            key = (code_id.file_hash, code_id.firstlineno, code_id.name, closure)
            pending.setdefault(key, code_state)
            added += 1
        elif code_id not in live:
            live[code_id] = code_state
            added += 1
    return added


def pgo_adopt(code: Any, closure: Any, names: dict[int, str], pending: dict[Any, Any]) -> None:
    """Before a frame compiles: name its closure, and file a pending profile entry for it."""
    ids = pgo_closure_ids(closure)
    if ids is None:
        return
    live_hash, name = ids
    names[live_hash] = name
    if not pending:
        return
    from torch._dynamo.pgo import CodeId, get_code_state

    code_id = CodeId.make(code, closure)
    found = pending.pop((code_id.file_hash, code_id.firstlineno, code_id.name, name), None)
    live = get_code_state()
    if found is not None and code_id not in live:
        live[code_id] = found


# -- cache (Inductor, AOTAutograd) ------------------------------------------------------------
#
# Context managers here are small classes rather than ``contextlib`` generators so this
# section needs no imports of its own at the top of the file (sections stay independent).


class eager_backward_lowering:
    """Have AOTAutograd compile the backward inside the backend call; restored on exit.

    ``torch._functorch.config.force_non_lazy_backward_lowering``: present in torch 2.9
    through 2.13; where a torch lacks it this is a no-op (the backward is then compiled
    lazily, outside the cache entry). ``config.patch`` puts the previous value back.
    """

    def __init__(self) -> None:
        self._patch: Any = None

    def __enter__(self) -> None:
        from torch._functorch import config as functorch_config

        if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            self._patch = functorch_config.patch(force_non_lazy_backward_lowering=True)
            self._patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._patch is not None:
            patch, self._patch = self._patch, None
            patch.__exit__(*exc)


class inductor_cache_dir_override:
    """Point inductor's on-disk caches at ``path`` for the block; restored on exit.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` on every cache lookup
    (``torch._inductor.runtime.cache_dir_utils.cache_dir``, torch 2.4 through 2.13), so
    setting the variable for the block is enough; its previous value (or absence) is
    put back even if the compile raises.
    """

    _VAR = "TORCHINDUCTOR_CACHE_DIR"

    def __init__(self, path: object) -> None:
        self._path = str(path)
        self._prev: str | None = None

    def __enter__(self) -> None:
        import os

        self._prev = os.environ.get(self._VAR)
        os.environ[self._VAR] = self._path

    def __exit__(self, *exc: object) -> None:
        import os

        if self._prev is None:
            os.environ.pop(self._VAR, None)
        else:
            os.environ[self._VAR] = self._prev


def inductor_cache_dir() -> str:
    """The inductor cache directory in effect now (``TORCHINDUCTOR_CACHE_DIR`` included).

    ``torch._inductor.runtime.cache_dir_utils.cache_dir``: torch 2.4 through 2.13.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return str(cache_dir())


def inductor_default_cache_dir() -> str:
    """Inductor's cache directory when ``TORCHINDUCTOR_CACHE_DIR`` is unset (under /tmp).

    ``torch._inductor.runtime.cache_dir_utils.default_cache_dir``: torch 2.4 through 2.13.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return str(default_cache_dir())


def isa_probe_sources() -> frozenset[str]:
    """The C++ sources inductor's CPU ISA probe compiles (stripped), to recognise its files.

    ``torch._inductor.cpu_vec_isa``: each ``VecISA`` class's ``*_code`` string attributes,
    torch 2.4 through 2.13. A probe binary missing from a fresh cache costs a gcc run per
    ISA (seconds each) before the first kernel loads. Empty if the layout changed.
    """
    try:
        from torch._inductor import cpu_vec_isa
    except Exception:
        return frozenset()
    found: set[str] = set()
    for obj in vars(cpu_vec_isa).values():
        if isinstance(obj, type) and issubclass(obj, cpu_vec_isa.VecISA):
            for klass in obj.__mro__:
                for name, value in vars(klass).items():
                    if name.endswith("_code") and isinstance(value, str):
                        found.add(value.strip())
    return frozenset(found)


def inductor_fxgraph_cache_misses() -> int:
    """How many FX graph cache misses (real inductor compiles) this process has had.

    ``torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]``: torch 2.2 through
    2.13.
    """
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


class cacheable_ddp_bucket:
    """Let AOTAutograd's cache serve the graph of one DDPOptimizer bucket.

    With ``optimize_ddp`` (the default) DDPOptimizer splits a DDP frame's graph at the
    gradient buckets and compiles each piece with ``TracingContext.fakify_first_call``
    set, so that the piece's first call, made by DDPOptimizer on fake inputs, returns
    fake outputs with the strides inductor chose; those are the next piece's example
    inputs. AOTAutogradCache refuses such a compile ("Won't cache a graph with
    fakify_first_call enabled", ``autograd_cache.py``): every start then re-traces the
    joint graph of every bucket, which for a dynamic graph is most of a warm start, and
    a shared cache entry never holds AOTAutograd's result.

    Inductor keeps the strides eager would give a graph's outputs (``keep_output_stride``,
    on by default), so the same fake outputs come from running the piece's FX graph on
    the fake inputs, which is what DDPOptimizer itself does for a backend that is not
    AOTAutograd. This clears the flag for the compile (AOTAutogradCache may then load or
    save the piece) and answers the fake call that way: :meth:`wrap` returns a callable
    that runs the graph under the inputs' fake mode when given fake tensors, and the
    compiled piece otherwise. A piece whose real outputs do not have those strides fails
    loudly in the next piece's stride assertions (inductor's ``size_asserts``), never
    silently. With ``keep_output_stride`` off or ``pad_outputs`` on (globally or in the
    compile's ``options``: padded outputs have other strides) the flag is left alone,
    and AOTAutograd's cache is bypassed as in plain torch.compile.

    DDPOptimizer records ``TracingContext.fw_metadata`` per bucket for a lazily compiled
    backward; a cache hit does not set it, so a placeholder stands in until the fake call
    (the backward is compiled eagerly here: :class:`eager_backward_lowering`). Uses
    ``torch._guards.TracingContext.fakify_first_call`` / ``fw_metadata`` and
    ``torch._dynamo.utils.deepcopy_to_fake_tensor``: torch 2.9 through 2.13.
    """

    _PLACEHOLDER = types.SimpleNamespace(dynamo_dist_placeholder=True)

    def __init__(self, gm: Any, options: dict[str, Any] | None = None) -> None:
        self._gm = gm
        self._options = options or {}
        self._context: Any = None

    def _eager_strides(self) -> bool:
        """Whether inductor gives the piece's outputs eager's strides, options included.

        ``keep_output_stride`` on and ``pad_outputs`` off, as set by the compile's
        ``options`` (which inductor applies inside the backend call) or else globally.
        """
        from torch._inductor import config as inductor_config

        def value(name: str, default: bool) -> bool:
            return bool(self._options.get(name, getattr(inductor_config, name, default)))

        return value("keep_output_stride", False) and not value("pad_outputs", True)

    def __enter__(self) -> cacheable_ddp_bucket:
        import torch

        context = torch._guards.TracingContext.try_get()
        if (
            context is not None
            and getattr(context, "fakify_first_call", False)
            and self._eager_strides()
        ):
            self._context = context
            context.fakify_first_call = False
        return self

    @property
    def active(self) -> bool:
        """Whether this compile is a DDPOptimizer piece the class made cacheable."""
        return self._context is not None

    def __exit__(self, *exc: object) -> None:
        context = self._context
        if context is None:
            return
        context.fakify_first_call = True
        if context.fw_metadata is None:
            context.fw_metadata = self._PLACEHOLDER

    def wrap(self, compiled: Any) -> Any:
        """The compiled piece, answering DDPOptimizer's fake call (see the class)."""
        if self._context is None:
            return compiled
        return _FakeCallAnswered(compiled, self._gm, self._context, self._PLACEHOLDER)


class _FakeCallAnswered:
    """A compiled DDPOptimizer piece whose call on fake tensors runs its FX graph instead."""

    def __init__(self, compiled: Any, gm: Any, context: Any, placeholder: object) -> None:
        self._compiled = compiled
        self._gm: Any = gm
        self._context = context
        self._placeholder = placeholder

    def __call__(self, *args: Any) -> Any:
        gm = self._gm
        if gm is not None:
            from torch._subclasses.fake_tensor import FakeTensor

            # The inputs decide, not an active TracingContext: a real call may come
            # while some other frame is being compiled.
            boxed = len(args) == 1 and isinstance(args[0], list)
            flat = args[0] if boxed else args
            fake = next((a for a in flat if isinstance(a, FakeTensor)), None)
            if fake is not None:
                fake_mode = fake.fake_mode
                from torch._dynamo.utils import deepcopy_to_fake_tensor

                # Only DDPOptimizer, at compile time, calls with fake tensors; once.
                self._gm = None
                if self._context.fw_metadata is self._placeholder:
                    self._context.fw_metadata = None
                with fake_mode:
                    return deepcopy_to_fake_tensor(gm, fake_mode)(*flat)
        return self._compiled(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


def ddp_pieces_after(gm: Any) -> Iterator[tuple[Any, list[Any]]]:
    """The DDPOptimizer pieces still to compile after ``gm``, each with its example inputs.

    Called from the backend while DDPOptimizer compiles piece ``gm`` of a split graph:
    yields, lazily and in order, a copy of every later piece prepared exactly as
    DDPOptimizer's ``compile_submod`` will prepare it (output made a tuple), with the
    fake inputs it will be compiled with. Those come from running the pieces in
    between on fake tensors, as DDPOptimizer does for a backend that is not AOTAutograd
    (the outputs :class:`cacheable_ddp_bucket` answers with). A rank waiting for
    another to compile ``gm`` can so compile the next pieces meanwhile, and the keys
    match those of the real compiles.

    Finds DDPOptimizer's ``SubmodCompiler`` (an ``fx.Interpreter``: ``module``, ``env``,
    ``fake_mode``, ``fetch_attr``) on the stack, in its ``run_node(n)`` for ``gm``;
    ``torch._dynamo.backends.distributed``, torch 2.9 through 2.13. Yields nothing when
    not called under DDPOptimizer or when anything there looks different.
    """
    import sys
    from unittest import mock

    import torch
    from torch._dynamo.utils import deepcopy_to_fake_tensor, to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_map

    try:
        from torch._dynamo.backends.distributed import SubmodCompiler
    except ImportError:
        return
    interp: Any = None
    current: Any = None
    frame = sys._getframe(1)
    while frame is not None:
        me = frame.f_locals.get("self") if frame.f_code.co_name == "run_node" else None
        if isinstance(me, SubmodCompiler):
            interp, current = me, frame.f_locals.get("n")
            break
        frame = frame.f_back  # type: ignore[assignment]
    del frame
    fake_mode = getattr(interp, "fake_mode", None)
    env = getattr(interp, "env", None)
    if fake_mode is None or not isinstance(env, dict) or current is None:
        return
    if getattr(current, "op", None) != "call_module" or interp.fetch_attr(current.target) is not gm:
        return

    def fake(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return to_fake_tensor(x, fake_mode)
        return x

    values = dict(env)
    started = False
    for node in interp.module.graph.nodes:
        started = started or node is current
        if not started:
            continue
        if node.op not in ("call_module", "call_function", "get_attr"):
            return  # the output, or something this does not know how to run
        args = tree_map(fake, torch.fx.node.map_arg(node.args, values.__getitem__))
        kwargs = tree_map(fake, torch.fx.node.map_arg(node.kwargs, values.__getitem__))
        piece: Any = None
        with fake_mode, mock.patch.object(fake_mode, "allow_non_fake_inputs", True):
            if node.op == "call_module":
                mod = interp.fetch_attr(node.target)
                if node is not current:
                    if not isinstance(mod, torch.fx.GraphModule) or kwargs:
                        return
                    piece = _piece_copy(mod, getattr(gm, "compile_subgraph_reason", None))
                out = deepcopy_to_fake_tensor(mod, fake_mode)(*args, **kwargs)
                if node is current and _unwrapped_by_ddp(node, out):
                    out = out[0]
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)
            else:
                out = interp.fetch_attr(node.target)
        values[node] = out
        if piece is not None:
            yield piece, list(args)


def _unwrapped_by_ddp(node: Any, out: Any) -> bool:
    """Whether DDPOptimizer unwraps the 1-tuple the piece being compiled now returns.

    Its graph's output was already made a tuple, so whether it was one before shows in
    the outer graph: a piece with several outputs is only ever indexed there. A wrong
    guess costs a compile nobody loads, never a wrong result: entries are keyed by
    what they were compiled from.
    """
    import operator

    return (
        isinstance(out, tuple)
        and len(out) == 1
        and any(u.op != "call_function" or u.target is not operator.getitem for u in node.users)
    )


def _piece_copy(mod: Any, reason: Any) -> Any:
    """A copy of DDPOptimizer piece ``mod``, prepared as ``compile_submod`` will prepare it.

    Equal to the real piece at its compile in everything AOTAutograd's cache key reads,
    or the entry compiled from the copy would not be the one the real compile looks
    up: the Dynamo metadata DDPOptimizer gave the piece (``meta``,
    ``_param_name_to_source``, the placeholders' ``_dynamo_source``) and the order of
    the module's attributes, which its pickled form keeps. So the copy is made by the
    same class (lazy or not), given the missing attributes in the piece's order, and
    then goes through compile_submod's steps: output made a tuple, ``recompile()``,
    ``compile_subgraph_reason`` set (its value is not part of the key; ``reason`` is
    the current piece's). Its code is generated when the key is computed, as for the
    real piece. A copy that still differs costs a compile nobody loads.
    """
    import copy

    import torch
    from torch.fx._lazy_graph_module import _LazyGraphModule

    cls = _LazyGraphModule if isinstance(mod, _LazyGraphModule) else torch.fx.GraphModule
    piece = cls(mod, copy.deepcopy(mod.graph))
    mine = vars(piece)
    for name, value in vars(mod).items():
        if name not in mine and name not in ("_code", "_lineno_map", "_prologue_start"):
            setattr(piece, name, value)
    piece.meta = mod.meta
    for new, old in zip(piece.graph.nodes, mod.graph.nodes, strict=True):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    for sn in piece.graph.nodes:
        if sn.op == "output" and not isinstance(sn.args[0], tuple):
            sn.args = (sn.args,)
    piece.recompile()
    piece.compile_subgraph_reason = reason
    return piece


def use_inductor_cache_dir(path: str) -> None:
    """Point inductor's on-disk caches at ``path`` for the rest of this process.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` on every cache lookup (torch 2.4 through
    2.13), and its compile workers inherit it.
    """
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


def use_precompiled_header_dir(path: str) -> None:
    """Where inductor precompiles the headers every CPU kernel is compiled with.

    ``torch._inductor.codecache._HEADER_DIR`` and ``_HEADER_LOCK_DIR`` (torch 2.6
    through 2.13) are fixed at import under ``/tmp/torchinductor_<user>``, a directory
    another user can create first; they are read at every use, so setting them redirects
    every later compile. A torch without them has no precompiled headers to move.
    """
    import os

    try:
        from torch._inductor import codecache
    except Exception:
        return
    if hasattr(codecache, "_HEADER_DIR"):
        codecache._HEADER_DIR = path
        codecache._HEADER_LOCK_DIR = os.path.join(path, "locks")


# -- precompiled artifacts (``torch._dynamo.aot_compile``) ------------------------------------
#
# ``aot_compile_fullgraph`` through ``torch._dynamo.optimize(...)(fn).aot_compile``,
# ``AOTCompiledFunction.serialize/deserialize/guard_check``, ``GuardFilterEntry`` and
# ``torch._dynamo.package``'s guard and source helpers: torch 2.11 through 2.13 (2.11 gates
# ``.aot_compile`` behind ``torch._dynamo.config.enable_aot_compile``, False by default).


class PrecompileUnsupported(Exception):
    """This torch cannot capture or load precompiled artifacts; the message says why."""


def aot_compile_missing() -> str | None:
    """Why this torch has no usable ``aot_compile`` (None when it has one)."""
    try:
        import inspect

        import torch._dynamo
        from torch._dynamo import aot_compile, eval_frame, package  # noqa: F401
        from torch._dynamo.aot_compile import AOTCompiledFunction

        optimize = getattr(eval_frame, "_optimize", torch._dynamo.optimize)
        if "guard_filter_fn" not in inspect.signature(optimize).parameters:
            return f"torch {_torch_version()}'s torch._dynamo.optimize takes no guard_filter_fn"

        for name in ("serialize", "deserialize", "guard_check", "disable_guard_check"):
            if not hasattr(AOTCompiledFunction, name):
                return f"torch {_torch_version()} lacks AOTCompiledFunction.{name}"
        for name in ("load_guard_manager", "load_guards_state", "_hash_sourcelines"):
            if not hasattr(package, name):
                return f"torch {_torch_version()} lacks torch._dynamo.package.{name}"
    except ImportError as e:
        return f"torch {_torch_version()} has no torch._dynamo.aot_compile ({e})"
    return None


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def unserializable_guard_types() -> frozenset[str]:
    """Guard types Dynamo cannot save (``CheckFunctionManager``'s list)."""
    from torch._dynamo.guards import CheckFunctionManager

    return frozenset(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)


def guard_root_global(entry: Any) -> str | None:
    """The global name a ``GuardFilterEntry``'s source starts from (None for a local)."""
    src = entry.orig_guard.originating_source
    while getattr(src, "base", None) is not None:
        src = src.base
    name = getattr(src, "global_name", None)
    return name if isinstance(name, str) else None


def is_package_error(e: BaseException) -> bool:
    """Whether ``e`` is Dynamo refusing to save a guard or graph (``exc.PackageError``)."""
    try:
        from torch._dynamo.exc import PackageError
    except ImportError:
        return False
    return isinstance(e, PackageError)


def is_graph_break(e: BaseException) -> bool:
    """Whether ``e`` is a graph break under ``fullgraph=True`` (``exc.Unsupported``)."""
    from torch._dynamo import exc

    return isinstance(e, exc.Unsupported | getattr(exc, "UserError", exc.Unsupported))


class aot_capture:
    """Capture ``fn(*args, **kwargs)`` as one precompiled artifact: ``art(*args)`` runs it.

    ``torch._dynamo.optimize(backend, nopython=True, guard_filter_fn=...)(fn).aot_compile``
    (``aot_compile_fullgraph``): Dynamo traces once, ``backend`` (the inductor wrapper the
    user's ``torch.compile`` options built) compiles forward and backward now, and the
    guards are built with ``guard_filter_fn``. The capture runs against an empty
    automatic-dynamic state (dims to keep dynamic are marked with ``mark_dynamic``), so no
    decision of an earlier capture or compile in this process leaks into it.
    """

    def __init__(self, backend: Any, guard_filter_fn: Callable[[Any], list[bool]]) -> None:
        self.backend = backend
        self.guard_filter_fn = guard_filter_fn

    def __call__(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import contextlib

        import torch
        import torch._dynamo

        ctx: Any = contextlib.nullcontext()
        if hasattr(torch._dynamo.config, "enable_aot_compile"):
            ctx = torch._dynamo.config.patch(enable_aot_compile=True)
        with ctx, isolated_code_state({}):
            optimized: Any = torch._dynamo.optimize(
                backend=self.backend, nopython=True, guard_filter_fn=self.guard_filter_fn
            )(fn)
            return optimized.aot_compile((tuple(args), dict(kwargs)))


def aot_serialize(art: Any) -> bytes:
    """The artifact as bytes (generated code, guards, graphs; not the built kernels)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    return bytes(AOTCompiledFunction.serialize(art, None).serialized_data)


class cpp_kernels_load_only:
    """Load built CPU kernels without precompiling inductor's header first.

    ``CppPythonBindingsCodeCache.load_async`` (torch 2.9 through 2.13) calls
    ``codecache._precompile_header`` (gcc: about 9 s on 2 cores, a 150 MB ``.gch``) for
    every kernel not yet in memory, before it looks for the built ``.so`` on disk; the
    kernel's key does not depend on the header. Where every ``.so`` came with the entry,
    nothing is compiled and the header is pure cost. While loading, the header is named
    as is (``-include`` of the plain header, found on the include path), so a kernel
    that is missing after all is still built correctly, only without the precompiled
    header. Restored on exit.
    """

    def __init__(self, isa: list[str] | None = None) -> None:
        self._saved: Any = None
        self._isa = isa
        self._isa_patch: Any = None

    def __enter__(self) -> None:
        from torch._inductor import codecache

        self._saved = getattr(codecache, "_precompile_header", None)
        if self._saved is not None:

            def plain_header(header: str, *args: Any, **kwargs: Any) -> str:
                return header

            codecache._precompile_header = plain_header  # type: ignore[assignment]
        if self._isa is not None and _isa_probe_answered(self._isa):
            from torch._inductor import config as inductor_config

            self._isa_patch = inductor_config.patch({"cpp.vec_isa_ok": True})
            self._isa_patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        from torch._inductor import codecache

        if self._isa_patch is not None:
            patch, self._isa_patch = self._isa_patch, None
            patch.__exit__(*exc)
        if self._saved is not None:
            codecache._precompile_header = self._saved
            self._saved = None


def cpu_isa_names() -> list[str]:
    """The CPU vector ISAs inductor found usable in this process (its probe, cached)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()]


def _isa_probe_answered(recorded: list[str]) -> bool:
    """Whether the kernels' builder already answered this process's ISA probe.

    ``cpu_vec_isa.valid_vec_isa_list`` (torch 2.9 through 2.13, cached per process)
    keeps each ISA the CPU's flags list whose probe library builds and loads, the load
    tried in a child Python (six of them on x86: about a second). ``recorded`` is the
    list the capturing rank's probe produced, on a host with the same CPU flags (the
    key holds them). Where this process has not probed yet and its CPU's flags list
    exactly those ISAs, the probe's answer is known: ``cpp.vec_isa_ok`` for the load
    makes the cached list that one, without the children.
    """
    import platform

    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:
        return False  # already probed in this process: nothing to save
    flags = cpu_vec_isa.x86_isa_checker()
    by_flags = [
        str(isa)
        for isa in cpu_vec_isa.supported_vec_isa_list
        if all(flag in flags for flag in str(isa).split())
    ]
    return by_flags == recorded


def aot_deserialize(data: bytes, f_globals: dict[str, Any], isa: list[str] | None = None) -> Any:
    """An artifact from bytes, its guards checked against the live ``f_globals``.

    ``deserialize`` builds the guard manager over a snapshot of the globals taken now; a
    global the program changes afterwards would go unnoticed. So the guard manager is
    built again over the module's own dict (``load_guard_manager``), as Dynamo's do.
    """
    from torch._dynamo.aot_compile import AOTCompiledFunction
    from torch._dynamo.package import load_guard_manager, load_guards_state

    with cpp_kernels_load_only(isa):
        art = AOTCompiledFunction.deserialize(data, f_globals, None)
    found = art._artifacts
    found.guard_manager = load_guard_manager(
        load_guards_state(found.guards_state), found.original_code, f_globals
    )
    art.disable_guard_check()  # checked once per call by the caller, before calling
    return art


def aot_guard_check(art: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``art``'s guards pass for this call."""
    return bool(art.guard_check(*args, **kwargs))


def aot_inlined_sources(art: Any) -> list[tuple[str, int, int, str]]:
    """(module, first line, last line, checksum) of every function the artifact inlined."""
    return sorted(
        (str(s.module), int(s.firstlineno), int(s.lastlineno), str(s.checksum))
        for s in art.source_info().inlined_sources
    )


def hash_sourcelines(module: types.ModuleType, first: int, last: int) -> str:
    """Dynamo's checksum of a module's lines ``first..last`` (``package._hash_sourcelines``)."""
    from torch._dynamo.package import _hash_sourcelines

    return str(_hash_sourcelines(module, first, last))


def aot_guard_failure(art: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why ``art``'s guards fail for this call (Dynamo's verbose check), one line."""
    found = art._artifacts
    f_locals = art.prepare_f_locals(*args, **kwargs)
    return " ".join(str(found.guard_manager.check_verbose(f_locals)).split())[:500]


class marked_dynamic:
    """``torch._dynamo.mark_dynamic`` on some dims of some tensors, undone on exit.

    The marks are tensor attributes (``_dynamo_dynamic_indices``, ``_dynamo_dynamic_range``,
    ``_has_dynamo_dim_marking``, ...; torch 2.1 through 2.13), which guards check: set
    only around a capture, and every one put back as it was, so neither a later compile
    of the same tensors nor an artifact's guards see them.
    """

    def __init__(self, marks: list[tuple[Any, frozenset[int]]]) -> None:
        self._marks = marks
        self._saved: list[tuple[Any, dict[str, Any]]] = []

    @staticmethod
    def _dynamo_attrs(tensor: Any) -> dict[str, Any]:
        return {
            k: v
            for k, v in getattr(tensor, "__dict__", {}).items()
            if k.startswith("_dynamo") or k.startswith("_has_dynamo")
        }

    def __enter__(self) -> None:
        import copy

        import torch._dynamo

        for tensor, dims in self._marks:
            self._saved.append((tensor, copy.copy(self._dynamo_attrs(tensor))))
            torch._dynamo.mark_dynamic(tensor, sorted(dims))

    def __exit__(self, *exc: object) -> None:
        for tensor, before in reversed(self._saved):
            for k in self._dynamo_attrs(tensor):
                if k not in before:
                    delattr(tensor, k)
            for k, v in before.items():
                setattr(tensor, k, v)
        self._saved.clear()
