"""`alma-r train`: one-off CPO training outside the flow, with flags generated from the recipe's settings.

    alma-r train --model DIR --data pairs.parquet --output DIR [--loss-type sigmoid --beta 0.1 ...]
    accelerate launch --num_processes 2 -m alma_r.cli train ...      (data parallel)

Every field of TrainSettings (the config's `train` section) is a flag with its description as help, nested LoRA
fields as --lora-r ...; TRL's names work where ours differ (--lr-scheduler-type, --num-train-epochs,
--per-device-train-batch-size), and --bf16 / --no-lora set mixed_precision / finetune. --seed, --dtype and
--trust-remote-code are the run and model sections' fields. The data is any Parquet file with TRL's `prompt`,
`chosen`, `rejected` columns (e.g. a run's select/pairs.parquet).

Rerun with the same --output to resume from its newest checkpoint: it continues only the run that wrote it (same
model, data, result-affecting settings and process count; logging and checkpoint cadence may change). A
checkpoint of another run is refused in one line naming what differs; --restart moves the checkpoints aside to
<output>/.superseded/ and starts over.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alma_r.cli.common import add_command
from alma_r.cli.schema_args import add_model_arguments, validate_given
from alma_r.config import ModelSection, RunSection
from alma_r.models.train.settings import TrainSettings

COMMAND = "alma-r train"


SUMMARY = "CPO-train a model on a preference Parquet file (outside the flow)"


def add_train_parser(sub, settings_class: type[TrainSettings] = TrainSettings) -> argparse.ArgumentParser:
    """The `train` sub-parser; `settings_class` is TrainSettings or a subclass (its new fields become flags)."""
    p = add_command(sub, "train", SUMMARY, __doc__, run_train_cli)
    p.add_argument("--model", required=True, help="base model folder or Hugging Face id")
    p.add_argument(
        "--data", required=True, help="Parquet with prompt/chosen/rejected columns (and an optional weight)"
    )
    p.add_argument("--output", required=True, help="output folder: adapter/, metrics.jsonl, checkpoints/")
    p.add_argument("--adapter", help="LoRA adapter to continue training (ALMA-R continues ALMA-13B-LoRA)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="move --output's checkpoints (and DPO reference cache) aside to <output>/.superseded/ and train "
        "from step 0 (nothing is deleted)",
    )
    add_model_arguments(
        p.add_argument_group("training (the config's train section)"), settings_class, "train"
    )
    run_and_model = p.add_argument_group("run and model (the config's run and model sections)")
    add_model_arguments(run_and_model, RunSection, "run", only={"seed"})
    add_model_arguments(run_and_model, ModelSection, "model", only={"dtype", "trust_remote_code"})
    p.set_defaults(settings_class=settings_class)
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[TrainSettings, dict]:
    """The TrainSettings the flags give, and the recipe's run-level keywords (seed, dtype, trust_remote_code),
    each validated by the section that declares it."""
    settings = validate_given(args.settings_class, args, "train", COMMAND)
    run = validate_given(RunSection, args, "run", COMMAND)
    model = validate_given(ModelSection, args, "model", COMMAND)
    return settings, {"seed": run.seed, "dtype": model.dtype, "trust_remote_code": model.trust_remote_code}


def read_pairs(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.column_names]
    if missing:
        raise SystemExit(
            f"alma-r train: {path}: missing column(s) {missing} (need TRL's prompt/chosen/rejected)"
        )
    weighted = "weight" in table.column_names  # select.pairs' share of a source; absent: every pair weighs 1
    rows = table.select(["prompt", "chosen", "rejected", *(["weight"] if weighted else [])]).to_pylist()
    for i, row in enumerate(rows):
        for key, value in row.items():
            if key == "weight":
                if value is not None and not (isinstance(value, int | float) and value > 0):
                    raise SystemExit(
                        f"alma-r train: {path}: row {i}: field 'weight' is {value!r}, expected a positive number"
                    )
            elif not isinstance(value, str):
                raise SystemExit(
                    f"alma-r train: {path}: row {i}: field '{key}' is {value!r}, expected a string"
                )
    return rows


def run_train_cli(args: argparse.Namespace) -> int:
    from alma_r import __version__
    from alma_r.models.train.metrics import plot_curves
    from alma_r.models.train.recipe import CPORecipe
    from alma_r.tasks.runtime.stage import code_version

    settings, run_context = settings_from_args(args)
    out = Path(args.output)
    pairs = read_pairs(Path(args.data))
    recipe = CPORecipe(
        settings,
        args.model,
        pairs,
        out,
        adapter=args.adapter,
        **run_context,
        code_version=f"alma-r {__version__} (training code {code_version('alma_r.models.train.recipe')})",
        restart=args.restart,
    )
    recipe.setup().train()
    path = recipe.save(out / ("adapter" if recipe.is_peft else "model"))
    if recipe.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png", f"CPO ({settings.loss_type})")
        print(f"saved {path}")
    return 0
