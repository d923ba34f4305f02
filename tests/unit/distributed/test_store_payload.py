"""Values read from the job's TCPStore are capped and, with a secret, signed (issue 26, row 6).

Any process that reaches the job's store can set any key. A 0.38 MB code state whose one
100,000-entry tuple is referenced many times through the pickle memo cost 161 MB and 13 s
to rebuild on a2f82f3. Now a payload over 1 MiB is refused before it is parsed, unpickling
and rebuilding stop at 100,000 objects (shared references counted each time), profile
payloads carry an HMAC bound to their key when a secret is set, and a view is checked
like a loaded profile before the writer merges it. Each refusal is counted in
``store_payloads_refused`` and the job goes on without that payload.

Every test here fails on a2f82f3: ``_store_payload`` and ``cache_secret.payload_mac`` did not
exist, ``pgo_loads`` rebuilt the bombs in full, and ``_share``/``_collect`` used whatever
the store held.
"""

from __future__ import annotations

import pickle
import tracemalloc
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.pgo import CodeId, CodeState, FrameStateSizeEntry

import dynamo_dist
from dynamo_dist.cache import protocol
from dynamo_dist.cache import secret as cache_secret
from dynamo_dist.cache.profile import Profiles
from dynamo_dist.cache.profile_store import GroupProfile
from dynamo_dist.dist import store as dist_store
from dynamo_dist.dist.local import GroupInfo
from dynamo_dist.dist.store import (
    MAX_STORE_OBJECTS,
    MAX_STORE_PAYLOAD_BYTES,
    PayloadRefused,
    TooManyObjects,
)
from dynamo_dist.dynamo import pgo, pgo_pickle
from dynamo_dist.exchange import status

#: At least 32 characters: shorter secrets are being made invalid (issue 26, row 5).
SECRET = "payload-test-secret-0123456789abcdef"
OTHER_SECRET = "another-secret-of-enough-length-0123456789"


def _state(shared: tuple[int, ...], frames: int, first: int = 1) -> dict[Any, Any]:
    """A pgo-shaped code state whose every entry's size is the one ``shared`` tuple."""
    out: dict[Any, Any] = {}
    for i in range(first, first + frames):
        entries = defaultdict(FrameStateSizeEntry, {"L['x']": FrameStateSizeEntry(size=shared)})
        out[CodeId("f.py", i, "f", "0" * 16)] = CodeState(automatic_dynamic=entries)
    return out


def _small_state() -> dict[Any, Any]:
    return _state((4, 3), 2)


# -- the pure functions ----------------------------------------------------------------
def test_the_measured_memo_bomb_is_refused_at_the_cap_with_bounded_memory() -> None:
    """The attack as measured: ~0.38 MB, one 100k-entry tuple shared by many frames."""
    data = pickle.dumps(_state(tuple(range(100_000)), 30))
    assert 300_000 < len(data) < MAX_STORE_PAYLOAD_BYTES  # passes the byte cap
    tracemalloc.start()
    try:
        with pytest.raises(TooManyObjects) as info:
            pgo_pickle.loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Counted one by one and stopped as soon as the count passed the cap.
    assert info.value.counted == MAX_STORE_OBJECTS + 1
    assert isinstance(info.value, ValueError)  # callers' "unusable profile" path
    assert peak < 32 << 20, peak  # a2f82f3: +161 MB


def test_memo_references_count_every_time() -> None:
    """A 1,000-entry tuple referenced 500 times: a 43 KB pickle, 500k objects rebuilt."""
    data = pickle.dumps(_state(tuple(range(1000)), 500))
    assert len(data) < 64 << 10
    with pytest.raises(TooManyObjects) as info:
        pgo_pickle.loads(data)
    assert info.value.counted == MAX_STORE_OBJECTS + 1
    # The same state under the cap loads: the cap, not the shape, refuses it.
    assert len(pgo_pickle.loads(data, max_objects=10_000_000)) == 500


def test_a_doubling_memo_bomb_stops_at_the_cap() -> None:
    """t[i+1] = (t[i], t[i]): 60 levels are a few hundred bytes and 2**60 objects."""
    t: Any = (1, 2)
    for _ in range(60):
        t = (t, t)
    data = pickle.dumps({CodeId("f.py", 1, "f", "0"): CodeState(automatic_dynamic={"x": t})})
    assert len(data) < 2000
    with pytest.raises(TooManyObjects) as info:
        pgo_pickle.loads(data)
    assert info.value.counted == MAX_STORE_OBJECTS + 1


