"""Automatic-dynamic decisions survive restarts through the shared cache (issue 15, item 3).

A first run sees a per-rank batch size at step 3: every rank recompiles with the batch
dynamic (two compiles). A restart on fresh hosts (empty local caches, same shared cache)
loads the profile before tracing, compiles dynamic from the start, and recompiles
nothing (one compile). A forged profile is refused before anything is unpickled, and a
user's ``torch.compiler.config.job_id`` keys the profile and is never overwritten.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch

import dynamo_dist
from dynamo_dist.dynamo import pgo, pgo_pickle


# -- rank programs ---------------------------------------------------------------------
def _step(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() * 2).sum(0)


def _closure_step() -> Any:
    """A closure over a function: Dynamo names its frame by a per-process salted hash."""

    def helper(x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    def step(x: torch.Tensor) -> torch.Tensor:
        return (helper(x) * 2).sum(0)

    return step


def profile_job(rank: int, world: int, local_base: str, job_id: str = "") -> dict[str, Any]:
    """Steps with a batch of 4, except rank 1's third step (6); then 5 on every rank.

    ``job_id`` "closure" compiles a closure instead (and sets no job id).
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"rank{rank}")
    if job_id and job_id != "closure":
        torch.compiler.config.job_id = job_id
    cf = dynamo_dist.compile(_closure_step() if job_id == "closure" else _step)
    ok = True
    for step, n in enumerate([4, 4, 6 if rank == 1 else 4, 5]):
        x = torch.full((n, 3), float(step))
        ok &= bool(torch.allclose(cf(x), _step(x), atol=1e-5))
    return {
        "ok": ok,
        "stats": dynamo_dist.stats(),
        "job_id": torch.compiler.config.job_id,
    }


# -- tests -----------------------------------------------------------------------------
def _run(tmp: Path, cache: Path, name: str, *args: str, secret: str | None = None) -> ranks.RankRun:
    env = {"DYNAMO_DIST_CACHE_DIR": str(cache), "DYNAMO_DIST_LOG": "INFO"}
    if secret is not None:
        env["DYNAMO_DIST_CACHE_SECRET"] = secret
    return ranks.launch(
        __file__, "profile_job", str(tmp / f"local-{name}"), *args, tmp=tmp, env=env, timeout=300
    )


def _figures(run: ranks.RankRun) -> list[tuple[int, int, int]]:
    """(compiles, profile loads, profile publishes) per rank."""
    out = []
    for r in (0, 1):
        res = run.rank(r)
        assert res["ok"], run.output[-3000:]
        s = res["stats"]
        out.append((s["compiles"], s.get("profile_loads", 0), s.get("profile_publishes", 0)))
    return out


def _profiles(cache: Path) -> list[Path]:
    found = []
    for manifest in (cache / "entries").glob("*/*/*/manifest.json"):
        if "automatic-dynamic profile" in json.loads(manifest.read_text()).get("label", ""):
            found.append(manifest.parent)
    return found


@pytest.mark.multiproc
@pytest.mark.inductor
@pytest.mark.timeout(600)
def test_restart_compiles_dynamic_from_the_start(tmp_path: Path) -> None:
    # A closure over a function: its frame id is salted per process, the hard case.
    args = ("closure",)
    cache = tmp_path / "cache"
    cold = _figures(_run(tmp_path, cache, "cold", *args))
    # Both ranks recompiled at step 3 (rank 1's batch); rank 0 alone published the profile.
    assert [c for c, _, _ in cold] == [2, 2], cold
    assert [p for _, _, p in cold] == [1, 0], cold
    (profile,) = _profiles(cache)

    warm = _figures(_run(tmp_path, cache, "warm", *args))
    assert [c for c, _, _ in warm] == [1, 1], warm  # zero recompiles
    assert [lo for _, lo, _ in warm] == [1, 1], warm  # the same profile on every rank
    assert [p for _, _, p in warm] == [0, 0], warm  # nothing new to publish

    # A tampered profile is refused (sha256): the job recompiles as a first run did.
    art = profile / "artifact.tar"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    again = _figures(_run(tmp_path, cache, "tampered"))
    assert [c for c, _, _ in again] == [2, 2], again
    assert [lo for _, lo, _ in again] == [0, 0], again


