"""`alma-r download` (alma_r/cli/download.py, tasks/shared/prefetch.py) on configs/alma-13b-r.yaml, each run a
process of its own: offline (HF_HUB_OFFLINE=1) against the rehearsal Hub cache (tests/hub_cache.py::
build_paper_cache), what the config names is found by id and revision, a missing item is named and fails the
command, the pickle-only adapter is converted once, and refused without allow_pickle_weights; online against
that cache served as a Hub on loopback (HubServer), everything is fetched into an empty cache once, and a second
run fetches nothing. sacreBLEU: a test set in sacreBLEU's own folder layout is found, one not there is missing."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.hub_cache import (
    ADAPTER,
    BASE,
    COMET,
    DATASETS,
    SAFETENSORS_REVISION,
    WMT23,
    HubServer,
    copy_cache,
    hub_env,
    repo_folder,
)

# The paper's recipe: base at refs/pr/4, the pickle-only adapter allowed, the five preference configs, WMT'22
# (10 directions) and WMT'23 (6), KIWI-XXL and XCOMET-XXL for scoring, and KIWI-22 and COMET-22 for evaluation too.
PAPER = REPO / "configs" / "alma-13b-r.yaml"


def download(
    config: Path,
    hf_home: Path,
    *args: str,
    offline: bool = True,
    sacrebleu: Path | None = None,
    endpoint: str | None = None,
):
    """`alma-r download` in a process of its own: offline, or online against `endpoint` (a HubServer; without
    one, no Hub item may be named: there is no network here)."""
    env = hub_env(
        hf_home,
        offline,
        drop=("SACREBLEU",),
        OMP_NUM_THREADS="1",
        SACREBLEU=str(sacrebleu or hf_home / "sacrebleu"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if endpoint:
        env.update(HF_ENDPOINT=endpoint)
    cmd = [sys.executable, "-m", "alma_r.cli", "download", "--config", str(config), *args]
    return subprocess.run(cmd, cwd=hf_home.parent, env=env, capture_output=True, text=True, timeout=300)


def table(stdout: str) -> dict[tuple[str, str], dict[str, str]]:
    """The printed table by (kind, id)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header == ["kind", "id", "revision", "commit", "size", "where", "status"], header
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[1:]]
    return {(row["kind"], row["id"]): row for row in rows}


@pytest.fixture
def hf_home(paper_cache, tmp_path) -> Path:
    """A copy of the session's cache: these tests convert, delete and check what is in it."""
    return copy_cache(paper_cache[0], tmp_path / "hf_home")


def test_everything_the_paper_config_names_is_present_offline(paper_cache, hf_home, tmp_path):
    _, written = paper_cache
    done = download(PAPER, hf_home)
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    expected = {
        ("model", BASE): SAFETENSORS_REVISION,
        ("adapter", ADAPTER): "main",
        **{("comet", repo_id): "main" for repo_id in COMET},
        **{("encoder", encoder): "main" for _, _, encoder in COMET.values()},
        **{("dataset", repo_id): "main" for repo_id in DATASETS},
    }
    assert set(rows) == set(expected)
    for (kind, repo_id), revision in expected.items():
        row = rows[(kind, repo_id)]
        assert row["revision"] == revision and row["commit"] == written[repo_id][revision], row
        assert row["status"] == ("converted" if kind == "adapter" else "present"), row
    assert rows[("model", BASE)]["where"].endswith(f"snapshots/{written[BASE][SAFETENSORS_REVISION]}")
    progress = [line for line in done.stderr.splitlines() if re.match(r"alma-r download: \[\d+/\d+\]", line)]
    assert len(progress) == len(expected)


@pytest.fixture
def hub(paper_cache):
    server = HubServer(paper_cache[0])
    yield server
    server.close()


