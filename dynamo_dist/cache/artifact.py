"""One precompiled artifact: its capture, its guards, its bytes, and the checks before use.

An artifact is ``aot_compile`` of one function (a module's ``forward``, unbound): Dynamo
traced it once, inductor compiled forward and backward, and calling it runs no Dynamo and
no AOTAutograd. What makes it as safe as plain ``torch.compile``:

* **Guards.** Every local guard and every guard on a user global is kept, and checked at
  each call. Dynamo cannot save guards on torch's own modules and functions (what
  inlining ``nn.Linear`` or ``F.gelu`` adds), so only those are dropped: each is
  recorded by name with what it named (module, qualified name, code hash) and resolved
  again by that name before the artifact is used. A kept guard Dynamo cannot save makes
  the capture fail (``PackageError``), and the frame falls back. Torch's default filter,
  which drops every global and every unsaveable local guard (so ``apply(x, fn)``
  would run ``double`` for ``triple``), is never used.
* **Sources.** Every function the trace inlined is listed with Dynamo's checksum of its
  lines; an artifact whose listed source changed is not used (it would run old code).
* **Integrity.** The bytes travel inside a signed, verified cache entry, with the kernels
  the artifact loads (from the leader's clean room): loading it runs its code.

A failed capture is recorded too (a graph break, an unsaveable kept guard): the other
ranks and later starts then fall back at once, instead of each tracing to the break.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import math
import re
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynamo_dist.cache.artifact_file import decode, encode, read_stored, write_stored
from dynamo_dist.dynamo import artifacts, compat, inductor

__all__ = [
    "Captured",
    "DroppedCheck",
    "Failed",
    "GuardRecord",
    "Stored",
    "dropped_check",
    "load",
    "produce",
    "recorded_build_seconds",
    "sources_now",
]


# Fallback reasons, as counted in ``dynamo_dist.stats()["precompiled_fallbacks"]``.
GRAPH_BREAK = "graph_break"
UNSERIALIZABLE_GUARD = "unserializable_guard"
SOURCE_CHANGED = "source_changed"
TORCH_CHANGED = "torch_internals_changed"
GUARD_MISS = "guard_miss"
NO_AOT_COMPILE = "no_aot_compile"
PACKAGE_ERROR = "package_error"
PEER = "other_rank"
UNSUPPORTED = "unsupported_module"
RECOMPILE_LIMIT = "recompile_limit"

_PLAIN = (int, float, str, bool, bytes, type(None))
_CALLABLE_KINDS = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)


@dataclass
class Captured:
    """This rank traced and compiled the artifact (a leader, or without the cache)."""

    art: Any
    sources: list[tuple[str, int, int, str]]
    dropped: list[GuardRecord]


@dataclass
class Stored:
    """The artifact's bytes, found in the inductor cache (installed from an entry)."""

    data: bytes


@dataclass
class Failed:
    """No artifact: ``reason`` is one of the fallback reasons above."""

    reason: str
    detail: str = ""
    #: For ``source_changed``: the inlined sources the artifact was captured from.
    sources: list[tuple[str, int, int, str]] = field(default_factory=list, compare=False)


@dataclass(frozen=True)
class GuardRecord:
    """A dropped guard on a torch global: its name, and what that name resolved to."""

    name: str
    guard_type: str
    identity: tuple[str, ...] = field(default=())


# -- guards ---------------------------------------------------------------------------------


def _torch_module(name: object) -> bool:
    return isinstance(name, str) and (name == "torch" or name.startswith("torch."))


def identity(obj: Any) -> tuple[str, ...]:
    """What a torch global is, by name: module, qualified name, and a hash of its code."""
    if isinstance(obj, types.ModuleType):
        return ("module", obj.__name__)
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        module = type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(obj, _CALLABLE_KINDS) and not callable(obj):
        # A value (an OrderedDict of hooks, a flag): what it is, not only its type.
        return (type(obj).__name__, str(module), str(qualname), repr(obj)[:200])
    code = getattr(obj, "__code__", None)
    digest = ""
    if isinstance(code, types.CodeType):
        h = hashlib.sha256(code.co_code)
        h.update("\0".join(code.co_names).encode())
        h.update(code.co_qualname.encode())
        digest = h.hexdigest()[:16]
    return (type(obj).__name__, module, str(qualname), digest)


def _is_torch_internal(entry: Any, unsaveable: frozenset[str]) -> bool:
    """Whether a global guard is one to drop: on torch's own code, which Dynamo cannot save.

    * Rooted at one of Dynamo's own aliases (``__import_torch_dot_...``, the builtins
      dict): what inlining torch's modules adds.
    * Rooted at a user global that Dynamo cannot save a guard on, naming a module,
      function or class of torch's (or a builtin): ``F``, ``torch``, ``ACT = torch.relu``.

    Everything else is kept: a user global naming anything else (a value, a dtype, the
    user's own function) is saved and checked at every call, or, where Dynamo cannot
    save it, makes the capture fail. Every dropped guard is checked at every call too
    (:class:`DroppedCheck`), by identity, so rebinding such a global is noticed.
    """
    root = artifacts.guard_root_global(entry)
    if root is not None and (
        root.startswith("__import_torch") or root.startswith("__builtins_dict__")
    ):
        return True
    if not entry.has_value:
        return False
    types_ = {str(entry.guard_type), *(str(t) for t in entry.derived_guard_types or ())}
    if not types_ & unsaveable:
        return False
    value = entry.value
    if isinstance(value, types.ModuleType):
        return _torch_module(value.__name__) or value is builtins
    if isinstance(value, _CALLABLE_KINDS):
        module = getattr(value, "__module__", None)
        return _torch_module(module) or module == "builtins"
    return False


