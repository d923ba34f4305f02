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
#
# Context managers here are small classes rather than ``contextlib`` generators so this
# section needs no imports of its own at the top of the file (sections stay independent).


def inductor_backend(mode: str | None, options: dict[str, Any] | None, dynamic: bool | None) -> Any:
    """Inductor's own Dynamo backend, as ``torch.compile(backend="inductor")`` builds it.

    ``torch._TorchCompileInductorWrapper(mode, options, dynamic)``: same signature from
    torch 2.1 through 2.13 (used on 2.9, 2.11 and 2.13). The shared cache wraps it.
    """
    from torch import _TorchCompileInductorWrapper

    wrapper: Any = _TorchCompileInductorWrapper  # untyped in torch
    return wrapper(mode, options, dynamic)


class eager_backward_lowering:
    """Have AOTAutograd compile the backward inside the backend call; restored on exit.

    ``torch._functorch.config.force_non_lazy_backward_lowering``: present in torch 2.9
    through 2.13; where a torch lacks it this is a no-op (the backward is then compiled
    lazily, outside the cache entry). ``config.patch`` puts the previous value back.
    """

    def __init__(self) -> None:
        self._patch: Any = None

    def __enter__(self) -> None:
        from torch._functorch import config as functorch_config

        if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            self._patch = functorch_config.patch(force_non_lazy_backward_lowering=True)
            self._patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._patch is not None:
            patch, self._patch = self._patch, None
            patch.__exit__(*exc)


class inductor_cache_dir_override:
    """Point inductor's on-disk caches at ``path`` for the block; restored on exit.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` on every cache lookup
    (``torch._inductor.runtime.cache_dir_utils.cache_dir``, torch 2.4 through 2.13), so
    setting the variable for the block is enough; its previous value (or absence) is
    put back even if the compile raises.
    """

    _VAR = "TORCHINDUCTOR_CACHE_DIR"

    def __init__(self, path: object) -> None:
        self._path = str(path)
        self._prev: str | None = None

    def __enter__(self) -> None:
        import os

        self._prev = os.environ.get(self._VAR)
        os.environ[self._VAR] = self._path

    def __exit__(self, *exc: object) -> None:
        import os

        if self._prev is None:
            os.environ.pop(self._VAR, None)
        else:
            os.environ[self._VAR] = self._prev


def inductor_cache_dir() -> str:
    """The inductor cache directory in effect now (``TORCHINDUCTOR_CACHE_DIR`` included).

    ``torch._inductor.runtime.cache_dir_utils.cache_dir``: torch 2.4 through 2.13.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return str(cache_dir())


def inductor_default_cache_dir() -> str:
    """Inductor's cache directory when ``TORCHINDUCTOR_CACHE_DIR`` is unset (under /tmp).

    ``torch._inductor.runtime.cache_dir_utils.default_cache_dir``: torch 2.4 through 2.13.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return str(default_cache_dir())


def inductor_fxgraph_cache_misses() -> int:
    """How many FX graph cache misses (real inductor compiles) this process has had.

    ``torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]``: torch 2.2 through
    2.13.
    """
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])
