"""Attaching to the Dynamo context ``torch.compile`` builds, without re-implementing it.

``torch.compile`` ends with Dynamo's ``optimize(...)(model)``. Wrapping
``optimize`` for the duration of that one call (``compat.wrapping_optimize``,
restored on exit) lets us wrap the context's frame callback (``_callback``) and add
our region marker before the context is applied, while torch.compile keeps its own
argument handling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dynamo_dist.dist.runtime import Channel
from dynamo_dist.dynamo import compat
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.callback import GuardedCallback


def guarded(inner: Any, channel: Channel, policy: str, wrapper_frames: int = 0) -> GuardedCallback:
    """Dynamo's frame callback ``inner``, wrapped for ``channel``'s group."""
    return GuardedCallback(
        inner, channel.policy, policy, channel.scope, channel.counts, wrapper_frames
    )


def enter_hooks(channel: Channel, region: int) -> tuple[Any, Any]:
    """The two enter hooks of an adopted context: the first, and the last of its list.

    First, the pending-error check: it raises the kept error before any other enter hook
    has applied something that would then never be undone. Last, the region marker.
    """
    return dynamo_hook.PENDING_CHECK, dynamo_hook.region_enter(region, channel.hook)


@contextmanager
def adopting(channel: Channel, region: int, policy: str) -> Iterator[list[Any]]:
    """While torch.compile runs, catch the Dynamo context it builds and adopt it.

    Yields the list of adopted contexts: empty afterwards means this torch built
    none we recognise, and the caller warns that rank consistency is off.
    """
    adopted: list[Any] = []

    def adopt(ctx: Any) -> Any:
        if hasattr(ctx, "callback") and hasattr(ctx, "enter_exit_hooks") and callable(ctx.callback):
            ctx.callback = guarded(ctx.callback, channel, policy)
            first, last = enter_hooks(channel, region)
            ctx.enter_exit_hooks.insert(0, first)
            ctx.enter_exit_hooks.append(last)
            adopted.append(ctx)
        return ctx

    with compat.wrapping_optimize(adopt):
        yield adopted
