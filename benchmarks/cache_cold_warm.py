"""Cold and warm starts of a 2-rank DDP training job with inductor, side by side in one run.

    python benchmarks/cache_cold_warm.py                    # CPU, TinyLM, median of 5 runs
    python benchmarks/cache_cold_warm.py --quick            # smoke test: 1 run, small model
    python benchmarks/cache_cold_warm.py --device cuda --model gpt2 --json out.json
    python benchmarks/cache_cold_warm.py --rows plain-cold,dd-warm --runs 1

Every job is launched with torchrun (2 ranks, gloo process group; on ``--device cuda``
rank r uses cuda:(r % device count), so both ranks share cuda:0 on a one-GPU box, which
NCCL refuses and gloo allows). The model is wrapped in DDP and the DDP module is compiled
(``dynamo_dist.compile(ddp, cache_dir=shared)`` or ``torch.compile(ddp)``, as in
launch/train.py), then trained for ``--steps`` AdamW steps (forward, backward,
optimizer.step(); 31 by default, 12 with ``--quick``). At the divergent step (0-based
index 2, the third step) the LAST rank gets a batch 2 rows shorter than the others: plain
torch.compile recompiles on that rank alone, dynamo_dist recompiles on every rank
together (on the precompiled route: the ranks miss their artifacts' guards together, and
the last rank obtains one for the shorter batch). Each rank runs its steps on an inductor
cache that is its own, as if each ran on its own host, except where a row says the
directory is shared, and its own TMPDIR beside it (inductor keeps its precompiled header,
seconds of gcc, under the temp dir whatever TORCHINDUCTOR_CACHE_DIR says: one shared by
every job on this machine would make every plain "cold" row warm).

The model (defaults): TinyLM of launch/train.py, width 256, 4 layers, 8 heads, sequence
64, vocab 128, batch 8 per rank; ``--quick``: width 64, 2 layers, sequence 32.

Rows (``--rows`` takes a comma-separated subset of the names; a warm row always runs
after its own cold row in the same run, which is added if not selected):

* ``uncompiled``: eager DDP, no compile at all. The baseline: "compile overhead" is a
  row's first-step time (wall or CPU) minus this row's, in the same run, so interpreter
  start, imports, process group and DDP set-up cancel out.
* ``plain-cold``: torch.compile with fresh, empty per-rank TORCHINDUCTOR_CACHE_DIR and
  TRITON_CACHE_DIR: what every new host pays today.
* ``plain-warm``: the same per-rank directories again (a restart on the same hosts):
  the best plain torch.compile can do with its local caches.
* ``dd-cold``: dynamo_dist.compile on its precompiled route (the default,
  ``DYNAMO_DIST_PRECOMPILE=1``) with fresh per-rank local directories and an empty
  shared cache_dir: what dynamo_dist costs the first job, which captures the
  aot_compile'd artifact of the module DDP wraps and fills the cache.
* ``dd-warm``: NEW empty per-rank local directories (fresh hosts: a rescheduled or
  scaled-out job) and the cache_dir dd-cold filled: the case the shared cache is for.
  On the precompiled route each rank loads the artifact and runs neither Dynamo nor
  AOTAutograd. Its counterpart is plain-warm, which needs the same hosts to be warm at all.
* ``dd-restart``: dd-cold's cache_dir AND dd-cold's own per-rank local directories (a
  restart of the dd-cold job on the same hosts, local inductor caches warm). It runs
  after dd-warm when both are selected; its counterpart is plain-warm.
* ``dd-graphs-cold`` / ``dd-graphs-warm``: dd-cold and dd-warm with
  ``DYNAMO_DIST_PRECOMPILE=0``, dynamo_dist as it was before the precompiled route:
  Dynamo and AOTAutograd trace every start, only inductor's graphs are shared. Their own
  directories; dd-graphs-cold is the figure dd-cold's cold start is compared with.
* ``shared-cold`` / ``shared-warm`` (only with ``--rows``): plain torch.compile with one
  TORCHINDUCTOR_CACHE_DIR shared by all ranks (TRITON_CACHE_DIR unset, so triton's cache
  lives under it too), fresh, then reused: the do-it-yourself shared cache a user would
  try first.
* ``dd-cold-wait`` / ``dd-cold-compile`` (only with ``--rows``): dd-cold with
  ``cache_followers`` forced to ``wait`` (followers load the leader's entry) or
  ``compile`` (followers compile alongside it); dd-cold uses ``auto``, which picks
  ``compile`` from 4 CPUs per local rank.

Without ``--rows``: uncompiled, plain-cold, plain-warm, dd-cold, dd-warm, dd-restart,
dd-graphs-cold, dd-graphs-warm. Rows are interleaved: each run (round) runs every selected
row once, in the order above, then the next run starts. Each run of a row uses its own
fresh directories where the row says fresh, so the median of 5 "cold" runs is 5 truly
cold runs, and each warm run follows its own cold run. dynamo_dist rows set
``DYNAMO_DIST_PRECOMPILE`` explicitly, so the caller's environment does not change them.

Figures, per rank; a job's figure is the max over its ranks, and the first table shows
the median over runs of that figure:

* ``first s``: wall seconds from the rank's PROCESS START to the end of its first step
  (after optimizer.step(), and a CUDA synchronize on cuda), so interpreter start,
  imports and compile() count. Process start is /proc/self/stat field 22 (starttime,
  clock ticks since boot, os.sysconf("SC_CLK_TCK") a second) against
  time.clock_gettime(CLOCK_BOOTTIME); the resolution is one clock tick (10 ms).
  ``overhd s``: that minus uncompiled's, in the same run (then the median over runs).
* ``cpu s`` (first_step_cpu_s): CPU seconds (user + system) spent for the rank up to the
  same moment: ``os.times()`` user, system, children_user and children_system (the rank
  process and its reaped children), plus utime + stime + cutime + cstime of every
  descendant still alive then (from /proc/<pid>/stat): inductor's compile workers are a
  subprocess pool that lives until the job ends, so ``os.times()`` alone would not see
  them. The JSON keeps the parts (first_step_cpu_self_s, first_step_cpu_reaped_s,
  first_step_cpu_live_s; reaped alone is the ``os.times()`` figure). ``cpu ovh s``: that
  minus uncompiled's, in the same run. On 2 ranks sharing few cores, CPU time is the
  fairer cost: wall time hides work a rank did while the other one waited.
* ``steady ms`` (steady_step_s): the median time of steps 10 to 30 (0-based, inclusive;
  those of them that exist), each timed from before the forward to after
  optimizer.step() (+ CUDA synchronize). A run of 11 steps or fewer uses the steps after
  the divergent one instead (none: "-"); the JSON holds every step's time (step_s) and
  the window used (steady_window).
* ``diverg s``: the divergent step, timed alone (all ranks meet at a barrier first).

Counters, per rank (torch 2.13; the second table shows r0/r1, each the median over runs):

* ``ind.compiles``: ``counters["inductor"]["fxgraph_cache_miss"]``, FX graphs inductor
  lowered and compiled (forward and backward count separately); hits do not count.
* ``dyn.traces``: ``counters["stats"]["unique_graphs"]``, incremented in
  OutputGraph.compile_and_call_fx_graph once per FX graph Dynamo captured and installed.
* ``frames ok``: ``counters["frames"]["ok"]``, frames Dynamo converted, including those it
  looked at and skipped (no tensors, skipfiles): any Dynamo at all. 0 on a precompiled
  warm start.
* ``aot m+b``: ``counters["aot_autograd"]`` autograd_cache_miss + autograd_cache_bypass,
  graphs AOTAutograd traced because its cache did not give them (all its counters are in
  the JSON as aot_autograd). 0 on a precompiled warm start, which runs no AOTAutograd.
* ``recompiles``: Dynamo 2.13 has no recompile counter. ``_compile`` sets
  ``recompile_reason`` in its CompilationMetrics exactly when the frame already had a
  cache entry (``is_recompilation``), so recompiles is the number of entries in
  ``torch._dynamo.utils.get_compilation_metrics()`` with a recompile_reason (the reasons
  are in the JSON). It counts frames, not graphs: one batch-size change recompiles both
  DDP.forward and the wrapped model's forward (DDP's forward graph-breaks into it), so it
  shows 2 where the recompiled frames captured 1 new graph (Dynamo traces +1).
* ``div.comp``: compiles at the divergent step and the step after it: graphs Dynamo
  captured during them (``counters["stats"]["unique_graphs"]``; on a warm start every one
  is a recompile) plus precompiled artifacts captured during them (a capture that runs
  Dynamo may count in both). Not CompilationMetrics entries: loading an artifact records
  one though nothing is compiled. The step after counts because a call that leaves the precompiled
  route runs eagerly and Dynamo compiles at the next call. A precompiled warm start
  loads the artifact for the shorter batch: 0. The JSON has the count of every step
  (step_compiles).
* ``pre.capt`` / ``pre.loads`` / ``pre.calls`` / ``pre.miss`` (dynamo_dist rows):
  ``dynamo_dist.stats()`` precompiled_captures (artifacts this rank captured),
  precompiled_loads (loaded from a cache entry), precompiled_calls (calls that ran an
  artifact: no Dynamo) and precompiled_misses (calls some rank's artifact guards missed).
  They are 0 in the ``DYNAMO_DIST_PRECOMPILE=0`` rows and ``-`` in rows without
  dynamo_dist. precompiled_fallbacks (reason -> count: the module left the precompiled
  route for Dynamo) is listed under the table, per rank with the number of runs that had
  it. The whole ``dynamo_dist.stats()`` goes in the JSON, with the precompiled counters'
  change over the divergent step (divergent_precompiled), and every warning dynamo_dist
  logged (dynamo_dist_warnings: the detail of a fallback; the distinct ones are printed
  under the table, as DYNAMO_DIST_LOG=ERROR keeps them out of the jobs' output).

After the tables, the targets of the precompiled route, each with PASS or FAIL. Every
ratio is taken within one run (both rows of the same run, overheads against that run's
uncompiled), then the MEDIAN over runs is judged against the target (not a ratio of
medians); the spread is the min-max of the per-run ratios. Counts are summed over ranks
per run and judged on their WORST run (max), with their min-max:

* warm overhead, wall and CPU: (dd-warm - uncompiled) / (plain-warm - uncompiled) of the
  first step, <= 0.4 on CPU, <= 0.5 on GPU.
* cold overhead: dd-cold overhead / plain-cold overhead, <= 0.8 on CPU, <= 1.0 on GPU;
  cold first step: dd-cold first s / dd-graphs-cold first s, <= 1.10 (the precompiled
  route's capture costs a cold start at most 10% over graphs-only dynamo_dist).
* steady step: dd-warm steady / plain-warm steady, <= 1.05 on CPU, <= 1.03 on GPU.
* restart overhead: dd-restart overhead / plain-warm overhead, <= 1.0.
* dd-warm, summed over ranks: Dynamo frames ok, AOTAutograd cache misses + bypasses, and
  compiles at the divergent step and the step after it (div.comp), all 0.

A check whose rows were not selected, or failed, shows n/a. They are reported, never
asserted. ``--json PATH`` writes the configuration, the tables' figures, every check
with its per-run values, and every rank's raw result of every run.

``--model gpt2`` trains transformers' GPT2LMHeadModel (2 layers, n_embd 128, 4 heads,
vocab 1024, random init, nothing downloaded) behind a small nn.Module that returns the
logits; it needs ``pip install dynamo_dist[bench]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
#: 0-based index of the step where the last rank gets a shorter batch.
DIVERGENT_STEP = 2
#: How many rows shorter the last rank's batch is at the divergent step.
SHORTER_BY = 2
#: 0-based indices of the first and last step of the steady-state window (inclusive).
STEADY_FIRST, STEADY_LAST = 10, 30
#: Output of a failed job that is printed.
TAIL_CHARS = 3000
#: Characters of each dynamo_dist warning printed under the tables.
WARNING_CHARS = 600
GPT2_HINT = "--model gpt2 needs transformers: pip install dynamo_dist[bench]"
#: dynamo_dist's switch of the precompiled route (config key ``precompile``).
PRECOMPILE_ENV = "DYNAMO_DIST_PRECOMPILE"


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    mode: str
    """``none`` (eager), ``plain`` (torch.compile) or ``dd`` (dynamo_dist.compile)."""
    local: str | None = None
    """Per-rank TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR under this run's ``local``."""
    shared_inductor: str | None = None
    """One TORCHINDUCTOR_CACHE_DIR for all ranks."""
    shared_cache: str | None = None
    """dynamo_dist's cache_dir."""
    after: str | None = None
    """The cold row whose directories this warm row reuses."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the job."""
    default: bool = True
    """Run without ``--rows``."""


