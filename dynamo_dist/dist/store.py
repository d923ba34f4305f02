"""The job's key-value store: dynamo_dist's clients of it, and what it reads back.

The clients: :func:`open_store` gives a user of the store (the status board, a cache
directory's agreement and profiles) its own connection, so its traffic never
interleaves with the main thread's (rendezvous, barriers). The exchange and the cache
both open clients here: neither imports the other.

Limits and checks for what is read back. Why: the job's TCPStore is shared by every
process of the job, and anything that can reach it (another rank, a process on a host
of the job) can set any key. So every
value dynamo_dist reads from it is untrusted input: automatic-dynamic profiles and
views (pickles), status-board and report records (JSON), group-setup views and the
cache agreement's verdicts. A small value can still cost a lot to parse: a 0.38 MB
code state whose one 100,000-entry tuple is referenced many times through the pickle
memo cost 161 MB and 13 s to rebuild, growing linearly with the references. So:

* a payload longer than :data:`MAX_STORE_PAYLOAD_BYTES` is refused before it is parsed
  (the store client has already received it; nothing larger is ever looked at);
* unpickling and rebuilding a profile or a view stops with an error as soon as it has
  built :data:`MAX_STORE_OBJECTS` objects, counting every reference to a shared object
  again (``_torch_compat.pgo_loads``): the cost is bounded by the cap, not by the
  expanded size of the pickle;
* with a cache secret, profile payloads carry an HMAC-SHA256 of the payload and the
  store key it was posted under (:func:`seal` / :func:`unseal`), checked before the
  bytes are unpickled: nobody without the secret can post a profile, nor move a
  signed one under another key.

A refused payload is counted (``store_payloads_refused`` in ``dynamo_dist.stats()``),
warned about once per kind, and ignored: the job goes on without that profile, view
or record.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from datetime import timedelta
from typing import Any, Final, Protocol

from dynamo_dist._log import get_logger
from dynamo_dist.cache.secret import payload_mac
from dynamo_dist.dist.limits import (
    MAX_STORE_OBJECTS,
    MAX_STORE_PAYLOAD_BYTES,
    PayloadRefused,
    TooManyObjects,
)
from dynamo_dist.dynamo import compat


class Counts(Protocol):
    """Where a cache directory counts its refusals (``CacheStats``; not imported: layers)."""

    store_payloads_refused: int


__all__ = [
    "MAC_BYTES",
    "MAX_STORE_OBJECTS",
    "MAX_STORE_PAYLOAD_BYTES",
    "PayloadRefused",
    "Store",
    "TooManyObjects",
    "checked",
    "open_store",
    "refuse",
    "refused_count",
    "seal",
    "unseal",
]

log = get_logger("store")

# torch.distributed.Store: exported only when torch is built with distributed support,
# so its stubs do not declare it; dynamo_dist only calls set/get/check and the like on it.
Store = Any

#: Length of the HMAC-SHA256 that precedes a signed payload.
MAC_BYTES: Final = 32


def checked(raw: Any, what: str) -> bytes:
    """``raw`` (what ``store.get`` returned) as bytes, or PayloadRefused if over the cap.

    The length is checked before anything is copied or parsed.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise PayloadRefused(f"{what} is a {type(raw).__name__}, not bytes")
    size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if size > MAX_STORE_PAYLOAD_BYTES:
        raise PayloadRefused(
            f"{what} is {size} bytes, more than the {MAX_STORE_PAYLOAD_BYTES} a value in "
            "the job's store may have"
        )
    return bytes(raw)


def seal(data: bytes, secret: str | None, purpose: str) -> bytes:
    """What to post under ``purpose`` (the store key): ``data``, after its MAC with a secret."""
    return data if secret is None else payload_mac(secret, data, purpose) + data


def unseal(raw: Any, secret: str | None, purpose: str) -> bytes:
    """The data of a payload posted by :func:`seal` under ``purpose``; PayloadRefused if not.

    The size is checked first, then (with a secret) the MAC, in constant time; nothing
    of the payload is parsed before both passed.
    """
    data = checked(raw, purpose)
    if secret is None:
        return data
    if len(data) < MAC_BYTES:
        raise PayloadRefused(f"{purpose} carries no MAC, and a cache secret is set")
    mac, body = data[:MAC_BYTES], data[MAC_BYTES:]
    if not hmac.compare_digest(mac, payload_mac(secret, body, purpose)):
        raise PayloadRefused(
            f"{purpose} has a bad MAC (not posted under this key by a rank with this "
            "job's cache secret)"
        )
    return body


_lock = threading.Lock()
_refused = 0  # refusals counted outside any cache directory (board, report, setup)
_warned: set[str] = set()


def refuse(what: str, e: BaseException, counts: Counts | None = None) -> None:
    """Count a refused payload (in ``counts``, else process-wide) and warn once per ``what``.

    ``what`` names the kind of payload ("automatic-dynamic view", "status record"): a
    rank flooding the store with bad values must not flood every rank's log too.
    """
    global _refused
    with _lock:
        if counts is not None:
            counts.store_payloads_refused += 1
        else:
            _refused += 1
        first = what not in _warned
        _warned.add(what)
    if first:
        log.warning(
            "refused a value read from the job's key-value store (%s: %s); it is ignored, "
            "and further refusals are counted in store_payloads_refused",
            what,
            e,
        )


def refused_count() -> int:
    """Payloads refused outside any cache directory, in this process."""
    return _refused


def open_store(timeout: float) -> Store | None:
    """A client of the job's store for its caller's own use (None if there is none)."""
    try:
        store = compat.default_store()
    except Exception:
        return None
    clone = getattr(store, "clone", None)
    if clone is not None:
        # Its own connection: the publisher thread must not interleave with
        # the main thread's store traffic (rendezvous, barriers).
        with contextlib.suppress(Exception):
            store = clone()
    with contextlib.suppress(Exception):
        store.set_timeout(timedelta(seconds=min(timeout, 30.0)))
    return store
