"""The cache's one filesystem layer (``cache/fs.py``): descriptors, no links, no FIFOs.

The rule that nothing else in the cache touches disk is in ``tests/unit/test_rules.py``.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dynamo_dist.cache import fs, fs_tree


# -- removal by descriptor -----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_remove_tree_never_opens_a_fifo_or_follows_a_link(tmp_path: Path) -> None:
    """shutil.rmtree opened a FIFO planted (or swapped in) below and blocked for ever."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    os.mkfifo(tree / "a" / "fifo")
    os.mkfifo(tree / "a" / "b" / "fifo.cpp")
    (tree / "a" / "link").symlink_to(victim)
    (tree / "a" / "b" / "file").write_text("x")
    fd = fs.open_root(tmp_path)
    try:
        assert fs_tree.remove_tree(fd, "tree")
    finally:
        os.close(fd)
    assert not os.path.lexists(tree)
    assert (victim / "keep").read_text() == "mine"


def test_remove_tree_in_a_private_directory_keeps_what_others_own(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "theirs").write_text("evidence")
    os.chown(tree / "theirs", 3000, 3000)
    (tree / "sub" / "mine").write_text("x")
    fd = fs.open_root(tmp_path)
    try:
        assert not fs_tree.remove_tree(fd, "tree", owner=os.geteuid())
    finally:
        os.close(fd)
    assert (tree / "theirs").exists() and not (tree / "sub").exists()


@pytest.mark.timeout(60)
def test_open_file_refuses_links_fifos_and_other_owners(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    (tmp_path / "theirs").write_text("y")
    os.chown(tmp_path / "theirs", 3000, 3000)
    fd = fs.open_root(tmp_path)
    try:
        assert fs.read_file(fd, "f", 10) == b"x"
        for name, err in (("fifo", "not a regular file"), ("link", "Too many levels")):
            with pytest.raises(OSError, match=err):
                fs.open_file(fd, name)
        with pytest.raises(fs.NotPrivate):
            fs.open_file(fd, "theirs", owner=os.geteuid())
        with pytest.raises(OSError, match="larger than"):
            fs.read_file(fd, "f", 0)
    finally:
        os.close(fd)


def test_private_dir_creates_checks_and_refuses(tmp_path: Path) -> None:
    base = tmp_path / "base"
    d = fs.private_dir(base, ("a", "b"))
    assert d == base / "a" / "b"
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o700 for p in (base / "a", d))
    os.chown(base / "a" / "b", 3000, 3000)
    with pytest.raises(fs.NotPrivate, match="owned by uid 3000"):
        fs.private_dir(base, ("a", "b"))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "x").mkdir()
    os.chmod(shared / "x", 0o777)  # reachable by others through a searchable parent
    with pytest.raises(fs.NotPrivate, match="writable"):
        fs.private_dir(shared, ("x",))
    (shared / "ln").symlink_to(base)
    with pytest.raises(OSError, match="symlink"):
        fs.private_dir(shared, ("ln",))


def test_anonymous_files_have_no_name(tmp_path: Path) -> None:
    with fs.anonymous_file(tmp_path) as fh:
        fh.write(b"data")
        fh.seek(0)
        assert fh.read() == b"data"
    assert list(tmp_path.iterdir()) == []


def test_temp_dirs_are_unpredictable_and_private(tmp_path: Path) -> None:
    fd = fs.open_root(tmp_path)
    try:
        names = {fs.make_temp_dir(fd, "x.") for _ in range(4)}
    finally:
        os.close(fd)
    assert len(names) == 4
    assert all(stat.S_IMODE(os.stat(tmp_path / n).st_mode) == 0o700 for n in names)


def test_the_layer_is_thread_safe_to_call(tmp_path: Path) -> None:
    """No process-wide state (cwd, umask) is changed by the layer while threads use it."""
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            d = fs.private_dir(tmp_path, (f"t{i}", "x"))
            fd = fs.open_root(d)
            try:
                fs.write_new(fd, "f", b"x")
                assert fs.read_file(fd, "f", 1) == b"x"
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
