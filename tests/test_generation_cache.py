"""The generation cache (models/generate/cache.py) and the generate stage on top of it: a key per model content,
prompt, decoding, sample and seed; per-segment seeds, so that a segment's samples do not depend on the batch;
a rerun on grown data generates only the new segments; a killed stage keeps what it generated."""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest

from alma_r.config import load_config
from alma_r.data.hub import HubError
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, SEGMENTS
from alma_r.models.generate.cache import (
    Generation,
    GenerationCache,
    generation_key,
    segment_seed,
)
from alma_r.models.generate.hf_backend import Decoding, generate_translations, sample_translations
from alma_r.models.generate.vllm_backend import (
    MAKE_TARGET,
    VllmJob,
    default_vllm_python,
    generate_jobs_with_vllm,
)
from alma_r.models.loading import ModelNotFoundError, load_model, load_tokenizer
from alma_r.models.prompts import make_prompt
from alma_r.tasks import generate as stage
from alma_r.tasks.generate import generation_cache_path, run_generate
from tests.test_generate_stage import training_segments

SEGS = training_segments(8)
GREEDY = "{name: greedy, max_new_tokens: 8}"
SAMPLED = "{name: s, do_sample: true, n: 2, max_new_tokens: 8}"


def segments(path: Path, rows: list[dict]) -> Path:
    return write_table(rows, path, SEGMENTS)


def config(root: Path, *systems: str, batch_size: int = 16, limit: int = 1000, **more: str):
    overrides = [
        f"generate.systems=[{', '.join(systems)}]",
        f"generate.batch_size={batch_size}",
        f"generate.max_prompt_tokens={limit}",
        f"run.root={root}",
        *(f"{k.replace('__', '.')}={v}" for k, v in more.items()),
    ]
    return load_config(overrides=overrides)


def hypotheses(outputs: dict, name: str) -> dict[str, str]:
    return {r["segment_id"]: r["hypothesis"] for r in read_rows(outputs[f"candidates/{name}"], CANDIDATES)}


def no_model_loads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the cache holds every generation")

    monkeypatch.setattr(stage, "load_model", refuse)
    monkeypatch.setattr(stage, "load_tokenizer", refuse)


# ------------------------------------------------------------------------------------------------ the cache


MODEL = {"model": {"files": "ab" * 32}, "adapter": None, "dtype": "float32"}
SETTINGS = {
    "num_beams": 1,
    "do_sample": True,
    "max_new_tokens": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
}


def test_a_key_changes_with_everything_the_text_depends_on(tmp_path):
    base = dict(model=MODEL, backend="hf", prompt="Translate: Hallo", settings=SETTINGS, k=0, seed=7)
    key = generation_key(**base)
    assert generation_key(**base) == key
    others = [
        {"prompt": "Translate: Hallo!"},
        {"model": {**MODEL, "model": {"files": "cd" * 32}}},
        {"model": {**MODEL, "adapter": {"files": "ef" * 32}}},
        {"model": {**MODEL, "dtype": "bfloat16"}},
        {"backend": "vllm"},
        {"settings": {**SETTINGS, "temperature": 0.7}},
        {"settings": {**SETTINGS, "max_new_tokens": 9}},
        {"k": 1},
        {"seed": 8},
    ]
    assert len({key, *(generation_key(**{**base, **o}) for o in others)}) == len(others) + 1

    cache = GenerationCache(tmp_path / "generations.sqlite")
    cache.put_many({key: Generation("Hello", 5), "marker": Generation(None, 300)})
    again = GenerationCache(tmp_path / "generations.sqlite")  # another process, later
    assert again.get_many([key, "marker", "absent"]) == {
        key: Generation("Hello", 5),
        "marker": Generation(None, 300),
    }


def test_segment_seeds_depend_on_the_run_seed_the_segment_and_k_only():
    ids = [f"hw:de-en:{i}" for i in range(200)]
    seeds = {segment_seed(42, s, k) for s in ids for k in range(4)}
    assert len(seeds) == 800  # no two samples share a stream
    assert (
        segment_seed(42, ids[3], 2) == segment_seed(42, ids[3]) + 2
    )  # vLLM's seed, seed+1, ... of n samples
    assert segment_seed(43, ids[3]) != segment_seed(42, ids[3])
    assert all(0 <= s < 2**63 for s in seeds)  # a torch and a vLLM seed


