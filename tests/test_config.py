"""The run configuration (alma_r/config/) and `alma-r check-config`: typos and bad values fail loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alma_r.cli import main
from alma_r.config import (
    SAMPLE_DIR,
    ConfigError,
    config_base_dir,
    config_from_json,
    config_to_json,
    load_config,
    resolve_path,
)
from alma_r.config.sequence import load_sequence_config
from alma_r.data.schemas import REFERENCE
from tests.conftest import REPO

CONFIG_DIR = REPO / "configs"
# Every YAML file under configs/, recursively, is a run config chosen by its folder: the top folder holds the
# build-alma-r flow's, sequence-cpo/ the sequence-cpo flow's. accelerate/ holds `accelerate launch
# --config_file` files, which are not run configs (work-pools/ holds JSON only).
LOADERS = {".": load_config, "sequence-cpo": load_sequence_config}
NOT_RUN_CONFIGS = {"accelerate"}
YAML_FILES = sorted(CONFIG_DIR.glob("**/*.yaml"))


def config_folder(path: Path) -> str:
    """The folder of configs/ a file is in ("." for configs/ itself)."""
    parts = path.relative_to(CONFIG_DIR).parts
    return parts[0] if len(parts) > 1 else "."


CONFIGS = [p for p in YAML_FILES if config_folder(p) not in NOT_RUN_CONFIGS]
TINY = REPO / "configs" / "tiny.yaml"


def assert_matches_yaml(raw, dumped, where="") -> None:
    """Every value written in the YAML file is the value the loaded config holds."""
    if isinstance(raw, dict):
        assert isinstance(dumped, dict), where
        for key, value in raw.items():
            assert key in dumped, f"{where}.{key}"
            assert_matches_yaml(value, dumped[key], f"{where}.{key}")
    elif isinstance(raw, list):
        assert isinstance(dumped, list) and len(dumped) == len(raw), where
        for i, (a, b) in enumerate(zip(raw, dumped, strict=True)):
            assert_matches_yaml(a, b, f"{where}.{i}")
    else:
        assert dumped == raw, f"{where}: {dumped!r} != {raw!r}"


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(*args, **kwargs)
    return str(exc.value)


# A well-formed alma_json ingest source: the tests of sources each break one field of it.
ALMA_JSON_SOURCE = {
    "name": "x",
    "kind": "alma_json",
    "pair": "de-en",
    "path": "a.json",
    "directions": ["de-en"],
}


def one_source_config(path: Path, source: dict) -> Path:
    """Writes a config file whose only section is `ingest` with this one source."""
    path.write_text(yaml.safe_dump({"ingest": {"sources": [source]}}))
    return path


# --------------------------------------------------------------------------------------- shipped configs


def test_the_shipped_configs_are_found():
    names = {str(p.relative_to(CONFIG_DIR)) for p in CONFIGS}
    assert names >= {"tiny.yaml", "alma-13b-r.yaml", "sequence-cpo/dolly-tiny.yaml"}


def test_every_yaml_file_under_configs_is_validated_or_known_not_to_be_a_run_config():
    # A new folder must be named in LOADERS or NOT_RUN_CONFIGS: its configs are never skipped silently.
    unknown = [str(p) for p in YAML_FILES if config_folder(p) not in {*LOADERS, *NOT_RUN_CONFIGS}]
    assert not unknown, f"add their folder to LOADERS (run configs) or NOT_RUN_CONFIGS: {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads_with_its_values(path):
    cfg = LOADERS[config_folder(path)](path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert_matches_yaml(raw, cfg.model_dump(mode="json"))
    assert config_base_dir(cfg) == path.resolve().parent


def test_tiny_config_details():
    cfg = load_config(TINY)
    assert cfg.model.base == "tiny"
    assert cfg.model.tiny.hidden_size // cfg.model.tiny.num_attention_heads == 64
    assert [s.name for s in cfg.generate.systems] == ["greedy", "sample"]
    assert cfg.train.max_prompt_length < cfg.train.max_length
    # every bundled sample file it names exists
    for source in cfg.ingest.sources:
        for value in source.files.values():
            assert value.startswith("sample:")
            path = resolve_path(value, config_base_dir(cfg))
            assert path == SAMPLE_DIR / value.removeprefix("sample:")
            assert path.is_file(), path


def test_alma_13b_r_follows_the_paper():
    cfg = load_config(REPO / "configs" / "alma-13b-r.yaml")
    assert cfg.train.beta == 0.1 and cfg.train.cpo_alpha == 1.0 and cfg.train.learning_rate == 1e-4
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 128
    lps = {lp for s in cfg.ingest.sources if s.split == "train" for lp in s.directions}
    assert lps == {f"{x}-en" for x in ("cs", "de", "is", "ru", "zh")} | {
        f"en-{x}" for x in ("cs", "de", "is", "ru", "zh")
    }


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg.train.beta == 0.1 and cfg.model.base == "tiny"


def test_missing_file_and_bad_yaml(tmp_path):
    ghost = tmp_path / "nope.yaml"
    assert str(ghost) in config_error(ghost)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [beta: 0.1\n")
    msg = config_error(bad)
    assert str(bad) in msg and "YAML" in msg
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- beta\n")
    assert str(listed) in config_error(listed)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    path = sub / "c.yaml"
    path.write_text("run: {name: x}\n")
    cfg = load_config(path)
    assert resolve_path("data/a.json", config_base_dir(cfg)) == sub / "data" / "a.json"
    assert resolve_path("../b.json", config_base_dir(cfg)) == tmp_path / "b.json"
    assert resolve_path("/abs/c.json", config_base_dir(cfg)) == Path("/abs/c.json")


# ------------------------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  beta: 0.2\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}: ")
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg


@pytest.mark.parametrize(
    ("override", "nearest"),
    [
        ("train.bta=1", "beta"),
        ("train.lora.rr=4", "r"),
        ("model.tiny.hidden_sise=128", "hidden_size"),
        ("evaluate.num_beam=2", "num_beams"),
        ("bogus=1", None),
    ],
)
def test_misspelt_key_names_the_full_key_and_the_nearest(override, nearest):
    full_key = override.partition("=")[0]  # the whole dotted key, not only its last part
    msg = config_error(TINY, [override])
    assert msg.startswith(f"{TINY}: ")
    assert f"unknown key '{full_key}'" in msg
    if nearest is not None:
        assert f"did you mean '{nearest}'" in msg


def test_misspelt_key_inside_a_list_of_sections(tmp_path):
    misspelt = dict(ALMA_JSON_SOURCE)
    misspelt["pth"] = misspelt.pop("path")
    msg = config_error(one_source_config(tmp_path / "c.yaml", misspelt))
    assert "unknown key 'ingest.sources.0.pth'" in msg and "did you mean 'path'" in msg


# ---------------------------------------------------------------------------------------------- --set


def test_set_overrides_apply():
    cfg = load_config(
        TINY,
        [
            "train.beta=0.2",
            "score.metrics=[chrf, bleu]",
            "select.metrics=[bleu]",
            "train.lora.target_modules=[q_proj, v_proj]",
            "model.tiny.hidden_size=256",
            "model.tiny.num_attention_heads=4",
            "sft.enabled=false",
            "run.name=a=b",
            "generate.systems=[{name: beam, num_beams: 4}]",
        ],
    )
    assert cfg.train.beta == 0.2
    assert cfg.score.metrics == ["chrf", "bleu"]
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lora.r == 16  # the rest of the nested section is untouched
    assert (cfg.model.tiny.hidden_size, cfg.model.tiny.num_attention_heads) == (256, 4)
    assert cfg.model.tiny.vocab_size == 2048  # from the file
    assert cfg.sft.enabled is False
    assert cfg.run.name == "a=b"
    assert [(s.name, s.num_beams) for s in cfg.generate.systems] == [("beam", 4)]
    # the file's other values survive
    assert cfg.train.max_length == 256 and cfg.train.learning_rate == 5e-3


def test_set_a_whole_section_and_a_key_absent_from_the_file():
    cfg = load_config(TINY, ["train.lora={r: 8, alpha: 16}", "select.metrics=[chrf]"])
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.lora.target_modules) == (8, 16, ["down_proj"])
    assert cfg.select.metrics == ["chrf"]


def test_set_changes_only_its_sections_hash():
    a, b = load_config(TINY), load_config(TINY, ["train.beta=0.2"])
    assert a.section_hash("train") != b.section_hash("train")
    assert a.section_hash("ingest", "generate") == b.section_hash("ingest", "generate")


@pytest.mark.parametrize("item", ["train.beta", "train.beta:0.2"])
def test_malformed_set(item):
    msg = config_error(TINY, [item])
    assert item in msg


def test_set_through_a_scalar_is_refused():
    msg = config_error(TINY, ["train.beta.x=1"])
    assert "train.beta.x" in msg and "'beta'" in msg


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("train.beta=-1", "-1"),
        ("train.beta=abc", "'abc'"),
        ("train.lora.r=0", "0"),
        ("train.loss_type=kto", "'kto'"),
        ("score.metrics=[chrf, comet]", "['chrf', 'comet']"),
        ("model.dtype=fp8", "'fp8'"),
    ],
)
def test_bad_value_names_key_and_value(override, shown):
    key = override.partition("=")[0]  # the message names the full dotted key that was set
    msg = config_error(TINY, [override])
    assert msg.startswith(f"{TINY}: ")
    assert f"'{key}'" in msg
    assert f"(got {shown})" in msg


# ------------------------------------------------------------------------------------ cross-field checks


def test_prompt_length_must_be_below_max_length():
    msg = config_error(TINY, ["train.max_prompt_length=512", "train.max_length=512"])
    assert "max_prompt_length (512)" in msg and "max_length (512)" in msg
    msg = config_error(TINY, ["train.max_prompt_length=300"])  # file: max_length 256
    assert "max_prompt_length (300)" in msg and "max_length (256)" in msg
    assert load_config(TINY, ["train.max_prompt_length=255"]).train.max_prompt_length == 255


@pytest.mark.parametrize("names", [["a", "a"], ["greedy", "beam", "greedy"], [REFERENCE]])
def test_system_names_must_be_unique_and_not_reference(names):
    systems = "[" + ", ".join(f"{{name: {n}}}" for n in names) + "]"
    msg = config_error(TINY, [f"generate.systems={systems}"])
    assert "generate.systems" in msg and str(names) in msg


ENDPOINT = "endpoint: {base_url: 'http://127.0.0.1:8000/v1', model: m}"


@pytest.mark.parametrize(
    ("system", "field", "which", "backend"),
    [
        (f"{{name: gpt4, backend: openai, {ENDPOINT}, files: {{de-en: a.en}}}}", "files", "backend file", "openai"),
        (f"{{name: gpt4, backend: openai, {ENDPOINT}, num_beams: 5}}", "num_beams", "backends hf, vllm", "openai"),
        (f"{{name: gpt4, backend: openai, {ENDPOINT}, top_k: 10}}", "top_k", "backends hf, vllm", "openai"),
        ("{name: f, backend: file, files: {de-en: a.en}, max_new_tokens: 9}", "max_new_tokens",
         "backends hf, vllm, openai", "file"),
        ("{name: f, backend: file, files: {de-en: a.en}, shots: hw, shots_dir: s}", "shots",
         "backends hf, vllm, openai", "file"),
        (f"{{name: g, {ENDPOINT}}}", "endpoint", "backend openai", "hf"),
        ("{name: g, tensor_parallel_size: 2}", "tensor_parallel_size", "backend vllm", "hf"),
        ("{name: g, vllm_python: /opt/vllm/bin/python}", "vllm_python", "backend vllm", "hf"),
        ("{name: g, backend: vllm, file_format: jsonl}", "file_format", "backend file", "vllm"),
        ("{name: gpt4, backend: ingested, n: 2}", "n", "backends hf, vllm, openai", "ingested"),
        ("{name: gpt4, backend: ingested, do_sample: true}", "do_sample", "backends hf, vllm, openai", "ingested"),
    ],
)  # fmt: skip
def test_a_field_of_another_backend_is_refused(system, field, which, backend):
    msg = config_error(TINY, [f"generate.systems=[{system}]"])
    name = system.split(",")[0].removeprefix("{name: ")
    assert msg.endswith(
        f"system '{name}': {field} is a field of {which}, this system's backend is {backend} "
        f"(drop {field} or change the backend)"
    )
    assert "generate.systems.0" in msg and "\n" not in msg


def test_the_fields_each_backend_uses_load_and_survive_a_stage_request():
    systems = [
        "{name: beam, backend: hf, num_beams: 5, max_new_tokens: 9, shots: hw, shots_dir: sample:shots/hw}",
        "{name: v, backend: vllm, do_sample: true, top_k: 10, n: 2, tensor_parallel_size: 2, vllm_python: p}",
        f"{{name: gpt4, backend: openai, {ENDPOINT}, do_sample: true, temperature: 0.7, top_p: 0.9, n: 2}}",
        "{name: f, backend: file, files: {de-en: a.jsonl}, file_format: jsonl, jsonl_field: mt}",
        "{name: alma, backend: ingested}",
        "{name: g, backend: ingested, num_beams: 1, files: null}",  # defaults written out change nothing
    ]
    cfg = load_config(TINY, [f"generate.systems=[{', '.join(systems)}]"])
    backends = [s.backend for s in cfg.generate.systems]
    assert backends == ["hf", "vllm", "openai", "file", "ingested", "ingested"]
    # A stage's child process validates the whole dumped config again: every field is set there.
    again = config_from_json(config_to_json(cfg))
    assert again.generate.model_dump() == cfg.generate.model_dump()


@pytest.mark.parametrize(("hidden", "heads"), [(96, 2), (128, 4), (130, 2), (64, 2)])
def test_tiny_head_dim_must_be_64(hidden, heads):
    msg = config_error(TINY, [f"model.tiny.hidden_size={hidden}", f"model.tiny.num_attention_heads={heads}"])
    assert "head_dim" in msg and "model.tiny" in msg
    assert f"hidden_size={hidden}" in msg and f"num_attention_heads={heads}" in msg


def test_selection_metrics_must_be_scored():
    msg = config_error(TINY, ["select.metrics=[bleu]"])
    assert "['bleu']" in msg and "['chrf', 'consensus_chrf']" in msg


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        (["model.adapter=org/lora", "train.lora.r=8"], ["train.lora", "model.adapter"]),
        (["model.adapter=org/lora", "train.finetune=full"], ["train.finetune: full", "model.adapter"]),
        (["model.revision=refs/pr/4"], ["model.revision (refs/pr/4)", "model.base tiny"]),
        (["model.base=./local", "model.revision=main"], ["model.revision (main)", "model.base ./local"]),
        (["model.adapter_revision=main"], ["model.adapter_revision (main)", "no model.adapter"]),
        (
            ["model.base=org/base", "model.adapter=./lora", "model.adapter_revision=main"],
            ["model.adapter_revision (main)", "model.adapter ./lora is a local folder"],
        ),
    ],
)
def test_model_settings_that_would_be_ignored_are_refused_naming_both_fields(overrides, fields):
    msg = config_error(overrides=overrides)
    assert all(field in msg for field in fields), msg
    assert "\n" not in msg


def test_the_same_model_settings_load_where_they_apply():
    cfg = load_config(overrides=["model.base=org/base", "model.revision=refs/pr/4", "model.adapter=org/lora"])
    assert cfg.model.revision == "refs/pr/4"
    # A stage's child process validates the dumped config, every field of it set: it loads there too.
    assert config_from_json(config_to_json(cfg)).model == cfg.model
    assert config_from_json(config_to_json(load_config(REPO / "configs" / "alma-13b-r.yaml"))).model.adapter
    pinned = load_config(overrides=["model.adapter=org/lora", "model.adapter_revision=v1"])
    assert pinned.model.adapter_revision == "v1"
    assert load_config(TINY).train.lora.r == 16  # tiny.yaml sets train.lora: no adapter, so it is used


def test_lora_dropout_needs_disable_dropout_off():
    msg = config_error(TINY, ["train.lora.dropout=0.05"])
    assert "lora.dropout 0.05" in msg and "disable_dropout" in msg and "'train'" in msg
    cfg = load_config(TINY, ["train.lora.dropout=0.05", "train.disable_dropout=false"])
    assert cfg.train.lora.dropout == 0.05 and not cfg.train.disable_dropout
    assert load_config(TINY).train.disable_dropout  # ALMA-R's and TRL's default


def test_source_needs_its_kind_fields_and_known_languages(tmp_path):
    without_path = dict(ALMA_JSON_SOURCE)
    del without_path["path"]
    msg = config_error(one_source_config(tmp_path / "c.yaml", without_path))
    assert "ingest.sources.0" in msg and "'path'" in msg
    unknown_language = ALMA_JSON_SOURCE | {"pair": "de-xx", "directions": ["de-xx"]}
    msg = config_error(one_source_config(tmp_path / "c.yaml", unknown_language))
    assert "ingest.sources.0.pair" in msg and "'xx'" in msg


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_check_config_typo_exits_2_with_the_message_on_stderr(capsys):
    code = main(["check-config", "--config", str(TINY), "--set", "train.bta=1"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "unknown key 'train.bta'" in err and "did you mean 'beta'" in err and str(TINY) in err


def test_cli_check_config_prints_the_resolved_config(capsys):
    code = main(["check-config", "--config", str(TINY), "--set", "train.beta=0.2"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    resolved = json.loads(out)
    assert resolved["train"]["beta"] == 0.2
    assert resolved["model"]["tiny"]["hidden_size"] == 128


def test_cli_without_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check-config"])
    assert exc.value.code == 2
    assert "--config" in capsys.readouterr().err
