"""The CPO training recipe: one class, read top to bottom.

`CPORecipe(...).setup()` loads the model, refuses a checkpoint of another run (checkpoints.py: the result
fingerprint of model, pairs, settings and process count), loads the pairs and the optimizer, in that order (the
optimizer needs the trainable parameters, the scheduler needs the step count the data gives), then resumes from
the newest checkpoint; `train()` runs the optimizer steps, each one `_train_step()` (the forward and backward
passes of its micro-batches) then `_optimizer_step()`; `save_checkpoint()` writes a resume point; `save()` writes
the PEFT adapter folder (or the full model), atomically.

The objective is CPO's ("Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
Machine Translation", Xu et al., ICML 2024, eq. 3-6) or one of its TRL variants (losses.py); the settings are
TrainSettings (settings.py), and the seed, weights' dtype and trust_remote_code come beside them.

Runs as one process or under `accelerate launch` / torchrun (data parallel): each optimizer step takes
batch_size x gradient_accumulation_steps x world_size pairs, and the loss is normalised by that whole step's
pair and token counts, so accumulation and the number of processes never change the objective. Accumulation,
clipping and what is saved go through accelerate (`accumulate`, `clip_grad_norm_`, `get_state_dict`), so that
FSDP and DeepSpeed ZeRO sync, clip and gather their shards (docs/distributed.md says which modes have run).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alma_r.data.files import save_dir_atomic, write_json_atomic, write_text_atomic
from alma_r.models import progress
from alma_r.models.loading import add_lora, disable_dropout, load_model, load_tokenizer, model_identity
from alma_r.models.train import checkpoints
from alma_r.models.train.batching import collate, tokenize_pairs
from alma_r.models.train.distributed import is_sharded, make_accelerator
from alma_r.models.train.logprobs import CompletionLogps
from alma_r.models.train.losses import preference_loss
from alma_r.models.train.metrics import (
    add_micro_batch,
    empty_totals,
    progress_numbers,
    read_metrics,
    step_record,
)
from alma_r.models.train.recompute import enable_recompute, recompute_mode
from alma_r.models.train.schedules import build_scheduler
from alma_r.models.train.settings import TrainSettings
from alma_r.models.weights import weights_fingerprint


class CPORecipe:
    def __init__(
        self,
        settings: TrainSettings,
        model_path: str,
        pairs: list[dict],
        out_dir: Path,
        adapter: str | None = None,
        *,
        seed: int,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        start_over_hint: str = checkpoints.START_OVER_HINT,
        code_version: str | None = None,
        restart: bool = False,
    ):
        """`settings` say how to train; `seed` (the run's), `dtype` and `trust_remote_code` (the model's) are
        not training settings but change the result, so they enter the checkpoint fingerprint too. Continuing
        `adapter` trains that adapter; otherwise finetune lora creates a new one (settings.new_lora).
        A checkpoint of another run in `out_dir` is refused (CheckpointMismatch, ending with `start_over_hint`:
        how the caller's user starts over); `restart` sets `out_dir`'s checkpoints aside first and starts at
        step 0. `code_version` is recorded in each checkpoint as written_by (no part of the fingerprint)."""
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.s = settings
        self.seed, self.dtype, self.trust_remote_code = seed, dtype, trust_remote_code
        self.start_over_hint, self.code_version, self.restart = start_over_hint, code_version, restart
        self.lora = settings.new_lora(continues_adapter=adapter is not None)
        self.model_path = model_path
        self.adapter = adapter
        self.raw_pairs = pairs
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.with_rejected = settings.loss_type != "sft"
        self.step = 0
        self.resumed_from: int | None = None
        self.resumed_written_by: str | None = None
        self.resume_point: Path | None = None
        self.ref_logps: torch.Tensor | None = None  # (n_examples, 2) for dpo

    def _run_context(self) -> dict:
        return {"seed": self.seed, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code}

    def _identity(self) -> dict:
        return self.s.identity(**self._run_context())

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> CPORecipe:
        self._setup_distributed()
        torch.manual_seed(self.seed)
        self._setup_model()
        self._find_resume_point()  # refuses another run's checkpoint before the costly steps below
        self._setup_data()  # needs the tokenizer
        self._setup_reference()  # dpo: the frozen starting policy scores every pair once, before any update
        if self.resume_point is not None:  # before prepare: FSDP/ZeRO shard what they are handed
            checkpoints.load_weights(self.model, self.resume_point)
        self._setup_optimizer()  # needs trainable parameters and the step count from the data
        self._maybe_resume()  # last: overwrites optimizer, scheduler and RNG
        return self

    def _setup_distributed(self):
        self.accelerator = make_accelerator(self.s.gradient_accumulation_steps)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.sharded = is_sharded(self.accelerator)
        if self.restart:
            if self.is_main:
                moved = checkpoints.set_aside(self.out_dir)
                where = f"moved to {moved}" if moved else "none to set aside"
                print(f"[train] --restart: {self.out_dir}'s checkpoints {where}; training starts at step 0")
            self.accelerator.wait_for_everyone()

    def _setup_model(self):
        self.tokenizer = load_tokenizer(self.model_path, self.trust_remote_code)
        model = load_model(
            self.model_path,
            adapter=self.adapter,
            dtype=self.dtype,
            trainable_adapter=True,
            trust_remote_code=self.trust_remote_code,
            device=self.device,
        )
        if self.lora is not None:
            model = add_lora(model, self.lora.r, self.lora.alpha, self.lora.dropout, self.lora.target_modules)
        if self.s.disable_dropout:
            disable_dropout(model)
        hidden = getattr(model.config, "hidden_size", 0)
        self.recompute = recompute_mode(
            self.s.activation_recompute, self.s.finetune, self.s.gradient_checkpointing, hidden
        )
        enable_recompute(model, self.recompute)
        self.model = model
        self.is_peft = hasattr(model, "peft_config")
        self.attn_implementation = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        # Packed rows need a 4D mask; flash-attention kernels take none, so they get the plain layout.
        self.shared_prompt = self.s.shared_prompt and self.attn_implementation in ("sdpa", "eager")
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)  # before FSDP/ZeRO shard them
        self.logps_module = CompletionLogps(model, self.s.logits_chunk_size)

    def _result_parts(self) -> dict:
        """What decides this run's result (checkpoints.result_parts), computed once: it reads the weights."""
        if not hasattr(self, "_parts"):
            self._parts = checkpoints.result_parts(
                weights_fingerprint(self.model_path),
                weights_fingerprint(self.adapter),
                checkpoints.pairs_digest(self.raw_pairs),
                self._identity(),
                self.world,
            )
        return self._parts

    def _fingerprint(self) -> str:
        return checkpoints.fingerprint(self._result_parts())

    def _setup_data(self):
        self.examples, self.skipped = tokenize_pairs(
            self.tokenizer, self.raw_pairs, self.s.max_prompt_length, self.s.max_length, self.s.tokenization
        )
        if not self.examples:
            raise ValueError(f"every pair was skipped by the length limits: {self.skipped}")
        # A pair's share of its source (select.pairs); None when every pair weighs 1, the unweighted maths.
        weights = [float(ex["weight"]) for ex in self.examples]
        self.pair_weights = None if all(w == 1.0 for w in weights) else torch.tensor(weights)
        self.pairs_per_step = self.s.batch_size * self.s.gradient_accumulation_steps * self.world
        steps_per_epoch = math.ceil(len(self.examples) / self.pairs_per_step)
        self.total_steps = self.s.max_steps or max(1, math.ceil(self.s.num_epochs * steps_per_epoch))

    def _setup_reference(self):
        if self.s.loss_type != "dpo":
            return
        # Keyed by the result fingerprint (less the process count): other pairs or another model never reuse it.
        key = checkpoints.reference_fingerprint(self._result_parts())
        cache = self.out_dir / f"reference_logps-{key}.safetensors"
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
        ds = self.accelerator.state.deepspeed_plugin
        # The fused kernel updates each tensor in one pass, with no temporaries of its size (the loop version
        # makes several); DeepSpeed keeps the choice of its own.
        fused = ds is None and all(p.device.type in ("cpu", "cuda") for p in self.trainable)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.s.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.s.learning_rate,
            fused=fused or None,
        )
        warmup = math.ceil(self.s.warmup_ratio * self.total_steps)
        # Not prepared: accelerate's scheduler wrapper would step once per process per step.
        self.scheduler = build_scheduler(self.s.lr_scheduler, self.optimizer, warmup, self.total_steps)
        if ds is not None:  # no dataloader tells DeepSpeed the batch; its accumulation and clipping are ours
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = self.s.batch_size
            ds.deepspeed_config["gradient_accumulation_steps"] = self.s.gradient_accumulation_steps
            ds.deepspeed_config["gradient_clipping"] = self.s.max_grad_norm
        # The wrapper is what DDP/FSDP/DeepSpeed see: gradient sync hooks on its forward.
        self.logps_module, self.optimizer = self.accelerator.prepare(self.logps_module, self.optimizer)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, whole (gathered from FSDP/ZeRO-3 shards), on the main process; every process
        calls it. Keys are the model's parameter names."""
        full = self.accelerator.get_state_dict(self.logps_module)
        if not self.is_main:
            return {}
        return {n: full[f"model.{n}"].detach().cpu().contiguous() for n in self.trainable_names}

    def save_checkpoint(self):
        """Trainable weights (safetensors), optimizer, scheduler, every process's RNG, step, the result
        fingerprint and its parts, written atomically. The data position needs no saving: the order is a pure
        function of (seed, epoch, step)."""
        from accelerate.utils import gather_object

        weights = self._trainable_state()
        rng = gather_object([checkpoints.rng_state()])  # one per process: dropout draws differ by process
        state = {
            "step": self.step,
            "fingerprint": self._fingerprint(),
            "parts": self._result_parts(),
            "written_by": self.code_version,
            "model_paths": model_identity(self.model_path, self.adapter),  # where, for people: not hashed
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }
        shard = {"optimizer": self.optimizer.state_dict()} if self.sharded else None
        checkpoints.write_checkpoint(self.accelerator, self.ckpt_dir, self.step, weights, state, shard)

    def _find_resume_point(self):
        """The newest checkpoint, if its result fingerprint is this run's; CheckpointMismatch if it is not."""
        found = checkpoints.list_checkpoints(self.ckpt_dir)
        if not found:
            return
        state = checkpoints.read_state(found[-1])
        checkpoints.check_resumable(found[-1], state, self._result_parts(), self.start_over_hint)
        self.resume_point = found[-1]

    def _maybe_resume(self):
        if self.resume_point is not None:
            state = checkpoints.restore_state(self.resume_point, self.rank, self.optimizer, self.scheduler)
            self.step = self.resumed_from = int(state["step"])
            self.resumed_written_by = state.get("written_by")
            if self.is_main:
                print(f"[train] resumed from {self.resume_point} at step {self.step}")
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
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
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
            pad_to_multiple_of=self.s.pad_to_multiple_of,
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
            arpo_scale=self.s.arpo_scale,
            arpo_rate=self.s.arpo_rate,
            ref_chosen_logps=ref[:, 0] if ref is not None else None,
            ref_rejected_logps=ref[:, 1] if ref is not None else None,
            pair_normalizer=pair_normalizer,
            token_normalizer=token_normalizer,
            pair_weights=None if self.pair_weights is None else self.pair_weights[indices].to(logps),
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
        # One progress mechanism (models/progress.py): a bar on a terminal, periodic lines in logs, the UI's
        # artifact; only the main process reports, so data parallel runs print one line, not one per rank.
        what = f"{'sft' if self.s.loss_type == 'sft' else 'train'} step"
        started, pairs_done = time.perf_counter(), 0
        if self.is_main:
            progress.report(self.step, self.total_steps, what, unit="step")
        log_file = open(self.metrics_path, "a", encoding="utf-8") if self.is_main else None
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                step_idx = self._step_indices(self.step)
                totals, tokens = self._train_step(step_idx)
                grad_norm, lr = self._optimizer_step()
                seconds = time.perf_counter() - t0
                pairs_done += len(step_idx)
                if self.is_main:
                    numbers = progress_numbers(totals, len(step_idx), self.with_rejected)
                    numbers["pairs/s"] = pairs_done / (time.perf_counter() - started)
                    progress.report(self.step, self.total_steps, what, unit="step", **numbers)
                if log_file and (self.step % self.s.logging_steps == 0 or self.step == self.total_steps):
                    self._log_step(log_file, totals, len(step_idx), grad_norm, lr, tokens, seconds)
                if self.step % self.s.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if log_file:
                log_file.close()
        return self

    def _train_step(self, step_idx: list[int]) -> tuple[dict[str, float], int]:
        """The forward and backward passes of one optimizer step's micro-batches on this process. Returns the
        step's metric totals and its token count, summed over all processes."""
        bs, accum = self.s.batch_size, self.s.gradient_accumulation_steps
        # Normalise by the whole step (all micro-batches, all processes): the objective is the (weighted) mean
        # over the step's pairs and chosen tokens whatever the accumulation or process count.
        n_pairs_step, n_tokens_step = self._step_normalizers(step_idx)
        local = step_idx[self.rank * bs * accum : (self.rank + 1) * bs * accum]
        totals, tokens = empty_totals(), 0
        for k in range(accum):
            idx = local[k * bs : (k + 1) * bs]
            # accelerate counts the micro-batches: gradients sync (DDP, FSDP) or DeepSpeed steps on the last.
            with self.accelerator.accumulate(self.logps_module):
                out, logp_c, logp_r = self._loss(
                    idx, pair_normalizer=n_pairs_step, token_normalizer=n_tokens_step
                )
                # DDP averages gradients over processes, and accelerate (or DeepSpeed) divides each
                # micro-batch's loss by the accumulation steps: the step's loss is the sum of both.
                self.accelerator.backward(out.loss * (self.world * accum))
            add_micro_batch(totals, out, logp_c, logp_r)
            tokens += self._token_count(idx)
        totals = self._reduce(totals)
        tokens = int(self._reduce({"t": float(tokens)})["t"])
        return totals, tokens

    def _step_normalizers(self, step_idx: list[int]) -> tuple[float, float]:
        """The step's pair count and chosen-token count, each pair counted by its weight when pairs carry one."""
        lengths = [len(self.examples[i]["chosen_ids"]) for i in step_idx]
        if self.pair_weights is None:
            return len(step_idx), sum(lengths)
        w = self.pair_weights[step_idx].tolist()
        return sum(w), sum(wi * n for wi, n in zip(w, lengths, strict=True))

    def _token_count(self, indices: list[int]) -> int:
        """Prompt and completion tokens of the sequences these pairs put through the decoder (for tokens/s)."""
        sides = ("chosen", "rejected") if self.with_rejected else ("chosen",)
        return sum(
            len(self.examples[i][f"{s}_prompt_ids"]) + len(self.examples[i][f"{s}_ids"])
            for i in indices
            for s in sides
        )

    def _optimizer_step(self) -> tuple[torch.Tensor, float]:
        """Clip, step the optimizer and the schedule, count the step; returns the gradient norm before clipping
        and the learning rate the step used."""
        # All of the prepared module's parameters (frozen ones have no gradient): FSDP clips by the norm over
        # every shard only when handed exactly those.
        grad_norm = self.accelerator.clip_grad_norm_(self.logps_module.parameters(), self.s.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm, lr

    def _log_step(
        self, log_file, totals: dict, n_pairs: int, grad_norm, lr: float, tokens: int, seconds: float
    ):
        epoch = round(self.step * self.pairs_per_step / len(self.examples), 4)
        norm = float("nan") if grad_norm is None else float(grad_norm)  # DeepSpeed's, when it has none yet
        record = step_record(self.step, epoch, totals, n_pairs, norm, lr, tokens, seconds)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

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
        full = self.accelerator.get_state_dict(self.logps_module)  # every process: FSDP/ZeRO-3 gather
        if self.is_main:
            model = self.accelerator.unwrap_model(self.logps_module).model
            state = {name.removeprefix("model."): tensor for name, tensor in full.items()}

            def write(tmp: Path):
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
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
            "resumed_checkpoint_written_by": self.resumed_written_by,
            "pairs": len(self.raw_pairs),
            "pairs_used": len(self.examples),
            "skipped": self.skipped,
            "pairs_per_step": self.pairs_per_step,
            "processes": self.world,
            "trainable_parameters": self.n_trainable,
            "device": str(self.device),
            "settings": self.s.model_dump(mode="json") | self._run_context(),
        }
