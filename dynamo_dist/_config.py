"""One typed configuration, filled from defaults < config file < environment < call arguments.

Every ``DYNAMO_DIST_*`` variable is declared once, in ``ENV_VARS``; the launcher
exports settings through the same table, so a worker reads exactly what the
launcher wrote.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._errors import ConfigError

POLICIES = ("sync", "strict", "warn", "off")
TRANSPORTS = ("auto", "shm", "gloo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(kw_only=True, slots=True)
class Config:
    """dynamo_dist settings for one process. Build it with :func:`resolve`."""

    policy: str = "sync"
    """What a guard miss on some ranks does: ``sync`` (all recompile), ``strict`` (raise
    RankDivergenceError with the reasons), ``warn`` (sync and log the reasons), ``off``
    (no hook)."""

    timeout: float = 900.0
    """Seconds one guard exchange may wait for the other ranks before CollectiveTimeoutError.
    Generous by default: rank 0 writing a checkpoint must not look like a hang."""

    transport: str = "auto"
    """How ranks exchange guard results: ``auto`` (shared memory within a host, gloo across
    hosts), ``shm`` or ``gloo``."""

    compiler_collectives: bool = True
    """Agree on automatic-dynamic decisions across ranks while compiling, so every rank marks
    the same dims and scalars dynamic."""

    cache_dir: str | None = None
    """Shared directory for precompiled artifacts; None disables the shared cache."""

    status_interval: float = 2.0
    """Seconds between out-of-band status publications (last exchange and frame per rank),
    read to name the ranks that did not arrive when an exchange times out."""

    wait_log_interval: float = 30.0
    """Seconds between progress lines while a rank waits (for peers or for a cache leader)."""

    log_level: str = "WARNING"
    """Level of the ``dynamo_dist`` logger."""

    report: str | None = None
    """Path of a JSON job report written by rank 0 at exit; None prints the table only."""

    def __post_init__(self) -> None:
        _validate(self, source="arguments")

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _choice(key: str, allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in {a.lower() for a in allowed}:
            raise _bad(key, value, "one of " + ", ".join(allowed))
        v = value.strip()
        return v.upper() if allowed is LOG_LEVELS else v.lower()

    return check


def _positive(key: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise _bad(key, value, "a positive number of seconds")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "a positive number of seconds") from None
        if not math.isfinite(v) or v <= 0:
            raise _bad(key, value, "a positive number of seconds")
        return v

    return check


def _boolean(key: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise _bad(key, value, "true or false")

    return check


def _optional_path(key: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str | os.PathLike):
            raise _bad(key, value, "a path string")
        return os.fspath(value)

    return check


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "policy": _choice("policy", POLICIES),
    "timeout": _positive("timeout"),
    "transport": _choice("transport", TRANSPORTS),
    "compiler_collectives": _boolean("compiler_collectives"),
    "cache_dir": _optional_path("cache_dir"),
    "status_interval": _positive("status_interval"),
    "wait_log_interval": _positive("wait_log_interval"),
    "log_level": _choice("log_level", LOG_LEVELS),
    "report": _optional_path("report"),
}

# The one registry of environment variables (config key -> variable).
ENV_VARS: dict[str, str] = {
    "policy": "DYNAMO_DIST_POLICY",
    "timeout": "DYNAMO_DIST_TIMEOUT",
    "transport": "DYNAMO_DIST_TRANSPORT",
    "compiler_collectives": "DYNAMO_DIST_COMPILER_COLLECTIVES",
    "cache_dir": "DYNAMO_DIST_CACHE_DIR",
    "status_interval": "DYNAMO_DIST_STATUS_INTERVAL",
    "wait_log_interval": "DYNAMO_DIST_WAIT_LOG_INTERVAL",
    "log_level": "DYNAMO_DIST_LOG",
    "report": "DYNAMO_DIST_REPORT",
}
CONFIG_FILE_ENV = "DYNAMO_DIST_CONFIG"
# The cache secret is not a Config key: it must never be exported, logged or reported
# (see _secret). The file variable is preferred; it holds a path, not the secret.
CACHE_SECRET_ENV = "DYNAMO_DIST_CACHE_SECRET"
CACHE_SECRET_FILE_ENV = "DYNAMO_DIST_CACHE_SECRET_FILE"

_current_source = "arguments"


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{_current_source}: {key} = {value!r} is invalid; allowed: {allowed}")


def _validate(cfg: Config, source: str) -> None:
    global _current_source
    _current_source = source
    try:
        for f in fields(cfg):
            object.__setattr__(cfg, f.name, _CHECKS[f.name](getattr(cfg, f.name)))
    finally:
        _current_source = "arguments"


def _apply(values: dict[str, Any], updates: Mapping[str, Any], source: str) -> None:
    global _current_source
    _current_source = source
    try:
        for key, value in updates.items():
            if key not in _CHECKS:
                known = ", ".join(sorted(_CHECKS))
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: {known}")
            values[key] = _CHECKS[key](value)
    finally:
        _current_source = "arguments"


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML profile (flat keys, or under a ``[dynamo_dist]`` table) and validate it."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p!r} does not exist; pass an existing TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p!r} is not valid TOML: {e}") from None
    if set(data) == {"dynamo_dist"} and isinstance(data["dynamo_dist"], dict):
        data = data["dynamo_dist"]
    values: dict[str, Any] = {}
    _apply(values, data, source=f"config file {p}")
    return values


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, var in ENV_VARS.items():
        if var in env and env[var] != "":
            _apply(values, {key: env[var]}, source=f"environment variable {var}")
    return values


def resolve(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Build the Config: defaults < config file < environment < ``overrides`` (None = unset)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file if config_file is not None else env.get(CONFIG_FILE_ENV) or None
    if path:
        values.update(load_file(path))
    values.update(from_env(env))
    _apply(values, {k: v for k, v in overrides.items() if v is not None}, source="arguments")
    return Config(**values)


def to_env(cfg: Config) -> dict[str, str]:
    """The environment that makes a worker's :func:`resolve` produce ``cfg`` (launcher use)."""
    out: dict[str, str] = {}
    for key, var in ENV_VARS.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        out[var] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def describe() -> list[tuple[str, str, str, str]]:
    """(key, environment variable, default, doc) for every key: the configuration reference."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(Config)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    defaults = Config()
    return [
        (f.name, ENV_VARS[f.name], repr(getattr(defaults, f.name)), docs.get(f.name, ""))
        for f in fields(Config)
    ]


__all__ = ["ENV_VARS", "Config", "describe", "from_env", "load_file", "resolve", "to_env"]
