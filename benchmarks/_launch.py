"""How the benchmarks start a job: torchrun agents on this machine, one per emulated host.

Imported by the benchmark scripts (run as ``python benchmarks/X.py``, so this folder is
on ``sys.path``): one place for the command line and the port, so every benchmark starts
its ranks the way users do.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port free on the loopback interface now (the agents' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_commands(
    hosts: int, nproc: int, script: Sequence[str], port: int | None = None
) -> list[list[str]]:
    """One torchrun command per emulated host running ``script`` (its path and arguments).

    One host: ``--standalone``. Several: ``--nnodes`` agents meeting at ``port`` on
    127.0.0.1, each started separately, as agents on separate hosts would be. No restarts:
    a benchmark measures one run, and a failed rank ends it.
    """
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if hosts == 1:
        return [[*base, "--standalone", "--max-restarts=0", *script]]
    port = free_port() if port is None else port
    return [
        [
            *base,
            f"--nnodes={hosts}",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--max-restarts=0",
            *script,
        ]
        for node in range(hosts)
    ]
