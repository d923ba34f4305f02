"""The one runner for multi-process tests, and the rank-side entry of every rank program.

Test side: :func:`launch` runs a rank program of a test module on ``nproc`` ranks and
collects what each rank wrote to ``OUTDIR/rank<R>.json``. On one host the ranks fork
from a process that imported torch once (:func:`forked`: most of a small launch's cost
was three interpreters importing torch); two simulated hosts, a launcher command,
torchrun flags, or an environment read at import run ``python -m torch.distributed.run``
(one agent, or two agents as two hosts). Every launch runs in its own process
group; on timeout the whole group is killed and the test fails with the output
tail. Launching from a test that lacks the ``multiproc`` marker fails that test,
so the fast tier (``pytest -m "not multiproc"``) can never grow a torchrun.

Rank side: a test module ends with ``if __name__ == "__main__": ranks.main(globals())``;
``torchrun tests/test_x.py PROGRAM OUTDIR [ARGS...]`` then calls ``PROGRAM(rank,
world, *ARGS)`` from that module on every rank. Rank programs are plain functions
next to the test that asserts on them; scenario parameters are their arguments.

This is not a conftest: tests import it as ``ranks`` (pytest puts ``tests/`` on
``sys.path``), and torchrun finds it next to the script it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# The pytest item being run, set by conftest.py before its fixtures are set up, so
# that launches from module-scoped fixtures are checked against the first test too.
current_item: Any = None


# -- test side ---------------------------------------------------------------------
@dataclass
class RankRun:
    """What one launch left behind: exit status, combined output, each rank's result."""

    returncode: int
    output: str
    ranks: dict[int, dict[str, Any]]

    def rank(self, r: int) -> dict[str, Any]:
        assert r in self.ranks, f"rank {r} wrote no result; output:\n{self.output[-4000:]}"
        return self.ranks[r]


def _require_multiproc() -> None:
    """Fail the calling test unless it is marked ``multiproc`` (keeps the fast tier fast)."""
    import pytest

    item = current_item
    if item is not None and item.get_closest_marker("multiproc") is None:
        pytest.fail(f"{item.nodeid} spawns processes but is not marked multiproc", pytrace=False)


