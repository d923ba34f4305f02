"""The architecture's rules, read from the syntax trees of ``dynamo_dist/``.

1. ``exchange/`` and ``cache/`` never import each other; only the runtime
   (``dist/runtime.py``) and the API (``_api.py``) import both.
2. Only ``dynamo/`` names torch's or CPython's private internals: ``torch._*`` modules,
   private attributes of other objects (``threading._active``, ``sys._getframe``,
   ``x._orig_mod``), Dynamo's and CPython's frame internals (``enter_exit_hooks``,
   ``guarded_code``, ``f_code``...), and ``torch.compile`` itself.
3. No module over 500 lines, no function over 80: past that a module or a function is
   doing two jobs.
4. Modules import in one order, with no cycle (lazy imports included): ``ORDER``.
5. The cache touches the filesystem only through its one layer, ``cache/fs.py``.

Each rule also runs on a planted violation, so a rule that checks nothing fails here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dynamo_dist"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

#: Every module, lowest first. A module imports only modules listed before it.
ORDER: list[tuple[str, ...]] = [
    ("_version", "_errors", "_log", "_counts", "dist.limits", "dist.proc", "_C"),
    ("dynamo.compat", "dynamo.names"),  # read-only views of torch's and CPython's internals
    # changes to torch's state, and torch's subsystems as dynamo_dist uses them
    ("dynamo.patches", "dynamo.pgo", "dynamo.pgo_pickle", "dynamo.inductor", "dynamo.ddp"),
    ("dynamo.artifacts",),  # precompiled artifacts: a capture runs in its own code state
    ("dynamo.events", "exchange.stats", "_config"),
    ("cache.fs_ops",),  # counts of the filesystem operations made on a store
    ("cache.fs",),  # the one filesystem layer (the secret reads files too)
    ("cache.fs_tree",),  # whole trees, by descriptor, built on cache.fs
    ("cache.secret",),
    ("dist.store",),  # the job's key-value store: clients, caps and MACs
    ("dynamo.hook",),  # the C++ guard hook
    ("dist.local",),  # which ranks a compile agrees with
    ("exchange.status", "dist.group"),
    ("exchange.watch",),  # names a rank whose status went stale
    ("exchange.record",),
    ("exchange.allreduce",),  # one word AND-reduced over a gloo group
    ("exchange.native",),  # the same, over authenticated TCP, rounds in C++
    ("exchange.collective",),
    ("exchange.shm",),
    ("exchange.policy",),
    ("dynamo.callback",),
    ("exchange.consensus",),
    ("cache.key", "cache.stats", "cache.rooms"),
    ("cache.entries",),  # the entry format: manifest checks, signature
    ("cache.verify",),  # reading an entry from a directory others write to
    ("cache.archive", "cache.install", "cache.refused"),
    ("cache.store", "cache.agree"),
    ("cache.lock",),
    ("cache.localdir", "cache.turn"),  # the private local dir; one compile's ticket
    ("cache.wait",),  # the one wait loop, at either site
    ("cache.fanout",),  # host-local copies, and the host site
    ("cache.directory",),  # the shared directory as this rank finds it
    ("cache.lead", "cache.follow"),  # a leader's work; a follower's
    ("cache.protocol",),
    ("cache.profile_store",),  # a group's profile as entries of the shared cache
    ("cache.profile",),
    ("cache.backend",),
    ("cache.artifact_file",),  # the artifact file: its bytes and its place on disk
    ("cache.artifact",),
    ("cache.precompiled",),
    ("tools.report",),
    ("dist.runtime",),
    ("dynamo.intercept",),
    ("_api",),
    ("_switch",),
    ("tools.cache_dir",),  # the cache directory as the cache commands read and print it
    ("tools.cache_remove", "tools.cache_init"),
    ("tools.launch", "tools.cache_cli"),
    ("tools.cli",),
    ("__init__", "__main__"),
]
RANK = {m: i for i, layer in enumerate(ORDER) for m in layer}

#: Attributes that are torch's or CPython's internals though their names are public.
INTERNAL_ATTRIBUTES = {
    "enter_exit_hooks",
    "guarded_code",
    "f_code",
    "f_back",
    "f_globals",
    "f_locals",
    "f_lasti",
    "f_builtins",
}
#: Documented public API whose name starts with an underscore.
PUBLIC_DESPITE_UNDERSCORE = {"os._exit"}
#: Private attributes anyone may read: one's own, and a peer's of the same class.
OWN = {"self", "cls", "other"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return (
        ".".join(rel.parts[:-1])
        if rel.name == "__init__" and len(rel.parts) > 1
        else ".".join(rel.parts)
    )


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(tree: ast.AST, me: str) -> set[str]:
    """The dynamo_dist modules ``tree`` imports, at any depth of its code."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{me}: use absolute imports (from dynamo_dist... import)")
            mod = node.module or ""
            if mod == "dynamo_dist":
                out.update(a.name for a in node.names)
            elif mod.startswith("dynamo_dist."):
                sub = mod.removeprefix("dynamo_dist.")
                if sub in ("dynamo", "exchange", "dist", "cache", "tools"):
                    out.update(f"{sub}.{a.name}" for a in node.names)
                else:
                    out.add(sub)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dynamo_dist."):
                    out.add(a.name.removeprefix("dynamo_dist."))
    return out


