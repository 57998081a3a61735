"""`alma-r sequence-run`: the sequence-cpo flow (flows/sequence_cpo.py) in-process.

    alma-r sequence-run --config configs/sequence-cpo/dolly-tiny.yaml [--set train.max_steps=20] [--force train]

The config is alma_r/config/sequence.py's SequenceRunConfig; a config error exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from alma_r.cli.common import add_command, add_config_arguments

SUMMARY = "run the sequence-cpo flow (MLE, sequence-level CPO, WiSE-FT, eq. 9/10, judge) in-process"


def add_sequence_run_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "sequence-run", SUMMARY, __doc__, run_sequence_run_cli)
    add_config_arguments(p, "configs/sequence-cpo/dolly-tiny.yaml")
    return p


def run_sequence_run_cli(args: argparse.Namespace) -> int:
    from alma_r.config import ConfigError
    from alma_r.config.sequence import load_sequence_config

    try:
        load_sequence_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"alma-r: config error: {err}", file=sys.stderr)
        return 2
    from alma_r.flows.sequence_cpo import sequence_cpo

    sequence_cpo(config_path=args.config, overrides=args.overrides, force=args.force)
    return 0
