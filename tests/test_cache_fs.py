"""The cache's one filesystem layer (``_cache_fs``), and the rule that nothing else touches disk.

Every open, read, write, rename and removal of the cache goes through ``_cache_fs``; the
rule is checked on the cache modules' syntax trees, so a new ``open()`` or
``shutil.rmtree`` in a cache module fails here before it can follow a planted link or
block on a planted FIFO.
"""

from __future__ import annotations

import ast
import os
import stat
import threading
from pathlib import Path

import pytest

from dynamo_dist import _cache_fs as fs

PKG = Path(fs.__file__).resolve().parent

#: The modules of the cache (and its secret): all of their filesystem I/O goes through fs.
CACHE_MODULES = [
    *sorted(p.stem for p in PKG.glob("_cache*.py") if p.stem != "_cache_fs"),
    "_secret",
]

#: ``os`` functions that reach the filesystem by name (descriptor I/O such as os.read,
#: os.write and os.close on a descriptor the layer handed out is fine).
_OS_CALLS = {
    "open",
    "stat",
    "lstat",
    "mkdir",
    "makedirs",
    "rename",
    "renames",
    "replace",
    "unlink",
    "remove",
    "removedirs",
    "rmdir",
    "scandir",
    "listdir",
    "walk",
    "fwalk",
    "chmod",
    "chown",
    "lchown",
    "utime",
    "link",
    "symlink",
    "readlink",
    "access",
    "truncate",
    "mkfifo",
    "mknod",
    "statvfs",
    "chdir",
    "fchmod",
    "fchown",
    "memfd_create",
}
_OS_PATH_CALLS = {
    "exists",
    "lexists",
    "isdir",
    "isfile",
    "islink",
    "ismount",
    "realpath",
    "getsize",
    "getmtime",
    "getatime",
    "getctime",
    "samefile",
}
#: Path methods that do I/O (``replace`` only with one argument: str.replace takes two).
_PATH_METHODS = {
    "exists",
    "is_dir",
    "is_file",
    "is_symlink",
    "is_fifo",
    "is_socket",
    "mkdir",
    "rmdir",
    "unlink",
    "touch",
    "rglob",
    "glob",
    "iterdir",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "stat",
    "lstat",
    "chmod",
    "lchmod",
    "resolve",
    "samefile",
    "rename",
    "symlink_to",
    "hardlink_to",
    "readlink",
}
_BANNED_MODULES = {"shutil", "tempfile", "glob", "fnmatch"}


def violations(tree: ast.AST) -> list[str]:
    """Each filesystem call in ``tree`` outside the layer, as ``line: call``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for n in names:
                if n and n.split(".")[0] in _BANNED_MODULES:
                    out.append(f"{node.lineno}: import {n}")
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "os.path"):
                out.append(f"{node.lineno}: from {node.module} import ...")
            continue
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("open", "io_open"):
            out.append(f"{node.lineno}: {f.id}()")
        elif isinstance(f, ast.Attribute):
            base = f.value
            if isinstance(base, ast.Name) and base.id == "fs":
                continue  # the layer itself
            if isinstance(base, ast.Name) and base.id == "os" and f.attr in _OS_CALLS:
                out.append(f"{node.lineno}: os.{f.attr}()")
            elif (
                isinstance(base, ast.Attribute)
                and isinstance(base.value, ast.Name)
                and base.value.id == "os"
                and base.attr == "path"
                and f.attr in _OS_PATH_CALLS
            ):
                out.append(f"{node.lineno}: os.path.{f.attr}()")
            elif isinstance(base, ast.Name) and base.id in _BANNED_MODULES:
                out.append(f"{node.lineno}: {base.id}.{f.attr}()")
            elif f.attr == "open" and not (isinstance(base, ast.Name) and base.id == "tarfile"):
                out.append(f"{node.lineno}: .open()")
            elif f.attr in _PATH_METHODS:
                out.append(f"{node.lineno}: .{f.attr}()")
            elif f.attr == "replace" and len(node.args) == 1:
                out.append(f"{node.lineno}: .replace()")
    return out


@pytest.mark.parametrize("module", CACHE_MODULES)
def test_cache_modules_touch_the_filesystem_only_through_the_layer(module: str) -> None:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    assert violations(tree) == [], f"{module}.py: use dynamo_dist._cache_fs instead"


@pytest.mark.parametrize(
    "code",
    [
        "open('x')",
        "os.unlink('x')",
        "os.stat('x')",
        "os.path.exists('x')",
        "shutil.rmtree('x')",
        "import tempfile",
        "Path('x').read_bytes()",
        "p.mkdir()",
        "p.replace(q)",
        "list(p.rglob('*'))",
    ],
)
def test_the_rule_catches_a_planted_violation(code: str) -> None:
    assert violations(ast.parse(code)), code


@pytest.mark.parametrize("code", ["'a'.replace('a', 'b')", "tarfile.open(fileobj=f)", "p / 'x'"])
def test_the_rule_allows_what_touches_no_disk(code: str) -> None:
    assert violations(ast.parse(code)) == []


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
        assert fs.remove_tree(fd, "tree")
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
        assert not fs.remove_tree(fd, "tree", owner=os.geteuid())
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
