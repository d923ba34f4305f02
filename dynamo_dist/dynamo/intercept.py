"""Taking over the Dynamo context ``torch.compile`` builds, without re-implementing it.

``torch.compile`` ends with Dynamo's ``optimize(...)(model)``. Wrapping ``optimize`` for
the duration of that one call (``patches.wrapping_optimize``, restored on exit) lets an
:class:`Adoption` wrap the context's frame callback and backend, and add two enter
hooks, before the context is applied, while torch.compile keeps its own argument
handling. This module is the only one that changes a Dynamo context
(``callback``, ``enter_exit_hooks``, the backend chain).

Every compile is adopted the same way, whether it joins its group at once
(``dynamo_dist.compile``) or at its first call (the switch): the callback and backend
are forwarded as they are until :meth:`Adoption.attach` points them at the group's,
and the two enter hooks are swapped in place for the group's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dynamo_dist.dist import local as dist_local
from dynamo_dist.dist.runtime import Group
from dynamo_dist.dynamo import hook as dynamo_hook
from dynamo_dist.dynamo import patches
from dynamo_dist.dynamo.callback import GuardedCallback
from dynamo_dist.exchange.stats import Counts


def _no_cleanup() -> None:
    return None


class SwitchableBackend:
    """The backend torch.compile built, until :meth:`Adoption.attach` puts the cache first."""

    # What Dynamo reads from a backend, copied: forwarding every attribute through
    # __getattr__ crashes torch 2.13's eval frame (its C++ backend lookup).
    _FORWARDED = ("compiler_name", "get_compiler_config", "backend_ctx_ctor", "reset")

    def __init__(self, built: Any) -> None:
        self.built = built
        self.target = built
        for name in self._FORWARDED:
            if hasattr(built, name):
                setattr(self, name, getattr(built, name))

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        return self.target(gm, example_inputs)

    # Dynamo reuses a frame's cache entries across torch.compile calls whose backends
    # compare equal (torch's wrappers define __eq__): torchtitan compiles each block on
    # its own, and all blocks share one compiled graph. Identity would compile every
    # block anew and hit the recompile limit (fullgraph: a hard error).
    # Targets compare unwrapped: a block attached to its group (counting its builds) and
    # one still pending or plain (an eval copy only ever called in local()) share graphs.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwitchableBackend) and bool(
            _uncounted(self.target) == _uncounted(other.target)
        )

    def __hash__(self) -> int:
        return hash(type(self))


class _CountingBackend:
    """The backend torch.compile built, counting each graph it builds for the report.

    In front of the backend when no shared cache is (the cache counts its own builds
    and loads): ``built`` then still says how many graphs this rank compiled, per region.
    """

    def __init__(self, inner: Any, counts: Counts, region: int) -> None:
        self.inner = inner
        self.counts = counts
        self.region = region

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        built = self.inner(gm, example_inputs)  # a build that raises built nothing
        self.counts.count_built(dynamo_hook.region_label(self.region))
        return built


def _uncounted(target: Any) -> Any:
    return target.inner if isinstance(target, _CountingBackend) else target


class _ForwardingCallback:
    """Dynamo's frame callback, forwarded as is until the group's callback is attached.

    Until then, a compile inside ``dynamo_dist.local()`` (rank-0 evaluation before the
    first training step) goes through ``local``, which keeps it out of the recompile
    limit and automatic-dynamic state of the calls outside ``local()``.
    """

    def __init__(self, inner: Any, local: GuardedCallback | None) -> None:
        self.inner = inner
        self.target = inner
        self.local = local
        # Dynamo's C++ get_backend() follows this chain to the backend keying entries.
        self._torchdynamo_orig_backend = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "target") or name.startswith("__"):
            # Not set yet (copy.deepcopy, unpickling): never look it up through itself.
            raise AttributeError(name)
        return getattr(self.inner, name)

    @dynamo_hook.transparent
    def __call__(self, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        if self.target is self.inner and self.local is not None and dist_local.is_local():
            return self.local(frame, cache_entry, frame_state)
        return self.target(frame, cache_entry, frame_state)


class Adoption:
    """The Dynamo contexts one ``torch.compile`` call built, taken over.

    Two enter hooks go into each context: a first (index 0) and a last (appended). The
    first calls ``on_first_call`` (which may :meth:`attach` or :meth:`stay_plain`) until
    one of them has happened. :meth:`attach` swaps both hooks in place for the group's:
    the pending-error check first, the region marker last (in place, so a list Dynamo is
    iterating keeps its length and the region marker already runs for this call).
    """

    def __init__(
        self,
        policy: str,
        on_first_call: Callable[[], None] | None = None,
        before_compile: Callable[[Any], None] | None = None,
    ) -> None:
        self.policy = policy
        self.before_compile = before_compile  # for GuardedCallback
        self.on_first_call = on_first_call
        self.callbacks: list[_ForwardingCallback] = []
        self.backends: list[SwitchableBackend] = []
        self.contexts: list[Any] = []
        self.plain = False
        #: Compiles inside local() before the group was attached, for the group's counts.
        self.counts = Counts()
        # The hooks as installed (each attribute access makes a new bound method).
        self._hooks = (self._first, self._last)
        self._lock = threading.Lock()

    def backend(self, built: Any) -> Any:
        b = SwitchableBackend(built)
        # Until attach, builds (inside local(), before the group is joined) count for the
        # group here, as the traces do (region -1: no region yet, as GuardedCallback's).
        b.target = _CountingBackend(built, self.counts, -1)
        self.backends.append(b)
        return b

    def adopt(self, ctx: Any) -> Any:
        if hasattr(ctx, "callback") and hasattr(ctx, "enter_exit_hooks") and callable(ctx.callback):
            local = GuardedCallback(
                ctx.callback, None, self.policy, None, self.counts, self.before_compile
            )
            forwarding = _ForwardingCallback(ctx.callback, local)
            ctx.callback = forwarding
            ctx.enter_exit_hooks.insert(0, self._hooks[0])
            ctx.enter_exit_hooks.append(self._hooks[1])
            with self._lock:
                self.callbacks.append(forwarding)
                self.contexts.append(ctx)
        return ctx

    @property
    def built_backend(self) -> Any:
        """The backend torch.compile built from its arguments (None if none was seen)."""
        return self.backends[0].built if self.backends else None

    def attach(self, group: Group, region: int, backend: Any = None) -> None:
        """Point every adopted context at ``group`` (and ``backend``, if given: the shared
        cache's; else the built backend, counting its builds)."""
        for b in self.backends:
            b.target = (
                backend if backend is not None else _CountingBackend(b.built, group.counts, region)
            )
        for forwarding in self.callbacks:
            forwarding.target = GuardedCallback(
                forwarding.inner,
                group.policy,
                self.policy,
                group.info,
                group.counts,
                self.before_compile,
                region,
            )
        attached = (dynamo_hook.PENDING_CHECK, dynamo_hook.region_enter(region, group.hook))
        for ctx in self.contexts:
            hooks = ctx.enter_exit_hooks
            for mine, theirs in zip(self._hooks, attached, strict=True):
                hooks[next(i for i, h in enumerate(hooks) if h is mine)] = theirs

    def stay_plain(self, backend: Any = None) -> None:
        """Plain torch.compile from now on (``backend``, if given, in front of the built one).

        The hooks are dropped after the call in progress returns (the list is not being
        iterated then).
        """
        if backend is not None:
            for b in self.backends:
                b.target = backend
        for forwarding in self.callbacks:
            forwarding.local = None
        self.plain = True

    def _first(self) -> Callable[[], None]:
        if self.on_first_call is not None and not self.plain:
            self.on_first_call()
        return self._drop_hooks if self.plain else _no_cleanup

    def _last(self) -> Callable[[], None]:
        return _no_cleanup

    def _drop_hooks(self) -> None:
        for ctx in self.contexts:
            hooks = ctx.enter_exit_hooks
            hooks[:] = [h for h in hooks if all(h is not mine for mine in self._hooks)]


@contextmanager
def capturing(adoption: Adoption) -> Iterator[Adoption]:
    """While torch.compile runs in this block, ``adoption`` takes over what it builds."""
    with patches.wrapping_optimize(adoption.adopt, backend=adoption.backend):
        yield adoption
