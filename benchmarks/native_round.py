"""Software cost of the native leaders' rounds, measured on one core, and the prediction
at 128 hosts it gives.

    python benchmarks/native_round.py                    # fit, then predict 128 x 8
    python benchmarks/native_round.py --local-us 3.9 --json out.json

``scale_emulation.py`` needs about two cores per emulated host (issue 17): on a small
machine its leaders share cores, and what it measures from three hosts on is the
scheduler. This benchmark needs one core. A single leader (``_C.LeaderRounds``, the
production code) exchanges with partners whose frames already wait in its sockets, so
a call costs exactly the leader's software: posting its word to each partner (on
loopback the send also runs the kernel's delivery), reading theirs, ANDing, the poll
loop, and the Python call around it. No wire, no waiting.

Each plan is one leader's real plan (``exchange/native.radix_plan``): one round with
P = 1..7 partners (radix 8, up to 8 hosts), and R = 1..5 rounds of one partner (radix
2), timed in interleaved rounds. Least squares gives

    cost = a + R * c + P * m

(``a`` per call, ``c`` per round, ``m`` per partner), the terms of
``scale_model.py``'s native model, fitted on the plans of at most ``--fit-hosts`` hosts
(default 4) and checked on the others (8 hosts with radix 8 among them). The
prediction at H hosts x 8 ranks adds the network:

    a_local + a + rounds(H) * (c + d) + partners(H) * m

with ``d`` half the round trip, and ``a_local`` the one-host shared-memory step with
8 ranks (``--local-us``, measured by ``guard_exchange.py --nproc 8`` on the host it
applies to; the default is issue 17's figure on a 16-core host).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_model import ROUND_TRIPS_US, TARGETS_US, native_partners, native_rounds

#: Issue 17: the whole one-host exchange, 8 ranks on a 16-core host, per compiled call.
LOCAL_US_16_CORES = 3.9


def _frame(seq: int, word: int) -> bytes:
    return struct.pack("<Qq", seq, word)


class Leader:
    """Leader 0 of ``hosts`` with radix ``radix``, its partners' frames queued ahead."""

    def __init__(self, hosts: int, radix: int) -> None:
        from dynamo_dist import _C
        from dynamo_dist.exchange import native, record

        self.plan = native.radix_plan(hosts, 0, radix)
        self.word = record.pack(True, 5)
        self.peers: dict[int, socket.socket] = {}
        mine: dict[int, int] = {}
        with socket.create_server(("127.0.0.1", 0)) as srv:
            for h in sorted(native.partners(self.plan)):
                a = socket.create_connection(srv.getsockname())
                b, _ = srv.accept()
                for s in (a, b):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                mine[h], self.peers[h] = a.detach(), b
        self.fds = mine
        # How many frames each partner sends per exchange (once per round it is in).
        self.sends = {h: sum(h in recv for _, recv in self.plan) for h in self.peers}
        self.rounds = _C.LeaderRounds(0, hosts, self.plan, mine, 30e-6)
        self.seq = 0

    def queue(self, n: int) -> None:
        """Queue the partners' frames for the next ``n`` exchanges; drain what we sent."""
        for h, s in self.peers.items():
            frames = b"".join(
                _frame(q, self.word) * self.sends[h] for q in range(self.seq + 1, self.seq + n + 1)
            )
            s.sendall(frames)
            s.setblocking(False)
            try:
                while s.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass
            s.setblocking(True)

    def time_calls(self, n: int) -> float:
        """Median us of ``n`` exchanges."""
        self.queue(n)
        samples = []
        ex, word = self.rounds.exchange, self.word
        for _ in range(n):
            t0 = time.perf_counter_ns()
            status, *_ = ex(word, 5.0)
            samples.append(time.perf_counter_ns() - t0)
            if status != 0:
                raise SystemExit(f"exchange failed: status {status}")
        self.seq += n
        return statistics.median(samples) / 1e3

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        for s in self.peers.values():
            s.close()


