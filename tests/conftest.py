"""Shared fixtures: launching real ranks with torchrun (gloo over loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers.py"


@dataclass
class RankRun:
    returncode: int
    output: str
    ranks: dict[int, dict[str, Any]]

    def rank(self, r: int) -> dict[str, Any]:
        assert r in self.ranks, f"rank {r} wrote no result; output:\n{self.output[-4000:]}"
        return self.ranks[r]


def run_command(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s; output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def torchrun(
    script: Path | str,
    *args: str,
    nproc: int = 2,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    torchrun_args: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = launcher or [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *cmd,
        *(torchrun_args or []),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        str(script),
        *args,
    ]
    return run_command(cmd, timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_hosts(
    script: Path | str,
    *args: str,
    nproc: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun agents on this machine, as if on two hosts (static rendezvous)."""
    port = free_port()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    procs = []
    for node in range(2):
        cmd = [
            *(launcher or [sys.executable, "-m", "torch.distributed.run"]),
            "--nnodes=2",
            f"--node-rank={node}",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--max-restarts=0",
            str(script),
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=full_env,
                cwd=ROOT,
                start_new_session=True,
            )
        )
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            out, _ = p.communicate()
            pytest.fail(f"two-host run did not finish in {timeout}s; output:\n{out[-4000:]}")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    return results


@pytest.fixture
def run_ranks(tmp_path: Path):
    """run_ranks(scenario, nproc=2, timeout=180, env=None) -> RankRun."""

    def run(
        scenario: str,
        nproc: int = 2,
        timeout: float = 180,
        env: dict[str, str] | None = None,
        torchrun_args: list[str] | None = None,
        hosts: int = 1,
    ) -> RankRun:
        outdir = tmp_path / scenario
        outdir.mkdir(exist_ok=True)
        if hosts == 2:
            procs = torchrun_two_hosts(
                WORKERS, scenario, str(outdir), nproc=nproc, timeout=timeout, env=env
            )
            proc = subprocess.CompletedProcess(
                [], max(p.returncode for p in procs), "\n".join(p.stdout for p in procs), None
            )
        else:
            proc = torchrun(
                WORKERS,
                scenario,
                str(outdir),
                nproc=nproc,
                timeout=timeout,
                env=env,
                torchrun_args=torchrun_args,
            )
        ranks = {}
        for f in outdir.glob("rank*.json"):
            ranks[int(f.stem[4:])] = json.loads(f.read_text())
        return RankRun(proc.returncode, proc.stdout, ranks)

    return run
