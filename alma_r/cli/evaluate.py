"""`alma-r evaluate`: any mix of systems on named test sets and directions, outside the flow.

    alma-r evaluate --test-set wmt22 --lps de-en en-de \\
        --testset-dir path/to/wmt-testset \\
        --system base=hf:runs/tiny/sft/model \\
        --system cpo=hf:runs/tiny/sft/model,adapter=runs/tiny/train/adapter \\
        --system ALMA-13B-R=file:path/to/ALMA-13B-R/{xxyy}/test.{src}-{tgt}.{tgt} \\
        --output runs/eval-once

Test sets come from a folder in ALMA's layout (<dir>/<xxyy>/test.<src>-<tgt>.<lang>) or, without --testset-dir,
from sacreBLEU (downloads once). The first system is the baseline of the significance tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alma_r.cli.common import add_command

SUMMARY = "score systems on WMT test sets outside the flow"


def add_evaluate_parser(sub) -> None:
    p = add_command(sub, "evaluate", SUMMARY, __doc__, run_evaluate_cli)
    p.add_argument("--test-set", required=True, help="name, e.g. wmt22 (also the sacreBLEU test set)")
    p.add_argument("--lps", nargs="+", required=True, help="directions, e.g. de-en en-de")
    p.add_argument("--testset-dir", help="folder in ALMA's layout; without it, sacreBLEU's copy")
    p.add_argument(
        "--system",
        action="append",
        required=True,
        metavar="NAME=SPEC",
        help="hf:MODEL[,adapter=DIR] or file:TEMPLATE with {src} {tgt} {xxyy} (repeatable)",
    )
    p.add_argument("--output", required=True)
    p.add_argument("--metrics", nargs="+", default=["bleu", "chrf"], help="bleu, chrf and COMET metric names")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-segments", type=int, help="only the first N segments per direction")
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.add_argument(
        "--decoding",
        choices=["beam", "qe_rerank", "mbr"],
        default="beam",
        help="qe_rerank / mbr: also each hf system's --candidates best beams reranked (systems NAME+qe_rerank, "
        "NAME+mbr), as evaluate.decoding",
    )
    p.add_argument("--candidates", type=int, default=8, help="beams per prompt for --decoding qe_rerank/mbr")
    p.add_argument("--qe-metric", default="consensus_chrf", help="qe_rerank's reference-free metric")
    p.add_argument(
        "--mbr-utility", default="chrf", help="mbr's utility: chrf, bleu or a reference-based COMET"
    )


def parse_system(value: str) -> tuple[str, str, dict]:
    name, _, spec = value.partition("=")
    kind, _, rest = spec.partition(":")
    if not name or kind not in ("hf", "file") or not rest:
        raise SystemExit(
            f"alma-r evaluate: --system '{value}': expected NAME=hf:MODEL[,adapter=DIR] or NAME=file:TEMPLATE"
        )
    if kind == "file":
        return name, kind, {"template": rest}
    model, *options = rest.split(",")
    extra = dict(o.split("=", 1) for o in options)
    unknown = set(extra) - {"adapter"}
    if unknown:
        raise SystemExit(f"alma-r evaluate: --system '{value}': unknown option(s) {sorted(unknown)}")
    return name, kind, {"model": model, "adapter": extra.get("adapter")}


def run_evaluate_cli(args: argparse.Namespace) -> int:
    from alma_r.config import RunConfig
    from alma_r.data.files import write_text_atomic
    from alma_r.data.io import write_table
    from alma_r.data.readers import IngestError, read_aligned_text, read_lines, read_sacrebleu_test_set
    from alma_r.data.schemas import EVAL_RESULTS, HYPOTHESES, SCORES
    from alma_r.models.score.cache import ScoreCache
    from alma_r.tasks.evaluate import reranked_systems, score_systems, translate_test_sets
    from alma_r.tasks.shared.report_sections import results_section
    from alma_r.tasks.shared.scoring import make_scorer

    out = Path(args.output)
    cfg = RunConfig.model_validate(
        {
            "run": {"name": out.name, "root": str(out.parent)},
            "evaluate": {
                "num_beams": args.num_beams,
                "max_new_tokens": args.max_new_tokens,
                "max_prompt_tokens": args.max_prompt_tokens,
                "batch_size": args.batch_size,
                "metrics": args.metrics,
                "bootstrap_samples": args.bootstrap_samples,
                "decoding": args.decoding,
                "candidates": args.candidates,
                "qe_metric": args.qe_metric,
                "mbr_utility": args.mbr_utility,
            },
        }
    )
    tests = []
    for lp in args.lps:
        src, tgt = lp.split("-")
        if args.testset_dir:
            folder = Path(args.testset_dir) / f"{src}{tgt}"
            tests += read_aligned_text(
                folder / f"test.{src}-{tgt}.{src}",
                folder / f"test.{src}-{tgt}.{tgt}",
                lp,
                [lp],
                "test",
                origin=args.test_set,
                max_lines=args.max_segments,
            )
        else:
            tests += read_sacrebleu_test_set(args.test_set, lp, max_lines=args.max_segments)
    systems: dict[str, list[str | None]] = {}
    specs = [parse_system(v) for v in args.system]
    cache = ScoreCache(out / "_cache" / "scores.sqlite")
    n_best = args.candidates if args.decoding != "beam" else 0
    for name, kind, spec in specs:
        if kind == "hf":
            systems[name], _, beams = translate_test_sets(
                cfg, tests, spec["model"], spec["adapter"], name, n_best
            )
            systems.update(reranked_systems(cfg, tests, name, beams, cache, {}))
            continue
        hyps: list[str | None] = []
        for lp in args.lps:
            src, tgt = lp.split("-")
            path = Path(spec["template"].format(src=src, tgt=tgt, xxyy=f"{src}{tgt}"))
            lines = read_lines(path)
            n = sum(t["lp"] == lp for t in tests)
            if len(lines) < n:
                raise IngestError(
                    f"{path}:{len(lines) + 1}: {len(lines)} lines for {n} test segments of {lp}"
                )
            hyps += lines[:n]
        systems[name] = hyps
    # The first system is the baseline of the significance tests.
    first = specs[0][0]
    ordered = {"baseline" if n == first else n: h for n, h in systems.items()}
    comet = {m: (make_scorer(cfg, m, ""), cache) for m in args.metrics if m not in ("bleu", "chrf")}
    results, hyp_rows, segment_rows = score_systems(tests, ordered, comet, args.bootstrap_samples)
    rename = lambda rows: [{**r, "system": first if r["system"] == "baseline" else r["system"]} for r in rows]  # noqa: E731
    results = [r for r in rename(results) if r["metric"] in args.metrics]
    write_table(results, out / "eval.parquet", EVAL_RESULTS)
    write_table(rename(hyp_rows), out / "hypotheses.parquet", HYPOTHESES)
    write_table(rename(segment_rows), out / "segment_scores.parquet", SCORES)
    report = f"# alma-r evaluate: {args.test_set}\n\nBaseline of the significance tests: `{first}`.\n\n"
    report += results_section(
        [{**r, "system": "baseline" if r["system"] == first else r["system"]} for r in results]
    )
    write_text_atomic(out / "report.md", report.replace("| baseline |", f"| {first} |") + "\n")
    print(report)
    return 0
