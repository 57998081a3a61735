"""`alma-r`: one module per command in this package; `main` only assembles them and dispatches.

Each command module has `add_<command>_parser(sub)`, which registers its sub-parser with `handler` set to the
function that runs it (returning the exit status).
"""

from __future__ import annotations

import argparse
import sys

from alma_r.cli.evaluate import add_evaluate_parser
from alma_r.cli.judge import add_judge_parser
from alma_r.cli.learning_check import add_learning_check_parser
from alma_r.cli.orchestration import add_orchestration_parsers
from alma_r.cli.published import add_published_parser
from alma_r.cli.run import add_run_parsers
from alma_r.cli.sequence_cpo import add_sequence_cpo_parser
from alma_r.cli.sequence_run import add_sequence_run_parser
from alma_r.cli.train import add_train_parser

COMMANDS = (
    add_run_parsers,
    add_train_parser,
    add_published_parser,
    add_evaluate_parser,
    add_learning_check_parser,
    add_sequence_cpo_parser,
    add_sequence_run_parser,
    add_judge_parser,
    add_orchestration_parsers,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alma-r", description="Build machine-translation LLMs with Contrastive Preference Optimization."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
