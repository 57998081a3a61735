"""The CPO training recipe: one class, read top to bottom.

`CPORecipe(...).setup()` loads the model, the pairs and the optimizer (in that order: the optimizer needs the
trainable parameters, the scheduler needs the number of steps the data gives), resuming from the newest
checkpoint when one matches this configuration; `train()` runs the optimizer steps; `save()` writes the final
PEFT adapter folder (or the full model, for the SFT warm-up), atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alma_r.data.io import write_json_atomic, write_text_atomic
from alma_r.models.cpo_loss import preference_loss
from alma_r.models.loading import load_model, load_tokenizer, pick_device
from alma_r.models.logprobs import completion_logps
from alma_r.models.prompts import completion_text


@dataclass
class TrainSettings:
    """What the recipe needs; built from the config's `train` (CPO) or `sft` (warm-up) section."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    cpo_alpha: float = 1.0
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    learning_rate: float = 1e-4
    lr_scheduler: str = "inverse_sqrt"
    warmup_ratio: float = 0.01
    weight_decay: float = 0.01
    num_epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_prompt_length: int = 256
    max_length: int = 512
    save_steps: int = 50
    logging_steps: int = 5
    seed: int = 42
    lora: dict | None = field(default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.05,
                                                       "target_modules": ["down_proj"]})
    dtype: str = "float32"
    trust_remote_code: bool = False

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


def tokenize_pairs(tokenizer, pairs: list[dict], max_prompt_length: int, max_length: int,
                   with_rejected: bool = True) -> tuple[list[dict], dict[str, int]]:
    """ALMA-R's convention: prompt and completion tokenised separately, no BOS, EOS appended to completions.

    A pair whose prompt or total length exceeds the limits is skipped and counted, never truncated.
    """
    kept, skipped = [], {"prompt_too_long": 0, "too_long": 0}
    eos = tokenizer.eos_token_id
    for pair in pairs:
        prompt_ids = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        chosen_ids = tokenizer(completion_text(pair["chosen"]), add_special_tokens=False)["input_ids"] + [eos]
        rejected_ids = (tokenizer(completion_text(pair["rejected"]), add_special_tokens=False)["input_ids"] + [eos]
                        if with_rejected else [eos])
        if len(prompt_ids) > max_prompt_length:
            skipped["prompt_too_long"] += 1
            continue
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length:
            skipped["too_long"] += 1
            continue
        kept.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return kept, skipped


