"""dynamo-dist-run (torchrun pass-through, settings export, fail-fast config) and the job report."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import ranks
import torch
from ranks import ROOT, CountingBackend, result, run_command

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

HERE = __file__
LAUNCHER = [sys.executable, "-m", "dynamo_dist.tools.launch"]


def _f(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0) + 1


# -- rank programs ---------------------------------------------------------------------
def echo_config(rank: int, world: int) -> dict[str, Any]:
    """What the launcher handed this rank: resolved settings and DYNAMO_DIST_* variables."""
    from dynamo_dist import _config

    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    cf(torch.randn(4, 3))
    cfg = _config.resolve()
    return result(
        cb,
        True,
        policy=cfg.policy,
        timeout=cfg.timeout,
        report=cfg.report,
        cache_dir=cfg.cache_dir,
        world=world,
        env={k: v for k, v in os.environ.items() if k.startswith("DYNAMO_DIST_")},
    )


def report_run(rank: int, world: int) -> dict[str, Any]:
    """Some forced recompiles, then shutdown: rank 0 writes the job report."""
    cb = CountingBackend()
    cf = dynamo_dist.compile(_f, backend=cb)
    for step in range(8):
        n = 5 if (rank == 1 and step in (3, 6)) else 4
        cf(torch.randn(n, 3))
    final = dynamo_dist.stats()
    dynamo_dist.shutdown()  # publishes this rank's stats; rank 0 writes the report
    return result(cb, True, final=final)


# -- tests -----------------------------------------------------------------------------


def test_launcher_exports_settings_and_passes_torchrun_flags(tmp_path):
    run = ranks.launch(
        HERE,
        "echo_config",
        tmp=tmp_path,
        launcher=[
            *LAUNCHER,
            "--policy",
            "strict",
            "--timeout",
            "77",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        torchrun_args=["--monitor-interval", "0.5"],
    )
    for r in (0, 1):
        res = run.rank(r)
        assert res["world"] == 2
        assert res["policy"] == "strict" and res["timeout"] == 77.0
        assert res["cache_dir"] == str(tmp_path / "cache")
        assert res["stats"]["policy"] == "strict"
        assert res["env"]["DYNAMO_DIST_POLICY"] == "strict"


def test_launcher_two_agents_multi_node(tmp_path):
    run = ranks.launch(
        HERE, "echo_config", tmp=tmp_path, hosts=2, launcher=[*LAUNCHER, "--policy", "warn"]
    )
    assert run.returncode == 0, run.output[-3000:]  # the worse of the two agents
    assert sorted(run.ranks) == [0, 1, 2, 3]
    assert {r["policy"] for r in run.ranks.values()} == {"warn"}
    assert {r["stats"]["transport"] for r in run.ranks.values()} == {"shm+native"}


def test_precedence_file_env_arguments(tmp_path):
    cfg = tmp_path / "profile.toml"
    cfg.write_text('policy = "warn"\ntimeout = 50\nreport = "from-file.json"\n')
    res = ranks.launch(
        HERE,
        "echo_config",
        tmp=tmp_path,
        launcher=[*LAUNCHER, "--config", str(cfg), "--policy", "strict"],
        env={"DYNAMO_DIST_TIMEOUT": "40"},
    ).rank(1)
    assert res["policy"] == "strict"  # argument over file
    assert res["timeout"] == 40.0  # environment over file
    assert res["report"] == "from-file.json"  # file over default


@pytest.mark.parametrize(
    ("profile", "env", "words"),
    [
        ('polcy = "sync"\n', {}, ["unknown key", "'polcy'", "known keys"]),
        ('timeout = "soon"\n', {}, ["timeout", "'soon'", "positive number"]),
        ('transport = "rdma"\n', {}, ["transport", "'rdma'", "auto, shm, gloo"]),
        ("timeout = [1, 2]\n", {}, ["timeout", "positive number"]),
        (
            None,
            {"DYNAMO_DIST_POLICY": "loud"},
            ["DYNAMO_DIST_POLICY", "'loud'", "sync, strict, warn, off"],
        ),
        ("missing", {}, ["does not exist"]),
        (
            None,
            {"DYNAMO_DIST_CACHE_SECRET": "dd2024!"},
            ["DYNAMO_DIST_CACHE_SECRET", "too weak", "dynamo-dist cache secret PATH"],
        ),
    ],
)
def test_bad_config_fails_before_any_worker_starts(tmp_path, profile, env, words):
    marker = tmp_path / "worker-started"
    script = tmp_path / "script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    args = [*LAUNCHER]
    if profile == "missing":
        args += ["--config", str(tmp_path / "nope.toml")]
    elif profile is not None:
        (tmp_path / "bad.toml").write_text(profile)
        args += ["--config", str(tmp_path / "bad.toml")]
    proc = run_command(
        [*args, "--standalone", "--nproc-per-node=2", str(script)], timeout=120, env=env
    )
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert not marker.exists()
    first = proc.stdout.strip().splitlines()[-1]
    assert first.startswith("dynamo-dist-run: ")
    if profile not in (None, "missing"):
        assert "bad.toml" in first
    for w in words:
        assert w in first, first


def test_report_matches_what_ranks_counted(tmp_path):
    report = tmp_path / "report.json"
    run = ranks.launch(HERE, "report_run", tmp=tmp_path, env={"DYNAMO_DIST_REPORT": str(report)})
    saved = json.loads(report.read_text())
    assert saved["missing"] == []
    for r in (0, 1):
        counted = run.rank(r)["final"]
        reported = saved["ranks"][str(r)]
        for key in (
            "exchanges",
            "forced_recompiles",
            "local_misses",
            "compiles",
            "divergences",
            "evaluations",
            "transport",
        ):
            assert reported[key] == counted[key], key
    assert saved["ranks"]["1"]["local_misses"] >= 1
    assert "dynamo_dist job report (2 ranks)" in run.output
    cli = run_command([sys.executable, "-m", "dynamo_dist", "report", str(report)], timeout=60)
    assert cli.returncode == 0 and "hit rate" in cli.stdout and "forced" in cli.stdout


def test_config_reference_in_docs_is_generated():
    cli = run_command([sys.executable, "-m", "dynamo_dist", "config"], timeout=60)
    assert cli.returncode == 0
    docs = (ROOT / "docs" / "configuration.md").read_text()
    assert cli.stdout.strip() in docs, "regenerate docs/configuration.md: dynamo-dist config"


# -- issue 26, item 4: the secret never in a worker's environment ----------------------
SECRET_ENV = "DYNAMO_DIST_CACHE_SECRET"
SECRET_FILE_ENV = "DYNAMO_DIST_CACHE_SECRET_FILE"

# A worker that reports what its own process started with (argv: OUT EXPECTED [fail|wait]);
# the secret itself is read from a file, so it is in no process's argv.
_SECRET_WORKER = """
import json, os, stat, sys, time

