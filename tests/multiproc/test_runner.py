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
