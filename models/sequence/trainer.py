"""The sequence-level CPO recipe: the ground truth against K-1 synthetic negatives ("Sequence-level Large Language
Model Training with Contrastive Preference Optimization", anonymous ACL submission, section 4, eq. 7 and 8;
negatives of section 4.2, ranking of section 4.3). Its settings are models/sequence/settings.py's
SequenceCPOSettings.

`SequenceCPORecipe(...).setup()` loads the policy, tokenises the examples, then draws every optimizer step's
negatives and scores them with the frozen starting model, then builds the optimizer; `train()` runs the steps;
`save()` writes the full model folder atomically.

Reference log-probs are computed once: before the first update the policy IS the starting model, so setup()
lays out every step's batch (a seeded permutation per epoch), draws its negatives (seed + step) and computes
log pi_ref of all K sequences of every example in one no-grad pass, keeping them in memory. Training then runs
the policy only, and no sequence is ever scored twice by the reference. The price: negatives are fixed per
step before training starts, so meanfield negatives are resampled from the starting model's next-token
distribution (the paper writes pi_theta; at step 0 the two are the same), and memory holds every step's
negatives (steps x batch x K token lists: small next to the model for the runs this recipe is meant for).
The ranking (Plackett-Luce) is computed in the same pass, by the embedding model. No checkpoints or resume:
runs are short; full fine-tuning only (no LoRA).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alma_r.data.io import save_dir_atomic, write_json_atomic
from alma_r.models import progress
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.sequence.losses import best_of_k_loss, plackett_luce_loss
from alma_r.models.sequence.negatives import draw_negatives
from alma_r.models.sequence.settings import KINDS, SequenceCPOSettings
from alma_r.models.train.batching import collate, tokenize_pair
from alma_r.models.train.logprobs import CompletionLogps
from alma_r.models.train.schedules import build_scheduler


@dataclass
class StepBatch:
    """One optimizer step, prepared before training: K sequences per example, column 0 = ground truth."""

    indices: list[int]  # (B,) example indices
    completions: list[list[list[int]]]  # (B, K) token lists, EOS included
    ref_logps: torch.Tensor  # (B, K) float32, the starting model
    ranking: torch.Tensor | None  # (B, K) column indices best first, or None for best-of-K


class SequenceCPORecipe:
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
    ):
        """examples: {"id", "prompt", "target"}; autoregressive_samples: id -> sampled texts (AN). `seed` (the
        run's), `dtype` and `trust_remote_code` (the model's) are not training settings, as for CPORecipe."""
        if not examples:
            raise ValueError("no examples to train on")
        if settings.negatives.autoregressive and autoregressive_samples is None:
            raise ValueError(
                "autoregressive negatives need the samples (models/sequence/negatives.read_autoregressive_samples)"
            )
        self.s = settings
        self.seed, self.dtype, self.trust_remote_code = seed, dtype, trust_remote_code
        self.model_path = model_path
        self.raw_examples = examples
        self.samples = autoregressive_samples
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.kinds = settings.negatives.kinds()  # kind of negative columns 1..K-1
        self.step = 0
        self.reference_forward_passes = 0

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> SequenceCPORecipe:
        torch.manual_seed(self.seed)
        self._setup_model()
        self._setup_data()  # needs the tokenizer
        self._setup_steps()  # needs the data; must run before any update: the policy is the reference here
        self._setup_optimizer()
        return self

    def _setup_model(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.model_path, self.trust_remote_code)
        self.model = load_model(
            self.model_path,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            device=self.device,
        )
        self.logps_module = CompletionLogps(self.model, self.s.logits_chunk_size)
        self.forbidden_ids = set(self.tokenizer.all_special_ids)  # never placed inside a meanfield negative

    def _setup_data(self):
        self.examples, self.skipped = [], 0
        for ex in self.raw_examples:
            ids = tokenize_pair(self.tokenizer, ex["prompt"], ex["target"], ex["target"], "alma")
            prompt, target = ids["chosen_prompt_ids"], ids["chosen_ids"]
            if len(prompt) > self.s.max_prompt_length or len(prompt) + len(target) > self.s.max_length:
                self.skipped += 1
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

    def _step_indices(self, step: int) -> list[int]:
        """Example indices of a step: consecutive slices of a seeded permutation per epoch (seed + epoch)."""
        n, bs = len(self.examples), self.s.batch_size
        out = []
        for position in range(step * bs, (step + 1) * bs):
            epoch, offset = divmod(position, n)
            if offset == 0 or not out:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(order[offset]))
        return out

    @torch.no_grad()
    def _setup_steps(self):
        """Every step's negatives, reference log-probs and ranking, with the starting model, once."""
        t0 = time.perf_counter()
        self.model.eval()
        ranker = None
        if self.s.ranking:
            from alma_r.models.sequence.embedding_rank import EmbeddingRanker

            ranker = EmbeddingRanker(
                self.s.embedding_model or self.model_path, self.trust_remote_code, device=self.device
            )
        self.batches = []
        progress.report(0, self.s.max_steps, "sequence-cpo negatives + reference", unit="step")
        for step in range(self.s.max_steps):
            idx = self._step_indices(step)
            rows = [self.examples[i] for i in idx]
            negatives = draw_negatives(
                self.s.negatives,
                [r["prompt_ids"] for r in rows],
                [r["ids"] for r in rows],
                seed=self.seed * 1_000_003 + step,
                eos_id=self.tokenizer.eos_token_id,
                pad_id=self.tokenizer.pad_token_id,
                model=self.model,
                forbidden_ids=self.forbidden_ids,
                samples=[r["samples"] for r in rows] if self.s.negatives.autoregressive else None,
            )
            completions = [[r["ids"], *negs] for r, negs in zip(rows, negatives, strict=True)]  # (B, K)
            ref = self._logps(idx, completions)
            self.reference_forward_passes += 1
            ranking = None
            if ranker is not None:
                decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
                ranking = ranker.rank(
                    [decode(c[0]) for c in completions], [[decode(n) for n in c[1:]] for c in completions]
                )
            self.batches.append(StepBatch(idx, completions, ref.detach().cpu(), ranking))
            progress.report(step + 1, self.s.max_steps, "sequence-cpo negatives + reference", unit="step")
        self.reference_seconds = time.perf_counter() - t0
        self.model.train()

    def _setup_optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay (as in HF)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.s.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.s.learning_rate,
        )
        warmup = math.ceil(self.s.warmup_ratio * self.s.max_steps)
        self.scheduler = build_scheduler(self.s.lr_scheduler, self.optimizer, warmup, self.s.max_steps)
        self.params = params

    # ---------------------------------------------------------------------------------------------- training
    def _logps(self, indices: list[int], completions: list[list[list[int]]]) -> torch.Tensor:
        """(B, K) summed completion log-probs of the current model, one decoder pass for the B x K rows."""
        K = len(completions[0])
        flat = [
            {"chosen_prompt_ids": self.examples[i]["prompt_ids"], "chosen_ids": seq}
            for i, row in zip(indices, completions, strict=True)
            for seq in row
        ]
        batch = collate(flat, self.tokenizer.pad_token_id, with_rejected=False).to(self.device)
        logps, _ = self.logps_module(batch)  # (B*K,)
        return logps.view(len(indices), K)

    def _loss(self, batch: StepBatch, rows: slice):
        policy = self._logps(batch.indices[rows], batch.completions[rows])  # (b, K)
        ref = batch.ref_logps[rows].to(self.device)
        if batch.ranking is not None:
            return plackett_luce_loss(policy, ref, batch.ranking[rows].to(self.device), self.s.beta), policy
        return best_of_k_loss(policy, ref, self.s.beta), policy

    def train(self) -> SequenceCPORecipe:
        self.model.train()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        micro = self.s.micro_batch_size or self.s.batch_size
        with open(self.metrics_path, "a", encoding="utf-8") as log_file:
            progress.report(self.step, self.s.max_steps, "sequence-cpo step", unit="step")
            while self.step < self.s.max_steps:
                t0 = time.perf_counter()
                batch = self.batches[self.step]
                B = len(batch.indices)
                rewards, losses, gt_logps = [], [], []
                for start in range(0, B, micro):
                    out, policy = self._loss(batch, slice(start, start + micro))
                    # the step's loss is the mean over its B examples whatever the micro-batching
                    (out.losses.sum() / B).backward()
                    rewards.append(out.rewards)
                    losses.append(out.losses.detach())
                    gt_logps.append(policy[:, 0].detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                loss = torch.cat(losses).mean().item()
                progress.report(self.step, self.s.max_steps, "sequence-cpo step", unit="step", loss=loss)
                if self.step % self.s.logging_steps == 0 or self.step == self.s.max_steps or self.step == 1:
                    record = self._record(torch.cat(rewards), torch.cat(losses), torch.cat(gt_logps))
                    record.update(
                        grad_norm=float(grad_norm), learning_rate=lr, seconds=time.perf_counter() - t0
                    )
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
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
    def save(self, out_dir: Path) -> Path:
        def write(tmp: Path):
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        save_dir_atomic(Path(out_dir), write)
        write_json_atomic(self.out_dir / "train_summary.json", self.summary())
        return Path(out_dir)

    def summary(self) -> dict:
        return {
            "steps": self.step,
            "examples": len(self.examples),
            "skipped_too_long": self.skipped,
            "sequences_per_example": 1 + len(self.kinds),
            "negative_kinds": self.kinds,
            "reference_forward_passes": self.reference_forward_passes,
            "reference_seconds": self.reference_seconds,
            "settings": self.s.model_dump(mode="json")
            | {"seed": self.seed, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code},
        }
