"""Shared precompile cache: one rank compiles each graph, the others load it.

The cache sits in front of the inductor backend. Every rank computes the same
key for the same graph (``graph_key``: versions, device, backend options,
compile arguments, the compiled function's source, the graph itself). The
first rank to take the key's lock is its leader: it compiles in a clean room
(a fresh ``TORCHINDUCTOR_CACHE_DIR``), so everything inductor writes for this
graph (AOTAutograd and FX graph cache entries, compiled kernel ``.so`` files)
lands in one place, and publishes that directory as the entry. Shipping the
kernels matters on CPU, where a Mega-Cache blob lacks them and loading it
still rebuilds every kernel with gcc. The other ranks wait for the entry,
verify it, unpack it into their own inductor cache and call inductor, which
then finds everything cached and compiles nothing. A restart finds the entry
at once.

Whatever goes wrong with the cache (unusable directory, corrupt or tampered
entry, a leader that died) costs at most a local compile: never the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._cache_store import (
    DiskStore,
    Entry,
    EntryRefused,
    alive_on_this_host,
    extract,
    merge_into,
)
from ._config import CACHE_SECRET_FILE_ENV, Config
from ._log import get_logger
from ._secret import cache_secret, untrusted_reason
from ._version import __version__

log = get_logger("cache")

_STALE_LOCK_S = 30.0
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def version_factors() -> dict[str, Any]:
    """What an entry must match exactly to be loaded, whatever the graph."""
    return {
        "torch": torch.__version__,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "dynamo_dist": __version__,
        "machine": platform.machine(),
    }


def _device_factor(example_inputs: list[Any]) -> list[str]:
    out = set()
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            d = x.device
            if d.type == "cuda":
                cap = torch.cuda.get_device_capability(d)
                out.add(f"cuda:{torch.cuda.get_device_name(d)}:sm{cap[0]}{cap[1]}")
            elif d.type == "cpu":
                out.add(f"cpu:{_cpu_flags()}")
            else:
                out.add(d.type)
    return sorted(out)


_cpu_flags_hash: str | None = None


def _cpu_flags() -> str:
    """A hash of the CPU's feature flags: kernels built for AVX-512 must not load elsewhere.

    Read from /proc/cpuinfo rather than inductor's ISA probe, which builds test
    programs with gcc: on the leader that first build must happen inside the
    clean room, so its results ship with the entry instead of being rebuilt by
    every follower (measured: 9 s of a 14 s warm start).
    """
    global _cpu_flags_hash
    if _cpu_flags_hash is None:
        flags = platform.processor()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
        _cpu_flags_hash = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return _cpu_flags_hash


def _describe_input(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return [
            "T",
            str(x.dtype),
            x.device.type,
            [str(s) for s in x.shape],
            [str(s) for s in x.stride()],
            bool(x.requires_grad),
        ]
    if isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ["S", str(x)]
    if isinstance(x, int | float | bool):
        return ["V", repr(x)]
    return ["O", type(x).__qualname__]


_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")


class UnkeyableGraph(Exception):
    """The graph's cache key cannot be computed; the graph is compiled uncached."""


def _constant_bytes(gm: torch.fx.GraphModule, target: str) -> bytes:
    """Everything that identifies one ``get_attr`` constant: its type, dtype, shape and bytes.

    Submodules (higher-order ops' bodies) are identified by their code, which ``gm.code``
    does not include.
    """
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            raise UnkeyableGraph(f"constant {target!r} is not an attribute of the graph")
        obj = getattr(obj, part)
    if isinstance(obj, torch.fx.GraphModule):
        return f"G:{target}:".encode() + obj.code.encode()
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_sparse or t.is_quantized or t.layout != torch.strided:
            raise UnkeyableGraph(f"constant {target!r} has layout {t.layout}")
        head = f"T:{target}:{t.dtype}:{list(t.shape)}:".encode()
        # view(uint8) works for every strided dtype, bfloat16 and float8 included,
        # where .numpy() does not.
        flat = t.cpu().contiguous().reshape(-1)
        return head + flat.view(torch.uint8).numpy().tobytes()
    if isinstance(obj, torch.nn.Module):
        raise UnkeyableGraph(f"constant {target!r} is a {type(obj).__qualname__} module")
    return f"O:{target}:{type(obj).__qualname__}:{obj!r}".encode()


