"""Policy: what a guard miss on some ranks does (``sync``, ``strict``, ``warn``).

The exchange (``_collective``/``_shm``) only notices that some ranks hit and others
missed; it puts that :class:`~dynamo_dist.exchange.record.Outcome` in the group's
:class:`~dynamo_dist.exchange.record.MixedSlot`, which this layer takes. Here,
on the next entry into Dynamo's frame callback (where every rank is, since the hitting
ranks were forced to recompile), the ranks gather why the missing ones missed, and the
policy decides whether that is logged or raised. Forced recompiles and strict refusals
are emitted as events (``_events``).
"""

from __future__ import annotations

from typing import Any

from dynamo_dist._errors import RankDivergenceError, wrong_thread
from dynamo_dist._log import get_logger
from dynamo_dist.dynamo import compat
from dynamo_dist.dynamo import events as dynamo_events
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo.hook import _C, describe_identity
from dynamo_dist.exchange.collective import Transport
from dynamo_dist.exchange.record import MixedSlot, Outcome
from dynamo_dist.exchange.stats import Counts

log = get_logger("runtime")

_FIRST_ENTRY_REASON = (
    "no compiled entry for this frame on this rank (first call here, or after Dynamo's reset())"
)


class Policy:
    """The policy layer over one transport and its hook; counts into ``counts``.

    ``mixed_slot``: the group's handoff from the exchange (the transport's, by default).
    """

    def __init__(
        self,
        transport: Transport,
        hook: _C.GuardHook,
        counts: Counts,
        mixed_slot: MixedSlot | None = None,
    ) -> None:
        self.transport = transport
        self.hook = hook
        self.counts = counts
        self.mixed_slot = mixed_slot if mixed_slot is not None else transport.mixed_slot

    def check_thread(self) -> None:
        """Raise DynamoDistError if another thread owns this group's exchange."""
        if not self.hook.thread_ok():
            raise wrong_thread(self.hook.owner_thread)

    @dynamo_hook.transparent
    def exchange_first_entry(self, code: Any = None) -> bool:
        """Exchange a local miss for a frame this rank has no entries for.

        Dynamo calls the C++ hook only for frames that already have compiled entries;
        a rank meeting a frame for the first time goes straight to the callback. Without
        this exchange, a rank holding entries would wait in an exchange the fresh rank
        never joins.
        """
        self.counts.first_entry_exchanges += 1
        # Another rank's identity for the same call comes from the C++ hook, with no
        # Python frames of ours: this method and the callbacks are transparent, so both
        # name the same caller. code: the frame's own code, the hook's pending callee.
        ident = dynamo_hook.identity(code)
        try:
            return self.hook.exchange(False, ident)
        except BaseException as e:
            _C.set_pending_error(e)
            raise

    def take_mixed(self) -> Outcome | None:
        """The last exchange's outcome if some ranks hit and others missed (taken once)."""
        return self.mixed_slot.take(self.transport.position()[0])

    def handle_mixed(
        self,
        outcome: Outcome,
        policy: str,
        frame: Any,
        cache_entry: Any,
        missed_because: list[str] | None = None,
    ) -> None:
        """Gather why the missing ranks missed, then log or raise according to ``policy``.

        Every rank reaches this for the same exchange (the hitting ranks were
        forced into the callback), so the gather below pairs up. ``missed_because``:
        this rank's reasons where they are not Dynamo's (a precompiled artifact's).
        """
        if outcome.hit:
            reasons = None
        elif missed_because is not None:
            reasons = missed_because
        elif cache_entry is None:
            reasons = [_FIRST_ENTRY_REASON]
        else:
            reasons = guard_failure_reasons(frame, cache_entry)
        records = self.transport.gather_objects({"hit": outcome.hit, "reasons": reasons})
        missed = [r for r, rec in enumerate(records) if not rec["hit"]]
        hit = [r for r, rec in enumerate(records) if rec["hit"]]
        what = describe_identity(outcome.ident)
        detail = "; ".join(
            f"rank {r}: {' | '.join(records[r]['reasons'] or ['guards failed'])}" for r in missed
        )
        msg = (
            f"forced recompile of {what} at guard exchange #{outcome.seq}: "
            f"ranks {missed} missed ({detail}); ranks {hit} hit"
        )
        self.counts.forced_recompiles_logged += 1
        reasons_by_rank = {r: records[r]["reasons"] for r in missed}
        if policy == "strict":
            self.counts.strict_errors += 1
            by_rank = {
                r: {"hit": rec["hit"], "reasons": rec["reasons"], "frame": what, "seq": outcome.seq}
                for r, rec in enumerate(records)
            }
            dynamo_events.emit(
                "divergence",
                kind="strict_refused_miss",
                policy=policy,
                frame=what,
                seq=outcome.seq,
                missed=missed,
                hit=hit,
                reasons=reasons_by_rank,
            )
            raise RankDivergenceError(
                f"policy 'strict': {msg}. Make the inputs that the listed guards check identical "
                "across ranks (or mark them dynamic), or use policy 'sync' to recompile on all "
                "ranks instead of failing.",
                by_rank,
            )
        dynamo_events.emit(
            "forced_recompile",
            policy=policy,
            frame=what,
            seq=outcome.seq,
            forced=outcome.hit,
            missed=missed,
            hit=hit,
            reasons=reasons_by_rank,
        )
        if policy == "warn":
            log.warning("%s", msg)
        else:
            log.info("%s", msg)


def guard_failure_reasons(frame: Any, cache_entry: Any) -> list[str]:
    """Dynamo's own guard-failure reasons for ``frame`` against its cache entries."""
    try:
        reasons = compat.guard_failure_reasons(frame, cache_entry)
        return [" ".join(r.split()) for r in reasons] or ["guards failed"]
    except Exception as e:  # diagnostics must never break training
        return [f"guards failed (reasons unavailable: {type(e).__name__}: {e})"]
