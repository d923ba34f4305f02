"""A co-tenant against the cache: a victim and an attacker account on one host (issue 26).

Run as root, these tests start the victim's processes as one uid and plant the
attacker's files as another, both in one group (``setpriv``), as on a shared login
node where the victim's umask is 002. Skipped with the reason when not root or when the
victim's uid cannot run this Python.

* Row 1: a library and the matching ISA probe source planted in the victim's local
  inductor cache (group-writable, then ``chmod 700``'d by the victim) were copied into
  the leader's clean room, published and signed, then loaded on other hosts.
* Row 2: ``.tmp.<key>.*`` directories planted in a group-shared cache and swapped for
  FIFOs while the leader removed them: ``shutil.rmtree`` blocked for ever.
* Row 3: a local inductor directory owned by the co-tenant: profiles were staged there
  (a FIFO hung the rank; a link swap wrote where the attacker chose) and "compiling
  locally" compiled and loaded kernels from it.
* Issue 30: a lock the co-tenant planted in a locks directory it made (one the victim
  cannot write, so cannot take the lock over nor remove it) cost ``stale_after`` at every
  miss of its key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ranks

HERE = Path(__file__).resolve()
GROUP, VICTIM, ATTACKER = 3100, 3101, 3102
SECRET = "cotenant-" + "0123456789abcdef" * 3
PLANTED = b"\x7fELF-ATTACKER-LIBRARY-" + b"\x90" * 64


def _as(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={GROUP}", "--clear-groups"]


def _can_run_as(uid: int) -> str | None:
    if os.geteuid() != 0:
        return "needs root, to run the victim and the attacker as other uids (setpriv)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    probe = subprocess.run(
        [*_as(uid), sys.executable, "-c", "import dynamo_dist"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    if probe.returncode != 0:
        return f"uid {uid} cannot run {sys.executable} here: {probe.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def users() -> None:
    why = _can_run_as(VICTIM)
    if why:
        pytest.skip(why)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A sticky directory both accounts can write, like /tmp (pytest's is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="dd-cotenant-"))
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _victim_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, VICTIM, GROUP)
    os.chmod(path, mode)
    return path


def _attacker(*cmd: str) -> None:
    subprocess.run([*_as(ATTACKER), *cmd], check=True, timeout=60, cwd="/")


# -- row 1 ---------------------------------------------------------------------------------
def victim_job(rank: int, world: int, local_base: str) -> dict[str, Any]:
    """The victim's training step through the shared cache (real inductor).

    A plain ``torch.compile`` first runs inductor's CPU ISA probe outside any clean room,
    in the local cache the attacker filled: the leader's entry then used to be completed
    from that directory.
    """
    import torch

    import dynamo_dist

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"rank{rank}")
    torch.compile(lambda x: x.sin() + 1, backend="inductor")(torch.randn(8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    cm = dynamo_dist.compile(model)
    x = torch.randn(4, 8)
    y = cm(x)
    y.sum().backward()
    return {"ok": bool(torch.allclose(y, model(x), atol=1e-5)), "stats": dynamo_dist.stats()}


def _planted_members(cache: Path) -> list[str]:
    hits = []
    for tar_path in cache.rglob("artifact.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                fh = tar.extractfile(m) if m.isfile() else None
                if fh is not None and PLANTED in fh.read():
                    hits.append(f"{tar_path}!{m.name}")
    return hits


@pytest.mark.multiproc
@pytest.mark.inductor
@pytest.mark.timeout(900)
def test_files_planted_in_the_local_cache_are_never_signed(users: None, shared_tmp: Path) -> None:
    from dynamo_dist.dynamo import inductor

    probes = sorted(inductor.isa_probe_sources())
    if not probes:
        pytest.skip("this torch's ISA probe sources are not recognised")
    home = _victim_dir(shared_tmp / "home")
    cache = _victim_dir(shared_tmp / "cache", 0o770)
    secret = home / "secret"
    secret.write_text(SECRET)
    os.chown(secret, VICTIM, GROUP)
    os.chmod(secret, 0o600)
    local = _victim_dir(shared_tmp / "local", 0o755)
    out = _victim_dir(shared_tmp / "out", 0o755)
    for r in (0, 1):
        # torch creates its cache with the umask: 0775 under umask 002.
        d = _victim_dir(local / f"rank{r}", 0o775)
        for i, source in enumerate(probes):
            sub = f"p{i:x}"
            _attacker("mkdir", "-p", str(d / sub))
            src = shared_tmp / f"probe{i}.cpp"
            src.write_text(source + "\n")
            lib = shared_tmp / "planted.so"
            lib.write_bytes(PLANTED)
            _attacker("cp", str(src), str(d / sub / "probe.cpp"))
            _attacker("cp", str(lib), str(d / sub / "probe.so"))
        os.chmod(d, 0o700)  # what dynamo_dist's warning used to advise
    env = {
        "DYNAMO_DIST_CACHE_DIR": str(cache),
        "DYNAMO_DIST_CACHE_SECRET_FILE": str(secret),
        "HOME": str(home),
        "DYNAMO_DIST_LOG": "INFO",
    }
    # The victim's job runs as this uid (its torchrun spawns workers through the venv's
    # interpreter, which another uid may not be able to reach); the attacker's files are
    # the other account's, planted through setpriv.
    for p in (home, cache, secret, local, out, *local.iterdir()):
        os.chown(p, os.geteuid(), GROUP)
    run = ranks.launch(HERE, "victim_job", str(local), tmp=out, env=env, timeout=800)
    for r in (0, 1):
        assert run.rank(r)["ok"], run.output[-4000:]
    assert sum(run.rank(r)["stats"]["cache_publishes"] for r in (0, 1)) >= 1, run.output[-4000:]
    assert list(cache.rglob("artifact.tar")), "nothing was published"
    assert _planted_members(cache) == []


# -- row 2 ---------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_planted_publish_leftovers_never_block_the_leader(
    users: None, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group-shared signed cache: the attacker's backdated ``.tmp.<key>.*`` directories
    (FIFOs and links inside, and one swapped for a FIFO between the leader's look and its
    removal) are removed, or left, without blocking and without following a link."""
    from dynamo_dist.cache.store import DiskStore

    key = "ab" * 20
    cache = _victim_dir(shared_tmp / "cache", 0o775)
    keep = _victim_dir(shared_tmp / "victim-data", 0o755)
    (keep / "precious").write_text("mine")
    store = DiskStore(cache, SECRET)
    store.check_usable()
    for p in (cache / "entries", cache / "entries" / store.namespace):
        os.chmod(p, 0o777)
    shard = cache / "entries" / store.namespace / key[:2]
    shard.mkdir(mode=0o777)
    os.chmod(shard, 0o777)
    old = time.time() - 2 * 3600
    for name in ("a", "b"):
        tmp = shard / f".tmp.{key}.{name}"
        _attacker("mkdir", "-p", str(tmp / "sub"))
        _attacker("mkfifo", str(tmp / "fifo"), str(tmp / "sub" / "fifo"))
        _attacker("ln", "-s", str(keep), str(tmp / "link"))
        os.utime(tmp, (old, old))
    real_open = os.open
    swapped: list[str] = []

    def swap_then_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # Between the leader's look at a leftover and its opening it for removal, the
        # attacker swaps the directory for a FIFO (a test hook instead of a won race).
        name = os.fsdecode(path)
        if name == f".tmp.{key}.b" and not swapped:
            swapped.append(name)
            shutil.rmtree(shard / name)
            os.mkfifo(shard / name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swap_then_open)
    room = shared_tmp / "room"
    room.mkdir()
    (room / "k.cpp").write_text("kernel")
    assert store.put(key, ranks.members(room), {"created": time.time()}) > 0
    monkeypatch.undo()
    assert swapped, "the leader never opened the leftover it removes"
    assert not (shard / f".tmp.{key}.a").exists()
    assert (keep / "precious").read_text() == "mine"
    assert store.get(key) is not None


