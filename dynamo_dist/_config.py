"""One typed configuration, filled from defaults < config file < environment < call arguments.

Each key is one field of :class:`Config`, with its docstring. Everything else derives
from the fields: the check (from the annotation: a ``Literal`` is a choice, ``float`` a
positive number of seconds, ``bool`` a flag, ``str | None`` an optional path), the
``DYNAMO_DIST_*`` variable (``ENV_VARS``: the key upper-cased, unless the field names
another) and the ``dynamo-dist-run`` flag (for fields that declare one). The launcher
exports settings through the same table, so a worker reads exactly what the launcher wrote.
"""

from __future__ import annotations

import itertools
import math
import os
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, NewType, get_args, get_origin, get_type_hints

from dynamo_dist import _log
from dynamo_dist._errors import ConfigError

PolicyName = Literal["sync", "strict", "warn", "off"]
TransportChoice = Literal["auto", "shm", "gloo"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
FollowerChoice = Literal["auto", "wait", "compile"]
LeaderExchangeChoice = Literal["native", "doubling", "allreduce"]
#: A :mod:`logging` %-style format for dynamo_dist's lines (checked by ``_log.format_problem``).
LogFormat = NewType("LogFormat", str)

POLICIES: tuple[str, ...] = get_args(PolicyName)
TRANSPORTS: tuple[str, ...] = get_args(TransportChoice)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


def _key(
    default: Any,
    *,
    env: str | None = None,
    flag: str | None = None,
    metavar: str = "",
    help: str = "",
) -> Any:
    """A config field. ``env`` overrides the derived variable name; ``flag`` (with
    ``metavar`` and ``help``) makes ``dynamo-dist-run`` accept it."""
    return field(
        default=default, metadata={"env": env, "flag": flag, "metavar": metavar, "help": help}
    )


@dataclass(kw_only=True, slots=True)
class Config:
    """dynamo_dist settings for one process. Build it with :func:`resolve`."""

    policy: PolicyName = _key(
        "sync", flag="--policy", metavar="P", help="sync, strict, warn or off"
    )
    """What a guard miss on some ranks does: ``sync`` (all recompile), ``strict`` (raise
    RankDivergenceError with the reasons), ``warn`` (sync and log the reasons), ``off``
    (no hook)."""

    timeout: float = _key(
        900.0, flag="--timeout", metavar="S", help="seconds a guard exchange may wait"
    )
    """Seconds one guard exchange may wait for the other ranks before CollectiveTimeoutError.
    Generous by default: rank 0 writing a checkpoint must not look like a hang."""

    transport: TransportChoice = _key("auto")
    """How ranks exchange guard results: ``auto`` (shared memory within a host, gloo across
    hosts), ``shm`` or ``gloo``."""

    leader_exchange: LeaderExchangeChoice = _key("native")
    """How the host leaders combine their hosts' guard results when a group spans several
    hosts: ``native`` (rounds run in C++ over authenticated TCP connections, without the
    GIL: ceil(log_k H) rounds with k up to 8; if any leader cannot connect, all fall back
    to ``doubling`` with one warning), ``doubling`` (recursive doubling over gloo's
    point-to-point messages, ceil(log2 H) rounds for H hosts) or ``allreduce`` (gloo's
    allreduce, a ring: 2(H-1) sequential hops). All give the same verdicts."""

    leader_busy_poll: float = _key(30e-6)
    """Seconds a host leader polls its connections without sleeping before it blocks, in
    each round of the native exchange: a partner's word usually arrives within a round
    trip, and waking a sleeping thread costs more than that."""

    compiler_collectives: bool = _key(True)
    """Agree on automatic-dynamic decisions across ranks while compiling, so every rank marks
    the same dims and scalars dynamic."""

    cache_dir: str | None = _key(
        None, flag="--cache-dir", metavar="DIR", help="shared precompile cache directory"
    )
    """Shared directory for precompiled artifacts; None disables the shared cache."""

    cache_followers: FollowerChoice = _key(
        "auto", flag="--cache-followers", metavar="F", help="auto, wait or compile"
    )
    """What a rank does while another rank compiles a graph the shared cache lacks: ``wait``
    for the entry and load it (the ranks of a host do not compete for its cores: best
    where cores are few), ``compile`` it too at once, like plain torch.compile (nobody
    idles: best where each rank has cores to spare), or ``auto``: ``compile`` where the
    host has at least 4 CPUs per local rank, else ``wait``. Either way one rank
    publishes the graph, and later starts load it."""

    cache_fanout: bool = _key(True)
    """Fetch each shared cache entry once per host: one rank reads and verifies it on the
    shared file system and leaves a copy in a private host-local directory, from which the
    host's other ranks verify and install it. Off: every rank reads the shared entry and
    polls its lock itself (what dynamo_dist did before; for comparisons)."""

    precompile: bool = _key(True)
    """With a shared cache, run each compiled module through a precompiled artifact
    (``aot_compile`` of the module DDP wraps): a warm start runs no Dynamo and no
    AOTAutograd. A module whose capture fails (a graph break, a guard that cannot be
    saved) falls back to compiling through Dynamo on every rank, counted per reason in
    ``dynamo_dist.stats()``. Off: every start traces, and only graphs are shared."""

    status_interval: float = _key(2.0)
    """Seconds between out-of-band status publications (last exchange and frame per rank),
    read to name the ranks that did not arrive when an exchange times out."""

    wait_log_interval: float = _key(30.0)
    """Seconds between progress lines while a rank waits (for peers or for a cache leader)."""

    stall_warning: float = _key(10.0)
    """Seconds a rank waits at a guard exchange before one WARNING, if the status board
    shows the missing ranks alive but elsewhere: it names the frame, the exchange, where
    each missing rank last was, and the fix (``dynamo_dist.local()`` or ``group=``). The
    ``waiting Ns`` progress lines (``wait_log_interval``) go on until the timeout."""

    stall_abort: bool = _key(
        False, flag="--stall-abort", help="end the job when a rank stops (exit status 75)"
    )
    """When a rank's status has not changed for ``stall_warning`` plus two heartbeats
    (stopped, in a debugger, swapping, holding the GIL), the rank that finds it writes the
    job report and ends its process with exit status 75, so the launcher ends the job.
    Off: it warns, every ``wait_log_interval``, and the job waits (torch's collectives until
    their own timeout). The rank's main thread may be blocked inside torch's C++, where
    no exception can reach it: ending the process is the only sure way out."""

    log_level: LogLevel = _key("WARNING", env="DYNAMO_DIST_LOG")
    """Level of the ``dynamo_dist`` logger."""

    log_format: LogFormat = _key(LogFormat(_log.DEFAULT_FORMAT))
    """Layout of dynamo_dist's log lines: a ``logging`` %-style format with the fields of a
    ``LogRecord`` (``%(asctime)s``, ``%(levelname)s``, ``%(name)s``, ``%(process)d``...)
    and ``%(rank)s``; it must contain ``%(message)s``. The default, ``[rank0]:2026-12-07
    12:00:01,123 W dynamo_dist.cache: ...``, starts with the rank prefix of torch's own
    lines. Applies to the handler dynamo_dist adds, not to handlers an application put
    on the ``dynamo_dist`` logger itself."""

    report: str | None = _key(
        None, flag="--report", metavar="PATH", help="write the job report as JSON to PATH"
    )
    """Path of a JSON job report written by rank 0 at exit; None prints the table only."""

    report_verbose: bool = _key(False)
    """Rank 0's table at exit also lists each compiled region's exchanges, hits and waits
    per rank (``dynamo-dist report --verbose`` prints a saved report so)."""

    all_compiles: bool = _key(
        False,
        flag="--all-compiles",
        help="make every torch.compile in the workers a dynamo_dist.compile",
    )
    """Make every ``torch.compile`` in the program behave as ``dynamo_dist.compile``, for
    programs whose framework compiles for them (HF Trainer, accelerate, Lightning,
    torchtitan). Read when torch is first imported, by the import hook the package
    installs, from the environment or from the ``DYNAMO_DIST_CONFIG`` profile; the group is
    the whole world unless the program calls ``dynamo_dist.set_default_group``."""

    def __post_init__(self) -> None:
        _validate(self, source="arguments")


def _choice(key: str, allowed: tuple[str, ...]) -> Callable[[Any], str]:
    upper = all(a == a.upper() for a in allowed)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in {a.lower() for a in allowed}:
            raise _bad(key, value, "one of " + ", ".join(allowed))
        v = value.strip()
        return v.upper() if upper else v.lower()

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


def _log_format(key: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        problem = _log.format_problem(value)
        if problem is not None:
            raise _bad(key, value, f"{_log.FORMAT_RULE} ({problem})")
        return str(value)

    return check


def _check_for(key: str, hint: Any) -> Callable[[Any], Any]:
    """The check a field's annotation implies (a new kind of annotation needs a case here)."""
    if hint is LogFormat:
        return _log_format(key)
    if get_origin(hint) is Literal:
        return _choice(key, get_args(hint))
    if hint is bool:
        return _boolean(key)
    if hint is float:
        return _positive(key)
    if get_origin(hint) in (types.UnionType,) and set(get_args(hint)) == {str, type(None)}:
        return _optional_path(key)
    raise TypeError(f"Config.{key}: no check for annotation {hint!r}")


class LauncherFlag(NamedTuple):
    """A ``dynamo-dist-run`` option for one config key (no ``metavar``: an on/off switch)."""

    key: str
    flag: str
    metavar: str
    help: str


_HINTS = get_type_hints(Config)
_CHECKS: dict[str, Callable[[Any], Any]] = {
    f.name: _check_for(f.name, _HINTS[f.name]) for f in fields(Config)
}
# The one registry of environment variables (config key -> variable).
ENV_VARS: dict[str, str] = {
    f.name: f.metadata["env"] or f"DYNAMO_DIST_{f.name.upper()}" for f in fields(Config)
}
LAUNCHER_FLAGS: tuple[LauncherFlag, ...] = tuple(
    LauncherFlag(f.name, f.metadata["flag"], f.metadata["metavar"], f.metadata["help"])
    for f in fields(Config)
    if f.metadata["flag"]
)
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


def override(cfg: Config, **overrides: Any) -> Config:
    """``cfg`` with ``overrides`` (None = unset) applied and checked like call arguments."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
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


def describe() -> list[tuple[str, str, str, str, str]]:
    """(key, environment variable, launcher flag, default, doc) for every key: the reference."""
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
        (
            f.name,
            ENV_VARS[f.name],
            f.metadata["flag"] or "",
            repr(getattr(defaults, f.name)),
            docs.get(f.name, ""),
        )
        for f in fields(Config)
    ]


__all__ = [
    "ENV_VARS",
    "LAUNCHER_FLAGS",
    "Config",
    "describe",
    "from_env",
    "load_file",
    "resolve",
    "to_env",
]
