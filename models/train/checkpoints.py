"""Training checkpoints: the fingerprint of what decides a run's result, the refusal to continue another run's
checkpoint, setting checkpoints aside, the RNG states and the checkpoint folder itself.

A checkpoint continues only the run that wrote it: the same base model and adapter (models/weights.py's
weights_fingerprint: by content for local folders, by Hub repository and commit otherwise), the same pairs (their
text, in order), the same result-affecting settings (TrainSettings.identity with the seed, dtype and
trust_remote_code) and the same number of processes (with the per-device batch_size, it fixes each optimizer
step's pairs). Its fingerprint is the hash of those parts, and the parts are stored beside it, readable, so that a
refusal can name the first one that differs. What changes no result (logging and checkpoint cadence, the code) is
in none of them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alma_r.data.digests import json_sha256
from alma_r.data.files import SUPERSEDED
from alma_r.models.result_fields import flat_settings

TRAINER_STATE = "trainer_state.pt"
WEIGHTS = "trainable.safetensors"
FINGERPRINT = (
    "fingerprint.json"  # the fingerprint and its parts again, for people (trainer_state.pt has them)
)
REFERENCE_CACHE = "reference_logps-*.safetensors"
START_OVER_HINT = "use a new --output folder, or --restart to set these checkpoints aside"


class CheckpointMismatch(ValueError):
    """A checkpoint written by another run (other model, pairs, settings or process count): continuing it would
    train something that is neither run, so the recipe refuses instead of resuming or starting over."""


# ------------------------------------------------------------------------------------------------ fingerprint
def pairs_digest(pairs: list[dict]) -> str:
    """The text the recipe trains on: prompt, chosen and rejected of every row, in order, and a row's weight
    where it is not 1 (so that the digest of unweighted pairs is what it was before pairs had weights)."""
    digest = hashlib.sha256()
    for row in pairs:
        fields = [row["prompt"], row["chosen"], row.get("rejected")]
        if row.get("weight") not in (None, 1.0):
            fields.append(float(row["weight"]))
        digest.update(json.dumps(fields, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]


def result_parts(
    model: str | None, adapter: str | None, pairs_digest: str, identity: dict, world_size: int
) -> dict:
    """What decides a checkpoint's result, flat and readable: model, adapter, the pairs' digest, every
    result-affecting setting (dotted names for nested ones: lora.r; batch_size is the per-device batch) and
    the number of processes."""
    return {
        "model": model,
        "adapter": adapter,
        "pairs digest": pairs_digest,
        **flat_settings(identity),
        "world_size": world_size,
    }


def fingerprint(parts: dict) -> str:
    return json_sha256(parts)[:16]


def reference_fingerprint(parts: dict) -> str:
    """The key of the DPO reference log-probs: every process scores every pair, so the process count is no part
    of them; the batch size is (the pairs are scored in batch_size chunks, padded per chunk)."""
    return fingerprint({k: v for k, v in parts.items() if k != "world_size"})


# ------------------------------------------------------------------------------------------------ refusal
def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def first_difference(theirs: dict, ours: dict) -> tuple[str, Any, Any] | None:
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        if theirs.get(key) != ours.get(key):
            return key, theirs.get(key), ours.get(key)
    return None


def check_resumable(ckpt: Path, state: dict, parts: dict, start_over_hint: str) -> None:
    """Raises CheckpointMismatch, in one line naming the checkpoint and the first differing part, unless the
    checkpoint's fingerprint is that of `parts`."""
    now = fingerprint(parts)
    if state.get("fingerprint") == now:
        return
    found = first_difference(state["parts"], parts) if "parts" in state else None
    # A checkpoint written before checkpoints recorded their parts can only be told apart by its hash.
    field = (
        "result fingerprint" if "parts" in state else "result fingerprint (the checkpoint records no parts)"
    )
    field, then, ours = found or (field, state.get("fingerprint"), now)
    raise CheckpointMismatch(
        f"{ckpt}: a checkpoint of another run: {field} {_shown(then)} (checkpoint) vs {_shown(ours)} (now); "
        f"{start_over_hint}"
    )


# ------------------------------------------------------------------------------------------------ folders
def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def set_aside(out_dir: Path) -> Path | None:
    """Move `out_dir/checkpoints` to `out_dir/.superseded/checkpoints-<UTC time>/` with the DPO reference caches
    and the metrics log beside its step folders (never deleted); returns that folder, None if there was none."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    beside = [p for p in [*sorted(out_dir.glob(REFERENCE_CACHE)), out_dir / "metrics.jsonl"] if p.exists()]
    if not ckpt_dir.exists() and not beside:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = out_dir / SUPERSEDED / f"checkpoints-{stamp}", 1
    while target.exists():  # two restarts within a second
        n += 1
        target = out_dir / SUPERSEDED / f"checkpoints-{stamp}-{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if ckpt_dir.exists():
        ckpt_dir.rename(target)
    else:
        target.mkdir()
    for path in beside:
        path.rename(target / path.name)
    return target


def write_checkpoint(
    accelerator, ckpt_dir: Path, step: int, weights: dict, state: dict, shard: dict | None, keep: int = 2
) -> Path:
    """Every process calls it. The main process writes `weights` (the gathered trainable tensors), `state` and
    its fingerprint as JSON;
    under FSDP/ZeRO each process also writes its optimizer `shard` (rank-<i>.pt, which needs a folder all
    processes share). The folder is written as `.step-N.partial` and renamed once complete, so a reader never
    sees half a checkpoint; the newest `keep` are kept (the newest may be the one a crash interrupted)."""
    final, partial = ckpt_dir / f"step-{step}", ckpt_dir / f".step-{step}.partial"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if shard is not None:
        torch.save(shard, partial / f"rank-{accelerator.process_index}.pt")
    if main:
        save_file(weights, partial / WEIGHTS)
        torch.save(state, partial / TRAINER_STATE)
        readable = {k: state.get(k) for k in ("fingerprint", "parts", "written_by", "model_paths")}
        (partial / FINGERPRINT).write_text(json.dumps(readable, indent=1) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob(".step-*.partial"):  # left by a crash mid-write; none is in flight now
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(ckpt: Path) -> dict:
    return torch.load(ckpt / TRAINER_STATE, weights_only=True, map_location="cpu")


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Copy a checkpoint's trainable tensors into `model` (not yet prepared: unsharded), by parameter name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(ckpt / WEIGHTS).items():
            params[name].copy_(tensor.to(params[name].device))


def restore_state(ckpt: Path, rank: int, optimizer, scheduler) -> dict:
    """Load the optimizer (this process's shard, when the checkpoint holds shards), the schedule and this
    process's RNG (the process count is in the fingerprint, so there is one per process); returns the state."""
    state = read_state(ckpt)
    if state["optimizer"] is None:
        shard = torch.load(ckpt / f"rank-{rank}.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(shard["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"][rank])
    return state


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """This process's torch RNG: the CPU generator, and every CUDA device's when there is CUDA (dropout on a
    GPU draws from the device's generator). The recipe draws from no Python or NumPy generator."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if len(cuda) != torch.cuda.device_count():
        print(
            f"[train] CUDA RNG not restored: the checkpoint saw {len(cuda)} devices, this process sees "
            f"{torch.cuda.device_count()} (dropout will draw other masks than the interrupted run)"
        )
        return
    torch.cuda.set_rng_state_all(cuda)
