"""The sequence-level CPO recipe: the ground truth against K-1 synthetic negatives ("Sequence-level Large Language
Model Training with Contrastive Preference Optimization", anonymous ACL submission, section 4, eq. 7 and 8;
negatives of section 4.2, ranking of section 4.3). Its settings are models/sequence/settings.py's
SequenceCPOSettings.

`SequenceCPORecipe` is the CPO engine's recipe (models/train/recipe.py's CPORecipe) with another step: the same
setup order, checkpoints with the result fingerprint (model, examples + AN samples, settings, seed, process
count), resume after a crash, LoRA or full fine-tuning, accelerate, metrics and progress; what differs is the
data (one example = a prompt and its ground truth) and `_train_step`.

Each optimizer step, before its update (`_prepare_step`):
  1. its examples: a seeded permutation per epoch (CPORecipe._step_indices), so a resume continues it exactly;
  2. their negatives (draw_negatives, seeded by seed and step): MN from the policy as it is at this step
     (`negatives.mn_source: policy`, the paper's pi_theta) or from the reference (`reference`);
  3. log pi_ref of all K sequences of this process's examples, by the reference model, in one no-grad pass:
     the starting model, i.e. the policy with its new LoRA adapter switched off (LoRA: no second copy) or a
     frozen copy loaded from the same folder (full fine-tuning: the weights' memory twice);
  4. for Plackett-Luce, the ranking of the negatives (the embedding model, loaded once).
Every sequence is scored by the reference once, at the step that trains on it: per step, one reference pass
over batch x K sequences, plus one pass over the batch's ground truths for MN (by whichever model mn_source
names). Negatives are a pure function of (seed, step, the weights at that step), so a resumed run draws the
negatives the uninterrupted run drew. With several processes every process draws the whole step's negatives
(BN takes other rows of the step), then scores and trains on its own share of the examples.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from alma_r.models import progress
from alma_r.models.loading import load_model
from alma_r.models.sequence.losses import best_of_k_loss, plackett_luce_loss
from alma_r.models.sequence.negatives import draw_negatives
from alma_r.models.sequence.settings import KINDS, SequenceCPOSettings
from alma_r.models.train import checkpoints
from alma_r.models.train.batching import collate, tokenize_pair
from alma_r.models.train.logprobs import CompletionLogps
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.weights import weights_fingerprint

# Said when a checkpoint of another run is found, by callers that give no hint of their own.
START_OVER_HINT = "use a new output folder, or restart to set these checkpoints aside"


@dataclass
class StepBatch:
    """One optimizer step's sequences on this process, prepared before its update: column 0 = ground truth."""

    indices: list[int]  # (b,) example indices of this process
    completions: list[list[list[int]]]  # (b, K) token lists, EOS included
    ref_logps: torch.Tensor  # (b, K) float32, the reference model
    ranking: torch.Tensor | None  # (b, K) column indices best first, or None for best-of-K


