"""The shared cache's key: what two ranks must agree on to share one compiled graph.

Every rank computes the same key for the same graph, from the versions, the device,
the backend options, the compile arguments, the compiled function's source and the
graph itself (its code, its inputs' metadata and every constant). A key that silently
left something out would let two different graphs share one entry, so whatever cannot
be keyed raises :class:`UnkeyableGraph` instead and the graph is compiled uncached.

The first stage of the cache (key -> agree -> protocol -> backend): it imports no other
cache module.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import platform
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import __version__ as torch_version

from dynamo_dist._version import __version__
from dynamo_dist.cache import fs

__all__ = [
    "UnkeyableGraph",
    "call_spec",
    "graph_key",
    "precompile_key",
    "precompile_key_for_sources",
    "source_hash",
    "version_factors",
]

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")


class UnkeyableGraph(Exception):
    """The graph's cache key cannot be computed; the graph is compiled uncached."""


def version_factors() -> dict[str, Any]:
    """What an entry must match exactly to be loaded, whatever the graph."""
    return {
        "torch": torch_version,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "dynamo_dist": __version__,
        "machine": platform.machine(),
    }


def _device_factor(example_inputs: list[Any]) -> list[str]:
    """The devices the graph runs on, precisely enough that kernels built for one fit."""
    out: set[str] = set()
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            d = x.device
            if d.type == "cuda":
                cap = torch.cuda.get_device_capability(d)
                out.add(f"cuda:{torch.cuda.get_device_name(d)}:sm{cap[0]}{cap[1]}")
            elif d.type == "cpu":
                out.add(f"cpu:{_cpu_flags()}")
            else:
                out.add(d.type)
    return sorted(out)


_cpu_flags_hash: str | None = None


def _cpu_flags() -> str:
    """A hash of the CPU's feature flags: kernels built for AVX-512 must not load elsewhere.

    Read from /proc/cpuinfo rather than inductor's ISA probe, which builds test
    programs with gcc: on the leader that first build must happen inside the
    clean room, so its results ship with the entry instead of being rebuilt by
    every follower (measured: 9 s of a 14 s warm start).
    """
    global _cpu_flags_hash
    if _cpu_flags_hash is None:
        flags = platform.processor()
        for line in (fs.read_system_text("/proc/cpuinfo", 16 << 20) or "").splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
        _cpu_flags_hash = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return _cpu_flags_hash


def _describe_input(x: Any) -> Any:
    """One input's metadata as JSON: symbolic sizes stay symbolic, so ranks agree."""
    if isinstance(x, torch.Tensor):
        return [
            "T",
            str(x.dtype),
            x.device.type,
            [str(s) for s in x.shape],
            [str(s) for s in x.stride()],
            bool(x.requires_grad),
        ]
    if isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ["S", str(x)]
    if isinstance(x, int | float | bool):
        return ["V", repr(x)]
    return ["O", type(x).__qualname__]


def _constant_bytes(gm: torch.fx.GraphModule, target: str) -> bytes:
    """Everything that identifies one ``get_attr`` constant: its type, dtype, shape and bytes.

    Submodules (higher-order ops' bodies) are identified by their code, which ``gm.code``
    does not include.
    """
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            raise UnkeyableGraph(f"constant {target!r} is not an attribute of the graph")
        obj = getattr(obj, part)
    if isinstance(obj, torch.fx.GraphModule):
        return f"G:{target}:".encode() + obj.code.encode()
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_sparse or t.is_quantized or t.layout != torch.strided:
            raise UnkeyableGraph(f"constant {target!r} has layout {t.layout}")
        head = f"T:{target}:{t.dtype}:{list(t.shape)}:".encode()
        # view(uint8) works for every strided dtype, bfloat16 and float8 included,
        # where .numpy() does not.
        flat = t.cpu().contiguous().reshape(-1)
        data: bytes = flat.view(torch.uint8).numpy().tobytes()
        return head + data
    if isinstance(obj, torch.nn.Module):
        raise UnkeyableGraph(f"constant {target!r} is a {type(obj).__qualname__} module")
    return f"O:{target}:{type(obj).__qualname__}:{obj!r}".encode()


