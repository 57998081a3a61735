"""The Parquet tables that stages exchange. One schema per table; docs/data-contracts.md describes each column.

Stages share these schemas, never each other's code: a stage reads its inputs with `read_table(path, SCHEMA)`
and writes its outputs with `write_table(rows, path, SCHEMA)`, both of which enforce the contract.
"""

from __future__ import annotations

import pyarrow as pa

# A column that must hold a value on every row; the others may be null.
_REQUIRED = b"required"


def _field(name: str, dtype: pa.DataType, required: bool = True) -> pa.Field:
    return pa.field(name, dtype, nullable=not required, metadata={_REQUIRED: b"1" if required else b"0"})


def required_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if not f.nullable]


# One source sentence with its reference, in one translation direction.
SEGMENTS = pa.schema(
    [
        _field("id", pa.string()),  # unique within a run, e.g. "wmt22:de-en:17"
        _field("lp", pa.string()),  # language pair "de-en" = translate de -> en
        _field("src_lang", pa.string()),
        _field("tgt_lang", pa.string()),
        _field("src", pa.string()),
        _field("ref", pa.string(), required=False),  # null for source-only inputs
        _field("origin", pa.string()),  # file or test set the segment was read from
        _field("split", pa.string()),  # "train" (SFT + preference sources), "valid" or "test"
    ]
)

# One translation of one segment by one system. The reference is not a candidate row: selection adds it.
CANDIDATES = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("system", pa.string()),  # name from the config, e.g. "tiny-sft-greedy"
        _field("hypothesis", pa.string()),
        _field("model_id", pa.string()),  # base model path or id
        _field("adapter", pa.string(), required=False),  # LoRA adapter path, when one is applied
        _field("generation", pa.string()),  # JSON of the decoding settings
    ]
)

# The `system` value of the reference translation in SCORES and PAIRS rows (and in the score and select
# stages' (segment, system) tables): scored and ranked beside the candidates, never a CANDIDATES row, so a
# configured system may not take this name. Defined once, here, for every stage, CLI and experiment.
REFERENCE = "reference"

# One translation that an ingest source carried beside its segments (ALMA-R-Preference's GPT-4 and ALMA-13B-LoRA
# translations): the generate stage's `ingested` backend turns these into CANDIDATES rows.
INGESTED_TRANSLATIONS = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("system", pa.string()),  # the system name given in the source's `systems`
        _field("hypothesis", pa.string()),
        _field("origin", pa.string()),  # the source (dataset) it came from
    ]
)

# One score published with an ingest source, for a carried translation or the reference (system REFERENCE):
# the score stage's `published:<name>` metrics read these instead of running a model.
PUBLISHED_SCORES = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("system", pa.string()),
        _field("metric", pa.string()),  # "published:<name>", e.g. "published:kiwi_xcomet"
        _field("score", pa.float64()),
        _field("origin", pa.string()),
    ]
)

# One human preference label published with an ingest source (ALMA-R-Preference's Delta, where nonzero): the
# select stage takes it over the metric ranking, as ALMA-R does.
HUMAN_PREFERENCES = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("chosen_system", pa.string()),
        _field("rejected_system", pa.string()),
        _field("label", pa.float64()),  # the published value (its sign says which system is preferred)
        _field("origin", pa.string()),
    ]
)

# One score of one candidate (or of the reference, system REFERENCE) by one metric.
SCORES = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("system", pa.string()),
        _field("metric", pa.string()),  # e.g. "chrf", "xcomet_xxl", "kiwi_xxl"
        _field("model_id", pa.string()),  # COMET checkpoint, or the sacrebleu signature for string metrics
        _field("score", pa.float64()),
        _field("error_spans", pa.string(), required=False),  # XCOMET's error spans, JSON
        _field("flag", pa.string(), required=False),  # e.g. "empty_hypothesis": scored, but worth a look
    ]
)

# One preference pair, in TRL's prompt/chosen/rejected layout plus its provenance.
PAIRS = pa.schema(
    [
        _field("prompt", pa.string()),
        _field("chosen", pa.string()),
        _field("rejected", pa.string()),
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("chosen_system", pa.string()),
        _field("rejected_system", pa.string()),
        _field("chosen_score", pa.float64()),
        _field("rejected_score", pa.float64(), required=False),  # null when the rejected side is synthetic
        _field("margin", pa.float64(), required=False),
        # The pair's share of its source (1 / the source's pairs; 1 for ALMA-R's one pair): the trainer weighs
        # the pair's loss by it, TRL ignores the column. Absent in older files: 1.
        _field("weight", pa.float64(), required=False),
    ]
)

# One segment that yielded no pair, with the reason (selection is auditable).
DROPPED = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("lp", pa.string()),
        _field("reason", pa.string()),
        _field("detail", pa.string(), required=False),
    ]
)

# One corpus-level score of one system on one test set and direction.
EVAL_RESULTS = pa.schema(
    [
        _field("test_set", pa.string()),
        _field("lp", pa.string()),
        _field("system", pa.string()),
        _field("metric", pa.string()),
        _field("score", pa.float64()),
        _field("signature", pa.string()),  # sacrebleu signature, or COMET model id
        _field("n_segments", pa.int64()),
        _field("p_value", pa.float64(), required=False),  # paired bootstrap vs the baseline; null for it
    ]
)

# One system output on one test segment, kept so that every score can be recomputed.
HYPOTHESES = pa.schema(
    [
        _field("segment_id", pa.string()),
        _field("test_set", pa.string()),
        _field("lp", pa.string()),
        _field("system", pa.string()),
        _field("hypothesis", pa.string()),
    ]
)

# One instruction-following example (databricks-dolly-15k layout) with its prompt and split (data/dolly.py).
INSTRUCTIONS = pa.schema(
    [
        _field("id", pa.string()),  # "<origin>:<n>", n = 1-based line, list item or Parquet row
        _field("instruction", pa.string()),
        _field("context", pa.string(), required=False),  # null when the example has none
        _field("response", pa.string()),  # the ground truth
        _field("category", pa.string(), required=False),  # e.g. "open_qa"; null when absent
        _field("prompt", pa.string()),  # Alpaca template applied to instruction (+ context)
        _field("origin", pa.string()),
        _field("split", pa.string()),  # "train" or "test", by a seeded hash of the instruction
    ]
)

ALL = {
    "segments": SEGMENTS,
    "candidates": CANDIDATES,
    "ingested_translations": INGESTED_TRANSLATIONS,
    "published_scores": PUBLISHED_SCORES,
    "human_preferences": HUMAN_PREFERENCES,
    "scores": SCORES,
    "pairs": PAIRS,
    "dropped": DROPPED,
    "eval_results": EVAL_RESULTS,
    "hypotheses": HYPOTHESES,
    "instructions": INSTRUCTIONS,
}
