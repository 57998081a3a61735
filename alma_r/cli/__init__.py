"""`alma-r`: one module per command in this package; `main` only assembles them, dispatches, and ends a failure
in one line with its kind's exit status (alma_r/cli/failure_report.py).

Each command module has `add_<command>_parser(sub)`, which registers its sub-parser with `handler` set to the
function that runs it (returning the exit status).
"""

from __future__ import annotations

import argparse
import os
import sys

# Before Prefect is imported: its temporary local server (alma-r run without a server) sends telemetry heartbeats
# by default, and on a fresh PREFECT_HOME they hit a locked SQLite database and print a traceback from the
# server's own process. Telemetry stays the user's choice: a value already set wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from alma_r.cli.common import add_debug_argument  # noqa: E402
from alma_r.cli.download import add_download_parser
from alma_r.cli.evaluate import add_evaluate_parser
from alma_r.cli.judge import add_judge_parser
from alma_r.cli.learning_check import add_learning_check_parser
from alma_r.cli.orchestration import add_orchestration_parsers
from alma_r.cli.published import add_published_parser
from alma_r.cli.run import add_run_parsers
from alma_r.cli.sequence_cpo import add_sequence_cpo_parser
from alma_r.cli.sequence_cpo_converged import add_sequence_cpo_converged_parser
from alma_r.cli.sequence_run import add_sequence_run_parser
from alma_r.cli.train import add_train_parser
from alma_r.tasks.runtime.failures import exit_code_help

COMMANDS = (
    add_run_parsers,
    add_train_parser,
    add_published_parser,
    add_evaluate_parser,
    add_learning_check_parser,
    add_sequence_cpo_parser,
    add_sequence_cpo_converged_parser,
    add_sequence_run_parser,
    add_judge_parser,
    add_orchestration_parsers,
    add_download_parser,
)

EPILOG = f"""{exit_code_help()}

An expected failure ends with one line on stderr, `alma-r: <stage>: <file>:<line>: <problem>`; its traceback
is in the run's log file, <run>/logs/alma-r.log (--debug prints it too)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alma-r",
        description="Build machine-translation LLMs with Contrastive Preference Optimization.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    args.log_file = None  # a flow-running command sets it to the run's log file
    try:
        return args.handler(args)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # KeyboardInterrupt and Prefect's TerminationSignal too: exit status 130
        from alma_r.cli.failure_report import report_failure

        return report_failure(err, args.log_file, args.debug)


if __name__ == "__main__":
    sys.exit(main())
