"""`alma-r run` (the whole build-alma-r flow, in-process) and `alma-r check-config` (validate, print resolved)."""

from __future__ import annotations

import argparse
import json
import sys

from alma_r.cli.common import add_config_arguments


def add_run_parsers(sub) -> None:
    run = sub.add_parser("run", help="run the whole build-alma-r flow in-process")
    add_config_arguments(run, "configs/tiny.yaml")
    run.set_defaults(handler=run_flow)
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    add_config_arguments(check, "configs/tiny.yaml", force=False)
    check.set_defaults(handler=check_config)


def _load(args: argparse.Namespace):
    from alma_r.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"alma-r: config error: {err}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def run_flow(args: argparse.Namespace) -> int:
    if _load(args) is None:
        return 2
    from alma_r.flows.build_alma_r import build_alma_r

    build_alma_r(config_path=args.config, overrides=args.overrides, force=args.force)
    return 0
