"""``dynamo-dist cache``: a hostile, moving, partly unreadable cache directory (issue 14).

Every file in the cache may have been written by someone else, and jobs publish,
refuse and prune entries while the CLI runs. Each command must end with a line
that names the path, the cause and the fix, never with a traceback; it must print
nothing raw that came from the directory; and it must not leak storage (incomplete
publishes, refused boxes) or remove what is still in use (live locks).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import ranks

from dynamo_dist.cache import key as cache_key
from dynamo_dist.cache.lock import Locks
from dynamo_dist.cache.store import MARKER, DiskStore

_cli = ranks.cli  # in this process: a subprocess per call would import torch anew
KEYS = [c * 40 for c in "123456"]
NOBODY = 65534


def _room(tmp_path: Path, name: str, payload: bytes = b"kernel") -> Path:
    room = tmp_path / name
    (room / "ab").mkdir(parents=True)
    (room / "ab" / "cabc.so").write_bytes(payload)
    return room


def _put(store: DiskStore, key: str, tmp_path: Path, size: int = 1000, **manifest: object) -> Path:
    room = _room(tmp_path, f"room-{key[:4]}-{time.monotonic_ns()}", b"x" * size)
    body = {
        "factors": dict(cache_key.version_factors()),
        "owner": {"rank": 0},
        "created": time.time(),
        "label": "f",
    }
    store.put(key, ranks.members(room), {**body, **manifest})
    return store.entry_dir(key)


def _cache_with(tmp_path: Path, n: int = 1) -> DiskStore:
    store = DiskStore(tmp_path / "c")
    store.check_usable()  # creates the cache, and so marks it
    assert (store.root / MARKER).exists()
    for key in KEYS[:n]:
        _put(store, key, tmp_path)
    return store


def _rewrite(entry: Path, raw: str) -> None:
    """Replace the manifest text (unsigned: the manifest itself carries no checksum)."""
    (entry / "manifest.json").write_text(raw)


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    text = r.stdout + r.stderr
    assert "Traceback" not in text and "unexpected" not in text, text


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert lines, (r.returncode, r.stdout)
    return lines[-1]


# -- malformed manifests -------------------------------------------------------------
def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


MANIFESTS = {
    "list": "[]",
    "null": "null",
    "deep": _deep(),
    "deep-created": '{"created": ' + _deep() + "}",
    "garbage": "\x00\xff{",
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_a_malformed_manifest_is_a_bad_row_not_a_traceback(tmp_path, name):
    store = _cache_with(tmp_path, 2)
    _rewrite(store.entry_dir(KEYS[0]), MANIFESTS[name])
    ls = _cli("ls", str(store.root))
    _no_traceback(ls)
    assert ls.returncode == 0 and "2 entries" in ls.stdout and " NO " in ls.stdout, ls.stdout
    v = _cli("verify", str(store.root))
    _no_traceback(v)
    assert v.returncode == 1 and "1 of 2 entries valid" in v.stdout, v.stdout
    p = _cli("prune", str(store.root), "--older-than", "1000d")
    _no_traceback(p)
    assert p.returncode == 0 and "removed 0 entries" in p.stdout, p.stdout


def _valid_but_odd(store: DiskStore, tmp_path: Path, key: str, **fields: str) -> Path:
    """A valid entry whose manifest fields are replaced by raw JSON text."""
    entry = store.entry_dir(key)
    man = json.loads((entry / "manifest.json").read_text())
    for k in fields:
        man[k] = f"@@{k}@@"
    raw = json.dumps(man)
    for k, v in fields.items():
        raw = raw.replace(f'"@@{k}@@"', v)
    _rewrite(entry, raw)
    return entry


ODD = {
    "created-text": {"created": '"x"'},
    "created-1e400": {"created": "1e400"},
    "created-nan": {"created": "NaN"},
    "created-minus-inf": {"created": "-Infinity"},
    "created-huge-int": {"created": "1" + "0" * 400},
    "created-true": {"created": "true"},
    "factors-list": {"factors": "[]"},
    "label-number": {"label": "5"},
    "label-object": {"label": '{"a": [1, 2]}'},
    "label-deep": {"label": "[" * 500 + "]" * 500},
    "torch-object": {"factors": '{"torch": {"v": 1}}'},
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_manifest_fields_never_traceback(tmp_path, name):
    store = _cache_with(tmp_path, 2)
    _valid_but_odd(store, tmp_path, KEYS[0], **ODD[name])
    for args in (
        ("ls",),
        ("verify",),
        ("prune", "--older-than", "1000d"),
        ("prune", "--max-size", "1G"),
    ):
        r = _cli(args[0], str(store.root), *args[1:])
        _no_traceback(r)
        assert r.returncode in (0, 1), (args, r.stdout, r.stderr)
        # Sizes and ages stay numbers (the problem text may quote the odd value).
        shown = "\n".join(ln.split("(")[0] for ln in r.stdout.splitlines())
        assert "inf" not in shown and "nan" not in shown.lower(), r.stdout
    ls = _cli("ls", str(store.root))
    assert "2 entries" in ls.stdout and ls.stdout.splitlines()[1].split()[2] != "?", ls.stdout
    assert store.entry_dir(KEYS[0]).exists(), "a fresh entry is not pruned by --older-than 1000d"


# -- permissions: a real EACCES, for root too ------------------------------------------
# Root ignores permission bits; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH they
# apply to it like to anyone. (Running as another user instead would fail where the
# interpreter lives in a private directory, as in CI's fresh venv.)
pytestmark_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to drop root's permission override",
)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory user 65534 can reach (pytest's tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="dd-cli-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in [d, *d.rglob("*")]:  # give back what the test took away
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(d)


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dynamo_dist cache ARGS`` bound by permission bits, in a subprocess."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}
    env.pop("DYNAMO_DIST_CACHE_SECRET", None)
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run(
        [*cmd, sys.executable, "-m", "dynamo_dist", "cache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd="/tmp",
    )


@pytestmark_user
def test_unreadable_directories_as_another_user(shared_tmp):
    store = _cache_with(shared_tmp, 2)
    root = store.root
    root.chmod(0o000)
    r = _as_nobody("ls", str(root))
    _no_traceback(r)
    line = _last_line(r)
    assert r.returncode == 2 and str(root) in line, line
    assert "Permission denied" in line and "chmod" in line, line
    root.chmod(0o755)
    (root / "entries").chmod(0o000)
    for cmd in ("ls", "verify"):
        r = _as_nobody(cmd, str(root))
        _no_traceback(r)
        line = _last_line(r)
        assert r.returncode == 2 and str(root / "entries") in line, line
        assert "Permission denied" in line, line
    (root / "entries").chmod(0o755)
    store.entries.joinpath(KEYS[1][:2]).chmod(0o000)  # one shard: the rest is still listed
    r = _as_nobody("ls", str(root))
    _no_traceback(r)
    assert r.returncode == 1 and "1 entries" in r.stdout, (r.stdout, r.stderr)
    assert "incomplete" in _last_line(r) and KEYS[1][:2] in _last_line(r)


@pytestmark_user
def test_a_read_only_cache_can_be_listed_and_verified(shared_tmp):
    """A read-only tree (0555): ls and verify work, prune says why not."""
    store = _cache_with(shared_tmp, 2)
    (store.entries / "ab" / ".tmp.ab.0").mkdir(parents=True)
    (store.entries / "ab" / ".tmp.ab.0" / "artifact.tar").write_bytes(b"x" * 10)
    for d in [store.root, *store.root.rglob("*")]:
        if d.is_dir() and not d.is_symlink():
            d.chmod(0o555)
    ls = _as_nobody("ls", str(store.root))
    _no_traceback(ls)
    assert ls.returncode == 0 and "2 entries" in ls.stdout and ls.stdout.count(" yes ") == 2
    v = _as_nobody("verify", str(store.root))
    _no_traceback(v)
    assert v.returncode == 0 and "2 of 2 entries valid" in v.stdout, (v.stdout, v.stderr)
    p = _as_nobody("prune", str(store.root), "--max-size", "1")
    _no_traceback(p)
    assert p.returncode == 1 and "could not remove" in p.stderr, (p.stdout, p.stderr)
    assert "Permission denied" in p.stderr and "may write" in p.stderr
    assert all(store.entry_dir(k).exists() for k in KEYS[:2])


# -- entries moving while the CLI reads -----------------------------------------------
CHURN = textwrap.dedent(
    """
    import os, random, shutil, sys, time
    root, tpl, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    ns = os.path.join(root, "entries", "unsigned")
    refused = os.path.join(root, "refused", "unsigned")
    locks = os.path.join(root, "locks", "unsigned")
    keys = sorted(os.listdir(tpl))
    rnd = random.Random(14)
    deadline = time.time() + 100
    i = 0
    def quiet(fn, *a):
        try:
            fn(*a)
        except OSError:
            pass
    while not os.path.exists(stop) and time.time() < deadline:
        i += 1
        key = rnd.choice(keys)
        shard = os.path.join(ns, key[:2])
        entry = os.path.join(shard, key)
        op = i % 8
        if op == 0:  # publish: a .tmp directory renamed into place
            tmp = os.path.join(shard, ".tmp.%s.%x" % (key, i))
            quiet(os.makedirs, shard, 0o755, True)
            quiet(shutil.copytree, os.path.join(tpl, key), tmp)
            quiet(os.rename, tmp, entry)
            quiet(shutil.rmtree, tmp)
        elif op == 1:  # refuse: moved into a box
            box = os.path.join(refused, "%s.%d" % (key, i))
            quiet(os.makedirs, box, 0o700)
            quiet(os.rename, entry, os.path.join(box, "entry"))
        elif op == 2:  # prune a box or an entry
            for d in (refused, shard):
                try:
                    names = os.listdir(d)
                except OSError:
                    continue
                if names:
                    quiet(shutil.rmtree, os.path.join(d, rnd.choice(names)))
        elif op == 3:  # locks come and go
            quiet(os.makedirs, locks, 0o755, True)
            p = os.path.join(locks, key + ".lock")
            try:
                open(p, "x").close()
            except OSError:
                quiet(os.unlink, p)
        elif op == 4:  # a file inside an entry vanishes or an entry becomes a file
            quiet(os.unlink, os.path.join(entry, rnd.choice(["artifact.tar", "manifest.json"])))
            quiet(os.rmdir, entry)
            if rnd.random() < 0.5:
                try:
                    open(entry, "x").close()
                except OSError:
                    pass
        elif op == 5:  # ... or a link, or the file goes
            quiet(os.unlink, entry)
            quiet(os.symlink, "/etc", entry)
        elif op == 6:  # whole shards vanish
            quiet(shutil.rmtree, shard)
            quiet(os.unlink, shard)
        else:  # an incomplete publish left behind, and removed again
            tmp = os.path.join(shard, ".tmp.%s.x%d" % (key, i % 3))
            quiet(shutil.copytree, os.path.join(tpl, key), tmp)
            quiet(shutil.rmtree, os.path.join(shard, ".tmp.%s.x%d" % (key, (i + 1) % 3)))
    """
)


def test_commands_survive_entries_moving_under_them(tmp_path):
    """ls crashed in 10 of 15 runs while jobs published, refused and pruned entries."""
    store = _cache_with(tmp_path, len(KEYS))
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    for key in KEYS:
        shutil.copytree(store.entry_dir(key), tpl / key)
    stop = tmp_path / "stop"
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(store.root), str(tpl), str(stop)])
    try:
        runs = [
            ("ls",),
            ("verify",),
            ("prune", "--older-than", "1000d"),
            ("ls",),
            ("prune", "--max-size", "3K"),
        ]
        for i in range(20):
            for args in runs:
                r = _cli(args[0], str(store.root), *args[1:])
                _no_traceback(r)
                assert r.returncode in (0, 1), (i, args, r.stdout, r.stderr)
                assert r.stdout.strip(), (i, args, r.stderr)
        c = _cli("clear", str(store.root))  # watches the (moving) locks for 5 s
        _no_traceback(c)
        assert c.returncode in (0, 1) and "removed" in c.stdout, (c.stdout, c.stderr)
    finally:
        stop.touch()
        churn.wait(timeout=60)
    assert churn.returncode == 0


# -- nothing raw on the terminal ----------------------------------------------------------
def test_text_from_the_cache_is_printed_escaped(tmp_path):
    store = _cache_with(tmp_path, 1)
    _put(store, KEYS[1], tmp_path, label="\x1b[2J\x1b[Hall good\x07")
    _put(store, KEYS[2], tmp_path, label="plain graph (mine) \\ ok")
    entry = store.entry_dir(KEYS[3][:2] + "\x1b]0;pwned\x07")
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text(json.dumps({"format": 1, "label": "\x1b[31m"}))
    man = json.loads((store.entry_dir(KEYS[0]) / "manifest.json").read_text())
    man["factors"]["torch"] = "2.\x1b[8m13"
    _rewrite(store.entry_dir(KEYS[0]), json.dumps(man))
    (store.entries / "ab" / ".tmp.\x1b[1Aevil.00").mkdir(parents=True)
    # Not UTF-8: printed raw, the surrogate would make print() raise UnicodeEncodeError.
    os.makedirs(os.fsencode(store.entries) + b"/55/55\xff\xfe")
    outs = [_cli(c, str(store.root)) for c in ("ls", "verify")]
    outs.append(_cli("prune", str(store.root), "--max-size", "1"))
    for r in outs:
        text = r.stdout + r.stderr
        assert "\x1b" not in text and "\x07" not in text, text
        _no_traceback(r)
    ls, verify = outs[0].stdout, outs[1].stdout
    assert "\\x1b[2J\\x1b[Hall good\\x07" in ls and "2.\\x1b[8m13" in ls, ls
    assert "plain graph (mine) \\ ok" in ls, "plain text is unchanged"
    assert "\\x1b]0;pwned\\x07" in verify and "55\\udcff\\udcfe" in verify, verify


# -- dates in the future ------------------------------------------------------------------
def _date(entry: Path, when: float) -> None:
    for p in (entry, *entry.iterdir()):
        os.utime(p, (when, when), follow_symlinks=False)


def test_a_date_in_the_future_is_not_trusted(tmp_path):
    """created: now + 10 years made an entry unprunable (negative age)."""
    store = _cache_with(tmp_path, 0)
    now = time.time()
    future = now + 10 * 365 * 86400
    old = _put(store, KEYS[0], tmp_path, created=now - 5 * 86400)  # the oldest trusted
    skew = _put(store, KEYS[1], tmp_path, created=future)  # falls back to the mtime: now
    lie = _put(store, KEYS[2], tmp_path, created=future)  # mtime in the future too
    _date(lie, future)
    _put(store, KEYS[3], tmp_path)
    nan = _valid_but_odd(store, tmp_path, KEYS[3], created="NaN")
    _date(nan, now - 3 * 86400)
    young = _put(store, KEYS[4], tmp_path, created=now)
    ls = _cli("ls", str(store.root))
    _no_traceback(ls)
    rows = {line[:12]: line for line in ls.stdout.splitlines()[1:]}
    assert "age unknown" in rows[KEYS[2][:12]] and " ? " in rows[KEYS[2][:12]], ls.stdout
    assert "age unknown" not in rows[KEYS[1][:12]], "a future date falls back to the mtime"
    assert "3.0d" in rows[KEYS[3][:12]], "NaN falls back to the mtime"
    # --older-than: the unknown age goes, whatever the threshold; the mtime decides for skew.
    p = _cli("prune", str(store.root), "--older-than", "4d")
    assert p.returncode == 0, p.stderr
    assert "removed 2 entries" in p.stdout and "unknown age" in p.stdout, p.stdout
    assert not lie.exists() and not old.exists() and skew.exists() and nan.exists()
    # --max-size: unknown ages go first, then the oldest (nan: 3 days by its mtime).
    lie = _put(store, KEYS[2], tmp_path, created=future)
    _date(lie, future)
    one = sum(f.stat().st_size for f in young.iterdir())
    p = _cli("prune", str(store.root), "--max-size", str(2 * one + 10))
    assert "removed 2 entries" in p.stdout and "unknown age" in p.stdout, p.stdout
    assert not lie.exists() and not nan.exists() and skew.exists() and young.exists()


# -- storage leaks ------------------------------------------------------------------------
def _tmp_publish(store: DiskStore, key: str, age: float) -> Path:
    """What a leader killed mid-publish leaves: entries/<ns>/<kk>/.tmp.<key>.<hex>."""
    tmp = store.entries / key[:2] / f".tmp.{key}.00ff00ff00ff00ff"
    tmp.mkdir(parents=True)
    (tmp / "artifact.tar").write_bytes(b"t" * 4096)
    _date(tmp, time.time() - age)
    return tmp


def test_incomplete_publishes_are_listed_pruned_and_cleared(tmp_path):
    store = _cache_with(tmp_path, 1)
    dead = _tmp_publish(store, KEYS[1], 2 * 3600)
    busy = _tmp_publish(store, KEYS[2], 60)
    ls = _cli("ls", str(store.root))
    assert "1 entries" in ls.stdout and "2 incomplete publishes, 8.0 KiB" in ls.stdout, ls.stdout
    assert ls.stdout.count("(incomplete publish .tmp.") == 2
    # Whatever the flags: a dead leader's directory goes after an hour, a live one stays.
    p = _cli("prune", str(store.root), "--older-than", "1000d")
    assert p.returncode == 0 and "1 stale incomplete publishes (4.0 KiB)" in p.stdout, p.stdout
    assert not dead.exists() and busy.exists() and store.entry_dir(KEYS[0]).exists()
    c = _cli("clear", str(store.root))
    assert c.returncode == 0 and "1 incomplete publishes" in c.stdout, c.stdout
    assert not busy.exists()


def test_an_incomplete_publish_dated_in_the_future_is_pruned_by_its_change_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 30: a ``.tmp.*`` dated ahead of the clock (``touch -d``, or written before a
    clock was stepped back) had an unknown age and was never pruned. Its files' ctime,
    which nobody can set, dates it now: pruned an hour after its last change."""
    from dynamo_dist.tools import cache_dir

    store = _cache_with(tmp_path, 1)  # the entry stays: --max-size leaves room for it
    ahead = _tmp_publish(store, KEYS[1], -10 * 365 * 86400)  # mtimes 10 years ahead
    p = _cli("prune", str(store.root), "--max-size", "1T")
    assert p.returncode == 0 and "0 stale incomplete publishes" in p.stdout, p.stdout
    assert ahead.exists(), "changed just now: a publish may still be filling it"
    real = time.time
    # This host's clock behind the file server's: even the ctime lies ahead. Kept, said.
    monkeypatch.setattr(cache_dir, "time", SimpleNamespace(time=lambda: real() - 2 * 3600))
    p = _cli("prune", str(store.root), "--max-size", "1T")
    assert ahead.exists() and "even by their change time" in p.stdout, p.stdout
    monkeypatch.setattr(cache_dir, "time", SimpleNamespace(time=lambda: real() + 2 * 3600))
    p = _cli("prune", str(store.root), "--max-size", "1T")
    assert p.returncode == 0 and "1 stale incomplete publishes" in p.stdout, p.stdout
    assert not ahead.exists() and store.entry_dir(KEYS[0]).exists()


