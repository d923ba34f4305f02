"""The DDPOptimizer shims the shared cache relies on (``dynamo.ddp``), in one process.

``cacheable_ddp_bucket`` makes a DDP piece cacheable by AOTAutograd only where
inductor keeps eager's output strides; ``ddp_pieces_after`` must produce the pieces
DDPOptimizer will compile next with the very keys their real compiles get, or a rank
that compiles ahead publishes entries nobody loads.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode

from dynamo_dist.dynamo import ddp

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("options", "active"),
    [
        (None, True),
        ({"pad_outputs": True}, False),
        ({"keep_output_stride": False}, False),
        ({"max_autotune": True}, True),
    ],
)
def test_a_piece_is_made_cacheable_only_where_outputs_keep_eager_strides(options, active):
    ctx = TracingContext(FakeTensorMode())
    ctx.fakify_first_call = True
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with tracing(ctx), ddp.cacheable_bucket(gm, options) as bucket:
        assert bucket.active is active
        assert ctx.fakify_first_call is not active
    assert ctx.fakify_first_call, "the flag is DDPOptimizer's: it is put back"


def test_outside_ddp_optimizer_nothing_changes():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with ddp.cacheable_bucket(gm) as bucket:
        assert not bucket.active
    compiled = object()
    assert bucket.wrap(compiled) is compiled
    assert list(ddp.pieces_after(gm)) == []


_PIECES = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from dynamo_dist.dynamo import ddp
    from dynamo_dist.cache.key import graph_key
    from test_shared_cache import _Blocks

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    real, ahead = [], []

    def backend(gm, example_inputs):
        with ddp.cacheable_bucket(gm) as bucket:
            real.append(graph_key(gm, example_inputs, {})[0])
            for piece, inputs in ddp.pieces_after(gm):
                ahead.append((len(real), graph_key(piece, inputs, {})[0]))
        return bucket.wrap(gm.forward)

    torch.manual_seed(0)
    model = _Blocks()
    ref = _Blocks()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 256)
    y = torch.compile(DDP(model), backend=backend)(x)
    ok = bool(torch.allclose(y, ref(x), atol=1e-5))
    print(json.dumps({"real": real, "ahead": ahead, "ok": ok}))
    """
)


@pytest.mark.timeout(300)
def test_pieces_ahead_have_the_keys_of_their_real_compiles(tmp_path):
    script = tmp_path / "pieces.py"
    script.write_text(_PIECES)
    out = subprocess.run(
        [sys.executable, str(script), str(HERE)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"]
    assert len(res["real"]) == 2, "six 256x256 layers: DDPOptimizer makes two pieces"
    # While compiling piece 1, the look-ahead offers piece 2, with piece 2's real key.
    assert res["ahead"] == [[1, res["real"][1]]]
