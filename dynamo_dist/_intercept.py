"""Attaching to the Dynamo context ``torch.compile`` builds, without re-implementing it.

``torch.compile`` ends with Dynamo's ``optimize(...)(model)``. Wrapping
``optimize`` for the duration of that one call (``_torch_compat.wrapping_optimize``,
restored on exit) lets us wrap the context's frame callback (``_callback``) and add
our region marker before the context is applied, while torch.compile keeps its own
argument handling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _hook, _torch_compat
from ._callback import GuardedCallback
from ._runtime import Channel


@contextmanager
def adopting(channel: Channel, region: int, policy: str) -> Iterator[list[Any]]:
    """While torch.compile runs, catch the Dynamo context it builds and adopt it.

    Yields the list of adopted contexts: empty afterwards means this torch built
    none we recognise, and the caller warns that rank consistency is off.
    """
    adopted: list[Any] = []

    def adopt(ctx: Any) -> Any:
        if hasattr(ctx, "callback") and hasattr(ctx, "enter_exit_hooks") and callable(ctx.callback):
            ctx.callback = GuardedCallback(
                ctx.callback, channel.policy, policy, channel.scope, channel.counts
            )
            ctx.enter_exit_hooks.insert(0, _hook.PENDING_CHECK)
            ctx.enter_exit_hooks.append(_hook.region_enter(region, channel.hook))
            adopted.append(ctx)
        return ctx

    with _torch_compat.wrapping_optimize(adopt):
        yield adopted
