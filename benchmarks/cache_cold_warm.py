"""Cold and warm starts of a 2-rank DDP training job with inductor, side by side in one run.

    python benchmarks/cache_cold_warm.py                    # CPU, TinyLM, median of 3 runs
    python benchmarks/cache_cold_warm.py --quick            # smoke test: 1 run, small model
    python benchmarks/cache_cold_warm.py --device cuda --model gpt2 --json out.json
    python benchmarks/cache_cold_warm.py --rows plain-cold,dd-warm --runs 1

Every job is launched with torchrun (2 ranks, gloo process group; on ``--device cuda``
rank r uses cuda:(r % device count), so both ranks share cuda:0 on a one-GPU box, which
NCCL refuses and gloo allows). The model is wrapped in DDP and the DDP module is compiled
(``dynamo_dist.compile(ddp, cache_dir=shared)`` or ``torch.compile(ddp)``, as in
launch/train.py), then trained for ``--steps`` AdamW steps (forward, backward,
optimizer.step()). At the divergent step (0-based index 2, the third step) the LAST rank
gets a batch 2 rows shorter than the others: plain torch.compile recompiles on that rank
alone, dynamo_dist recompiles on every rank together. Each rank runs its steps on an
inductor cache that is its own, as if each ran on its own host, except where a row says
the directory is shared.

Rows (``--rows`` takes a comma-separated subset of the names; a warm row always runs
right after its own cold row, which is added if not selected):

* ``uncompiled``: eager DDP, no compile at all. The baseline: "compile overhead" is a
  row's first-step time minus this row's, in the same run, so interpreter start,
  imports, process group and DDP set-up cancel out.
* ``plain-cold``: torch.compile with fresh, empty per-rank TORCHINDUCTOR_CACHE_DIR and
  TRITON_CACHE_DIR: what every new host pays today.
* ``plain-warm``: the same per-rank directories again (a restart on the same hosts):
  the best plain torch.compile can do with its local caches.
* ``shared-cold`` / ``shared-warm``: plain torch.compile with one TORCHINDUCTOR_CACHE_DIR
  shared by all ranks (TRITON_CACHE_DIR unset, so triton's cache lives under it too),
  fresh, then reused: the do-it-yourself shared cache a user would try first.
* ``dd-cold``: dynamo_dist.compile with fresh per-rank local directories and an empty
  shared cache_dir: what dynamo_dist costs the first job that fills its cache.
* ``dd-warm``: NEW empty per-rank local directories (fresh hosts: a rescheduled or
  scaled-out job) and the cache_dir dd-cold filled: the case the shared cache is for.
  Its counterpart is plain-warm, which needs the same hosts to be warm at all.
* ``dd-cold-wait`` / ``dd-cold-compile`` (only with ``--rows``): dd-cold with
  ``cache_followers`` forced to ``wait`` (followers load the leader's entry) or
  ``compile`` (followers compile alongside it); dd-cold uses ``auto``, which picks
  ``compile`` from 4 CPUs per local rank.

Each run of a row uses its own fresh directories where the row says fresh, so the
median of 3 "cold" runs is 3 truly cold runs, and each warm run follows its own cold run.

Clock: each rank measures from ITS PROCESS START to the end of its first step (after
optimizer.step(), and a CUDA synchronize on cuda), so interpreter start, imports and
compile() count. Process start is /proc/self/stat field 22 (starttime, clock ticks since
boot, os.sysconf("SC_CLK_TCK") a second) against time.clock_gettime(CLOCK_BOOTTIME); the
resolution is one clock tick (10 ms). The divergent step is timed alone (all ranks meet at
a barrier first). A job's figure is the max over its ranks; the table shows the median
over runs of that figure.

Counters, per rank (torch 2.13):

* inductor compiles: ``counters["inductor"]["fxgraph_cache_miss"]``, FX graphs inductor
  lowered and compiled (forward and backward count separately); hits do not count.
* Dynamo traces: ``counters["stats"]["unique_graphs"]``, incremented in
  OutputGraph.compile_and_call_fx_graph once per FX graph Dynamo captured and installed.
  ``counters["frames"]["ok"]`` is not used for the table: it also counts frames Dynamo
  looked at and skipped (no tensors, skipfiles); it is kept in the JSON as frames_ok.
* recompiles: Dynamo 2.13 has no recompile counter. ``_compile`` sets
  ``recompile_reason`` in its CompilationMetrics exactly when the frame already had a
  cache entry (``is_recompilation``), so recompiles is the number of entries in
  ``torch._dynamo.utils.get_compilation_metrics()`` with a recompile_reason. dynamo_dist's
  own counters (``dynamo_dist.stats()``: compiles, forced_recompiles, ...) go in the JSON.
  It counts frames, not graphs: one batch-size change recompiles both DDP.forward and the
  wrapped model's forward (DDP's forward graph-breaks into it), so it shows 2 where the
  recompiled frames captured 1 new graph (Dynamo traces +1). The reasons are in the JSON.

At the end two ratios are printed, per run and then the median: dd-cold overhead /
plain-cold overhead (target <= 0.8x on CPU, <= 1.0x on GPU) and dd-warm (fresh hosts)
overhead / plain-warm (same hosts) overhead (target <= 0.5x). They are reported, never
asserted. ``--json PATH`` writes every rank's raw result of every run.

``--model gpt2`` trains transformers' GPT2LMHeadModel (2 layers, n_embd 128, 4 heads,
vocab 1024, random init, nothing downloaded) behind a small nn.Module that returns the
logits; it needs ``pip install dynamo_dist[bench]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
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
#: Output of a failed job that is printed.
TAIL_CHARS = 3000
GPT2_HINT = "--model gpt2 needs transformers: pip install dynamo_dist[bench]"


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


ROWS: list[Row] = [
    Row("uncompiled", "uncompiled (eager DDP)", "none", local="eager"),
    Row("plain-cold", "torch.compile, cold", "plain", local="plain"),
    Row(
        "plain-warm", "torch.compile, warm (same hosts)", "plain", local="plain", after="plain-cold"
    ),
    Row("shared-cold", "torch.compile + shared inductor dir, cold", "plain", shared_inductor="si"),
    Row(
        "shared-warm",
        "torch.compile + shared inductor dir, warm",
        "plain",
        shared_inductor="si",
        after="shared-cold",
    ),
    Row("dd-cold", "dynamo_dist.compile, cold", "dd", local="dd_cold", shared_cache="dd"),
    Row(
        "dd-warm",
        "dynamo_dist.compile, warm (fresh hosts)",
        "dd",
        local="dd_warm",
        shared_cache="dd",
        after="dd-cold",
    ),
    *(
        Row(
            f"dd-cold-{followers}",
            f"dynamo_dist.compile, cold, followers {followers}",
            "dd",
            local=f"dd_cold_{followers}",
            shared_cache=f"dd_{followers}",
            env={"DYNAMO_DIST_CACHE_FOLLOWERS": followers},
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


# --------------------------------------------------------------------------- worker


def process_age_s() -> float:
    """Seconds since this process started (/proc/self/stat field 22 vs CLOCK_BOOTTIME)."""
    stat = Path("/proc/self/stat").read_text()
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    start_ticks = int(fields[22 - 3])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


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
    step_fn: Any
    if mode == "dd":
        import dynamo_dist

        dd = dynamo_dist
        step_fn = dynamo_dist.compile(ddp, cache_dir=os.environ["BENCH_SHARED"])
    elif mode == "plain":
        step_fn = torch.compile(ddp)
    else:
        step_fn = ddp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    res: dict[str, Any] = {"rank": rank, "mode": mode, "setup_s": process_age_s()}
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

    profile_start()
    for step in range(cfg.steps):
        divergent = step == DIVERGENT_STEP
        batch = cfg.batch - SHORTER_BY if divergent and rank == world - 1 else cfg.batch
        x, y = synthetic_batch(step, rank, batch, cfg.seq, cfg.vocab, device)
        if divergent:
            sync()
            dist.barrier()
            profile_start()
        t0 = time.perf_counter()
        logits = step_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if step == 0:
            res["first_step_s"] = process_age_s()
            profile_save("first")
        if divergent:
            res["divergent_step_s"] = time.perf_counter() - t0
            profile_save("divergent")
    metrics = get_compilation_metrics()
    reasons = [m.recompile_reason for m in metrics if m.recompile_reason is not None]
    res.update(
        final_loss=float(loss.item()),
        inductor_compiles=int(counters["inductor"]["fxgraph_cache_miss"]),
        inductor_cache_hits=int(counters["inductor"]["fxgraph_cache_hit"]),
        dynamo_traces=int(counters["stats"]["unique_graphs"]),
        frames_ok=int(counters["frames"]["ok"]),
        aot_autograd={k: int(v) for k, v in counters["aot_autograd"].items()},
        recompiles=len(reasons),
        recompile_reasons=[r[:300] for r in reasons],
    )
    if dd is not None:
        res["dynamo_dist_stats"] = json.loads(json.dumps(dd.stats(), default=str))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    if dd is not None:
        dd.shutdown()
    dist.destroy_process_group()


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
    for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "BENCH_LOCAL_DIRS", "BENCH_SHARED"):
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
        vals = [float(j.ranks[r][key]) for j in results if j.ok and key in j.ranks[r]]
        out.append(fmt_count(median(vals)))
    return "/".join(out)


def overhead(run: dict[str, JobResult], name: str) -> float | None:
    base = run.get("uncompiled")
    job = run.get(name)
    if base is None or job is None:
        return None
    a, b = job.job("first_step_s"), base.job("first_step_s")
    return None if a is None or b is None else a - b


def ratio(run: dict[str, JobResult], num: str, den: str) -> float | None:
    a, b = overhead(run, num), overhead(run, den)
    if a is None or b is None or b <= 0:
        return None
    return a / b


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "gpt2"], default="tiny")
    p.add_argument("--runs", type=int, default=None, help="runs per row (default 3)")
    p.add_argument("--dim", type=int, default=None, help="TinyLM width (default 256)")
    p.add_argument("--layers", type=int, default=None, help="TinyLM layers (default 4)")
    p.add_argument("--heads", type=int, default=8, help="TinyLM heads")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 64)")
    p.add_argument("--vocab", type=int, default=None, help="default 128 (tiny), 1024 (gpt2)")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nproc", type=int, default=2, help="ranks (one host)")
    p.add_argument(
        "--rows", default=None, help=f"comma-separated subset of: {', '.join(ROW_BY_NAME)}"
    )
    p.add_argument("--quick", action="store_true", help="1 run, dim 64, 2 layers, seq 32")
    p.add_argument("--json", default=None, help="write all raw per-rank results here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--keep", action="store_true", help="keep the cache directories and logs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    if args.runs is None:
        args.runs = 1 if quick else 3
    if args.dim is None:
        args.dim = 64 if quick else 256
    if args.layers is None:
        args.layers = 2 if quick else 4
    if args.seq is None:
        args.seq = 32 if quick else 64
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


def main() -> None:
    cfg = parse_args()
    if cfg.worker:
        dirs = os.environ.get("BENCH_LOCAL_DIRS")
        if dirs:
            # Before torch is imported: inductor and triton read these at import/first use.
            local = json.loads(dirs)[int(os.environ["LOCAL_RANK"])]
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = local
            os.environ["TRITON_CACHE_DIR"] = os.path.join(local, "triton")
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
    print(
        f"{cfg.nproc} ranks on {cfg.device} ({os.cpu_count()} cores), gloo, {model}, "
        f"vocab {cfg.vocab}, seq {cfg.seq}, batch {cfg.batch}, {cfg.steps} AdamW steps; "
        f"divergent step {DIVERGENT_STEP} (0-based): rank {cfg.nproc - 1} batch "
        f"{cfg.batch - SHORTER_BY}; median of {cfg.runs} run(s); work dir {base}",
        flush=True,
    )
    # Page in torch and friends once, so the first job timed does not pay a cold disk.
    subprocess.run(
        [sys.executable, "-c", "import torch, torch._dynamo, torch._inductor, dynamo_dist"],
        check=False,
        capture_output=True,
    )
    runs: list[dict[str, JobResult]] = []
    for i in range(cfg.runs):
        run_dir = base / f"run{i}"
        run: dict[str, JobResult] = {}
        for row in rows:
            if row.after and not run[row.after].ok:
                print(f"run {i + 1}/{cfg.runs} {row.name}: skipped ({row.after} failed)")
                run[row.name] = JobResult(ok=False, error=f"skipped: {row.after} failed")
                continue
            res = run_job(row, run_dir, cfg)
            run[row.name] = res
            state = f"first step {fmt(res.job('first_step_s'))} s" if res.ok else "FAILED"
            print(f"run {i + 1}/{cfg.runs} {row.name}: {state} ({res.wall_s:.0f} s)", flush=True)
        runs.append(run)

    print()
    header = (
        f"{'configuration':42s} {'first s':>8s} {'overhd s':>8s} {'diverg s':>8s} "
        f"{'ind.compiles':>12s} {'dyn.traces':>10s} {'recompiles':>10s} {'ok':>4s}"
    )
    print(header)
    print("-" * len(header))
    rank_cols = "/".join(f"r{r}" for r in range(cfg.nproc))
    print(f"{'':42s} {'':>8s} {'':>8s} {'':>8s} {rank_cols:>12s} {rank_cols:>10s} {rank_cols:>10s}")
    summary: dict[str, Any] = {}
    for row in rows:
        results = [run[row.name] for run in runs]
        ok = [j for j in results if j.ok]
        n_ok = f"{len(ok)}/{len(results)}"
        if not ok:
            print(
                f"{row.label:42s} {'FAILED':>8s} {'':>8s} {'':>8s} {'':>12s} {'':>10s} "
                f"{'':>10s} {n_ok:>4s}"
            )
            summary[row.name] = {"failed": True}
            continue
        first = median([v for j in ok if (v := j.job("first_step_s")) is not None])
        div = median([v for j in ok if (v := j.job("divergent_step_s")) is not None])
        ovh = median([v for run in runs if (v := overhead(run, row.name)) is not None])
        comp = per_rank_median(ok, "inductor_compiles", cfg.nproc)
        traces = per_rank_median(ok, "dynamo_traces", cfg.nproc)
        recomp = per_rank_median(ok, "recompiles", cfg.nproc)
        ovh_s = "-" if row.name == "uncompiled" else fmt(ovh)
        print(
            f"{row.label:42s} {fmt(first):>8s} {ovh_s:>8s} {fmt(div):>8s} "
            f"{comp:>12s} {traces:>10s} {recomp:>10s} {n_ok:>4s}"
        )
        summary[row.name] = {
            "first_step_s": first,
            "overhead_s": ovh,
            "divergent_step_s": div,
            "inductor_compiles": comp,
            "dynamo_traces": traces,
            "recompiles": recomp,
            "ok_runs": len(ok),
        }

    cold_target = "<= 0.8x on CPU" if cfg.device == "cpu" else "<= 1.0x on GPU"
    print()
    for label, num, den, target in (
        ("dd-cold overhead / plain-cold overhead", "dd-cold", "plain-cold", cold_target),
        (
            "dd-warm (fresh hosts) overhead / plain-warm (same hosts) overhead",
            "dd-warm",
            "plain-warm",
            "<= 0.5x",
        ),
    ):
        per_run = [ratio(run, num, den) for run in runs]
        got = [v for v in per_run if v is not None]
        shown = ", ".join(fmt(v) for v in per_run)
        med = median(got)
        print(f"{label}: {fmt(med)}x (target {target}; per run: {shown})")
        summary[f"ratio {num}/{den}"] = {"median": med, "per_run": per_run, "target": target}

    if cfg.json:
        doc = {
            "config": {k: v for k, v in vars(cfg).items() if k not in ("worker", "mode")},
            "divergent_step": DIVERGENT_STEP,
            "shorter_by": SHORTER_BY,
            "cpu_count": os.cpu_count(),
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
