"""Out-of-band status board: where each rank last was, kept in the job's key-value store.

A rank stuck in a collective cannot answer questions, so when an exchange
times out the waiting rank reads this board to name the ranks that did not
arrive and the last frame each reached. Publishing runs on a background thread
at ``status_interval`` and reads the rank's position itself: the exchange hot
path never touches the board.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dist import store as dist_store

log = get_logger("status")

_PREFIX = "dynamo_dist/status/"
_HOST = socket.gethostname()
# One TCPStore serves the whole job, so the board's load on it is bounded job-wide,
# not per rank: publishing slows down as the job grows (at most about this many
# writes a second in total), and only about this many ranks read the whole board
# when an exchange stalls (each read fetches every rank's record).
_BOARD_WRITES_PER_S = 250.0
_BOARD_READERS = 64


def publish_interval(interval: float, world_size: int) -> float:
    """Seconds between a rank's status writes: ``interval``, or longer in a large job."""
    return max(interval, world_size / _BOARD_WRITES_PER_S)


def board_reader_stride(group_size: int) -> int:
    """Members ``0, k, 2k, ...`` of a group read the whole board; ``k`` is 1 up to 64 ranks.

    Only they read every rank's record when an exchange stalls; the others name one of
    them instead (a full read per rank would be world_size**2 bytes).
    """
    return max(1, -(-group_size // _BOARD_READERS))


class StatusBoard:
    """Publishes this rank's (sequence number, frame, state) and reads everyone's."""

    def __init__(
        self,
        store: dist_store.Store,
        rank: int,
        world_size: int,
        interval: float,
        describe: Callable[[int], str],
    ) -> None:
        self.store = store
        self._rank = rank
        self._world = world_size
        # Ticks (progress lines, stall warnings) keep the configured pace; writes to
        # the store slow down in a large job (see publish_interval).
        self.tick_interval = interval
        self.interval = publish_interval(interval, world_size)
        self._describe = describe
        # Where this rank is, per group (by name): () -> (last exchange number, its
        # frame identity, process-wide order of that exchange). Added by the runtime
        # as groups are set up; read only by the publisher thread, so
        # the exchange hot path never touches the board.
        self.positions: dict[str, Callable[[], tuple[int, int, int]]] = {}
        # A rank counts as silent after this long without a heartbeat (published
        # at most every 2 intervals, so a live rank is never mislabelled).
        self.stale_after = max(10.0, 5 * self.interval)
        # Whether this rank is running code inside dynamo_dist.local() (any thread):
        # a peer waiting for it is then waiting on rank-local work, not on a lost rank.
        self.in_local: Callable[[], bool] = lambda: False
        # Called on every tick, off the hot path (progress lines while waiting).
        self.ticks: list[Callable[[], None]] = []
        self._state = "running"
        self._started: set[int] = {rank}
        self._published: tuple[Any, ...] | None = None
        self._last_publish = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynamo_dist-status", daemon=True)
        # Published at once, so that every rank's key exists and a reader can fetch the
        # whole board in one ``multi_get``.
        self.publish(force=True)
        self._thread.start()

    def _payload(self, positions: dict[str, tuple[int, int, int]], in_local: bool) -> str:
        groups = {
            name: {"seq": seq, "frame": self._describe(ident) if ident else None, "epoch": epoch}
            for name, (seq, ident, epoch) in positions.items()
        }
        latest = max(groups.items(), key=lambda kv: int(kv[1]["epoch"] or 0), default=None)
        return json.dumps(
            {
                # The most recent exchange of any group (what "where is it" means).
                "seq": latest[1]["seq"] if latest else 0,
                "frame": latest[1]["frame"] if latest else None,
                "group": latest[0] if latest else None,
                # Per group, by name ("channels": the published field's name).
                "channels": groups,
                "local": in_local,
                "state": self._state,
                # Where to find it: the stall watch names a stopped rank by these.
                "host": _HOST,
                "pid": os.getpid(),
                "time": time.time(),
            }
        )

    def publish(self, force: bool = False) -> None:
        positions = {name: pos() for name, pos in list(self.positions.items())}
        in_local = self.in_local()
        key = (tuple(sorted(positions.items())), in_local, self._state)
        now = time.monotonic()
        # A change is published at most once an interval; unchanged status every 2
        # intervals, as a heartbeat.
        if not force:
            # Half a tick of slack: ticks that arrive a little early must not skip one.
            since = now - self._last_publish + self.tick_interval / 2
            if since < self.interval or (key == self._published and since < 2 * self.interval):
                return
        try:
            self.store.set(f"{_PREFIX}{self._rank}", self._payload(positions, in_local))
            self._published = key
            self._last_publish = now
        except Exception as e:  # the store going away must never break training
            log.debug("could not publish status: %s", e)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_interval):
            self.publish()
            for tick in self.ticks:
                try:
                    tick()
                except Exception as e:  # a diagnostic must never kill the thread
                    log.debug("status tick failed: %s", e)

    def close(self, state: str = "exited") -> None:
        if self._stop.is_set():
            return
        self._state = state
        self._stop.set()
        self.publish(force=True)
        # Drop the groups' callbacks (they hold the transports) and let the thread
        # finish its tick: nothing of a shut-down runtime may outlive close().
        self.positions = {}
        self.ticks = []
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)

    def started(self) -> set[int]:
        """Ranks that ever published a status, i.e. started dynamo_dist.

        One ``check`` of every key when all have (the usual case), else one per rank not
        yet seen: keys are never removed, so a rank seen once is not asked about again.
        """
        try:
            if len(self._started) < self._world and self.store.check(
                [f"{_PREFIX}{r}" for r in range(self._world)]
            ):
                self._started = set(range(self._world))
            for r in set(range(self._world)) - self._started:
                if self.store.check([f"{_PREFIX}{r}"]):
                    self._started.add(r)
        except Exception as e:
            log.debug("could not read the status keys: %s", e)
        return set(self._started)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """Last published status of every rank ({} entries for ranks that never published).

        Two store operations when every rank has published (a ``check`` of all keys,
        then one ``multi_get``), instead of two per rank.
        """
        keys = [f"{_PREFIX}{r}" for r in range(self._world)]
        try:
            if self.store.check(keys):
                return {r: _parse(raw) for r, raw in enumerate(self.store.multi_get(keys))}
        except Exception as e:
            log.debug("could not read the status board at once: %s", e)
        out: dict[int, dict[str, Any]] = {}
        for r, key in enumerate(keys):
            try:
                out[r] = _parse(self.store.get(key)) if self.store.check([key]) else {}
            except Exception as e:
                out[r] = {"error": str(e)}
        return out


