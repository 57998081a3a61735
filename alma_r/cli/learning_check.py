"""`alma-r learning-check`: the ablation table of alma_r/experiments/learning_check.py, printed and written to the docs.

    alma-r learning-check --variant main --seeds 10 --write-doc    (~25 min on one CPU core)
    alma-r learning-check --variant main --seeds 10 --jobs 10      (~3 min on 10 cores)
    alma-r learning-check --variant hard --seeds 5 --write-doc     (~8 min)
    alma-r learning-check --variant imperfect --seeds 5 --jobs 2 --decoding --write-doc

Under an instruction-set limit (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`) the doc gets a section of
its own, beside the default one.

Rows: SFT on flawed references, continued SFT on the references, SFT on chosen, DPO, CPO, ARPO, and CPO / ARPO on
best_vs_all pairs (mean ± standard deviation over seeds 0..N-1). Exits 1 when CPO's exact match is not above
SFT's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alma_r.cli.common import add_command

SUMMARY = "CPO vs SFT on a synthetic task with flawed references (minutes on a CPU)"


def add_learning_check_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "learning-check", SUMMARY, __doc__, run_learning_check_cli)
    p.add_argument("--variant", choices=["main", "hard", "imperfect"], default="main")
    p.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1")
    p.add_argument("--write-doc", action="store_true", help="write the tables to docs/learning-check.md")
    p.add_argument(
        "--doc", help="with --write-doc: write to this copy of the page instead (its other sections stay)"
    )
    p.add_argument("--jobs", type=int, default=1, help="seeds run at a time, one process and thread each")
    p.add_argument("--work-dir", help="keep the models and logs here (default: a temporary folder)")
    p.add_argument(
        "--decoding",
        action="store_true",
        help="also decode the SFT and CPO models with beam search, QE reranking (oracle) and MBR (chrF)",
    )
    return p


def run_learning_check_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import statistics
    import time

    from alma_r.experiments import learning_check as lc
    from alma_r.experiments import learning_check_doc as doc
    from alma_r.experiments import learning_check_tables as tables

    variant = lc.VARIANTS[args.variant]
    start = time.perf_counter()
    results = lc.run_learning_check(
        variant, list(range(args.seeds)), work_dir=args.work_dir, jobs=args.jobs, decode=args.decoding
    )
    seconds = time.perf_counter() - start
    print(f"\nLearning check, {variant.name} variant, {args.seeds} seeds ({seconds / 60:.1f} min):\n")
    print(tables.ablation_table(results))
    print()
    print(tables.per_seed_table(results))
    if args.decoding:
        print()
        print(tables.decoding_table(results))
    if args.write_doc:
        jobs = f" --jobs {args.jobs}" if args.jobs > 1 else ""
        decoding = " --decoding" if args.decoding else ""
        command = (
            f"alma-r learning-check --variant {variant.name} --seeds {args.seeds}{jobs}{decoding} --write-doc"
        )
        section = doc.render_section(variant, results, command, seconds, jobs=args.jobs)
        path = doc.update_doc(Path(args.doc) if args.doc else doc.DOC_PATH, variant, section)
        print(f"\nwrote {path}")
    cpo = statistics.fmean(r.metrics["cpo"]["exact_match"] for r in results)
    sft = statistics.fmean(r.metrics["sft"]["exact_match"] for r in results)
    return 0 if cpo > sft else 1