def graph_key(
    gm: torch.fx.GraphModule, example_inputs: list[Any], static: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(key, factors) for one graph. Every factor is listed in the entry's manifest."""
    h = hashlib.sha256(gm.code.encode())
    # Placeholders' fake values carry symbolic sizes ("s52"); the example inputs
    # carry this rank's concrete sizes, which differ across ranks for one graph.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    metas = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    if len(metas) == len(example_inputs) and all(m is not None for m in metas):
        described = [_describe_input(m) for m in metas]
    else:
        described = [_describe_input(x) for x in example_inputs]
    h.update(json.dumps(described).encode())
    collectives = False
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            # Constants are part of what is compiled (rank-specific ones too). Any
            # failure here propagates: a key that silently left a constant out would
            # let two different graphs share one entry.
            h.update(_constant_bytes(gm, str(node.target)))
        ns = getattr(getattr(node.target, "namespace", None), "__str__", lambda: "")()
        if node.op == "call_function" and ns in _COLLECTIVE_NAMESPACES:
            collectives = True
    world = dist.get_world_size() if collectives and dist.is_initialized() else None
    factors = {
        **version_factors(),
        **static,
        "device": _device_factor(example_inputs),
        "graph": h.hexdigest(),
        # Code with collectives is specific to the world it was compiled for.
        "world_size": world,
    }
    key = hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()[:40]
    return key, factors


def source_hash(fn: Any) -> str:
    """Hash of the compiled function's source (the module's forward for nn.Modules)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        src = inspect.getsource(target)
    except (OSError, TypeError):
        src = getattr(getattr(target, "__code__", None), "co_code", b"").hex() or repr(target)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _inductor_cache_dir(path: Path) -> Iterator[None]:
    prev = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = prev


@contextlib.contextmanager
def _eager_backward() -> Iterator[None]:
    """Compile the backward inside the backend call, so one entry holds both graphs.

    Applied on every rank (leader and followers alike): it is part of
    AOTAutograd's configuration, hence of its cache key.
    """
    cfg = torch._functorch.config
    if not hasattr(cfg, "force_non_lazy_backward_lowering"):
        yield
        return
    with cfg.patch(force_non_lazy_backward_lowering=True):
        yield


def _local_inductor_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _private_local_dir() -> Path | None:
    """This rank's inductor cache directory if only this user can write it, else None.

    Verified entries are unpacked there and inductor reads them again later, so a
    directory someone else created first (the default is under /tmp) or can write
    would be a second way to get code loaded. Created with mode 0700 when absent; one
    of ours that nobody else can write is tightened to 0700. Warns once otherwise.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path = Path(os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        reason = untrusted_reason(path)
        if reason is None:
            st = os.stat(path)
            if st.st_uid != os.geteuid():
                reason = f"{path} is owned by uid {st.st_uid}, not by this user"
            elif st.st_mode & 0o077:
                # Ours, and untrusted_reason found it writable by nobody else.
                os.chmod(path, 0o700)
    except OSError as e:
        reason = f"{path}: {e.strerror or e}"
    if reason is None:
        return path
    _warn_once(
        f"local:{path}",
        "local inductor cache %s is not private (%s): shared cache entries are installed "
        "only into a directory owned by this user with mode 0700, and this rank does not "
        "lead compiles there either; compiling locally. Fix: chmod 700 it if it is yours, "
        "or set TORCHINDUCTOR_CACHE_DIR to a directory of your own with mode 0700.",
        path,
        reason,
    )
    return None


def _inductor_misses() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


_compile_seq = itertools.count(1)


def _next_compile() -> int:
    """The number of this process's next cached compile, over every cache directory.

    Every rank compiles the same sequence of graphs (that is what the guard exchange
    enforces), so the n-th compile is the same graph on every rank, even when ranks
    name their cache directories differently or a process uses several.
    """
    return next(_compile_seq)


class SharedCache:
    """One shared cache directory, as seen from this process."""

    def __init__(self, root: str, timeout: float, wait_log_interval: float, agree: bool) -> None:
        self.root = root
        self.store = DiskStore(root, cache_secret())  # ConfigError if misconfigured
        self.timeout = timeout
        self.wait_log_interval = wait_log_interval
        self.agree_across_ranks = agree
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.enabled = True
        self.counts = {
            "cache_hits": 0,
            "cache_misses": 0,
            "cache_loads": 0,
            "cache_publishes": 0,
            "cache_refused": 0,
            "cache_fallbacks": 0,
            "cache_bytes_read": 0,
            "cache_bytes_written": 0,
            "inductor_compiles": 0,
        }
        self.compile_seconds_saved = 0.0
        self._store_client: Any = None  # the job's store, opened on first agreement
        self._store_opened = False
        try:
            self.store.check_usable()
        except OSError as e:
            self.enabled = False
            _warn_once(
                f"unusable:{root}",
                "shared cache directory %s is unusable (%s: %s); training continues "
                "without the shared cache. Fix: point cache_dir / DYNAMO_DIST_CACHE_DIR "
                "at a writable directory every rank can reach.",
                root,
                type(e).__name__,
                e.strerror or e,
            )
        if self.enabled and self.store.secret is None:
            self._check_unsigned_is_safe()

    def _check_unsigned_is_safe(self) -> None:
        """Without a secret, load only from a directory nobody else can write.

        A sha256 in the manifest proves nothing: whoever can edit an entry can
        recompute it, and loading an entry runs its code on every rank.
        """
        reason = untrusted_reason(self.root)
        if reason is None:
            return
        self.enabled = False
        _warn_once(
            f"untrusted:{self.root}",
            "shared cache directory %s can be written by others (%s), and without a secret "
            "an entry cannot be told from a forged one: not loading unsigned entries from "
            "it; compiling without the shared cache. Fix: set %s to a file (mode 0600) "
            "holding a random secret on every rank, or use a private directory (owned by "
            "this user, mode 0700, no parent writable by others).",
            self.root,
            reason,
            CACHE_SECRET_FILE_ENV,
        )

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "compile_seconds_saved": round(self.compile_seconds_saved, 2),
            "cache_dir": self.root,
            "cache_enabled": self.enabled,
        }

    def _owner(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        }

    def _compile_counted(self, compile_fn: Callable[[], Any]) -> Any:
        before = _inductor_misses()
        try:
            return compile_fn()
        finally:
            self.counts["inductor_compiles"] += _inductor_misses() - before

    # -- the protocol ----------------------------------------------------------------
    def compile(
        self, key: str, factors: dict[str, Any], compile_fn: Callable[[], Any], label: str
    ) -> Any:
        # Numbered by compile, not by key: ranks compiling rank-specific graphs
        # (different keys) still meet at the same agreement.
        n = _next_compile()
        if not self.enabled or _private_local_dir() is None:
            # Neither load nor lead (no usable or trusted directory, or nowhere safe to
            # install: the clean room would be there too). Still report, so peers that
            # could use the cache need not wait out the timeout for this rank.
            return self.compile_uncached(compile_fn, n)
        with _eager_backward():
            try:
                role, entry, result = self._obtain(key, factors, compile_fn, label)
            except BaseException:
                # The compile itself failed (a leader's inductor error, say): report before
                # the error reaches Dynamo, or the other ranks wait for this one.
                self._abstain(n)
                raise
            staging: Path | None = None
            if role == "load":
                assert entry is not None
                staging = self._stage(entry)
            ok = role == "leader" or staging is not None
            # All or nothing: a rank installs the loaded entry only if every rank
            # could, so no rank runs different code for the same graph.
            if self.agree_across_ranks and self.world_size > 1:
                ok = self._agree(key, n, ok) and ok
            if role == "leader":
                return result
            if staging is not None and ok and entry is not None:
                try:
                    merge_into(staging, _local_inductor_dir())
                    self.counts["cache_loads"] += 1
                    self.compile_seconds_saved += float(entry.manifest.get("compile_seconds", 0))
                    log.info(
                        "loaded %s for %s (compiled by rank %s)",
                        key[:12],
                        label,
                        entry.manifest.get("owner", {}).get("rank"),
                    )
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            elif staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
                log.info("not every rank could load %s; compiling locally", key[:12])
            return self._compile_counted(compile_fn)

    def _get(self, key: str) -> Entry | None:
        try:
            return self.store.get(key, expect=version_factors())
        except EntryRefused as e:
            self.counts["cache_refused"] += 1
            log.warning(
                "refused shared cache entry %s (%s); moved it to %s and recompiling",
                key[:12],
                e,
                self.store.refused,
            )
            return None
        except OSError as e:
            _warn_once(
                f"read:{self.root}",
                "cannot read the shared cache %s (%s); compiling locally",
                self.root,
                e,
            )
            return None

    def _obtain(
        self, key: str, factors: dict[str, Any], compile_fn: Callable[[], Any], label: str
    ) -> tuple[str, Entry | None, Any]:
        """('load', entry, None), ('leader', None, compiled) or ('fallback', None, None)."""
        start = time.monotonic()
        next_log = start + self.wait_log_interval
        delay = 0.02
        first = True
        while True:
            entry = self._get(key)
            if entry is not None:
                if first:
                    self.counts["cache_hits"] += 1
                return "load", entry, None
            if first:
                self.counts["cache_misses"] += 1
                first = False
            try:
                lock = self.store.try_lock(key, self._owner())
            except OSError as e:
                _warn_once(
                    f"lock:{self.root}",
                    "cannot take locks in %s (%s); compiling locally",
                    self.root,
                    e,
                )
                return "fallback", None, None
            if lock is not None:
                try:
                    return "leader", None, self._lead(key, factors, compile_fn, label)
                finally:
                    lock.release()
            owner_info = self.store.lock_owner(key)
            if owner_info is None:
                continue  # released just now: look for the entry again
            owner, age = owner_info
            who = f"rank {owner.get('rank')} ({owner.get('host')}, pid {owner.get('pid')})"
            if alive_on_this_host(owner) is False or age > max(_STALE_LOCK_S, self.timeout / 4):
                log.warning(
                    "the leader compiling %s for %s, %s, is gone (no heartbeat for "
                    "%.0fs); taking over",
                    key[:12],
                    label,
                    who,
                    age,
                )
                self.store.break_lock(key)
                continue
            now = time.monotonic()
            if now - start >= self.timeout:
                self.counts["cache_fallbacks"] += 1
                log.warning(
                    "waited %.0fs for %s to publish %s (%s); compiling locally",
                    now - start,
                    who,
                    key[:12],
                    label,
                )
                return "fallback", None, None
            if now >= next_log:
                next_log = now + self.wait_log_interval
                log.warning(
                    "waiting for graph %s (%s) compiled by %s: %.0fs",
                    key[:12],
                    label,
                    who,
                    now - start,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _lead(
        self, key: str, factors: dict[str, Any], compile_fn: Callable[[], Any], label: str
    ) -> Any:
        local = _local_inductor_dir()
        room = local / "dynamo_dist" / "cleanroom" / f"{key}.{os.getpid()}"
        shutil.rmtree(room, ignore_errors=True)
        room.mkdir(parents=True)
        t0 = time.monotonic()
        with _inductor_cache_dir(room):
            result = self._compile_counted(compile_fn)
        seconds = time.monotonic() - t0
        manifest = {
            "factors": factors,
            "owner": self._owner(),
            "label": label,
            "compile_seconds": round(seconds, 3),
            "created": time.time(),
        }
        try:
            written = self.store.put(key, room, manifest)
            if written:
                self.counts["cache_publishes"] += 1
                self.counts["cache_bytes_written"] += written
                log.info(
                    "published %s for %s (%d bytes, compiled in %.1fs)",
                    key[:12],
                    label,
                    written,
                    seconds,
                )
        except OSError as e:
            _warn_once(
                f"write:{self.root}",
                "cannot publish to the shared cache %s (%s); "
                "training continues, other ranks will compile themselves",
                self.root,
                e,
            )
        # Keep this rank's own inductor cache warm too, for local restarts.
        with contextlib.suppress(OSError):
            merge_into(room, local)
        return result

    def _stage(self, entry: Entry) -> Path | None:
        staging = _local_inductor_dir() / "dynamo_dist" / "staging" / f"{entry.key}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.counts["cache_bytes_read"] += extract(entry, staging)
            return staging
        except (OSError, EntryRefused, Exception) as e:  # tarfile raises its own errors
            shutil.rmtree(staging, ignore_errors=True)
            self.counts["cache_refused"] += 1
            self.store.refuse(entry.path, f"unpacking failed: {e}")
            log.warning(
                "refused shared cache entry %s (unpacking failed: %s); recompiling",
                entry.key[:12],
                e,
            )
            return None

    def compile_uncached(self, compile_fn: Callable[[], Any], n: int | None = None) -> Any:
        """Compile without the cache, telling the other ranks not to wait for this one.

        For graphs this rank cannot use the cache for (no key, cache off here): every
        rank compiles the same sequence of graphs, so each one still takes part in the
        n-th agreement, as a "no".
        """
        self._abstain(_next_compile() if n is None else n)
        return self._compile_counted(compile_fn)

    def _abstain(self, n: int) -> None:
        if self.agree_across_ranks and self.world_size > 1:
            self._agree("-", n, False, wait=False)

    def _agree(self, key: str, n: int, ok: bool, wait: bool = True) -> bool:
        """True if every rank reported ok for its n-th compile; bounded by the timeout.

        ``wait=False`` only reports (a rank that compiles locally whatever the others say).
        """
        if not self._store_opened:
            from ._status import open_store

            # One client for the process: each open clones a TCP connection.
            self._store_client = open_store(self.timeout)
            self._store_opened = True
        store = self._store_client
        if store is None:
            return ok
        # Per restart: keys from an earlier attempt of an elastic job must not count.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base = f"dynamo_dist/cache/agree/{restart}/{n}"
        try:
            store.add(f"{base}/fail", 0 if ok else 1)
            store.add(f"{base}/done", 1)
            if not wait:
                return False
            deadline = time.monotonic() + self.timeout
            delay = 0.005
            while store.add(f"{base}/done", 0) < self.world_size:
                if time.monotonic() >= deadline:
                    log.warning(
                        "not every rank reported on cache entry %s within %.0fs; compiling locally",
                        key[:12],
                        self.timeout,
                    )
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            return store.add(f"{base}/fail", 0) == 0
        except Exception as e:
            log.warning("cache agreement failed (%s); compiling locally", e)
            return False


class CachingBackend:
    """A Dynamo backend: the shared cache in front of inductor."""

    def __init__(self, inner: Any, cache: SharedCache, static: dict[str, Any], label: str) -> None:
        self._inner = inner
        self._cache = cache
        self._static = static
        self._label = label

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        try:
            key, factors = graph_key(gm, example_inputs, self._static)
        except Exception as e:  # an unkeyable graph is compiled the plain way, and said so
            _warn_once(
                f"unkeyable:{self._label}:{type(e).__name__}",
                "a graph of %s is compiled without the shared cache: its cache key could not "
                "be computed (%s: %s)",
                self._label,
                type(e).__name__,
                e,
            )
            return self._cache.compile_uncached(lambda: self._inner(gm, example_inputs))
        return self._cache.compile(
            key, factors, lambda: self._inner(gm, example_inputs), self._label
        )


_caches: dict[str, SharedCache] = {}


def get_cache(cfg: Config, agree: bool) -> SharedCache:
    assert cfg.cache_dir is not None
    root = os.path.abspath(cfg.cache_dir)
    if root not in _caches:
        _caches[root] = SharedCache(root, cfg.timeout, cfg.wait_log_interval, agree)
    return _caches[root]


def stats() -> dict[str, Any]:
    """Cache counters summed over the cache directories this process uses."""
    out: dict[str, Any] = {}
    for c in _caches.values():
        for k, v in c.stats().items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out[k] = v
    return out