class RecordAges:
    """How long each rank's status record has stayed as it was, on this process's clock.

    Judged by when this process last saw the record's ``time`` change, never by that
    timestamp itself: hosts' clocks differ. Used by the stall watch and by rank 0's wait
    for the exit reports, which both must tell a stopped or dead rank from a live one.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, float]] = {}  # rank -> (its record's time, since)

    def age(self, rank: int, stamp: Any, now: float) -> float | None:
        """Seconds ``rank``'s record has had ``stamp``; None when it is new or just changed."""
        seen = self._seen.get(rank)
        if seen is None or seen[0] != stamp:
            self._seen[rank] = (stamp, now)
            return None
        return now - seen[1]

    def forget(self, rank: int) -> None:
        self._seen.pop(rank, None)

    def restart(self, now: float) -> None:
        """Count every record's age from ``now`` (this process itself was not running)."""
        self._seen = {r: (stamp, now) for r, (stamp, _) in self._seen.items()}


def _parse(raw: Any) -> dict[str, Any]:
    """A rank's status record, or ``{"error": ...}``: any process may have set the key.

    One over the store's size cap is refused (counted) before it is parsed, and the
    reader goes on as if that rank had published nothing usable.
    """
    try:
        data = dist_store.checked(raw, "status record")
    except dist_store.PayloadRefused as e:
        dist_store.refuse("status record", e)
        return {"error": str(e)}
    try:
        value = json.loads(data)
    except Exception as e:
        return {"error": str(e)[:300]}
    if not isinstance(value, dict):
        return {"error": "not a status record"}
    problem = _record_problem(value)
    if problem is not None:
        # Well-formed JSON with a field of another type: describe_missing and the stall
        # warning would raise on it (float("x"), a channel without its seq) in place of
        # the timeout error they explain.
        dist_store.refuse("status record", dist_store.PayloadRefused(problem))
        return {"error": problem}
    return value


#: The fields a status record's readers use, and the types ``_payload`` writes.
_FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,),
    "frame": (str, type(None)),
    "group": (str, type(None)),
    "local": (bool,),
    "state": (str,),
    "host": (str,),
    "pid": (int,),
    "time": (int, float),
}


def _bad_field(name: str, value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return True
    if name == "time" and isinstance(value, int | float):
        try:  # describe_missing does float() of it: 1e400 is inf, 10**400 overflows
            return not math.isfinite(float(value))
        except OverflowError:
            return True
    return not isinstance(value, kinds)


def _record_problem(record: dict[str, Any]) -> str | None:
    """What makes ``record`` not a status record (a field of another type), or None."""
    for name, kinds in _FIELDS.items():
        if name in record and _bad_field(name, record[name], kinds):
            return f"status record field {name!r} is a {type(record[name]).__name__}"
    channels = record.get("channels")
    if channels is None:
        return None
    if not isinstance(channels, dict):
        return "status record channels are not an object"
    for channel in channels.values():
        if not isinstance(channel, dict) or "seq" not in channel:
            return "status record channel is not an object with a seq"
        for name in ("seq", "frame", "epoch"):
            kinds = (int, type(None)) if name == "epoch" else _FIELDS[name]
            if name in channel and _bad_field(name, channel[name], kinds):
                return f"status record channel field {name!r} is a {type(channel[name]).__name__}"
    return None


def describe_missing(
    board: dict[int, dict[str, Any]], group_name: str, my_seq: int, stale_after: float
) -> tuple[list[int], list[str]]:
    """Ranks that did not reach exchange ``my_seq`` of ``group_name``, and where each was."""
    now = time.time()
    missing: list[int] = []
    lines: list[str] = []
    for r, st in sorted(board.items()):
        if not st or "seq" not in st:
            missing.append(r)
            lines.append(f"rank {r}: never published a status (not started, or no exchange yet)")
            continue
        age = now - float(st.get("time", now))
        mine = (st.get("channels") or {}).get(group_name, {"seq": 0, "frame": None})
        where = f"exchange #{mine['seq']} at {mine.get('frame') or 'no frame yet'}"
        if st.get("group") not in (None, group_name):
            where += (
                f" (latest: exchange #{st['seq']} of group {st['group']} at "
                f"{st.get('frame') or '?'})"
            )
        state = st.get("state", "running")
        if state != "running":
            missing.append(r)
            lines.append(f"rank {r}: {state} after {where}")
        elif int(mine["seq"]) < my_seq or age > stale_after:
            missing.append(r)
            stale = f", silent for {age:.0f}s" if age > stale_after else ""
            busy = ", now inside dynamo_dist.local()" if st.get("local") else ""
            lines.append(f"rank {r}: last at {where}{stale}{busy}")
        else:
            lines.append(f"rank {r}: arrived, at {where}")
    return missing, lines