def test_a_model_is_known_by_its_content_not_its_path(tmp_path, tiny_model_dir):
    cache = GenerationCache(tmp_path / "generations.sqlite")
    original = cache.model_fingerprint(str(tiny_model_dir), None, "float32")
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert cache.model_fingerprint(str(copy), None, "float32") == original
    assert cache.model_fingerprint(str(copy), str(copy), "float32") != original  # with an adapter
    assert cache.model_fingerprint(str(copy), None, "bfloat16") != original
    config_file = copy / "config.json"
    config_file.write_text(config_file.read_text().replace("}", ', "retrained": 1}', 1))
    assert cache.model_fingerprint(str(copy), None, "float32") != original
    with pytest.raises(ModelNotFoundError):
        cache.model_fingerprint(str(tmp_path / "nowhere"), None, "float32")
    # Offline (conftest sets HF_HUB_OFFLINE) and not in the Hub cache: no commit, so no key, one line.
    with pytest.raises(HubError, match=r"^model nobody/no-such-model@main: cannot resolve") as err:
        cache.model_fingerprint("nobody/no-such-model", None, "float32")
    assert "\n" not in str(err.value)


def test_seeded_sampling_draws_from_the_distribution_sampling_would(tiny_model_dir):
    """Top-1 sampling is greedy decoding: the per-row draw comes after the warpers (one row per prompt here, the
    shapes greedy decoding with batch size 1 has, so not even rounding differs)."""
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [make_prompt(s["src"], "de", "en") for s in SEGS[:3]]
    greedy = generate_translations(model, tokenizer, prompts, Decoding(max_new_tokens=8), 1, 1000)
    top1 = Decoding(do_sample=True, top_k=1, max_new_tokens=8)
    assert sample_translations(model, tokenizer, prompts, [[5], [6], [7]], top1, 1000) == [
        [g] for g in greedy
    ]
    full = Decoding(do_sample=True, top_k=0, max_new_tokens=8)
    again = sample_translations(model, tokenizer, prompts, [[5, 6]] * 3, full, 1000)
    assert again == sample_translations(model, tokenizer, prompts, [[5, 6]] * 3, full, 1000)  # seeded
    assert [s[0] for s in again] != greedy


# ----------------------------------------------------------------------------------------- the stage


def test_batch_size_reuses_a_generation_and_a_decoding_setting_does_not(
    tmp_path, tiny_model_dir, monkeypatch
):
    path = segments(tmp_path / "segments.parquet", SEGS[:5])
    root = tmp_path / "runs"
    first, counts = run_generate(
        config(root, GREEDY, SAMPLED, batch_size=2), path, str(tiny_model_dir), None, tmp_path / "a"
    )
    assert (counts["generated"], counts["from_cache"]) == (15, 0)
    assert generation_cache_path(config(root)).is_file()
    with monkeypatch.context() as patched:
        no_model_loads(patched)
        again, counts = run_generate(
            config(root, GREEDY, SAMPLED, batch_size=5), path, str(tiny_model_dir), None, tmp_path / "b"
        )
    assert (counts["generated"], counts["from_cache"]) == (0, 15)
    assert counts["greedy/from_cache"] == counts["s-1/from_cache"] == counts["s-2/from_cache"] == 5
    for name in ("greedy", "s-1", "s-2"):
        assert read_rows(again[f"candidates/{name}"], CANDIDATES) == read_rows(
            first[f"candidates/{name}"], CANDIDATES
        )
    longer = "{name: greedy, max_new_tokens: 9}"
    _, counts = run_generate(config(root, longer), path, str(tiny_model_dir), None, tmp_path / "c")
    assert (counts["greedy/generated"], counts["greedy/from_cache"]) == (5, 0)
    _, counts = run_generate(
        config(root, SAMPLED, run__seed=7), path, str(tiny_model_dir), None, tmp_path / "d"
    )
    assert (counts["generated"], counts["from_cache"]) == (10, 0)  # other seeds, other samples


