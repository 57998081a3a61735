"""Load a causal LM and its tokenizer safely: safetensors only, no remote code unless configured."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

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

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
    return model.to(device)


def model_identity(model_path: str, adapter: str | None) -> dict[str, str | None]:
    """How a model is recorded in outputs: local folders by resolved path, hub ids as they are."""

    def show(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else p

    return {"model_id": show(model_path), "adapter": show(adapter)}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
