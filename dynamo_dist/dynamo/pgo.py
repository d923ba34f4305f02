"""The automatic-dynamic profile (Dynamo's PGO code state) as dynamo_dist shares it.

``torch._dynamo.pgo``'s process-wide code state (``get_code_state()``: a defaultdict of
``CodeId -> CodeState``, updated in place by automatic dynamic): torch 2.9 through 2.13.
This module reads it (the dynamic marks worth publishing), merges other ranks' and
earlier runs' views into it, names closures' frames stably across processes, and runs
a compile against a state of its own. Turning a state into bytes and back, safely
against a forged pickle, is ``pgo_pickle``'s job.
"""

from __future__ import annotations

import types
from typing import Any

from dynamo_dist.dynamo import compat


def live_state() -> dict[Any, Any]:
    """The process's live code state (``get_code_state()``), updated in place by Dynamo."""
    from torch._dynamo.pgo import get_code_state

    return get_code_state()


def dynamic_marks(state: dict[Any, Any] | None = None) -> frozenset[str]:
    """What a code state marks dynamic: one string per (frame, source) that varies.

    Only these marks change what a restart compiles (a static size seen again compiles
    the same graph with or without a profile), so only a new mark is worth publishing.
    ``state`` defaults to the live one.
    """
    marks = set()
    for code_id, code_state in list((live_state() if state is None else state).items()):
        for source, entry in list(code_state.automatic_dynamic.items()):
            shown = entry.render()
            if "?" in shown or "dynamic" in shown:
                marks.add(f"{code_id}|{source}|{shown}")
    return frozenset(marks)


def union(base: dict[Any, Any], others: list[dict[Any, Any]]) -> dict[Any, Any]:
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


def closure_ids(closure: Any) -> tuple[int, str] | None:
    """(Dynamo's per-process closure hash, a stable name) of a frame's closure, or None.

    The stable name lists, per cell, what pgo hashes (the code object of a callable
    cell), by file content hash, line and name, the same for the same code in any process.
    """
    if not closure or not compat.pgo_fields("CodeId") >= {"closure_hash"}:
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


def stable(state: dict[Any, Any], names: dict[int, str]) -> dict[Any, Any]:
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


def merge(state: dict[Any, Any], pending: dict[tuple[Any, ...], Any]) -> int:
    """Add ``state``'s frames to the process's code state; frames it knows already win.

    Frames of closures (a stable name for ``closure_hash``) go to ``pending`` instead,
    keyed by (file hash, line, name, stable name): :func:`adopt` files them under
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


def adopt(frame: Any, names: dict[int, str], pending: dict[Any, Any]) -> None:
    """Before ``frame`` compiles: name its closure, and file a pending profile entry for it.

    ``frame`` is what Dynamo's frame callback gets (``f_code`` and ``closure``); a frame
    without a closure has nothing to name.
    """
    closure = getattr(frame, "closure", None)
    if not closure:
        return
    code = frame.f_code
    ids = closure_ids(closure)
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


class isolated_code_state:
    """Run a compile against its own automatic-dynamic state, keeping another one aside.

    ``torch._dynamo.pgo.get_code_state()`` (the process's ``CodeId -> CodeState`` map that
    automatic dynamic updates in place): torch 2.9 through 2.13. ``view`` is the state to
    compile against (a dict, filled from a copy of the current state when empty); on exit
    it holds what the compile learned and the current state is restored.

    The state is one per process and Dynamo reads it only while it holds its compile lock
    (``torch._dynamo.convert_frame.compile_lock``, a reentrant lock: torch 2.9 through
    2.13); so the swap holds that lock from before the view goes in until the state is
    back. Without it, a compile on another thread (training's, or another thread's inside
    ``local()``) could run against this view, or this one's swap could put the wrong
    state back when both overlap.
    """

    def __init__(self, view: dict[Any, Any]) -> None:
        self._view = view
        self._saved: dict[Any, Any] | None = None

    def __enter__(self) -> None:
        import copy

        from torch._dynamo.convert_frame import compile_lock
        from torch._dynamo.pgo import get_code_state

        compile_lock.acquire()
        try:
            state = get_code_state()
            self._saved = dict(state)
            if not self._view:
                self._view.update(copy.deepcopy(self._saved))
            state.clear()
            state.update(self._view)
        except BaseException:
            compile_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.convert_frame import compile_lock
        from torch._dynamo.pgo import get_code_state

        try:
            state = get_code_state()
            self._view.clear()
            self._view.update(state)
            state.clear()
            state.update(self._saved or {})
        finally:
            compile_lock.release()