def _env(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def _spawn(cmd: list[str], env: dict[str, str] | None, cwd: Path | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(env),
        cwd=cwd or ROOT,
        start_new_session=True,  # its own process group, killed as a whole on timeout
    )


def _collect(
    procs: list[subprocess.Popen[str]], timeout: float, what: str
) -> list[subprocess.CompletedProcess[str]]:
    """Wait for all of ``procs`` under one deadline; on timeout kill every group and fail."""
    import pytest

    deadline = time.monotonic() + timeout
    done = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            out, _ = p.communicate()
            pytest.fail(f"{what} did not finish in {timeout}s; output:\n{out[-4000:]}")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    return done


def run_command(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    _require_multiproc()
    return _collect([_spawn(cmd, env, cwd)], timeout, " ".join(cmd))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    script: Path | str,
    *args: str,
    nproc: int = 2,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    torchrun_args: list[str] | None = None,
    hosts: int = 1,
) -> subprocess.CompletedProcess[str]:
    """``script`` on ``nproc`` ranks per host; ``hosts=2`` starts two agents (static rendezvous).

    With two hosts the result's return code is the worst of the two agents' and
    its output is both agents' output, one after the other.
    """
    _require_multiproc()
    base = [*(launcher or [sys.executable, "-m", "torch.distributed.run"]), *(torchrun_args or [])]
    tail = [f"--nproc-per-node={nproc}", "--max-restarts=0", str(script), *args]
    if hosts == 1:
        cmds = [[*base, "--standalone", *tail]]
    else:
        port = free_port()
        cmds = [
            [
                *base,
                f"--nnodes={hosts}",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                *tail,
            ]
            for node in range(hosts)
        ]
    procs = [_spawn(cmd, env, None) for cmd in cmds]
    done = _collect(procs, timeout, f"{Path(script).name} {' '.join(args)} on {hosts} host(s)")
    return subprocess.CompletedProcess(
        cmds, max(p.returncode for p in done), "\n".join(p.stdout for p in done), None
    )


def _job_store(nproc: int) -> tuple[Any, int]:
    """The job's store, hosted by this process as torchrun's agent hosts it: it outlives
    any rank (ranks join as clients through ``TORCHELASTIC_USE_AGENT_STORE``)."""
    import torch.distributed as dist

    port = free_port()
    return dist.TCPStore("127.0.0.1", port, nproc, is_master=True, wait_for_workers=False), port


def _rank_env(port: int, nproc: int, rank: int, how: str, env: dict[str, str] | None) -> dict:
    """What torchrun's agent puts in rank ``rank``'s environment on one host, then ``env``."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(nproc),
        "ROLE_NAME": "default",
        "GROUP_RANK": "0",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": f"{how}-{port}",
        **(env or {}),
    }


def agentless(
    script: Path | str,
    *args: str,
    nproc: int = 2,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``script`` on ``nproc`` plain processes, with no torchrun agent to tear them down.

    torchrun kills every rank as soon as its monitor sees one fail, so a test in which a
    rank dies on purpose would race the agent's monitor interval. Here this process hosts
    the job's store, as torchrun's agent does (ranks join it as clients through
    ``TORCHELASTIC_USE_AGENT_STORE``), so the store outlives any rank and the survivors
    run to their end.
    """

    _require_multiproc()
    server, port = _job_store(nproc)
    cmds = [[sys.executable, str(script), *args] for _ in range(nproc)]
    procs = [
        _spawn(cmd, _rank_env(port, nproc, r, "agentless", env), None) for r, cmd in enumerate(cmds)
    ]
    try:
        done = _collect(procs, timeout, f"{Path(script).name} {' '.join(args)} (no agent)")
    finally:
        del server
    return subprocess.CompletedProcess(
        cmds,
        max(abs(p.returncode) for p in done),
        "\n".join(f"[process of rank {r}]\n{p.stdout}" for r, p in enumerate(done)),
        None,
    )


#: Environment a process reads while it starts or imports torch (the torch.compile switch's
#: import hook, torch's logging and configs): a launch that sets one needs a fresh
#: interpreter. The others are read at run time, so a forked rank honours them.
_READ_AT_IMPORT = ("PYTHON", "TORCH", "PYTORCH", "DYNAMO_DIST_ALL_COMPILES")
_READ_AT_RUN_TIME = {"PYTHONUNBUFFERED", "TORCHINDUCTOR_CACHE_DIR"}

#: What a forked rank's parent has imported already: the seconds of CPU each rank of each
#: launch would otherwise spend importing them anew (three interpreters per 2-rank launch).
#: Not dynamo_dist: it reads its secret from the environment at import, and costs little.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo"]


def _forkable(env: dict[str, str] | None) -> bool:
    return not any(k.startswith(_READ_AT_IMPORT) and k not in _READ_AT_RUN_TIME for k in env or {})


def _forkserver() -> Any:
    """This test process's fork server: one interpreter that imported torch, Dynamo and
    dynamo_dist once, from which every forked rank starts (``multiprocessing`` starts it on
    first use and it exits with this process)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _forked_rank(script: str, argv: list[str], env: dict[str, str], log: str) -> None:
    """A rank, in a child of the fork server: ``python SCRIPT ARGV`` as torchrun would start
    it, minus the interpreter start and the imports. Its own session, so a timeout kills
    it and anything it started as one group."""
    import io
    import runpy

    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Unbuffered, as PYTHONUNBUFFERED makes a fresh rank: a rank killed on timeout
    # still shows its last lines.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "wb", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "wb", closefd=False), write_through=True)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR as this rank's environment says
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


def forked(
    script: Path | str,
    *args: str,
    nproc: int = 2,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``script`` on ``nproc`` ranks forked from a process that imported torch already.

    The ranks see the environment torchrun gives its workers on one host, and join a store
    this process hosts (as :func:`agentless`), so a rank that dies leaves the others to run
    to their end. Nearly every launch of the suite runs this way: starting three fresh
    interpreters that each import torch cost more CPU than most rank programs themselves.
    """

    _require_multiproc()
    server, port = _job_store(nproc)
    ctx = _forkserver()
    logs = tempfile.mkdtemp(prefix="forked-")
    procs = []
    for r in range(nproc):
        rank_env = _env(_rank_env(port, nproc, r, "forked", env))
        log = os.path.join(logs, f"rank{r}.log")
        p = ctx.Process(target=_forked_rank, args=(str(script), list(args), rank_env, log))
        p.start()
        procs.append((p, log))
    what = f"{Path(script).name} {' '.join(args)} (forked)"
    deadline = time.monotonic() + timeout
    try:
        for p, _ in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        late = [p for p, _ in procs if p.exitcode is None]
        for p in late:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.join()
        output = "\n".join(
            f"[process of rank {r}]\n{Path(log).read_text(errors='replace')}"
            for r, (_, log) in enumerate(procs)
        )
    finally:
        del server
        for _, log in procs:
            with contextlib.suppress(OSError):
                os.unlink(log)
        with contextlib.suppress(OSError):
            os.rmdir(logs)
    if late:
        import pytest

        pytest.fail(f"{what} did not finish in {timeout}s; output:\n{output[-4000:]}")
    code = max(abs(p.exitcode or 0) for p, _ in procs)
    return subprocess.CompletedProcess([what], code, output, None)


def read_results(outdir: Path, proc: subprocess.CompletedProcess[str]) -> RankRun:
    ranks = {int(f.stem[4:]): json.loads(f.read_text()) for f in outdir.glob("rank*.json")}
    return RankRun(proc.returncode, proc.stdout, ranks)


def launch(
    module: Path | str,
    program: str,
    *args: Any,
    tmp: Path,
    nproc: int = 2,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    torchrun_args: list[str] | None = None,
    hosts: int = 1,
    launcher: list[str] | None = None,
    agent: bool = True,
) -> RankRun:
    """Run rank program ``program`` of test module ``module`` (a path) and collect results.

    Results go to a fresh directory under ``tmp``, so a test may launch several times.
    ``agent=False`` runs the ranks without torchrun (see :func:`agentless`), for
    programs in which a rank dies on purpose.
    """
    _require_multiproc()
    outdir = Path(tempfile.mkdtemp(prefix=f"{program}-", dir=tmp))
    argv = [program, str(outdir), *(str(a) for a in args)]
    if hosts == 1 and launcher is None and torchrun_args is None and _forkable(env):
        proc = forked(module, *argv, nproc=nproc, timeout=timeout, env=env)
    elif agent:
        proc = torchrun(
            module,
            *argv,
            nproc=nproc,
            timeout=timeout,
            env=env,
            launcher=launcher,
            torchrun_args=torchrun_args,
            hosts=hosts,
        )
    else:
        assert hosts == 1 and launcher is None and torchrun_args is None
        proc = agentless(module, *argv, nproc=nproc, timeout=timeout, env=env)
    return read_results(outdir, proc)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``dynamo-dist cache ARGS`` run in this process, as (returncode, stdout, stderr).

    A subprocess per call would import torch anew (seconds each) in the fast tier; the
    entry point itself runs as ``python -m dynamo_dist`` in tests/test_launcher.py.
    """
    import io
    from unittest import mock

    from dynamo_dist.tools import cli as dd_cli

    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, env or {}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            dd_cli.main(["cache", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
            if isinstance(e.code, str):
                err.write(e.code + "\n")
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# -- rank side ---------------------------------------------------------------------
class CountingBackend:
    """Counts graphs and records, per graph, whether any input is symbolic (dynamic)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.dynamic: list[bool] = []

    def __call__(self, gm: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        import torch

        self.graphs += 1

        def symbolic(a: Any) -> bool:
            if isinstance(a, torch.SymInt):
                return True
            return isinstance(a, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in a.shape)

        self.dynamic.append(any(symbolic(a) for a in example_inputs))
        return gm.forward


def result(cb: CountingBackend, ok: bool = True, **extra: Any) -> dict[str, Any]:
    """A rank's result: its compile counts and dynamo_dist's stats, plus ``extra``."""
    import dynamo_dist

    return {
        "graphs": cb.graphs,
        "dynamic": cb.dynamic,
        "ok": ok,
        "stats": dynamo_dist.stats(),
        **extra,
    }


def error_result(cb: CountingBackend, e: BaseException, **extra: Any) -> dict[str, Any]:
    """A rank's result when it caught ``e``: the test asserts on the error's type and text."""
    return result(cb, False, error=type(e).__name__, message=str(e), **extra)


def store() -> Any:
    """The job's key-value store, for handshakes between ranks."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def signal_peers(key: str) -> None:
    """Tell the other ranks that ``key`` happened (see :func:`wait_for_peer`)."""
    store().set(f"test/{key}", "1")


def wait_for_peer(key: str, timeout: float = 120) -> None:
    """Block until some rank called ``signal_peers(key)``; raises after ``timeout``."""
    store().wait([f"test/{key}"], timedelta(seconds=timeout))


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until it holds; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)


def main(namespace: dict[str, Any]) -> None:
    """Rank-side entry: ``argv = PROGRAM OUTDIR [ARGS...]``; runs ``namespace[PROGRAM]``.

    Writes ``OUTDIR/rank<R>.json``: the program's result, or the error it raised.
    """
    import torch.distributed as dist

    # A suite started in the background (``nohup``, ``&``) hands its processes SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: tests interrupt
    # ranks on purpose, so ranks take Python's default back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    name, outdir, *args = sys.argv[1:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        out = namespace[name](rank, world, *args)
    except BaseException as e:
        out = {
            "ok": False,
            "error": type(e).__name__,
            "message": str(e),
            "traceback": traceback.format_exc(),
        }
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh, default=str)
    # Exit without tearing the group down collectively: some programs leave
    # peers dead or out of step on purpose.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shm_segment() -> dict[str, Any]:
    """This rank's pid and the name of its host's shared-memory segment (None without shm)."""
    from dynamo_dist.dist import runtime

    rt = runtime.current()
    shm = getattr(world_transport(rt), "shm", None) if rt is not None else None
    return {"pid": os.getpid(), "segment": shm.name if shm is not None else None}


def members(room: Path) -> Any:
    """The files of a test's hand-made room, as ``DiskStore.put`` takes them.

    The store publishes only files this process recorded as written (``_cache_rooms``),
    so a test records its room first, as a leader records its clean room.
    """
    from dynamo_dist.cache.rooms import ROOMS

    ROOMS.record_room(room)
    return ROOMS.members(room)


def world_transport(rt: Any) -> Any:
    """The runtime's whole-world transport if it has one, else its first group's."""
    world = tuple(range(rt.world_size))
    if world in rt.groups:
        return rt.groups[world].transport
    return next((g.transport for g in rt.groups.values() if g.transport), None)


@contextlib.contextmanager
def hook_installed(hook: Any) -> Iterator[Any]:
    """``hook`` installed as Dynamo's guard-complete hook for the block, then restored."""
    from dynamo_dist.dynamo import hook as dynamo_hook

    prev = dynamo_hook.install(hook)
    try:
        yield hook
    finally:
        dynamo_hook.uninstall(hook, prev)