def _refuse(store: DiskStore, key: str, age: float) -> Path:
    store.refuse(store.entry_dir(key), "test: corrupt")
    (box,) = [b for b in store.refused.iterdir() if b.name.startswith(key[:12])]
    for p in [box, *box.rglob("*")]:
        os.utime(p, (time.time() - age,) * 2, follow_symlinks=False)
    return box


def test_refused_boxes_count_and_go_first(tmp_path):
    store = _cache_with(tmp_path, 4)
    for i, key in enumerate(KEYS[:3]):  # three valid entries, 3, 2 and 1 days old
        man = json.loads((store.entry_dir(key) / "manifest.json").read_text())
        man["created"] = time.time() - (3 - i) * 86400
        _rewrite(store.entry_dir(key), json.dumps(man))
    old_box = _refuse(store, KEYS[3], 10 * 86400)
    _put(store, KEYS[4], tmp_path)
    new_box = _refuse(store, KEYS[4], 0)  # refused just now: newer than every valid entry
    one = sum(f.stat().st_size for f in store.entry_dir(KEYS[0]).iterdir())
    ls = _cli("ls", str(store.root))
    assert "3 entries" in ls.stdout and "2 refused" in ls.stdout, ls.stdout
    p = _cli("prune", str(store.root), "--older-than", "5d")
    assert "0 entries" in p.stdout and "1 refused" in p.stdout, p.stdout
    assert not old_box.exists() and new_box.exists()
    # --max-size counts refused/: room for three entries and the box is over; the box goes.
    p = _cli("prune", str(store.root), "--max-size", str(3 * one + 100))
    assert "removed 0 entries" in p.stdout and "1 refused" in p.stdout, p.stdout
    assert not new_box.exists() and all(store.entry_dir(k).exists() for k in KEYS[:3])


