"""Code states to bytes and back, safe against a forged pickle.

A profile published by another rank, or read back from the shared cache, is a pickle
of Dynamo's PGO code state (``torch._dynamo.pgo``: torch 2.9 through 2.13). Its bytes
were verified before they get here; this module is the second wall. A restricted
unpickler names only pgo's own classes and runs only the opcodes pgo writes, counting
every object it builds (a shared one at every reference) against a cap; the result
is then rebuilt from new objects whose every field was checked against what pgo
itself writes, so Dynamo never trips over a forged value mid-compile.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import reprlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from dynamo_dist.dist.limits import MAX_STORE_OBJECTS, TooManyObjects
from dynamo_dist.dynamo import compat


def dumps(state: dict[Any, Any]) -> bytes:
    """A code state, pickled as ``torch._dynamo.pgo`` pickles it."""
    return pickle.dumps(state)


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


_Load = Callable[[Any], None]  # one step of pickle's pure-Python unpickler, on the unpickler


def _note_created(u: Any) -> None:
    """Remember the object just built if BUILD may fill it (one of ``u.fillable``)."""
    obj = u.stack[-1]
    if type(obj) in u.fillable:
        u.created[id(obj)] = obj  # kept alive: its id names it until the load ends


def _counted(load: _Load) -> _Load:
    def run(self: Any) -> None:
        self.budget.spend()
        load(self)

    return run


def _reference(load: _Load) -> _Load:
    def run(self: Any) -> None:
        load(self)
        _weigh(self.stack[-1], self.budget)

    return run


def _keyed(load: _Load, items: Callable[[Any], list[Any]]) -> _Load:
    def run(self: Any) -> None:
        for key in items(self):
            if not _pgo_key_ok(key):
                raise pickle.UnpicklingError(f"a code state's dict key is a {type(key).__name__}")
        load(self)

    return run


def _memoize(load: _Load) -> _Load:
    def run(self: Any) -> None:
        load(self)
        if len(self.memo) > self.budget.used:
            raise pickle.UnpicklingError("a code state memoizes more than it builds")

    return run


def _reduce(load: _Load) -> _Load:
    def run(self: Any) -> None:
        func, args = self.stack[-2], self.stack[-1]
        # defaultdict(factory, items) would fill (and hash) without SETITEMS' checks.
        if func is defaultdict and (type(args) is not tuple or len(args) > 1):
            raise pickle.UnpicklingError("a code state's defaultdict takes a factory only")
        self.budget.spend()
        load(self)
        _note_created(self)

    return run


def _newobj(load: _Load) -> _Load:
    def run(self: Any) -> None:
        self.budget.spend()
        load(self)
        _note_created(self)

    return run


def _build(load: _Load) -> _Load:
    def run(self: Any) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        if self.created.get(id(inst)) is not inst or type(state) is not dict:
            raise pickle.UnpicklingError(
                f"a code state may not fill a {type(inst).__name__} it did not create"
            )
        load(self)

    return run


def _checked_step(name: str, load: _Load) -> _Load:
    """Pickle's step for opcode ``name``, with the check or the count that opcode needs."""
    if name in ("BINGET", "LONG_BINGET"):
        return _reference(load)
    if name == "SETITEM":
        return _keyed(load, lambda u: [u.stack[-2]])
    if name == "SETITEMS":
        return _keyed(load, lambda u: u.stack[0::2])
    if name == "REDUCE":
        return _reduce(load)
    if name == "NEWOBJ":
        return _newobj(load)
    if name == "BUILD":
        return _build(load)
    if name in _PGO_MEMO_OPCODES:
        return _memoize(load)
    if name in _PGO_FREE_OPCODES:
        return load
    return _counted(load)