# -- row 3 ---------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_local_cache_the_cotenant_owns_is_replaced(
    users: None, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker pre-created ``torchinductor_<victim>``: nothing is staged, compiled or
    loaded there; the victim's ranks switch to one private replacement and say so."""
    theirs = shared_tmp / "torchinductor_victim"
    _attacker("mkdir", "-m", "0777", str(theirs))
    _attacker("mkfifo", str(theirs / "code_state.pkl"))
    home = _victim_dir(shared_tmp / "home")
    script = f"""
import os, stat, sys
os.environ["TORCHINDUCTOR_CACHE_DIR"] = {str(theirs)!r}
from dynamo_dist.cache.localdir import private_local_dir, local_inductor_dir
local = private_local_dir()
assert local is not None
from dynamo_dist.cache.rooms import staging_dir
assert local == local_inductor_dir(), (local, local_inductor_dir())
assert str(local).startswith({str(home)!r}), local
assert stat.S_IMODE(os.stat(local).st_mode) == 0o700
assert staging_dir(local, "pgo").parent == local
assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(local)
print("replaced with", local)
"""
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CACHE_HOME", None)
    done = subprocess.run(
        [*_as(VICTIM), sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "is not private" in done.stderr and "TORCHINDUCTOR_CACHE_DIR to a new, empty" in done.stderr
    )
    assert sorted(p.name for p in theirs.iterdir()) == ["code_state.pkl"]  # untouched
    assert stat.S_ISFIFO(os.lstat(theirs / "code_state.pkl").st_mode)


# -- issue 30: a planted lock the victim cannot take over ------------------------------------
_STUCK_LOCK_WORKER = """
import json, sys
from dynamo_dist._log import configure
from dynamo_dist.cache import key as cache_key, protocol
configure()  # levels on every line (DYNAMO_DIST_LOG=INFO), as a job's ranks log
root, key = sys.argv[1:3]
# timeout 120: stale_after is its floor, 30 s; the wait log every 2 s shows any wait.
cache = protocol.SharedCache(root, 120.0, 2.0, agree=False)
outs = []
for i in range(3):  # three misses of one key: identical blocks of a model, say
    print(f"-- miss {i}", file=sys.stderr, flush=True)
    outs.append(cache.compile(key, cache_key.version_factors(), lambda: "compiled", "f (t.py:1)"))
print(json.dumps({"outs": outs, "stats": cache.stats()}), flush=True)
"""


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_planted_lock_that_cannot_be_taken_over_is_waited_out_once(
    users: None, shared_tmp: Path, kind: str
) -> None:
    """The co-tenant makes the victim's ``locks/<ns>/`` first (mode 0755, so the victim can
    neither take a lock over there nor remove one) with a lock of one key in it: a file
    that never beats, or a directory. Every miss of that key used to wait ``stale_after``
    (30 s here) and then compile locally; now only the first waits (a file: its silence
    has to be seen; a directory is no lock at all), the later ones compile at once, and
    one WARNING names the lock, its owner and the fix."""
    from dynamo_dist.cache.store import DiskStore

    key = "5e" * 20
    home = _victim_dir(shared_tmp / "home")
    secret = home / "secret"
    secret.write_text(SECRET)
    os.chown(secret, VICTIM, GROUP)
    os.chmod(secret, 0o600)
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o1777)  # a shared cache like /tmp: anyone may create its parts
    locks = DiskStore(cache, SECRET).locks
    _attacker("mkdir", "-m", "0755", "-p", str(locks))
    lock = locks / f"{key}.0.lock"
    _attacker(*(["mkdir", str(lock)] if kind == "dir" else ["sh", "-c", f"echo {{}} > {lock}"]))
    env = {
        **os.environ,
        "HOME": str(home),
        "DYNAMO_DIST_CACHE_SECRET_FILE": str(secret),
        "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor"),
        "DYNAMO_DIST_LOG": "INFO",
        "PYTHONPATH": os.pathsep.join([str(ranks.ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [*_as(VICTIM), sys.executable, "-c", _STUCK_LOCK_WORKER, str(cache), key],
        capture_output=True,
        text=True,
        timeout=360,
        env=env,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["outs"] == ["compiled"] * 3 and res["stats"]["cache_publishes"] == 0, res
    log = done.stderr
    warnings = [
        ln for ln in log.splitlines() if re.search(r" W dynamo_dist[.\w]*: shared cache lock", ln)
    ]
    assert len(warnings) == 1, log[-4000:]
    (line,) = warnings
    assert str(lock) in line and f"owner uid {ATTACKER}" in line, line
    assert "rm -r" in line and "dynamo-dist cache clear" in line, line
    # Only the first miss waited (a file's silence must be seen once), none after it.
    later = log.split("-- miss 1", 1)[1]
    assert "waiting for graph" not in later, later[-3000:]
    if kind == "dir":
        assert "waiting for graph" not in log, log[-3000:]
    assert lock.exists()  # not the victim's to remove


if __name__ == "__main__":
    ranks.main(globals())