def test_clear_keeps_live_locks(tmp_path):
    store = _cache_with(tmp_path, 1)
    live = Locks(store).acquire(KEYS[1], {"host": "h", "pid": os.getpid()})
    assert live is not None  # its heartbeat touches the lock every 2 s
    store.locks.mkdir(parents=True, exist_ok=True)
    dead = [store.locks / f"{KEYS[2]}.lock", store.locks / f"{KEYS[3]}.7.lock"]
    for p in dead:
        p.write_text("{}")
    other = store.root / "locks" / "k-0123"
    other.mkdir()
    (other / f"{KEYS[4]}.lock").write_text("{}")
    toucher_stop = threading.Event()
    second = other / f"{KEYS[5]}.1.lock"  # a holder of the new scheme, touching it itself
    second.write_text("{}")

    def hold() -> None:
        while not toucher_stop.wait(1.0):
            os.utime(second)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        c = _cli("clear", str(store.root))
    finally:
        toucher_stop.set()
        t.join(timeout=10)
        live.release()
    assert c.returncode == 0, c.stderr
    assert "kept 2 live locks" in c.stdout and "3 stale locks" in c.stdout, c.stdout
    assert second.exists() and not any(p.exists() for p in dead)
    assert not (other / f"{KEYS[4]}.lock").exists()
    assert not store.entry_dir(KEYS[0]).exists()


