"""Automatic-dynamic consensus: every rank marks the same dims and scalars dynamic.

This reuses Dynamo's own compiler collectives (``enable_compiler_collectives``):
while tracing, ranks exchange which sizes they saw and restart analysis with
the union, so a batch size that differs across ranks becomes dynamic on all of
them. Each compile exchanges within its own group only (``local.current_group``,
set around the compile by the frame callback): a pipeline stage's ranks agree among
themselves, and a compile inside ``dynamo_dist.local()`` (no group) with nobody.
Upstream runs the exchange on a group of the job's default backend and
enters a device context (``rank % torch.accelerator.device_count()``), which
fails for gloo/CPU (the CPU device interface has no ``device`` context, and the
count is 0 on CPU-only hosts). We answer Dynamo's ``get_compile_pg()`` with the
CPU-only gloo group of the compile's group and replace one method,
``OutputGraph.run_compiler_collective``, with the same logic minus the device context.
Nothing in torch's files changes, and ``disable()`` puts everything back.

The exchange is only safe because the guard hook makes all ranks compile the
same frame at the same time; without it a rank compiling alone would wait here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dist import local
from dynamo_dist.dist.group import all_gather_objects
from dynamo_dist.dynamo import patches

log = get_logger("consensus")

_restore: Callable[[], None] | None = None


def _group_for_compile() -> Any | None:
    # Dynamo calls this (as get_compile_pg) with no arguments in the middle of a trace:
    # the group can only come from what the frame callback set around the compile.
    group = local.current_group()
    return group.consensus if group is not None else None


def enable() -> bool:
    """Turn on Dynamo's compiler collectives, per group; False if torch lacks them."""
    global _restore
    if _restore is not None:
        return True
    restore = patches.install_compiler_collectives(_group_for_compile, all_gather_objects)
    if restore is None:
        log.warning("this torch has no compiler collectives; automatic-dynamic consensus is off")
        return False
    _restore = restore
    return True


def disable() -> None:
    """Put back Dynamo's settings and method as :func:`enable` found them (idempotent)."""
    global _restore
    if _restore is None:
        return
    restore, _restore = _restore, None
    restore()
