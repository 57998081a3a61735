"""The run configuration of the `sequence-cpo` flow (flows/sequence_cpo.py): sequence-level CPO with synthetic
negatives in the instruction-following setting of "Sequence-level Large Language Model Training with Contrastive
Preference Optimization" (anonymous ACL submission, section 5; Dolly-style data from a local file).

One typed section per stage, unknown keys rejected with the nearest valid key, `--set a.b=value` overrides,
`sample:` paths: the loader and error style of alma_r/config/, whose `run` and `model` sections are reused as
they are. Defaults are the paper's (section 5, "Training details") where it gives one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from alma_r.config.base import Section, sections_hash
from alma_r.config.generate import EndpointSection
from alma_r.config.loading import load_config
from alma_r.config.run import ModelSection, RunSection, TinyModelConfig
from alma_r.data.dolly import DollyConfig
from alma_r.models.result_fields import NOT_A_RESULT
from alma_r.models.sequence.settings import LrScheduler, NegativeMix, SequenceCPOHyperparameters


class DataSection(Section):
    """The Dolly-style file (data/dolly.py: JSON lines, a JSON list or Parquet) and its split."""

    path: str = Field(
        "sample:dolly/dolly_tiny.jsonl",
        description="Dolly-layout file (instruction, context, response, category); 'sample:' = bundled sample, "
        "other relative paths are relative to the config file.",
    )
    test_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of instructions in the test split (paper: 7506 of 15011)."
    )
    split_seed: int = Field(0, description="Seed of the split hash.")
    origin: str | None = Field(None, description="Name in ids; default the file's stem.")
    max_items: int | None = Field(None, ge=1, description="Read only the first N records.")

    def dolly(self) -> DollyConfig:
        return DollyConfig(
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
            origin=self.origin,
            max_items=self.max_items,
        )


class MleSection(Section):
    """The MLE model: next-token prediction on prompt + response (CPORecipe, loss sft), every weight trained.
    It is both the reference model pi_ref of CPO and the alpha = 1 end of the WiSE-FT grid."""

    max_steps: int = Field(2000, ge=1, description="Paper: 2000 steps.")
    batch_size: int = Field(64, ge=1, description="Paper: 64.")
    learning_rate: float = Field(1e-5, gt=0, description="Paper: 1e-5, AdamW.")
    weight_decay: float = Field(0.05, ge=0, description="Paper: 0.05.")
    lr_scheduler: LrScheduler = Field("constant", description="Paper: a fixed learning rate.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_prompt_length: int = Field(256, ge=8, description="Longer prompts are skipped and counted.")
    max_length: int = Field(512, ge=16, description="Prompt + response tokens; longer examples are skipped.")
    save_steps: int = Field(
        200,
        ge=1,
        description="Checkpoint every N steps (the stage resumes from it).",
        json_schema_extra=NOT_A_RESULT,
    )
    logging_steps: int = Field(10, ge=1, json_schema_extra=NOT_A_RESULT)

    @model_validator(mode="after")
    def _lengths(self) -> MleSection:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        return self


class NegativesSection(NegativeMix, Section):
    """Negatives per example (models/sequence/settings.py's NegativeMix: its counts, share and checks); AN > 0
    adds the generate stage: `samples` top-k samples of the MLE model per training instruction, drawn once,
    offline (section 4.2)."""

    samples: int = Field(4, ge=1, description="AN: samples generated per training instruction.")
    top_k: int = Field(50, ge=0, description="AN: top-k of the sampling (paper: 50; 0 = no cut).")
    temperature: float = Field(1.0, gt=0, description="AN: sampling temperature.")
    max_new_tokens: int = Field(128, ge=1, description="AN: longest sample.")
    max_prompt_tokens: int = Field(256, ge=8, description="AN: longer prompts get no samples (counted).")
    batch_size: int = Field(
        16, ge=1, description="AN: prompts per generate call.", json_schema_extra=NOT_A_RESULT
    )

    def mix(self) -> NegativeMix:
        """The counts and share alone, as the trainer takes them."""
        return NegativeMix(**self.model_dump(include=set(NegativeMix.model_fields)))


class SequenceTrainSection(SequenceCPOHyperparameters, Section):
    """Sequence-level CPO from the MLE model (models/sequence/settings.py's SequenceCPOHyperparameters: its
    fields, defaults and checks), every weight trained."""


class WiseFtSection(Section):
    alphas: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
        description="theta = alpha * theta_MLE + (1 - alpha) * theta_CPO, one model per alpha (paper table 4: "
        "0, 0.1, 0.3, 0.5, 0.7, 0.9; 1.0 is the MLE model itself, 0.0 the CPO model).",
    )

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one alpha")
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"alphas must be in [0, 1], got {bad}")
        if len({f"{a:.2f}" for a in v}) != len(v):
            raise ValueError(f"alphas must differ in their first two decimals (folder alpha-<a:.2f>): {v}")
        return v


class ScorerSection(MleSection):
    """P-hat of eq. 9 / eq. 10: a larger model, trained longer. 'train': a tiny LLaMA larger than the policy,
    with the policy's tokenizer (so both read the same token ids), trained with MLE (the mle section's fields)
    on the training split; else a local model folder (its tokenizer may differ: then it scores the decoded
    texts)."""

    model: str = Field("train", description="'train', or a local model folder.")
    tiny: TinyModelConfig = Field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=192, num_hidden_layers=3, num_attention_heads=3, intermediate_size=384
        ),
        description="'train': the architecture (hidden 192 = 3 heads x 64, 3 layers by default).",
    )
    max_steps: int = Field(4000, ge=1, description="'train': MLE steps (default twice the MLE model's).")


class JudgeSection(Section):
    """The pairwise LLM judge (models/evaluate/judge.py): greedy outputs against the ground truth, both answer orders."""

    endpoint: EndpointSection
    template: Literal["dolly", "wiki"] = Field("dolly", description="Paper section 5's Dolly template.")
    max_tokens: int = Field(8, ge=1)
    temperature: float = Field(0.0, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)


class SequenceEvaluateSection(Section):
    """Every WiSE-FT model and the MLE model on the test split: greedy outputs (eq. 10, judge) and samples from
    the model's own distribution (eq. 9 and eq. 10)."""

    max_items: int | None = Field(
        1000, ge=1, description="Evaluate the first N test instructions (paper: 1000 samples)."
    )
    samples_per_prompt: int = Field(2, ge=1, description="Samples per instruction for eq. 9 / eq. 10.")
    max_new_tokens: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(256, ge=8, description="Longer prompts are not evaluated (counted).")
    batch_size: int = Field(16, ge=1)