def graph_key(
    gm: torch.fx.GraphModule, example_inputs: list[Any], static: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(key, factors) for one graph. Every factor is listed in the entry's manifest."""
    h = hashlib.sha256(gm.code.encode())
    # Placeholders' fake values carry symbolic sizes ("s52"); the example inputs
    # carry this rank's concrete sizes, which differ across ranks for one graph.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    metas = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    if len(metas) == len(example_inputs) and all(m is not None for m in metas):
        described = [_describe_input(m) for m in metas]
    else:
        described = [_describe_input(x) for x in example_inputs]
    h.update(json.dumps(described).encode())
    collectives = False
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            # Constants are part of what is compiled (rank-specific ones too). Any
            # failure here propagates: a key that silently left a constant out would
            # let two different graphs share one entry.
            h.update(_constant_bytes(gm, str(node.target)))
        ns = getattr(getattr(node.target, "namespace", None), "__str__", lambda: "")()
        if node.op == "call_function" and ns in _COLLECTIVE_NAMESPACES:
            collectives = True
    world = dist.get_world_size() if collectives and dist.is_initialized() else None
    factors = {
        **version_factors(),
        **static,
        "device": _device_factor(example_inputs),
        "graph": h.hexdigest(),
        # Code with collectives is specific to the world it was compiled for.
        "world_size": world,
    }
    key = hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()[:40]
    return key, factors


def source_hash(fn: Any) -> str:
    """Hash of the compiled function's source (the module's forward for nn.Modules)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        src = inspect.getsource(target)
    except (OSError, TypeError):
        src = getattr(getattr(target, "__code__", None), "co_code", b"").hex() or repr(target)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _describe_arg(x: Any, dynamic: frozenset[int]) -> Any:
    """One call argument as JSON, the dims in ``dynamic`` written ``*``."""
    if isinstance(x, torch.Tensor):
        return [
            "T",
            str(x.dtype),
            x.device.type,
            ["*" if i in dynamic else int(s) for i, s in enumerate(x.shape)],
            bool(x.requires_grad),
            bool(x.is_contiguous()),
        ]
    if isinstance(x, bool | int | float | str | type(None)):
        return ["V", type(x).__name__, repr(x)]
    if isinstance(x, list | tuple):
        return ["L", type(x).__name__, [_describe_arg(y, frozenset()) for y in x]]
    if isinstance(x, dict):
        return ["D", sorted((str(k), _describe_arg(v, frozenset())) for k, v in x.items())]
    return ["O", type(x).__module__, type(x).__qualname__]


def call_spec(
    args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: dict[int, frozenset[int]]
) -> list[Any]:
    """A call's arguments as JSON: the part of a precompiled artifact's key they decide.

    ``dynamic``: by position among ``args``, the dims captured as dynamic. Values of
    other types are keyed by type only; the artifact's guards check them at each call.
    """
    described = [_describe_arg(a, dynamic.get(i, frozenset())) for i, a in enumerate(args)]
    named = sorted((k, _describe_arg(v, frozenset())) for k, v in kwargs.items())
    modes: list[Any] = [bool(torch.is_grad_enabled()), bool(torch.is_inference_mode_enabled())]
    for device in ("cpu", "cuda"):
        on = bool(torch.is_autocast_enabled(device))
        modes.append(str(torch.get_autocast_dtype(device)) if on else "")
    return [described, named, modes]


def _module_factors(module: torch.nn.Module) -> str:
    """Every parameter and buffer (name, shape, dtype, device, grad) and training flag."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"P{name}:{list(p.shape)}:{p.dtype}:{p.device}:{p.requires_grad};".encode())
    for name, b in module.named_buffers():
        h.update(f"B{name}:{list(b.shape)}:{b.dtype}:{b.device};".encode())
    for name, m in module.named_modules():
        h.update(f"M{name}:{type(m).__module__}.{type(m).__qualname__}:{m.training};".encode())
    return h.hexdigest()[:24]


def _class_source(target: Any) -> str:
    cls = type(target) if isinstance(target, torch.nn.Module) else None
    if cls is None:
        return ""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def precompile_key(
    static: dict[str, Any], target: Any, spec: list[Any], tensors: list[Any]
) -> tuple[str, dict[str, Any]]:
    """(key, factors) of one precompiled artifact of ``target`` (a module or function).

    What the artifact's guards will check anyway is keyed too, so that a rank finds the
    artifact that fits its call without tracing: the versions and device, the compile
    options, the source, the module's structure and the call's argument metadata.
    """
    fn = target.forward if isinstance(target, torch.nn.Module) else target
    code = getattr(fn, "__code__", None)
    factors = {
        **version_factors(),
        **static,
        "kind": "precompiled",
        "target": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}",
        "code": hashlib.sha256(code.co_code).hexdigest()[:16] if code is not None else "",
        # The whole class: its helper methods, inlined by the trace, are part of it (an
        # edit there makes a new key, and a capture that failed is tried again).
        "class": _class_source(target),
        "module": _module_factors(target) if isinstance(target, torch.nn.Module) else None,
        "device": _device_factor(tensors),
        "call": spec,
    }
    key = hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()[:40]
    return key, factors


def precompile_key_for_sources(
    key: str, factors: dict[str, Any], sources_now: list[str]
) -> tuple[str, dict[str, Any]]:
    """``key``'s successor for the inlined functions' sources as they are now.

    An artifact's key holds the forward's code, not the functions it inlines (known only
    once traced). An artifact found under ``key`` whose inlined sources were edited since
    is not used; the capture for the current sources goes under this key, derived from
    the stale artifact's list of sources, which every later start of the same code
    derives alike.
    """
    factors = {**factors, "after": key, "sources_now": sources_now}
    new = hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()[:40]
    return new, factors
