"""COMET scoring (models/score/comet_scorer.py) equals `comet-score` on tiny offline checkpoints of the paper's three
model families: reference-based regression (wmt22-comet-da), CometKiwi, and XCOMET with and without a reference.

The CLI runs in one subprocess, started as soon as the checkpoints exist and read at the end, so COMET's ~5 s
import is paid once there and overlaps the in-process tests.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from alma_r.config import SAMPLE_DIR
from alma_r.data.hub import HubError
from alma_r.models.score.comet_scorer import CometResult, CometScorer
from alma_r.models.score.tiny_comet import KINDS, build_tiny_comet

N = 20  # real WMT'22 de->en segments; one more with an empty translation is appended
SRC = SAMPLE_DIR / "wmt22/deen/test.de-en.de"
MT = SAMPLE_DIR / "alma13br/deen/test.de-en.en"
REF = SAMPLE_DIR / "wmt22/deen/test.de-en.en"
BATCH = 8
RUNS = {"regression": ("regression", True), "kiwi": ("kiwi", False), "xcomet": ("xcomet", True)}
RUNS["xcomet-noref"] = ("xcomet", False)

# What the `comet-score` console script runs (`from comet.cli.score import score_command`), once per argv.
CLI_RUNNER = """
import json, sys
from comet.cli.score import score_command
for argv in json.loads(sys.argv[1]):
    sys.argv = ["comet-score", *argv]
    score_command()
"""


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@dataclass
class CliRun:
    proc: subprocess.Popen
    log: Path
    jsons: dict[str, Path]

    def results(self) -> dict[str, list[dict]]:
        """Per run, the CLI's segments from --to_json (full precision; stdout has 4 decimals), checked
        against the printed scores."""
        assert self.proc.wait(timeout=180) == 0, self.log.read_text(encoding="utf-8")[-3000:]
        printed = re.findall(r"Segment (\d+)\tscore: (-?\d+\.\d+)", self.log.read_text(encoding="utf-8"))
        out = {}
        for name, path in self.jsons.items():
            (segments,) = json.loads(path.read_text(encoding="utf-8")).values()
            out[name] = segments
        flat = [round(s["COMET"], 4) for name in self.jsons for s in out[name]]
        assert [float(score) for _, score in printed] == pytest.approx(flat, abs=1.1e-4)
        return out


@dataclass
class Tiny:
    checkpoints: dict[str, Path]
    items: list[dict]
    cli: CliRun


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The three tiny checkpoints, the inputs as files, and the CLI scoring them in the background."""
    root = tmp_path_factory.mktemp("comet")
    texts = [line for path in sorted((SAMPLE_DIR / "wmt22").glob("*/test.*")) for line in lines(path)]
    checkpoints = {kind: build_tiny_comet(root / kind, kind, texts) for kind in KINDS}

    src, mt, ref = (lines(p)[: N + 1] for p in (SRC, MT, REF))
    mt[N] = ""  # an empty translation is scored, not crashed on
    items = [{"src": s, "mt": t, "ref": r} for s, t, r in zip(src, mt, ref, strict=True)]
    for name, column in (("src", src), ("mt", mt), ("ref", ref)):
        (root / name).write_text("".join(f"{x.strip()}\n" for x in column), encoding="utf-8")

    argvs, jsons = [], {}
    for name, (kind, with_ref) in RUNS.items():
        jsons[name] = root / f"{name}.json"
        argv = ["-s", str(root / "src"), "-t", str(root / "mt"), "--model", str(checkpoints[kind])]
        argv += ["-r", str(root / "ref")] if with_ref else []
        argvs.append(
            argv + ["--gpus", "0", "--batch_size", str(BATCH), "--quiet", "--to_json", str(jsons[name])]
        )
    log = root / "cli.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_RUNNER, json.dumps(argvs)], stdout=sink, stderr=subprocess.STDOUT
        )
    yield Tiny(checkpoints, items, CliRun(proc, log, jsons))
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def scorer(checkpoint: Path, **kwargs) -> CometScorer:
    return CometScorer(str(checkpoint), **{"batch_size": BATCH, "gpus": 0, "progress_bar": False, **kwargs})