def guard_filter(dropped: list[GuardRecord]) -> Callable[[Any], list[bool]]:
    """A ``guard_filter_fn`` keeping every guard but those on torch globals (recorded)."""

    unsaveable = artifacts.unserializable_guard_types()

    def keep(entries: Any) -> list[bool]:
        dropped.clear()
        out = []
        for entry in entries:
            drop = bool(entry.is_global) and _is_torch_internal(entry, unsaveable)
            out.append(not drop)
            if drop:
                ident = identity(entry.value) if entry.has_value else ()
                dropped.append(GuardRecord(str(entry.name), str(entry.guard_type), ident))
        return out

    return keep


_ROOT = re.compile(r"G\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\d+)\]")
_ALIAS = re.compile(r"__import_([A-Za-z0-9_]+)")


Step = tuple[bool, Any]  # (an attribute?, its name or the subscript's key)


def _parse(name: str) -> tuple[str, list[Step]]:
    """A guard's name (``G['torch'].nn.functional.gelu``) as its root and its steps.

    Only names, attributes and literal subscripts: the name comes from a verified entry,
    but is never evaluated as code. Raises LookupError on anything else.
    """
    m = _ROOT.match(name)
    if m is None:
        raise LookupError(f"not a global's guard: {name}")
    root = ast.literal_eval(m.group(1))
    steps: list[Step] = []
    rest = name[m.end() :]
    while rest:
        step = _STEP.match(rest)
        if step is None:
            raise LookupError(f"cannot follow {rest!r}")
        if step.group(1) is not None:
            steps.append((True, step.group(1)))
        else:
            steps.append((False, ast.literal_eval(step.group(2))))
        rest = rest[step.end() :]
    return root, steps


def _root(root: str, f_globals: dict[str, Any]) -> Any:
    if root in f_globals:
        return f_globals[root]
    if root.startswith("__builtins_dict__"):
        return builtins.__dict__
    alias = _ALIAS.fullmatch(root)
    if alias is not None:
        module = alias.group(1).replace("_dot_", ".")
        if not _torch_module(module):
            raise LookupError(f"alias of a module that is not torch's: {module}")
        return sys.modules.get(module) or importlib.import_module(module)
    raise LookupError(f"global {root!r} is not defined")


def _follow(obj: Any, steps: list[Step]) -> Any:
    for attr, key in steps:
        obj = getattr(obj, key) if attr else obj[key]
    return obj


def _resolve(name: str, f_globals: dict[str, Any]) -> Any:
    """What a guard's name names now; raises if nothing."""
    root, steps = _parse(name)
    return _follow(_root(root, f_globals), steps)


class DroppedCheck:
    """The dropped guards of one artifact, checked at every call, by identity.

    Each name was resolved once (at capture, or at load after its recorded identity was
    compared): a call passes only while every name still names the very same object,
    so a monkeypatched torch function or a rebound global is a guard miss, as it is
    for Dynamo.
    """

    def __init__(self, f_globals: dict[str, Any], checks: list[tuple[str, list[Step], Any]]):
        self._f_globals = f_globals
        self._checks = checks

    def ok(self) -> bool:
        try:
            for root, steps, expected in self._checks:
                if _follow(_root(root, self._f_globals), steps) is not expected:
                    return False
        except Exception:
            return False
        return True

    def changed(self) -> str | None:
        """The first name that names something else now (for diagnostics)."""
        for root, steps, expected in self._checks:
            try:
                if _follow(_root(root, self._f_globals), steps) is not expected:
                    return f"G[{root!r}]... no longer names what it did"
            except Exception as e:
                return f"G[{root!r}]... no longer resolves ({type(e).__name__})"
        return None


def dropped_check(
    dropped: list[GuardRecord], f_globals: dict[str, Any]
) -> tuple[DroppedCheck | None, str | None]:
    """(the per-call check, None), or (None, the first name that changed since capture)."""
    checks = []
    for record in dropped:
        try:
            root, steps = _parse(record.name)
            obj = _follow(_root(root, f_globals), steps)
        except Exception as e:
            return None, f"{record.name}: no longer resolves ({type(e).__name__}: {e})"
        now = identity(obj)
        if record.identity and now != record.identity:
            was, then = ".".join(record.identity[1:3]), ".".join(now[1:3])
            return None, f"{record.name}: was {was}, now {then}"
        checks.append((root, steps, obj))
    return DroppedCheck(f_globals, checks), None


def dropped_changed(dropped: list[GuardRecord], f_globals: dict[str, Any]) -> str | None:
    """The first dropped guard whose name no longer names what it did at capture."""
    return dropped_check(dropped, f_globals)[1]