PRECOMPILED = {PRECOMPILE_ENV: "1"}
GRAPHS_ONLY = {PRECOMPILE_ENV: "0"}

ROWS: list[Row] = [
    Row("uncompiled", "uncompiled (eager DDP)", "none", local="eager"),
    Row("plain-cold", "torch.compile, cold", "plain", local="plain"),
    Row(
        "plain-warm", "torch.compile, warm (same hosts)", "plain", local="plain", after="plain-cold"
    ),
    Row(
        "shared-cold",
        "torch.compile + shared inductor dir, cold",
        "plain",
        shared_inductor="si",
        default=False,
    ),
    Row(
        "shared-warm",
        "torch.compile + shared inductor dir, warm",
        "plain",
        shared_inductor="si",
        after="shared-cold",
        default=False,
    ),
    Row(
        "dd-cold",
        "dynamo_dist.compile, cold",
        "dd",
        local="dd_cold",
        shared_cache="dd",
        env=PRECOMPILED,
    ),
    Row(
        "dd-warm",
        "dynamo_dist.compile, warm (fresh hosts)",
        "dd",
        local="dd_warm",
        shared_cache="dd",
        after="dd-cold",
        env=PRECOMPILED,
    ),
    Row(
        "dd-restart",
        "dynamo_dist.compile, restart (same hosts)",
        "dd",
        local="dd_cold",
        shared_cache="dd",
        after="dd-cold",
        env=PRECOMPILED,
    ),
    Row(
        "dd-graphs-cold",
        "dynamo_dist, PRECOMPILE=0, cold",
        "dd",
        local="dd_graphs_cold",
        shared_cache="dd_graphs",
        env=GRAPHS_ONLY,
    ),
    Row(
        "dd-graphs-warm",
        "dynamo_dist, PRECOMPILE=0, warm (fresh hosts)",
        "dd",
        local="dd_graphs_warm",
        shared_cache="dd_graphs",
        after="dd-graphs-cold",
        env=GRAPHS_ONLY,
    ),
    *(
        Row(
            f"dd-cold-{followers}",
            f"dynamo_dist.compile, cold, followers {followers}",
            "dd",
            local=f"dd_cold_{followers}",
            shared_cache=f"dd_{followers}",
            env={**PRECOMPILED, "DYNAMO_DIST_CACHE_FOLLOWERS": followers},
            default=False,
        )
        for followers in ("wait", "compile")
    ),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


@dataclass
class JobResult:
    ok: bool
    ranks: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    wall_s: float = 0.0

    def job(self, key: str) -> float | None:
        """A job's figure: the max over ranks (None if any rank lacks it)."""
        vals = [r.get(key) for r in self.ranks]
        if not self.ok or not vals or any(v is None for v in vals):
            return None
        return max(float(v) for v in vals if v is not None)

    def total(self, key: str) -> float | None:
        """A count summed over ranks (None if any rank lacks it)."""
        vals = [r.get(key) for r in self.ranks]
        if not self.ok or not vals or any(v is None for v in vals):
            return None
        return sum(float(v) for v in vals if v is not None)


# --------------------------------------------------------------------------- worker


class ListHandler(logging.Handler):
    """Keeps the messages of the records it gets (dynamo_dist's warnings, for the JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:2000])


def proc_stat(path: str | Path) -> list[str]:
    """Fields 3 onwards of a /proc/<pid>/stat (index 0 is field 3, the state)."""
    stat = Path(path).read_text()
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def process_age_s() -> float:
    """Seconds since this process started (/proc/self/stat field 22 vs CLOCK_BOOTTIME)."""
    start_ticks = int(proc_stat("/proc/self/stat")[22 - 3])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def live_descendants_cpu_s() -> float:
    """CPU seconds of this process's descendants that are alive (not reaped) now.

    utime + stime + cutime + cstime (fields 14-17) of each: a live child's own reaped
    children are in its cutime/cstime, its live ones are visited themselves, and a reaped
    child is in this process's ``os.times()`` instead, so nothing counts twice.
    """
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = proc_stat(Path(entry.path, "stat"))
        except (OSError, ValueError):
            continue  # gone meanwhile
        pid = int(entry.name)
        parent[pid] = int(fields[4 - 3])
        ticks[pid] = sum(int(f) for f in fields[14 - 3 : 17 - 3 + 1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += ticks[pid]
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_so_far() -> dict[str, float]:
    """This rank's CPU seconds so far: its own, its reaped children's, its live ones'."""
    t = os.times()
    parts = {
        "self": t.user + t.system,
        "reaped": t.user + t.system + t.children_user + t.children_system,
        "live": live_descendants_cpu_s(),
    }
    parts["total"] = parts["reaped"] + parts["live"]
    return parts


def steady_window(steps: int) -> range:
    """0-based indices of the steps whose median time is the steady-state figure."""
    if steps > STEADY_FIRST:
        return range(STEADY_FIRST, min(STEADY_LAST, steps - 1) + 1)
    return range(DIVERGENT_STEP + 1, steps)  # a short run: the steps after the divergent one


def build_model(cfg: argparse.Namespace) -> torch.nn.Module:
    from torch import nn

    if cfg.model == "tiny":
        sys.path.insert(0, str(ROOT / "launch"))
        train = importlib.import_module("train")
        model: nn.Module = train.TinyLM(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.seq)
        return model
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise SystemExit(GPT2_HINT) from e

    class GPT2Logits(nn.Module):
        """GPT2LMHeadModel whose forward returns the logits tensor (Dynamo traces it)."""

        def __init__(self) -> None:
            super().__init__()
            conf = transformers.GPT2Config(
                n_layer=2,
                n_embd=128,
                n_head=4,
                n_positions=cfg.seq,
                vocab_size=cfg.vocab,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                use_cache=False,
            )
            self.lm = transformers.GPT2LMHeadModel(conf)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lm(input_ids=tokens, use_cache=False).logits
            return out

    return GPT2Logits()


def worker(out_dir: Path, mode: str, cfg: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch._dynamo.utils import counters, get_compilation_metrics, set_compilation_metrics_limit
    from torch.nn.parallel import DistributedDataParallel as DDP

    set_compilation_metrics_limit(100_000)
    sys.path.insert(0, str(ROOT / "launch"))
    train = importlib.import_module("train")
    synthetic_batch = train.synthetic_batch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = train.rank_device(cfg.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    dd: Any = None
    dd_log = ListHandler()
    step_fn: Any
    if mode == "dd":
        import dynamo_dist

        dd = dynamo_dist
        step_fn = dynamo_dist.compile(ddp, cache_dir=os.environ["BENCH_SHARED"])
        # DYNAMO_DIST_LOG=ERROR keeps dynamo_dist quiet, and so drops its warnings, among
        # them why a module left the precompiled route: collect them for the JSON.
        dd_logger = logging.getLogger("dynamo_dist")
        dd_logger.addHandler(dd_log)
        dd_logger.setLevel(min(dd_logger.getEffectiveLevel(), logging.WARNING))
    elif mode == "plain":
        step_fn = torch.compile(ddp)
    else:
        step_fn = ddp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def precompiled() -> dict[str, Any]:
        """dynamo_dist's precompiled_* counters now (empty for other modes)."""
        if dd is None:
            return {}
        return {k: v for k, v in dd.stats().items() if k.startswith("precompiled_")}

    res: dict[str, Any] = {"rank": rank, "mode": mode, "setup_s": process_age_s()}
    if dd is not None:
        res["precompile_env"] = os.environ.get(PRECOMPILE_ENV)
    loss = torch.zeros(())
    # BENCH_PROFILE=DIR: cProfile of each rank's first step and of its divergent step,
    # DIR/<row>-rank<r>-first.txt and -divergent.txt (where the time goes; the figures of a
    # profiled run are not comparable), and the raw pstats as .prof beside them. A later
    # run of the same row overwrites the files.
    prof_dir = os.environ.get("BENCH_PROFILE")
    prof_row = os.environ.get("BENCH_ROW", mode)
    prof: Any = None

    def profile_start() -> None:
        nonlocal prof
        if prof_dir:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()

    def profile_save(what: str) -> None:
        nonlocal prof
        if prof is None:
            return
        import io
        import pstats

        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(90)
        stats.sort_stats("tottime").print_stats(30)
        Path(prof_dir or ".", f"{prof_row}-rank{rank}-{what}.txt").write_text(text.getvalue())
        stats.dump_stats(str(Path(prof_dir or ".", f"{prof_row}-rank{rank}-{what}.prof")))
        prof = None

    def compiles_so_far() -> int:
        """Graphs Dynamo captured plus precompiled captures, this process so far.

        Not CompilationMetrics entries: loading a precompiled artifact records one too
        (AOTAutograd's cache post-compile), though nothing is traced or compiled.
        """
        captures = precompiled().get("precompiled_captures", 0)
        return int(counters["stats"]["unique_graphs"]) + int(captures)

    step_s: list[float] = []
    step_compiles: list[int] = []
    compiles_before = compiles_so_far()
    pre_before: dict[str, Any] = {}
    profile_start()
    for step in range(cfg.steps):
        divergent = step == DIVERGENT_STEP
        batch = cfg.batch - SHORTER_BY if divergent and rank == world - 1 else cfg.batch
        x, y = synthetic_batch(step, rank, batch, cfg.seq, cfg.vocab, device)
        if divergent:
            sync()
            dist.barrier()
            pre_before = precompiled()
            profile_start()
        t0 = time.perf_counter()
        logits = step_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step_s.append(time.perf_counter() - t0)
        compiles_now = compiles_so_far()
        step_compiles.append(compiles_now - compiles_before)
        compiles_before = compiles_now
        if step == 0:
            res["first_step_s"] = process_age_s()
            cpu = cpu_so_far()
            res.update(
                first_step_cpu_s=cpu["total"],
                first_step_cpu_self_s=cpu["self"],
                first_step_cpu_reaped_s=cpu["reaped"],
                first_step_cpu_live_s=cpu["live"],
            )
            profile_save("first")
        if divergent:
            res["divergent_step_s"] = step_s[-1]
            profile_save("divergent")
            res["divergent_precompiled"] = {
                k: v - pre_before.get(k, 0)
                for k, v in precompiled().items()
                if isinstance(v, int) and not isinstance(v, bool)
            }
    window = steady_window(cfg.steps)
    res["step_s"] = [round(s, 6) for s in step_s]
    res["step_compiles"] = step_compiles
    res["divergent_compiles"] = sum(step_compiles[DIVERGENT_STEP : DIVERGENT_STEP + 2])
    res["steady_window"] = [window.start, window.stop - 1] if window else None
    res["steady_step_s"] = statistics.median(step_s[i] for i in window) if window else None
    metrics = get_compilation_metrics()
    reasons = [m.recompile_reason for m in metrics if m.recompile_reason is not None]
    aot = {k: int(v) for k, v in counters["aot_autograd"].items()}
    res.update(
        final_loss=float(loss.item()),
        inductor_compiles=int(counters["inductor"]["fxgraph_cache_miss"]),
        inductor_cache_hits=int(counters["inductor"]["fxgraph_cache_hit"]),
        dynamo_traces=int(counters["stats"]["unique_graphs"]),
        frames_ok=int(counters["frames"]["ok"]),
        aot_autograd=aot,
        aot_miss_bypass=aot.get("autograd_cache_miss", 0) + aot.get("autograd_cache_bypass", 0),
        recompiles=len(reasons),
        recompile_reasons=[r[:300] for r in reasons],
    )
    if dd is not None:
        res.update(json.loads(json.dumps(precompiled(), default=str)))
        res["dynamo_dist_stats"] = json.loads(json.dumps(dd.stats(), default=str))
        res["dynamo_dist_warnings"] = dd_log.messages
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    if dd is not None:
        dd.shutdown()
    dist.destroy_process_group()
    # Leave without tearing the rest down: DDP's Reducer still holds the gloo process
    # group, and its destructor (when this frame's locals go) joins gloo's worker threads
    # with the GIL held, while one of them may still need the GIL to free the barrier's
    # work: a deadlock seen under load (torch 2.13). Inductor's compile workers are shut
    # down first (if inductor ran at all), as its atexit handler would.
    async_compile = sys.modules.get("torch._inductor.async_compile")
    shutdown_workers = getattr(async_compile, "shutdown_compile_workers", None)
    if shutdown_workers is not None:
        shutdown_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- driver


def worker_args(cfg: argparse.Namespace) -> list[str]:
    keys = ("device", "model", "dim", "layers", "heads", "seq", "vocab", "batch", "steps")
    out: list[str] = []
    for k in keys:
        out += [f"--{k}", str(getattr(cfg, k))]
    return out


def tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-TAIL_CHARS:]
    except OSError as e:
        return f"(no output: {e})"


def run_job(row: Row, run_dir: Path, cfg: argparse.Namespace) -> JobResult:
    out = run_dir / "jobs" / row.name
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DYNAMO_DIST_LOG": "ERROR", "BENCH_ROW": row.name}
    for k in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "BENCH_LOCAL_DIRS",
        "BENCH_SHARED",
        PRECOMPILE_ENV,
    ):
        env.pop(k, None)
    if row.local:
        dirs = [str(run_dir / "local" / row.local / f"rank{r}") for r in range(cfg.nproc)]
        env["BENCH_LOCAL_DIRS"] = json.dumps(dirs)
    if row.shared_inductor:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir / "shared" / row.shared_inductor)
    if row.shared_cache:
        env["BENCH_SHARED"] = str(run_dir / "shared" / row.shared_cache)
    env.update(row.env)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={cfg.nproc}",
        __file__,
        "--worker",
        str(out),
        "--mode",
        row.mode,
        *worker_args(cfg),
    ]
    log = out / "output.txt"
    t0 = time.perf_counter()
    rc: int | None
    with log.open("wb") as fh:
        # Own session, so a timeout ends torchrun and its workers (and nothing else).
        proc = subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = None
    wall = time.perf_counter() - t0
    ranks: list[dict[str, Any]] = []
    missing = []
    for r in range(cfg.nproc):
        try:
            ranks.append(json.loads((out / f"rank{r}.json").read_text()))
        except (OSError, ValueError):
            missing.append(r)
    if rc == 0 and not missing:
        return JobResult(ok=True, ranks=ranks, wall_s=wall)
    why = f"timed out after {cfg.timeout}s" if rc is None else f"exit status {rc}"
    if missing:
        why += f", no result from rank(s) {missing}"
    print(f"\n!! {row.name} failed ({why}); last {TAIL_CHARS} chars of {log}:", flush=True)
    print(tail(log), flush=True)
    return JobResult(ok=False, ranks=ranks, error=why, wall_s=wall)