def collate(examples: list[dict], pad_id: int, with_rejected: bool = True) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, right-padded into one batch: one forward pass per micro-batch."""
    sequences = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
    if with_rejected:
        sequences += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (p, c) in enumerate(sequences):
        n = len(p) + len(c)
        input_ids[row, :n] = torch.tensor(p + c)
        attention_mask[row, :n] = 1
        completion_mask[row, len(p):n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _scheduler(name: str, optimizer, warmup: int, total: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_inverse_sqrt_schedule,
        get_linear_schedule_with_warmup,
    )

    if name == "inverse_sqrt":
        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=max(warmup, 1))
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _save_dir_atomic(out_dir: Path, write) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class CPORecipe:
    def __init__(self, settings: TrainSettings, model_path: str, pairs: list[dict], out_dir: Path,
                 adapter: str | None = None):
        if settings.lora is not None and adapter is not None:
            raise ValueError("give either a starting adapter to continue or a new LoRA config, not both")
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.s = settings
        self.model_path = model_path
        self.adapter = adapter
        self.raw_pairs = pairs
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.with_rejected = settings.loss_type != "sft"
        self.step = 0
        self.resumed_from: int | None = None

    # ----------------------------------------------------------------------------------------- setup
    def setup(self) -> CPORecipe:
        self._setup_seed()
        self._setup_model()
        self._setup_data()  # needs the tokenizer
        self._setup_optimizer()  # needs trainable parameters and the step count from the data
        self._maybe_resume()  # last: overwrites weights, optimizer, scheduler and RNG
        return self

    def _setup_seed(self):
        torch.manual_seed(self.s.seed)

    def _setup_model(self):
        self.device = pick_device()
        self.tokenizer = load_tokenizer(self.model_path, self.s.trust_remote_code)
        model = load_model(self.model_path, adapter=self.adapter, dtype=self.s.dtype, trainable_adapter=True,
                           trust_remote_code=self.s.trust_remote_code, device=self.device)
        if self.s.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=self.s.lora["r"], lora_alpha=self.s.lora["alpha"], lora_dropout=self.s.lora["dropout"],
                              target_modules=list(self.s.lora["target_modules"]), task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        self.is_peft = hasattr(model, "peft_config")
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _setup_data(self):
        self.examples, self.skipped = tokenize_pairs(self.tokenizer, self.raw_pairs, self.s.max_prompt_length,
                                                     self.s.max_length, with_rejected=self.with_rejected)
        if not self.examples:
            raise ValueError(f"every pair was skipped by the length limits: {self.skipped}")
        self.micro_per_epoch = math.ceil(len(self.examples) / self.s.batch_size)
        steps_per_epoch = math.ceil(self.micro_per_epoch / self.s.gradient_accumulation_steps)
        self.total_steps = self.s.max_steps or max(1, math.ceil(self.s.num_epochs * steps_per_epoch))

    def _setup_optimizer(self):
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]  # norms and biases: no weight decay (as in HF)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.s.learning_rate,
        )
        warmup = math.ceil(self.s.warmup_ratio * self.total_steps)
        self.scheduler = _scheduler(self.s.lr_scheduler, self.optimizer, warmup, self.total_steps)

    # ------------------------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        found = [p for p in self.ckpt_dir.glob("step-*") if (p / "trainer_state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self):
        def write(tmp: Path):
            save_file(self._trainable_state(), tmp / "trainable.safetensors")
            state = {
                "step": self.step,
                "fingerprint": self.s.fingerprint(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            torch.save(state, tmp / "trainer_state.pt")

        _save_dir_atomic(self.ckpt_dir / f"step-{self.step}", write)
        for old in self._checkpoints()[:-2]:  # keep the newest two: one may be mid-write when a node dies
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self):
        for ckpt in reversed(self._checkpoints()):
            state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
            if state["fingerprint"] != self.s.fingerprint():
                print(f"[train] ignoring {ckpt}: it was written with other training settings")
                continue
            weights = load_file(ckpt / "trainable.safetensors")
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor.to(params[name].device))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
            self.resumed_from = self.step
            self._truncate_metrics(self.step)
            print(f"[train] resumed from {ckpt} at step {self.step}")
            return

    def _truncate_metrics(self, step: int):
        if self.metrics_path.is_file():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            write_text_atomic(self.metrics_path, "".join(ln + "\n" for ln in lines))

    # ---------------------------------------------------------------------------------------- training
    def _micro_batch(self, micro: int) -> list[dict]:
        """The micro-batch at global index `micro`: a seeded permutation per epoch, so resume is exact."""
        epoch, offset = divmod(micro, self.micro_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.s.seed + epoch))
        idx = order[offset * self.s.batch_size:(offset + 1) * self.s.batch_size].tolist()
        return [self.examples[i] for i in idx]

    def _forward(self, examples: list[dict]):
        batch = {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id,
                                                             self.with_rejected).items()}
        logps, n_tokens = completion_logps(self.model, batch["input_ids"], batch["attention_mask"],
                                           batch["completion_mask"])
        n = len(examples)
        rejected_logps = logps[n:] if self.with_rejected else logps[:n].detach()
        rejected_tokens = n_tokens[n:] if self.with_rejected else n_tokens[:n]
        return preference_loss(logps[:n], rejected_logps, n_tokens[:n], rejected_tokens, beta=self.s.beta,
                               cpo_alpha=self.s.cpo_alpha, loss_type=self.s.loss_type,
                               label_smoothing=self.s.label_smoothing, simpo_gamma=self.s.simpo_gamma)

    def train(self) -> CPORecipe:
        self.model.train()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train ({self.s.loss_type})", unit="step",
                   disable=None)  # a bar on a terminal, nothing in captured logs
        log_file = open(self.metrics_path, "a", encoding="utf-8")
        try:
            while self.step < self.total_steps:
                totals = {"loss": 0.0, "preference": 0.0, "nll": 0.0, "chosen": 0.0, "rejected": 0.0, "acc": 0.0}
                accum = self.s.gradient_accumulation_steps
                for k in range(accum):
                    out = self._forward(self._micro_batch(self.step * accum + k))
                    (out.loss / accum).backward()
                    totals["loss"] += out.loss.item() / accum
                    totals["preference"] += out.preference.item() / accum
                    totals["nll"] += out.nll.item() / accum
                    totals["chosen"] += out.chosen_rewards.mean().item() / accum
                    totals["rejected"] += out.rejected_rewards.mean().item() / accum
                    totals["acc"] += (out.chosen_rewards > out.rejected_rewards).float().mean().item() / accum
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.s.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{totals['loss']:.4f}")
                if self.step % self.s.logging_steps == 0 or self.step == self.total_steps:
                    record = {
                        "step": self.step,
                        "epoch": round(self.step * accum / self.micro_per_epoch, 4),
                        "loss": totals["loss"],
                        "preference_loss": totals["preference"],
                        "nll_loss": totals["nll"],
                        "rewards/chosen": totals["chosen"],
                        "rewards/rejected": totals["rejected"],
                        "rewards/margins": totals["chosen"] - totals["rejected"],
                        "rewards/accuracies": totals["acc"],
                        "grad_norm": float(grad_norm),
                        "learning_rate": lr,
                    }
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if self.step % self.s.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            log_file.close()
            bar.close()
        return self

    # ------------------------------------------------------------------------------------------ output
    def save(self, out_dir: Path) -> Path:
        """A PEFT adapter folder (LoRA) or a full model folder, both safetensors, with the tokenizer."""
        def write(tmp: Path):
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        path = _save_dir_atomic(Path(out_dir), write)
        write_json_atomic(self.out_dir / "train_summary.json", self.summary())
        return path

    def summary(self) -> dict:
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "resumed_from": self.resumed_from,
            "pairs": len(self.raw_pairs),
            "pairs_used": len(self.examples),
            "skipped": self.skipped,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "device": str(self.device),
        }


def plot_curves(metrics_path: Path, out_path: Path, title: str) -> Path | None:
    """Training curves (loss, NLL, reward margin, accuracy) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    if not records:
        return None
    steps = [r["step"] for r in records]
    keys = [("loss", "total loss"), ("nll_loss", "NLL on chosen"), ("rewards/margins", "reward margin"),
            ("rewards/accuracies", "reward accuracy")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.plot(steps, [r[key] for r in records])
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