def _parsed() -> Iterator[tuple[str, ast.Module]]:
    for name, path in MODULES.items():
        yield name, ast.parse(path.read_text())


# -- 1. exchange and cache ----------------------------------------------------------------
def exchange_cache_violations(me: str, imports: set[str]) -> list[str]:
    out = []
    ex = sorted(m for m in imports if m.startswith("exchange."))
    ca = sorted(m for m in imports if m.startswith("cache."))
    if me.startswith("exchange.") and ca:
        out.append(f"{me} (exchange) imports {ca} (cache)")
    if me.startswith("cache.") and ex:
        out.append(f"{me} (cache) imports {ex} (exchange)")
    if ex and ca and me not in ("dist.runtime", "_api"):
        out.append(
            f"{me} imports both the exchange and the cache: only the runtime and the API may"
        )
    return out


# -- 2. internals ----------------------------------------------------------------------------
def internals_violations(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if re.match(r"torch(\.\w+)*\._", node.module) or node.module == "torch._C":
                out.append(f"{node.lineno}: from {node.module} import")
            if node.module.startswith(("dynamo_dist", "torch")):
                out.extend(
                    f"{node.lineno}: import of private {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                    and not a.name.startswith("__")
                    and a.name not in {*MODULES, "_C"}
                )
        elif isinstance(node, ast.Import):
            out.extend(
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if re.match(r"torch\._", a.name)
            )
        elif isinstance(node, ast.Attribute):
            base = node.value
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if (
                private
                and not (isinstance(base, ast.Name) and base.id in OWN)
                and node.attr != "_C"
                and ast.unparse(node) not in PUBLIC_DESPITE_UNDERSCORE
            ) or node.attr in INTERNAL_ATTRIBUTES:
                out.append(f"{node.lineno}: {ast.unparse(node)}")
            elif (
                node.attr == "compile"
                and isinstance(base, ast.Name)
                and base.id == "torch"
                and isinstance(node.ctx, ast.Store)
            ):
                out.append(f"{node.lineno}: torch.compile replaced")
    return out


# -- 3. sizes ---------------------------------------------------------------------------------
def size_violations(tree: ast.Module, text: str) -> list[str]:
    out = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        out.append(f"{lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{node.name}(): {n} lines (at most {MAX_FUNCTION_LINES})")
    return out


# -- 5. the filesystem layer -------------------------------------------------------------------
#: ``os`` functions that reach the filesystem by name (descriptor I/O such as os.read,
#: os.write and os.close on a descriptor the layer handed out is fine).
_OS_CALLS = {
    *[
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
    ],
    *[
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
    ],
    *["truncate", "mkfifo", "mknod", "statvfs", "chdir", "fchmod", "fchown", "memfd_create"],
}
_OS_PATH_CALLS = {
    *[
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
    ],
    *["getctime", "samefile"],
}
#: Path methods that do I/O (``replace`` only with one argument: str.replace takes two).
_PATH_METHODS = {
    *[
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
    ],
    *[
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
    ],
    *["resolve", "samefile", "rename", "symlink_to", "hardlink_to", "readlink"],
}
_BANNED_MODULES = {"shutil", "tempfile", "glob", "fnmatch"}
#: The modules whose every file operation goes through ``cache.fs``.
FS_RULED = sorted(
    m
    for m in MODULES
    if (m.startswith("cache.") and m != "cache.fs") or m.startswith("tools.cache_")
)


def fs_violations(tree: ast.AST) -> list[str]:
    """Each filesystem call in ``tree`` outside the layer, as ``line: call``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            out.extend(
                f"{node.lineno}: import {n}"
                for n in names
                if n and n.split(".")[0] in _BANNED_MODULES
            )
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "os.path"):
                out.append(f"{node.lineno}: from {node.module} import ...")
            continue
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("open", "io_open"):
            out.append(f"{node.lineno}: {f.id}()")
        elif isinstance(f, ast.Attribute):
            out.extend(_fs_attribute_call(node, f))
    return out


def _fs_attribute_call(node: ast.Call, f: ast.Attribute) -> list[str]:
    base = f.value
    if isinstance(base, ast.Name) and base.id == "fs":
        return []  # the layer itself
    if isinstance(base, ast.Name) and base.id == "os" and f.attr in _OS_CALLS:
        return [f"{node.lineno}: os.{f.attr}()"]
    if (
        isinstance(base, ast.Attribute)
        and isinstance(base.value, ast.Name)
        and base.value.id == "os"
        and base.attr == "path"
        and f.attr in _OS_PATH_CALLS
    ):
        return [f"{node.lineno}: os.path.{f.attr}()"]
    if isinstance(base, ast.Name) and base.id in _BANNED_MODULES:
        return [f"{node.lineno}: {base.id}.{f.attr}()"]
    if f.attr == "open" and not (isinstance(base, ast.Name) and base.id == "tarfile"):
        return [f"{node.lineno}: .open()"]
    if f.attr in _PATH_METHODS or (f.attr == "replace" and len(node.args) == 1):
        return [f"{node.lineno}: .{f.attr}()"]
    return []


# -- the rules on the tree ----------------------------------------------------------------------
def test_every_module_has_a_place_in_the_order() -> None:
    unplaced = sorted(set(MODULES) - set(RANK) - {"dynamo", "exchange", "dist", "cache", "tools"})
    assert not unplaced, f"place {unplaced} in ORDER of tests/unit/test_rules.py"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_rules_hold(module: str) -> None:
    path = MODULES[module]
    text = path.read_text()
    tree = ast.parse(text)
    imports = _imports(tree, module)
    found = exchange_cache_violations(module, imports)
    if not module.startswith("dynamo."):
        found += internals_violations(tree)
    found += size_violations(tree, text)
    if module in RANK:
        up = sorted(m for m in imports if RANK.get(m, -1) >= RANK[module] and m != module)
        found += [f"imports {m}, which is not below it in ORDER" for m in up]
    if module in FS_RULED:
        found += [f"{v}: use dynamo_dist.cache.fs" for v in fs_violations(tree)]
    assert not found, f"dynamo_dist/{path.relative_to(PKG)}:\n  " + "\n  ".join(found)


# -- each rule catches a planted violation -------------------------------------------------------
@pytest.mark.parametrize(
    ("me", "imports"),
    [
        ("exchange.shm", {"cache.store"}),
        ("cache.protocol", {"exchange.status"}),
        ("dist.group", {"exchange.collective", "cache.key"}),
    ],
)
def test_planted_exchange_cache_import_fails(me: str, imports: set[str]) -> None:
    assert exchange_cache_violations(me, imports)


def test_the_runtime_may_import_both() -> None:
    assert exchange_cache_violations("dist.runtime", {"exchange.shm", "cache.store"}) == []


@pytest.mark.parametrize(
    "code",
    [
        "import torch._dynamo",
        "from torch._dynamo import config",
        "from torch._inductor.codecache import x",
        "torch._dynamo.reset()",
        "threading._active",
        "sys._getframe(1)",
        "ctx.enter_exit_hooks.append(f)",
        "result.guarded_code",
        "frame.f_code",
        "torch.compile = wrapper",
        "from dynamo_dist.cache.store import _flags",
    ],
)
def test_planted_internal_fails(code: str) -> None:
    assert internals_violations(ast.parse(code)), code


@pytest.mark.parametrize("code", ["self._x", "other._y", "torch.compile(m)", "x.__name__"])
def test_what_is_not_internal_passes(code: str) -> None:
    assert internals_violations(ast.parse(code)) == []


def test_planted_sizes_fail() -> None:
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert size_violations(ast.parse(long_function), long_function)
    long_module = "x = 1\n" * (MAX_MODULE_LINES + 1)
    assert size_violations(ast.parse(long_module), long_module)
    short = "def f():\n    return 1\n"
    assert size_violations(ast.parse(short), short) == []


def test_a_planted_upward_import_fails() -> None:
    tree = ast.parse("from dynamo_dist.cache import protocol\n")
    imports = _imports(tree, "cache.store")
    assert any(RANK[m] >= RANK["cache.store"] for m in imports)
    with pytest.raises(AssertionError, match="absolute"):
        _imports(ast.parse("from . import x\n"), "cache.store")


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
def test_planted_filesystem_call_fails(code: str) -> None:
    assert fs_violations(ast.parse(code)), code


@pytest.mark.parametrize("code", ["'a'.replace('a', 'b')", "tarfile.open(fileobj=f)", "p / 'x'"])
def test_what_touches_no_disk_passes(code: str) -> None:
    assert fs_violations(ast.parse(code)) == []
