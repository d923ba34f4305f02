"""The guard exchange's record format: one int64 whose AND over ranks is the decision.

One exchange is one ``all_reduce(BAND)`` of a single int64. The word holds a
32-bit record ``x = (identity << 1) | hit`` in its low half and ``~x`` in its
high half. After a bitwise AND over ranks, a bit that was 1 everywhere is 1 in
the low half, a bit that was 0 everywhere is 1 in the high half, and a bit on
which ranks disagree is 0 in both. So a single-element collective gives the AND
of the hits and detects any disagreement about which frame is being guarded.
Gloo's single-element allreduce is its cheapest collective (measured here:
about 2-4x cheaper than 3 to 5 elements). The AND composes, so the shared-memory
transport combines a host's records the same way before its leader goes to
the network (``exchange/shm.py``), and recursive doubling among the host leaders
gives the same words (``exchange/allreduce.py``). Only when something is off (a
frame mismatch, or some ranks hit while others miss) do the ranks run a second,
richer collective to learn who reported what; they all take that branch together
because they all see the same reduced word.

The format is pure arithmetic, shared with the C++ hook (``csrc/guard_hook.h``):
this module holds the words and nothing that moves them.
"""

from __future__ import annotations

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
_IDENT_BITS = 31


def pack(hit: bool, ident: int) -> int:
    """The int64 a rank contributes: (x, ~x) halves, as a signed value for torch."""
    x = (((ident & ((1 << _IDENT_BITS) - 1)) << 1) | int(bool(hit))) & M32
    word = ((~x & M32) << 32) | x
    return word - (1 << 64) if word >= (1 << 63) else word


def unpack(word: int) -> tuple[bool, bool, bool]:
    """(all_hit, any_hit, identities_agree) from the AND-reduced word."""
    w = word & M64
    low, high = w & M32, w >> 32
    disagree = ~(low | high) & M32
    return bool(low & 1), not (high & 1), (disagree & ~1) == 0


class Outcome:
    """An exchange where some ranks hit and others missed, kept for the policy layer."""

    __slots__ = ("hit", "ident", "seq")

    def __init__(self, seq: int, ident: int, hit: bool) -> None:
        self.seq = seq
        self.ident = ident
        self.hit = hit


class MixedSlot:
    """A group's mixed :class:`Outcome`, handed from its exchange to its policy layer.

    Why a handoff and not a return value: an exchange's verdict reaches Dynamo through
    the C++ guard hook (``csrc/guard_hook.cpp``), which calls the Python slow path
    (``Transport.decide``) and returns Dynamo one bool: run the cached entry or not.
    What to do about a mixed exchange is decided later, in a second, separate call:
    Dynamo's call of the frame callback that the ``False`` verdict forced
    (``dynamo/callback.py``), or, on the precompiled route, the code after
    ``GuardHook.exchange`` returned its bool (``cache/precompiled.py``). The outcome has
    to cross from the one call to the other, so the exchange puts it here and the
    policy takes it. One slot per group (``dist.runtime.Group`` makes it and hands it to
    its transport and its policy), used by the thread that owns the group's exchange.
    """

    __slots__ = ("_outcome",)

    def __init__(self) -> None:
        self._outcome: Outcome | None = None

    def put(self, outcome: Outcome) -> None:
        """Keep ``outcome``, the mixed result of the exchange just decided."""
        self._outcome = outcome

    def peek(self) -> Outcome | None:
        """The outcome kept, without taking it."""
        return self._outcome

    def take(self, seq: int) -> Outcome | None:
        """The outcome of exchange ``seq`` (the group's last) if it was mixed; then cleared.

        An outcome of an earlier exchange is not this call's (its exchange's verdict was
        handled, or the call never reached the policy): None.
        """
        out = self._outcome
        if out is None or out.seq != seq:
            return None
        self._outcome = None
        return out


# Recursive doubling's failure notice: a word whose low and high halves share a bit,
# which no AND of packed records can be (each record's halves are x and ~x). Bit 31
# of each half marks it; bit 30 says the suspect timed out (clear: it died); the
# low 30 bits are the suspect's index in the leaders' group.
POISON = 1 << 31
POISON_TIMEOUT = 1 << 30
SUSPECT = (1 << 30) - 1
