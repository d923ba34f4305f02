"""``dynamo-dist-run``: torchrun with dynamo_dist's settings, for unmodified scripts.

    dynamo-dist-run [--config FILE] [--cache-dir DIR] [--policy P] [--timeout S]
                    [--report PATH] [--all-compiles]
                    <any torchrun arguments> script.py [script args]

Built on ``torch.distributed.run``: its own parser and ``run()``, so every
torchrun flag (rendezvous, multi-node, restarts, log redirection) behaves as
documented upstream. The configuration is resolved and validated here, before
any worker starts, and exported to the workers as ``DYNAMO_DIST_*`` variables
that ``dynamo_dist.compile`` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import cast

from torch.distributed.elastic.multiprocessing.errors import record

from . import _config, _secret
from ._errors import ConfigError

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


@record
def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import run

    args = parser().parse_args(argv)
    try:
        cfg = resolve(args)
        _secret.cache_secret()  # a secret file others can read fails here, not in a worker
    except ConfigError as e:
        # Fail before any worker starts: a bad profile must not cost a job slot.
        sys.stderr.write(f"dynamo-dist-run: {e}\n")
        raise SystemExit(2) from None
    os.environ.update(_config.to_env(cfg))
    # Importing dynamo_dist took the secret out of this process's environment; the
    # workers inherit it from here and each takes it out again at its own import.
    os.environ.update(_secret.secret_environment())
    for name in _OURS:
        delattr(args, name)
    # torch.distributed.run.run is public but unannotated.
    cast(Callable[[argparse.Namespace], None], run)(args)


if __name__ == "__main__":
    main()
