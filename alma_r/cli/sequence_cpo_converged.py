"""`alma-r sequence-cpo-converged`: sequence-level CPO as the paper ran it, on the synthetic task: from an MLE model
trained to its validation plateau, continued MLE and every CPO row at equal steps, each row's learning rate
chosen on a validation split, a win rate against the ground truth with the oracle as judge
(alma_r/experiments/sequence_cpo_converged.py; the page: docs/sequence-cpo.md).

    alma-r sequence-cpo-converged --seeds 3 --jobs 2 --write-doc     (~10 min a seed on one CPU core)
"""

from __future__ import annotations

import argparse
import os

from alma_r.cli.common import add_command, add_experiment_arguments

SUMMARY = (
    "sequence-level CPO from a converged MLE model, learning rates tuned on validation (the paper's protocol)"
)


def add_sequence_cpo_converged_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "sequence-cpo-converged", SUMMARY, __doc__, run_cli)
    p.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process and thread each")
    add_experiment_arguments(p, "runs/_cache/sequence-cpo-converged", "ConvergedSizes.steps")
    return p


def run_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import time
    from dataclasses import replace

    from alma_r.experiments import sequence_cpo_converged as sc
    from alma_r.experiments import sequence_cpo_converged_doc as doc

    sizes = sc.ConvergedSizes()
    if args.steps:
        sizes = replace(sizes, steps=args.steps, continue_sources=args.steps * sizes.batch)
    start = time.perf_counter()
    runs = sc.run_converged(sizes, list(range(args.seeds)), args.cache_dir, args.work_dir, jobs=args.jobs)
    seconds = time.perf_counter() - start
    print(
        f"\nSequence-level CPO from a converged MLE model, {args.seeds} seed(s) ({seconds / 60:.1f} min):\n"
    )
    print(doc.table(runs))
    print("\n" + doc.grid_table(runs, sizes))
    if args.write_doc:
        command = f"alma-r sequence-cpo-converged --seeds {args.seeds} --jobs {args.jobs}"
        command += f" --steps {args.steps}" if args.steps else ""
        command += " --write-doc"
        path = doc.update_doc(doc.DOC_PATH, doc.render_section(runs, sizes, command, seconds))
        print(f"\nwrote {path}")
    return 0
