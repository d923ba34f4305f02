"""Shared precompile cache on real ranks with inductor: cold, warm, and what can go wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch

import dynamo_dist

pytestmark = [pytest.mark.multiproc, pytest.mark.inductor, pytest.mark.timeout(400)]

HERE = __file__


# -- rank programs ---------------------------------------------------------------------
def _local_inductor_cache(rank: int, base: str) -> None:
    """Each rank gets its own empty inductor cache, as if on its own host."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"rank{rank}")


def cache_job(rank: int, world: int, local_base: str) -> dict[str, Any]:
    _local_inductor_cache(rank, local_base)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    cm = dynamo_dist.compile(model)
    x = torch.randn(4, 8)
    t0 = time.perf_counter()
    y = cm(x)
    y.sum().backward()
    first_step = time.perf_counter() - t0
    grad = model[0].weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    ok = bool(torch.allclose(y, model(x), atol=1e-5)) and bool(
        torch.allclose(grad, model[0].weight.grad, atol=1e-5)
    )
    return {"ok": ok, "stats": dynamo_dist.stats(), "first_step": first_step}


def cache_recompile(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """A per-rank batch size forces a recompile: both ranks must key it identically."""
    _local_inductor_cache(rank, local_base)
    cf = dynamo_dist.compile(lambda x: (x.sin() * 2).sum(0))
    ok = True
    for step, n in enumerate([4, 4, 6 if rank == 1 else 4, 5]):
        x = torch.full((n, 3), float(step))
        ok &= bool(torch.allclose(cf(x), (x.sin() * 2).sum(0), atol=1e-5))
    return {"ok": ok, "stats": dynamo_dist.stats()}


def cache_unusable_on_one_rank(rank: int, world: int, local_base: str, bad: str) -> dict[str, Any]:
    """Rank 1's cache directory is unusable; rank 0's works."""
    _local_inductor_cache(rank, local_base)
    cf = dynamo_dist.compile(lambda x: (x.sin() * 2).cos(), cache_dir=bad if rank == 1 else None)
    x = torch.randn(16)
    ok = bool(torch.allclose(cf(x), (x.sin() * 2).cos(), atol=1e-5))
    return {"ok": ok, "stats": dynamo_dist.stats()}


def cache_leader_dies(
    rank: int, world: int, local_base: str, how: str = "dies", hang: str = "20"
) -> dict[str, Any]:
    """Rank 0 takes the lock and dies (or hangs) inside inductor; rank 1 must not wait forever."""
    _local_inductor_cache(rank, local_base)
    if rank == 0:

        def leader_fails(graph: Any) -> None:
            ranks.signal_peers("leader_holds_lock")  # inside inductor: the lock is taken
            if how == "dies":
                os._exit(9)
            time.sleep(float(hang))  # a stuck leader, not an ordering: nobody waits on it

        torch._inductor.config.post_grad_custom_pre_pass = leader_fails
    else:
        ranks.wait_for_peer("leader_holds_lock")  # compile only once rank 0 holds the lock
    cf = dynamo_dist.compile(lambda x: (x.sin() * 2).cos())
    x = torch.randn(16)
    t0 = time.perf_counter()
    ok = bool(torch.allclose(cf(x), (x.sin() * 2).cos(), atol=1e-5))
    return {"ok": ok, "stats": dynamo_dist.stats(), "waited": time.perf_counter() - t0}


def _meet(rank: int, name: str) -> Any:
    """An inductor pass in which the n-th compile of each of 2 ranks waits for the other's.

    A job using it ends only if the ranks compile at the same time.
    """
    import itertools

    from torch._inductor.custom_graph_pass import CustomGraphPass

    calls = itertools.count()

    class Meet(CustomGraphPass):
        def __call__(self, graph: Any) -> None:
            i = next(calls)
            ranks.signal_peers(f"{name}{rank}-{i}")
            ranks.wait_for_peer(f"{name}{1 - rank}-{i}", timeout=150)

        def uuid(self) -> str:  # the same key on every rank, and cacheable
            return f"dynamo_dist-test-{name}"

    return Meet()


def cache_alongside(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """Both ranks must be inside inductor at once: only if the follower compiles alongside.

    With ``cache_followers = wait`` the follower would wait for the leader, which waits
    in its pass for the follower: the job times out. A restart loads the entry and runs
    no pass at all.
    """
    _local_inductor_cache(rank, local_base)
    torch._inductor.config.post_grad_custom_pre_pass = _meet(rank, "meet")
    cf = dynamo_dist.compile(_sincos)
    x = torch.randn(16)
    ok = bool(torch.allclose(cf(x), _sincos(x), atol=1e-5))
    return {"ok": ok, "stats": dynamo_dist.stats()}


def cache_no_from_last_rank(rank: int, world: int, local_base: str, bad: str) -> dict[str, Any]:
    """The last rank cannot use the cache; the leader among the others compiles slowly."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Slow(CustomGraphPass):
        def __call__(self, graph: Any) -> None:
            time.sleep(5)  # the leader still holds the lock when the other rank looks

        def uuid(self) -> str:
            return "dynamo_dist-test-slow"

    _local_inductor_cache(rank, local_base)
    torch._inductor.config.post_grad_custom_pre_pass = Slow()
    cf = dynamo_dist.compile(_sincos, cache_dir=bad if rank == world - 1 else None)
    x = torch.randn(16)
    ok = bool(torch.allclose(cf(x), _sincos(x), atol=1e-5))
    return {"ok": ok, "stats": dynamo_dist.stats()}


class _Block(torch.nn.Module):
    """User code, so Dynamo traces it inside DDP (it skips torch.nn's own modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(256, 256)
        self.b = torch.nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + x


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def cache_ddp_buckets(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """DDP whose graph DDPOptimizer splits in two buckets; checked against eager DDP.

    Six 256x256 layers are 1.5 MB of parameters: DDP's first bucket holds 1 MB, so
    DDPOptimizer compiles the frame's graph as two pieces, each under
    ``fakify_first_call`` (which alone would make AOTAutograd's cache refuse them).

    Every inductor compile waits inside inductor for one of the other rank: the job
    ends only if the ranks compile the two pieces at the same time, the follower of
    the first piece compiling the second ahead (``cache_followers = wait``; otherwise
    it would wait for the leader, which waits for it). A restart compiles nothing.
    """
    import copy

    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    _local_inductor_cache(rank, local_base)
    torch._inductor.config.post_grad_custom_pre_pass = _meet(rank, "meet-ddp")
    torch.manual_seed(0)
    model = _Blocks()
    ref = DDP(copy.deepcopy(model))
    step = dynamo_dist.compile(DDP(model))
    ok = True
    for i in range(2):
        x = torch.randn(4, 256, generator=torch.Generator().manual_seed(10 * i + rank))
        y = step(x)
        y.square().mean().backward()
        y_ref = ref(x)
        y_ref.square().mean().backward()
        ok &= bool(torch.allclose(y, y_ref, atol=1e-4))
        for p, q in zip(model.parameters(), ref.module.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            ok &= bool(torch.allclose(p.grad, q.grad, atol=1e-4))
    return {"ok": ok, "stats": dynamo_dist.stats(), "aot": dict(counters["aot_autograd"])}


def _sincos(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() * 2).cos()


# -- tests -----------------------------------------------------------------------------
def _job(
    tmp: Path,
    cache: Path,
    local: Path,
    env: dict[str, str] | None = None,
    program: str = "cache_job",
    args: tuple[str, ...] = (),
    **kw: Any,
) -> ranks.RankRun:
    # The graph route (what functions, and modules that leave the precompiled route, use);
    # tests/test_precompile.py covers the precompiled one.
    full = {
        "DYNAMO_DIST_CACHE_DIR": str(cache),
        "DYNAMO_DIST_LOG": "INFO",
        "DYNAMO_DIST_PRECOMPILE": "0",
        **(env or {}),
    }
    return ranks.launch(HERE, program, str(local), *args, tmp=tmp, env=full, timeout=300, **kw)


def _stats(run, r: int) -> dict:
    res = run.rank(r)
    assert res["ok"], res
    return res["stats"]


def _entries(cache: Path) -> list[Path]:
    # entries/<namespace>/<kk>/<key>: the namespace is "unsigned" or the secret's key id.
    return sorted(p for p in (cache / "entries").glob("*/*/*") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """One cold 2-rank job; tests copy its cache directory and mutate the copy."""
    base = tmp_path_factory.mktemp("cold")
    cache = base / "cache"
    return cache, _job(base, cache, base / "local")


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


def test_warm_restart_compiles_nothing(cold, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    run = _job(tmp_path, cache, tmp_path / "fresh-local")
    for r in (0, 1):
        s = _stats(run, r)
        assert s["inductor_compiles"] == 0
        assert s["cache_loads"] == 1 and s["cache_publishes"] == 0
        # Built nothing, loaded the one graph (a hit), its recorded build time measured.
        assert s["graphs_built"] == 0 and s["graphs_loaded"] == s["cache_hits"] == 1, s
        assert s["build_seconds_loaded"] > 0 and s["cache_misses"] == 0, s


def test_recompile_with_rank_specific_sizes_shares_one_entry(tmp_path):
    cache = tmp_path / "cache"
    run = _job(tmp_path, cache, tmp_path / "local", program="cache_recompile")
    s = [_stats(run, r) for r in (0, 1)]
    # Two graphs (static, then dynamic after the forced recompile), each compiled once.
    assert sum(x["cache_publishes"] for x in s) == 2
    assert sum(x["cache_loads"] for x in s) == 2
    # ... plus the automatic-dynamic profile the recompile produced (test_cache_profile.py).
    labels = [json.loads((e / "manifest.json").read_text())["label"] for e in _entries(cache)]
    profiles = [lb for lb in labels if lb.startswith("automatic-dynamic profile")]
    assert len(labels) == 3 and len(profiles) == 1, labels


def test_followers_compile_alongside_the_leader_then_restarts_load(tmp_path):
    """``cache_followers = compile``: nobody idles on a cold start; one rank publishes."""
    cache = tmp_path / "cache"
    env = {"DYNAMO_DIST_CACHE_FOLLOWERS": "compile"}
    run = _job(tmp_path, cache, tmp_path / "local", env=env, program="cache_alongside")
    s = [_stats(run, r) for r in (0, 1)]
    assert sorted(x["cache_compiled_alongside"] for x in s) == [0, 1], s
    leader, follower = (s[1], s[0]) if s[0]["cache_compiled_alongside"] else (s[0], s[1])
    assert follower["inductor_compiles"] > 0 and follower["cache_loads"] == 0
    assert follower["cache_fallbacks"] == 0
    # The follower publishes too if it finishes first (a dead leader must not leave the
    # graph unpublished): one rename wins, the other publisher loses it harmlessly.
    assert leader["cache_publishes"] + follower["cache_publishes"] == 1, s
    graphs = [e for e in _entries(cache) if "profile" not in (e / "manifest.json").read_text()]
    assert len(graphs) == 1, graphs
    assert "compiling it here too" in run.output
    warm = _job(tmp_path, cache, tmp_path / "fresh-local", env=env, program="cache_alongside")
    for r in (0, 1):
        s = _stats(warm, r)
        assert s["cache_loads"] == 1 and s["inductor_compiles"] == 0, s


def test_ddp_buckets_compile_on_two_ranks_and_load_with_aotautograd_results(tmp_path):
    """DDPOptimizer's two pieces compile at once, one per rank; a fresh host loads both.

    Cold: the rank waiting for the first piece compiles and publishes the second
    meanwhile (before, the leader of the first led the second too while the other
    rank idled). Warm: each piece's entry holds AOTAutograd's result, so nothing is
    traced again (AOTAutogradCache refuses pieces compiled under
    ``fakify_first_call``, so plain torch.compile re-traces every piece at every start).
    """
    cache = tmp_path / "cache"
    env = {"DYNAMO_DIST_CACHE_FOLLOWERS": "wait"}
    cold = _job(tmp_path, cache, tmp_path / "local", env, program="cache_ddp_buckets")
    s = [_stats(cold, r) for r in (0, 1)]
    assert [x["cache_publishes"] for x in s] == [1, 1], "one piece published by each rank"
    assert sorted(x["cache_compiled_ahead"] for x in s) == [0, 1], s
    # The rank that compiled ahead loads both pieces (its own result was dropped).
    assert sorted(x["cache_loads"] for x in s) == [1, 2], s
    for r in (0, 1):
        assert cold.rank(r)["aot"].get("autograd_cache_bypass", 0) == 0, cold.rank(r)["aot"]
    warm = _job(tmp_path, cache, tmp_path / "fresh-local", env, program="cache_ddp_buckets")
    for r in (0, 1):
        s_warm = _stats(warm, r)
        assert s_warm["cache_loads"] == 2 and s_warm["inductor_compiles"] == 0, s_warm
        aot = warm.rank(r)["aot"]
        assert aot.get("autograd_cache_hit", 0) == 2 and not aot.get("autograd_cache_miss"), aot


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
    for w in words:  # the recorded reason itself, not just anything in the log, names the fault
        assert w in reason, (w, reason)
    assert len(_entries(cache)) == 1


def test_corrupted_entry_is_refused_and_recompiled(cold, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    _mutate_artifact(_entries(cache)[0], fix_checksum=False)
    run = _job(tmp_path, cache, tmp_path / "local")
    _assert_refused_and_recompiled(run, cache, ["sha256"])


def test_truncated_entry_is_refused(cold, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    art = _entries(cache)[0] / "artifact.tar"
    art.write_bytes(art.read_bytes()[:100])
    run = _job(tmp_path, cache, tmp_path / "local")
    _assert_refused_and_recompiled(run, cache, ["truncated"])


def test_version_skew_is_refused(cold, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    man_path = _entries(cache)[0] / "manifest.json"
    man = json.loads(man_path.read_text())
    man["factors"]["torch"] = "1.0.0"
    man_path.write_text(json.dumps(man))
    run = _job(tmp_path, cache, tmp_path / "local")
    # The reason names the skewed factor and the value the entry was built with.
    _assert_refused_and_recompiled(run, cache, ["version skew", "torch '1.0.0'"])


def test_tampered_entry_with_secret_is_refused(tmp_path):
    cache = tmp_path / "cache"
    env = {"DYNAMO_DIST_CACHE_SECRET": "s3cret-" + os.urandom(16).hex()}
    first = _job(tmp_path, cache, tmp_path / "a", env=env)
    assert sum(_stats(first, r)["cache_publishes"] for r in (0, 1)) == 1
    entry = _entries(cache)[0]
    assert "signature" in json.loads((entry / "manifest.json").read_text())
    _mutate_artifact(entry, fix_checksum=True)
    run = _job(tmp_path, cache, tmp_path / "b", env=env)
    _assert_refused_and_recompiled(run, cache, ["HMAC"])


def test_unsigned_entry_is_never_read_when_a_secret_is_set(cold, tmp_path):
    cache = _copy_of_cold(cold, tmp_path)
    unsigned = _entries(cache)
    run = _job(tmp_path, cache, tmp_path / "local", env={"DYNAMO_DIST_CACHE_SECRET": "k" * 32})
    s = [_stats(run, r) for r in (0, 1)]
    # Signed entries live in the secret's own namespace: the unsigned one is neither
    # loaded nor refused (a job without the secret may still use it).
    assert sum(x["cache_loads"] for x in s) == 1 and sum(x["cache_refused"] for x in s) == 0
    assert sum(x["cache_publishes"] for x in s) == 1
    assert all(p.exists() for p in unsigned) and len(_entries(cache)) == 2


def test_unusable_directory_warns_and_trains_on(tmp_path):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("I am a file")
    run = _job(tmp_path, not_a_dir, tmp_path / "local")
    for r in (0, 1):
        s = _stats(run, r)
        assert s["cache_enabled"] is False
    assert "is unusable" in run.output and str(not_a_dir) in run.output
    assert run.output.count("is unusable") == 2  # once per rank


def _job_with_an_unusable_rank(tmp_path: Path, program: str, **kw: Any) -> ranks.RankRun:
    """``program`` gets a cache_dir that is a file, for the rank it picks to have none."""
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("I am a file")
    cache, local = tmp_path / "cache", tmp_path / "local"
    return _job(tmp_path, cache, local, program=program, args=(str(not_a_dir),), **kw)


def test_a_rank_without_the_cache_does_not_stall_the_others(tmp_path):
    """A rank that cannot use the cache still reports at the agreement, as a "no"."""
    run = _job_with_an_unusable_rank(
        tmp_path, "cache_unusable_on_one_rank", env={"DYNAMO_DIST_TIMEOUT": "120"}
    )
    s0, s1 = _stats(run, 0), _stats(run, 1)
    assert s1["cache_enabled"] is False and s0["cache_enabled"] is True
    assert s0["cache_publishes"] == 1  # rank 0 led and published for later jobs
    # Before the fix rank 0 waited out the whole timeout for rank 1's report.
    assert "not every rank reported" not in run.output, run.output[-3000:]


def test_a_rank_waiting_for_an_entry_nobody_will_install_compiles_at_once(tmp_path):
    """Once a rank said "no" (here: it cannot use the cache), no rank installs the entry:
    a rank waiting for the leader stops waiting and compiles, instead of loading the
    entry only to compile anyway."""
    run = _job_with_an_unusable_rank(tmp_path, "cache_no_from_last_rank", nproc=3)
    s = [_stats(run, r) for r in range(3)]
    assert s[2]["cache_enabled"] is False
    assert sum(x["cache_publishes"] for x in s[:2]) == 1
    waiter = s[0] if s[1]["cache_publishes"] else s[1]
    assert waiter["cache_fallbacks"] == 1 and waiter["cache_loads"] == 0, waiter
    assert "compiling it here now" in run.output
    assert "not every rank could load" not in run.output


def test_dead_leader_follower_takes_over(tmp_path):
    cache = tmp_path / "cache"
    run = _job(
        tmp_path,
        cache,
        tmp_path / "local",
        program="cache_leader_dies",
        args=("dies",),
        env={"DYNAMO_DIST_POLICY": "off"},
        agent=False,  # torchrun would kill the follower as soon as it sees the leader die
    )
    s = _stats(run, 1)
    assert s["cache_publishes"] == 1, "the follower compiles and publishes after the leader died"
    assert "is gone" in run.output and "taking over" in run.output
    assert len(_entries(cache)) == 1


def test_stuck_leader_follower_compiles_after_timeout(tmp_path):
    cache = tmp_path / "cache"
    run = _job(
        tmp_path,
        cache,
        tmp_path / "local",
        program="cache_leader_dies",
        args=("hangs", "14"),
        env={
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


if __name__ == "__main__":
    ranks.main(globals())
