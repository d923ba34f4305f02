"""Rank-prefixed, timestamped logging under the ``dynamo_dist`` logger.

Every line carries its rank and time, so interleaved output from torchrun workers can be
read and set against torch's own lines: by default ``[rank0]:2026-12-07 12:00:01,123 W
dynamo_dist.cache: ...``, the rank prefix torch's logs use. The level comes from
``log_level`` (``DYNAMO_DIST_LOG``), the layout from ``log_format``
(``DYNAMO_DIST_LOG_FORMAT``): a :mod:`logging` %-style format with the fields of a
``LogRecord`` and ``%(rank)s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

_ROOT = "dynamo_dist"
DEFAULT_FORMAT = "[rank%(rank)s]:%(asctime)s %(levelname).1s %(name)s: %(message)s"
#: What a format may hold, as a config error says it.
FORMAT_RULE = (
    "a logging %-style format containing %(message)s, with fields of logging.LogRecord "
    "(%(asctime)s, %(levelname)s, %(name)s, ...) and %(rank)s"
)

_handler: logging.Handler | None = None  # ours, if we added it


#: The rank torch.distributed gave this process, once seen: the job report is logged
#: after the process group is gone, and launchers such as Lightning's start rank 0
#: without ``RANK`` in its environment.
_seen_rank: str | None = None


def _rank() -> str:
    global _seen_rank
    dist = sys.modules.get("torch.distributed")
    with contextlib.suppress(Exception):  # never let a log line fail on this
        if dist is not None and dist.is_available() and dist.is_initialized():
            _seen_rank = str(dist.get_rank())
    return _seen_rank or os.environ.get("RANK", "-")


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return True


def format_problem(fmt: object) -> str | None:
    """Why ``fmt`` cannot lay out dynamo_dist's lines (None: it can).

    Tried on a sample line here, at configuration, so a typo in a field name is one
    config error instead of a ``--- Logging error ---`` traceback on every line.
    """
    if not isinstance(fmt, str):
        return f"not text ({type(fmt).__name__})"
    sample = "\x00sample message\x00"
    record = logging.LogRecord(_ROOT, logging.WARNING, __file__, 1, sample, None, None)
    record.rank = "0"
    try:
        line = logging.Formatter(fmt, validate=True).format(record)
    except (ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None if sample in line else "it has no %(message)s"


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """Attach one stderr handler to the ``dynamo_dist`` logger, or update ours.

    Applications that configure logging themselves keep control: we only add a
    handler when the logger has none (then ``fmt`` is theirs to apply), and never touch
    the root logger. ``fmt`` (checked by the config) replaces our handler's layout.
    """
    global _handler
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
    if _handler is None and not logger.handlers:
        _handler = logging.StreamHandler()
        _handler.addFilter(_RankFilter())
        _handler.setFormatter(logging.Formatter(DEFAULT_FORMAT))
        logger.addHandler(_handler)
        logger.propagate = False
    if fmt is not None and _handler is not None:
        _handler.setFormatter(logging.Formatter(fmt))


def get_logger(name: str) -> logging.Logger:
    """Logger ``dynamo_dist.<name>``."""
    return logging.getLogger(f"{_ROOT}.{name}")
