"""Every shipped config runs outside this checkout's workspace: each path it names is a Hugging Face Hub id, a
sacreBLEU test set, or a `sample:` file bundled with the package; none reaches outside the repository."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import REPO

CONFIGS = REPO / "configs"
RUN_CONFIGS = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("sequence-cpo/*.yaml")])
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys whose values name data, models or folders (the rest are settings, URLs, API model names).
PATH_KEYS = {"path", "files", "shots_dir", "dataset", "base", "adapter", "cache_path", "test_set"}


def named_paths(node, key: str | None = None, inside: tuple[str, ...] = ()):
    """(dotted location, key, value) of every string under a path key, and of each COMET model id."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from named_paths(v, str(k), (*inside, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from named_paths(v, key, (*inside, str(i)))
    elif isinstance(node, str):
        under_files = len(inside) >= 2 and inside[-2] == "files"
        comet_model = len(inside) >= 3 and inside[-3] == "comet_models" and key == "model"
        if key in PATH_KEYS or under_files or comet_model:
            yield ".".join(inside), ("files" if under_files else key), node


def problem(key: str, value: str) -> str | None:
    from sacrebleu import DATASETS

    from alma_r.config import SAMPLE_DIR, SAMPLE_PREFIX

    if value.startswith(SAMPLE_PREFIX):
        target = SAMPLE_DIR / value[len(SAMPLE_PREFIX) :]
        return None if target.exists() else f"bundled sample {target} does not exist"
    if key == "test_set":
        return None if value in DATASETS else "not a sacreBLEU test set"
    if key == "base" and value == "tiny":
        return None
    if HUB_ID.match(value) and not value.startswith("."):
        return None
    return "neither a Hub id, a sacreBLEU test set nor a sample: file"


def test_the_configs_are_found():
    names = {p.name for p in RUN_CONFIGS}
    assert {"tiny.yaml", "alma-13b-r.yaml", "dolly-tiny.yaml"} <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_named_path_is_a_hub_id_a_test_set_or_a_sample(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    found = list(named_paths(data))
    bad = [f"{where}: {value!r}: {why}" for where, key, value in found if (why := problem(key, value))]
    assert not bad, f"{path.name}:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "path", sorted(p for p in CONFIGS.rglob("*") if p.is_file()), ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_no_config_file_reaches_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    assert "shared/data" not in text
    assert not re.search(r"(^|[\s\"'{:,])\.\./", text), "a ../ path"


def test_the_check_fails_on_a_workspace_path():
    data = {"ingest": {"sources": [{"kind": "alma_json", "path": "../../shared/x.json"}]}}
    found = list(named_paths(data))
    assert [problem(k, v) for _, k, v in found] == [
        "neither a Hub id, a sacreBLEU test set nor a sample: file"
    ]
    assert problem("test_set", "wmt99") == "not a sacreBLEU test set"
    assert problem("files", "sample:nope/none.txt").startswith("bundled sample")


def test_the_shipped_run_configs_load():
    from alma_r.config import load_config
    from alma_r.config.sequence import SequenceRunConfig

    for path in RUN_CONFIGS:
        config_class = SequenceRunConfig if path.parent.name == "sequence-cpo" else None
        cfg = load_config(path, config_class=config_class) if config_class else load_config(path)
        assert cfg.run.name
