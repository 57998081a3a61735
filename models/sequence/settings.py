"""The settings of sequence-level CPO, each declared once: the negative mix, the training hyperparameters a run
config sets, and the full settings the recipe (models/sequence/trainer.py) runs with.

The run configuration (alma_r/config/sequence.py) derives its `negatives` and `train` sections from
`NegativeMix` and `SequenceCPOHyperparameters`, so a field, its default, its description and its checks live
here only. Defaults are the paper's ("Sequence-level Large Language Model Training with Contrastive Preference
Optimization", anonymous ACL submission, section 5, "Training details") where it gives one.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alma_r.models.result_fields import NOT_A_RESULT, result_dump
from alma_r.models.train.settings import LoraSettings, TrainSettings

# The kinds of synthetic negatives (section 4.2), in the column order draw_negatives returns them.
KINDS = ("bn", "mn", "tn", "an")

# The learning-rate schedules models/train/schedules.py builds by name, as the CPO recipe's settings name them.
LrScheduler = TrainSettings.model_fields["lr_scheduler"].annotation


class _Settings(BaseModel):
    # A misspelt setting must fail, not fall back to its default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NegativeMix(_Settings):
    """How many negatives of each kind (section 4.2) every example gets; the paper's MixN is 3 BN + 5 MN + 3 TN
    = 11 (section 5, "Training details")."""

    batch: int = Field(3, ge=0, description="BN: other rows' responses; needs a batch size >= 2.")
    meanfield: int = Field(5, ge=0, description="MN: a share of positions resampled from the MLE model.")
    truncation: int = Field(3, ge=0, description="TN: a strict prefix of the response, then EOS.")
    autoregressive: int = Field(0, ge=0, description="AN per example, drawn from the generated samples.")
    mn_source: Literal["policy", "reference"] = Field(
        "policy",
        description="MN: whose next-token distribution the resampled positions come from: policy = the model "
        "being trained, at the step the negatives are drawn (the paper's pi_theta); reference = the starting "
        "(MLE) model, the same negatives whatever the policy has learnt.",
    )
    meanfield_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="c: share of positions an MN changes (the paper gives no value); round-half-up(c * n), "
        "at least 1, positions change.",
    )

    @model_validator(mode="after")
    def _some(self) -> NegativeMix:
        counts = {k: getattr(self, k) for k in ("batch", "meanfield", "truncation", "autoregressive")}
        if sum(counts.values()) == 0:
            raise ValueError(f"negative counts must be >= 0 and not all 0, got {counts}")
        return self

    @property
    def total(self) -> int:
        return self.batch + self.meanfield + self.truncation + self.autoregressive

    def kinds(self) -> list[str]:
        """The kind of each negative column, in the order draw_negatives returns them."""
        counts = (self.batch, self.meanfield, self.truncation, self.autoregressive)
        return [kind for kind, n in zip(KINDS, counts, strict=True) for _ in range(n)]


class SequenceCPOHyperparameters(_Settings):
    """Sequence-level CPO from the MLE model, every weight trained: what a run config sets."""

    loss: Literal["best_of_k", "plackett_luce"] = Field(
        "best_of_k",
        description="best_of_k: eq. 7 (the ground truth against every negative); plackett_luce: eq. 8 with "
        "negatives ranked by embedding cosine similarity to the ground truth (section 4.3, the 'R' rows).",
    )
    beta: float = Field(5.0, gt=0, description="beta of eq. 7 / 8 (paper: 5).")
    embedding_model: str | None = Field(
        None,
        description="plackett_luce: local embedding model folder ranking the negatives; None = the starting "
        "(MLE) model's own mean-pooled states.",
    )
    learning_rate: float = Field(1e-5, gt=0, description="Paper: 1e-5, AdamW.")
    weight_decay: float = Field(0.05, ge=0, description="Paper: 0.05.")
    lr_scheduler: LrScheduler = Field("constant", description="Paper: a fixed learning rate.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(64, ge=1, description="Examples per optimizer step (paper: 64).")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Examples per forward pass (gradient accumulation); None = batch."
    )
    max_steps: int = Field(1000, ge=1, description="Optimizer steps (paper: 1000 after MLE).")
    max_grad_norm: float = Field(1.0, gt=0)
    max_prompt_length: int = Field(256, ge=8)
    max_length: int = Field(512, ge=16)
    logging_steps: int = Field(10, ge=1, json_schema_extra=NOT_A_RESULT)
    finetune: Literal["lora", "full"] = Field(
        "full",
        description="full: train every weight (the paper); lora: train a new LoRA adapter (train.lora), the "
        "reference being the same model with the adapter switched off.",
    )
    # The CPO engine's fields (type, default, bounds, description): the same recipe code reads them.
    lora: LoraSettings = TrainSettings.model_fields["lora"]
    disable_dropout: bool = TrainSettings.model_fields["disable_dropout"]
    gradient_checkpointing: bool = TrainSettings.model_fields["gradient_checkpointing"]
    mixed_precision: Literal["no", "bf16"] = TrainSettings.model_fields["mixed_precision"]
    save_steps: int = TrainSettings.model_fields["save_steps"]

    @model_validator(mode="after")
    def _consistent(self) -> SequenceCPOHyperparameters:
        if self.disable_dropout and self.finetune == "lora" and self.lora.dropout > 0:
            raise ValueError(
                f"lora.dropout {self.lora.dropout} with disable_dropout on: every dropout is set to 0 before "
                "training; turn disable_dropout off to train with it, or set lora.dropout to 0"
            )
        if self.embedding_model is not None and self.loss != "plackett_luce":
            raise ValueError(
                f"embedding_model ({self.embedding_model}) ranks negatives for loss plackett_luce only; "
                f"loss is {self.loss}"
            )
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must be at most batch_size ({self.batch_size})"
            )
        return self

    @property
    def ranking(self) -> bool:
        """Plackett-Luce (eq. 8) over ranked negatives instead of best-of-K (eq. 7)."""
        return self.loss == "plackett_luce"


class SequenceCPOSettings(SequenceCPOHyperparameters):
    """What the recipe trains with: the hyperparameters and the negative mix. As for the CPO recipe's
    TrainSettings, the seed (the run's), the weights' dtype and trust_remote_code (the model's) are given to
    the recipe beside these settings."""

    negatives: NegativeMix = Field(default_factory=NegativeMix)
    # The CPO recipe's fields (default, bound, description) that change no result: the same code reads them.
    logits_chunk_size: int = TrainSettings.model_fields["logits_chunk_size"]
    pad_to_multiple_of: int = TrainSettings.model_fields["pad_to_multiple_of"]
    activation_recompute: Literal["auto", "off", "elementwise"] = TrainSettings.model_fields[
        "activation_recompute"
    ]

    # What the CPO engine's recipe (models/train/recipe.py), which SequenceCPORecipe extends, reads beside the
    # fields: the sequence recipe micro-batches within a step itself, and packs no chosen/rejected prompt.
    loss_type: ClassVar[str] = "sequence_cpo"
    gradient_accumulation_steps: ClassVar[int] = 1
    shared_prompt: ClassVar[bool] = False

    @property
    def save_merged(self) -> bool:
        """LoRA: the merged model is written too (WiSE-FT interpolates and evaluation loads whole models)."""
        return self.finetune == "lora"

    def new_lora(self, continues_adapter: bool = False) -> LoraSettings | None:
        return self.lora if self.finetune == "lora" else None

    def identity(self, **context) -> dict:
        """The settings that change the maths of training, plus `context` (seed, dtype, trust_remote_code), as
        TrainSettings.identity: the checkpoint fingerprint's settings."""
        return result_dump(self) | context

    @model_validator(mode="after")
    def _batch_negatives(self) -> SequenceCPOSettings:
        if self.negatives.batch and self.batch_size < 2:
            raise ValueError(
                f"batch negatives ({self.negatives.batch}) need batch_size >= 2, got {self.batch_size}"
            )
        return self