def test_a_segments_samples_do_not_depend_on_the_batch_or_its_order(tmp_path, tiny_model_dir):
    a, b, c = SEGS[:3]
    abc = segments(tmp_path / "abc.parquet", [a, b, c])
    ca = segments(tmp_path / "ca.parquet", [c, a])
    # Two roots: two empty caches, so both runs generate.
    cfg = config(tmp_path / "r1", SAMPLED, batch_size=3)
    first, counts1 = run_generate(cfg, abc, str(tiny_model_dir), None, tmp_path / "o1")
    second, counts2 = run_generate(
        config(tmp_path / "r2", SAMPLED, batch_size=1), ca, str(tiny_model_dir), None, tmp_path / "o2"
    )
    assert counts1["generated"] == 6 and counts2["generated"] == 4 and counts2["from_cache"] == 0
    for name in ("s-1", "s-2"):
        one, two = hypotheses(first, name), hypotheses(second, name)
        assert {i: one[i] for i in (a["id"], c["id"])} == two
    # Not one stream for all: the two samples of a segment differ somewhere.
    assert hypotheses(first, "s-1") != hypotheses(first, "s-2")
    # Sample k of a segment is the one its seed segment_seed(run.seed, id, k) draws.
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    seeds = [segment_seed(cfg.run.seed, b["id"], k) for k in (0, 1)]
    sampled = Decoding(do_sample=True, max_new_tokens=8)
    [alone] = sample_translations(
        model, tokenizer, [make_prompt(b["src"], "de", "en")], [seeds], sampled, 1000
    )
    assert alone == [hypotheses(first, "s-1")[b["id"]], hypotheses(first, "s-2")[b["id"]]]


