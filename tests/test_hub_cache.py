"""The rehearsal Hub cache (tests/hub_cache.py::build_paper_cache): with HF_HOME pointing at it and
HF_HUB_OFFLINE=1, the paper's ids load with the libraries' own calls, as they would from the Hub's cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hub_cache import (
    ADAPTER,
    BASE,
    COMET,
    PREFERENCE,
    SAFETENSORS_REVISION,
    WMT22,
    WMT23,
    hub_env,
    repo_folder,
)

# One process for every check: transformers, datasets and COMET each take seconds to import.
LOADER = r"""
import json, sys, warnings
import torch
warnings.filterwarnings("ignore")
from huggingface_hub import snapshot_download
out = {}

from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], revision=sys.argv[2], use_safetensors=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], revision=sys.argv[2])
ids = tok("Guten Morgen", return_tensors="pt").input_ids
out["model"] = {"type": model.config.model_type, "params": sum(p.numel() for p in model.parameters())}
try:  # main has pickle shards only: safetensors must not be found there
    AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True)
    out["main_safetensors"] = "loaded"
except OSError as err:
    out["main_safetensors"] = "refused"
from peft import PeftModel
with torch.no_grad():
    base_logits = model(ids).logits
    tuned = PeftModel.from_pretrained(model, sys.argv[3])
    out["adapter_changes_logits"] = bool((tuned(ids).logits - base_logits).abs().max() > 1e-6)
out["adapter_modules"] = sorted(tuned.peft_config["default"].target_modules)

import datasets
datasets.disable_progress_bars()
folder = snapshot_download(sys.argv[4], repo_type="dataset")
rows = datasets.load_dataset(folder, "de-en", split="train")
out["preference"] = {"configs": datasets.get_dataset_config_names(folder), "rows": rows.to_list()}
folder = snapshot_download(sys.argv[5], repo_type="dataset")
out["wmt22"] = {"configs": datasets.get_dataset_config_names(folder),
                "en-de": datasets.load_dataset(folder, "en-de", split="test").to_list()}
folder = snapshot_download(sys.argv[6], repo_type="dataset")
out["wmt23"] = {"configs": datasets.get_dataset_config_names(folder),
                "de-en": datasets.load_dataset(folder, "de-en", split="test").to_list()}

import comet, yaml
from alma_r.models.score.comet_scorer import quiet_comet
out["comet"] = {}
for repo_id in sys.argv[7:]:
    with quiet_comet():
        checkpoint = comet.download_model(repo_id)
        metric = comet.load_from_checkpoint(checkpoint)
        items = [{"src": "Guten Morgen.", "mt": "Good morning.", "ref": "Good morning."}]
        scores = metric.predict(items, batch_size=2, gpus=0, progress_bar=False).scores
    hparams = yaml.safe_load(open(checkpoint.replace("checkpoints/model.ckpt", "hparams.yaml")))
    out["comet"][repo_id] = {"class": type(metric).__name__, "encoder": hparams["pretrained_model"],
                             "stored_encoder": metric.hparams.pretrained_model, "scores": len(scores)}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded(paper_cache, tmp_path_factory):
    hf_home, written = paper_cache
    # a datasets cache of its own: load_dataset writes Arrow files, the shared cache stays as built
    env = hub_env(
        hf_home, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("datasets-cache"))
    )
    argv = [BASE, SAFETENSORS_REVISION, ADAPTER, PREFERENCE, WMT22, WMT23, *COMET]
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), written


def test_every_revision_is_written_with_its_commit(paper_cache):
    hf_home, written = paper_cache
    assert set(written[BASE]) == {"main", SAFETENSORS_REVISION}
    assert written[BASE]["main"] != written[BASE][SAFETENSORS_REVISION]
    for repo_id, revisions in written.items():
        kind = "dataset" if repo_id in (PREFERENCE, WMT22, WMT23) else "model"
        for revision, commit in revisions.items():
            folder = repo_folder(hf_home, repo_id, kind)
            assert (folder / "refs" / revision).read_text() == commit
            assert (folder / "snapshots" / commit).is_dir()
    main = {p.name for p in (repo_folder(hf_home, BASE) / "snapshots" / written[BASE]["main"]).iterdir()}
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"} <= main
    assert "pytorch_model.bin.index.json" in main and not any(n.endswith(".safetensors") for n in main)
    adapter = repo_folder(hf_home, ADAPTER) / "snapshots" / written[ADAPTER]["main"]
    assert {p.name for p in adapter.iterdir()} >= {"adapter_model.bin", "adapter_config.json"}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE


def test_the_base_model_loads_from_its_safetensors_revision_only(loaded):
    out, _ = loaded
    assert out["model"]["type"] == "llama" and out["model"]["params"] > 0
    assert out["main_safetensors"] == "refused"


def test_the_adapter_loads_from_its_bin_and_changes_the_model(loaded):
    out, _ = loaded
    assert out["adapter_modules"] == ["down_proj"]
    assert out["adapter_changes_logits"]


def test_the_preference_dataset_reads_with_its_struct(loaded):
    out, _ = loaded
    pref = out["preference"]
    assert sorted(pref["configs"]) == ["cs-en", "de-en", "is-en", "ru-en", "zh-en"]
    rows = pref["rows"]
    assert len(rows) == 8 and all(set(row) == {"translation"} for row in rows)
    first = rows[0]["translation"]
    for lang in ("de", "en"):
        assert first[f"gpt4_{lang}"] != first[lang] and first[f"alma_{lang}"] != first[lang]
        for system in ("gpt4", "alma", "ref"):
            scores = [first[f"{system}_{lang}_{m}"] for m in ("kiwi", "xcomet", "kiwi_xcomet")]
            assert all(0 <= s <= 1 for s in scores)
            assert scores[2] == pytest.approx((scores[0] + scores[1]) / 2, abs=1e-4)
    assert first["language_pair"] == "de-en"
    assert [r["translation"]["required_directions"] for r in rows].count("en-de") == 1
    assert sum(r["translation"]["Delta"] != 0 for r in rows) == 2


def test_the_test_sets_read_per_direction(loaded):
    out, _ = loaded
    assert len(out["wmt22"]["configs"]) == 10 and len(out["wmt23"]["configs"]) == 6
    en_de = out["wmt22"]["en-de"]
    assert len(en_de) == 8 and set(en_de[0]) == {"en-de"} and set(en_de[0]["en-de"]) == {"en", "de"}
    assert all(max(map(len, row["de-en"].values())) <= 300 for row in out["wmt23"]["de-en"])


def test_each_comet_stand_in_loads_and_scores_with_the_real_encoder_id(loaded):
    out, _ = loaded
    classes = {"xcomet": "XCOMETMetric", "kiwi": "UnifiedMetric", "regression": "RegressionMetric"}
    for repo_id, (kind, _, encoder) in COMET.items():
        got = out["comet"][repo_id]
        assert got["class"] == classes[kind], repo_id
        assert got["encoder"] == got["stored_encoder"] == encoder, repo_id
        assert got["scores"] == 1