def median(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def fmt_count(v: float | None) -> str:
    if v is None:
        return "-"
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def per_rank_median(results: list[JobResult], key: str, nproc: int) -> str:
    out = []
    for r in range(nproc):
        vals = [float(v) for j in results if j.ok and (v := j.ranks[r].get(key)) is not None]
        out.append(fmt_count(median(vals)))
    return "/".join(out)


Run = dict[str, JobResult]


def overhead(run: Run, name: str, key: str = "first_step_s") -> float | None:
    """A row's ``key`` (first-step wall or CPU seconds) minus uncompiled's, in one run."""
    base = run.get("uncompiled")
    job = run.get(name)
    if base is None or job is None:
        return None
    a, b = job.job(key), base.job(key)
    return None if a is None or b is None else a - b


def overhead_ratio(num: str, den: str, key: str = "first_step_s") -> Callable[[Run], float | None]:
    """Per run: overhead of ``num`` / overhead of ``den`` (None where den's is not > 0)."""

    def value(run: Run) -> float | None:
        a, b = overhead(run, num, key), overhead(run, den, key)
        return None if a is None or b is None or b <= 0 else a / b

    return value


def figure_ratio(num: str, den: str, key: str) -> Callable[[Run], float | None]:
    """Per run: job figure ``key`` of ``num`` / the same of ``den``."""

    def value(run: Run) -> float | None:
        a = run[num].job(key) if num in run else None
        b = run[den].job(key) if den in run else None
        return None if a is None or b is None or b <= 0 else a / b

    return value


def rank_total(name: str, key: str) -> Callable[[Run], float | None]:
    """Per run: count ``key`` of row ``name`` summed over its ranks."""

    def value(run: Run) -> float | None:
        return run[name].total(key) if name in run else None

    return value


@dataclass(frozen=True)
class Check:
    """A target of the precompiled route, evaluated per run."""

    name: str
    label: str
    value: Callable[[Run], float | None]
    target: float
    count: bool = False
    """A count judged on its worst run; else a ratio judged on the median over runs."""


def checks(device: str) -> list[Check]:
    cpu = device == "cpu"
    warm = 0.4 if cpu else 0.5
    return [
        Check(
            "warm_overhead_wall",
            "warm overhead, wall: (dd-warm - uncompiled) / (plain-warm - uncompiled)",
            overhead_ratio("dd-warm", "plain-warm"),
            warm,
        ),
        Check(
            "warm_overhead_cpu",
            "warm overhead, CPU: (dd-warm - uncompiled) / (plain-warm - uncompiled)",
            overhead_ratio("dd-warm", "plain-warm", "first_step_cpu_s"),
            warm,
        ),
        Check(
            "cold_overhead",
            "cold overhead: dd-cold / plain-cold",
            overhead_ratio("dd-cold", "plain-cold"),
            0.8 if cpu else 1.0,
        ),
        Check(
            "cold_first_step",
            "cold first step: dd-cold / dd-graphs-cold",
            figure_ratio("dd-cold", "dd-graphs-cold", "first_step_s"),
            1.10,
        ),
        Check(
            "steady_step",
            "steady step: dd-warm / plain-warm",
            figure_ratio("dd-warm", "plain-warm", "steady_step_s"),
            1.05 if cpu else 1.03,
        ),
        Check(
            "restart_overhead",
            "restart overhead: dd-restart / plain-warm",
            overhead_ratio("dd-restart", "plain-warm"),
            1.0,
        ),
        Check(
            "warm_frames_ok",
            "dd-warm Dynamo frames ok (sum over ranks)",
            rank_total("dd-warm", "frames_ok"),
            0,
            count=True,
        ),
        Check(
            "warm_aot_miss_bypass",
            "dd-warm AOTAutograd cache misses+bypasses (sum over ranks)",
            rank_total("dd-warm", "aot_miss_bypass"),
            0,
            count=True,
        ),
        Check(
            "warm_divergent_compiles",
            "dd-warm recompiles at the divergent step and the next (sum over ranks)",
            rank_total("dd-warm", "divergent_compiles"),
            0,
            count=True,
        ),
    ]


def evaluate(check: Check, runs: list[Run]) -> dict[str, Any]:
    """The check's per-run values, the judged figure, its spread and PASS/FAIL/n/a."""
    per_run = [check.value(run) for run in runs]
    got = [v for v in per_run if v is not None]
    judged = (max(got) if got else None) if check.count else median(got)
    verdict = "n/a" if judged is None else ("PASS" if judged <= check.target else "FAIL")
    return {
        "label": check.label,
        "value": judged,
        "judged_on": "worst run" if check.count else "median over runs of per-run ratios",
        "target": check.target,
        "verdict": verdict,
        "spread": [min(got), max(got)] if got else None,
        "per_run": per_run,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "gpt2"], default="tiny")
    p.add_argument("--runs", type=int, default=None, help="runs per row (default 5)")
    p.add_argument("--dim", type=int, default=None, help="TinyLM width (default 256)")
    p.add_argument("--layers", type=int, default=None, help="TinyLM layers (default 4)")
    p.add_argument("--heads", type=int, default=8, help="TinyLM heads")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 64)")
    p.add_argument("--vocab", type=int, default=None, help="default 128 (tiny), 1024 (gpt2)")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"AdamW steps (default 31, so steady state covers steps {STEADY_FIRST}-{STEADY_LAST})",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks (one host)")
    p.add_argument(
        "--rows", default=None, help=f"comma-separated subset of: {', '.join(ROW_BY_NAME)}"
    )
    p.add_argument("--quick", action="store_true", help="1 run, dim 64, 2 layers, seq 32, 12 steps")
    p.add_argument("--json", default=None, help="write all raw per-rank results here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--keep", action="store_true", help="keep the cache directories and logs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    if args.runs is None:
        args.runs = 1 if quick else 5
    if args.dim is None:
        args.dim = 64 if quick else 256
    if args.layers is None:
        args.layers = 2 if quick else 4
    if args.seq is None:
        args.seq = 32 if quick else 64
    if args.steps is None:
        args.steps = 12 if quick else STEADY_LAST + 1
    if args.vocab is None:
        args.vocab = 1024 if args.model == "gpt2" else 128
    if args.steps <= DIVERGENT_STEP:
        p.error(f"--steps must be > {DIVERGENT_STEP} (the divergent step's index)")
    if args.batch <= SHORTER_BY:
        p.error(f"--batch must be > {SHORTER_BY}")
    if args.runs < 1 or args.nproc < 2:
        p.error("--runs must be >= 1 and --nproc >= 2")
    return args


def select_rows(spec: str | None) -> list[Row]:
    if not spec:
        return [r for r in ROWS if r.default]
    names = {n.strip() for n in spec.split(",") if n.strip()}
    unknown = names - ROW_BY_NAME.keys()
    if unknown:
        raise SystemExit(f"unknown row(s) {sorted(unknown)}; rows: {', '.join(ROW_BY_NAME)}")
    for n in list(names):
        after = ROW_BY_NAME[n].after
        if after and after not in names:
            print(f"note: {n} follows {after}, which is added")
            names.add(after)
    return [r for r in ROWS if r.name in names]


def print_table(
    rows: list[Row],
    width: int,
    columns: list[tuple[str, int]],
    cells: dict[str, list[str]],
    sub: list[str] | None = None,
) -> None:
    """One line per row: its label, then its cells right-aligned under ``columns``."""

    def line(first: str, texts: list[str]) -> str:
        parts = [f"{t:>{w}s}" for t, (_, w) in zip(texts, columns, strict=True)]
        return f"{first:{width}s} " + " ".join(parts)

    header = line("configuration", [h for h, _ in columns])
    print(header)
    print("-" * len(header))
    if sub is not None:
        print(line("", sub))
    for row in rows:
        print(line(row.label, cells[row.name]))


def report(cfg: argparse.Namespace, rows: list[Row], runs: list[Run]) -> dict[str, Any]:
    """Print the tables, the fallbacks and warnings, and the targets; their figures."""
    width = max(len("configuration"), *(len(r.label) for r in rows))
    time_cols = [
        ("first s", 8),
        ("overhd s", 8),
        ("cpu s", 7),
        ("cpu ovh s", 9),
        ("steady ms", 9),
        ("diverg s", 8),
        ("ok", 4),
    ]
    count_keys = [
        ("ind.compiles", "inductor_compiles"),
        ("dyn.traces", "dynamo_traces"),
        ("frames ok", "frames_ok"),
        ("aot m+b", "aot_miss_bypass"),
        ("recompiles", "recompiles"),
        ("div.comp", "divergent_compiles"),
        ("pre.capt", "precompiled_captures"),
        ("pre.loads", "precompiled_loads"),
        ("pre.calls", "precompiled_calls"),
        ("pre.miss", "precompiled_misses"),
    ]
    rank_cols = "/".join(f"r{r}" for r in range(cfg.nproc))
    count_cols = [(h, max(len(h), len(rank_cols))) for h, _ in count_keys]
    time_cells: dict[str, list[str]] = {}
    count_cells: dict[str, list[str]] = {}
    fallback_lines: list[str] = []
    warning_lines: list[str] = []
    summary: dict[str, Any] = {}
    for row in rows:
        results = [run[row.name] for run in runs]
        ok = [j for j in results if j.ok]
        n_ok = f"{len(ok)}/{len(results)}"
        if not ok:
            time_cells[row.name] = ["FAILED", *([""] * (len(time_cols) - 2)), n_ok]
            count_cells[row.name] = [""] * len(count_cols)
            summary[row.name] = {"failed": True}
            continue

        def med(key: str, ok: list[JobResult] = ok) -> float | None:
            return median([v for j in ok if (v := j.job(key)) is not None])

        def med_overhead(key: str, name: str = row.name) -> float | None:
            return median([v for run in runs if (v := overhead(run, name, key)) is not None])

        first, cpu, steady = med("first_step_s"), med("first_step_cpu_s"), med("steady_step_s")
        div = med("divergent_step_s")
        ovh, cpu_ovh = med_overhead("first_step_s"), med_overhead("first_step_cpu_s")
        base_row = row.name == "uncompiled"
        time_cells[row.name] = [
            fmt(first),
            "-" if base_row else fmt(ovh),
            fmt(cpu),
            "-" if base_row else fmt(cpu_ovh),
            fmt(None if steady is None else steady * 1000, ".1f"),
            fmt(div),
            n_ok,
        ]
        counts = {key: per_rank_median(ok, key, cfg.nproc) for _, key in count_keys}
        count_cells[row.name] = [counts[key] for _, key in count_keys]
        summary[row.name] = {
            "first_step_s": first,
            "overhead_s": ovh,
            "first_step_cpu_s": cpu,
            "cpu_overhead_s": cpu_ovh,
            "steady_step_s": steady,
            "divergent_step_s": div,
            **counts,
            "ok_runs": len(ok),
        }
        if row.mode == "dd":
            # Which ranks gave a module up for Dynamo, why, and in how many runs.
            seen: dict[str, int] = {}
            for j in ok:
                for rk in j.ranks:
                    for reason, n in (rk.get("precompiled_fallbacks") or {}).items():
                        if n:
                            what = f"r{rk['rank']} {reason} x{n}"
                            seen[what] = seen.get(what, 0) + 1
            summary[row.name]["precompiled_fallbacks"] = seen
            if seen:
                shown = ", ".join(f"{k} ({v}/{len(ok)} runs)" for k, v in sorted(seen.items()))
                fallback_lines.append(f"  {row.name}: {shown}")
            # The distinct warnings dynamo_dist logged, per rank, in how many runs.
            said: dict[str, int] = {}
            for j in ok:
                for rk in j.ranks:
                    for msg in set(rk.get("dynamo_dist_warnings") or []):
                        one_line = " | ".join(part.strip() for part in msg.splitlines())
                        what = f"r{rk['rank']} {one_line[:WARNING_CHARS]}"
                        said[what] = said.get(what, 0) + 1
            summary[row.name]["dynamo_dist_warnings"] = said
            warning_lines += [f"  {row.name} {k} ({v}/{len(ok)} runs)" for k, v in said.items()]

    print("\nFirst step (from process start; wall and CPU), steady-state step, divergent step:")
    print("job figure = max over ranks, median over runs; overheads are against uncompiled\n")
    print_table(rows, width, time_cols, time_cells)
    print(f"\nCounters per rank ({rank_cols}), median over runs:\n")
    print_table(rows, width, count_cols, count_cells, sub=[rank_cols] * len(count_cols))
    if any(r.mode == "dd" for r in rows):
        print("\nprecompiled fallbacks (dynamo_dist.stats()['precompiled_fallbacks']):")
        print("\n".join(fallback_lines) if fallback_lines else "  none")
        print("dynamo_dist warnings (all in the JSON, dynamo_dist_warnings):")
        print("\n".join(warning_lines) if warning_lines else "  none")

    print(
        "\nTargets. Ratios: taken within each run, then the MEDIAN over runs is judged; "
        "counts: summed over ranks, the WORST run is judged; spread: min-max over runs."
    )
    evaluated = [(c, evaluate(c, runs)) for c in checks(cfg.device)]
    label_w = max(len(c.label) for c, _ in evaluated)
    for c, e in evaluated:
        spread = e["spread"]
        if c.count:
            value, target = fmt_count(e["value"]), f"<= {fmt_count(c.target)}"
            lo_hi = "-" if spread is None else f"{fmt_count(spread[0])}-{fmt_count(spread[1])}"
        else:
            value = "-" if e["value"] is None else f"{e['value']:.2f}x"
            target = f"<= {c.target:.2f}x"
            lo_hi = "-" if spread is None else f"{fmt(spread[0])}-{fmt(spread[1])}"
        n = sum(v is not None for v in e["per_run"])
        print(
            f"  {c.label:{label_w}s} {value:>6s}  target {target:8s} {e['verdict']:4s} "
            f"spread {lo_hi} ({n}/{len(runs)} runs)"
        )
        summary[f"check {c.name}"] = e
    return summary


def main() -> None:
    cfg = parse_args()
    if cfg.worker:
        dirs = os.environ.get("BENCH_LOCAL_DIRS")
        if dirs:
            # Before torch is imported: inductor and triton read these at import/first use.
            local = json.loads(dirs)[int(os.environ["LOCAL_RANK"])]
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = local
            os.environ["TRITON_CACHE_DIR"] = os.path.join(local, "triton")
            # The emulated host's own /tmp: inductor keeps its precompiled header (a gcc
            # run of seconds, 150 MB) under tempfile.gettempdir(), whatever
            # TORCHINDUCTOR_CACHE_DIR says. A fresh host has none; one shared by every
            # job of this machine would make plain torch.compile's "cold" rows warm.
            tmp = os.path.join(local, "tmp")
            os.makedirs(tmp, mode=0o700, exist_ok=True)
            os.environ["TMPDIR"] = tmp
            tempfile.tempdir = None
        worker(Path(cfg.worker), cfg.mode, cfg)
        return
    if cfg.model == "gpt2" and importlib.util.find_spec("transformers") is None:
        raise SystemExit(GPT2_HINT)
    rows = select_rows(cfg.rows)
    base = Path(tempfile.mkdtemp(prefix="dd_bench_"))
    if cfg.model == "tiny":
        model = f"TinyLM (dim {cfg.dim}, {cfg.layers} layers, {cfg.heads} heads)"
    else:
        model = "GPT2LMHeadModel (2 layers, n_embd 128, 4 heads)"
    window = steady_window(cfg.steps)
    steady_desc = f"steps {window.start}-{window.stop - 1}" if window else "none (too few steps)"
    print(
        f"{cfg.nproc} ranks on {cfg.device} ({os.cpu_count()} cores), gloo, {model}, "
        f"vocab {cfg.vocab}, seq {cfg.seq}, batch {cfg.batch}, {cfg.steps} AdamW steps; "
        f"divergent step {DIVERGENT_STEP} (0-based): rank {cfg.nproc - 1} batch "
        f"{cfg.batch - SHORTER_BY}; steady state: median of {steady_desc}; "
        f"median of {cfg.runs} run(s); work dir {base}",
        flush=True,
    )
    # Page in torch and friends once, so the first job timed does not pay a cold disk.
    subprocess.run(
        [sys.executable, "-c", "import torch, torch._dynamo, torch._inductor, dynamo_dist"],
        check=False,
        capture_output=True,
    )
    runs: list[Run] = []
    for i in range(cfg.runs):
        run_dir = base / f"run{i}"
        run: Run = {}
        for row in rows:
            if row.after and not run[row.after].ok:
                print(f"run {i + 1}/{cfg.runs} {row.name}: skipped ({row.after} failed)")
                run[row.name] = JobResult(ok=False, error=f"skipped: {row.after} failed")
                continue
            res = run_job(row, run_dir, cfg)
            run[row.name] = res
            state = (
                f"first step {fmt(res.job('first_step_s'))} s, "
                f"CPU {fmt(res.job('first_step_cpu_s'))} s"
                if res.ok
                else "FAILED"
            )
            print(f"run {i + 1}/{cfg.runs} {row.name}: {state} ({res.wall_s:.0f} s)", flush=True)
        runs.append(run)
    summary = report(cfg, rows, runs)

    if cfg.json:
        doc = {
            "config": {k: v for k, v in vars(cfg).items() if k not in ("worker", "mode")},
            "divergent_step": DIVERGENT_STEP,
            "shorter_by": SHORTER_BY,
            "steady_window": [window.start, window.stop - 1] if window else None,
            "cpu_count": os.cpu_count(),
            "rows": [r.name for r in rows],
            "summary": summary,
            "runs": [
                {
                    name: {"ok": j.ok, "error": j.error, "wall_s": j.wall_s, "ranks": j.ranks}
                    for name, j in run.items()
                }
                for run in runs
            ],
        }
        Path(cfg.json).write_text(json.dumps(doc, indent=1))
        print(f"raw results: {cfg.json}")
    failed = any(not j.ok for run in runs for j in run.values())
    if cfg.keep or failed:
        print(f"directories and logs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
