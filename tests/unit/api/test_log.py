"""dynamo_dist's log lines: rank and time by default, a layout users choose (``log_format``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dynamo_dist import ConfigError
from dynamo_dist import _config as C

# The first line as dynamo_dist lays it out by default; the second after the configuration
# (DYNAMO_DIST_LOG_FORMAT) is applied, as dynamo_dist.compile applies it.
_PROGRAM = """
from dynamo_dist import _config, _log
log = _log.get_logger("cache")
_log.configure()
log.warning("default layout")
cfg = _config.resolve()
_log.configure(cfg.log_level, cfg.log_format)
log.warning("custom layout")
"""


def test_lines_carry_rank_and_time_by_default_and_take_a_custom_format() -> None:
    env = {"RANK": "3", "DYNAMO_DIST_LOG_FORMAT": "%(levelname)s|rank=%(rank)s|%(message)s"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM],
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()[-2:]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"\[rank3\]:{stamp} W dynamo_dist\.cache: default layout", lines[0]), lines
    assert lines[1] == "WARNING|rank=3|custom layout", lines


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DYNAMO_DIST_")}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("%(rnak)s %(message)s", "rnak"),  # a field no line has
        ("%(asctime)s %(levelname)s", "no %(message)s"),
        ("rank and message", "Invalid format"),  # no field at all
    ],
)
def test_a_bad_format_names_the_key_the_value_and_what_is_allowed(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        C.resolve(environ={"DYNAMO_DIST_LOG_FORMAT": value})
    msg = str(info.value)
    assert "DYNAMO_DIST_LOG_FORMAT" in msg and "log_format" in msg and repr(value) in msg, msg
    assert "allowed: a logging %-style format containing %(message)s" in msg and why in msg, msg


def test_a_format_in_a_profile_is_checked_too(tmp_path) -> None:
    f = tmp_path / "dd.toml"
    f.write_text("log_format = 5\n")
    with pytest.raises(ConfigError, match=r"log_format = 5 is invalid.*not text"):
        C.resolve(config_file=f, environ={})
    f.write_text('log_format = "%(rank)s %(message)s"\n')
    assert C.resolve(config_file=f, environ={}).log_format == "%(rank)s %(message)s"


# Lightning starts rank 0 without RANK in its environment, and the job report is logged
# after the process group is destroyed: the rank torch.distributed gave is kept.
_NO_RANK_ENV = """
import torch.distributed as dist
from dynamo_dist import _log
log = _log.get_logger("report")
_log.configure()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
log.warning("while the group lives")
dist.destroy_process_group()
log.warning("after it is gone")
"""


def test_the_rank_prefix_without_rank_in_the_environment() -> None:
    env = {k: v for k, v in _base_env().items() if k not in ("RANK", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_RANK_ENV], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "dynamo_dist.report" in ln]
    assert len(lines) == 2 and all(ln.startswith("[rank0]:") for ln in lines), lines