def examples_digest(examples: list[dict], samples: dict[str, list[str]] | None) -> str:
    """The text the recipe trains on: id, prompt and ground truth of every example in order, and the AN
    samples (their order decides which are drawn)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.get("id"), ex["prompt"], ex["target"]], ensure_ascii=False).encode())
    digest.update(json.dumps(samples, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


class SequenceCPORecipe(CPORecipe):
    def __init__(
        self,
        settings: SequenceCPOSettings,
        model_path: str,
        examples: list[dict],
        out_dir: Path,
        autoregressive_samples: dict[str, list[str]] | None = None,
        *,
        seed: int,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        start_over_hint: str = START_OVER_HINT,
        code_version: str | None = None,
        restart: bool = False,
    ):
        """examples: {"id", "prompt", "target"}; autoregressive_samples: id -> sampled texts (AN). The keyword
        arguments are CPORecipe's."""
        if not examples:
            raise ValueError("no examples to train on")
        if settings.negatives.autoregressive and autoregressive_samples is None:
            raise ValueError(
                "autoregressive negatives need the samples (models/sequence/negatives.read_autoregressive_samples)"
            )
        super().__init__(
            settings, model_path, examples, out_dir, seed=seed, dtype=dtype,
            trust_remote_code=trust_remote_code, start_over_hint=start_over_hint, code_version=code_version,
            restart=restart,
        )  # fmt: skip
        self.samples = autoregressive_samples
        self.kinds = settings.negatives.kinds()  # kind of negative columns 1..K-1
        self.reference_forward_passes = 0
        self.reference_seconds = 0.0

    # ------------------------------------------------------------------------------------------------- setup
    def _setup_model(self):
        super()._setup_model()
        self.forbidden_ids = set(self.tokenizer.all_special_ids)  # never placed inside a meanfield negative
        # No-grad passes (negatives, the LoRA reference) go around the wrapper accelerate puts on logps_module.
        self.plain_logps = CompletionLogps(self.model, self.s.logits_chunk_size)

    def _result_parts(self) -> dict:
        if not hasattr(self, "_parts"):
            self._parts = checkpoints.result_parts(
                weights_fingerprint(self.model_path),
                None,
                examples_digest(self.raw_pairs, self.samples),
                self._identity(),
                self.world,
            )
        return self._parts

    def _setup_data(self):
        self.examples, self.skipped = [], {"too_long": 0}
        for ex in self.raw_pairs:
            ids = tokenize_pair(self.tokenizer, ex["prompt"], ex["target"], ex["target"], "alma")
            prompt, target = ids["chosen_prompt_ids"], ids["chosen_ids"]
            if len(prompt) > self.s.max_prompt_length or len(prompt) + len(target) > self.s.max_length:
                self.skipped["too_long"] += 1
                continue
            item = {"id": ex.get("id"), "prompt_ids": prompt, "ids": target}
            if self.s.negatives.autoregressive:
                texts = self.samples.get(ex.get("id"), [])
                if not texts:
                    raise ValueError(f"example {ex.get('id')!r}: no autoregressive samples")
                item["samples"] = [
                    tokenize_pair(self.tokenizer, ex["prompt"], t, t, "alma")["chosen_ids"] for t in texts
                ]
            self.examples.append(item)
        if len(self.examples) < self.s.batch_size:
            raise ValueError(f"{len(self.examples)} usable examples for a batch of {self.s.batch_size}")
        if self.s.batch_size % self.world:
            raise ValueError(f"batch_size {self.s.batch_size} does not split over {self.world} processes")
        self.pairs_per_step = self.s.batch_size  # CPORecipe._step_indices lays steps out by it
        self.total_steps = self.s.max_steps

    def _setup_reference(self):
        """The reference model (the starting one) and, for Plackett-Luce, the ranker. Runs before a resume's
        weights are loaded, so a frozen copy is the starting model's."""
        self.reference_model = None
        if not self.is_peft:
            self.reference_model = load_model(
                self.model_path,
                dtype=self.dtype,
                trust_remote_code=self.trust_remote_code,
                device=self.device,
            )
            self.reference_model.requires_grad_(False).eval()
        self.reference_logps = (
            CompletionLogps(self.reference_model, self.s.logits_chunk_size) if self.reference_model else None
        )
        self.ranker = None
        if self.s.ranking:
            from alma_r.models.sequence.embedding_rank import EmbeddingRanker

            self.ranker = EmbeddingRanker(
                self.s.embedding_model or self.model_path, self.trust_remote_code, device=self.device
            )

    @contextmanager
    def _reference(self):
        """(model, log-prob module) of the reference: the policy with its adapter off (LoRA) or the copy."""
        if self.reference_model is None:
            with self.model.disable_adapter():
                yield self.model, self.plain_logps
        else:
            yield self.reference_model, self.reference_logps

    # ---------------------------------------------------------------------------------------------- one step
    def _draw(self, step: int, rows: list[dict], model) -> list[list[list[int]]]:
        return draw_negatives(
            self.s.negatives,
            [r["prompt_ids"] for r in rows],
            [r["ids"] for r in rows],
            seed=self.seed * 1_000_003 + step,
            eos_id=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id,
            model=model,
            forbidden_ids=self.forbidden_ids,
            samples=[r["samples"] for r in rows] if self.s.negatives.autoregressive else None,
        )

    @torch.no_grad()
    def _prepare_step(self, step: int, step_idx: list[int]) -> StepBatch:
        """This process's share of step `step`: negatives of the whole step, then reference log-probs and
        ranking of its own examples (module docstring)."""
        t0 = time.perf_counter()
        rows = [self.examples[i] for i in step_idx]
        was_training = self.model.training
        self.model.eval()  # dropout (when it is on) must not change a draw or a reference value
        try:
            with self._autocast():
                if self.s.negatives.mn_source == "policy" or not self.s.negatives.meanfield:
                    negatives = self._draw(step, rows, self.model)
                with self._reference() as (reference, reference_logps):
                    if self.s.negatives.mn_source == "reference" and self.s.negatives.meanfield:
                        negatives = self._draw(step, rows, reference)
                    share = len(step_idx) // self.world
                    local = slice(self.rank * share, (self.rank + 1) * share)
                    indices = step_idx[local]
                    completions = [[r["ids"], *n] for r, n in zip(rows[local], negatives[local], strict=True)]
                    ref = self._completion_logps(reference_logps, indices, completions)
        finally:
            self.model.train(was_training)
        self.reference_forward_passes += 1
        ranking = None
        if self.ranker is not None:
            decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            ranking = self.ranker.rank(
                [decode(c[0]) for c in completions], [[decode(n) for n in c[1:]] for c in completions]
            )
        self.reference_seconds += time.perf_counter() - t0
        return StepBatch(indices, completions, ref.detach().float().cpu(), ranking)

    def _completion_logps(
        self, module, indices: list[int], completions: list[list[list[int]]]
    ) -> torch.Tensor:
        """(b, K) summed completion log-probs under `module`, one decoder pass for the b x K rows."""
        K = len(completions[0])
        flat = [
            {"chosen_prompt_ids": self.examples[i]["prompt_ids"], "chosen_ids": seq}
            for i, row in zip(indices, completions, strict=True)
            for seq in row
        ]
        batch = collate(
            flat,
            self.tokenizer.pad_token_id,
            with_rejected=False,
            pad_to_multiple_of=self.s.pad_to_multiple_of,
        ).to(self.device)
        with self._autocast():
            logps, _ = module(batch)  # (b*K,)
        return logps.view(len(indices), K)

    def _sequence_loss(self, batch: StepBatch, rows: slice):
        policy = self._completion_logps(self.logps_module, batch.indices[rows], batch.completions[rows])
        ref = batch.ref_logps[rows].to(self.device)
        if batch.ranking is not None:
            return plackett_luce_loss(policy, ref, batch.ranking[rows].to(self.device), self.s.beta), policy
        return best_of_k_loss(policy, ref, self.s.beta), policy

    def _train_step(self, step_idx: list[int]) -> dict[str, torch.Tensor]:
        """Forward and backward passes of one step's micro-batches on this process; returns the step's
        rewards (B, K), losses (B,) and ground-truth log-probs (B,), gathered from every process."""
        batch = self._prepare_step(self.step, step_idx)
        n = len(batch.indices)
        micro = self.s.micro_batch_size or n
        starts = list(range(0, n, micro))
        rewards, losses, gt_logps = [], [], []
        for k, start in enumerate(starts):
            last = k == len(starts) - 1
            # gradients sync across processes once per step, on the last micro-batch
            sync = nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.logps_module)
            with sync:
                out, policy = self._sequence_loss(batch, slice(start, start + micro))
                # the step's loss is the mean over its B examples, whatever the micro-batches and processes
                # (DDP averages the processes' gradients: hence the factor world)
                self.accelerator.backward(out.losses.sum() * self.world / len(step_idx))
            rewards.append(out.rewards.detach())
            losses.append(out.losses.detach())
            gt_logps.append(policy[:, 0].detach())
        local = {"rewards": torch.cat(rewards), "losses": torch.cat(losses), "gt": torch.cat(gt_logps)}
        return local if self.world == 1 else {k: self.accelerator.gather(v) for k, v in local.items()}

    def train(self) -> SequenceCPORecipe:
        self.model.train()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            progress.report(self.step, self.total_steps, "sequence-cpo step", unit="step")
        log_file = open(self.metrics_path, "a", encoding="utf-8") if self.is_main else None
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                values = self._train_step(self._step_indices(self.step))
                grad_norm, lr = self._optimizer_step()
                loss = values["losses"].mean().item()
                if self.is_main:
                    progress.report(self.step, self.total_steps, "sequence-cpo step", unit="step", loss=loss)
                logged = self.step % self.s.logging_steps == 0 or self.step in (1, self.total_steps)
                if log_file and logged:
                    record = self._record(values["rewards"], values["losses"], values["gt"])
                    record.update(
                        grad_norm=float(grad_norm), learning_rate=lr, seconds=time.perf_counter() - t0
                    )
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if self.step % self.s.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if log_file:
                log_file.close()
        return self

    def _record(self, rewards: torch.Tensor, losses: torch.Tensor, gt_logps: torch.Tensor) -> dict:
        """Metrics of a step, computed before its update: rewards (B, K) = beta * log-ratio."""
        record = {
            "step": self.step,
            "loss": losses.mean().item(),
            "rewards/ground_truth": rewards[:, 0].mean().item(),
            "rewards/negatives": rewards[:, 1:].mean().item(),
            "rewards/accuracies": (rewards[:, 0] > rewards[:, 1:].amax(-1)).float().mean().item(),
            "logps/ground_truth": gt_logps.mean().item(),
        }
        for kind in KINDS:
            cols = [1 + j for j, k in enumerate(self.kinds) if k == kind]
            if cols:
                record[f"rewards/{kind}"] = rewards[:, cols].mean().item()
                # share of examples whose ground truth beats every negative of this kind
                record[f"accuracies/{kind}"] = (
                    (rewards[:, 0] > rewards[:, cols].amax(-1)).float().mean().item()
                )
        return record

    # ------------------------------------------------------------------------------------------------ output
    def summary(self) -> dict:
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "resumed_from": self.resumed_from,
            "resumed_checkpoint_written_by": self.resumed_written_by,
            "examples": len(self.examples),
            "skipped_too_long": self.skipped["too_long"],
            "sequences_per_example": 1 + len(self.kinds),
            "negative_kinds": self.kinds,
            "mn_source": self.s.negatives.mn_source,
            "finetune": self.s.finetune,
            "processes": self.world,
            "trainable_parameters": self.n_trainable,
            "reference_forward_passes": self.reference_forward_passes,
            "reference_seconds": self.reference_seconds,
            "settings": self.s.model_dump(mode="json") | self._run_context(),
        }
