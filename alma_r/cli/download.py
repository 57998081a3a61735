"""`alma-r download`: fetch everything a run config names on the Hugging Face Hub, and its sacreBLEU test sets,
into the standard caches (HF_HOME, SACREBLEU), so that the run needs no network.

    alma-r download --config configs/alma-13b-r.yaml              # where the Hub is reachable, once
    HF_HUB_OFFLINE=1 alma-r download --config configs/alma-13b-r.yaml   # on the GPU node: is it all there?

Fetched: model.base at model.revision and model.adapter at model.adapter_revision (config, tokenizer and
safetensors weights; a revision with only .bin/.pt weights is refused unless model.allow_pickle_weights, and is
then converted to safetensors here, once), each COMET model that score.metrics or evaluate.metrics use (at its
revision) with the encoder its hparams.yaml names (config and tokenizer files only), each hf_dataset source's
dataset at its revision, and each sacrebleu source's test set. `model.base: tiny` and local paths are listed as
local. A second run fetches nothing and reports each item present. With HF_HUB_OFFLINE=1 nothing is fetched:
each item is looked up in the cache (cached pickle weights that are allowed are still converted: no network).

It prints a line per item as it goes (stderr), then a table: kind, id, revision, commit (pin a run with it),
size, where, status (downloaded, converted, present, local; missing, refused, failed). `--pin FILE` also
writes the config with every Hub revision replaced by the commit it resolved to (every setting written out),
once every item is available: a run of FILE reads the same files after a branch moves.

exit status: 0 every item is in the cache (or local); 1 an item is missing or could not be fetched (each is
named on a line of its own); 2 a config error.
"""

from __future__ import annotations

import argparse
import sys

from alma_r.cli.common import add_command, add_config_arguments

SUMMARY = "fetch the models, COMET checkpoints and datasets a config names into the caches"


def add_download_parser(sub) -> None:
    p = add_command(sub, "download", SUMMARY, __doc__, run_download_cli)
    add_config_arguments(p, "configs/alma-13b-r.yaml", force=False)
    p.add_argument(
        "--pin",
        metavar="FILE",
        help="also write the config with each Hub revision pinned to its resolved commit (e.g. pinned.yaml)",
    )


def run_download_cli(args: argparse.Namespace) -> int:
    from alma_r.config import load_config
    from alma_r.data.hub import offline
    from alma_r.tasks.shared.pinned_config import write_pinned_config
    from alma_r.tasks.shared.prefetch import caches, prefetch, table, unavailable

    cfg = load_config(args.config, args.overrides)
    print(f"alma-r download: into {caches()}", file=sys.stderr, flush=True)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # one line per item below says what happened; the Hub's bars per file interleave

    def progress(i: int, n: int, item) -> None:
        print(f"alma-r download: [{i}/{n}] {item.line()}", file=sys.stderr, flush=True)

    items = prefetch(cfg, report=progress)
    print(table(items), flush=True)
    bad = unavailable(items)
    for item in bad:
        print(f"alma-r: download: {item.line()}", file=sys.stderr)
    if bad:
        then = (
            "fetch them by running this command where the Hub is reachable, without HF_HUB_OFFLINE"
            if offline()
            else "each line above says why"
        )
        print(
            f"alma-r: download: {len(bad)} of {len(items)} items are not available: {then}", file=sys.stderr
        )
    if bad:
        return 1
    if args.pin:
        path = write_pinned_config(cfg, items, args.pin, origin=str(args.config))
        print(f"alma-r download: the config pinned to these commits: {path}", file=sys.stderr)
    return 0