def test_online_everything_is_fetched_once_and_then_found_offline(paper_cache, hub, tmp_path):
    _, written = paper_cache
    config, fresh = PAPER, tmp_path / "fresh"
    first = download(config, fresh, offline=False, endpoint=hub.endpoint)
    assert first.returncode == 0, first.stderr
    rows = table(first.stdout)
    assert {key: row["status"] for key, row in rows.items()} == {
        key: ("converted" if key[0] == "adapter" else "downloaded") for key in rows
    }
    assert rows[("model", BASE)]["commit"] == written[BASE][SAFETENSORS_REVISION]
    served = set(hub.served)
    # what a run loads, and nothing else: the base's safetensors revision without its .bin shards, the adapter's
    # .bin (to convert), COMET encoders without their weights
    assert {name for repo, name in served if repo == BASE} >= {"config.json", "model.safetensors.index.json"}
    assert not any(name.endswith(".bin") for repo, name in served if repo == BASE)
    assert (ADAPTER, "adapter_model.bin") in served
    encoders = {encoder for _, _, encoder in COMET.values()}
    assert {repo for repo, _ in served} >= encoders
    assert not any(repo in encoders and name.endswith(".safetensors") for repo, name in served)

    again = download(config, fresh, offline=False, endpoint=hub.endpoint)
    assert again.returncode == 0, again.stderr
    assert {row["status"] for row in table(again.stdout).values()} == {"present"}
    assert len(hub.served) == len(served), "the second run fetched files again"

    offline = download(config, fresh)
    assert offline.returncode == 0, offline.stderr
    assert {row["status"] for row in table(offline.stdout).values()} == {"present"}


def test_online_a_repository_the_hub_does_not_have_fails_in_one_line(hub, tmp_path):
    config = tmp_path / "one.yaml"
    comet = {"kiwi_xxl": {"model": "Unbabel/no-such-model"}}
    config.write_text(
        json.dumps({"score": {"metrics": ["kiwi_xxl"], "comet_models": comet}}), encoding="utf-8"
    )
    done = download(config, tmp_path / "fresh", offline=False, endpoint=hub.endpoint)
    assert done.returncode == 1
    assert table(done.stdout)[("comet", "Unbabel/no-such-model")]["status"] == "failed"
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("alma-r: download: comet ")]
    assert "Unbabel/no-such-model@main: failed (" in line and "RepositoryNotFoundError" in line
    assert "Traceback" not in done.stderr


def test_a_missing_repository_is_named_and_the_command_fails(hf_home, tmp_path):
    # an encoder (found only through its COMET checkpoint) and a dataset
    for repo_id, kind in (("xlm-roberta-large", "model"), (WMT23, "dataset")):
        folder = repo_folder(hf_home, repo_id, kind)
        assert folder.is_dir()
        subprocess.run(["rm", "-r", str(folder)], check=True)
    done = download(PAPER, hf_home)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = table(done.stdout)
    assert rows[("encoder", "xlm-roberta-large")]["status"] == "missing"
    assert rows[("dataset", WMT23)]["status"] == "missing"
    missing = {key for key, row in rows.items() if row["status"] == "missing"}
    assert missing == {("encoder", "xlm-roberta-large"), ("dataset", WMT23)}
    assert {row["status"] for key, row in rows.items() if key not in missing} == {"present", "converted"}
    errors = [line for line in done.stderr.splitlines() if line.startswith("alma-r: download: ")]
    assert errors[0].startswith("alma-r: download: encoder xlm-roberta-large@main: missing (")
    assert errors[1].startswith(f"alma-r: download: dataset {WMT23}@main: missing (")
    assert f"2 of {len(rows)} items are not available" in errors[2]
    assert "Traceback" not in done.stderr


