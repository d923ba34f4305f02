"""Out-of-band status board: where each rank last was, kept in the job's key-value store.

A rank stuck in a collective cannot answer questions, so when an exchange
times out the waiting rank reads this board to name the ranks that did not
arrive and the last frame each reached. Publishing runs on a background thread
at ``status_interval`` and reads the rank's position itself: the exchange hot
path never touches the board.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from . import _torch_compat
from ._log import get_logger

log = get_logger("status")

# torch.distributed.Store: exported only when torch is built with distributed support,
# so its stubs do not declare it; the board only calls set/get/check on it.
Store = Any

_PREFIX = "dynamo_dist/status/"


class StatusBoard:
    """Publishes this rank's (sequence number, frame, state) and reads everyone's."""

    def __init__(
        self,
        store: Store,
        rank: int,
        world_size: int,
        interval: float,
        describe: Callable[[int], str],
    ) -> None:
        self.store = store
        self._rank = rank
        self._world = world_size
        self.interval = interval
        self._describe = describe
        # Where this rank is, per channel (group of ranks): () -> (last exchange
        # number, its frame identity, process-wide order of that exchange). Added by
        # the runtime as channels are set up; read only by the publisher thread, so
        # the exchange hot path never touches the board.
        self.positions: dict[str, Callable[[], tuple[int, int, int]]] = {}
        # A rank counts as silent after this long without a heartbeat (published
        # at most every 2 intervals, so a live rank is never mislabelled).
        self.stale_after = max(10.0, 5 * interval)
        # Whether this rank is running code inside dynamo_dist.local() (any thread):
        # a peer waiting for it is then waiting on rank-local work, not on a lost rank.
        self.in_local: Callable[[], bool] = lambda: False
        # Called on every tick, off the hot path (progress lines while waiting).
        self.ticks: list[Callable[[], None]] = []
        self._state = "running"
        self._published: tuple[Any, ...] | None = None
        self._last_publish = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynamo_dist-status", daemon=True)
        self._thread.start()

    def _payload(self, positions: dict[str, tuple[int, int, int]], in_local: bool) -> str:
        channels = {
            name: {"seq": seq, "frame": self._describe(ident) if ident else None, "epoch": epoch}
            for name, (seq, ident, epoch) in positions.items()
        }
        latest = max(channels.items(), key=lambda kv: int(kv[1]["epoch"] or 0), default=None)
        return json.dumps(
            {
                # The most recent exchange on any channel (what "where is it" means).
                "seq": latest[1]["seq"] if latest else 0,
                "frame": latest[1]["frame"] if latest else None,
                "group": latest[0] if latest else None,
                "channels": channels,
                "local": in_local,
                "state": self._state,
                "time": time.time(),
            }
        )

    def publish(self, force: bool = False) -> None:
        positions = {name: pos() for name, pos in list(self.positions.items())}
        in_local = self.in_local()
        key = (tuple(sorted(positions.items())), in_local, self._state)
        now = time.monotonic()
        # Unchanged status is re-published every 2 intervals, as a heartbeat.
        if not force and key == self._published and now - self._last_publish < 2 * self.interval:
            return
        try:
            self.store.set(f"{_PREFIX}{self._rank}", self._payload(positions, in_local))
            self._published = key
            self._last_publish = now
        except Exception as e:  # the store going away must never break training
            log.debug("could not publish status: %s", e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
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
        # Drop the channels' callbacks (they hold the transports) and let the thread
        # finish its tick: nothing of a shut-down runtime may outlive close().
        self.positions = {}
        self.ticks = []
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """Last published status of every rank ({} entries for ranks that never published)."""
        out: dict[int, dict[str, Any]] = {}
        for r in range(self._world):
            key = f"{_PREFIX}{r}"
            try:
                if not self.store.check([key]):
                    out[r] = {}
                    continue
                out[r] = json.loads(self.store.get(key))
            except Exception as e:
                out[r] = {"error": str(e)}
        return out


def open_store(timeout: float) -> Store | None:
    """A client of the job's store for the board's own use (None if there is none)."""
    try:
        store = _torch_compat.default_store()
    except Exception:
        return None
    clone = getattr(store, "clone", None)
    if clone is not None:
        # Its own connection: the publisher thread must not interleave with
        # the main thread's store traffic (rendezvous, barriers).
        with contextlib.suppress(Exception):
            store = clone()
    with contextlib.suppress(Exception):
        store.set_timeout(timedelta(seconds=min(timeout, 30.0)))
    return store


def describe_missing(
    board: dict[int, dict[str, Any]], channel: str, my_seq: int, stale_after: float
) -> tuple[list[int], list[str]]:
    """Ranks that did not reach exchange ``my_seq`` of ``channel``, and where each rank was."""
    now = time.time()
    missing: list[int] = []
    lines: list[str] = []
    for r, st in sorted(board.items()):
        if not st or "seq" not in st:
            missing.append(r)
            lines.append(f"rank {r}: never published a status (not started, or no exchange yet)")
            continue
        age = now - float(st.get("time", now))
        mine = (st.get("channels") or {}).get(channel, {"seq": 0, "frame": None})
        where = f"exchange #{mine['seq']} at {mine.get('frame') or 'no frame yet'}"
        if st.get("group") not in (None, channel):
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
