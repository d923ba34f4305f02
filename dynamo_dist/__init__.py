"""dynamo_dist: torch.compile that is safe and fast in multi-rank training.

Public API: :func:`compile`, :func:`local`, :func:`stats`, :func:`shutdown`, :class:`Config`,
the switch for programs whose framework calls torch.compile (:func:`patch_torch_compile`,
:func:`set_default_group`) and the exceptions below. Everything else is private.
"""

from __future__ import annotations

from dynamo_dist.cache import secret

# First, before anything can compile: inductor copies DYNAMO*/TORCH* environment
# variables into the repro scripts it pickles into every cache entry (see _secret).
secret.take_from_environment()

from dynamo_dist._api import compile, shutdown, stats  # noqa: E402
from dynamo_dist._config import Config  # noqa: E402
from dynamo_dist._errors import (  # noqa: E402
    CollectiveTimeoutError,
    ConfigError,
    DynamoDistError,
    RankDivergenceError,
)
from dynamo_dist._switch import TorchCompilePatch, patch_torch_compile  # noqa: E402
from dynamo_dist._version import __version__  # noqa: E402
from dynamo_dist.dist.group import set_default_group  # noqa: E402
from dynamo_dist.dist.local import local  # noqa: E402

__all__ = [
    "CollectiveTimeoutError",
    "Config",
    "ConfigError",
    "DynamoDistError",
    "RankDivergenceError",
    "TorchCompilePatch",
    "__version__",
    "compile",
    "local",
    "patch_torch_compile",
    "set_default_group",
    "shutdown",
    "stats",
]