@pytest.mark.multiproc
@pytest.mark.inductor
@pytest.mark.timeout(600)
def test_user_job_id_keys_the_profile_and_is_kept(tmp_path: Path) -> None:
    """With a cache secret, too: the profile and the views cross the job's store signed.

    Rank 1 posts its view and rank 0 verifies it (cold run); rank 0 posts the profile
    and rank 1 verifies it (warm run). A MAC either side got wrong would be refused:
    counted in ``store_payloads_refused``, and the warm run would recompile.
    """
    cache = tmp_path / "cache"
    secret = "profile-test-secret-0123456789abcdef"  # 32+ characters (issue 26, row 5)
    run = _run(tmp_path, cache, "user", "my-job", secret=secret)
    assert [run.rank(r)["job_id"] for r in (0, 1)] == ["my-job", "my-job"]
    (profile,) = _profiles(cache)
    manifest = json.loads((profile / "manifest.json").read_text())
    assert manifest["factors"]["profile"] == "my-job"
    warm = _run(tmp_path, cache, "user-warm", "my-job", secret=secret)
    assert [c for c, _, _ in _figures(warm)] == [1, 1]
    assert [lo for _, lo, _ in _figures(warm)] == [1, 1]
    for r in (0, 1):
        assert run.rank(r)["stats"]["store_payloads_refused"] == 0
        assert warm.rank(r)["stats"]["store_payloads_refused"] == 0


def test_a_forged_profile_names_no_code() -> None:
    """The restricted unpickler allows pgo's own classes only."""

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("true",))

    with pytest.raises(ValueError, match="may not name"):
        pgo_pickle.loads(pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="not a code state"):
        pgo_pickle.loads(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="top level"):
        pgo_pickle.loads(pickle.dumps([1, 2]))
    assert pgo_pickle.loads(pickle.dumps({})) == {}


def test_a_forged_profile_of_allowed_classes_is_refused() -> None:
    """Allowed classes with contents pgo never writes: refused, never merged into Dynamo."""
    from collections import defaultdict

    from torch._dynamo.pgo import CodeId, CodeState, FrameStateSizeEntry

    code_id = CodeId("f.py", 1, "f", "00000000")
    forged = [
        {code_id: CodeState(automatic_dynamic=5)},  # type: ignore[arg-type]
        {
            code_id: CodeState(
                defaultdict(FrameStateSizeEntry, {"x": FrameStateSizeEntry(size=("a",))})
            )
        },
        {CodeId("f.py", "1", "f", "0"): CodeState()},  # type: ignore[arg-type]
        {code_id: CodeState(defaultdict(FrameStateSizeEntry, {"x": 3}))},  # type: ignore[dict-item]
    ]
    for state in forged:
        with pytest.raises(ValueError):
            pgo_pickle.loads(pickle.dumps(state))
    # A factory that would fail when Dynamo meets a new source: rebuilt with pgo's own.
    odd = {code_id: CodeState(automatic_dynamic=defaultdict(CodeId))}
    (rebuilt,) = pgo_pickle.loads(pickle.dumps(odd)).values()
    assert isinstance(rebuilt.automatic_dynamic["new"], FrameStateSizeEntry)


def test_a_real_profile_round_trips() -> None:
    """What Dynamo itself records (tensors, ints, floats, dynamic dims) loads back equal."""

    def f(x: torch.Tensor, n: int, eps: float) -> torch.Tensor:
        return x.sin() * n + eps

    cf = torch.compile(f, backend="eager")
    cf(torch.randn(4, 3), 2, 1e-5)
    cf(torch.randn(6, 3), 3, 1e-5)
    state = pgo.live_state()
    loaded = pgo_pickle.loads(pgo_pickle.dumps(pgo.live_state()))
    assert loaded == state
    assert pgo.dynamic_marks(loaded) == pgo.dynamic_marks()
    assert pgo.dynamic_marks()  # the batch and n went dynamic


if __name__ == "__main__":
    ranks.main(globals())
