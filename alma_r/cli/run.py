"""`alma-r run` (the whole build-alma-r flow, in-process) and `alma-r check-config` (validate, print resolved).

A failure ends `alma-r run` with one line and its kind's exit status (alma_r/cli/failure_report.py); the
traceback is in `<run>/logs/alma-r.log`.
"""

from __future__ import annotations

import argparse
import json

from alma_r.cli.common import add_config_arguments


def add_run_parsers(sub) -> None:
    run = sub.add_parser("run", help="run the whole build-alma-r flow in-process")
    add_config_arguments(run, "configs/tiny.yaml")
    run.set_defaults(handler=run_flow)
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    add_config_arguments(check, "configs/tiny.yaml", force=False)
    check.set_defaults(handler=check_config)


def check_config(args: argparse.Namespace) -> int:
    from alma_r.config import load_config

    cfg = load_config(args.config, args.overrides)  # a ConfigError: one line, exit status 2 (cli main)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def run_flow(args: argparse.Namespace) -> int:
    from alma_r.cli.failure_report import run_log
    from alma_r.config import load_config

    cfg = load_config(args.config, args.overrides)  # checked before Prefect starts: a typo fails at once
    from alma_r.flows.build_alma_r import STAGES, build_alma_r
    from alma_r.flows.steps import forced_stages, run_dir_for

    forced_stages(args.force, STAGES)  # an unknown stage too
    with run_log(run_dir_for(cfg), args.debug, args.command_line) as args.log_file:
        build_alma_r(config_path=args.config, overrides=args.overrides, force=args.force)
    return 0
