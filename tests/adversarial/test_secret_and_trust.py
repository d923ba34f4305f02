"""The cache secret and what the shared cache trusts (issue 10, items 1, 5, 6 and 8).

The rank programs below run under torchrun through the one runner, ``tests/ranks.py``;
each rank writes ``OUTDIR/rank<R>.json`` and the tests assert on every rank's facts.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import ranks

HERE = Path(__file__).resolve()
ROOT = HERE.resolve().parents[2]
SECRET_ENV = "DYNAMO_DIST_CACHE_SECRET"
SECRET_FILE_ENV = "DYNAMO_DIST_CACHE_SECRET_FILE"


# -- rank programs ------------------------------------------------------------------------
def job(rank: int, world: int, local_base: str, report: str = "") -> dict[str, Any]:
    """One training step of a user-defined module through the shared cache."""
    import torch

    import dynamo_dist

    # Is the secret still in this process's environment now that dynamo_dist is imported?
    # Inductor copies DYNAMO*/TORCH* variables into the repro scripts it pickles.
    secret_in_env = SECRET_ENV in os.environ
    # The environment this process started with (unsetenv does not erase it from /proc).
    with open("/proc/self/environ", "rb") as fh:
        started_with_secret = (SECRET_ENV + "=").encode() in fh.read()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local_base, f"rank{rank}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    cm = dynamo_dist.compile(model)
    x = torch.randn(4, 8)
    y = cm(x)
    y.sum().backward()
    out = {
        "ok": bool(torch.allclose(y, model(x), atol=1e-5)),
        "stats": dynamo_dist.stats(),
        "secret_in_env": secret_in_env,
        "started_with_secret": started_with_secret,
    }
    if report:
        dynamo_dist.shutdown()  # rank 0 writes the job report
    return out


# -- launching ------------------------------------------------------------------------
def _job(
    tmp: Path,
    name: str,
    cache: Path,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    report: bool = False,
) -> tuple[dict[int, dict[str, Any]], str]:
    full = {"DYNAMO_DIST_CACHE_DIR": str(cache), "DYNAMO_DIST_LOG": "INFO", **(env or {})}
    run = ranks.launch(
        HERE,
        "job",
        str(tmp / f"{name}-local"),
        *(["report"] if report else []),
        tmp=tmp,
        env=full,
        timeout=300,
        launcher=launcher,
    )
    for r in (0, 1):
        assert run.rank(r)["ok"], (run.rank(r), run.output[-4000:])
    return run.ranks, run.output


def _entries(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / "entries").rglob("manifest.json"))


def _refused(cache: Path) -> list[Path]:
    return [p for p in (cache / "refused").rglob("REFUSED")] if (cache / "refused").exists() else []


def _files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` (and every member of every tar in it) holding ``needle``."""
    hits = []
    for f in sorted(root.rglob("*")):
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        if needle in data:
            hits.append(str(f))
        if f.suffix == ".tar" or tarfile.is_tarfile(f):
            try:
                with tarfile.open(f) as tar:
                    for m in tar.getmembers():
                        fh = tar.extractfile(m) if m.isfile() else None
                        if fh is not None and needle in fh.read():
                            hits.append(f"{f}!{m.name}")
            except (tarfile.TarError, OSError):
                pass
    return hits


pytestmark = pytest.mark.timeout(900)