def test_clear_without_locks_does_not_wait_and_removes_locks_dir(tmp_path):
    store = _cache_with(tmp_path, 1)
    c = _cli("clear", str(store.root))
    assert c.returncode == 0 and "watching" not in c.stdout and "kept 0 live locks" in c.stdout
    assert not (store.root / "locks").exists() and not (store.root / "entries").exists()


def test_missing_or_non_directory_path_is_one_line(tmp_path):
    for target in (tmp_path / "nope", tmp_path / "file"):
        if target.name == "file":
            target.write_text("x")
        for cmd in ("ls", "verify", "clear"):
            r = _cli(cmd, str(target))
            _no_traceback(r)
            assert r.returncode == 2 and str(target) in _last_line(r), (cmd, r.stderr)
    assert stat.S_ISREG((tmp_path / "file").stat().st_mode)


def test_clear_keeps_the_lock_of_a_frozen_leader_of_this_host(tmp_path):
    """A live leader stopped for longer than the watch (swapping, SIGSTOP) lost its lock to
    clear, and a second leader compiled. Alive by identity, it is kept."""
    from dynamo_dist.cache.lock import owner_record

    store = _cache_with(tmp_path, 1)
    store.locks.mkdir(parents=True, exist_ok=True)
    frozen = store.locks / f"{KEYS[1]}.0.lock"
    frozen.write_text(json.dumps(owner_record(0)))  # this process: alive, never beating
    c = _cli("clear", str(store.root))
    assert c.returncode == 0, c.stderr
    assert frozen.exists() and "kept 1 live locks" in c.stdout, c.stdout


