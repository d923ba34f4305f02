"""dynamo_dist: torch.compile that is safe and fast in multi-rank training.

Public API: :func:`compile`, :func:`stats`, :func:`shutdown`, :class:`Config`
and the exceptions below. Everything else is private.
"""

from __future__ import annotations

from ._api import compile, shutdown, stats
from ._config import Config
from ._errors import CollectiveTimeoutError, ConfigError, DynamoDistError, RankDivergenceError
from ._version import __version__

__all__ = [
    "CollectiveTimeoutError",
    "Config",
    "ConfigError",
    "DynamoDistError",
    "RankDivergenceError",
    "__version__",
    "compile",
    "shutdown",
    "stats",
]
