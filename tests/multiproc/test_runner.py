"""The runner's own guarantees: it refuses unmarked tests and kills what hangs."""

from __future__ import annotations

import pytest
import ranks

from dynamo_dist.dist.proc import pid_alive


def test_unmarked_test_cannot_spawn_ranks(tmp_path):
    """The fast tier stays fast: a test without the multiproc marker cannot launch."""
    with pytest.raises(pytest.fail.Exception, match="not marked multiproc"):
        ranks.run_command(["true"], timeout=10)
    with pytest.raises(pytest.fail.Exception, match="not marked multiproc"):
        ranks.launch(__file__, "nothing", tmp=tmp_path)


@pytest.mark.multiproc
def test_timeout_kills_the_whole_process_group():
    script = "sleep 300 & echo child=$!; wait"
    with pytest.raises(pytest.fail.Exception, match="did not finish") as info:
        ranks.run_command(["sh", "-c", script], timeout=2)
    output = str(info.value).split("output:", 1)[1]
    child = int(output.split("child=")[1].split()[0])
    ranks.wait_until(lambda: not pid_alive(child), timeout=30, what=f"child {child} dying")


# -- rank program ----------------------------------------------------------------------
_SEEN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def env_seen(rank: int, world: int) -> dict:
    import os
    import sys

    return {
        "ok": True,
        "env": {k: os.environ.get(k) for k in _SEEN},
        "restarts": os.environ.get("TORCHELASTIC_RESTART_COUNT"),
        "torch_preloaded": "torch._dynamo" in sys.modules,
        "main": __name__,
    }


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_forked_and_fresh_ranks_see_the_same_job(tmp_path):
    """Forked ranks (the default) and fresh interpreters (an environment read at torch
    import forces them) get torchrun's one-host environment alike."""
    forked = ranks.launch(__file__, "env_seen", tmp=tmp_path, agent=False)
    fresh = ranks.launch(
        __file__, "env_seen", tmp=tmp_path, agent=False, env={"TORCH_SHOW_CPP_STACKTRACES": "0"}
    )
    for r in (0, 1):
        assert forked.rank(r)["env"] == fresh.rank(r)["env"]
        assert forked.rank(r)["env"]["RANK"] == str(r)
        assert forked.rank(r)["restarts"] == fresh.rank(r)["restarts"] == "0"
        assert forked.rank(r)["main"] == fresh.rank(r)["main"] == "__main__"
        assert forked.rank(r)["torch_preloaded"]  # the fork server imported it
        assert "[process of rank 1]" in forked.output and "[process of rank 1]" in fresh.output


if __name__ == "__main__":
    ranks.main(globals())
