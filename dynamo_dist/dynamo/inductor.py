"""Inductor's on-disk caches: where they are, where they go, and how built kernels load.

Inductor keeps its compiled graphs, kernels and precompiled headers under a cache
directory it reads at every lookup (``TORCHINDUCTOR_CACHE_DIR``) and a header directory
fixed at import; the shared cache points both at directories it owns. Loading built
CPU kernels can skip the header precompile and the ISA probe where their answers are
already known. Versions: torch 2.4 (2.6 for the header directory, 2.9 for the kernel
loading) through 2.13.
"""

from __future__ import annotations

from typing import Any


def cache_dir() -> str:
    """The inductor cache directory in effect now (``TORCHINDUCTOR_CACHE_DIR`` included).

    ``torch._inductor.runtime.cache_dir_utils.cache_dir``: torch 2.4 through 2.13.
    """
    from torch._inductor.runtime import cache_dir_utils

    return str(cache_dir_utils.cache_dir())


def default_cache_dir() -> str:
    """Inductor's cache directory when ``TORCHINDUCTOR_CACHE_DIR`` is unset (under /tmp).

    ``torch._inductor.runtime.cache_dir_utils.default_cache_dir``: torch 2.4 through 2.13.
    """
    from torch._inductor.runtime import cache_dir_utils

    return str(cache_dir_utils.default_cache_dir())


def isa_probe_sources() -> frozenset[str]:
    """The C++ sources inductor's CPU ISA probe compiles (stripped), to recognise its files.

    ``torch._inductor.cpu_vec_isa``: each ``VecISA`` class's ``*_code`` string attributes,
    torch 2.4 through 2.13. A probe binary missing from a fresh cache costs a gcc run per
    ISA (seconds each) before the first kernel loads. Empty if the layout changed.
    """
    try:
        from torch._inductor import cpu_vec_isa
    except Exception:
        return frozenset()
    found: set[str] = set()
    for obj in vars(cpu_vec_isa).values():
        if isinstance(obj, type) and issubclass(obj, cpu_vec_isa.VecISA):
            for klass in obj.__mro__:
                for name, value in vars(klass).items():
                    if name.endswith("_code") and isinstance(value, str):
                        found.add(value.strip())
    return frozenset(found)


def fxgraph_cache_misses() -> int:
    """How many FX graph cache misses (real inductor compiles) this process has had.

    ``torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]``: torch 2.2 through
    2.13.
    """
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


def use_cache_dir(path: str) -> None:
    """Point inductor's on-disk caches at ``path`` for the rest of this process.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` on every cache lookup (torch 2.4 through
    2.13), and its compile workers inherit it.
    """
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


def use_precompiled_header_dir(path: str) -> None:
    """Where inductor precompiles the headers every CPU kernel is compiled with.

    ``torch._inductor.codecache._HEADER_DIR`` and ``_HEADER_LOCK_DIR`` (torch 2.6
    through 2.13) are fixed at import under ``/tmp/torchinductor_<user>``, a directory
    another user can create first; they are read at every use, so setting them redirects
    every later compile. A torch without them has no precompiled headers to move.
    """
    import os

    try:
        from torch._inductor import codecache
    except Exception:
        return
    if hasattr(codecache, "_HEADER_DIR"):
        codecache._HEADER_DIR = path
        codecache._HEADER_LOCK_DIR = os.path.join(path, "locks")


class cache_dir_override:
    """Point inductor's on-disk caches at ``path`` for the block; restored on exit.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` on every cache lookup
    (``torch._inductor.runtime.cache_dir_utils.cache_dir``, torch 2.4 through 2.13), so
    setting the variable for the block is enough; its previous value (or absence) is
    put back even if the compile raises.
    """

    _VAR = "TORCHINDUCTOR_CACHE_DIR"

    def __init__(self, path: object) -> None:
        self._path = str(path)
        self._prev: str | None = None

    def __enter__(self) -> None:
        import os

        self._prev = os.environ.get(self._VAR)
        os.environ[self._VAR] = self._path

    def __exit__(self, *exc: object) -> None:
        import os

        if self._prev is None:
            os.environ.pop(self._VAR, None)
        else:
            os.environ[self._VAR] = self._prev


class cpp_kernels_load_only:
    """Load built CPU kernels without precompiling inductor's header first.

    ``CppPythonBindingsCodeCache.load_async`` (torch 2.9 through 2.13) calls
    ``codecache._precompile_header`` (gcc: about 9 s on 2 cores, a 150 MB ``.gch``) for
    every kernel not yet in memory, before it looks for the built ``.so`` on disk; the
    kernel's key does not depend on the header. Where every ``.so`` came with the entry,
    nothing is compiled and the header is pure cost. While loading, the header is named
    as is (``-include`` of the plain header, found on the include path), so a kernel
    that is missing after all is still built correctly, only without the precompiled
    header. Restored on exit.
    """

    def __init__(self, isa: list[str] | None = None) -> None:
        self._saved: Any = None
        self._isa = isa
        self._isa_patch: Any = None

    def __enter__(self) -> None:
        from torch._inductor import codecache

        self._saved = getattr(codecache, "_precompile_header", None)
        if self._saved is not None:

            def plain_header(header: str, *args: Any, **kwargs: Any) -> str:
                return header

            codecache._precompile_header = plain_header  # type: ignore[assignment]
        if self._isa is not None and _isa_probe_answered(self._isa):
            from torch._inductor import config as inductor_config

            self._isa_patch = inductor_config.patch({"cpp.vec_isa_ok": True})
            self._isa_patch.__enter__()

    def __exit__(self, *exc: object) -> None:
        from torch._inductor import codecache

        if self._isa_patch is not None:
            patch, self._isa_patch = self._isa_patch, None
            patch.__exit__(*exc)
        if self._saved is not None:
            codecache._precompile_header = self._saved
            self._saved = None


def cpu_isa_names() -> list[str]:
    """The CPU vector ISAs inductor found usable in this process (its probe, cached)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()]


def _isa_probe_answered(recorded: list[str]) -> bool:
    """Whether the kernels' builder already answered this process's ISA probe.

    ``cpu_vec_isa.valid_vec_isa_list`` (torch 2.9 through 2.13, cached per process)
    keeps each ISA the CPU's flags list whose probe library builds and loads, the load
    tried in a child Python (six of them on x86: about a second). ``recorded`` is the
    list the capturing rank's probe produced, on a host with the same CPU flags (the
    key holds them). Where this process has not probed yet and its CPU's flags list
    exactly those ISAs, the probe's answer is known: ``cpp.vec_isa_ok`` for the load
    makes the cached list that one, without the children.
    """
    import platform

    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:
        return False  # already probed in this process: nothing to save
    flags = cpu_vec_isa.x86_isa_checker()
    by_flags = [
        str(isa)
        for isa in cpu_vec_isa.supported_vec_isa_list
        if all(flag in flags for flag in str(isa).split())
    ]
    return by_flags == recorded