# -- item 1: the secret never reaches a file --------------------------------------------
@pytest.mark.multiproc
@pytest.mark.inductor
def test_secret_leaves_no_trace(tmp_path):
    secret = "s3cret-" + os.urandom(16).hex()
    cache, trace, report = tmp_path / "cache", tmp_path / "trace", tmp_path / "report.json"
    # Cold job through the launcher (which must pass the secret to the workers), with a
    # structured trace and a job report.
    res, out1 = _job(
        tmp_path,
        "cold",
        cache,
        env={SECRET_ENV: secret, "TORCH_TRACE": str(trace)},
        launcher=[sys.executable, "-m", "dynamo_dist.tools.launch", "--report", str(report)],
        report=True,
    )
    cold_res = res
    assert sum(res[r]["stats"]["cache_publishes"] for r in (0, 1)) == 1
    assert sum(res[r]["stats"]["cache_loads"] for r in (0, 1)) == 1
    assert report.exists() and trace.exists()
    entry = _entries(cache)[0]
    assert "signature" in json.loads((entry / "manifest.json").read_text())
    # Warm job with the same secret from a file: it verifies and loads the signed entry.
    secret_file = tmp_path / "keys" / "cache.key"
    secret_file.parent.mkdir()
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    res, out2 = _job(tmp_path, "warm", cache, env={SECRET_FILE_ENV: str(secret_file)})
    for r in (0, 1):
        assert res[r]["stats"]["cache_loads"] == 1, res[r]
        assert res[r]["stats"]["inductor_compiles"] == 0, res[r]
    assert not _refused(cache)
    needle = secret.encode()
    hits: list[str] = []
    for where in (cache, tmp_path / "cold-local", tmp_path / "warm-local", trace):
        hits += _files_containing(where, needle)
    # Rank results and everything else here, except the secret file itself.
    hits += [h for h in _files_containing(tmp_path, needle) if h != str(secret_file)]
    assert needle not in report.read_bytes()
    assert secret not in out1 and secret not in out2
    assert not hits, f"the secret is in clear text in: {hits[:10]}"
    assert not any(cold_res[r]["secret_in_env"] for r in (0, 1)), "import must remove it"


def test_secret_is_removed_from_the_environment_at_import(tmp_path):
    """... and still works, with exactly one warning (at first use, not at import) that
    the variable stays in /proc/<pid>/environ and how to use a file instead."""
    secret = "abc123-" + os.urandom(16).hex()
    code = (
        "import os, dynamo_dist\n"
        "from dynamo_dist import _log\n"
        "from dynamo_dist.cache import secret as cache_secret\n"
        "assert 'DYNAMO_DIST_CACHE_SECRET' not in os.environ\n"
        "_log.configure()\n"
        "print('imported', flush=True)\n"
        "print(cache_secret.cache_secret(), flush=True)\n"
        "print(cache_secret.cache_secret(), flush=True)\n"
    )
    env = {**os.environ, SECRET_ENV: secret}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2:] == [secret, secret], proc.stdout
    warnings = [ln for ln in lines if " W dynamo_dist." in ln]
    assert len(warnings) == 1, proc.stdout
    (warning,) = warnings
    assert lines.index(warning) > lines.index("imported"), "warned at first use, not import"
    assert "dynamo_dist.cache" in warning and "/proc/" in warning and "environ" in warning
    assert SECRET_FILE_ENV in warning and "dynamo-dist cache secret" in warning
    assert secret not in warning


