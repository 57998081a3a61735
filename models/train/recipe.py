"""The CPO training recipe: one class, read top to bottom.

`CPORecipe(...).setup()` loads the model, the pairs and the optimizer, in that order (the optimizer needs the
trainable parameters, the scheduler needs the step count the data gives), then resumes from the newest
checkpoint written with the same settings; `train()` runs the optimizer steps; `save()` writes the PEFT
adapter folder (or the full model), atomically.

Runs as one process or under `accelerate launch` / torchrun (data parallel): each optimizer step takes
batch_size x gradient_accumulation_steps x world_size pairs, and the loss is normalised by that whole step's
pair and token counts, so accumulation and the number of processes never change the objective.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alma_r.data.io import (
    save_dir_atomic,  # noqa: F401  (re-exported: trainers save folders with it)
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)
from alma_r.models import progress
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.prompts import completion_text
from alma_r.models.train.logprobs import CompletionLogps, PackedBatch
from alma_r.models.train.losses import LOSS_TYPES, preference_loss

# Settings that do not change the maths of training: a checkpoint written under other values still resumes.
_NOT_IN_FINGERPRINT = {"save_steps", "logging_steps", "save_merged", "logits_chunk_size"}


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
    tokenization: str = "alma"  # "alma": ALMA-R's convention; "trl": TRL's CPOTrainer convention
    shared_prompt: bool = True  # encode the prompt once for chosen and rejected (packed rows, 4D mask)
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # "no" or "bf16" (autocast; log-softmax stays float32)
    save_steps: int = 50
    logging_steps: int = 5
    save_merged: bool = False
    logits_chunk_size: int = 1024
    seed: int = 42
    lora: dict | None = field(
        default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["down_proj"]}
    )
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type '{self.loss_type}' is not one of {LOSS_TYPES}")
        if self.tokenization not in ("alma", "trl"):
            raise ValueError(f"tokenization '{self.tokenization}' is not 'alma' or 'trl'")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision '{self.mixed_precision}' is not 'no' or 'bf16'")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- tokenisation


def _trl_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """TRL's build_tokenized_answer: tokenise prompt+answer jointly, split where the prompt ends (one token
    earlier when the tokenizer merged across the boundary)."""
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, convention: str = "alma") -> dict:
    """Token ids of one pair: {chosen,rejected}_prompt_ids and {chosen,rejected}_ids (EOS included).

    alma: prompt and completion tokenised separately, no BOS, EOS appended (ALMA-R's released trainer).
    trl:  prompt+completion tokenised jointly, BOS prepended and EOS appended when missing (TRL's CPOTrainer).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if convention == "alma":
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion_text(chosen), add_special_tokens=False)["input_ids"] + [eos]
        r = tokenizer(completion_text(rejected), add_special_tokens=False)["input_ids"] + [eos]
        return {"chosen_prompt_ids": p, "chosen_ids": c, "rejected_prompt_ids": p, "rejected_ids": r}
    out = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        p, a = _trl_answer(tokenizer, prompt, completion_text(answer))
        if bos is not None and (not p or p[0] != bos):
            p = [bos, *p]
        if not a or a[-1] != eos:
            a = [*a, eos]
        out[f"{side}_prompt_ids"], out[f"{side}_ids"] = p, a
    return out


def tokenize_pairs(
    tokenizer, pairs: list[dict], max_prompt_length: int, max_length: int, convention: str = "alma"
) -> tuple[list[dict], dict[str, int]]:
    """Tokenise pairs; one whose prompt or total length exceeds the limits is skipped and counted, never cut."""
    kept, skipped = [], {"prompt_too_long": 0, "too_long": 0}
    for pair in pairs:
        ex = tokenize_pair(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"], convention)
        if max(len(ex["chosen_prompt_ids"]), len(ex["rejected_prompt_ids"])) > max_prompt_length:
            skipped["prompt_too_long"] += 1
            continue
        if max(len(ex[f"{s}_prompt_ids"]) + len(ex[f"{s}_ids"]) for s in ("chosen", "rejected")) > max_length:
            skipped["too_long"] += 1
            continue
        kept.append(ex)
    return kept, skipped


# ------------------------------------------------------------------------------------------------ batching


def _mask_value(dtype: torch.dtype, attn_implementation: str):
    """SDPA takes a boolean mask (True = attend); eager attention adds a float mask to the scores."""
    if attn_implementation == "eager":
        return torch.finfo(dtype).min
    return None


def collate(
    examples: list[dict],
    pad_id: int,
    with_rejected: bool = True,
    shared_prompt: bool = False,
    mask_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PackedBatch:
    """Lay a micro-batch out for one decoder pass. Sequences 0..B-1 are the chosen sides, B..2B-1 the rejected.

    Plain layout: 2B right-padded rows (prompt + completion), a 2D mask. Shared-prompt layout (when every pair's
    two prompts are identical): B rows of prompt + chosen + rejected, where rejected tokens see the prompt and
    themselves but not the chosen tokens, and continue the prompt's positions: the prompt is encoded once.
    """
    B = len(examples)
    shared = (
        with_rejected
        and shared_prompt
        and all(e["chosen_prompt_ids"] == e["rejected_prompt_ids"] for e in examples)
    )
    if shared:
        rows_tokens = [e["chosen_prompt_ids"] + e["chosen_ids"] + e["rejected_ids"] for e in examples]
    else:
        rows_tokens = [e["chosen_prompt_ids"] + e["chosen_ids"] for e in examples]
        if with_rejected:
            rows_tokens += [e["rejected_prompt_ids"] + e["rejected_ids"] for e in examples]
    R, T = len(rows_tokens), max(len(t) for t in rows_tokens)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    rows, positions, targets, seq = [], [], [], []

    def completion(row: int, first_pos: int, predict_from: int, ids: list[int], seq_id: int):
        # Token ids[0] is predicted by the hidden state at `predict_from`, each later one by its left neighbour.
        for k, tok in enumerate(ids):
            rows.append(row)
            positions.append(predict_from if k == 0 else first_pos + k - 1)
            targets.append(tok)
            seq.append(seq_id)

    if shared:
        allowed = torch.zeros((R, T, T), dtype=torch.bool)
        causal = torch.ones((T, T), dtype=torch.bool).tril()
        for row, e in enumerate(examples):
            P, C, Rj = len(e["chosen_prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            n = P + C + Rj
            input_ids[row, :n] = torch.tensor(rows_tokens[row])
            position_ids[row, :n] = torch.cat([torch.arange(P + C), torch.arange(P, P + Rj)])
            allowed[row, :n, :n] = causal[:n, :n]
            allowed[row, P + C : n, P : P + C] = False  # rejected tokens never see the chosen ones
            completion(row, P, P - 1, e["chosen_ids"], row)
            completion(row, P + C, P - 1, e["rejected_ids"], B + row)
        # Padding query rows attend to themselves only, so that no softmax row is empty.
        idx = torch.arange(T)
        allowed[:, idx, idx] = True
        mask_value = _mask_value(mask_dtype, attn_implementation)
        if mask_value is None:
            attention_mask = allowed.unsqueeze(1)
        else:
            attention_mask = torch.zeros((R, 1, T, T), dtype=mask_dtype).masked_fill(
                ~allowed.unsqueeze(1), mask_value
            )
    else:
        attention_mask = torch.zeros((R, T), dtype=torch.long)
        sides = [("chosen", row) for row in range(B)] + (
            [("rejected", row) for row in range(B)] if with_rejected else []
        )
        for row, (side, i) in enumerate(sides):
            e = examples[i]
            P, ids = len(e[f"{side}_prompt_ids"]), e[f"{side}_ids"]
            n = P + len(ids)
            input_ids[row, :n] = torch.tensor(rows_tokens[row])
            attention_mask[row, :n] = 1
            position_ids[row, :n] = torch.arange(n)
            completion(row, P, P - 1, ids, row)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(
        input_ids,
        attention_mask,
        position_ids,
        as_long(rows),
        as_long(positions),
        as_long(targets),
        as_long(seq),
        2 * B if with_rejected else B,
    )


# --------------------------------------------------------------------------------------------------- helpers


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
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ValueError(f"unknown lr_scheduler '{name}'")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (the process was killed mid-write) is ignored."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# ---------------------------------------------------------------------------------------------------- recipe


class CPORecipe:
    def __init__(
        self,
        settings: TrainSettings,
        model_path: str,
        pairs: list[dict],
        out_dir: Path,
        adapter: str | None = None,
    ):
        if settings.lora is not None and adapter is not None:
            raise ValueError(
                f"give either a starting adapter to continue ({adapter}) or a new LoRA config "
                f"({settings.lora}), not both"
            )
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
        self.ref_logps: torch.Tensor | None = None  # (n_examples, 2) for dpo

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> CPORecipe:
        self._setup_distributed()
        torch.manual_seed(self.s.seed)
        self._setup_model()
        self._setup_data()  # needs the tokenizer
        self._setup_reference()  # dpo: the frozen starting policy scores every pair once, before any update
        self._setup_optimizer()  # needs trainable parameters and the step count from the data
        self._maybe_resume()  # last: overwrites weights, optimizer, scheduler and RNG
        return self

    def _setup_distributed(self):
        from accelerate import Accelerator

        # Mixed precision is ours to apply (bf16 autocast around the decoder, float32 log-softmax): accelerate's
        # would also come from an environment variable or a config file the user forgot about.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process

    def _setup_model(self):
        self.tokenizer = load_tokenizer(self.model_path, self.s.trust_remote_code)
        model = load_model(
            self.model_path,
            adapter=self.adapter,
            dtype=self.s.dtype,
            trainable_adapter=True,
            trust_remote_code=self.s.trust_remote_code,
            device=self.device,
        )
        if self.s.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=self.s.lora["r"],
                lora_alpha=self.s.lora["alpha"],
                lora_dropout=self.s.lora["dropout"],
                target_modules=list(self.s.lora["target_modules"]),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        if self.s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.is_peft = hasattr(model, "peft_config")
        self.attn_implementation = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        # Packed rows need a 4D mask; flash-attention kernels take none, so they get the plain layout.
        self.shared_prompt = self.s.shared_prompt and self.attn_implementation in ("sdpa", "eager")
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.logps_module = CompletionLogps(model, self.s.logits_chunk_size)

    def _setup_data(self):
        self.examples, self.skipped = tokenize_pairs(
            self.tokenizer, self.raw_pairs, self.s.max_prompt_length, self.s.max_length, self.s.tokenization
        )
        if not self.examples:
            raise ValueError(f"every pair was skipped by the length limits: {self.skipped}")
        self.pairs_per_step = self.s.batch_size * self.s.gradient_accumulation_steps * self.world
        steps_per_epoch = math.ceil(len(self.examples) / self.pairs_per_step)
        self.total_steps = self.s.max_steps or max(1, math.ceil(self.s.num_epochs * steps_per_epoch))

    def _setup_reference(self):
        if self.s.loss_type != "dpo":
            return
        cache = self.out_dir / f"reference_logps-{self.s.fingerprint()}.safetensors"
        if cache.is_file():
            self.ref_logps = load_file(cache)["logps"]
            return
        self.model.eval()
        out = torch.zeros(len(self.examples), 2)
        with torch.no_grad():
            for start in range(0, len(self.examples), self.s.batch_size):
                chunk = self.examples[start : start + self.s.batch_size]
                logps, _ = self._logps(chunk)
                out[start : start + len(chunk), 0] = logps[: len(chunk)].cpu()
                out[start : start + len(chunk), 1] = logps[len(chunk) :].cpu()
        self.model.train()
        self.ref_logps = out
        if self.is_main:
            tmp = cache.with_suffix(".tmp")
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"logps": out}, tmp)
            tmp.replace(cache)

    def _setup_optimizer(self):
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]  # norms and biases: no weight decay (as in HF)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.s.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.s.learning_rate,
        )
        warmup = math.ceil(self.s.warmup_ratio * self.total_steps)
        self.scheduler = _scheduler(self.s.lr_scheduler, self.optimizer, warmup, self.total_steps)
        # The wrapper is what DDP/FSDP/DeepSpeed see: gradient sync hooks on its forward.
        self.logps_module, self.optimizer = self.accelerator.prepare(self.logps_module, self.optimizer)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        found = [p for p in self.ckpt_dir.glob("step-*") if (p / "trainer_state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self):
        """Trainable weights (safetensors), optimizer, scheduler, RNG, step and settings, written atomically.
        The data position needs no saving: the order is a pure function of (seed, epoch, step)."""
        self.accelerator.wait_for_everyone()
        if self.is_main:

            def write(tmp: Path):
                save_file(self._trainable_state(), tmp / "trainable.safetensors")
                torch.save(
                    {
                        "step": self.step,
                        "fingerprint": self.s.fingerprint(),
                        "settings": json.dumps(self.s.identity(), sort_keys=True),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                    },
                    tmp / "trainer_state.pt",
                )

            save_dir_atomic(self.ckpt_dir / f"step-{self.step}", write)
            for old in self._checkpoints()[:-2]:  # keep two: the newest may be the one a crash interrupted
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _maybe_resume(self):
        for ckpt in reversed(self._checkpoints()):
            state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
            if state["fingerprint"] != self.s.fingerprint():
                theirs, ours = json.loads(state.get("settings", "{}")), self.s.identity()
                diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
                print(
                    f"[train] not resuming {ckpt}: settings differ (checkpoint, now): {diff}; the new ones win"
                )
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
            print(f"[train] resumed from {ckpt} at step {self.step}")
            break
        # Log lines past the resume point belong to work that is redone now (or to a run that never checkpointed).
        if self.is_main:
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            if self.metrics_path.is_file():
                write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # ---------------------------------------------------------------------------------------------- training
    def _step_indices(self, step: int) -> list[int]:
        """The example indices of optimizer step `step` (all processes, all micro-batches): a seeded
        permutation per epoch, so that the order is reproducible and a resume continues it exactly."""
        n = len(self.examples)
        start = step * self.pairs_per_step
        out = []
        while len(out) < self.pairs_per_step:
            epoch, offset = divmod(start + len(out), n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.s.seed + epoch))
            out += order[offset : offset + self.pairs_per_step - len(out)].tolist()
        return out

    def _autocast(self):
        if self.s.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _logps(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate(
            examples,
            self.tokenizer.pad_token_id,
            self.with_rejected,
            self.shared_prompt,
            mask_dtype=next(self.model.parameters()).dtype,
            attn_implementation=self.attn_implementation,
        ).to(self.device)
        with self._autocast():
            return self.logps_module(batch)

    def _loss(self, indices: list[int], pair_normalizer: float | None = None, token_normalizer=None):
        examples = [self.examples[i] for i in indices]
        logps, n_tokens = self._logps(examples)
        n = len(examples)
        ref = self.ref_logps[indices].to(self.device) if self.ref_logps is not None else None
        rejected, rejected_tokens = (
            (logps[n:], n_tokens[n:]) if self.with_rejected else (logps[:n].detach(), n_tokens[:n])
        )
        out = preference_loss(
            logps[:n],
            rejected,
            n_tokens[:n],
            rejected_tokens,
            beta=self.s.beta,
            cpo_alpha=self.s.cpo_alpha,
            loss_type=self.s.loss_type,
            label_smoothing=self.s.label_smoothing,
            simpo_gamma=self.s.simpo_gamma,
            ref_chosen_logps=ref[:, 0] if ref is not None else None,
            ref_rejected_logps=ref[:, 1] if ref is not None else None,
            pair_normalizer=pair_normalizer,
            token_normalizer=token_normalizer,
        )
        return out, logps[:n].detach(), rejected.detach()

    def _forward(self, examples_or_indices):
        """The loss of one batch on its own (a mean over its pairs and tokens); used by tests and evaluation."""
        if examples_or_indices and isinstance(examples_or_indices[0], dict):
            index = {id(e): i for i, e in enumerate(self.examples)}
            examples_or_indices = [index[id(e)] for e in examples_or_indices]
        return self._loss(list(examples_or_indices))[0]

    def train(self) -> CPORecipe:
        self.model.train()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train ({self.s.loss_type})",
            unit="step",
            disable=None if self.is_main else True,
        )  # a bar on a terminal, nothing in captured logs
        log_file = open(self.metrics_path, "a", encoding="utf-8") if self.is_main else None
        bs, accum = self.s.batch_size, self.s.gradient_accumulation_steps
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                step_idx = self._step_indices(self.step)
                # Normalise by the whole step (all micro-batches, all processes): the objective is the mean over
                # the step's pairs and chosen tokens whatever the accumulation or process count.
                n_tokens_step = sum(len(self.examples[i]["chosen_ids"]) for i in step_idx)
                local = step_idx[self.rank * bs * accum : (self.rank + 1) * bs * accum]
                totals = dict.fromkeys(
                    ("loss", "preference", "nll", "chosen", "rejected", "acc", "logp_c", "logp_r"), 0.0
                )
                tokens = 0
                for k in range(accum):
                    idx = local[k * bs : (k + 1) * bs]
                    sync = k == accum - 1
                    with nullcontext() if sync else self.accelerator.no_sync(self.logps_module):
                        out, logp_c, logp_r = self._loss(
                            idx, pair_normalizer=len(step_idx), token_normalizer=n_tokens_step
                        )
                        # DDP averages gradients over processes; the step's loss is their sum.
                        self.accelerator.backward(out.loss * self.world)
                    totals["loss"] += out.loss.item()
                    totals["preference"] += out.preference.item()
                    totals["nll"] += out.nll.item()
                    totals["chosen"] += out.chosen_rewards.sum().item()
                    totals["rejected"] += out.rejected_rewards.sum().item()
                    totals["acc"] += (out.chosen_rewards > out.rejected_rewards).float().sum().item()
                    totals["logp_c"] += logp_c.sum().item()
                    totals["logp_r"] += logp_r.sum().item()
                    tokens += sum(
                        len(self.examples[i][f"{s}_prompt_ids"]) + len(self.examples[i][f"{s}_ids"])
                        for i in idx
                        for s in (("chosen", "rejected") if self.with_rejected else ("chosen",))
                    )
                totals = self._reduce(totals)
                tokens = int(self._reduce({"t": float(tokens)})["t"])
                grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.s.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                seconds = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{totals['loss']:.4f}")
                if self.is_main:
                    progress.report(self.step, self.total_steps, "optimizer steps")
                if log_file and (self.step % self.s.logging_steps == 0 or self.step == self.total_steps):
                    n = len(step_idx)
                    record = {
                        "step": self.step,
                        "epoch": round(self.step * self.pairs_per_step / len(self.examples), 4),
                        "loss": totals["loss"],
                        "preference_loss": totals["preference"],
                        "nll_loss": totals["nll"],
                        "rewards/chosen": totals["chosen"] / n,
                        "rewards/rejected": totals["rejected"] / n,
                        "rewards/margins": (totals["chosen"] - totals["rejected"]) / n,
                        "rewards/accuracies": totals["acc"] / n,
                        "logps/chosen": totals["logp_c"] / n,
                        "logps/rejected": totals["logp_r"] / n,
                        "grad_norm": float(grad_norm),
                        "learning_rate": lr,
                        "tokens_per_second": tokens / seconds,
                        "pairs_per_second": n / seconds,
                    }
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if self.step % self.s.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if log_file:
                log_file.close()
            bar.close()
        return self

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sum per-process metric totals (a no-op in one process)."""
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(values, t.tolist(), strict=True))

    # ------------------------------------------------------------------------------------------------ output
    def save(self, out_dir: Path) -> Path:
        """A PEFT adapter folder (LoRA; loadable by PeftModel.from_pretrained and vLLM's LoRARequest) or a full
        model folder, both safetensors, with the tokenizer; plus a merged model when `save_merged`."""
        out_dir = Path(out_dir)
        self.accelerator.wait_for_everyone()
        if self.is_main:

            def write(tmp: Path):
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)

            save_dir_atomic(out_dir, write)
            if self.s.save_merged and self.is_peft:

                def write_merged(tmp: Path):
                    merged = self.model.merge_and_unload()
                    merged.save_pretrained(tmp, safe_serialization=True)
                    self.tokenizer.save_pretrained(tmp)

                save_dir_atomic(out_dir.parent / "merged", write_merged)
            write_json_atomic(self.out_dir / "train_summary.json", self.summary())
        self.accelerator.wait_for_everyone()
        return out_dir

    def summary(self) -> dict:
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "resumed_from": self.resumed_from,
            "pairs": len(self.raw_pairs),
            "pairs_used": len(self.examples),
            "skipped": self.skipped,
            "pairs_per_step": self.pairs_per_step,
            "processes": self.world,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "device": str(self.device),
            "settings": asdict(self.s),
        }


def plot_curves(metrics_path: Path, out_path: Path, title: str) -> Path | None:
    """Training curves (loss, NLL, reward margin, reward accuracy) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    keys = [
        ("loss", "total loss"),
        ("nll_loss", "NLL on chosen"),
        ("rewards/margins", "reward margin"),
        ("rewards/accuracies", "reward accuracy"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure_atomic(fig, out_path)
