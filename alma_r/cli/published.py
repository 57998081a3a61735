"""`alma-r published-pairs`: preference pairs from the published ALMA-R data (local file or the Hub).

alma-r published-pairs --source haoranxu/ALMA-R-Preference --config cs-en --output pairs.parquet
alma-r published-pairs --source local.parquet --output pairs.parquet --rejected noise
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alma_r.cli.common import add_command

SUMMARY = "build pairs from the published ALMA-R preference data"


def add_published_parser(sub) -> None:
    p = add_command(sub, "published-pairs", SUMMARY, __doc__, run_published_cli)
    p.add_argument(
        "--source", required=True, help="a local .parquet/.jsonl file or a Hugging Face dataset id"
    )
    p.add_argument("--config", help="dataset config on the Hub, e.g. cs-en")
    p.add_argument(
        "--output", required=True, help="pairs Parquet (TRL's prompt/chosen/rejected + provenance)"
    )
    p.add_argument(
        "--metrics", nargs="+", default=["kiwi", "xcomet"], help="averaged into the selection score"
    )
    p.add_argument("--no-human-labels", action="store_true", help="ignore Delta: the scores alone decide")
    p.add_argument("--rejected", choices=["worst", "noise"], default="worst")
    p.add_argument("--min-margin", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)


def run_published_cli(args: argparse.Namespace) -> int:
    from alma_r.data.files import write_json_atomic
    from alma_r.data.io import write_table
    from alma_r.data.published import DELTA_PREFERS, SYSTEMS, from_published, load_published
    from alma_r.data.schemas import DROPPED, PAIRS, REFERENCE
    from alma_r.tasks.shared.selection import select_pairs, selection_stats

    data = from_published(load_published(args.source, args.config), where=args.source)
    texts = {(s["id"], REFERENCE): s["ref"] for s in data.segments}
    texts.update({(c["segment_id"], c["system"]): c["hypothesis"] for c in data.candidates})
    scores = {(s["segment_id"], s["system"], s["metric"]): s["score"] for s in data.scores}
    pairs, dropped = select_pairs(
        data.segments,
        texts,
        scores,
        list(SYSTEMS),
        args.metrics,
        args.min_margin,
        human_labels=None if args.no_human_labels else data.labels,
        override_systems=DELTA_PREFERS,
        rejected=args.rejected,
        seed=args.seed,
    )
    out = Path(args.output)
    write_table(pairs, out, PAIRS)
    write_table(dropped, out.with_name(out.stem + ".dropped.parquet"), DROPPED)
    write_json_atomic(out.with_name(out.stem + ".stats.json"), selection_stats(pairs, dropped))
    print(f"{len(pairs)} pairs -> {out} ({len(dropped)} sources dropped)")
    return 0
