"""Which ranks the compile running on this thread must agree with: its group, or none.

Two per-thread facts, and one per-process fact, decide whether a compiled call talks to
other ranks:

* ``dynamo_dist.local()`` (a depth kept in C++, where the guard hook reads it for free):
  inside it, compiled calls behave like plain ``torch.compile`` on this rank. Real
  training scripts run compiled code on some ranks only (rank-0 evaluation, sampling,
  logging); without a way to say so, those calls pair with the other ranks' training
  calls and either raise or hang.
* the *group* of the compile in progress (:class:`GroupInfo`): the ranks whose compiles
  must match this one (its name, size, store key and compiler-collective gloo group).
  Dynamo's frame callback wrapper sets it around each compile, so each group agrees
  only within itself and a ``local()`` compile (group ``None``) agrees with nobody.
  Dynamo sits between the callback and the code that needs the group, so it cannot be
  an argument all the way: it is read only where Dynamo calls back into dynamo_dist
  during the compile (the caching backend, ``cache/backend.py``, which passes it down
  to the cache agreement and the profile as an argument; consensus's answer to
  Dynamo's ``get_compile_pg()``, ``exchange/consensus.py``).
* whether this process is a *forked child* of a rank (``os.fork``, a DataLoader worker)
  forked after dynamo_dist set up its groups (:func:`forked_from`): it shares its
  parent's shared-memory segment, sockets and store connection, and must never post
  into them. Every compiled call there is rank-local, as inside ``local()``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import ContextDecorator, contextmanager
from dataclasses import dataclass
from typing import Any

from dynamo_dist._log import get_logger
from dynamo_dist.dynamo.hook import _C

__all__ = [
    "GroupInfo",
    "compiling",
    "current_group",
    "forked_from",
    "is_local",
    "local",
    "mark_forked_child",
    "warn_forked_child",
]

log = get_logger("runtime")


class local(ContextDecorator):
    """Run compiled code on this rank only: no guard exchange, consensus or cache agreement.

    For code that only some ranks run (evaluation or sampling on rank 0, logging),
    as a context manager (``with dynamo_dist.local(): ...``) or a decorator
    (``@dynamo_dist.local()``). Reentrant, and per thread. What is compiled inside does
    not count toward the recompile limit of the calls outside it, changes none of their
    automatic-dynamic state, and moves none of their exchange or cache-agreement
    sequences; those calls keep agreeing across ranks before and after it.
    """

    def __enter__(self) -> local:
        _C.local_enter()
        return self

    def __exit__(self, *exc: object) -> None:
        _C.local_exit()


def is_local() -> bool:
    """Whether this thread's compiled calls are rank-local: inside ``dynamo_dist.local()``,
    or anywhere in a forked child of a rank (:func:`forked_from`)."""
    return bool(_C.local_depth() > 0) or _forked_from is not None


_forked_from: str | None = None
_warned_forked = False


def forked_from() -> str | None:
    """The rank this process was forked from (None: not a forked child of a rank)."""
    return _forked_from


def mark_forked_child(parent: str) -> None:
    """Called in a forked child (``os.register_at_fork``) once its hooks are released."""
    global _forked_from, _warned_forked
    _forked_from, _warned_forked = parent, False


def warn_forked_child() -> None:
    """One WARNING per forked child, at its first compiled call (not at the fork: most
    children, DataLoader workers among them, never call compiled code)."""
    global _warned_forked
    if _forked_from is None or _warned_forked:
        return
    _warned_forked = True
    log.warning(
        "compiled code was called in process %d, forked from %s: it runs here as plain "
        "torch.compile, exchanging nothing (a child must never post into its parent's "
        "shared-memory segment or process groups, nor set up its own as its parent's "
        "rank). Compiled calls that must agree across ranks belong in the rank processes "
        "themselves.",
        os.getpid(),
        _forked_from,
    )


@dataclass(frozen=True)
class GroupInfo:
    """The ranks a compile agrees with: who one group is, as consensus and the cache see it."""

    name: str
    """How logs and stats name the group: ``world`` or ``ranks 0,1``."""
    key: str
    """Unique within the job (and the restart), safe in key-value store keys."""
    size: int
    consensus: Any | None = None
    """The gloo group for Dynamo's compiler collectives, or None when consensus is off."""
    ranks: tuple[int, ...] = ()
    """The group's global ranks, ascending (the first one writes what the group shares)."""


_tls = threading.local()


def current_group() -> GroupInfo | None:
    """The group of the compile running on this thread (None: agree with nobody).

    For the entry points Dynamo calls during a compile only; below them the group is
    an argument.
    """
    return getattr(_tls, "group", None)


def current_region() -> int:
    """The compiled region (``dynamo.hook`` id) whose compile runs on this thread; -1: none.

    What the cache files the graphs it builds and loads under, in each rank's
    ``regions`` stats.
    """
    region: int = getattr(_tls, "region", -1)
    return region


@contextmanager
def compiling(group: GroupInfo | None, region: int = -1) -> Iterator[None]:
    """Mark the compile in this block as agreeing within ``group`` (None: locally), for
    the compiled region ``region``."""
    prev = getattr(_tls, "group", None), getattr(_tls, "region", -1)
    _tls.group, _tls.region = group, region
    try:
        yield
    finally:
        _tls.group, _tls.region = prev
