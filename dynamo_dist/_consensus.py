"""Automatic-dynamic consensus: every rank marks the same dims and scalars dynamic.

This reuses Dynamo's own compiler collectives (``enable_compiler_collectives``):
while tracing, ranks exchange which sizes they saw and restart analysis with
the union, so a batch size that differs across ranks becomes dynamic on all of
them. Upstream runs the exchange on a group of the job's default backend and
enters a device context (``rank % torch.accelerator.device_count()``), which
fails for gloo/CPU (the CPU device interface has no ``device`` context, and the
count is 0 on CPU-only hosts). We give Dynamo a CPU-only gloo group of our own
and replace one method, ``OutputGraph.run_compiler_collective``, with the same
logic minus the device context. Nothing in torch's files changes, and
``disable()`` puts everything back.

The exchange is only safe because the guard hook makes all ranks compile the
same frame at the same time; without it a rank compiling alone would wait here.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ._log import get_logger

log = get_logger("consensus")

_saved: dict[str, Any] | None = None


def _run_compiler_collective(self: Any) -> None:
    """Dynamo's run_compiler_collective, without the accelerator device context."""
    from torch._dynamo import exc

    tx = self.root_tx
    if tx is None:
        raise AssertionError("root_tx must not be None")
    ds = tx.distributed_state
    if ds is not None and ds.all_states is None:
        log.debug("compiler collective: %s", ds.local_state)
        all_states: list[Any] = [None] * ds.compile_pg.size()
        dist.all_gather_object(all_states, ds.local_state, group=ds.compile_pg)
        ds.all_states = all_states
        # Tracing may diverge from here with the merged information.
        tx.speculation_log.clear()
        raise exc.CompileCollectiveRestartAnalysis


def enable(group: dist.ProcessGroup) -> bool:
    """Turn on Dynamo's compiler collectives over ``group``; False if this torch lacks them."""
    global _saved
    if _saved is not None:
        return True
    try:
        import torch._dynamo.config as dconfig
        import torch._dynamo.distributed as ddist
        from torch._dynamo.output_graph import OutputGraph
    except ImportError:  # pragma: no cover
        return False
    if not hasattr(dconfig, "enable_compiler_collectives") or not hasattr(
        OutputGraph, "run_compiler_collective"
    ):
        log.warning("this torch has no compiler collectives; automatic-dynamic consensus is off")
        return False
    _saved = {
        "config": dconfig.enable_compiler_collectives,
        "pg": ddist._COMPILE_PG,
        "method": OutputGraph.__dict__["run_compiler_collective"],
    }
    ddist._COMPILE_PG = group
    dconfig.enable_compiler_collectives = True
    OutputGraph.run_compiler_collective = _run_compiler_collective  # type: ignore[method-assign]
    return True


def disable() -> None:
    global _saved
    if _saved is None:
        return
    import torch._dynamo.config as dconfig
    import torch._dynamo.distributed as ddist
    from torch._dynamo.output_graph import OutputGraph

    dconfig.enable_compiler_collectives = _saved["config"]
    ddist._COMPILE_PG = _saved["pg"]
    OutputGraph.run_compiler_collective = _saved["method"]  # type: ignore[method-assign]
    _saved = None