def sources_changed(sources: list[tuple[str, int, int, str]]) -> str | None:
    """The first inlined function whose lines no longer hash as at capture."""
    for module_name, first, last, checksum in sources:
        module = sys.modules.get(module_name)
        if module is None:
            return f"{module_name} is not imported"
        try:
            now = artifacts.hash_sourcelines(module, first, last)
        except Exception as e:
            return f"{module_name}:{first}-{last} unreadable ({type(e).__name__})"
        if now != checksum:
            return f"{module_name}:{first}-{last} changed"
    return None


def sources_now(sources: list[tuple[str, int, int, str]]) -> list[str]:
    """The checksums the listed lines have now ("" where they cannot be read)."""
    out = []
    for module_name, first, last, _ in sources:
        module = sys.modules.get(module_name)
        try:
            out.append(artifacts.hash_sourcelines(module, first, last) if module else "")
        except Exception:
            out.append("")
    return out


# -- capture and load -----------------------------------------------------------------------


def _classify(e: BaseException) -> str:
    if artifacts.is_package_error(e):
        return UNSERIALIZABLE_GUARD
    if artifacts.is_graph_break(e):
        return GRAPH_BREAK
    return PACKAGE_ERROR


def produce(
    key: str, capture: Callable[[list[GuardRecord]], Any], label: str
) -> Captured | Stored | Failed:
    """The compile step of one artifact, run where the cache protocol says.

    In a clean room (a leader) or in this rank's own cache (without a usable shared
    cache): capture, and leave the artifact file (or the failure) for the entry. In the
    local cache after an entry was installed: the stored file. The file's name is the
    key; a stored failure is a capture that cannot succeed for this key.
    """
    name = f"{key}.bin"
    data = read_stored(name)
    if data is not None:
        return Stored(data)
    started = time.monotonic()
    dropped: list[GuardRecord] = []
    try:
        art = capture(dropped)
    except Exception as e:
        reason = _classify(e)
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if reason != PACKAGE_ERROR:
            # Deterministic for this key: record it, so nobody traces to the break again.
            write_stored(name, encode({"failed": reason, "detail": detail, "label": label}))
        return Failed(reason, detail)
    sources = artifacts.aot_inlined_sources(art)
    try:
        isa: list[str] | None = inductor.cpu_isa_names()
    except Exception:
        isa = None
    header: dict[str, Any] = {
        "label": label,
        "isa": isa,
        "torch": compat.torch_version(),
        "sources": [list(s) for s in sources],
        "dropped": [[r.name, r.guard_type, list(r.identity)] for r in dropped],
    }
    try:
        payload = artifacts.aot_serialize(art)
        # What a load saves: the capture (trace and inductor) and its serialization.
        header["build_seconds"] = round(time.monotonic() - started, 3)
        blob = encode(header, payload)
    except Exception as e:
        return Failed(PACKAGE_ERROR, f"serialize: {type(e).__name__}: {e}")
    write_stored(name, blob)
    return Captured(art, sources, dropped)


def recorded_build_seconds(data: bytes) -> float | None:
    """What capturing the stored artifact took (None: not recorded, or not an artifact)."""
    try:
        seconds = decode(data)[0].get("build_seconds")
    except ValueError:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    return float(seconds) if math.isfinite(seconds) and seconds >= 0 else None


def load(
    data: bytes, f_globals: dict[str, Any]
) -> tuple[tuple[Any, DroppedCheck] | None, Failed | None]:
    """((the artifact, its dropped guards' check), None) from a stored file, or (None, why
    it cannot be used)."""
    try:
        header, artifact = decode(data)
    except ValueError as e:
        return None, Failed(PACKAGE_ERROR, str(e))
    # The header's values may be of any JSON type: int(inf) overflows, str() of a list
    # nested nearly as deep as json.loads allows exceeds the recursion limit.
    try:
        failed = header.get("failed")
        if failed is not None:
            return None, Failed(str(failed), str(header.get("detail", "")))
        if header.get("torch") != compat.torch_version():
            return None, Failed(TORCH_CHANGED, f"captured with torch {header.get('torch')}")
        sources = [(str(m), int(a), int(b), str(c)) for m, a, b, c in header["sources"]]
        dropped = [
            GuardRecord(str(n), str(t), tuple(str(x) for x in ident))
            for n, t, ident in header["dropped"]
        ]
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
        return None, Failed(PACKAGE_ERROR, f"bad artifact header: {type(e).__name__}: {e}")
    why = sources_changed(sources)
    if why is not None:
        return None, Failed(SOURCE_CHANGED, why, sources)
    check, why = dropped_check(dropped, f_globals)
    if check is None:
        return None, Failed(TORCH_CHANGED, why or "")
    try:
        isa = header.get("isa")
        if not (isinstance(isa, list) and all(isinstance(x, str) for x in isa)):
            isa = None
        return (artifacts.aot_deserialize(artifact, f_globals, isa), check), None
    except Exception as e:
        return None, Failed(PACKAGE_ERROR, f"load: {type(e).__name__}: {e}")
