"""The arguments every flow-running command shares: a config file, `--set` overrides, `--force` stages."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, example: str, force: bool = True) -> None:
    parser.add_argument("--config", required=True, help=f"YAML run config, e.g. {example}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.beta=0.2 (repeatable)",
    )
    if force:
        parser.add_argument(
            "--force",
            action="append",
            default=[],
            metavar="STAGE",
            help="recompute this stage (repeatable; all)",
        )
