"""Public exceptions.

Every error says what happened, on which rank, and what to do next: these are
the messages users read at 3am when a 512-rank job stops.
"""

from __future__ import annotations

import copy
import threading


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


def pending(err: BaseException) -> BaseException:
    """A fresh exception to raise for the error kept from a failed exchange, chained to it.

    Raising the kept object itself on every later compiled call would append to its
    traceback each time (keeping those frames alive); a shallow copy of the same type
    and message, with the original as ``__cause__``, says the same and grows nothing.
    """
    try:
        fresh = copy.copy(err)
        if type(fresh) is not type(err) or str(fresh) != str(err):
            raise TypeError("not copyable")
    except Exception:
        fresh = DynamoDistError(f"an earlier guard exchange failed: {err}")
    fresh.__cause__ = err
    fresh.__suppress_context__ = True
    return fresh


def wrong_thread(owner: int) -> DynamoDistError:
    """The error for a compiled call in a region from a thread not owning its group's exchange."""
    current = threading.current_thread()
    owner_thread = next((t for t in threading.enumerate() if t.ident == owner), None)
    owner_name = owner_thread.name if owner_thread is not None else "a thread that has exited"
    return DynamoDistError(
        f"compiled code of a dynamo_dist.compile region was called on thread "
        f"{current.name!r} (ident {current.ident}), but this group's guard exchange belongs "
        f"to thread {owner_name!r} (ident {owner}), the first thread that exchanged on it. "
        "Exchanges from several threads of one rank cannot be paired with the other ranks' "
        "in a deterministic order. Make every compiled call inside dynamo_dist.compile "
        "regions from that one thread, or run this thread's calls inside "
        "`with dynamo_dist.local():` (rank-local: nothing is exchanged)."
    )
