"""`alma-r train`: one-off CPO training outside the flow, with TRL-named flags.

    alma-r train --model DIR --data pairs.parquet --output DIR [--loss-type sigmoid --beta 0.1 ...]
    accelerate launch --num_processes 2 -m alma_r.cli train ...      (data parallel)

The data is any Parquet file with TRL's `prompt`, `chosen`, `rejected` columns (e.g. a run's select/pairs.parquet).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="CPO-train a model on a preference Parquet file (outside the flow)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model folder or Hugging Face id")
    p.add_argument("--data", required=True, help="Parquet with prompt/chosen/rejected columns")
    p.add_argument("--output", required=True, help="output folder: adapter/, metrics.jsonl, checkpoints/")
    p.add_argument("--adapter", help="LoRA adapter to continue training (ALMA-R continues ALMA-13B-LoRA)")
    p.add_argument(
        "--loss-type", default="sigmoid", choices=["sigmoid", "hinge", "ipo", "simpo", "dpo", "sft"]
    )
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--cpo-alpha", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--simpo-gamma", type=float, default=0.5)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument(
        "--lr-scheduler-type",
        default="inverse_sqrt",
        choices=["inverse_sqrt", "linear", "cosine", "constant"],
    )
    p.add_argument("--warmup-ratio", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--num-train-epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--per-device-train-batch-size", type=int, default=4)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--tokenization", default="alma", choices=["alma", "trl"])
    p.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train a new LoRA adapter (--no-lora: every weight)",
    )
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-target-modules", nargs="+", default=["down_proj"])
    p.add_argument("--shared-prompt", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (log-softmax stays float32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--save-merged", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=run_train_cli)
    return p


def read_pairs(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.column_names]
    if missing:
        raise SystemExit(
            f"alma-r train: {path}: missing column(s) {missing} (need TRL's prompt/chosen/rejected)"
        )
    rows = table.select(["prompt", "chosen", "rejected"]).to_pylist()
    for i, row in enumerate(rows):
        for key, value in row.items():
            if not isinstance(value, str):
                raise SystemExit(
                    f"alma-r train: {path}: row {i}: field '{key}' is {value!r}, expected a string"
                )
    return rows


def run_train_cli(args: argparse.Namespace) -> int:
    from alma_r.models.train.recipe import CPORecipe, TrainSettings, plot_curves

    lora = None
    if args.lora and args.adapter is None:
        lora = {
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target_modules": args.lora_target_modules,
        }
    settings = TrainSettings(
        loss_type=args.loss_type,
        beta=args.beta,
        cpo_alpha=args.cpo_alpha,
        label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler_type,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        num_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
        tokenization=args.tokenization,
        shared_prompt=args.shared_prompt,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision="bf16" if args.bf16 else "no",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        save_merged=args.save_merged,
        seed=args.seed,
        lora=lora,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    out = Path(args.output)
    recipe = (
        CPORecipe(settings, args.model, read_pairs(Path(args.data)), out, adapter=args.adapter)
        .setup()
        .train()
    )
    path = recipe.save(out / ("adapter" if recipe.is_peft else "model"))
    if recipe.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png", f"CPO ({settings.loss_type})")
        print(f"saved {path}")
    return 0
