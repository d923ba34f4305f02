"""Read-only views of torch's and CPython's internals: versions, configuration, Dynamo's state.

What dynamo_dist asks torch without changing it: its version, Dynamo's cache entries and
recompile limits, whether Dynamo would trace a code object and why its guards failed,
the job's store, the backend ``torch.compile`` builds, and the observability sinks
(structured trace, counters) it writes events to. What changes torch's state lives in
``patches`` (and ``pgo``, ``inductor``, ``ddp``, ``artifacts`` for their subsystems).

Each function names the torch versions it is known to work with (CI runs 2.13 on
CPU; the GPU hosts run 2.11; the package supports >= 2.9). A shim that needs a newer
API says so.
"""

from __future__ import annotations

import json
from typing import Any


def torch_version() -> str:
    """``torch.__version__`` as a string (artifacts are only loaded by the same torch)."""
    import torch

    return str(torch.__version__)


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


# -- Dynamo: frames, cache entries, recompile limits -----------------------------------------


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


def last_compile_record() -> Any:
    """Dynamo's record of the last compile in this process (a mark for
    :func:`recompile_reason_since`; None before any).

    ``torch._dynamo.utils.get_compilation_metrics``: torch 2.6 through 2.13 (a bounded
    deque of ``CompilationMetrics``).
    """
    from torch._dynamo.utils import get_compilation_metrics

    records = get_compilation_metrics()
    return records[-1] if records else None


def recompile_reason_since(mark: Any) -> str:
    """Why Dynamo recompiled in the compile recorded after ``mark``: its first line.

    Dynamo's ``recompile_reason`` (the first failed guard, as ``TORCH_LOGS=recompiles``
    shows it) without its compile id (``"1/0: "``), so one reason counts once across
    frames. Generic when there is no record (a forced recompile, whose guards passed,
    says "Unable to find recompilation reasons").
    """
    import re

    from torch._dynamo.utils import get_compilation_metrics

    records = get_compilation_metrics()
    after = next((i + 1 for i in range(len(records) - 1, -1, -1) if records[i] is mark), 0)
    for record in records[after:]:
        reason = getattr(record, "recompile_reason", None)
        if reason:
            first = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
            return re.sub(r"^\d+/\d+: ", "", first) or "unknown"
    return "unknown (no recompile reason recorded by Dynamo)"


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


def recompile_limits() -> tuple[int, int]:
    """(``recompile_limit``, ``accumulated_recompile_limit``): torch 2.9 through 2.13."""
    import torch._dynamo.config as dconfig

    return int(dconfig.recompile_limit), int(dconfig.accumulated_recompile_limit)


def run_eagerly_once() -> Any:
    """What a frame callback returns to run this call eagerly, leaving the code compilable.

    ``ConvertFrameReturn(FrameExecStrategy(SKIP, DEFAULT), apply_to_code=False)`` in
    ``torch._dynamo.types``: torch 2.9 through 2.13.
    """
    from torch._dynamo.types import FrameAction

    return decide_once((int(FrameAction.SKIP), int(FrameAction.DEFAULT)))


def decide_once(actions: tuple[int, int]) -> Any:
    """What a frame callback returns to apply ``actions`` to this call only, not the code.

    ``ConvertFrameReturn(FrameExecStrategy(cur, recursive), apply_to_code=False)`` in
    ``torch._dynamo.types``: torch 2.9 through 2.13.
    """
    from torch._dynamo.types import ConvertFrameReturn, FrameAction, FrameExecStrategy

    cur, recursive = actions
    return ConvertFrameReturn(
        frame_exec_strategy=FrameExecStrategy(FrameAction(cur), FrameAction(recursive)),
        apply_to_code=False,
    )


def code_decision(result: Any) -> tuple[int, int] | None:
    """The (current, recursive) frame actions of a callback result that decides for the code.

    A ``ConvertFrameReturn`` with no compiled code whose ``frame_exec_strategy`` applies to
    every later call of the code (``apply_to_code``): ``SKIP`` (nothing to compile in it)
    or ``RUN_ONLY`` (the recompile limit: cached entries only). ``torch._dynamo.types``:
    torch 2.9 through 2.13. None for anything else (compiled code, a one-off skip).
    """
    from torch._dynamo.types import FrameAction

    strategy = getattr(result, "frame_exec_strategy", None)
    if strategy is None or not getattr(result, "apply_to_code", False):
        return None
    if getattr(result, "guarded_code", None) is not None:
        return None
    if strategy.cur_action not in (FrameAction.SKIP, FrameAction.RUN_ONLY):
        return None
    return int(strategy.cur_action), int(strategy.recursive_action)


def is_run_only(actions: tuple[int, int]) -> bool:
    """Whether ``actions`` (from :func:`code_decision`) run cached entries only."""
    from torch._dynamo.types import FrameAction

    return actions[0] == int(FrameAction.RUN_ONLY)


def skip_code(actions: tuple[int, int]) -> Any:
    """What a frame callback returns to skip the frame's code for good with ``actions``.

    ``ConvertFrameReturn(FrameExecStrategy(cur, recursive), apply_to_code=True)`` in
    ``torch._dynamo.types``: torch 2.9 through 2.13.
    """
    from torch._dynamo.types import ConvertFrameReturn, FrameAction, FrameExecStrategy

    cur, recursive = actions
    return ConvertFrameReturn(
        frame_exec_strategy=FrameExecStrategy(FrameAction(cur), FrameAction(recursive)),
        apply_to_code=True,
    )


def skip_recursively() -> tuple[int, int]:
    """The actions that skip a frame and every frame it calls (``FrameAction.SKIP`` twice)."""
    from torch._dynamo.types import FrameAction

    return int(FrameAction.SKIP), int(FrameAction.SKIP)


def pgo_fields(cls: str) -> set[str]:
    """The dataclass fields of ``torch._dynamo.pgo.<cls>`` in this torch.

    ``CodeId.closure_hash`` and ``FrameStateSizeEntry.excluded_sizes`` /
    ``excluded_scalar`` are in torch 2.13 but not in 2.11 (GPU hosts): code that
    reads or builds them asks first.
    """
    import dataclasses

    import torch._dynamo.pgo as torch_pgo

    return {f.name for f in dataclasses.fields(getattr(torch_pgo, cls))}


# -- configuration ----------------------------------------------------------------------------


def compiler_job_id() -> str | None:
    """The user's ``torch.compiler.config.job_id`` (None when unset); never written here."""
    import torch.compiler

    job = getattr(torch.compiler.config, "job_id", None)
    return job if isinstance(job, str) and job else None


# -- backends and the job's store ------------------------------------------------------------


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
