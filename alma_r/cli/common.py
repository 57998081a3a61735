"""The arguments every flow-running command shares: a config file, `--set` overrides, `--force` stages,
`--debug`."""

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
    add_debug_argument(parser, default=argparse.SUPPRESS)


def add_debug_argument(parser: argparse.ArgumentParser, default=False) -> None:
    """`--debug`, before the command (`alma-r --debug run ...`) or after it; the sub-command's default is
    SUPPRESS, so that it does not undo a `--debug` given before the command."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="print the traceback of an expected failure too (a run's log file, <run>/logs/alma-r.log, has "
        "it anyway) and Prefect's tracebacks as it logs them",
    )


def add_command(sub, name: str, summary: str, doc: str, handler) -> argparse.ArgumentParser:
    """Register a sub-command: `summary` in `alma-r --help`, the module docstring `doc` as its own --help (kept
    as written, so that its example commands keep their layout), and `handler(args) -> exit status`."""
    parser = sub.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(handler=handler)
    return parser


def add_experiment_arguments(parser: argparse.ArgumentParser, cache_dir: str, steps_default: str) -> None:
    """The flags of a measured experiment that writes a doc section (`alma-r sequence-cpo`,
    `alma-r sequence-cpo-converged`): --steps, --write-doc, --cache-dir, --work-dir."""
    parser.add_argument(
        "--steps", type=int, help=f"continuation steps of every row (default: {steps_default})"
    )
    parser.add_argument("--write-doc", action="store_true", help="write its section of docs/sequence-cpo.md")
    parser.add_argument(
        "--cache-dir",
        default=cache_dir,
        help="where the larger scoring model is kept between runs (default: %(default)s)",
    )
    parser.add_argument("--work-dir", help="keep the models and logs here (default: a temporary folder)")
