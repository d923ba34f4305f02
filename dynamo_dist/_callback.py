"""The wrapper around Dynamo's frame callback: first-entry exchanges, policies, sticky errors.

Dynamo calls the C++ hook only for frames that already have compiled entries; the
first time a rank meets a frame (or after Dynamo's ``reset()``), it goes straight to
the callback. If we did nothing there, a rank holding entries would wait in an
exchange the fresh rank never joins: upstream's guard collectives hang or pair
unrelated frames exactly this way. So the wrapper runs the same exchange, with a local
"miss", before Dynamo compiles: every entry into a compiled frame is exchanged exactly
once on every rank, whatever its cache state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _torch_compat
from ._hook import _C
from ._policy import Policy


class GuardedCallback:
    """Wraps Dynamo's frame callback: first-entry exchanges, policies, sticky errors."""

    def __init__(self, inner: Callable[..., Any], policy: Policy, policy_name: str) -> None:
        self._inner = inner
        self._policy = policy
        self._policy_name = policy_name
        # Dynamo's C++ get_backend() follows this chain to find the backend
        # that keys its cache entries; it must lead through us to the real one.
        self._torchdynamo_orig_backend = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        err = _C.pending_error()
        if err is not None:
            raise err
        policy = self._policy
        if cache_entry is None and _torch_compat.dynamo_would_trace(frame.f_code):
            # Called from here so that its skip=2 lands on the frame's caller.
            policy.exchange_first_entry()
        outcome = policy.take_mixed()
        if outcome is not None:
            policy.handle_mixed(outcome, self._policy_name, frame, cache_entry)
        result = self._inner(frame, cache_entry, frame_state)
        if getattr(result, "guarded_code", None) is not None:
            policy.counts.compiles += 1
        return result
