"""Configuration: precedence, validation, and error messages that name the key."""

from __future__ import annotations

import pytest

from dynamo_dist import Config, ConfigError
from dynamo_dist import _config as C


def write(tmp_path, text: str):
    p = tmp_path / "dd.toml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = C.resolve(environ={})
    assert cfg == Config()
    assert cfg.policy == "sync" and cfg.transport == "auto" and cfg.timeout > 0
    assert cfg.leader_exchange == "native"


def test_precedence_defaults_file_env_arguments(tmp_path):
    f = write(tmp_path, 'policy = "warn"\ntimeout = 30\ntransport = "gloo"\n')
    env = {"DYNAMO_DIST_TIMEOUT": "20", "DYNAMO_DIST_TRANSPORT": "shm"}
    cfg = C.resolve(config_file=f, environ=env, transport="auto")
    assert cfg.policy == "warn"  # file over default
    assert cfg.timeout == 20.0  # env over file
    assert cfg.transport == "auto"  # argument over env
    assert cfg.status_interval == Config().status_interval  # default


def test_config_file_from_environment(tmp_path):
    f = write(tmp_path, '[dynamo_dist]\npolicy = "strict"\n')
    assert C.resolve(environ={"DYNAMO_DIST_CONFIG": str(f)}).policy == "strict"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('polcy = "sync"', ["unknown key", "polcy", "known keys", "policy"]),
        ('policy = "fast"', ["policy", "'fast'", "sync, strict, warn, off"]),
        ("timeout = -1", ["timeout", "-1", "positive"]),
        ('timeout = "soon"', ["timeout", "'soon'"]),
        ("compiler_collectives = 3", ["compiler_collectives", "true or false"]),
        ('transport = "rdma"', ["transport", "auto, shm, gloo"]),
        ('leader_exchange = "tree"', ["leader_exchange", "'tree'", "native, doubling, allreduce"]),
        ("policy = ", ["not valid TOML"]),
    ],
)
def test_bad_file_names_file_key_and_allowed(tmp_path, text, words):
    f = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        C.resolve(config_file=f, environ={})
    msg = str(info.value)
    assert str(f) in msg
    for w in words:
        assert w in msg


def test_bad_environment_names_variable():
    with pytest.raises(ConfigError, match=r"DYNAMO_DIST_POLICY: policy = 'maybe'.*allowed"):
        C.resolve(environ={"DYNAMO_DIST_POLICY": "maybe"})


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        C.resolve(config_file="/nonexistent/dd.toml", environ={})


def test_bad_dataclass_value():
    with pytest.raises(ConfigError, match="timeout"):
        Config(timeout=0)


def test_to_env_round_trip():
    cfg = Config(policy="strict", timeout=12.5, compiler_collectives=False, cache_dir="/tmp/x")
    assert C.resolve(environ=C.to_env(cfg)) == cfg


def test_every_key_has_env_var_and_doc():
    rows = C.describe()
    assert {r[0] for r in rows} == set(C.ENV_VARS)
    for key, var, _flag, _default, doc in rows:
        assert var.startswith("DYNAMO_DIST_") and doc, key


def test_checks_env_and_flags_derive_from_the_fields():
    from dataclasses import fields

    keys = [f.name for f in fields(Config)]
    assert list(C.ENV_VARS) == keys and set(C._CHECKS) == set(keys)
    assert C.ENV_VARS["log_level"] == "DYNAMO_DIST_LOG"  # named by the field
    assert C.ENV_VARS["status_interval"] == "DYNAMO_DIST_STATUS_INTERVAL"  # derived
    assert {f.key: f.flag for f in C.LAUNCHER_FLAGS} == {
        "policy": "--policy",
        "timeout": "--timeout",
        "cache_dir": "--cache-dir",
        "cache_followers": "--cache-followers",
        "stall_abort": "--stall-abort",
        "report": "--report",
        "all_compiles": "--all-compiles",
    }
    # Choices come from the Literal annotations.
    assert C.POLICIES == ("sync", "strict", "warn", "off")
    assert C.resolve(environ={"DYNAMO_DIST_LOG": "debug"}).log_level == "DEBUG"
    with pytest.raises(ConfigError, match="one of auto, shm, gloo"):
        C.resolve(environ={"DYNAMO_DIST_TRANSPORT": "tcp"})
    with pytest.raises(ConfigError, match=r"cache_followers = 'race'.*one of auto, wait, compile"):
        C.resolve(environ={"DYNAMO_DIST_CACHE_FOLLOWERS": "race"})
    assert C.resolve(environ={"DYNAMO_DIST_CACHE_FOLLOWERS": "Compile"}).cache_followers == (
        "compile"
    )


def test_launcher_flags_reach_the_config():
    from dynamo_dist.tools import launch

    args = launch.parser().parse_args(
        ["--policy", "warn", "--timeout", "7", "--cache-dir", "/tmp/c", "x.py"]
    )
    cfg = launch.resolve(args)
    assert (cfg.policy, cfg.timeout, cfg.cache_dir, cfg.report) == ("warn", 7.0, "/tmp/c", None)


def test_override_keeps_a_config_and_checks_arguments():
    base = Config(policy="strict", timeout=5.0)
    assert C.override(base, timeout=None, cache_dir="/tmp/c") == Config(
        policy="strict", timeout=5.0, cache_dir="/tmp/c"
    )
    with pytest.raises(ConfigError, match="arguments: timeout"):
        C.override(base, timeout=-1)


def test_compile_accepts_a_config_and_disable():
    import torch

    import dynamo_dist

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    assert dynamo_dist.compile(f, disable=True) is f
    assert dynamo_dist.compile(disable=True)(f) is f
    cf = dynamo_dist.compile(f, backend="eager", config=Config(policy="warn"))
    assert cf is not f and torch.equal(cf(torch.ones(2)), f(torch.ones(2)))
    with pytest.raises(ConfigError, match="arguments: cache_dir"):
        dynamo_dist.compile(f, backend="eager", config=Config(), cache_dir=3)  # type: ignore[arg-type]
