"""Public exceptions.

Every error says what happened, on which rank, and what to do next: these are
the messages users read at 3am when a 512-rank job stops.
"""

from __future__ import annotations


class DynamoDistError(RuntimeError):
    """Base class of every error dynamo_dist raises on purpose."""


class ConfigError(DynamoDistError, ValueError):
    """A configuration key has a bad value; the message names key, value and allowed values."""


class RankDivergenceError(DynamoDistError):
    """Ranks disagree about what they compile: different frames, sequence numbers or guards.

    ``ranks`` maps each rank to what it reported (frame, sequence number, hit, reasons).
    """

    def __init__(self, message: str, ranks: dict[int, dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.ranks: dict[int, dict[str, object]] = ranks or {}


class CollectiveTimeoutError(DynamoDistError, TimeoutError):
    """A guard exchange did not complete: some ranks never arrived (slow, hung, exited or dead).

    ``missing`` lists the ranks that did not arrive; ``last_seen`` maps each rank to its
    last published status (sequence number, frame, state).
    """

    def __init__(
        self,
        message: str,
        missing: list[int] | None = None,
        last_seen: dict[int, dict[str, object]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing: list[int] = missing or []
        self.last_seen: dict[int, dict[str, object]] = last_seen or {}
