"""The published ALMA-R preference data (`haoranxu/ALMA-R-Preference`) <-> alma-r's tables.

One published row holds a sentence pair (`translation`: {xx: ..., en: ...}), `language_pair` ("cs-en"), the
directions it serves (`required_directions`), the ALMA and GPT-4 translations into each language
(`alma_<lang>`, `gpt4_<lang>`), their scores and the reference's (`{alma,gpt4,ref}_<lang>_{kiwi,xcomet,
kiwi_xcomet}`), and a human label `Delta` (> 0: the GPT-4 translation is preferred over ALMA's; the authors
confirmed this reading of their code, the dataset card once said the opposite).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from alma_r.data.languages import split_lp
from alma_r.data.readers import IngestError
from alma_r.data.schemas import REFERENCE

SYSTEMS = ("alma", "gpt4")  # candidate systems of the published data, in tie-break order
METRICS = ("kiwi", "xcomet", "kiwi_xcomet")
DELTA_PREFERS = ("gpt4", "alma")  # Delta > 0 chooses gpt4 over alma


@dataclass
class PreferenceData:
    segments: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    labels: dict[str, float] = field(default_factory=dict)  # segment id -> Delta


def _directions(value, pair: str) -> list[str]:
    if value is None:
        a, b = split_lp(pair)
        return [f"{a}-{b}", f"{b}-{a}"]
    items = value if isinstance(value, list) else str(value).replace(";", ",").split(",")
    return [d.strip() for d in items if d.strip()]


def segment_id(origin: str, pair: str, row: int, lp: str) -> str:
    return f"{origin}/{pair}/{row}:{lp}"


def from_published(
    rows: list[dict], origin: str = "alma-r-preference", where: str = "<published>"
) -> PreferenceData:
    data = PreferenceData()
    for i, row in enumerate(rows):
        pair = row.get("language_pair")
        try:
            a, b = split_lp(pair)
            directions = _directions(row.get("required_directions"), pair)
            parsed = [split_lp(lp) for lp in directions]
        except (ValueError, TypeError) as err:
            raise IngestError(f"{where}:{i}: {err}") from None
        translation = row.get("translation") or {}
        for lp, (src, tgt) in zip(directions, parsed, strict=True):
            if {src, tgt} != {a, b}:
                raise IngestError(f"{where}:{i}: direction '{lp}' is not a direction of '{pair}'")
            for lang in (src, tgt):
                if not translation.get(lang):
                    raise IngestError(f"{where}:{i}: field 'translation.{lang}' is missing or empty")
            sid = segment_id(origin, pair, i, lp)
            of_segment = {"segment_id": sid, "lp": lp}  # the key columns of its candidate and score rows
            data.segments.append(
                {
                    "id": sid,
                    "lp": lp,
                    "src_lang": src,
                    "tgt_lang": tgt,
                    "src": translation[src],
                    "ref": translation[tgt],
                    "origin": origin,
                    "split": "train",
                }
            )
            for system in SYSTEMS:
                text = row.get(f"{system}_{tgt}")
                if text is not None:
                    data.candidates.append(
                        {
                            **of_segment,
                            "system": system,
                            "hypothesis": text,
                            "model_id": f"published:{system}",
                            "adapter": None,
                            "generation": "{}",
                        }
                    )
            for system in (*SYSTEMS, "ref"):
                for metric in METRICS:
                    value = row.get(f"{system}_{tgt}_{metric}")
                    if value is not None:
                        data.scores.append(
                            {
                                **of_segment,
                                "system": REFERENCE if system == "ref" else system,
                                "metric": metric,
                                "model_id": f"published:{metric}",
                                "score": float(value),
                                "error_spans": None,
                                "flag": None,
                            }
                        )
            data.labels[sid] = float(row.get("Delta") or 0.0)
    return data


def to_published(data: PreferenceData) -> list[dict]:
    """The inverse of `from_published`: rows in the published layout, in their original order."""
    grouped: dict[tuple[str, str, int], dict] = {}
    segs_by_row: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for seg in data.segments:
        prefix, lp = seg["id"].rsplit(":", 1)
        origin, pair, row = prefix.rsplit("/", 2)
        segs_by_row[(origin, pair, int(row))].append(seg)
    cands = {(c["segment_id"], c["system"]): c["hypothesis"] for c in data.candidates}
    scores = {(s["segment_id"], s["system"], s["metric"]): s["score"] for s in data.scores}
    for key in sorted(segs_by_row, key=lambda k: k[2]):
        origin, pair, _ = key
        out = {
            "translation": {},
            "language_pair": pair,
            "required_directions": ",".join(s["lp"] for s in segs_by_row[key]),
        }
        for seg in segs_by_row[key]:
            sid, tgt = seg["id"], seg["tgt_lang"]
            out["translation"][seg["src_lang"]] = seg["src"]
            out["translation"][seg["tgt_lang"]] = seg["ref"]
            for system in SYSTEMS:
                if (sid, system) in cands:
                    out[f"{system}_{tgt}"] = cands[(sid, system)]
            for system in (*SYSTEMS, "ref"):
                for metric in METRICS:
                    value = scores.get((sid, REFERENCE if system == "ref" else system, metric))
                    if value is not None:
                        out[f"{system}_{tgt}_{metric}"] = value
            out["Delta"] = data.labels.get(sid, 0.0)
        grouped[key] = out
    return list(grouped.values())


def load_published(source: str, config: str | None = None, split: str = "train") -> list[dict]:
    """Rows from a local Parquet/JSONL file, or from the Hugging Face Hub (needs the internet)."""
    path = Path(source)
    if path.exists():
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        import json

        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from datasets import load_dataset

    return load_dataset(source, config, split=split).to_list()