class _Refusing(dict[int, _Load]):
    """A dispatch table that refuses every opcode it does not hold."""

    def __missing__(self, code: int) -> _Load:
        raise pickle.UnpicklingError(f"opcode {bytes([code])!r} is not in a code state")


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
    from torch._dynamo.pgo import CodeId, CodeState, FrameStateSizeEntry, InferStride

    base: dict[int, _Load] = pickle._Unpickler.dispatch
    table = _Refusing()
    for op in pickletools.opcodes:
        if op.name in _PGO_OPCODES:
            code = op.code.encode("latin-1")[0]
            table[code] = _checked_step(op.name, base[code])

    class Unpickler(pickle._Unpickler):
        dispatch = table
        # BUILD may fill only these, and only instances this pickle created: an enum
        # member (``AutoDynamic.token``, what ``AutoDynamic.__new__`` returns) is
        # process-wide, and filling its ``__dict__`` would change pgo for the whole process.
        fillable = (CodeId, CodeState, FrameStateSizeEntry, InferStride)

        def __init__(self, data: bytes, budget: _Budget) -> None:
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


def loads(data: bytes, max_objects: int | None = None) -> dict[Any, Any]:
    """Unpickle a code state, refusing any global but pgo's own classes (ValueError).

    The bytes were verified (signed, or from a private directory) before they got here;
    the restricted unpickler is a second wall: a forged profile cannot name ``os.system``.
    Unpickling and rebuilding each stop as soon as they have built ``max_objects``
    objects (default ``MAX_STORE_OBJECTS``), a shared object counted at every reference
    (``TooManyObjects``, a ValueError): a small pickle whose memo references expand to
    millions of objects costs at most the cap.
    """
    cap = MAX_STORE_OBJECTS if max_objects is None else max_objects
    try:
        state = _pgo_unpickler()(data, _Budget(cap)).load()
    except ValueError:
        raise
    except Exception as e:  # truncated or malformed: the same answer, one exception type
        raise ValueError(f"not a code state pickle ({type(e).__name__}: {e})"[:300]) from None
    try:
        return _rebuilt(state, _Budget(cap))
    except ValueError:
        raise
    except Exception as e:  # a missing field, a repr too deep to show: still ValueError
        raise ValueError(f"not a code state ({type(e).__name__}: {e})"[:300]) from None


def checked(state: dict[Any, Any], max_objects: int | None = None) -> dict[Any, Any]:
    """``state`` rebuilt from checked fields, within ``max_objects`` (ValueError if not).

    For a state built here from checked ones (the union of other ranks' views): what
    the writer keeps must stay under the cap a loaded state is held to.
    """
    budget = _Budget(MAX_STORE_OBJECTS if max_objects is None else max_objects)
    return _rebuilt(state, budget)


#: Each size entry counts one object per this many characters of its source and its
#: frame's id: its dynamic mark (``pgo.dynamic_marks``, kept for the process's life)
#: repeats them, so long strings shared by many entries cost what they will occupy.
_PGO_STR_UNIT = 256


def _bad(what: str, value: Any) -> ValueError:
    shown = reprlib.repr(value)[:80]  # bounded: a forged value may be huge or deep
    return ValueError(f"a code state's {what} is {type(value).__name__}: {shown}")


def _number(v: Any) -> bool:
    return type(v) in (int, float, bool)


def _small(v: Any) -> bool:
    return type(v) is int and -_INT64 <= v < _INT64


