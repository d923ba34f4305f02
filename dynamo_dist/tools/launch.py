"""``dynamo-dist-run``: torchrun with dynamo_dist's settings, for unmodified scripts.

    dynamo-dist-run [--config FILE] [--cache-dir DIR] [--policy P] [--timeout S]
                    [--report PATH] [--all-compiles]
                    <any torchrun arguments> script.py [script args]

Built on ``torch.distributed.run``: its own parser and ``run()``, so every
torchrun flag (rendezvous, multi-node, restarts, log redirection) behaves as
documented upstream. The configuration is resolved and validated here, before
any worker starts, and exported to the workers as ``DYNAMO_DIST_*`` variables
that ``dynamo_dist.compile`` reads.

A cache secret given to the launcher as ``DYNAMO_DIST_CACHE_SECRET`` reaches the
workers only as a private file (``DYNAMO_DIST_CACHE_SECRET_FILE``), removed when the
launcher exits: a variable would stay readable in every worker's ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import cast

from torch.distributed.elastic.multiprocessing.errors import record

from dynamo_dist import _config
from dynamo_dist._errors import ConfigError
from dynamo_dist.cache import secret as cache_secret

# argparse destinations of our options: prefixed, so they never collide with torchrun's.
_OURS = ("dd_config", *(f"dd_{f.key}" for f in _config.LAUNCHER_FLAGS))


def parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    p = get_args_parser()
    p.prog = "dynamo-dist-run"
    p.description = "torchrun with rank-consistent torch.compile (dynamo_dist)."
    g = p.add_argument_group("dynamo_dist")
    g.add_argument(
        "--config",
        dest="dd_config",
        metavar="FILE",
        help="TOML profile (see configs/); default $DYNAMO_DIST_CONFIG",
    )
    for f in _config.LAUNCHER_FLAGS:
        if f.metavar:
            g.add_argument(f.flag, dest=f"dd_{f.key}", metavar=f.metavar, help=f.help)
        else:  # a switch: present means on; absent leaves the profile's or environment's
            g.add_argument(
                f.flag, dest=f"dd_{f.key}", action="store_const", const=True, help=f.help
            )
    return p


def resolve(args: argparse.Namespace) -> _config.Config:
    """The workers' configuration; raises ConfigError naming the file/variable and key."""
    return _config.resolve(
        config_file=args.dd_config,
        **{f.key: getattr(args, f"dd_{f.key}") for f in _config.LAUNCHER_FLAGS},
    )


@contextlib.contextmanager
def _signals_end_the_launcher() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit inside the block, so ``finally`` clauses run.

    By default they kill the process outright, which would leave the workers' secret
    file behind. torchrun installs its own handlers while workers run (they raise, too);
    this covers the moments before and after. The previous handlers come back at exit.
    """

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    sigs = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _exit) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@record
def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import run

    args = parser().parse_args(argv)
    try:
        cfg = resolve(args)
        cache_secret.cache_secret()  # a weak secret or one others could read fails here, once
    except ConfigError as e:
        # Fail before any worker starts: a bad profile must not cost a job slot.
        sys.stderr.write(f"dynamo-dist-run: {e}\n")
        raise SystemExit(2) from None
    os.environ.update(_config.to_env(cfg))
    for name in _OURS:
        delattr(args, name)
    # Importing dynamo_dist took DYNAMO_DIST_CACHE_SECRET out of os.environ, so the
    # workers do not inherit it; they get a private file holding it instead, which is
    # removed when run() returns or raises (a failed worker, a signal).
    with contextlib.ExitStack() as stack:
        stack.enter_context(_signals_end_the_launcher())
        try:
            secret_env = stack.enter_context(cache_secret.secret_file_for_workers())
        except (ConfigError, OSError) as e:
            sys.stderr.write(f"dynamo-dist-run: cannot write the workers' secret file: {e}\n")
            raise SystemExit(2) from None
        os.environ.update(secret_env)
        # torch.distributed.run.run is public but unannotated.
        cast(Callable[[argparse.Namespace], None], run)(args)


if __name__ == "__main__":
    main()
