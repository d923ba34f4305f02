"""The local inductor directory the cache uses is always private (issue 26, item 3).

From the adversarial review of the change: a header planted where inductor precompiles
headers (``/tmp/torchinductor_<user>/precompiled_headers``, whatever
``TORCHINDUCTOR_CACHE_DIR`` says) went into every kernel a leader signed; Dynamo read a
planted ``code_state`` before the cache switched directories; a temporary replacement in
a group-writable TMPDIR could be swapped; files of another user inside a directory its
owner had since made 0700 were loaded; graphs without a key compiled without a check.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_dist.cache import fs, fs_tree, localdir
from dynamo_dist.cache.localdir import private_local_dir
from dynamo_dist.cache.protocol import SharedCache

OTHER = 3000  # another account's uid: as root, chown makes files "theirs"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home of ours for the replacement, and this process's checks forgotten after."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(localdir, "_trees_checked", set())
    monkeypatch.setattr(localdir, "_headers_moved", set())
    from torch._inductor import codecache

    monkeypatch.setattr(codecache, "_HEADER_DIR", codecache._HEADER_DIR)
    monkeypatch.setattr(codecache, "_HEADER_LOCK_DIR", codecache._HEADER_LOCK_DIR)
    yield home / ".cache" / "dynamo_dist" / "inductor"


def _theirs(path: Path, mode: int = 0o777) -> Path:
    path.mkdir(parents=True)
    os.chmod(path.parent, 0o755)
    os.chown(path, OTHER, OTHER)
    os.chmod(path, mode)
    return path


def test_precompiled_headers_go_to_the_private_local_directory(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import codecache

    local = tmp_path / "local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    assert private_local_dir() == local
    assert str(local / "precompiled_headers") == codecache._HEADER_DIR
    assert stat.S_IMODE(os.stat(codecache._HEADER_DIR).st_mode) == 0o700


def test_the_switch_happens_when_the_cache_is_set_up(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before anything is traced: Dynamo reads code_state_<job>.pkl from the local dir."""
    theirs = _theirs(tmp_path / "pub" / "torchinductor_victim")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    SharedCache(str(tmp_path / "cache"), timeout=5, wait_log_interval=5, agree=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(env)


def test_an_uncached_compile_checks_the_directory_too(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = SharedCache(str(tmp_path / "cache"), timeout=5, wait_log_interval=5, agree=False)
    theirs = _theirs(tmp_path / "pub" / "later")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    seen = cache.compile_uncached(lambda: os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert seen == str(env)


def test_someone_elses_files_inside_a_private_directory_make_it_unusable(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made 0700 by its owner after a co-tenant filled it (umask 002, then chmod 700)."""
    local = tmp_path / "local"
    (local / "ab").mkdir(parents=True)
    (local / "ab" / "probe.so").write_bytes(b"planted")
    os.chown(local / "ab" / "probe.so", OTHER, OTHER)
    os.chmod(local, 0o700)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    assert private_local_dir() == env
    assert fs_tree.foreign_in_tree(local) is not None
    os.chown(local / "ab" / "probe.so", os.geteuid(), os.getegid())
    os.chmod(local / "ab", 0o775)  # inductor's own, under umask 002: unreachable, fine
    assert fs_tree.foreign_in_tree(local) is None


def test_the_tree_check_keeps_one_descriptor_per_level(tmp_path: Path) -> None:
    """1,024 prefix directories (inductor's layout) under a 1,024-descriptor limit."""
    import resource

    local = tmp_path / "local"
    for i in range(1100):
        (local / f"{i:03x}").mkdir(parents=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        assert fs_tree.foreign_in_tree(local) is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_replacement_holding_someone_elses_files_is_not_used(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (env / "az").mkdir(parents=True)
    os.chown(env / "az", OTHER, OTHER)
    theirs = _theirs(tmp_path / "pub" / "torchinductor_victim")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    got = private_local_dir()
    assert got is not None and got != env and got != theirs


def test_no_compile_where_no_private_directory_can_be_had(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynamo_dist._errors import ConfigError

    cache = SharedCache(str(tmp_path / "cache"), timeout=5, wait_log_interval=5, agree=False)
    grp = tmp_path / "grp"
    theirs = _theirs(grp / "torchinductor_victim")
    os.chmod(tmp_path, 0o755)
    os.chmod(grp, 0o2775)  # group-writable, not sticky: no temporary replacement there
    monkeypatch.setenv("TMPDIR", str(grp))
    monkeypatch.setenv("HOME", "/dev/null")
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    with pytest.raises(ConfigError, match="TORCHINDUCTOR_CACHE_DIR"):
        cache.compile_uncached(lambda: "compiled")


def test_no_temporary_replacement_in_a_group_writable_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "grp"
    shared.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(shared, 0o2775)  # setgid, group-writable, not sticky
    with pytest.raises(fs.NotPrivate):
        fs.private_temp_dir("x-", str(shared))
    os.chmod(shared, 0o1777)  # sticky like /tmp: nobody can rename ours away
    made = fs.private_temp_dir("x-", str(shared))
    assert made.parent == shared and stat.S_IMODE(made.stat().st_mode) == 0o700
