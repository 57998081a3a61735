"""`alma-r sequence-cpo`: the table of alma_r/experiments/sequence_cpo_check.py, printed and written to the docs
(alma_r/experiments/sequence_cpo_report.py).

    alma-r sequence-cpo --seeds 1 --write-doc            (~10-15 min on one CPU core; the scorer is cached)
    alma-r sequence-cpo --rows mle,bn,mn,tn,mixn,bnr,mnr,tnr,mixnr,an,anr --write-doc   (every row of the paper)

Rows: the starting MLE model, continued MLE, sequence-level CPO with BN, MN, TN, MixN negatives, with (R) or
without the ranking signal, and WiSE-FT ensembles of the last CPO row with the start.
"""

from __future__ import annotations

import argparse
import os

from alma_r.cli.common import add_command, add_experiment_arguments

# The names of sequence_cpo_check.RUNS and DEFAULT_ROWS, written out so that `alma-r --help` does not import
# torch (tests/test_sequence_cpo_check.py checks that they agree).
ROW_NAMES = ("mle", "bn", "mn", "tn", "mixn", "bnr", "mnr", "tnr", "mixnr", "an", "anr")
DEFAULT_ROWS = ("mle", "bn", "mn", "tn", "mixn", "mixnr")


SUMMARY = "continued MLE vs sequence-level CPO with synthetic negatives on the synthetic task (minutes)"


def add_sequence_cpo_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "sequence-cpo", SUMMARY, __doc__, run_sequence_cpo_cli)
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1")
    p.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help=f"comma-separated rows among {', '.join(ROW_NAMES)} (default: %(default)s)",
    )
    add_experiment_arguments(p, "runs/_cache/sequence-cpo", "CheckSizes.steps")
    return p


def run_sequence_cpo_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import time
    from dataclasses import replace

    from alma_r.experiments import sequence_cpo_check as sc
    from alma_r.experiments import sequence_cpo_report as report

    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in rows if r not in sc.RUNS]
    if unknown:
        print(f"alma-r sequence-cpo: unknown rows {unknown} (choose among {', '.join(sc.RUNS)})")
        return 2
    sizes = replace(sc.CheckSizes(), rows=rows)
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    start = time.perf_counter()
    results = sc.run_check(sizes, list(range(args.seeds)), args.cache_dir, work_dir=args.work_dir)
    seconds = time.perf_counter() - start
    print(f"\nSequence-level CPO check, {args.seeds} seed(s) ({seconds / 60:.1f} min):\n")
    print(report.table(results))
    print("\n".join(["", *report.comparisons(results)]))
    if args.write_doc:
        command = f"alma-r sequence-cpo --seeds {args.seeds} --rows {','.join(rows)}"
        command += f" --steps {args.steps}" if args.steps else ""
        command += f" --work-dir {args.work_dir}" if args.work_dir else ""
        command += " --write-doc"
        path = report.update_doc(report.DOC_PATH, report.render_section(results, sizes, command, seconds))
        print(f"\nwrote {path}")
    return 0