def measure(rounds: int, calls: int) -> list[dict[str, Any]]:
    """Interleaved rounds over the plans; one median per plan and round."""
    plans = [(p + 1, p + 1) for p in range(1, 8)]  # one round, P = 1..7 partners
    plans += [(2**r, 2) for r in range(2, 6)]  # R = 2..5 rounds of one partner
    leaders = {plan: Leader(*plan) for plan in plans}
    try:
        for leader in leaders.values():
            leader.time_calls(200)  # warm up
        per: dict[tuple[int, int], list[float]] = {plan: [] for plan in plans}
        rng = random.Random(0)
        for _ in range(rounds):
            order = list(plans)
            rng.shuffle(order)
            for plan in order:
                per[plan].append(leaders[plan].time_calls(calls))
        return [
            {
                "hosts": hosts,
                "radix": radix,
                "rounds": len(leaders[(hosts, radix)].plan),
                "partners": sum(len(send) for send, _ in leaders[(hosts, radix)].plan),
                "median_us": statistics.median(per[(hosts, radix)]),
                "min_us": min(per[(hosts, radix)]),
                "max_us": max(per[(hosts, radix)]),
            }
            for hosts, radix in plans
        ]
    finally:
        for leader in leaders.values():
            leader.close()


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    x = np.array([[1.0, r["rounds"], r["partners"]] for r in rows])
    y = np.array([r["median_us"] for r in rows])
    (a, c, m), *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ np.array([a, c, m])
    return {
        "a": float(a),
        "c": float(c),
        "m": float(m),
        "rms_rel": float(np.sqrt(np.mean(((pred - y) / y) ** 2))),
    }


def _model(f: dict[str, float], row: dict[str, Any]) -> float:
    return f["a"] + row["rounds"] * f["c"] + row["partners"] * f["m"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds over the plans")
    ap.add_argument("--calls", type=int, default=2000, help="exchanges per plan and round")
    ap.add_argument("--hosts", type=int, default=128)
    ap.add_argument(
        "--local-us",
        type=float,
        default=LOCAL_US_16_CORES,
        help="the one-host step with 8 ranks, us per call",
    )
    ap.add_argument("--fit-hosts", type=int, default=4, help="fit on plans of at most H hosts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    rows = measure(args.rounds, args.calls)
    f = fit([r for r in rows if r["hosts"] <= args.fit_hosts])
    held_out = [r for r in rows if r["hosts"] > args.fit_hosts]
    print(
        f"native rounds, one leader, partners' frames queued ({os.cpu_count()} cores); "
        f"median us per exchange over {args.rounds} interleaved rounds:"
    )
    print("  hosts radix rounds partners   median  (min..max)    model")
    for r in rows:
        model = _model(f, r)
        print(
            f"  {r['hosts']:5d} {r['radix']:5d} {r['rounds']:6d} {r['partners']:8d} "
            f"{r['median_us']:8.2f}  ({r['min_us']:.2f}..{r['max_us']:.2f})  {model:7.2f}"
        )
    errors = [_model(f, r) / r["median_us"] - 1 for r in held_out]
    worst_error = max(errors, key=abs) if errors else 0.0
    f["worst_check_error"] = worst_error
    print(
        f"fit on hosts <= {args.fit_hosts}: a = {f['a']:.2f} us per call, c = {f['c']:.2f} us "
        f"per round, m = {f['m']:.2f} us per partner (rms error {f['rms_rel']:.1%}); "
        f"worst error on the {len(held_out)} plans it was not fitted on: {worst_error:+.1%}"
    )
    worst = max(f["c"] + 7 * f["m"], f["c"] + f["m"])
    print(
        f"software per round: {f['c'] + f['m']:.2f} us with one partner, "
        f"{worst:.2f} us with 7 (radix 8)"
    )

    h = args.hosts
    rounds, partners = native_rounds(h), native_partners(h)
    print(
        f"\npredicted per-call guard exchange at {h} hosts x 8 ranks "
        f"({rounds} rounds, {partners} partners; one-host step {args.local_us} us):"
    )
    preds = {}
    for rtt in ROUND_TRIPS_US:
        d = rtt / 2
        p = args.local_us + f["a"] + rounds * (f["c"] + d) + partners * f["m"]
        preds[rtt] = p
        print(f"  RTT {rtt:5.0f} us: {p:6.1f} us")
    for name, target in TARGETS_US.items():
        ok = "meets" if preds[30.0] <= target else "misses"
        print(f"  at 30 us: {ok} {target:.0f} us ({name})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "fit": f,
                    "hosts": h,
                    "local_us": args.local_us,
                    "predicted_us": preds,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