class SequenceRunConfig(Section):
    run: RunSection = RunSection(name="dolly")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    mle: MleSection = MleSection()
    negatives: NegativesSection = NegativesSection()
    train: SequenceTrainSection = SequenceTrainSection()
    wise_ft: WiseFtSection = WiseFtSection()
    scorer: ScorerSection = ScorerSection()
    evaluate: SequenceEvaluateSection = SequenceEvaluateSection()
    judge: JudgeSection | None = Field(None, description="Unset: no win rate ('n/a' in the report).")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _cross_stage(self) -> SequenceRunConfig:
        if self.model.adapter:
            raise ValueError(
                f"model.adapter ({self.model.adapter}): the sequence-cpo flow fine-tunes every weight of a "
                "base model (WiSE-FT interpolates whole models); give a merged model as model.base"
            )
        if self.negatives.batch and self.train.batch_size < 2:
            raise ValueError(
                f"negatives.batch ({self.negatives.batch}) needs train.batch_size >= 2, "
                f"got {self.train.batch_size}"
            )
        return self

    def section_hash(self, *sections: str) -> str:
        """A fingerprint of some sections (an unset optional section counts as null)."""
        return sections_hash(self, *sections)


def load_sequence_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> SequenceRunConfig:
    """Load a sequence-cpo YAML config (or the defaults), apply `KEY=VALUE` overrides, validate."""
    return load_config(path, overrides, config_class=SequenceRunConfig)
