"""Events users debug with, written where PyTorch users already look.

Each event goes to PyTorch's structured trace (``TORCH_TRACE=dir``, read by tlparse)
as a ``dynamo_dist_<name>`` artifact, and is counted in
Dynamo's ``utils.counters["dynamo_dist"]``. Emitting must never break training:
any failure here is swallowed after one debug line.
"""

from __future__ import annotations

from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dynamo import compat

log = get_logger("events")

#: Every event dynamo_dist emits (tests/unit/test_event_names.py checks each call site names one,
#: and that each reaches the trace).
EVENTS = (
    "forced_recompile",  # some ranks' guards missed, all recompile (policy sync/warn)
    "divergence",  # ranks disagree on what they guard, or strict policy refused a miss
    "stall",  # an exchange timed out or a peer died
    "stall_warning",  # an exchange has waited long (before it times out): who is missing
    "rank_stalled",  # a rank stopped publishing its status (stopped, stuck): who and where
    "cache_load",  # an entry was verified and installed
    "cache_publish",  # a leader published an entry
    "cache_refusal",  # an entry failed verification
    "cache_profile_load",  # a group's automatic-dynamic profile was read before tracing
    "cache_profile_publish",  # a group's automatic-dynamic profile was published
    "precompiled_capture",  # a leader captured a precompiled artifact
    "precompiled_load",  # a precompiled artifact was loaded: the module runs without Dynamo
    "precompiled_fallback",  # a module left the precompiled route (payload: reason, detail)
)


def emit(name: str, **payload: Any) -> None:
    """Record event ``name`` (one of :data:`EVENTS`) with a JSON-able ``payload``."""
    if name not in EVENTS:
        log.error("event %r is not in dynamo_dist's EVENTS: not emitted", name)
        return
    try:
        compat.bump_counter("dynamo_dist", name)
        compat.trace_artifact(name, payload)
    except Exception as e:  # observability must never cost a training step
        log.debug("could not emit %s: %s", name, e)