def test_a_rerun_on_grown_data_generates_only_the_new_segments(tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    small = segments(tmp_path / "small.parquet", SEGS[:5])
    grown = segments(tmp_path / "grown.parquet", SEGS[:8])  # the first five unchanged, three appended
    first, counts = run_generate(
        config(root, GREEDY, SAMPLED), small, str(tiny_model_dir), None, tmp_path / "a"
    )
    assert counts["generated"] == 15
    second, counts = run_generate(
        config(root, GREEDY, SAMPLED), grown, str(tiny_model_dir), None, tmp_path / "b"
    )
    for name in ("greedy", "s-1", "s-2"):
        assert (counts[f"{name}/generated"], counts[f"{name}/from_cache"]) == (3, 5)
        old, new = hypotheses(first, name), hypotheses(second, name)
        assert {i: new[i] for i in old} == old
        rows = read_rows(second[f"candidates/{name}"], CANDIDATES)
        assert [r["segment_id"] for r in rows] == [s["id"] for s in SEGS[:8]]  # the sources' order
    assert (counts["generated"], counts["from_cache"], counts["sources"]) == (9, 15, 8)


class Killed(Exception):
    pass


@pytest.mark.parametrize("system", [GREEDY, "{name: s, do_sample: true, n: 2, max_new_tokens: 8}"])
def test_a_killed_stage_keeps_what_it_generated(tmp_path, tiny_model_dir, monkeypatch, system):
    """Killed after the first batch (greedy: 2 prompts; sampling: one prompt's samples): the rerun generates
    only the rest."""
    path = segments(tmp_path / "segments.parquet", SEGS[:5])
    cfg = config(tmp_path / "runs", system, batch_size=2)
    with monkeypatch.context() as patched:
        for name in ("generate_translations", "sample_translations"):
            real = getattr(stage, name)
            key = "on_batch" if name == "generate_translations" else "on_prompt"

            def dying(*args, real=real, key=key, **kwargs):
                keep = kwargs[key]

                def then_die(*done):
                    keep(*done)
                    raise Killed

                return real(*args, **{**kwargs, key: then_die})

            patched.setattr(stage, name, dying)
        with pytest.raises(Killed):
            run_generate(cfg, path, str(tiny_model_dir), None, tmp_path / "a")
    _, counts = run_generate(cfg, path, str(tiny_model_dir), None, tmp_path / "b")
    if system == GREEDY:
        assert (counts["greedy/generated"], counts["greedy/from_cache"]) == (3, 2)
    else:
        assert (counts["s-1/generated"], counts["s-1/from_cache"]) == (4, 1)
        assert (counts["s-2/generated"], counts["s-2/from_cache"]) == (4, 1)


def test_a_prompt_over_the_limit_is_remembered_as_skipped(tmp_path, tiny_model_dir, monkeypatch):
    path = segments(tmp_path / "segments.parquet", SEGS[:5])
    root = tmp_path / "runs"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    lengths = sorted(
        len(tokenizer(make_prompt(s["src"], "de", "en"), add_special_tokens=False)["input_ids"])
        for s in SEGS[:5]
    )
    limit = lengths[2]  # the two longest prompts are over it
    _, first = run_generate(
        config(root, GREEDY, limit=limit), path, str(tiny_model_dir), None, tmp_path / "a"
    )
    skipped = first["greedy/skipped_prompt_too_long"]
    assert skipped == sum(n > limit for n in lengths) >= 1 and first["greedy/generated"] == 5 - skipped
    with monkeypatch.context() as patched:
        no_model_loads(patched)  # skipped again, from the cache's marker
        _, again = run_generate(
            config(root, GREEDY, limit=limit), path, str(tiny_model_dir), None, tmp_path / "b"
        )
    assert again["greedy/skipped_prompt_too_long"] == skipped
    assert (again["greedy/generated"], again["greedy/from_cache"]) == (0, 5 - skipped)
    # A higher limit generates the skipped prompts, and only those; a lower one skips cached texts.
    _, higher = run_generate(config(root, GREEDY), path, str(tiny_model_dir), None, tmp_path / "c")
    assert (higher["greedy/generated"], higher["greedy/from_cache"]) == (skipped, 5 - skipped)
    with monkeypatch.context() as patched:
        no_model_loads(patched)
        _, lower = run_generate(
            config(root, GREEDY, limit=8), path, str(tiny_model_dir), None, tmp_path / "d"
        )
    assert (lower["greedy/skipped_prompt_too_long"], lower["greedy/from_cache"]) == (5, 0)


# ------------------------------------------------------------- the vLLM path of the stage, with a stand-in worker

FAKE_WORKER = """#!{python}
# A stand-in for the vLLM worker: the same request and output files; each prompt's "tokens" come from its seed
# (sampling) or its first prompt token (greedy). It records the requests and fails after FAKE_FAIL_AFTER jobs.
import json, os, sys
request = json.loads(open(sys.argv[2]).read())
with open(os.environ["FAKE_REQUESTS"], "a") as log:
    log.write(json.dumps(request) + "\\n")
fail_after = int(os.environ.get("FAKE_FAIL_AFTER", "-1"))
with open(sys.argv[3] + ".partial", "w") as out:
    for j, job in enumerate(request["jobs"]):
        if j == fail_after:
            sys.exit(3)
        outputs = []
        n = job["n"]
        for i, ids in enumerate(job["prompts"]):
            if "seeds" in job:
                first = [(job["seeds"][i] + s) % 300 + 5 for s in range(n)]
            else:
                first = [ids[0]] * n
            token_ids = [[t, t + 1] for t in first]
            outputs.append({{"texts": [""] * n, "token_ids": token_ids, "finish_reasons": ["length"] * n}})
        out.write(json.dumps({{"job": j, "outputs": outputs}}) + "\\n")
        out.flush()
os.replace(sys.argv[3] + ".partial", sys.argv[3])
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> tuple[Path, Path]:
    python = tmp_path / "fake-vllm" / "python"
    python.parent.mkdir()
    python.write_text(FAKE_WORKER.format(python=sys.executable), encoding="utf-8")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_REQUESTS", str(requests))
    monkeypatch.setattr(stage, "VLLM_JOB_PROMPTS", 2)  # jobs of two prompts: a few prompts make several jobs
    return python, requests


def test_vllm_samples_are_seeded_by_segment_and_cached_job_by_job(
    tmp_path, tiny_model_dir, monkeypatch, fake_vllm
):
    python, requests = fake_vllm
    path = segments(tmp_path / "segments.parquet", SEGS[:3])
    vllm = f"{{name: v, backend: vllm, vllm_python: '{python}', do_sample: true, n: 2, max_new_tokens: 8}}"
    cfg = config(tmp_path / "runs", vllm)
    monkeypatch.setenv("FAKE_FAIL_AFTER", "2")  # killed after two jobs: four of the six samples
    with pytest.raises(RuntimeError, match="the vLLM worker failed"):
        run_generate(cfg, path, str(tiny_model_dir), None, tmp_path / "a")
    sent = json.loads(requests.read_text().splitlines()[0])
    # One request per (segment, sample), seeded by the segment's id and k, whatever its place in the list.
    assert [job["n"] for job in sent["jobs"]] == [1, 1, 1]
    assert [s for job in sent["jobs"] for s in job["seeds"]] == [
        segment_seed(cfg.run.seed, s["id"], k) for s in SEGS[:3] for k in range(2)
    ]
    monkeypatch.delenv("FAKE_FAIL_AFTER")
    outputs, counts = run_generate(cfg, path, str(tiny_model_dir), None, tmp_path / "b")
    assert (counts["v-1/generated"], counts["v-1/from_cache"]) == (1, 2)
    assert (counts["v-2/generated"], counts["v-2/from_cache"]) == (1, 2)
    rerun = json.loads(requests.read_text().splitlines()[1])
    assert [s for job in rerun["jobs"] for s in job["seeds"]] == [
        segment_seed(cfg.run.seed, SEGS[2]["id"], k) for k in range(2)
    ]
    assert len(hypotheses(outputs, "v-1")) == len(hypotheses(outputs, "v-2")) == 3


def test_vllm_greedy_asks_n_outputs_of_each_missing_prompt_once(tmp_path, tiny_model_dir, fake_vllm):
    python, requests = fake_vllm
    root = tmp_path / "runs"
    beam = f"{{name: b, backend: vllm, vllm_python: '{python}', num_beams: 2, n: 2, max_new_tokens: 8}}"
    run_generate(
        config(root, beam),
        segments(tmp_path / "s.parquet", SEGS[:3]),
        str(tiny_model_dir),
        None,
        tmp_path / "a",
    )
    _, counts = run_generate(
        config(root, beam),
        segments(tmp_path / "g.parquet", SEGS[:5]),
        str(tiny_model_dir),
        None,
        tmp_path / "b",
    )
    assert (counts["b-1/generated"], counts["b-1/from_cache"]) == (2, 3)
    first, second = (json.loads(line) for line in requests.read_text().splitlines())
    assert [len(job["prompts"]) for job in first["jobs"]] == [2, 1]
    assert [len(job["prompts"]) for job in second["jobs"]] == [2]  # the two new segments only
    assert all(job["n"] == 2 and job["beam_width"] == 2 for job in first["jobs"] + second["jobs"])


# ----------------------------------------------------------------------------- vLLM itself (.venv-vllm)

VLLM_PYTHON = default_vllm_python()
needs_vllm = pytest.mark.skipif(
    not (Path(VLLM_PYTHON).parent.parent / ".ready").is_file(),
    reason=f"no vLLM environment ({VLLM_PYTHON}): build it with `{MAKE_TARGET}`",
)


@needs_vllm
def test_vllm_samples_seeded_by_segment_do_not_depend_on_the_other_prompts_or_their_order(
    tmp_path, tiny_model_dir
):
    a, b, c = SEGS[:3]
    prompts = [make_prompt(s["src"], "de", "en") for s in (a, b, c)]
    seeds = tuple(segment_seed(42, s["id"]) for s in (a, b, c))
    sample = Decoding(do_sample=True, temperature=1.0, top_p=0.9, max_new_tokens=16)
    jobs = [
        VllmJob(sample, n=2, seeds=seeds),  # a, b, c
        VllmJob(sample, n=2, prompts=(2, 0), seeds=seeds),  # c, a
        # sample k of a segment alone, seeded seed + k: the stage's one-sample requests
        VllmJob(sample, n=1, prompts=(0,), seeds=tuple(s + 1 for s in seeds)),
    ]
    finished = []
    abc, ca, a_second = generate_jobs_with_vllm(
        VLLM_PYTHON,
        str(tiny_model_dir),
        None,
        prompts,
        jobs,
        256,
        load_tokenizer(str(tiny_model_dir)),
        kv_cache_memory_bytes=256 * 2**20,
        env={"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")},
        log_path=tmp_path / "vllm.log",
        on_job=lambda j, outputs: finished.append(j),
    )
    assert finished == [0, 1, 2]  # handed over job by job
    assert ca == [abc[2], abc[0]]
    assert a_second == [[abc[0][1]]]
    assert len({tuple(o) for o in abc}) == 3 and any(len(set(o)) == 2 for o in abc)  # not one stream for all
