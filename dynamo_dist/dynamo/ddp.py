"""DDPOptimizer's pieces, made cacheable and compiled ahead.

With ``optimize_ddp`` (the default) DDPOptimizer splits a DDP frame's graph at the
gradient buckets and compiles each piece on its own
(``torch._dynamo.backends.distributed``, torch 2.9 through 2.13). Two things the shared
cache needs from it live here: letting AOTAutograd's cache serve each piece
(:class:`cacheable_bucket`), and finding the pieces still to compile with their fake
inputs, so a rank waiting for another's compile can compile the next ones meanwhile
(:func:`pieces_after`).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any


class cacheable_bucket:
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
    (the backward is compiled eagerly here: ``patches.eager_backward_lowering``). Uses
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

    def __enter__(self) -> cacheable_bucket:
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


def pieces_after(gm: Any) -> Iterator[tuple[Any, list[Any]]]:
    """The DDPOptimizer pieces still to compile after ``gm``, each with its example inputs.

    Called from the backend while DDPOptimizer compiles piece ``gm`` of a split graph:
    yields, lazily and in order, a copy of every later piece prepared exactly as
    DDPOptimizer's ``compile_submod`` will prepare it (output made a tuple), with the
    fake inputs it will be compiled with. Those come from running the pieces in
    between on fake tensors, as DDPOptimizer does for a backend that is not AOTAutograd
    (the outputs :class:`cacheable_bucket` answers with). A rank waiting for
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
