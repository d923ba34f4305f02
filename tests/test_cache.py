"""Shared precompile cache on real ranks with inductor: cold, warm, and what can go wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.inductor, pytest.mark.timeout(400)]


def _job(run_ranks, cache: Path, local: Path, env: dict[str, str] | None = None, **kw):
    full = {
        "DYNAMO_DIST_CACHE_DIR": str(cache),
        "DD_LOCAL_BASE": str(local),
        "DYNAMO_DIST_LOG": "INFO",
        **(env or {}),
    }
    return run_ranks(kw.pop("scenario", "cache_job"), env=full, timeout=300, **kw)


def _stats(run, r: int) -> dict:
    res = run.rank(r)
    assert res["ok"], res
    return res["stats"]


def _entries(cache: Path) -> list[Path]:
    # entries/<namespace>/<kk>/<key>: the namespace is "unsigned" or the secret's key id.
    return sorted(p for p in (cache / "entries").glob("*/*/*") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def cold(tmp_path_factory, request):
    """One cold 2-rank job; tests copy its cache directory and mutate the copy."""
    from conftest import WORKERS, RankRun, torchrun

    base = tmp_path_factory.mktemp("cold")
    cache, out = base / "cache", base / "out"
    out.mkdir()
    proc = torchrun(
        WORKERS,
        "cache_job",
        str(out),
        env={
            "DYNAMO_DIST_CACHE_DIR": str(cache),
            "DD_LOCAL_BASE": str(base / "local"),
            "DYNAMO_DIST_LOG": "INFO",
        },
        timeout=300,
    )
    ranks = {int(f.stem[4:]): json.loads(f.read_text()) for f in out.glob("rank*.json")}
    return cache, RankRun(proc.returncode, proc.stdout, ranks)


def test_cold_start_one_rank_compiles(cold):
    cache, run = cold
    s = [_stats(run, r) for r in (0, 1)]
    assert sum(x["cache_publishes"] for x in s) == 1
    leader = 0 if s[0]["cache_publishes"] else 1
    follower = 1 - leader
    assert s[leader]["inductor_compiles"] > 0
    assert s[follower]["inductor_compiles"] == 0, "the follower must not run inductor"
    assert s[follower]["cache_loads"] == 1
    assert len(_entries(cache)) == 1


def test_warm_restart_compiles_nothing(cold, run_ranks, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    run = _job(run_ranks, cache, tmp_path / "fresh-local")
    for r in (0, 1):
        s = _stats(run, r)
        assert s["inductor_compiles"] == 0
        assert s["cache_loads"] == 1 and s["cache_publishes"] == 0
        assert s["compile_seconds_saved"] > 0


def test_recompile_with_rank_specific_sizes_shares_one_entry(run_ranks, tmp_path):
    cache = tmp_path / "cache"
    run = _job(run_ranks, cache, tmp_path / "local", scenario="cache_recompile")
    s = [_stats(run, r) for r in (0, 1)]
    # Two graphs (static, then dynamic after the forced recompile), each compiled once.
    assert sum(x["cache_publishes"] for x in s) == 2
    assert sum(x["cache_loads"] for x in s) == 2
    assert len(_entries(cache)) == 2


def _copy_of_cold(cold, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(cold[0], cache)
    return cache


def _mutate_artifact(entry: Path, fix_checksum: bool) -> None:
    art = entry / "artifact.tar"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    if fix_checksum:  # what an attacker without the secret can do
        man = json.loads((entry / "manifest.json").read_text())
        man["files"]["artifact.tar"]["sha256"] = hashlib.sha256(data).hexdigest()
        (entry / "manifest.json").write_text(json.dumps(man))


def _assert_refused_and_recompiled(run, cache: Path, words: list[str]) -> None:
    s = [_stats(run, r) for r in (0, 1)]
    assert sum(x["cache_refused"] for x in s) >= 1
    assert sum(x["cache_publishes"] for x in s) == 1  # recompiled and republished
    refused = list((cache / "refused").glob("*/*"))
    assert refused, "the bad entry must be moved aside"
    reason = (refused[0] / "REFUSED").read_text()
    for w in words:
        assert w in reason or w in run.output, (w, reason)
    assert len(_entries(cache)) == 1


def test_corrupted_entry_is_refused_and_recompiled(cold, run_ranks, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    _mutate_artifact(_entries(cache)[0], fix_checksum=False)
    run = _job(run_ranks, cache, tmp_path / "local")
    _assert_refused_and_recompiled(run, cache, ["sha256"])


def test_truncated_entry_is_refused(cold, run_ranks, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    art = _entries(cache)[0] / "artifact.tar"
    art.write_bytes(art.read_bytes()[:100])
    run = _job(run_ranks, cache, tmp_path / "local")
    _assert_refused_and_recompiled(run, cache, ["truncated"])


def test_version_skew_is_refused(cold, run_ranks, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    man_path = _entries(cache)[0] / "manifest.json"
    man = json.loads(man_path.read_text())
    man["factors"]["torch"] = "1.0.0"
    man_path.write_text(json.dumps(man))
    run = _job(run_ranks, cache, tmp_path / "local")
    _assert_refused_and_recompiled(run, cache, ["version skew", "torch"])


def test_tampered_entry_with_secret_is_refused(run_ranks, tmp_path):
    cache = tmp_path / "cache"
    env = {"DYNAMO_DIST_CACHE_SECRET": "s3cret"}
    first = _job(run_ranks, cache, tmp_path / "a", env=env)
    assert sum(_stats(first, r)["cache_publishes"] for r in (0, 1)) == 1
    entry = _entries(cache)[0]
    assert "signature" in json.loads((entry / "manifest.json").read_text())
    _mutate_artifact(entry, fix_checksum=True)
    run = _job(run_ranks, cache, tmp_path / "b", env=env)
    _assert_refused_and_recompiled(run, cache, ["HMAC"])


def test_unsigned_entry_is_never_read_when_a_secret_is_set(cold, run_ranks, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    unsigned = _entries(cache)
    run = _job(run_ranks, cache, tmp_path / "local", env={"DYNAMO_DIST_CACHE_SECRET": "k"})
    s = [_stats(run, r) for r in (0, 1)]
    # Signed entries live in the secret's own namespace: the unsigned one is neither
    # loaded nor refused (a job without the secret may still use it).
    assert sum(x["cache_loads"] for x in s) == 1 and sum(x["cache_refused"] for x in s) == 0
    assert sum(x["cache_publishes"] for x in s) == 1
    assert all(p.exists() for p in unsigned) and len(_entries(cache)) == 2


def test_unusable_directory_warns_and_trains_on(run_ranks, tmp_path):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("I am a file")
    run = _job(run_ranks, not_a_dir, tmp_path / "local")
    for r in (0, 1):
        s = _stats(run, r)
        assert s["cache_enabled"] is False
    assert "is unusable" in run.output and str(not_a_dir) in run.output
    assert run.output.count("is unusable") == 2  # once per rank


def test_dead_leader_follower_takes_over(run_ranks, tmp_path):
    cache = tmp_path / "cache"
    run = _job(
        run_ranks,
        cache,
        tmp_path / "local",
        scenario="cache_leader_dies",
        env={"DD_LEADER": "dies", "DYNAMO_DIST_POLICY": "off"},
        torchrun_args=["--monitor-interval", "60"],
    )
    s = _stats(run, 1)
    assert s["cache_publishes"] == 1, "the follower compiles and publishes after the leader died"
    assert "is gone" in run.output and "taking over" in run.output
    assert len(_entries(cache)) == 1


def test_stuck_leader_follower_compiles_after_timeout(run_ranks, tmp_path):
    cache = tmp_path / "cache"
    run = _job(
        run_ranks,
        cache,
        tmp_path / "local",
        scenario="cache_leader_dies",
        env={
            "DD_LEADER": "hangs",
            "DD_HANG": "25",
            "DYNAMO_DIST_POLICY": "off",
            "DYNAMO_DIST_TIMEOUT": "6",
            "DYNAMO_DIST_WAIT_LOG_INTERVAL": "2",
        },
    )
    s = _stats(run, 1)
    assert s["cache_fallbacks"] == 1 and s["inductor_compiles"] > 0
    assert "waiting for graph" in run.output and "compiled by rank 0" in run.output
    assert "compiling locally" in run.output
    assert run.rank(1)["waited"] >= 6