class _Rebuild:
    """Builds new pgo objects from checked fields, spending one of ``budget`` per object."""

    def __init__(self, budget: _Budget) -> None:
        import torch._dynamo.pgo as torch_pgo

        self.pgo: Any = torch_pgo
        self.spend = budget.spend
        self.closures = "closure_hash" in compat.pgo_fields("CodeId")
        self.exclusions = compat.pgo_fields("FrameStateSizeEntry") >= {
            "excluded_sizes",
            "excluded_scalar",
        }

    def text(self, length: int) -> None:
        for _ in range(length // _PGO_STR_UNIT + 1):
            self.spend()

    def atom(self, v: Any, what: str, stride: bool = False) -> Any:
        self.spend()
        if isinstance(v, self.pgo.AutoDynamic | self.pgo.AutoUnset) or type(v) is int:
            return v
        infer = self.pgo.InferStride
        if stride and type(v) is infer and type(getattr(v, "dim", None)) is int:
            return infer(v.dim)
        raise _bad(what, v)

    def shape(self, v: Any, what: str, stride: bool = False) -> Any:
        self.spend()
        if isinstance(v, self.pgo.AutoDynamic | self.pgo.AutoUnset):
            return v
        if type(v) is not tuple:
            raise _bad(what, v)
        return tuple(self.atom(x, what, stride) for x in v)

    def excluded_sizes(self, v: Any) -> Any:
        if v is None:
            return None
        self.spend()
        if type(v) is not tuple:
            raise _bad("excluded sizes", v)
        out = []
        for x in v:
            self.spend()
            if x is not None and type(x) is not int:
                raise _bad("excluded sizes", v)
            out.append(x)
        return tuple(out)

    def size_entry(self, source: Any, e: Any, id_text: int) -> Any:
        """A new ``FrameStateSizeEntry`` from ``e``'s checked fields."""
        self.spend()
        if type(source) is not str or type(e) is not self.pgo.FrameStateSizeEntry:
            raise _bad("size entry", e)
        self.text(len(source) + id_text)  # what its dynamic mark will repeat
        scalar = e.scalar
        self.spend()
        if not (isinstance(scalar, self.pgo.AutoDynamic | self.pgo.AutoUnset) or _number(scalar)):
            raise _bad("scalar", scalar)
        excluded = self.excluded_sizes(getattr(e, "excluded_sizes", None))
        excluded_scalar = getattr(e, "excluded_scalar", None)
        if excluded_scalar is not None and not _number(excluded_scalar):
            raise _bad("excluded scalar", excluded_scalar)
        extra: dict[str, Any] = (
            {"excluded_sizes": excluded, "excluded_scalar": excluded_scalar}
            if self.exclusions
            else {}
        )
        return self.pgo.FrameStateSizeEntry(
            scalar=scalar,
            size=self.shape(e.size, "size"),
            stride=self.shape(e.stride, "stride", stride=True),
            **extra,
        )

    def frame(self, code_id: Any, code_state: Any) -> tuple[Any, Any]:
        """A new (``CodeId``, ``CodeState``) pair from one frame's checked fields."""
        self.spend()
        if type(code_id) is not self.pgo.CodeId or type(code_state) is not self.pgo.CodeState:
            raise ValueError("a code state maps CodeId to CodeState")
        fields = (code_id.filename, code_id.firstlineno, code_id.name, code_id.file_hash)
        if [type(f) for f in fields] != [str, int, str, str] or not _small(fields[1]):
            raise _bad("frame id", code_id)
        closure = getattr(code_id, "closure_hash", None)
        if closure is not None and type(closure) is not str and not _small(closure):
            raise _bad("closure id", closure)
        id_text = len(fields[0]) + len(fields[2]) + len(fields[3])
        sizes = code_state.automatic_dynamic
        if not isinstance(sizes, dict):
            raise _bad("sizes", sizes)
        self.spend()
        entries: defaultdict[str, Any] = defaultdict(self.pgo.FrameStateSizeEntry)
        for source, e in sizes.items():
            entries[source] = self.size_entry(source, e, id_text)
        if isinstance(closure, str):
            self.text(len(closure))
        new_id = self.pgo.CodeId(*fields, closure) if self.closures else self.pgo.CodeId(*fields)
        return new_id, self.pgo.CodeState(automatic_dynamic=entries)


def _rebuilt(state: Any, budget: _Budget | None = None) -> dict[Any, Any]:
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
    if budget is None:
        budget = _Budget(MAX_STORE_OBJECTS)
    if not isinstance(state, dict):
        raise _bad("top level", state)
    rebuild = _Rebuild(budget)
    out: defaultdict[Any, Any] = defaultdict(rebuild.pgo.CodeState)
    for code_id, code_state in state.items():
        new_id, new_state = rebuild.frame(code_id, code_state)
        out[new_id] = new_state
    return out
