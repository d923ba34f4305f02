"""Every private torch API dynamo_dist uses, in one place.

Each function names the torch versions it is known to work with (CI runs 2.13 on
CPU; the GPU hosts run 2.11; the package supports >= 2.9). Anything that patches
torch does so in a scoped, restorable way: it returns what it replaced.

Sections, in the order of the architecture (hook -> exchange -> policy -> consensus
-> cache): add new shims to the section of the module that needs them.
"""

from __future__ import annotations

import json
from typing import Any

# -- observability (tlparse, counters) ----------------------------------------------------


def trace_artifact(name: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as a structured-trace artifact (shown by tlparse with TORCH_TRACE).

    ``torch._logging.trace_structured``: torch 2.2+; the ``artifact`` form with
    ``metadata_fn``/``payload_fn`` is stable from 2.4 through 2.13. A no-op (cheap)
    when no structured trace is being written.
    """
    from torch._logging import trace_structured

    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"dynamo_dist_{name}", "encoding": "json"},
        payload_fn=lambda: json.dumps(payload, default=str, sort_keys=True),
        # Our events happen outside any compile (guard exchanges, cache waits).
        expect_trace_id=False,
    )


def bump_counter(group: str, name: str, by: int = 1) -> None:
    """``torch._dynamo.utils.counters[group][name] += by`` (torch 2.0 through 2.13)."""
    from torch._dynamo.utils import counters

    counters[group][name] += by


# -- hook, exchange, policy, consensus (Dynamo) ---------------------------------------------

# -- cache (Inductor, AOTAutograd) ------------------------------------------------------------
