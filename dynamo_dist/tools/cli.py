"""``dynamo-dist``: the command-line home of reports, configuration and the cache."""

from __future__ import annotations

import argparse
import sys

from dynamo_dist import _config
from dynamo_dist._errors import ConfigError
from dynamo_dist.tools import report as tools_report


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        report = tools_report.load(args.path)
    except (OSError, ValueError) as e:
        print(f"dynamo-dist report: cannot read {args.path}: {e}", file=sys.stderr)
        return 2
    print(tools_report.format_table(report, verbose=args.verbose))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.check:
        try:
            cfg = _config.resolve(config_file=args.check)
        except ConfigError as e:
            print(f"dynamo-dist config: {e}", file=sys.stderr)
            return 2
        for key, value in sorted(_config.to_env(cfg).items()):
            print(f"{key}={value}")
        return 0
    print("| key | environment | dynamo-dist-run | default | meaning |")
    print("| --- | --- | --- | --- | --- |")
    for key, var, flag, default, doc in _config.describe():
        print(f"| {key} | {var} | {f'`{flag}`' if flag else ''} | `{default}` | {doc} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="pretty-print a saved job report (JSON)")
    r.add_argument("path")
    r.add_argument(
        "--verbose",
        action="store_true",
        help="also each compiled region's exchanges, hits and waits, per rank",
    )
    r.set_defaults(func=_cmd_report)
    c = sub.add_parser("config", help="print the configuration reference, or check a profile")
    c.add_argument("--check", metavar="FILE", help="validate FILE (with the environment)")
    c.set_defaults(func=_cmd_config)
    from dynamo_dist.tools import cache_cli

    cache_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
