"""Load a causal LM and its tokenizer safely: safetensors only, no remote code unless configured.

Stages load local folders (prepare_model resolved the Hub ids: models/weights.py); a Hub id given here is
resolved the same way, at its default branch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alma_r.data.hub import is_local
from alma_r.models.weights import (  # noqa: F401 (the errors: where callers have always found them)
    ModelNotFoundError,
    RefusedWeightsError,
    check_model_path,
    resolve_weights,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_folder(name: str, kind: str = "model", trust_remote_code: bool = False) -> str:
    """`name` if it is a local folder, else the folder its Hub repository resolves to (the weights policy)."""
    if is_local(name):
        return name
    revision_field = "model.revision" if kind == "model" else "model.adapter_revision"
    found = resolve_weights(
        name, kind=kind, trust_remote_code=trust_remote_code, revision_field=revision_field
    )
    return str(found.path)


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    model_path = local_folder(model_path, trust_remote_code=trust_remote_code)
    check_model_path(model_path, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # LLaMA tokenizers ship without a pad token; padding positions are masked, so EOS is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_path: str,
    adapter: str | None = None,
    dtype: str = "float32",
    trainable_adapter: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
):
    """The base model, with a LoRA adapter applied when given (trainable or frozen)."""
    from transformers import AutoModelForCausalLM

    model_path = local_folder(model_path, trust_remote_code=trust_remote_code)
    check_model_path(model_path, weights=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if adapter is not None:
        from peft import PeftModel

        adapter = local_folder(adapter, kind="adapter")
        check_model_path(adapter, weights=True)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
    return model.to(device)


def add_lora(model, r: int, alpha: int, dropout: float, target_modules):
    """A new, trainable PEFT LoRA adapter on `model`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def disable_dropout(model) -> None:
    """Every torch.nn.Dropout of `model` (a continued adapter's LoRA dropout too) set to p = 0, as TRL's
    disable_dropout_in_model and ALMA-R's trainer: the modules stay, so a saved adapter keeps its config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def model_identity(model_path: str, adapter: str | None) -> dict[str, str | None]:
    """How a model is recorded in outputs: local folders by resolved path, hub ids as they are."""

    def show(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else p

    return {"model_id": show(model_path), "adapter": show(adapter)}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