def test_build_is_seeded_and_fast(tiny, tmp_path):
    import time

    texts = [item["src"] for item in tiny.items] + [item["ref"] for item in tiny.items]
    start = time.perf_counter()
    a = build_tiny_comet(tmp_path / "a", "xcomet", texts, seed=3)
    elapsed = time.perf_counter() - start
    b = build_tiny_comet(tmp_path / "b", "xcomet", texts, seed=3)
    c = build_tiny_comet(tmp_path / "c", "xcomet", texts, seed=4)
    sa, sb, sc = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (tmp_path / "a" / "encoder" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "encoder" / "tokenizer.json"
    ).read_bytes()
    assert elapsed < 2.0  # ~0.1 s once COMET is imported
    with pytest.raises(ValueError, match="unknown tiny COMET kind"):
        build_tiny_comet(tmp_path / "d", "ranking", texts)


def test_reference_handling(tiny):
    ckpt = tiny.checkpoints
    assert scorer(ckpt["regression"]).uses_reference is True
    assert scorer(ckpt["kiwi"]).uses_reference is False
    assert scorer(ckpt["xcomet"]).uses_reference is True
    assert scorer(ckpt["xcomet"], reference=False).uses_reference is False
    assert scorer(ckpt["xcomet"], reference=False).signature == f"{ckpt['xcomet']}|ref:no"
    assert scorer(ckpt["xcomet"]).signature == scorer(ckpt["xcomet"]).model_id == str(ckpt["xcomet"])
    with pytest.raises(ValueError, match="takes no reference"):
        _ = scorer(ckpt["kiwi"], reference=True).model
    with pytest.raises(ValueError, match="needs a reference"):
        _ = scorer(ckpt["regression"], reference=False).model
    with pytest.raises(ValueError, match=r"item 1 has no string \['ref'\]"):
        scorer(ckpt["regression"]).score([tiny.items[0], {"src": "a", "mt": "b"}])
    assert scorer(ckpt["regression"]).score([]) == []


def test_model_folder_and_defaults(tiny):
    folder = tiny.checkpoints["kiwi"].parents[1]
    s = CometScorer(str(folder), progress_bar=False)
    assert s.gpus == (1 if torch.cuda.is_available() else 0)
    assert s.fp16 is (s.gpus == 1)  # fp16 on GPU only
    if s.gpus == 0:
        assert next(s.model.parameters()).dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="no checkpoints/model.ckpt"):
        _ = CometScorer(str(folder / "encoder")).model
    with pytest.raises(ValueError, match="one device at most"):
        CometScorer(str(folder), gpus=2)


def test_loads_once_and_counts_work(tiny, monkeypatch):
    import comet

    loads = []
    real = comet.load_from_checkpoint
    monkeypatch.setattr(
        comet, "load_from_checkpoint", lambda path, **kw: loads.append(path) or real(path, **kw)
    )
    s = scorer(tiny.checkpoints["regression"])
    assert s.uses_reference and not scorer(tiny.checkpoints["kiwi"]).uses_reference
    assert loads == []  # read from hparams.yaml: a fully cached run never loads the weights
    first = s.score(tiny.items[:5])
    second = s.score(tiny.items[:5])
    assert len(loads) == 1
    assert s.segments_scored == 10
    assert first == second


def test_empty_translation_is_scored(tiny):
    item = tiny.items[N]
    assert item["mt"] == ""
    for kind in KINDS:
        (result,) = scorer(tiny.checkpoints[kind]).score([item])
        assert math.isfinite(result.score)


def test_non_finite_score_names_item_and_model(tiny, monkeypatch):
    from comet.models.utils import Prediction

    s = scorer(tiny.checkpoints["kiwi"])
    nan = float("nan")
    monkeypatch.setattr(s.model, "predict", lambda samples, **kw: Prediction(scores=[0.5, nan, 0.5]))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(tiny.checkpoints['kiwi']))} gave item 1 a non-finite"
    ):
        s.score(tiny.items[:3])
    monkeypatch.setattr(s.model, "predict", lambda samples, **kw: Prediction(scores=[0.5, 0.5, float("inf")]))
    with pytest.raises(ValueError, match="gave item 2 a non-finite score"):
        s.score(tiny.items[:3])


def test_bad_hub_id_says_why(monkeypatch):
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_HUB_OFFLINE", True
    )  # read at import; conftest sets it too
    with pytest.raises(HubError) as raised:
        _ = CometScorer("Unbabel/does-not-exist", gpus=0).model
    message = str(raised.value)
    assert "not supported by COMET" not in message
    assert "Unbabel/does-not-exist" in message and "LocalEntryNotFoundError" in message


