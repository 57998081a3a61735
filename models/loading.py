"""Load a causal LM and its tokenizer safely: safetensors only, no remote code unless configured."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class ModelNotFoundError(FileNotFoundError):
    """A local model path that does not exist (transformers would take it for a Hub id and say so)."""


class RefusedWeightsError(OSError):
    """A model folder whose weights are pickle files only: loading those can run arbitrary code."""


def check_model_path(model_path: str, weights: bool) -> None:
    """A path written as local (absolute, ./, ../, ~) must be a folder; a folder's weights (when `weights`)
    must include safetensors. Anything else is a Hub id, left to transformers."""
    path = Path(model_path).expanduser()
    if not path.exists() and (path.is_absolute() or model_path.startswith((".", "~"))):
        raise ModelNotFoundError(f"{model_path}: no such model folder")
    if weights and path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise RefusedWeightsError(
                f"{path}: refused {', '.join(pickled)}: only safetensors weights are loaded (pickle files can "
                "run code); convert a model you trust with save_pretrained(..., safe_serialization=True)"
            )


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

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

    check_model_path(model_path, weights=True)
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
