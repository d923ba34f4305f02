"""The cache directory, single process: keys, verification, atomic publishing, locks, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import ranks
import torch

from dynamo_dist.cache import key as cache_key
from dynamo_dist.cache.archive import extract
from dynamo_dist.cache.entries import EntryRefused
from dynamo_dist.cache.store import DiskStore


def _room(tmp_path, name="room", payload=b"kernel"):
    room = tmp_path / name
    (room / "ab").mkdir(parents=True)
    (room / "ab" / "cabc.so").write_bytes(payload)
    (room / "fxgraph").mkdir()
    (room / "fxgraph" / "entry").write_bytes(b"pickled graph")
    return room


def _put(store, key, room, torch_version=None):
    factors = {**cache_key.version_factors()}
    if torch_version:
        factors["torch"] = torch_version
    return store.put(
        key,
        ranks.members(room),
        {
            "factors": factors,
            "owner": {"rank": 0},
            "compile_seconds": 1.5,
            "created": time.time(),
            "label": "f",
        },
    )


def test_put_get_extract_round_trip(tmp_path):
    store = DiskStore(tmp_path / "c")
    store.check_usable()
    assert _put(store, "k" * 40, _room(tmp_path)) > 0
    entry = store.get("k" * 40, expect=cache_key.version_factors())
    assert entry is not None and entry.manifest["compile_seconds"] == 1.5
    extract(entry, tmp_path / "out")
    assert (tmp_path / "out" / "ab" / "cabc.so").read_bytes() == b"kernel"
    assert not list((tmp_path / "c" / "entries").glob("*/*/.tmp*"))


def test_second_publisher_loses_quietly(tmp_path):
    store = DiskStore(tmp_path / "c")
    assert _put(store, "a" * 40, _room(tmp_path, "r1")) > 0
    assert _put(store, "a" * 40, _room(tmp_path, "r2", b"other")) == 0
    entry = store.get("a" * 40)
    extract(entry, tmp_path / "out")
    assert (tmp_path / "out" / "ab" / "cabc.so").read_bytes() == b"kernel"


def test_version_skew_and_signature(tmp_path):
    store = DiskStore(tmp_path / "c")
    _put(store, "b" * 40, _room(tmp_path), torch_version="0.1")
    with pytest.raises(EntryRefused, match="version skew"):
        store.get("b" * 40, expect=cache_key.version_factors())
    assert list((tmp_path / "c" / "refused").iterdir())
    signed = DiskStore(tmp_path / "s", secret="x" * 32)
    _put(signed, "c" * 40, _room(tmp_path, "r3"))
    assert signed.get("c" * 40) is not None
    with pytest.raises(EntryRefused, match="HMAC"):
        DiskStore(tmp_path / "s", secret="y" * 32).verify(signed.entry_dir("c" * 40))
    # Another secret looks in its own namespace: it neither sees nor refuses the entry.
    assert DiskStore(tmp_path / "s", secret="y" * 32).get("c" * 40) is None
    assert signed.get("c" * 40) is not None


def test_archive_cannot_escape(tmp_path):
    import tarfile

    store = DiskStore(tmp_path / "c")
    _put(store, "d" * 40, _room(tmp_path))
    entry = store.get("d" * 40)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        f = tmp_path / "x"
        f.write_text("x")
        tar.add(f, arcname="../../escape")
    os.replace(evil, entry.artifact)
    # Re-declare the swapped archive (no secret here); extract only unpacks what it hashed.
    entry.manifest["files"]["artifact.tar"] = {
        "sha256": hashlib.sha256(entry.artifact.read_bytes()).hexdigest(),
        "size": entry.artifact.stat().st_size,
    }
    with pytest.raises(EntryRefused, match=r"unsafe name|escapes"):
        extract(entry, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_unusable_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError):
        DiskStore(f).check_usable()


def test_graph_key_is_stable_and_sensitive():
    def fn(x):
        return x.sin()

    gm = torch.fx.symbolic_trace(fn)
    a = cache_key.graph_key(gm, [torch.randn(3)], {"backend": "inductor"})
    b = cache_key.graph_key(gm, [torch.randn(3)], {"backend": "inductor"})
    c = cache_key.graph_key(gm, [torch.randn(4)], {"backend": "inductor"})
    d = cache_key.graph_key(gm, [torch.randn(3)], {"backend": "inductor", "mode": "max-autotune"})
    assert a == b and a[0] != c[0] and a[0] != d[0]
    assert set(a[1]) >= {"torch", "python", "dynamo_dist", "device", "graph", "backend"}


_cli = ranks.cli


def test_cli_ls_verify_prune_clear(tmp_path):
    root = tmp_path / "c"
    store = DiskStore(root)
    for i, k in enumerate(("1" * 40, "2" * 40, "3" * 40)):
        _put(store, k, _room(tmp_path, f"r{i}", b"x" * (1000 * (i + 1))))
    old = store.entry_dir("1" * 40) / "manifest.json"
    man = json.loads(old.read_text())
    man["created"] = time.time() - 10 * 86400
    old.write_text(json.dumps(man))  # without a secret the manifest carries no checksum
    ls = _cli("ls", str(root))
    assert ls.returncode == 0 and "3 entries" in ls.stdout and "yes" in ls.stdout
    assert _cli("verify", str(root)).returncode == 0
    art = store.entry_dir("2" * 40) / "artifact.tar"
    art.write_bytes(art.read_bytes()[:-10])
    v = _cli("verify", str(root))
    assert v.returncode == 1 and "truncated" in v.stdout and "2 of 3" in v.stdout
    p = _cli("prune", str(root), "--older-than", "7d")
    assert p.returncode == 0 and "removed 1 entries" in p.stdout
    assert not store.entry_dir("1" * 40).exists()
    # Two entries left; a budget of exactly the newer one's size removes the older only.
    newest = store.entry_dir("3" * 40)
    budget = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    p = _cli("prune", str(root), "--max-size", str(budget))
    assert p.returncode == 0 and "removed 1 entries" in p.stdout and "1 left" in p.stdout, p.stdout
    assert not store.entry_dir("2" * 40).exists() and newest.exists()
    assert _cli("prune", str(root), "--max-size", "lots").returncode == 2
    _put(DiskStore(root, secret="old-" + "0" * 32), "4" * 40, _room(tmp_path, "r4"))
    c = _cli("clear", str(root))
    assert c.returncode == 0 and not list(store.iter_entries())
    assert not list(store.iter_all_entries()), "clear removes every secret's entries"


# -- fan-out: host-local copies and operation counts ------------------------------------
@pytest.mark.parametrize("secret", [None, "s3cret-" + "5" * 32])
def test_a_host_copy_holds_the_verified_bytes_and_is_verified_again(tmp_path, secret):
    """``extract(keep=)`` + ``put_copy``: the copy verifies like the shared entry; a
    byte changed in it afterwards is refused, and only in the host store."""
    import tempfile

    shared, host = DiskStore(tmp_path / "c", secret), DiskStore(tmp_path / "h", secret)
    shared.check_usable()
    host.check_usable()
    key = "d" * 40
    _put(shared, key, _room(tmp_path))
    entry = shared.get(key, expect=cache_key.version_factors())
    assert entry is not None
    with tempfile.TemporaryFile() as keep:
        extract(entry, tmp_path / "out", keep)
        assert (
            host.put_copy(key, entry.manifest, keep)
            == entry.manifest["files"]["artifact.tar"]["size"]
        )
    copy = host.get(key, expect=cache_key.version_factors())
    assert copy is not None and copy.manifest == entry.manifest
    extract(copy, tmp_path / "out2")
    assert (tmp_path / "out2" / "ab" / "cabc.so").read_bytes() == b"kernel"
    art = host.entry_dir(key) / "artifact.tar"
    data = bytearray(art.read_bytes())
    data[100] ^= 1
    art.write_bytes(bytes(data))
    with pytest.raises(EntryRefused, match="sha256"):
        host.get(key, expect=cache_key.version_factors())
    assert shared.get(key, expect=cache_key.version_factors()) is not None


def test_shared_operations_are_counted_per_store(tmp_path):
    shared, other = DiskStore(tmp_path / "c"), DiskStore(tmp_path / "o")
    shared.check_usable()
    other.check_usable()
    key = "e" * 40
    _put(shared, key, _room(tmp_path))
    before, untouched = shared.ops.total, other.ops.total
    assert shared.get("f" * 40) is None  # a miss is one stat of the manifest's name
    assert shared.ops.total - before == 1 and shared.ops.stats >= 1
    entry = shared.get(key)
    assert entry is not None and shared.ops.reads >= 2  # the manifest, the artifact
    n = shared.ops.total
    extract(entry, tmp_path / "out")
    assert shared.ops.total > n  # extract reads the shared artifact again
    assert other.ops.total == untouched
    assert set(shared.ops.as_dict("x_")) == {
        "x_opens",
        "x_stats",
        "x_listdirs",
        "x_reads",
        "x_writes",
        "x_total",
    }