def test_secret_file_must_be_private(tmp_path):
    from dynamo_dist._errors import ConfigError
    from dynamo_dist.cache import secret as cache_secret

    key = "k3y-" + "0" * 32
    f = tmp_path / "key"
    f.write_text(key + "\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=r"chmod 600") as e:
        cache_secret.read_secret({SECRET_FILE_ENV: str(f)})
    assert str(f) in str(e.value)
    f.chmod(0o600)
    assert cache_secret.read_secret({SECRET_FILE_ENV: str(f)}) == key
    with pytest.raises(ConfigError, match="not a regular file"):
        cache_secret.read_secret({SECRET_FILE_ENV: str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        cache_secret.read_secret({SECRET_FILE_ENV: str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="only one"):
        cache_secret.read_secret({SECRET_FILE_ENV: str(f), SECRET_ENV: "x"})
    assert cache_secret.read_secret({SECRET_ENV: "x" * 32}) == "x" * 32
    assert cache_secret.read_secret({}) is None


# -- item 5: without a secret, only a private directory is trusted ------------------------
def test_directory_trust_check(tmp_path):
    from dynamo_dist.cache.secret import untrusted_reason

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    assert untrusted_reason(private) is None
    private.chmod(0o777)
    why = untrusted_reason(private)
    assert why is not None and str(private) in why and "writable" in why
    private.chmod(0o700)
    inner = private / "inner"
    inner.mkdir()
    private.chmod(0o775)  # a group-writable parent lets the group swap ``inner``
    why = untrusted_reason(inner)
    assert why is not None and str(private) in why
    private.chmod(0o700)
    assert untrusted_reason(inner) is None
    if os.geteuid() == 0:  # root can hand a component to another user
        os.chown(inner, 12345, 12345)
        why = untrusted_reason(inner)
        assert why is not None and "12345" in why
    # /tmp is world-writable but sticky and root-owned: fine as a parent, not as the root.
    if stat.S_IMODE(os.lstat("/tmp").st_mode) & stat.S_ISVTX and os.lstat("/tmp").st_uid == 0:
        assert untrusted_reason(Path("/tmp")) is not None
    # A symlink is judged by where it points, and by who could replace it.
    link = tmp_path / "link"
    link.symlink_to(private)
    assert untrusted_reason(link) is None
    private.chmod(0o777)
    assert untrusted_reason(link) is not None
    private.chmod(0o700)


@pytest.mark.multiproc
@pytest.mark.inductor
def test_unsigned_cache_in_a_shared_directory_is_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    # The graph route: without the shared entry inductor must run (a precompiled module
    # would load the artifact its rank keeps in its own private cache instead).
    graphs = {"DYNAMO_DIST_PRECOMPILE": "0"}
    res, _ = _job(tmp_path, "first", cache, graphs)
    assert sum(res[r]["stats"]["cache_publishes"] for r in (0, 1)) == 1
    assert _entries(cache)
    # Anyone may now edit the entry and recompute its sha256: it must not run.
    cache.chmod(0o777)
    res, out = _job(tmp_path, "second", cache, graphs)
    for r in (0, 1):
        s = res[r]["stats"]
        assert s["cache_loads"] == 0 and s["inductor_compiles"] > 0, s
        assert s["cache_enabled"] is False
    assert str(cache) in out and "group- or other-writable" in out
    assert SECRET_FILE_ENV in out and "private directory" in out
    assert out.count("not loading unsigned entries") == 2  # once per rank


# -- item 6: verified files go only into a private local directory ------------------------
@pytest.mark.multiproc
@pytest.mark.inductor
def test_nothing_is_installed_into_a_shared_local_directory(tmp_path):
    """A local directory others can write is never used: each rank switches to one
    private replacement (and says so), and loads the shared entries there."""
    cache = tmp_path / "cache"
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = {SECRET_ENV: "item6-" + "6" * 32, "XDG_CACHE_HOME": str(xdg)}
    _job(tmp_path, "first", cache, env=env)
    local = tmp_path / "second-local"
    for r in (0, 1):
        (local / f"rank{r}").mkdir(parents=True)
        (local / f"rank{r}").chmod(0o777)
    res, out = _job(tmp_path, "second", cache, env=env)
    replacement = xdg / "dynamo_dist" / "inductor"
    for r in (0, 1):
        s = res[r]["stats"]
        assert s["cache_loads"] >= 1 and s["inductor_compiles"] == 0, s
        assert list((local / f"rank{r}").iterdir()) == []  # nothing written there
        assert str(local / f"rank{r}") in out
    assert stat.S_IMODE(replacement.stat().st_mode) == 0o700
    assert list(replacement.iterdir())
    assert "TORCHINDUCTOR_CACHE_DIR to a new, empty directory" in out


def test_local_directory_is_created_private(tmp_path, monkeypatch):
    from dynamo_dist.cache.localdir import private_local_dir

    target = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(target))
    assert private_local_dir() == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    target.chmod(0o755)  # ours and not writable by others: tightened, still used
    assert private_local_dir() == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    target.chmod(0o777)  # ours, under a parent only we can search: nobody else got in
    assert private_local_dir() == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    tmp_path.chmod(0o755)
    target.chmod(0o777)  # others could have written it: never used; this process switches
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir(mode=0o700)
    replacement = tmp_path / "xdg" / "dynamo_dist" / "inductor"
    assert private_local_dir() == replacement
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(replacement)
    assert stat.S_IMODE(replacement.stat().st_mode) == 0o700


# -- item 8: jobs with different secrets share nothing and destroy nothing ----------------
def test_key_namespaces_in_the_store(tmp_path):
    from dynamo_dist.cache.key import version_factors
    from dynamo_dist.cache.secret import key_id
    from dynamo_dist.cache.store import DiskStore

    a_secret, b_secret = "a" * 32, "b" * 32
    assert key_id(a_secret) != key_id(b_secret) and len(key_id(a_secret)) == 16
    room = tmp_path / "room"
    room.mkdir()
    (room / "f").write_bytes(b"x")
    man = {"factors": version_factors(), "created": time.time()}
    a, b, u = (DiskStore(tmp_path / "c", s) for s in (a_secret, b_secret, None))
    assert a.put("k" * 40, ranks.members(room), man) > 0
    assert b.get("k" * 40) is None and u.get("k" * 40) is None
    assert b.put("k" * 40, ranks.members(room), man) > 0
    assert a.get("k" * 40) is not None and b.get("k" * 40) is not None
    assert not list((tmp_path / "c").rglob("REFUSED"))
    assert key_id(a_secret) not in str(b.entries) and key_id(a_secret) in str(a.entries)
    assert "unsigned" in str(u.entries)


@pytest.mark.multiproc
@pytest.mark.inductor
def test_jobs_with_different_secrets_do_not_evict_each_other(tmp_path):
    cache = tmp_path / "cache"
    a = {SECRET_ENV: "secret-A-" + "a" * 32}
    res, _ = _job(tmp_path, "a1", cache, env=a)
    assert sum(res[r]["stats"]["cache_publishes"] for r in (0, 1)) == 1
    res, out = _job(tmp_path, "b", cache, env={SECRET_ENV: "secret-B-" + "b" * 32})
    # Through plain torchrun the variable reaches each rank: one warning per rank.
    assert out.count("stays readable in /proc/") == 2, out[-4000:]
    assert sum(res[r]["stats"]["cache_refused"] for r in (0, 1)) == 0
    assert sum(res[r]["stats"]["cache_publishes"] for r in (0, 1)) == 1
    res, _ = _job(tmp_path, "a2", cache, env=a)
    for r in (0, 1):
        s = res[r]["stats"]
        assert s["cache_loads"] == 1 and s["inductor_compiles"] == 0 and s["cache_refused"] == 0
    assert not _refused(cache)
    assert len(_entries(cache)) == 2


@pytest.mark.multiproc
@pytest.mark.inductor
def test_launcher_with_a_secret_file(tmp_path):
    """dynamo-dist-run passes the file's path, never the secret, to its workers."""
    secret_file = tmp_path / "cache.key"
    secret_file.write_text("from-a-file-" + os.urandom(16).hex())
    secret_file.chmod(0o600)
    cache = tmp_path / "cache"
    res, _ = _job(
        tmp_path,
        "launched",
        cache,
        env={SECRET_FILE_ENV: str(secret_file)},
        launcher=[sys.executable, "-m", "dynamo_dist.tools.launch"],
    )
    for r in (0, 1):
        assert not res[r]["started_with_secret"], "the secret entered a worker's environment"
    assert sum(res[r]["stats"]["cache_publishes"] for r in (0, 1)) == 1
    assert "signature" in json.loads((_entries(cache)[0] / "manifest.json").read_text())


def test_secret_file_another_user_could_write_is_refused(tmp_path):
    from dynamo_dist._errors import ConfigError
    from dynamo_dist.cache import secret as cache_secret

    theirs = tmp_path / "theirs.key"
    theirs.write_text("attacker-known-" + "0" * 32)
    theirs.chmod(0o600)
    os.chown(theirs, 3000, 3000)  # another user's file: they chose the secret
    with pytest.raises(ConfigError, match="another user"):
        cache_secret.read_secret({SECRET_FILE_ENV: str(theirs)})
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may replace the file in here
    mine = shared / "mine.key"
    mine.write_text("mine-" + "0" * 32)
    mine.chmod(0o600)
    with pytest.raises(ConfigError, match="other-writable"):
        cache_secret.read_secret({SECRET_FILE_ENV: str(mine)})


# -- issue 26, item 5: strong secrets only, keys by a slow KDF ------------------------------
WEAK = {
    "empty": "",
    "short": "s3cret",
    "guessable": "dd2024!",
    "short hex": "0123456789abcdef",  # 8 bytes
    "hex of 15 bytes": "00112233445566778899aabbccddee",
    "base64 of 15 bytes": base64.b64encode(bytes(range(15))).decode(),
    "31 characters": "correct horse battery staple!!!",
}
STRONG = {
    "32 characters": "correct horse battery staple 032",
    "32 hex characters": "00112233445566778899aabbccddeeff",
    "base64 of 16 bytes": base64.b64encode(bytes(range(16))).decode(),
    "unpadded base64 of 16 bytes": base64.b64encode(bytes(range(16))).decode().rstrip("="),
    "urlsafe base64 of 16 bytes": base64.urlsafe_b64encode(bytes(range(250, 256)) * 3).decode(),
}


@pytest.mark.parametrize("name", sorted(WEAK))
def test_weak_secrets_are_refused(tmp_path, name):
    from dynamo_dist._errors import ConfigError
    from dynamo_dist.cache import secret as cache_secret

    weak = WEAK[name]
    assert cache_secret.weakness(weak) is not None
    f = tmp_path / "key"
    f.write_text(weak + "\n")
    f.chmod(0o600)
    sources = [({SECRET_FILE_ENV: str(f)}, f"{SECRET_FILE_ENV}={f}")]
    if weak:  # an empty variable is no variable
        sources.append(({SECRET_ENV: weak}, SECRET_ENV))
    for environ, names in sources:
        with pytest.raises(ConfigError) as e:
            cache_secret.read_secret(environ)
        msg = str(e.value)
        assert names in msg, msg
        assert "dynamo-dist cache secret PATH" in msg and "openssl rand -hex 32" in msg, msg
        assert not weak or weak not in msg.replace(names, ""), "the message shows the secret"
    with pytest.raises(ConfigError, match="too weak"):
        cache_secret.signing_key(weak)  # and nothing signs with it, whatever the way in


@pytest.mark.parametrize("name", sorted(STRONG))
def test_strong_secrets_are_accepted(tmp_path, name):
    from dynamo_dist.cache import secret as cache_secret

    strong = STRONG[name]
    assert len(strong) <= 32
    assert cache_secret.weakness(strong) is None
    assert cache_secret.read_secret({SECRET_ENV: strong}) == strong
    f = tmp_path / "key"
    f.write_text(strong + "\n")
    f.chmod(0o600)
    assert cache_secret.read_secret({SECRET_FILE_ENV: str(f)}) == strong


_KEY_ID_PROGRAM = """
import sys, time
from dynamo_dist.cache import secret as cache_secret
t = time.perf_counter()
kid = cache_secret.key_id(sys.argv[1])
first = time.perf_counter() - t
t = time.perf_counter()
assert cache_secret.key_id(sys.argv[1]) == kid and cache_secret.signing_key(sys.argv[1])
again = time.perf_counter() - t
print(kid, first, again)
"""


def test_key_id_and_signatures_come_from_the_kdf():
    """The key id and every signature come from scrypt of the secret: checking a guess
    against either costs a full scrypt, not one HMAC (issue 26, row 5)."""
    import hashlib
    import hmac

    from dynamo_dist.cache import secret as cache_secret
    from dynamo_dist.cache.entries import canonical, namespace, sign
    from dynamo_dist.cache.secret import key_id

    secret = "kdf-test-" + "7" * 32
    old = hmac.new(secret.encode(), b"dynamo_dist key id", hashlib.sha256).hexdigest()[:16]
    assert key_id(secret) != old
    assert namespace(secret) == f"k2-{key_id(secret)}" and not namespace(secret).startswith("k-")
    master = hashlib.scrypt(
        secret.encode(),
        salt=cache_secret.KDF_SALT,
        n=cache_secret.KDF_N,
        r=cache_secret.KDF_R,
        p=cache_secret.KDF_P,
        maxmem=1 << 27,
        dklen=32,
    )
    assert key_id(secret) == hmac.new(master, b"key id", hashlib.sha256).hexdigest()[:16]
    assert cache_secret.signing_key(secret) not in (secret.encode(), master)
    man = {"factors": {"torch": "x"}, "created": 1.0}
    raw = hmac.new(secret.encode(), canonical(man), hashlib.sha256).hexdigest()
    assert sign(man, secret) != raw
    assert (
        sign(man, secret)
        == hmac.new(cache_secret.signing_key(secret), canonical(man), hashlib.sha256).hexdigest()
    )
    assert b"manifest" in cache_secret.KDF_SALT or b"signing" in cache_secret.KDF_SALT
    assert b"2" in cache_secret.KDF_SALT  # the derivation's version
    # Stable across processes; slow once per process, then cached.
    runs = [
        subprocess.run(
            [sys.executable, "-c", _KEY_ID_PROGRAM, secret],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0][0] == runs[1][0] == key_id(secret)
    for _kid, first, again in runs:
        assert float(first) > 0.01, f"the key id took {first} s: no slow KDF?"
        assert float(again) < float(first) / 10, "derived again, not cached"


# -- issue 26, item 5: dynamo-dist cache secret PATH ------------------------------------
def test_cache_secret_command_writes_a_private_new_file(tmp_path):
    from dynamo_dist.cache import secret as cache_secret

    path = tmp_path / "keys" / "cache.key"
    path.parent.mkdir(mode=0o700)
    r = ranks.cli("secret", str(path))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(text.strip()) == 64
    bytes.fromhex(text.strip())
    assert f"{SECRET_FILE_ENV}={path}" in r.stdout, r.stdout
    assert text.strip() not in r.stdout + r.stderr
    assert cache_secret.read_secret({SECRET_FILE_ENV: str(path)}) == text.strip()
    # Another run makes another secret.
    other = tmp_path / "keys" / "other.key"
    assert ranks.cli("secret", str(other)).returncode == 0
    assert other.read_text() != text
    # An existing file is never overwritten...
    r = ranks.cli("secret", str(path))
    assert r.returncode == 2 and "already exists" in r.stderr and str(path) in r.stderr, r
    assert path.read_text() == text
    # ...nor is a link followed, dangling or not.
    target = tmp_path / "elsewhere"
    link = tmp_path / "keys" / "link.key"
    link.symlink_to(target)
    r = ranks.cli("secret", str(link))
    assert r.returncode == 2 and "already exists" in r.stderr, r
    assert not target.exists() and link.is_symlink()
    target.write_text("precious")
    assert ranks.cli("secret", str(link)).returncode == 2
    assert target.read_text() == "precious"
    # A directory others can write: refused, as jobs would refuse the file.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = ranks.cli("secret", str(shared / "k"))
    assert r.returncode == 2 and "writable" in r.stderr and not (shared / "k").exists(), r


if __name__ == "__main__":
    ranks.main(globals())