# -- issue 26, item 5: namespaces of the old key derivation --------------------------------
OLD_NS = "k-0123456789abcdef"  # entries of the old derivation: HMAC(secret, constant)


def test_prune_removes_namespaces_of_the_old_key_derivation(tmp_path):
    """The old key id was a cheap oracle for the secret; its namespaces are never read
    again, and ``prune`` removes them, with prune's rules (marker, no links followed)."""
    from dynamo_dist.cache.lock import owner_record

    store = _cache_with(tmp_path, 1)
    root = store.root
    old_entry = root / "entries" / OLD_NS / "ab" / KEYS[1]
    old_entry.mkdir(parents=True)
    (old_entry / "manifest.json").write_text("{}")
    (old_entry / "artifact.tar").write_bytes(b"a" * 2048)
    (root / "locks" / OLD_NS).mkdir(parents=True)
    (root / "locks" / OLD_NS / f"{KEYS[2]}.0.lock").write_text("{}")
    (root / "refused" / OLD_NS / "box").mkdir(parents=True)
    (root / "refused" / OLD_NS / "box" / "REFUSED").write_text("old")
    # A planted link by an old name: unlinked, its target untouched.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("precious")
    (root / "entries" / "k-fedcba9876543210").symlink_to(victim)
    # A live holder of an old lock (an old job still running on this host) keeps it.
    live_ns = root / "locks" / "k-1111111111111111"
    live_ns.mkdir()
    (live_ns / f"{KEYS[3]}.0.lock").write_text(json.dumps(owner_record(0)))
    ls = _cli("ls", str(root))
    assert ls.returncode == 0 and "old key derivation" in ls.stdout, ls.stdout
    # Without the cache marker nothing is removed.
    (root / MARKER).rename(tmp_path / "marker")
    p = _cli("prune", str(root), "--older-than", "30d")
    assert p.returncode == 2 and old_entry.exists(), p
    (tmp_path / "marker").rename(root / MARKER)
    p = _cli("prune", str(root), "--older-than", "30d")
    assert p.returncode == 0, (p.stdout, p.stderr)
    for top in ("entries", "locks", "refused"):
        assert not (root / top / OLD_NS).exists(), top
        assert f"removed {top}/{OLD_NS}" in p.stdout, p.stdout
    assert "removed entries/k-fedcba9876543210" in p.stdout, p.stdout
    assert not os.path.lexists(root / "entries" / "k-fedcba9876543210")
    assert (victim / "keep").read_text() == "precious"
    assert (live_ns / f"{KEYS[3]}.0.lock").exists() and "1 live locks" in p.stdout
    # This version's namespace is untouched: its entry is young.
    assert store.entry_dir(KEYS[0]).exists() and "removed 0 entries" in p.stdout
    ls = _cli("ls", str(root))
    assert "1 entries" in ls.stdout


