"""The settings of the CPO recipe, declared once: each field's type, default, bounds and help text.

The build-alma-r config's `train` section derives from `TrainSettings` (YAML and `--set train.x=...` validate
through these fields) and `alma-r train` generates its flags from them, so a field added here reaches the YAML,
`--set`, the command line and the recipe at once. Fields may carry two command-line hints in
`json_schema_extra`: `trl`, the name of TRL's flag for the same setting (kept as an alias), and `cli_switches`,
flags that set the field to one value (`--bf16`, `--no-lora`).

Defaults are those of "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
Translation" (Xu et al., ICML 2024): the objective of eq. 3-6 with beta 0.1 and an NLL weight of 1, LoRA rank 16,
learning rate 1e-4, warm-up ratio 0.01, one epoch, 512 tokens.

What is not a training setting stays out: the seed (the run's), the weights' dtype and trust_remote_code (the
model's) are given to the recipe beside these settings, and enter its checkpoint fingerprint with them.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alma_r.models.result_fields import NOT_A_RESULT, result_dump

# Declared here rather than beside the losses so that the config can load without importing torch.
LossType = Literal["sigmoid", "hinge", "ipo", "simpo", "dpo", "arpo", "sft"]
LOSS_TYPES = get_args(LossType)

# Written beside the adapter, so part of the train stage's result, but no part of the training itself: a
# checkpoint written under the other value still resumes. Fields marked NOT_A_RESULT are left out of both.
NOT_IN_CHECKPOINT = frozenset({"save_merged"})
ARPO_FIELDS = frozenset({"arpo_scale", "arpo_rate"})  # in the checkpoint's identity only with loss_type arpo


class LoraSettings(BaseModel):
    """A new LoRA adapter (PEFT): rank, scale, dropout and the modules it adapts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = Field(16, ge=1, description="LoRA rank (paper: 16).")
    alpha: int = Field(
        32, ge=1, description="LoRA scale numerator: the update is scaled by alpha / r (paper: 32)."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Off by default (exact resume, DDP equivalence); paper: 0.05."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Modules that get an adapter (ALMA-R's released adapters: down_proj).",
    )


