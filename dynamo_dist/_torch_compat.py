"""Every private torch API dynamo_dist uses, in one place.

Each function names the torch versions it is known to work with (CI runs 2.13 on
CPU; the GPU hosts run 2.11; the package supports >= 2.9). Anything that patches
torch does so in a scoped, restorable way: it returns what it replaced.

Sections, in the order of the architecture (hook -> exchange -> policy -> consensus
-> cache): add new shims to the section of the module that needs them.
"""

from __future__ import annotations

import json
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


def wrapping_optimize(wrap: Callable[[Any], Any]) -> AbstractContextManager[None]:
    """While active, pass every context ``torch._dynamo.optimize`` builds through ``wrap``.

    ``torch.compile`` ends with ``torch._dynamo.optimize(...)(model)`` in torch 2.9 through
    2.13. Patched for the duration of the ``with`` block only, and restored on exit.
    """
    import contextlib

    import torch._dynamo as dynamo

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        original = dynamo.optimize

        def optimize(*args: Any, **kwargs: Any) -> Any:
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


def pgo_dynamic_marks() -> frozenset[str]:
    """What the code state marks dynamic: one string per (frame, source) that varies.

    Only these marks change what a restart compiles (a static size seen again compiles
    the same graph with or without a profile), so only a new mark is worth publishing.
    """
    from torch._dynamo.pgo import get_code_state

    marks = set()
    for code_id, code_state in list(get_code_state().items()):
        for source, entry in list(code_state.automatic_dynamic.items()):
            shown = entry.render()
            if "?" in shown or "dynamic" in shown:
                marks.add(f"{code_id}|{source}|{shown}")
    return frozenset(marks)


def pgo_dumps() -> bytes:
    """The process's code state, pickled as ``torch._dynamo.pgo`` pickles it."""
    import pickle

    from torch._dynamo.pgo import get_code_state

    return pickle.dumps(get_code_state())


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


def pgo_loads(data: bytes) -> dict[Any, Any]:
    """Unpickle a code state, refusing any global but pgo's own classes (ValueError).

    The bytes were verified (signed, or from a private directory) before they got here;
    the restricted unpickler is a second wall: a forged profile cannot name ``os.system``.
    """
    import io
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in _PGO_GLOBALS:
                raise ValueError(f"a code state may not name {module}.{name}")
            return super().find_class(module, name)

    try:
        state = _Restricted(io.BytesIO(data)).load()
    except ValueError:
        raise
    except Exception as e:  # truncated or malformed: the same answer, one exception type
        raise ValueError(f"not a code state pickle ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"a code state is a dict, not {type(state).__name__}")
    from torch._dynamo.pgo import CodeId, CodeState

    for code_id, code_state in state.items():
        if not isinstance(code_id, CodeId) or not isinstance(code_state, CodeState):
            raise ValueError("a code state maps CodeId to CodeState")
    return state


def pgo_merge(state: dict[Any, Any]) -> int:
    """Add ``state``'s frames to the process's code state; frames it knows already win.

    Returns how many frames were added. Called before the first compile of the group,
    so normally the process state is empty; a frame compiled earlier in this process
    (plain torch.compile, another group) keeps what this process learned.
    """
    from torch._dynamo.pgo import get_code_state

    live = get_code_state()
    added = 0
    for code_id, code_state in state.items():
        if code_id not in live:
            live[code_id] = code_state
            added += 1
    return added


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


def inductor_fxgraph_cache_misses() -> int:
    """How many FX graph cache misses (real inductor compiles) this process has had.

    ``torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]``: torch 2.2 through
    2.13.
    """
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])