def test_the_pickle_adapter_is_converted_once(hf_home, tmp_path):
    first = download(PAPER, hf_home)
    assert first.returncode == 0, first.stderr
    row = table(first.stdout)[("adapter", ADAPTER)]
    assert row["status"] == "converted"
    converted = Path(row["where"])
    assert (converted / "adapter_model.safetensors").is_file() and not (
        converted / "adapter_model.bin"
    ).exists()
    stamp = (converted / "adapter_model.safetensors").stat().st_mtime_ns
    second = download(PAPER, hf_home)
    assert second.returncode == 0, second.stderr
    again = table(second.stdout)[("adapter", ADAPTER)]
    assert (
        again["status"] == "present" and again["where"] == row["where"] and again["commit"] == row["commit"]
    )
    assert (converted / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_pickle_weights_without_permission_are_refused(hf_home, tmp_path):
    done = download(PAPER, hf_home, "--set", "model.allow_pickle_weights=false")
    assert done.returncode == 1
    assert table(done.stdout)[("adapter", ADAPTER)]["status"] == "refused"
    (line,) = [
        line for line in done.stderr.splitlines() if line.startswith(f"alma-r: download: adapter {ADAPTER}")
    ]
    assert "adapter_model.bin" in line and "model.allow_pickle_weights" in line


def test_a_config_error_is_one_line(tmp_path):
    done = download(PAPER, tmp_path / "empty", "--set", "model.adpter=x")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"alma-r: config: {PAPER}: unknown key 'model.adpter'; did you mean 'adapter'?"
    ]


def test_local_folders_are_listed_as_local_and_a_missing_one_fails(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    comet = tmp_path / "comet"
    (comet / "checkpoints").mkdir(parents=True)
    (comet / "checkpoints" / "model.ckpt").write_bytes(b"-")
    # a local checkpoint naming its encoder by path (tiny_comet's default): nothing to fetch for it
    (comet / "hparams.yaml").write_text(f"pretrained_model: {tmp_path / 'encoder'}\n")
    config = tmp_path / "local.yaml"
    metrics = {"comet_22": {"model": "comet", "reference": True}, "kiwi_22": {"model": "./gone.ckpt"}}
    config.write_text(
        json.dumps(
            {
                "model": {"base": str(tmp_path / "model")},
                "score": {"metrics": ["comet_22", "kiwi_22"], "comet_models": metrics},
            }
        ),
        encoding="utf-8",
    )
    done = download(config, tmp_path / "hf_home")
    assert done.returncode == 1
    rows = table(done.stdout)
    assert rows[("model", str(tmp_path / "model"))]["status"] == "local"
    assert rows[("comet", "comet")]["status"] == "local" and rows[("comet", "comet")]["where"] == str(comet)
    assert rows[("comet", "./gone.ckpt")]["status"] == "failed"
    assert not any(kind == "encoder" for kind, _ in rows)
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("alma-r: download: comet ./gone")]
    assert "no such file or folder" in line and "named by score.comet_models.kiwi_22" in line


# --- sacreBLEU ----------------------------------------------------------------------------------------------------


def sacrebleu_cache(root: Path, test_set: str, lp: str, pairs: list[tuple[str, str]]) -> Path:
    """What sacreBLEU leaves after downloading `test_set` into $SACREBLEU=root: its archive under
    <name>/raw/ and the archive's extracted XML (WMT'21+ format) for `lp`; the text files it derives later."""
    from sacrebleu.dataset import DATASETS as SACREBLEU_DATASETS

    dataset = SACREBLEU_DATASETS[test_set]
    src, tgt = lp.split("-")
    segs = lambda side: "".join(f'<seg id="{i}">{pair[side]}</seg>' for i, pair in enumerate(pairs, 1))  # noqa: E731
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?>\n<dataset id="{test_set}"><collection id="general">'
        f'<doc id="d1" origlang="{src}"><src lang="{src}"><p>{segs(0)}</p></src>'
        f'<ref lang="{tgt}" translator="A"><p>{segs(1)}</p></ref></doc></collection></dataset>\n'
    )
    raw = root / test_set / "raw"
    relative = dataset.langpairs[lp]
    relative = relative["path"] if isinstance(relative, dict) else relative[0]
    (raw / relative).parent.mkdir(parents=True, exist_ok=True)
    (raw / relative).write_text(xml, encoding="utf-8")
    archive = raw / dataset._get_tarball_filename(dataset.data[0])
    with tarfile.open(archive, "w:gz") as tar:
        data = xml.encode("utf-8")
        info = tarfile.TarInfo(relative)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return root


