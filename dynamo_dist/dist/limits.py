"""Bounds on what dynamo_dist reads from other processes (the job's key-value store).

Its own module at the bottom of the package: the restricted unpickler in
``_torch_compat`` counts against these caps, and ``_store_payload`` checks the rest.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_STORE_OBJECTS", "MAX_STORE_PAYLOAD_BYTES", "PayloadRefused", "TooManyObjects"]

#: The most bytes one value read from the job's store may have. A code state is a few
#: KB per frame, a status record or a report a few KB: 1 MiB is far above any real one
#: and far below what hurts a rank (every rank of a 4,096-rank job may read them).
MAX_STORE_PAYLOAD_BYTES: Final = 1 << 20
#: The most objects unpickling or rebuilding one profile or view may build, every
#: reference to a shared object counted again: a memo reference costs one byte of the
#: pickle but a full copy when the state is rebuilt, so the byte cap alone does not
#: bound the work. A real profile builds a few hundred objects per frame.
MAX_STORE_OBJECTS: Final = 100_000


class PayloadRefused(ValueError):
    """A value from the job's store that is not used: over a cap, or a missing or bad MAC."""


class TooManyObjects(PayloadRefused):
    """Unpickling or rebuilding stopped: it would have built more than ``cap`` objects."""

    def __init__(self, counted: int, cap: int) -> None:
        super().__init__(
            f"it builds more than {cap} objects (shared references counted each time); "
            "a code state is a few hundred objects per frame"
        )
        self.counted = counted
        self.cap = cap
