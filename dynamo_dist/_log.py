"""Rank-prefixed logging under the ``dynamo_dist`` logger.

Every line carries ``[rank R]`` so interleaved output from torchrun workers can
be read; the level comes from ``DYNAMO_DIST_LOG``.
"""

from __future__ import annotations

import logging
import os

_ROOT = "dynamo_dist"
_configured = False


def _rank() -> str:
    return os.environ.get("RANK", "-")


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.dd_rank = _rank()
        return True


def configure(level: str | None = None) -> None:
    """Attach one stderr handler to the ``dynamo_dist`` logger (idempotent).

    Applications that configure logging themselves keep control: we only add a
    handler when the logger has none, and never touch the root logger.
    """
    global _configured
    logger = logging.getLogger(_ROOT)
    level = level or os.environ.get("DYNAMO_DIST_LOG")
    if level:
        logger.setLevel(level.upper())
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    # The job report is output the user asked for, not a diagnostic: shown at
    # the default level, hidden only by an explicit DYNAMO_DIST_LOG=ERROR.
    report = logging.getLogger(f"{_ROOT}.report")
    if logger.getEffectiveLevel() <= logging.WARNING and report.level == logging.NOTSET:
        report.setLevel(logging.INFO)
    if _configured or logger.handlers:
        _configured = True
        return
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter())
    handler.setFormatter(
        logging.Formatter("[rank %(dd_rank)s] %(name)s %(levelname)s: %(message)s")
    )
    logger.addHandler(handler)
    logger.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """Logger ``dynamo_dist.<name>``."""
    return logging.getLogger(f"{_ROOT}.{name}")
