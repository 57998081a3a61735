"""Dolly-style instruction data from a local file, for the instruction-following setting of paper 003 (Section
5: databricks-dolly-15k, 15011 pairs, 7505 for training and 7506 for testing).

Input: the databricks-dolly-15k layout, one example per record with the fields `instruction`, `context`
(optional, often empty), `response` and `category` (optional); other fields are ignored. Three containers:
JSON lines, one JSON list (a file whose first non-blank character is '['), or Parquet (by the suffix
`.parquet`). Every problem stops with one line `<file>:<n>: <problem>` naming the field, where n is the line
(JSON lines), the item (JSON list) or the row (Parquet), 1-based; nothing is skipped silently.

Normalisation: instruction, context and response lose leading and trailing whitespace; an empty context or
category becomes null. An instruction or response that is empty after that is an error.

Prompt: the paper does not print its prompt template; this uses Stanford Alpaca's (PROMPT_DICT in
github.com/tatsu-lab/stanford_alpaca, train.py), which Dolly's own fine-tuning code follows, with the example's
context in the Input slot. The response is the text after the prompt's final "### Response:".

Split: by a seeded hash of the instruction, so that a row's split depends only on its own instruction (it does
not move when rows are added or reordered) and repeated instructions never straddle train and test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from alma_r.data.io import write_table
from alma_r.data.readers import IngestError, read_records
from alma_r.data.schemas import INSTRUCTIONS

# Stanford Alpaca's PROMPT_DICT["prompt_input"] and ["prompt_no_input"], verbatim (input = Dolly's context).
PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:"
)
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class DollyConfig:
    test_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of instructions in the test split, in [0, 1]. Paper: 7506 of 15011, i.e. 0.5."
        },
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the split hash; another seed, another split."}
    )
    origin: str | None = field(
        default=None, metadata={"help": "Name in ids and `origin`; default: file stem."}
    )
    max_items: int | None = field(default=None, metadata={"help": "Read only the first N records."})

    def __post_init__(self):
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"DollyConfig.test_fraction={self.test_fraction}: expected a value in [0, 1]")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"DollyConfig.max_items={self.max_items}: expected at least 1 (or None)")


def build_prompt(instruction: str, context: str | None = None) -> str:
    if context:
        return PROMPT_WITH_CONTEXT.format(instruction=instruction, context=context)
    return PROMPT_NO_CONTEXT.format(instruction=instruction)


def split_of(instruction: str, seed: int = 0, test_fraction: float = 0.5) -> str:
    """'test' when the seeded SHA-256 of the (stripped) instruction, read as a number in [0, 1), falls below
    test_fraction; else 'train'."""
    digest = hashlib.sha256(f"{seed}\x00{instruction.strip()}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _text(path: Path, where: int, record: dict, name: str, required: bool) -> str | None:
    if name not in record or record[name] is None:
        if required:
            raise IngestError(f"{path}:{where}: field '{name}' is missing or null (has {sorted(record)})")
        return None
    value = record[name]
    if not isinstance(value, str):
        raise IngestError(f"{path}:{where}: field '{name}' is {type(value).__name__}, expected a string")
    value = value.strip()
    if not value and required:
        raise IngestError(f"{path}:{where}: field '{name}' is empty")
    return value or None


def read_dolly(path: Path, cfg: DollyConfig | None = None) -> list[dict]:
    """Rows in the INSTRUCTIONS layout, in file order."""
    cfg = cfg or DollyConfig()
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}:0: file not found")
    records = read_records(path)
    if cfg.max_items is not None:
        records = records[: cfg.max_items]
    if not records:
        raise IngestError(f"{path}:0: no records: expected Dolly examples")
    origin = cfg.origin or path.stem
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            raise IngestError(f"{path}:{where}: {type(record).__name__} where a JSON object was expected")
        instruction = _text(path, where, record, "instruction", required=True)
        context = _text(path, where, record, "context", required=False)
        rows.append(
            {
                "id": f"{origin}:{where}",
                "instruction": instruction,
                "context": context,
                "response": _text(path, where, record, "response", required=True),
                "category": _text(path, where, record, "category", required=False),
                "prompt": build_prompt(instruction, context),
                "origin": origin,
                "split": split_of(instruction, cfg.split_seed, cfg.test_fraction),
            }
        )
    return rows


def ingest_dolly(path: Path, out_path: Path, cfg: DollyConfig | None = None) -> Path:
    """Read a Dolly-style file and write it, validated, to `out_path` (INSTRUCTIONS schema, atomic)."""
    return write_table(read_dolly(path, cfg), Path(out_path), INSTRUCTIONS)