def test_the_rebuild_counts_shared_references() -> None:
    """``pgo_pickle._rebuilt`` on its own (objects already in memory): stops at the cap too."""
    budget = pgo_pickle._Budget(50_000)
    with pytest.raises(TooManyObjects):
        pgo_pickle._rebuilt(_state(tuple(range(1000)), 100), budget)
    assert budget.used == budget.cap + 1
    small = pgo_pickle._Budget(50_000)
    assert len(pgo_pickle._rebuilt(_state(tuple(range(10)), 100), small)) == 100
    assert small.used <= 50_000


def test_dict_keys_that_hash_expensively_are_refused() -> None:
    """Colliding ints (n and n + 2**61 - 1 hash alike) and tuples as keys: never hashed."""
    collide = {CodeId("f.py", k * (2**61 - 1), "f", "0"): CodeState() for k in range(1, 50)}
    with pytest.raises(ValueError, match="dict key"):
        pgo_pickle.loads(pickle.dumps(collide))
    with pytest.raises(ValueError, match="dict key"):
        pgo_pickle.loads(pickle.dumps({(1, 2): 3}))
    with pytest.raises(ValueError, match="not in a code state"):
        pgo_pickle.loads(pickle.dumps({"x": {1, 2}}))  # sets: not pgo's
    assert pgo_pickle.loads(pickle.dumps(_small_state())) == _small_state()


def test_over_the_byte_cap_is_refused_before_parsing() -> None:
    assert dist_store.checked(b"x" * MAX_STORE_PAYLOAD_BYTES, "p") == b"x" * (1 << 20)

    class Unparsable(bytes):
        """Fails the test if anything but its length is looked at."""

        def __bytes__(self) -> bytes:
            raise AssertionError("parsed a payload over the cap")

    big = Unparsable(b"\x80" * (MAX_STORE_PAYLOAD_BYTES + 1))
    with pytest.raises(PayloadRefused, match="more than"):
        dist_store.checked(big, "p")
    with pytest.raises(PayloadRefused, match="more than"):
        dist_store.unseal(big, SECRET, "p")
    with pytest.raises(PayloadRefused, match="not bytes"):
        dist_store.checked(12, "p")


def test_payload_mac_binds_secret_purpose_and_data() -> None:
    mac = cache_secret.payload_mac(SECRET, b"data", "k/1")
    assert len(mac) == dist_store.MAC_BYTES
    assert mac == cache_secret.payload_mac(SECRET, b"data", "k/1")
    assert mac != cache_secret.payload_mac(SECRET, b"data", "k/2")
    assert mac != cache_secret.payload_mac(SECRET, b"datA", "k/1")
    assert mac != cache_secret.payload_mac(OTHER_SECRET, b"data", "k/1")
    # The purpose is length-prefixed: moving bytes between purpose and data changes it.
    assert mac != cache_secret.payload_mac(SECRET, b"1data", "k/")


def test_seal_and_unseal() -> None:
    sealed = dist_store.seal(b"view", SECRET, "base/view/1")
    assert dist_store.unseal(sealed, SECRET, "base/view/1") == b"view"
    with pytest.raises(PayloadRefused, match="bad MAC"):
        dist_store.unseal(sealed, SECRET, "base/view/2")  # replayed under another key
    with pytest.raises(PayloadRefused, match="bad MAC"):
        dist_store.unseal(sealed, OTHER_SECRET, "base/view/1")
    with pytest.raises(PayloadRefused, match="bad MAC"):
        dist_store.unseal(b"\0" * 32 + b"view", SECRET, "base/view/1")
    with pytest.raises(PayloadRefused, match="no MAC"):
        dist_store.unseal(b"view", SECRET, "base/view/1")
    # Without a secret, nothing to sign or check (the caps still hold).
    assert dist_store.seal(b"view", None, "k") == b"view"
    assert dist_store.unseal(b"view", None, "k") == b"view"


def test_a_status_record_over_the_cap_is_ignored_and_counted() -> None:
    before = dist_store.refused_count()
    record = status._parse(b'{"seq": 1, "pad": "' + b"x" * MAX_STORE_PAYLOAD_BYTES + b'"}')
    assert set(record) == {"error"}
    assert status._parse(b'{"seq": 1}') == {"seq": 1}
    assert dist_store.refused_count() == before + 1
    assert dynamo_dist.stats()["store_payloads_refused"] >= 1


