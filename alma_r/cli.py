"""`alma-r`: run the build-alma-r flow, check a config, or train once outside the flow."""

from __future__ import annotations

import argparse
import json
import sys

from alma_r.cli_args import add_config_arguments
from alma_r.config import ConfigError, load_config
from alma_r.evaluate_cli import add_evaluate_parser, run_evaluate_cli
from alma_r.judge_cli import add_judge_parser
from alma_r.learning_check_cli import add_learning_check_parser
from alma_r.orchestration_cli import add_orchestration_parsers
from alma_r.published_cli import add_published_parser, run_published_cli
from alma_r.sequence_cpo_cli import add_sequence_cpo_parser
from alma_r.sequence_run_cli import add_sequence_run_parser
from alma_r.train_cli import add_train_parser, run_train_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alma-r", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole build-alma-r flow in-process")
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    add_config_arguments(run, "configs/tiny.yaml")
    add_config_arguments(check, "configs/tiny.yaml", force=False)
    add_train_parser(sub)
    add_published_parser(sub)
    add_evaluate_parser(sub)
    add_learning_check_parser(sub)
    add_sequence_cpo_parser(sub)
    add_sequence_run_parser(sub)
    add_judge_parser(sub)
    add_orchestration_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in ("learning-check", "sequence-cpo", "sequence-run", "setup", "prune-cache", "judge"):
        return args.handler(args)
    if args.command == "evaluate":
        return run_evaluate_cli(args)
    if args.command == "train":
        return run_train_cli(args)
    if args.command == "published-pairs":
        return run_published_cli(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"alma-r: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from alma_r.flows.build_alma_r import build_alma_r

    build_alma_r(config_path=args.config, overrides=args.overrides, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