def test_a_sacrebleu_test_set_is_found_in_sacrebleus_folder_or_named_missing(tmp_path):
    config = tmp_path / "tiny.yaml"
    sources = [
        {"name": "wmt22", "kind": "sacrebleu", "test_set": "wmt22", "pair": "de-en", "directions": ["de-en"]},
        {"name": "wmt23", "kind": "sacrebleu", "test_set": "wmt23", "pair": "de-en", "directions": ["de-en"]},
    ]
    config.write_text(json.dumps({"ingest": {"sources": sources}}), encoding="utf-8")
    pairs = [("Guten Morgen.", "Good morning."), ("Danke.", "Thank you.")]
    folder = sacrebleu_cache(tmp_path / "sacrebleu", "wmt22", "de-en", pairs)
    hf_home = tmp_path / "hf_home"

    done = download(config, hf_home, sacrebleu=folder)
    assert done.returncode == 1, done.stderr
    rows = table(done.stdout)
    assert rows[("model", "tiny")]["status"] == "local"
    assert rows[("sacrebleu", "wmt22")]["status"] == "present"
    assert rows[("sacrebleu", "wmt22")]["revision"] == "de-en"
    assert rows[("sacrebleu", "wmt23")]["status"] == "missing"
    assert any(
        line.startswith("alma-r: download: sacrebleu wmt23 de-en: missing")
        for line in done.stderr.splitlines()
    )

    # Online, a test set whose archive is there is not fetched again: sacreBLEU derives the direction's text files.
    online = download(
        config,
        hf_home,
        "--set",
        "ingest.sources=[" + json.dumps(sources[0]) + "]",
        offline=False,
        sacrebleu=folder,
    )
    assert online.returncode == 0, online.stderr
    assert table(online.stdout)[("sacrebleu", "wmt22")]["status"] == "present"
    assert (folder / "wmt22" / "wmt22.de-en.src").read_text(encoding="utf-8").splitlines() == [
        p[0] for p in pairs
    ]
    assert (folder / "wmt22" / "wmt22.de-en.ref-A").read_text(encoding="utf-8").splitlines() == [
        p[1] for p in pairs
    ]


def test_the_download_command_is_listed():
    done = subprocess.run(
        [sys.executable, "-m", "alma_r.cli", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert re.search(r"^\s+download\s+fetch the models", done.stdout, re.M), done.stdout


def test_pin_writes_the_config_with_every_revision_at_its_commit(paper_cache, hf_home, tmp_path):
    from alma_r.config import load_config

    _, written = paper_cache
    pinned = tmp_path / "pinned.yaml"
    done = download(PAPER, hf_home, "--pin", str(pinned))
    assert done.returncode == 0, done.stderr
    cfg = load_config(pinned)
    assert cfg.model.revision == written[BASE][SAFETENSORS_REVISION]
    assert cfg.model.adapter_revision == written[ADAPTER]["main"]
    for metric in ("kiwi_22", "kiwi_xxl", "xcomet_xxl", "comet_22"):
        spec = cfg.score.comet_models[metric]
        assert spec.revision == written[spec.model]["main"], metric
    assert {s.dataset: s.revision for s in cfg.ingest.sources} == {
        repo_id: written[repo_id]["main"] for repo_id in DATASETS
    }
    again = download(pinned, hf_home)  # the pinned config resolves offline, commit by commit
    assert again.returncode == 0, again.stderr
    rows = table(again.stdout)
    assert all(row["revision"] == row["commit"] for (kind, _), row in rows.items() if kind != "encoder")


def test_pin_is_not_written_when_an_item_is_missing(paper_cache, hf_home, tmp_path):
    shutil.rmtree(repo_folder(hf_home, "haoranxu/WMT23-Test", "dataset"))
    pinned = tmp_path / "pinned.yaml"
    done = download(PAPER, hf_home, "--pin", str(pinned))
    assert done.returncode == 1 and not pinned.exists()