# -- _share / _collect against a real TCPStore -------------------------------------------
@pytest.fixture
def store() -> Iterator[Any]:
    """A real TCPStore on loopback, in this process (the test is every rank at once)."""
    s = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )
    yield s


@pytest.fixture
def profiles(tmp_path: Path) -> Profiles:
    return Profiles(protocol.SharedCache(str(tmp_path / "cache"), 5.0, 30.0, agree=False))


GROUP = GroupInfo(name="ranks 0,1", key="r0-1", size=2, consensus=object(), ranks=(0, 1))


def _profile(store: Any, writer: bool, base: str = "test/profile/0/r0-1/1") -> GroupProfile:
    p = GroupProfile("job", "r0-1", writer)
    p.store, p.base, p.ranks = store, base, GROUP.ranks
    return p


def _secret_is(monkeypatch: pytest.MonkeyPatch, secret: str | None) -> None:
    monkeypatch.setattr(cache_secret, "cache_secret", lambda: secret)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret", [None, SECRET])
def test_share_round_trips(
    store: Any, profiles: Profiles, monkeypatch: pytest.MonkeyPatch, secret: str | None
) -> None:
    _secret_is(monkeypatch, secret)
    data = pickle.dumps(_small_state())
    assert profiles._share(GROUP, _profile(store, True), (3, data)) == (3, data)
    assert profiles._share(GROUP, _profile(store, False), None) == (3, data)
    assert profiles.cache.counts.store_payloads_refused == 0