class TrainSettings(BaseModel):
    """CPO (Xu et al., ICML 2024, eq. 3-6): L = -log sigmoid(beta*(logp_w - logp_l)) + cpo_alpha * NLL(y_w)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    loss_type: LossType = Field(
        "sigmoid",
        description="sigmoid = CPO (paper); hinge/ipo/simpo as TRL's CPOTrainer; dpo with reference "
        "log-probs of the starting policy computed once and cached; arpo = CPO with the rejection scaled by how "
        "far apart the pair is (X-ALMA); sft = NLL on chosen only (paper ablation).",
    )
    beta: float = Field(0.1, gt=0, description="Scale of the log-probability margin (paper: 0.1).")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the NLL term on chosen (paper: 1).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid/dpo/simpo only (conservative DPO)."
    )
    simpo_gamma: float = Field(0.5, description="SimPO target margin (TRL's absolute simpo_gamma).")
    simpo_gamma_beta_ratio: float | None = Field(
        None, description="SimPO paper's gamma/beta ratio; when set, simpo_gamma = ratio * beta."
    )
    arpo_scale: float = Field(
        0.9,
        gt=0,
        description="arpo only: tau = min(arpo_scale * exp(arpo_rate * |avg logp_w - avg logp_l|) - 1, 1). "
        "Default: the X-ALMA repository's relax_cofficient_1 (0.9; the paper's value is not confirmed here); "
        "arpo_scale 2 with arpo_rate 0 gives tau = 1, which is CPO.",
    )
    arpo_rate: float = Field(
        0.4,
        ge=0,
        description="arpo only: the rate of tau's growth with the pair's length-averaged log-prob gap "
        "(X-ALMA repository's relax_cofficient_2: 0.4).",
    )
    tokenization: Literal["alma", "trl"] = Field(
        "alma",
        description="alma: prompt and completion tokenised separately, no BOS, EOS appended (ALMA-R); "
        "trl: joint tokenisation with BOS (TRL's CPOTrainer).",
    )
    shared_prompt: bool = Field(
        True, description="Encode each prompt once for chosen and rejected (packed rows, a 4D mask)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, more compute."
    )
    activation_recompute: Literal["auto", "off", "elementwise"] = Field(
        "auto",
        description="elementwise: keep each decoder layer's matmul and attention outputs and recompute its "
        "elementwise ops (norms, rotary, SiLU) in backward: same values, less memory; auto: elementwise with "
        "finetune full from hidden size 512 up, else off (LoRA: no saving; tiny models: only overhead); "
        "gradient_checkpointing overrides it.",
        json_schema_extra=NOT_A_RESULT,
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="bf16 autocast; log-softmax stays float32.",
        json_schema_extra={"cli_switches": {"bf16": "bf16"}},
    )
    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="lora: train a new LoRA adapter (unless an adapter is continued, which is then trained); "
        "full: train every weight.",
        json_schema_extra={"cli_switches": {"lora": "lora", "no-lora": "full"}},
    )
    save_merged: bool = Field(False, description="Also write the base model with the adapter merged in.")
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="The new adapter, when finetune is lora."
    )
    disable_dropout: bool = Field(
        True,
        description="Set every dropout of the policy to 0 before training, a continued adapter's LoRA dropout "
        "included (ALMA-R's trainer and TRL's CPOConfig: on).",
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW's peak learning rate (paper: 1e-4).")
    lr_scheduler: Literal["inverse_sqrt", "linear", "cosine", "constant"] = Field(
        "inverse_sqrt",
        description="Learning-rate schedule after the warm-up (ALMA-R's trainer: inverse_sqrt).",
        json_schema_extra={"trl": "lr_scheduler_type"},
    )
    warmup_ratio: float = Field(
        0.01, ge=0, lt=1, description="Share of the optimizer steps spent warming up (paper: 0.01)."
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay of matrices (norms and biases get none)."
    )
    num_epochs: float = Field(
        1.0,
        gt=0,
        description="Passes over the pairs (paper: 1); max_steps wins when set.",
        json_schema_extra={"trl": "num_train_epochs"},
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(
        4,
        ge=1,
        description="Pairs per micro-batch and process; an optimizer step takes batch_size x "
        "gradient_accumulation_steps x processes pairs.",
        json_schema_extra={"trl": "per_device_train_batch_size"},
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; the loss is normalised by the whole step."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the gradient's global norm to this.")
    max_prompt_length: int = Field(
        256, ge=8, description="Pairs with longer prompts are skipped and counted."
    )
    max_length: int = Field(
        512, ge=16, description="Prompt + completion tokens (paper: 512); longer pairs are skipped."
    )
    save_steps: int = Field(
        50,
        ge=1,
        description="Checkpoint every N optimizer steps (resume point).",
        json_schema_extra=NOT_A_RESULT,
    )
    logging_steps: int = Field(
        5,
        ge=1,
        description="Write a metrics.jsonl line every N optimizer steps.",
        json_schema_extra=NOT_A_RESULT,
    )
    pad_to_multiple_of: int = Field(
        8,
        ge=1,
        description="Pad each micro-batch's rows to a multiple of this many tokens (masked, so only rounding "
        "changes): fewer distinct matmul shapes, which kernel caches (oneDNN's on CPUs, ~1 MB each) keep all run.",
        json_schema_extra=NOT_A_RESULT,
    )
    logits_chunk_size: int = Field(
        256,
        ge=1,
        description="Completion positions projected to the vocabulary at a time: bounds the memory of the "
        "log-softmax, never changes its value.",
        json_schema_extra=NOT_A_RESULT,
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        if self.loss_type == "simpo" and self.simpo_gamma_beta_ratio is not None:
            object.__setattr__(self, "simpo_gamma", self.simpo_gamma_beta_ratio * self.beta)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        if self.disable_dropout and self.finetune == "lora" and self.lora.dropout > 0:
            # The recipe would set it to 0: a value that is not used must not look like one that is.
            raise ValueError(
                f"lora.dropout {self.lora.dropout} with disable_dropout on: every dropout is set to 0 before "
                "training; turn disable_dropout off to train with it, or set lora.dropout to 0"
            )
        return self

    def new_lora(self, continues_adapter: bool) -> LoraSettings | None:
        """The LoRA adapter to create: none when an adapter is continued (ALMA-R continues
        ALMA-13B-Pretrain-LoRA, and trains that adapter) or when every weight is trained."""
        return self.lora if self.finetune == "lora" and not continues_adapter else None

    def identity(self, **context) -> dict:
        """The settings that change the maths of training, plus `context` (the run-level values that change it
        too: seed, dtype, trust_remote_code)."""
        dumped = {k: v for k, v in result_dump(self).items() if k not in NOT_IN_CHECKPOINT}
        if self.loss_type != "arpo":  # unused: a checkpoint written before ARPO existed still resumes
            dumped = {k: v for k, v in dumped.items() if k not in ARPO_FIELDS}
        return dumped | context
