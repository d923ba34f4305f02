"""Guard exchange across emulated hosts, with an injected one-way delay per hop (issue 17).

    python benchmarks/scale_emulation.py --hosts 2 4 8 16 --delay-us 0 250 --json out.json
    python benchmarks/scale_emulation.py --hosts 2 4 --delay-us 0 --calls 200

For each host count H it starts H x ``--ranks-per-host`` rank processes directly (no
torchrun agent: too heavy on 2 cores), with the environment torchrun would give them
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK), so dynamo_dist's
topology groups them into H hosts. Everything stays on 127.0.0.1 (the store, and gloo
through GLOO_SOCKET_IFNAME=lo). This kernel has no netem, so a delay is injected in
user space: the receiver holds every message for the delay after it arrived
(``delay_every_hop``, patched into the benchmark's own ranks), as a relay would, so the
delay adds to each hop's own loopback cost.

Per (H, delay), median and p90 over calls after a warm-up, max over ranks, in us per
exchange:

- ``gloo_allreduce``: bare gloo allreduce(BAND) of one int64 among the host leaders
  (delay 0 only: gloo's messages cannot be held);
- ``ring_emulated``: the same hop structure as gloo's ring allreduce (reduce-scatter
  then allgather, 2(H-1) sequential hops) in Python over send/recv, with the delay on
  every hop: the stand-in for "gloo allreduce with the added delay" (at delay 0 it
  calibrates against ``gloo_allreduce``);
- ``doubling``: dynamo_dist's recursive doubling over gloo alone
  (``exchange/allreduce.DoublingExchange``);
- ``native``: the native leaders' exchange alone (``exchange/native.NativeExchange``:
  authenticated TCP, rounds in C++ without the GIL; delay 0 only: its frames are not
  held); ``native_k2`` the same with radix 2 (ceil(log2 H) rounds of one partner);
- ``hier_doubling`` / ``hier_native`` / ``hier_allreduce``: the whole per-call guard
  exchange through dynamo_dist's ShmTransport (shared memory within a host, then the
  leaders), timed directly on the C++ hook's ``exchange`` (what a compiled call's guard
  hook runs, without Dynamo's own call cost); ``hier_native`` and ``hier_allreduce`` at
  delay 0 only;
- ``shm_single_host``: the same on one host (2 and 4 ranks), shared memory only.

Each mode runs ``--calls`` calls, fewer when they would take over ``--mode-seconds``
(rank 0 decides after the warm-up, so every rank makes the same number); the modes
of one (H, delay) take turns in 5 rounds, so outside load falls on all of them alike. Every rank
process runs in its own session and is killed with its group when the run ends,
fails, times out or is interrupted (SIGINT, SIGTERM); ranks also die with this
process (PR_SET_PDEATHSIG). On 2 shared cores scheduling noise is in milliseconds:
use delays of 200 us or more, and per-hop costs from H <= 4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = [
    "gloo_allreduce",
    "ring_emulated",
    "doubling",
    "native",
    "native_k2",
    "hier_doubling",
    "hier_native",
    "hier_allreduce",
    "shm_single_host",
]
WARMUP = 20
ROUNDS = 5  # modes interleaved in this many rounds
PIN_ENV = "SCALE_EMULATION_PIN"


# -- rank side -------------------------------------------------------------------------
# The emulated delay's last stretch is spun: a sleep overshoots by 50-100 us.
_SPIN_NS = 50_000


def hold_until(t_ns: int) -> None:
    """Return once ``time.perf_counter_ns() >= t_ns``: sleep most of the way, spin the rest."""
    rest = t_ns - time.perf_counter_ns()
    if rest > _SPIN_NS:
        time.sleep((rest - _SPIN_NS) / 1e9)
    while time.perf_counter_ns() < t_ns:
        pass


def delay_every_hop(delay_ns: int) -> None:
    """Hold every message of the host leaders' exchange ``delay_ns`` after it arrived.

    The benchmark's stand-in for a one-way network delay (this kernel has no netem):
    the receiver holds each message as a relay holding it for the one-way latency
    would, so the delay adds to the hop's own cost. Patched into this benchmark's rank
    processes only; ``delay_ns = 0`` restores the exchange as shipped.
    """
    from dynamo_dist.exchange.allreduce import DoublingExchange

    original = getattr(DoublingExchange, "_undelayed_take", DoublingExchange._take)
    DoublingExchange._undelayed_take = original  # type: ignore[attr-defined]
    if not delay_ns:
        DoublingExchange._take = original  # type: ignore[method-assign]
        return

    def held(self: Any, work: Any, deadline: float) -> int:
        got = original(self, work, deadline)
        hold_until(time.perf_counter_ns() + delay_ns)
        return int(got)

    DoublingExchange._take = held  # type: ignore[method-assign]


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGKILL when the benchmark's driver dies, however it dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


class Ring:
    """gloo's ring allreduce hop structure for one word, with the emulated delay per hop.

    Benchmark-only: 2(H-1) sequential hops (each leader sends to its right and
    receives from its left); the first H-1 AND the word along, the last H-1 pass the
    result on, as the allgather does.
    """

    def __init__(self, group: Any, delay_ns: int, timeout: float) -> None:
        import torch

        self.group = group
        n, me = group.size(), group.rank()
        self.n, self.right, self.left = n, (me + 1) % n, (me - 1) % n
        self.delay_ns = delay_ns
        self.timeout = timedelta(seconds=timeout)
        self.sbuf, self.rbuf = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        self.sl, self.rl = [self.sbuf], [self.rbuf]
        self.s, self.r = self.sbuf.numpy(), self.rbuf.numpy()

    def __call__(self, word: int) -> int:
        carry = word
        for step in range(2 * (self.n - 1)):
            recv = self.group.recv(self.rl, self.left, 1)
            self.s[0] = carry
            send = self.group.send(self.sl, self.right, 1)
            recv.wait(self.timeout)
            got = int(self.r[0])
            if self.delay_ns:
                hold_until(time.perf_counter_ns() + self.delay_ns)
            send.wait(self.timeout)
            carry = got & word if step < self.n - 1 else got
        return carry


def worker(out: str, delays: list[int], calls: int, mode_seconds: float, timeout: float) -> None:
    _die_with_parent(int(os.environ["SCALE_EMULATION_PARENT"]))
    if os.environ.get(PIN_ENV):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(os.environ["RANK"]) % len(cpus)]})
    import torch
    import torch.distributed as dist

    from dynamo_dist.dist import group as dist_group
    from dynamo_dist.exchange.allreduce import DoublingExchange
    from dynamo_dist.exchange.native import native_or_none
    from dynamo_dist.exchange.record import pack
    from dynamo_dist.exchange.shm import ShmTransport, topology

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    per_host = int(os.environ["LOCAL_WORLD_SIZE"])
    hosts = world // per_host
    leaders = [h * per_host for h in range(hosts)]
    leader = rank in leaders
    store = dist_group.job_store()
    everyone = tuple(range(world))
    lg = (
        dist_group.gloo_group(store, "scale_emulation/leaders", leaders, timeout)
        if leader and hosts > 1
        else None
    )
    word = pack(True, 1000)
    rows: list[dict[str, Any]] = []

    def measure(delay: int, modes: list[tuple[str, Callable[[], Any] | None]]) -> None:
        """Time every mode (fn None: this rank takes no part), interleaved in rounds.

        Each round runs every mode for a share of its calls, so load from outside
        (this machine is shared) falls on all modes alike instead of on one.
        """
        counts = []
        for _, fn in modes:
            dist.barrier()
            t0 = time.perf_counter()
            if fn is not None:
                for _ in range(WARMUP):
                    fn()
            per_call = (time.perf_counter() - t0) / WARMUP
            n = [min(calls, max(ROUNDS * 4, int(mode_seconds / max(per_call, 1e-6))))]
            dist.broadcast_object_list(n, src=0)  # rank 0 takes part in every mode
            counts.append(-(-n[0] // ROUNDS))
        samples: dict[str, list[int]] = {mode: [] for mode, _ in modes}
        for _ in range(ROUNDS):
            for (mode, fn), n in zip(modes, counts, strict=True):
                dist.barrier()
                if fn is None:
                    continue
                for _ in range(n):
                    t = time.perf_counter_ns()
                    fn()
                    samples[mode].append(time.perf_counter_ns() - t)
        for mode, xs in samples.items():
            if not xs:
                continue
            xs.sort()
            rows.append(
                {
                    "mode": mode,
                    "delay_us": delay,
                    "median_us": statistics.median(xs) / 1e3,
                    "p90_us": xs[min(len(xs) - 1, int(0.9 * len(xs)))] / 1e3,
                    "n": len(xs),
                }
            )

    def transport(exchange: str) -> Any:
        prefix = dist_group.rendezvous(store, everyone, timeout, 60, "scale_emulation")
        group = dist_group.gloo_group(store, f"{prefix}/guard", everyone, timeout)
        return ShmTransport(
            topo=topology(group, everyone),
            store=store,
            prefix=prefix,
            leader_exchange=exchange,
            group=group,
            ranks=everyone,
            group_name="world",
            timeout=timeout,
            wait_log_interval=60,
            stall_warning=60,
            board=None,
            describe=str,
        )

    def hooked(exchange: str) -> tuple[Any, Any]:
        tr = transport(exchange)
        return tr, tr.make_hook()

    def close(tr: Any, hook: Any) -> None:
        hook.release()  # as Runtime.close: break the C++ <-> Python cycles
        tr.close()  # the segment's callbacks, the native exchange's sockets

    for delay in delays:
        delay_every_hop(delay * 1000)
        modes: list[tuple[str, Callable[[], Any] | None]] = []
        hooks = []
        if hosts == 1:
            hooks.append(hooked("doubling"))
            modes.append(("shm_single_host", lambda h=hooks[-1][1]: h.exchange(True, 1000)))
        else:
            if delay == 0:
                buf = torch.zeros(1, dtype=torch.int64)
                opts = dist.AllreduceOptions()
                opts.reduceOp = dist.ReduceOp(dist.ReduceOp.BAND)
                bare = (
                    (lambda b=[buf], o=opts: lg.allreduce(b, o).wait()) if lg is not None else None
                )
                modes.append(("gloo_allreduce", bare))
            ring = Ring(lg, delay * 1000, timeout) if lg is not None else None
            modes.append(("ring_emulated", (lambda f=ring: f(word)) if ring is not None else None))
            doubling = DoublingExchange(lg, timeout, leaders) if lg is not None else None
            modes.append(
                ("doubling", (lambda f=doubling: f(word)) if doubling is not None else None)
            )
            if delay == 0:
                native = (
                    native_or_none(store, f"scale_emulation/n{delay}", lg, leaders, timeout, 30e-6)
                    if lg is not None
                    else None
                )
                assert lg is None or native is not None, "native setup fell back"
                modes.append(("native", (lambda f=native: f(word)) if native is not None else None))
                # Radix 2: several rounds on few hosts, so the model can tell a round's
                # cost from a partner's.
                k2 = (
                    native_or_none(
                        store, f"scale_emulation/k{delay}", lg, leaders, timeout, 30e-6, 2
                    )
                    if lg is not None
                    else None
                )
                modes.append(("native_k2", (lambda f=k2: f(word)) if k2 is not None else None))
            hooks.append(hooked("doubling"))
            modes.append(("hier_doubling", lambda h=hooks[-1][1]: h.exchange(True, 1000)))
            if delay == 0:
                hooks.append(hooked("native"))
                modes.append(("hier_native", lambda h=hooks[-1][1]: h.exchange(True, 1000)))
                hooks.append(hooked("allreduce"))
                modes.append(("hier_allreduce", lambda h=hooks[-1][1]: h.exchange(True, 1000)))
        measure(delay, modes)
        for tr, hook in hooks:
            close(tr, hook)

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


# -- driver ----------------------------------------------------------------------------
def _loopback_store(world: int) -> tuple[Any, socket.socket]:
    """The job's store, hosted here on 127.0.0.1 only, as torchrun's agent hosts it.

    A TCPStore server binds every interface, whatever host it is given; handed a socket
    already bound to loopback (``master_listen_fd``), it listens there alone, so nothing
    off this machine can reach the emulation's store (it holds the native exchange's
    tokens). The ranks join as clients (``TORCHELASTIC_USE_AGENT_STORE``).
    """
    import torch.distributed as dist

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(128, 2 * world))
    store = dist.TCPStore(
        "127.0.0.1",
        sock.getsockname()[1],
        world,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=sock.fileno(),
    )
    return store, sock


def run_job(
    hosts: int,
    per_host: int,
    delays: list[int],
    calls: int,
    mode_seconds: float,
    timeout: float,
    job_timeout: float,
) -> list[dict[str, Any]]:
    """One emulated job: start its ranks, wait, and always kill their process groups."""
    world = hosts * per_host
    store, listener = _loopback_store(world)
    port = listener.getsockname()[1]
    with listener, tempfile.TemporaryDirectory(prefix="scale_emulation.") as tmp:
        out = os.path.join(tmp, "result.json")
        log_path = os.path.join(tmp, "ranks.log")
        base = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(per_host),
            "GLOO_SOCKET_IFNAME": "lo",  # gloo's traffic stays on loopback
            "OMP_NUM_THREADS": "1",
            "DYNAMO_DIST_LOG": "ERROR",
            "SCALE_EMULATION_PARENT": str(os.getpid()),
            "TORCHELASTIC_USE_AGENT_STORE": "True",  # the store above, not rank 0's
        }
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            out,
            "--delay-us",
            *map(str, delays),
            "--calls",
            str(calls),
            "--mode-seconds",
            str(mode_seconds),
            "--timeout",
            str(timeout),
        ]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with open(log_path, "wb") as log:
                for r in range(world):
                    env = {
                        **base,
                        "RANK": str(r),
                        "LOCAL_RANK": str(r % per_host),
                        "GROUP_RANK": str(r // per_host),
                    }
                    procs.append(
                        subprocess.Popen(
                            cmd,
                            env=env,
                            cwd=ROOT,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,  # its own group: killed as a whole
                        )
                    )
                deadline = time.monotonic() + job_timeout
                for p in procs:
                    left = deadline - time.monotonic()
                    try:
                        code = p.wait(timeout=max(left, 0.1))
                    except subprocess.TimeoutExpired:
                        raise SystemExit(
                            f"{hosts} hosts x {per_host}: ranks still running after "
                            f"{job_timeout:.0f}s; killed. Log tail:\n{_tail(log_path)}"
                        ) from None
                    if code != 0:
                        raise SystemExit(
                            f"{hosts} hosts x {per_host}: rank exited with {code}. Log tail:\n"
                            f"{_tail(log_path)}"
                        )
            per_rank = json.loads(Path(out).read_text())
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
    del store
    # The slowest rank bounds the step: max over ranks of each median (and p90).
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for rows in per_rank:
        for row in rows:
            key = (row["mode"], row["delay_us"])
            best = merged.setdefault(key, dict(row))
            best["median_us"] = max(best["median_us"], row["median_us"])
            best["p90_us"] = max(best["p90_us"], row["p90_us"])
    return [
        {
            "hosts": hosts,
            "ranks_per_host": per_host,
            "delay_us": delay,
            "mode": mode,
            "median_us": round(row["median_us"], 1),
            "p90_us": round(row["p90_us"], 1),
            "n": row["n"],
        }
        for (mode, delay), row in sorted(
            merged.items(), key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))
        )
    ]


def _tail(path: str, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text(errors="replace")[-n:]
    return ""


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (hosts, ranks per host, delay), one column per mode (median / p90 us)."""
    cols = [m for m in MODES if any(r["mode"] == m for r in rows)]
    keys = sorted({(r["hosts"], r["ranks_per_host"], r["delay_us"]) for r in rows})
    width = 17
    head = f"{'hosts x ranks':>13} {'delay us':>8} " + " ".join(f"{c:>{width}}" for c in cols)
    head += f" {'ring/doubling':>13}"
    lines = [head, "-" * len(head)]
    for hosts, per_host, delay in keys:
        cells = []
        for c in cols:
            hit = [
                r
                for r in rows
                if (r["hosts"], r["ranks_per_host"], r["delay_us"], r["mode"])
                == (hosts, per_host, delay, c)
            ]
            cells.append(
                f"{hit[0]['median_us']:>8.0f} /{hit[0]['p90_us']:>7.0f}"
                if hit
                else f"{'-':>{width}}"
            )
        median = {
            r["mode"]: r["median_us"]
            for r in rows
            if (r["hosts"], r["ranks_per_host"], r["delay_us"]) == (hosts, per_host, delay)
        }
        gain = (
            f"{median['ring_emulated'] / median['doubling']:>12.2f}x"
            if median.get("doubling") and "ring_emulated" in median
            else f"{'-':>13}"
        )
        lines.append(f"{f'{hosts} x {per_host}':>13} {delay:>8} " + " ".join(cells) + " " + gain)
    return "\n".join(lines)


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through run_job's finally


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--delay-us", type=int, nargs="+", default=[0, 250])
    p.add_argument(
        "--ranks-per-host",
        type=int,
        default=None,
        help="default: 2 up to 4 hosts, 1 above (this machine has 2 cores)",
    )
    p.add_argument(
        "--single-host",
        type=int,
        nargs="*",
        default=[2, 4],
        help="rank counts for the one-host shared-memory rows (none: skip them)",
    )
    p.add_argument("--calls", type=int, default=300, help="timed calls per mode (max)")
    p.add_argument(
        "--mode-seconds",
        type=float,
        default=4.0,
        help="fewer calls (at least 20) where --calls would take longer than this",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="exchange timeout, seconds")
    p.add_argument("--job-timeout", type=float, default=240.0, help="seconds per emulated job")
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin rank r to CPU r (as if each emulated host had its own core)",
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.delay_us, args.calls, args.mode_seconds, args.timeout)
        return
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    if args.pin:
        os.environ[PIN_ENV] = "1"  # the ranks inherit it
    rows: list[dict[str, Any]] = []
    jobs = [(h, args.ranks_per_host or (2 if h <= 4 else 1)) for h in args.hosts if h > 1]
    jobs += [(1, n) for n in args.single_host]
    for hosts, per_host in jobs:
        delays = args.delay_us if hosts > 1 else [0]
        t0 = time.monotonic()
        rows += run_job(
            hosts, per_host, delays, args.calls, args.mode_seconds, args.timeout, args.job_timeout
        )
        print(
            f"  {hosts} host(s) x {per_host} rank(s): {time.monotonic() - t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\nGuard exchange, median / p90 us per exchange (max over ranks); {os.cpu_count()} cores, "
        "loopback, emulated delay per hop. hier_* and shm_single_host: the C++ hook's "
        f"exchange through ShmTransport, without Dynamo's call cost"
        + (" Rank r pinned to CPU r." if args.pin else "")
    )
    print(format_table(rows))
    if args.json:
        doc = {
            "machine": {"cores": os.cpu_count() or 0, "torch": version("torch")},
            "calls": args.calls,
            "pinned": bool(args.pin),
            "rows": [{k: v for k, v in r.items() if k != "n"} for r in rows],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        raise SystemExit(
            f"scale_emulation: interrupted ({e or 'SIGINT'}); every rank was killed"
        ) from None
