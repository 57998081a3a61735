"""The published ALMA-R preference layout: round trip, the Delta override, the noise baseline's rates, and TRL
training on our pairs file as it is."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from alma_r.data.io import read_rows, write_table
from alma_r.data.published import DELTA_PREFERS, SYSTEMS, from_published, load_published, to_published
from alma_r.data.schemas import PAIRS, REFERENCE
from alma_r.tasks.shared.selection import add_noise, select_pairs

# A hand-written sample in the published layout (values invented for the test, layout as on the Hub).
ROWS = [
    {
        "translation": {"cs": "Dobrý den", "en": "Good day"},
        "language_pair": "cs-en",
        "required_directions": "cs-en",
        "alma_en": "Good afternoon",
        "gpt4_en": "Hello",
        "ref_en_kiwi": 0.80,
        "ref_en_xcomet": 0.90,
        "ref_en_kiwi_xcomet": 0.85,
        "alma_en_kiwi": 0.70,
        "alma_en_xcomet": 0.60,
        "alma_en_kiwi_xcomet": 0.65,
        "gpt4_en_kiwi": 0.95,
        "gpt4_en_xcomet": 0.93,
        "gpt4_en_kiwi_xcomet": 0.94,
        "Delta": 0.0,
    },
    {
        "translation": {"cs": "Děkuji", "en": "Thank you"},
        "language_pair": "cs-en",
        "required_directions": "en-cs",
        "alma_cs": "Díky",
        "gpt4_cs": "Děkuji moc",
        "ref_cs_kiwi": 0.90,
        "ref_cs_xcomet": 0.90,
        "ref_cs_kiwi_xcomet": 0.90,
        "alma_cs_kiwi": 0.80,
        "alma_cs_xcomet": 0.80,
        "alma_cs_kiwi_xcomet": 0.80,
        "gpt4_cs_kiwi": 0.70,
        "gpt4_cs_xcomet": 0.70,
        "gpt4_cs_kiwi_xcomet": 0.70,
        "Delta": 1.0,
    },
    {
        "translation": {"cs": "Ano", "en": "Yes"},
        "language_pair": "cs-en",
        "required_directions": "cs-en",
        "alma_en": "Yes indeed",
        "gpt4_en": "Yeah",
        "ref_en_kiwi": 0.99,
        "ref_en_xcomet": 0.99,
        "ref_en_kiwi_xcomet": 0.99,
        "alma_en_kiwi": 0.50,
        "alma_en_xcomet": 0.50,
        "alma_en_kiwi_xcomet": 0.50,
        "gpt4_en_kiwi": 0.60,
        "gpt4_en_xcomet": 0.60,
        "gpt4_en_kiwi_xcomet": 0.60,
        "Delta": -2.0,
    },
]


def table(rows):
    """All rows' keys as columns (pyarrow's from_pylist would take the first row's keys only)."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def test_round_trip_of_the_published_layout(tmp_path):
    data = from_published(ROWS)
    assert [s["lp"] for s in data.segments] == ["cs-en", "en-cs", "cs-en"]
    assert data.segments[1]["src"] == "Thank you" and data.segments[1]["ref"] == "Děkuji"
    assert len(data.candidates) == 6 and len(data.scores) == 27
    assert to_published(data) == ROWS
    path = tmp_path / "published.parquet"

    pq.write_table(table(ROWS), path)
    assert from_published(load_published(str(path))).segments == data.segments


def select(data, **kw):
    texts = {(s["id"], REFERENCE): s["ref"] for s in data.segments}
    texts.update({(c["segment_id"], c["system"]): c["hypothesis"] for c in data.candidates})
    scores = {(s["segment_id"], s["system"], s["metric"]): s["score"] for s in data.scores}
    return select_pairs(data.segments, texts, scores, list(SYSTEMS), ["kiwi", "xcomet"], **kw)


def test_delta_overrides_the_scores_and_zero_leaves_them():
    data = from_published(ROWS)
    pairs, dropped = select(data, human_labels=data.labels, override_systems=DELTA_PREFERS)
    assert dropped == []
    by_lp_src = {(p["lp"], p["prompt"].split("\n")[1]): p for p in pairs}
    # Delta 0: scores decide; mean(kiwi, xcomet): ref 0.85, alma 0.65, gpt4 0.94.
    p = by_lp_src[("cs-en", "Czech: Dobrý den")]
    assert (p["chosen_system"], p["rejected_system"]) == ("gpt4", "alma")
    assert p["margin"] == pytest.approx(0.94 - 0.65)
    # Delta > 0: GPT-4 over ALMA although ALMA scored higher.
    p = by_lp_src[("en-cs", "English: Thank you")]
    assert (p["chosen"], p["rejected"]) == ("Děkuji moc", "Díky")
    # Delta < 0: ALMA over GPT-4 although the reference scored best of all.
    p = by_lp_src[("cs-en", "Czech: Ano")]
    assert (p["chosen_system"], p["rejected_system"]) == ("alma", "gpt4")
    without, _ = select(data)
    assert [p["chosen_system"] for p in without] == ["gpt4", REFERENCE, REFERENCE]


def test_noise_baseline_rates_over_10k_words():
    rng = random.Random(7)
    text = " ".join(f"w{i}" for i in range(10_000))
    noised, stats = add_noise(text, rng, p_delete=0.15, p_swap=0.3)
    out = noised.split()
    # Independent counts: deletions are missing tokens, swaps are adjacent inversions of the original order.
    deleted = 10_000 - len(out)
    index = [int(w[1:]) for w in out]
    inversions = sum(index[i] > index[i + 1] for i in range(len(index) - 1))
    assert deleted == stats["deleted"] and inversions == stats["swaps"]
    assert abs(deleted / 10_000 - 0.15) < 0.01
    assert abs(inversions / stats["swap_trials"] - 0.3) < 0.01
    assert sorted(index) == [i for i in range(10_000) if f"w{i}" in set(out)]  # nothing invented


def test_noise_rejected_side_is_seeded_and_nullable():
    data = from_published(ROWS)
    pairs, _ = select(data, rejected="noise", noise=(0.5, 0.5), seed=3)
    again, _ = select(data, rejected="noise", noise=(0.5, 0.5), seed=3)
    assert pairs == again and all(p["rejected_system"] == "noise" and p["margin"] is None for p in pairs)


def test_trl_loads_our_pairs_and_trains_one_step(tmp_path, tiny_model_dir):
    trl_cpo = pytest.importorskip("trl.experimental.cpo")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    from alma_r.models.loading import load_tokenizer

    data = from_published(ROWS)
    pairs, _ = select(data)
    path = write_table(pairs, tmp_path / "pairs.parquet", PAIRS)
    assert read_rows(path, PAIRS) == pairs
    dataset = load_dataset("parquet", data_files=str(path), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    args = trl_cpo.CPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=256,
    )
    trainer = trl_cpo.CPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(str(tiny_model_dir)),
    )
    result = trainer.train()
    assert result.global_step == 1
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_cli_builds_pairs_from_a_local_published_file(tmp_path):

    from alma_r.cli import main

    src = tmp_path / "published.parquet"
    pq.write_table(table(ROWS), src)
    out = tmp_path / "pairs.parquet"
    assert main(["published-pairs", "--source", str(src), "--output", str(out)]) == 0
    pairs = read_rows(out, PAIRS)
    assert [p["chosen_system"] for p in pairs] == ["gpt4", "gpt4", "alma"]
    assert (tmp_path / "pairs.stats.json").is_file() and (tmp_path / "pairs.dropped.parquet").is_file()