def test_a_hub_revision_is_resolved_to_its_commit_which_keys_the_scores(tiny, tmp_path, monkeypatch):
    from alma_r.models.score.cache import ScoreCache
    from alma_r.tasks.shared.scoring import resolved_records, score_items
    from tests.hub_cache import folder_files, put_snapshot

    # hparams.yaml, checkpoints/model.ckpt and encoder/, as two revisions of one repository
    files = folder_files(tiny.checkpoints["kiwi"].parents[1])
    main = put_snapshot(tmp_path, "Unbabel/tiny-kiwi", files)
    v2 = put_snapshot(tmp_path, "Unbabel/tiny-kiwi", files | {"README.md": "v2"}, revision="v2")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    at_main, at_v2 = scorer("Unbabel/tiny-kiwi"), scorer("Unbabel/tiny-kiwi", revision="v2")
    assert at_main.model_id == f"Unbabel/tiny-kiwi@{main}" and at_v2.signature == f"Unbabel/tiny-kiwi@{v2}"
    assert not at_main.uses_reference and at_main._checkpoint is None  # from hparams.yaml: no checkpoint yet
    snapshot = tmp_path / "hub" / "models--Unbabel--tiny-kiwi" / "snapshots"
    assert at_main.checkpoint == snapshot / main / "checkpoints" / "model.ckpt"
    assert (at_v2.resolved.revision, at_v2.resolved.commit) == ("v2", v2)
    assert resolved_records([at_main, at_v2, at_main]) == [at_main.resolved.record(), at_v2.resolved.record()]

    # Scores cached for one revision are never handed to another, even of the same files.
    segments = [
        {"id": f"s{i}", "lp": "de-en", "src": it["src"], "ref": it["ref"]} for i, it in enumerate(tiny.items)
    ]
    items = [(seg, "sys", it["mt"], []) for seg, it in zip(segments[:3], tiny.items[:3], strict=True)]
    cache, counts = ScoreCache(tmp_path / "scores.sqlite"), {}
    first = score_items(at_main, "kiwi", items, cache, counts)
    second = score_items(at_v2, "kiwi", items, cache, counts)
    assert counts["kiwi/from_cache"] == 0 and counts["kiwi/scored"] == 6
    assert {r["model_id"] for r in first} == {at_main.model_id}
    local = scorer(tiny.checkpoints["kiwi"]).score([{"src": s["src"], "mt": t} for s, _, t, _ in items])
    assert [r["score"] for r in first] == [r["score"] for r in second] == [r.score for r in local]


def test_moved_checkpoint_says_so(tiny, tmp_path):
    texts = [item["src"] for item in tiny.items]
    build_tiny_comet(tmp_path / "here", "kiwi", texts)
    (tmp_path / "here").rename(tmp_path / "there")
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        _ = CometScorer(str(tmp_path / "there")).model
    with pytest.raises(FileNotFoundError, match="no COMET checkpoint"):
        _ = CometScorer(str(tmp_path / "nowhere" / "model.ckpt")).model


@pytest.mark.parametrize("run", list(RUNS))
def test_scores_equal_the_cli(tiny, run):
    """Same checkpoint, inputs, batch size and precision (the CLI halves the model even on CPU) as comet-score:
    segment scores within 1e-6, and XCOMET's error spans identical."""
    kind, with_ref = RUNS[run]
    cli = tiny.cli.results()[run]
    s = scorer(tiny.checkpoints[kind], fp16=True, reference=None if with_ref else False)
    items = tiny.items if with_ref else [{"src": i["src"], "mt": i["mt"]} for i in tiny.items]
    results = s.score(items)
    assert len(results) == len(cli) == N + 1
    assert [r.score for r in results] == pytest.approx([c["COMET"] for c in cli], abs=1e-6, rel=0)
    assert len({round(r.score, 6) for r in results}) > N // 2  # the scores do differ between segments
    if kind != "xcomet":
        assert all(r.error_spans is None for r in results)
        return
    assert all(isinstance(r.error_spans, list) for r in results)
    assert sum(len(r.error_spans) for r in results) > 0
    for result, segment in zip(results, cli, strict=True):
        expected = segment.get("errors", [])  # the CLI leaves out empty span lists
        assert [{k: v for k, v in e.items() if k != "confidence"} for e in result.error_spans] == [
            {k: v for k, v in e.items() if k != "confidence"} for e in expected
        ]
        assert [e["confidence"] for e in result.error_spans] == pytest.approx(
            [e["confidence"] for e in expected], abs=1e-6
        )


def test_fp32_default_on_cpu_is_close_to_the_fp16_cli(tiny):
    cli = tiny.cli.results()["regression"]
    results = scorer(tiny.checkpoints["regression"]).score(tiny.items)
    assert all(isinstance(r, CometResult) for r in results)
    assert [r.score for r in results] == pytest.approx([c["COMET"] for c in cli], abs=5e-3)