out, expected = sys.argv[1], open(sys.argv[2]).read().strip()
with open("/proc/self/environ", "rb") as fh:
    started_with = fh.read()
names = [kv.split(b"=", 1)[0].decode() for kv in started_with.split(b"\\0") if kv]
import dynamo_dist
from dynamo_dist.cache import secret as cache_secret

path = os.environ.get("DYNAMO_DIST_CACHE_SECRET_FILE")
res = {
    "secret_bytes_in_environ": expected.encode() in started_with,
    "names": [n for n in names if n.startswith("DYNAMO_DIST_CACHE_SECRET")],
    "file": path,
    "file_mode": stat.S_IMODE(os.lstat(path).st_mode) if path else None,
    "dir_mode": stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode) if path else None,
    "works": cache_secret.cache_secret() == expected,
}
with open(out + ".tmp", "w") as fh:
    json.dump(res, fh)
os.rename(out + ".tmp", out)
if sys.argv[3:] == ["fail"]:
    sys.exit(3)
if sys.argv[3:] == ["wait"]:
    time.sleep(300)
"""


def _secret_worker(tmp_path: Any, secret: str) -> tuple[Any, Any]:
    script = tmp_path / "worker.py"
    script.write_text(_SECRET_WORKER)
    expected = tmp_path / "expected"
    expected.write_text(secret)
    return script, expected


def _check_worker(res: dict[str, Any]) -> str:
    assert not res["secret_bytes_in_environ"], "the secret is in the worker's /proc/self/environ"
    assert res["names"] == [SECRET_FILE_ENV], res
    assert res["works"], "the worker could not read the secret from its file"
    assert res["file_mode"] == 0o600 and res["dir_mode"] == 0o700, res
    return str(res["file"])


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_launcher_hands_workers_a_secret_file_not_the_variable(tmp_path, outcome):
    import os.path

    secret = "launcher-" + os.urandom(16).hex()
    script, expected = _secret_worker(tmp_path, secret)
    out = tmp_path / "worker.json"
    proc = run_command(
        [
            *LAUNCHER,
            "--standalone",
            "--nproc-per-node=1",
            "--max-restarts=0",
            str(script),
            str(out),
            str(expected),
            *(["fail"] if outcome == "fail" else []),
        ],
        timeout=180,
        env={SECRET_ENV: secret},
    )
    assert (proc.returncode == 0) == (outcome == "ok"), proc.stdout[-4000:]
    path = _check_worker(json.loads(out.read_text()))
    # Gone when the launcher is, whether the job succeeded or failed.
    assert not os.path.lexists(path) and not os.path.lexists(os.path.dirname(path)), path
    assert secret not in proc.stdout
    # The launcher's own environment still holds the variable: it says so, once.
    assert proc.stdout.count("stays readable in /proc/") == 1, proc.stdout[-4000:]


def test_launcher_removes_the_secret_file_when_terminated(tmp_path):
    import os.path
    import signal
    import time

    from ranks import _spawn

    secret = "terminated-" + os.urandom(16).hex()
    script, expected = _secret_worker(tmp_path, secret)
    out = tmp_path / "worker.json"
    cmd = [*LAUNCHER, "--standalone", "--nproc-per-node=1", "--max-restarts=0"]
    args = [str(script), str(out), str(expected), "wait"]
    launcher = _spawn([*cmd, *args], {SECRET_ENV: secret}, None)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out.exists(), "the worker never started"
        path = _check_worker(json.loads(out.read_text()))
        assert os.path.exists(path)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode != 0
    assert not os.path.lexists(path) and not os.path.lexists(os.path.dirname(path)), output[-4000:]


def test_launcher_refuses_a_temp_dir_others_can_write(tmp_path):
    """The workers' secret file goes only where no other user could replace it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = tmp_path / "worker-started"
    script = tmp_path / "script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    secret = "tmpdir-" + os.urandom(16).hex()
    proc = run_command(
        [*LAUNCHER, "--standalone", "--nproc-per-node=1", str(script)],
        timeout=120,
        env={SECRET_ENV: secret, "TMPDIR": str(shared), "XDG_RUNTIME_DIR": ""},
    )
    assert proc.returncode == 2, proc.stdout[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("dynamo-dist-run: ") and str(shared) in last and "TMPDIR" in last
    assert not marker.exists() and not list(shared.iterdir())
    assert secret not in proc.stdout


if __name__ == "__main__":
    ranks.main(globals())