@pytest.mark.timeout(60)
def test_share_refuses_an_oversized_profile(
    store: Any, profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _secret_is(monkeypatch, None)
    reader = _profile(store, False)
    store.set(reader.base, b"\0\0\0\1" + b"\x80" * MAX_STORE_PAYLOAD_BYTES)
    assert profiles._share(GROUP, reader, None) is None
    assert profiles.cache.counts.store_payloads_refused == 1
    assert profiles.cache.stats()["store_payloads_refused"] == 1


@pytest.mark.timeout(60)
def test_share_refuses_a_forged_or_replayed_profile(
    store: Any, profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _secret_is(monkeypatch, SECRET)
    data = (1).to_bytes(4, "big") + pickle.dumps(_small_state())
    reader = _profile(store, False)
    store.set(reader.base, data)  # unsigned, as a2f82f3's writer (or an attacker) posts it
    assert profiles._share(GROUP, reader, None) is None
    # Signed, but for another key (a view's): not accepted as the profile.
    store.set(reader.base, dist_store.seal(data, SECRET, reader.base + "/view/1"))
    assert profiles._share(GROUP, reader, None) is None
    # Signed with another secret.
    store.set(reader.base, dist_store.seal(data, OTHER_SECRET, reader.base))
    assert profiles._share(GROUP, reader, None) is None
    assert profiles.cache.counts.store_payloads_refused == 3
    store.set(reader.base, dist_store.seal(data, SECRET, reader.base))
    assert profiles._share(GROUP, reader, None) == (1, data[4:])


def _post_view(store: Any, base: str, payload: bytes, secret: str | None) -> None:
    n = store.add(f"{base}/views", 1)
    name = f"{base}/view/{n}"
    store.set(name, dist_store.seal(payload, secret, name))


@pytest.mark.timeout(60)
def test_collect_merges_only_checked_views(
    store: Any, profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _secret_is(monkeypatch, SECRET)
    writer = _profile(store, True)
    view = (1).to_bytes(4, "big") + pickle.dumps(_small_state())
    bomb = (1).to_bytes(4, "big") + pickle.dumps(_state(tuple(range(1000)), 500))
    _post_view(store, writer.base, view, None)  # no MAC
    _post_view(store, writer.base, view, OTHER_SECRET)  # bad MAC
    _post_view(store, writer.base, bomb, SECRET)  # signed, but over the object cap
    _post_view(store, writer.base, b"\0\0\0\1" + b"\x80" * MAX_STORE_PAYLOAD_BYTES, SECRET)
    _post_view(store, writer.base, (7).to_bytes(4, "big") + view[4:], SECRET)  # not a member
    _post_view(store, writer.base, (1).to_bytes(4, "big") + b"not a pickle", SECRET)
    profiles._collect(writer)
    assert writer.seen == 6 and writer.views == {}
    assert profiles.cache.counts.store_payloads_refused == 6
    _post_view(store, writer.base, view, SECRET)
    profiles._collect(writer)
    assert writer.views == _small_state()
    assert profiles.cache.counts.store_payloads_refused == 6


@pytest.mark.timeout(60)
def test_the_union_of_views_stays_under_the_cap(
    store: Any, profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views each under the cap, of different frames: the one that would pass it is refused."""
    _secret_is(monkeypatch, None)
    writer = _profile(store, True)
    for k in range(4):  # about 60,000 objects unpickled and 27,000 rebuilt each
        state = _state((4, 3), 3000, first=1 + 3000 * k)
        _post_view(store, writer.base, (1).to_bytes(4, "big") + pickle.dumps(state), None)
    profiles._collect(writer)
    assert writer.seen == 4 and len(writer.views) == 9000
    assert profiles.cache.counts.store_payloads_refused == 1


@pytest.mark.timeout(120)
def test_contribute_posts_a_view_the_writer_accepts(
    store: Any, profiles: Profiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Dynamo view, signed by ``_contribute`` and verified by ``_collect``."""
    _secret_is(monkeypatch, SECRET)

    def f(x: torch.Tensor) -> torch.Tensor:
        return x.cos() + 1

    cf = torch.compile(f, backend="eager")
    cf(torch.randn(4, 3))
    cf(torch.randn(6, 3))  # the batch goes dynamic: a mark to contribute
    assert pgo.dynamic_marks()
    member, writer = _profile(store, False), _profile(store, True)
    profiles._contribute(member)
    profiles._collect(writer)
    assert profiles.cache.counts.store_payloads_refused == 0
    assert pgo.dynamic_marks(writer.views) == pgo.dynamic_marks(pgo.stable(pgo.live_state(), {}))


def test_a_pickle_cannot_fill_a_process_wide_object() -> None:
    """``AutoDynamic(0)`` is the process's one enum member: BUILD on it is refused."""
    from torch._dynamo.pgo import AutoDynamic

    before = dict(vars(AutoDynamic.token))
    data = (
        b"\x80\x02ctorch._dynamo.pgo\nAutoDynamic\nK\x00\x85R"  # AutoDynamic(0)
        b"}X\x06\x00\x00\x00renderK\x01sb."  # BUILD {"render": 1} on it
    )
    with pytest.raises(ValueError, match="did not create"):
        pgo_pickle.loads(data)
    assert dict(vars(AutoDynamic.token)) == before


@pytest.mark.timeout(60)
def test_other_records_over_the_cap_are_ignored_and_counted(store: Any) -> None:
    """Status board, report, group setup and agreement verdict: refused, the job goes on."""
    from dynamo_dist.cache import agree as cache_agree
    from dynamo_dist.dist import group as dist_group
    from dynamo_dist.tools import report as tools_report

    huge = b'{"seq": 1, "pad": "' + b"x" * MAX_STORE_PAYLOAD_BYTES + b'"}'
    before = dist_store.refused_count()
    board = status.StatusBoard(store, 0, 2, 60.0, str)
    try:
        store.set(f"{status._PREFIX}1", huge)
        snap = board.snapshot()
    finally:
        board.close()
    assert snap[0]["seq"] == 0 and set(snap[1]) == {"error"}

    store.set(f"{tools_report._PREFIX}7/1", huge)
    report = tools_report.publish_and_collect(store, 7, 0, 2, {"compiles": 1}, 5.0, None)
    assert report is not None and report["missing"] == [1] and list(report["ranks"]) == ["0"]

    store.set("setup/pending/1", huge)
    assert dist_group._pending(store, "setup/pending/", 1) is None
    store.set("setup/pending/1", b'{"state": "waiting"}')
    assert dist_group._pending(store, "setup/pending/", 1) == {"state": "waiting"}

    assert cache_agree._verdict(b"9" * (MAX_STORE_PAYLOAD_BYTES + 1)) == cache_agree._NO
    assert cache_agree._verdict(b"2") == 2

    assert dist_store.refused_count() == before + 4
    assert dynamo_dist.stats()["store_payloads_refused"] >= 4