def test_verify_uses_the_jobs_key_derivation(tmp_path, monkeypatch):
    """``verify`` checks signatures with the same scrypt-derived key the jobs sign with."""
    from dynamo_dist.cache import secret as cache_secret
    from dynamo_dist.cache.secret import key_id

    secret = "verify-" + "9" * 32
    store = DiskStore(tmp_path / "c", secret)
    store.check_usable()
    _put(store, KEYS[0], tmp_path)
    assert store.entries.name == f"k2-{key_id(secret)}"
    monkeypatch.setattr(cache_secret, "_secret", secret)  # as if read from a file at import
    monkeypatch.setattr(cache_secret, "_error", None)
    monkeypatch.setattr(cache_secret, "_from_file", True)
    v = _cli("verify", str(store.root))
    assert v.returncode == 0 and "1 of 1 entries valid (checked with" in v.stdout, v
    monkeypatch.setattr(cache_secret, "_secret", "another-" + "9" * 32)
    v = _cli("verify", str(store.root))
    assert v.returncode == 0 and "0 of 0 entries valid" in v.stdout, v
    # A manifest signed the old way (HMAC under the raw secret) does not verify.
    import hashlib
    import hmac

    from dynamo_dist.cache.entries import canonical

    monkeypatch.setattr(cache_secret, "_secret", secret)
    manifest_path = store.entry_dir(KEYS[0]) / "manifest.json"
    man = json.loads(manifest_path.read_text())
    man["signature"] = hmac.new(secret.encode(), canonical(man), hashlib.sha256).hexdigest()
    manifest_path.write_text(json.dumps(man))
    v = _cli("verify", str(store.root))
    assert v.returncode == 1 and "BAD" in v.stdout and "HMAC" in v.stdout, v
