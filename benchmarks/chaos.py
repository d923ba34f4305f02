"""Chaos harness: the real training job under random faults, then a restart on its cache.

    python benchmarks/chaos.py --trials 200 --seed 1        # as root (mounts, signals)
    python benchmarks/chaos.py --trials 5 --seed 7 --faults sigstop corrupt

Each trial runs ``launch/train.py`` under torchrun (``--nproc`` ranks; ``--hosts 2``
starts two agents, as two hosts) with the shared cache and precompiled artifacts on,
inside its own mount namespace (``unshare -m``), and injects one fault at a random
moment of the first run:

- ``sigkill``, ``sigstop`` (never resumed), ``sigstop_cont`` (resumed after 1-8 s),
  ``sigint_rank``: of a random rank; ``sigint_leader``: of a host leader (2 hosts);
  ``sigint_launcher``: of the torchrun agent;
- ``enospc``: the cache on a 4 MiB tmpfs filled but for 0-512 KiB (ENOSPC) as entries are
  published; ``readonly``: the cache bind-mounted read-only mid-run;
- ``corrupt``, ``truncate``: a random file of the cache flipped or cut mid-run;
- ``store_delay``: the agent, which hosts the job's store, stopped for 1-5 s.

Then the same job runs again on the same cache, with no fault. Every trial checks:

- **hang**: a run still going ``timeout + 60`` s after the fault (the job's guard
  timeout is ``--timeout``; a stopped rank must be named by the stall watch, and
  ``stall_abort`` ends the job). Faults land once dynamo_dist runs on every rank: a
  rank stopped earlier (in torch's rendezvous, or DDP's first broadcast) leaves the
  others waiting in torch's own start-up, before dynamo_dist exists to name it;
- **leak**: a ``/dev/shm/dynamo_dist.*`` segment or a process of the trial left once
  both runs ended, or a cache lock whose owner is gone;
- **data lost**: the restart fails, or loads nothing although the cache held entries
  that verify; **unverified load**: the restart loaded an entry ``dynamo-dist cache
  verify`` finds broken (loads are read from its structured trace, ``TORCH_TRACE``).

It prints one row per fault kind: trials, survived, hangs, leaks, data lost,
unverified loads. Trials run one at a time; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _launch import agent_commands

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
FAULTS = [
    "sigkill",
    "sigstop",
    "sigstop_cont",
    "sigint_rank",
    "sigint_leader",
    "sigint_launcher",
    "enospc",
    "readonly",
    "corrupt",
    "truncate",
    "store_delay",
]
_SEGMENTS = "/dev/shm/dynamo_dist.*"
_MISSED = "no fault landed"  # a trial the fault never reached: counted apart


@dataclass
class Trial:
    index: int
    fault: str
    seed: int
    outcome: str = ""  # finished, failed (named), hang
    restart: str = ""
    hang: bool = False
    leaks: list[str] = field(default_factory=list)
    data_lost: str = ""
    unverified: list[str] = field(default_factory=list)
    note: str = ""


def _processes(tag: str, run: str | None = None) -> dict[int, dict[str, str]]:
    """pid -> environment of every process of this trial (``CHAOS_TRIAL=tag``), or of
    one of its runs (``CHAOS_RUN``)."""
    out: dict[int, dict[str, str]] = {}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            raw = Path(d, "environ").read_bytes()
        except OSError:
            continue
        if f"CHAOS_TRIAL={tag}".encode() not in raw:
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        if run is None or env.get("CHAOS_RUN") == run:
            out[int(Path(d).name)] = env
    return out


def _ranks(tag: str) -> dict[int, int]:
    """rank -> pid of the trial's rank processes: those torchrun's agent started (their
    own children, inductor's compile workers among them, inherit RANK too)."""
    procs = _processes(tag, "1")
    agents = set(_agents(tag))
    return {
        int(env["RANK"]): pid
        for pid, env in procs.items()
        if "RANK" in env and _parent(pid) in agents
    }


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _agents(tag: str) -> list[int]:
    """The trial's torchrun agents (not the shell that started them, whose command line
    holds the whole script)."""
    return sorted(
        pid
        for pid, env in _processes(tag, "1").items()
        if "RANK" not in env
        and " -m torch.distributed.run " in f" {_cmdline(pid)} "
        and not _cmdline(pid).startswith(("bash", "unshare"))
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _script(args: argparse.Namespace, cache: str, fault: str, tmp: str) -> str:
    """The shell script run in the trial's mount namespace: both runs, back to back."""
    train = [
        str(TRAIN),
        "--steps",
        "{steps}",
        "--backend",
        args.backend,
        "--short-every",
        "4",
    ]
    runs = []
    for run in (1, 2):
        env = (
            f"CHAOS_RUN={run} DYNAMO_DIST_REPORT={tmp}/report{run}.json "
            f"TORCH_TRACE={tmp}/trace{run}"
        )
        if run == 1:
            env += " DYNAMO_DIST_LOG=INFO"  # "guard exchange on": dynamo_dist has started
        steps = str(args.steps if run == 1 else args.restart_steps)
        script = [part.replace("{steps}", steps) for part in train]
        port = 29500 + random.Random(tmp).randrange(20000) + run
        cmds = agent_commands(args.hosts, args.nproc, script, port)
        if len(cmds) == 1:
            line = f"{env} {shlex.join(cmds[0])} > {tmp}/run{run}.log 2>&1"
        else:
            # Job control on (set -m): bash starts background jobs with SIGINT ignored
            # otherwise, and a rank started so would never see the SIGINT faults. As a
            # scheduler does (srun --kill-on-bad-exit), the first agent to fail ends
            # the others: torchrun's agents learn nothing of another host's failure,
            # and one whose rank is stopped would wait for it for ever. The run's
            # status is the first failure's (a bare ``wait`` always returns 0).
            line = "set -m; pids=; " + " ".join(
                f'{env} {shlex.join(cmd)} > {tmp}/run{run}.host{node}.log 2>&1 & pids+=" $!";'
                for node, cmd in enumerate(cmds)
            )
            line += (
                " rc=0; for _ in $pids; do wait -n; r=$?; if [ $r -ne 0 ]; then"
                " [ $rc -eq 0 ] && rc=$r; for p in $pids; do kill -TERM -- -$p; done; fi;"
                " done; (exit $rc)"
            )
            line = "{ " + line + "; } 2>/dev/null"  # job control's "Exit 1" notices
        runs.append(line)
    mount = {
        # A 4 MiB tmpfs that a file of the trial's own fills but for 0-512 KiB: entries
        # fit in 4 MiB, so without it the disk would never be full.
        "enospc": f"mount -t tmpfs -o size=4m,mode=0700 tmpfs {cache} && head -c "
        f"{4096 * 1024 - random.Random(tmp).randrange(512 * 1024)} /dev/zero > {cache}/.filler",
        "readonly": f"mount --bind {cache} {cache}",
    }.get(fault, "true")
    restore = f"mount -o remount,rw,bind {cache} {cache}" if fault == "readonly" else "true"
    return "\n".join(
        [
            "set -u",
            mount,
            f"echo $$ > {tmp}/ns.pid",
            runs[0],
            f"echo $? > {tmp}/run1.rc",
            restore,
            runs[1],
            f"echo $? > {tmp}/run2.rc",
        ]
    )


def _started(tmp: str) -> int:
    """Ranks of the first run whose dynamo_dist runtime has started (its INFO line)."""
    text = ""
    for log in glob.glob(os.path.join(tmp, "run1*.log")):
        with contextlib.suppress(OSError):
            text += Path(log).read_text(errors="replace")
    return text.count("guard exchange on")


def _inject(fault: str, tag: str, rng: random.Random, cache: str, tmp: str) -> str:
    """Inject ``fault`` now; returns what was done."""
    ranks = _ranks(tag)
    if fault in ("sigkill", "sigstop", "sigstop_cont", "sigint_rank", "sigint_leader"):
        if not ranks:
            return "no rank to signal"
        pool = sorted(ranks)
        if fault == "sigint_leader":
            local = int(os.environ.get("CHAOS_NPROC", "1"))
            pool = [r for r in pool if r % local == 0] or pool
        victim = rng.choice(pool)
        sig = {
            "sigkill": signal.SIGKILL,
            "sigstop": signal.SIGSTOP,
            "sigstop_cont": signal.SIGSTOP,
        }.get(fault, signal.SIGINT)
        os.kill(ranks[victim], sig)
        if fault == "sigstop_cont":
            time.sleep(rng.uniform(1, 8))
            with contextlib.suppress(ProcessLookupError):
                os.kill(ranks[victim], signal.SIGCONT)
        return f"{fault} rank {victim}"
    if fault in ("sigint_launcher", "store_delay"):
        agents = _agents(tag)
        if not agents:
            return "no agent"
        if fault == "sigint_launcher":
            os.kill(agents[0], signal.SIGINT)
            return "sigint agent"
        os.kill(agents[0], signal.SIGSTOP)
        time.sleep(rng.uniform(1, 5))
        os.kill(agents[0], signal.SIGCONT)
        return "store (agent) stopped"
    if fault == "readonly":
        # The kernel refuses to make a mount read-only while a file on it is open for
        # writing (EBUSY: a rank writing an entry, gcc writing an object): try until a
        # moment with no writer, as an administrator would.
        ns = Path(tmp, "ns.pid").read_text().strip()
        remount = ["nsenter", "-t", ns, "-m", "mount", "-o", "remount,ro,bind", cache, cache]
        until = time.monotonic() + 20
        tries = 0
        while time.monotonic() < until and _ranks(tag):
            tries += 1
            if subprocess.run(remount, capture_output=True, check=False).returncode == 0:
                return f"cache read-only (try {tries})"
            time.sleep(0.02)
        return f"{_MISSED}: the cache stayed busy with writers for 20 s"
    if fault in ("corrupt", "truncate"):
        # An entry's files, once there are any (up to a minute); else any file.
        until = time.monotonic() + 60
        while True:
            every = [p for p in Path(cache).rglob("*") if p.is_file() and not p.is_symlink()]
            files = [p for p in every if "entries" in p.parts]
            if files or time.monotonic() > until or not _ranks(tag):
                break
            time.sleep(0.5)
        files = files or every
        if not files:
            return "no file to damage yet"
        victim = rng.choice(files)
        data = bytearray(victim.read_bytes())
        if fault == "truncate" or not data:
            victim.write_bytes(bytes(data[: rng.randrange(len(data) + 1)]))
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            victim.write_bytes(bytes(data))
        return f"{fault} {victim.relative_to(cache)}"
    return "none (fault is in the setup)"


def _loaded_keys(trace_dir: str) -> set[str]:
    keys: set[str] = set()
    for path in glob.glob(os.path.join(trace_dir, "*")):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text(errors="replace").splitlines():
                if "dynamo_dist_cache_load" in line and '"key"' in line:
                    with contextlib.suppress(ValueError):
                        start = line.index("{")
                        keys.add(str(json.loads(line[start:]).get("key", "")))
    return {k for k in keys if k}


def _verify(cache: str, env: dict[str, str]) -> tuple[int, list[str]]:
    """(valid entries, keys of broken entries) by ``dynamo-dist cache verify``."""
    proc = subprocess.run(
        [sys.executable, "-m", "dynamo_dist", "cache", "verify", cache],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    text = proc.stdout + proc.stderr
    broken = re.findall(r"^BAD (\S+):", text, flags=re.M)
    valid = re.search(r"(\d+) of (\d+) entries valid", text)
    return (int(valid.group(1)) if valid else 0), broken


def _secret(tmp: str) -> str:
    path = os.path.join(tmp, "secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex())
    return path


def run_trial(index: int, fault: str, seed: int, args: argparse.Namespace) -> Trial:
    rng = random.Random(seed)
    trial = Trial(index, fault, seed)
    tag = f"{os.getpid()}-{index}"
    tmp = tempfile.mkdtemp(prefix=f"chaos{index}.")
    cache = os.path.join(tmp, "cache")
    os.makedirs(cache, mode=0o700)
    segments_before = set(glob.glob(_SEGMENTS))
    env = {
        **os.environ,
        "CHAOS_TRIAL": tag,
        "CHAOS_NPROC": str(args.nproc),
        "OMP_NUM_THREADS": "1",
        "DYNAMO_DIST_CACHE_DIR": cache,
        "DYNAMO_DIST_CACHE_SECRET_FILE": _secret(tmp),
        "DYNAMO_DIST_TIMEOUT": str(args.timeout),
        "DYNAMO_DIST_STALL_WARNING": "2",
        "DYNAMO_DIST_STATUS_INTERVAL": "0.5",
        "DYNAMO_DIST_STALL_ABORT": "1",
        "DYNAMO_DIST_LOG": "WARNING",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    script = _script(args, cache, fault, tmp)
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
        env=env,
        start_new_session=True,
    )
    budget = args.timeout + 60 + 60  # the fault's grace, torchrun's own SIGTERM grace
    try:
        # The fault lands at a random moment once dynamo_dist runs on every rank: a rank
        # stopped before (in torch's rendezvous, or DDP's first broadcast) leaves the
        # others waiting in torch's own start-up, before anything of dynamo_dist exists.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if _started(tmp) >= args.nproc * args.hosts:
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(0, args.window))
        rc1 = Path(tmp, "run1.rc")
        trial.note = (
            f"{_MISSED}: run 1 ended before it"
            if rc1.exists()
            else _inject(fault, tag, rng, cache, tmp)
        )
        injected = time.monotonic()
        while not rc1.exists() and time.monotonic() - injected < budget:
            time.sleep(0.2)
        if not rc1.exists():
            trial.hang, trial.outcome = True, "hang"
            agents = set(_agents(tag))
            for pid, penv in _processes(tag).items():  # end the first run; the restart goes on
                if "RANK" in penv or pid in agents:  # never the script's shell
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        else:
            code = int(rc1.read_text().strip() or "1")
            trial.outcome = "finished" if code == 0 else f"failed rc {code}"
        try:
            proc.wait(timeout=budget + 300)
        except subprocess.TimeoutExpired:
            trial.hang = True
            trial.restart = "hang"
        rc2 = Path(tmp, "run2.rc")
        if rc2.exists() and not trial.restart:
            code = int(rc2.read_text().strip() or "1")
            trial.restart = "finished" if code == 0 else f"failed rc {code}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in _processes(tag):
            trial.leaks.append(f"process {pid} ({_cmdline(pid)[:60]})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    trial.leaks += sorted(set(glob.glob(_SEGMENTS)) - segments_before)
    _check_restart(trial, cache, tmp, fault, env)
    bad = trial.hang or trial.leaks or trial.data_lost or trial.unverified
    if args.keep or bad:  # a failed trial's logs are what explains it: never delete them
        trial.note += f" [{tmp}]"
    else:
        subprocess.run(["rm", "-rf", tmp], check=False)
    return trial


def _check_restart(trial: Trial, cache: str, tmp: str, fault: str, env: dict[str, str]) -> None:
    """Data lost / unverified loads, from the restart's report, trace and the cache."""
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(Path(tmp, "report2.json").read_text())
    loads = sum(int(r.get("cache_loads", 0) or 0) for r in report.get("ranks", {}).values())
    loads += sum(int(r.get("precompiled_loads", 0) or 0) for r in report.get("ranks", {}).values())
    if fault == "enospc":
        entries, broken = 0, []  # the tmpfs is gone with the namespace
    else:
        entries, broken = _verify(cache, env)
    if trial.restart != "finished":
        trial.data_lost = f"restart {trial.restart}"
    elif entries and not loads and fault not in ("enospc",):
        trial.data_lost = f"restart loaded nothing from {entries} entries"
    loaded = _loaded_keys(os.path.join(tmp, "trace2"))
    trial.unverified = [b for b in broken if any(b.startswith(k) for k in loaded)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", nargs="*", default=None, help=f"kinds (default all): {FAULTS}")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per host")
    ap.add_argument("--hosts", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300, help="steps of the run with the fault")
    ap.add_argument("--restart-steps", type=int, default=4)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--timeout", type=float, default=30.0, help="the job's guard timeout")
    ap.add_argument(
        "--window", type=float, default=6.0, help="latest fault, s after dynamo_dist started"
    )
    ap.add_argument("--first", type=int, default=0, help="skip the trials before this one")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep every trial's directory (a failed trial's is always kept)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("chaos.py mounts (unshare -m) and signals other processes: run as root")
    kinds = args.faults or [f for f in FAULTS if args.hosts > 1 or f != "sigint_leader"]
    rng = random.Random(args.seed)
    trials: list[Trial] = []
    t0 = time.monotonic()
    for i in range(args.trials):
        fault, seed = rng.choice(kinds), rng.randrange(1 << 30)
        if i < args.first:
            continue  # the same draws: trial i is the same trial with or without --first
        trial = run_trial(i, fault, seed, args)
        trials.append(trial)
        print(
            f"trial {i:3d} {fault:15s} {trial.outcome:14s} restart {trial.restart:12s} "
            f"{'HANG ' if trial.hang else ''}{'LEAK ' if trial.leaks else ''}"
            f"{'LOST ' if trial.data_lost else ''}{'UNVERIFIED ' if trial.unverified else ''}"
            f"{trial.note}",
            flush=True,
        )
    table = _table(trials)
    print(f"\nseed {args.seed}, {len(trials)} trials in {(time.monotonic() - t0) / 60:.0f} min")
    print(table)
    if args.json:
        args.json.write_text(json.dumps([t.__dict__ for t in trials], indent=1))
    bad = any(t.hang or t.leaks or t.data_lost or t.unverified for t in trials)
    return 1 if bad else 0


def _table(trials: list[Trial]) -> str:
    rows = [
        "fault            trials  survived  hangs  leaks  data lost  unverified loads"
        "  (no fault landed)"
    ]
    by: dict[str, list[Trial]] = {}
    missed: Counter[str] = Counter()
    for t in trials:
        if t.note.startswith(_MISSED):
            missed[t.fault] += 1  # not a trial of the fault: counted apart
            continue
        by.setdefault(t.fault, []).append(t)
    total: Counter[str] = Counter()
    for fault in sorted(by):
        ts = by[fault]
        c = Counter(
            trials=len(ts),
            survived=sum(not t.hang for t in ts),
            hangs=sum(t.hang for t in ts),
            leaks=sum(bool(t.leaks) for t in ts),
            lost=sum(bool(t.data_lost) for t in ts),
            unverified=sum(bool(t.unverified) for t in ts),
        )
        total.update(c)
        rows.append(_row(fault, c) + f"  ({missed[fault]})")
    rows.append(_row("all", total) + f"  ({sum(missed.values())})")
    return "\n".join(rows)


def _row(name: str, c: Counter[str]) -> str:
    return (
        f"{name:16s} {c['trials']:6d} {c['survived']:9d} {c['hangs']:6d} {c['leaks']:6d} "
        f"{c['lost']:10d} {c['unverified']:17d}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
