"""The weights policy (models/weights.py) on a Hub cache built in the Hub's own layout (tests/hub_cache.py): a tiny
LLaMA whose `main` has .bin shards only and whose `refs/pr/4` has safetensors, and a LoRA adapter published as
adapter_model.bin. Pickle-only revisions are refused in one line naming the files and both ways on; allowed, they
are converted once, to the same tensors; a snapshot is known by its commit without reading its weights; offline,
a process finds it all through HF_HOME alone. Also the prepare_model stage's use of it and run.json's `hub` list."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alma_r.config import load_config
from alma_r.data.hub import HubSnapshot
from alma_r.models.loading import load_model
from alma_r.models.weights import (
    CONVERTED_DIR,
    CONVERTED_RECORD,
    RefusedWeightsError,
    convert_folder,
    resolve_weights,
    weights_fingerprint,
)
from alma_r.tasks.shared.base_model import prepare_base_model
from tests.hub_cache import folder_files, hub_env, put_snapshot

MODEL, ADAPTER = "org/tiny-bin", "org/tiny-lora-bin"
SHARDS = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


class Hub:
    def __init__(self, root: Path, tiny_model_dir: Path):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.home, self.tiny = root / "hf_home", tiny_model_dir
        self.cache = self.home / "hub"
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        self.bin_dir = root / "bin"
        model.save_pretrained(self.bin_dir, safe_serialization=False, max_shard_size=int(size * 0.6))
        assert sorted(p.name for p in self.bin_dir.glob("*.bin")) == SHARDS
        tokenizer = {
            k: v for k, v in folder_files(tiny_model_dir).items() if k.startswith(("tokenizer", "special"))
        }
        self.main = put_snapshot(self.home, MODEL, folder_files(self.bin_dir) | tokenizer)
        self.pr = put_snapshot(self.home, MODEL, folder_files(tiny_model_dir), revision="refs/pr/4")

        torch.manual_seed(0)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
        self.peft = get_peft_model(model, lora).eval()
        self.adapter_dir = root / "adapter"
        self.peft.save_pretrained(self.adapter_dir, safe_serialization=False)
        assert (self.adapter_dir / "adapter_model.bin").is_file()
        self.adapter_commit = put_snapshot(self.home, ADAPTER, folder_files(self.adapter_dir))
        self.ids = torch.tensor([[1, 5, 9, 42, 7, 3]])

    def snapshot(self, repo: str, commit: str) -> Path:
        return self.cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit

    def converted(self, repo: str, commit: str) -> Path:
        return self.cache / CONVERTED_DIR / f"models--{repo.replace('/', '--')}" / commit

    def logits(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(self.ids).logits


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    """The cache, with huggingface_hub pointed at it and offline (it reads both at import: patched here)."""
    made = Hub(tmp_path_factory.mktemp("weights"), tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(made.cache))
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield made


def refusal(**kwargs) -> str:
    with pytest.raises(RefusedWeightsError) as raised:
        resolve_weights(**kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_pickle_only_revisions_are_refused_naming_the_files_and_both_ways_on(hub):
    message = refusal(name=MODEL)
    assert message.startswith(f"model {MODEL}@main (commit {hub.main}): refused {', '.join(SHARDS)}: ")
    assert "model.revision: <a revision with safetensors>" in message
    assert "model.allow_pickle_weights: true" in message and "torch.load(weights_only=True)" in message
    message = refusal(name=ADAPTER, kind="adapter", revision_field="model.adapter_revision")
    assert message.startswith(
        f"adapter {ADAPTER}@main (commit {hub.adapter_commit}): refused adapter_model.bin"
    )
    assert "model.adapter_revision: <a revision" in message and "model.allow_pickle_weights: true" in message
    message = refusal(name=str(hub.bin_dir))  # a local folder: the same policy
    assert message.startswith(f"{hub.bin_dir}: refused {', '.join(SHARDS)}: only safetensors")
    assert "model.allow_pickle_weights: true" in message
    assert not (hub.cache / CONVERTED_DIR).exists()  # nothing was read


def test_a_safetensors_revision_is_its_snapshot_with_no_conversion(hub):
    found = resolve_weights(MODEL, "refs/pr/4")
    assert found == HubSnapshot(hub.snapshot(MODEL, hub.pr), MODEL, "model", "refs/pr/4", hub.pr)
    assert not hub.converted(MODEL, hub.pr).exists()
    assert torch.equal(hub.logits(load_model(str(found.path))), hub.logits(load_model(str(hub.tiny))))


def test_prepare_model_resolves_base_and_adapter_and_records_them(hub, tmp_path):
    texts = lambda: pytest.fail("a Hub model reads no training text")  # noqa: E731
    cfg = load_config(overrides=[f"model.base={MODEL}", "model.revision=refs/pr/4"])
    outputs, counts = prepare_base_model(cfg, texts, tmp_path)
    assert outputs == {"model": str(hub.snapshot(MODEL, hub.pr))}
    assert counts["resolved"] == [
        {
            "path": outputs["model"],
            "repo_id": MODEL,
            "repo_type": "model",
            "revision": "refs/pr/4",
            "commit": hub.pr,
        }
    ]
    with_adapter = load_config(
        overrides=[f"model.base={MODEL}", "model.revision=refs/pr/4", f"model.adapter={ADAPTER}"]
    )
    with pytest.raises(RefusedWeightsError, match=r"^adapter .*model\.adapter_revision: <a revision"):
        prepare_base_model(with_adapter, texts, tmp_path)


def test_allowed_pickle_weights_are_converted_once_to_the_same_tensors(hub):
    found = resolve_weights(MODEL, allow_pickle=True)
    target = hub.converted(MODEL, hub.main)
    assert found == HubSnapshot(target, MODEL, "model", None, hub.main)  # the original's id, revision, commit
    written = sorted(p.name for p in target.iterdir())
    assert [n for n in written if "model" in n] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert (
        not any(n.endswith(".bin") for n in written)
        and "config.json" in written
        and "tokenizer.json" in written
    )
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    record = json.loads((target / CONVERTED_RECORD).read_text())
    assert (record["repo_id"], record["revision"], record["commit"]) == (MODEL, None, hub.main)
    original = load_file(hub.tiny / "model.safetensors")
    converted = {k: v for shard in target.glob("*.safetensors") for k, v in load_file(shard).items()}
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    assert torch.equal(hub.logits(load_model(str(target))), hub.logits(load_model(str(hub.tiny))))

    times = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert resolve_weights(MODEL, allow_pickle=True) == found  # reused, not redone
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == times
    with pytest.raises(RefusedWeightsError):  # a conversion in the cache does not lift the policy
        resolve_weights(MODEL)

    adapter = resolve_weights(ADAPTER, kind="adapter", allow_pickle=True)
    assert adapter.path == hub.converted(ADAPTER, hub.adapter_commit)
    assert sorted(p.name for p in adapter.path.iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
        CONVERTED_RECORD,
    ]
    adapted = load_model(str(hub.tiny), adapter=str(adapter.path))
    assert torch.equal(hub.logits(adapted), hub.logits(hub.peft))

    local = resolve_weights(str(hub.bin_dir), allow_pickle=True)  # a local folder: converted beside the Hub's
    assert local.repo_id is None and local.path.parent == hub.cache / CONVERTED_DIR / "local"
    assert weights_fingerprint(str(local.path)).startswith("weights sha256 ")  # no Hub commit to name it by
    for shard in target.glob("*.safetensors"):
        assert (local.path / shard.name).read_bytes() == shard.read_bytes()


def test_tied_tensors_are_saved_as_copies(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)
    (tmp_path / "src").mkdir()
    torch.save({"embed": shared, "lm_head": shared}, tmp_path / "src" / "pytorch_model.bin")
    convert_folder(tmp_path / "src", tmp_path / "out", ["pytorch_model.bin"], {"repo_id": None})
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["lm_head"], shared)


def test_a_snapshot_is_known_by_its_commit_without_reading_its_weights(hub, tmp_path):
    def no_reading(path):
        pytest.fail(f"read {path}")

    snapshot = hub.snapshot(MODEL, hub.pr)
    assert weights_fingerprint(str(snapshot), digest=no_reading) == f"hub {MODEL}@{hub.pr}"
    assert weights_fingerprint(MODEL, "refs/pr/4", digest=no_reading) == f"hub {MODEL}@{hub.pr}"
    assert weights_fingerprint(MODEL, digest=no_reading) == f"hub {MODEL}@{hub.main}"
    converted = resolve_weights(MODEL, allow_pickle=True).path
    assert weights_fingerprint(str(converted), digest=no_reading) == f"hub {MODEL}@{hub.main}"
    # Copied out of the cache it is a plain folder, known by its files' contents: those of the tiny model.
    copy = Path(shutil.copytree(snapshot, tmp_path / "copy"))
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(hub.tiny))
    assert weights_fingerprint(str(copy)).startswith("weights sha256 ")


def test_offline_a_process_resolves_from_hf_home_alone(hub):
    resolve_weights(MODEL, allow_pickle=True)  # the conversion this process may already have made
    script = (
        "import json, sys\n"
        "from alma_r.models.weights import resolve_weights, weights_fingerprint\n"
        f"pr = resolve_weights({MODEL!r}, 'refs/pr/4')\n"
        f"main = resolve_weights({MODEL!r}, allow_pickle=True)\n"
        "print(json.dumps([pr.record(), main.record(), weights_fingerprint(str(pr.path))]))\n"
    )
    env = hub_env(hub.home)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pr, main, fingerprint = json.loads(done.stdout.strip().splitlines()[-1])
    assert (pr["path"], pr["commit"]) == (str(hub.snapshot(MODEL, hub.pr)), hub.pr)
    assert (main["path"], main["commit"]) == (str(hub.converted(MODEL, hub.main)), hub.main)
    assert fingerprint == f"hub {MODEL}@{hub.pr}"


def test_run_json_lists_every_hub_repository_once(tmp_path):
    from alma_r.flows.run_record import RunRecord
    from alma_r.tasks.runtime.stage import StageResult

    def record(repo: str, revision: str | None, commit: str) -> dict:
        return {
            "path": f"/cache/{commit}",
            "repo_id": repo,
            "repo_type": "model",
            "revision": revision,
            "commit": commit,
        }

    base, comet = record(MODEL, "refs/pr/4", "a" * 40), record("Unbabel/tiny", None, "b" * 40)
    run = RunRecord(tmp_path, None, [], {})
    run.stage_done(StageResult("prepare_model", "k1", {}, {"resolved": [base]}))
    run.stage_done(StageResult("score", "k2", {}, {"resolved": [comet]}))
    run.stage_done(StageResult("evaluate", "k3", {}, {"resolved": [comet]}))
    assert json.loads((tmp_path / "run.json").read_text())["hub"] == [base, comet]


def test_a_branch_that_moved_changes_the_prepare_model_key(hub, tmp_path):
    from alma_r.tasks.prepare_model import prepare_model_key
    from alma_r.tasks.runtime.stage import why_changed

    repo = "test-org/moving-branch"
    old = put_snapshot(hub.home, repo, {"config.json": '{"version": 1}'})
    cfg = load_config(overrides=[f"model.base={repo}"])
    before = prepare_model_key(cfg, tmp_path, None).key
    assert prepare_model_key(cfg, tmp_path, None).key == before
    new = put_snapshot(hub.home, repo, {"config.json": '{"version": 2}'})  # main now names another commit
    after = prepare_model_key(cfg, tmp_path, None).key
    assert after != before
    assert why_changed(before.parts, after.parts) == f"changed: hub_commits.model.base {old!r} -> {new!r}"
    local = load_config(overrides=[f"model.base={hub.tiny}"])
    assert prepare_model_key(local, tmp_path, None).key.parts["extra"] == local.run.seed  # no Hub: as before
