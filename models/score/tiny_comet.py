"""Tiny COMET checkpoints built offline: the three metric classes the paper's scorers use, randomly initialised.

The real models (wmt22-comet-da, CometKiwi-XXL, XCOMET-XXL) are gated or multi-GB downloads; these share their
COMET classes, input handling and checkpoint layout, so `comet.load_from_checkpoint` and `comet-score` load them
unchanged. The scores mean nothing; they exist so scoring code can be tested against COMET itself on a CPU.

Layout (what `comet.load_from_checkpoint` expects, plus the encoder it names):

    out_dir/encoder/               tokenizer (BPE on `texts`, XLM-R specials) and encoder config, no weights
    out_dir/hparams.yaml           class_identifier and the rest of the hyper-parameters
    out_dir/checkpoints/model.ckpt {"state_dict", "hyper_parameters", "pytorch-lightning_version"}

The hyper-parameters record the encoder folder by absolute path (COMET hands `pretrained_model` straight to
`from_pretrained`, and its loader takes no override), so the checkpoint is not relocatable: moving `out_dir`
breaks it. Rebuilding is cheap and seeded, so it gives the same weights. With `encoder_id` they name a Hub id
instead, as a published checkpoint does (wmt22-comet-da: xlm-roberta-large): the checkpoint then loads wherever
it lies, once `encoder/`'s files are in the Hub cache under that id.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from alma_r.models.score.comet_scorer import quiet_comet

KINDS = ("regression", "kiwi", "xcomet")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..3; <mask> is last there, 4 here
ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
HEAD = [64, 32]


def train_xlmr_tokenizer(texts: list[str], vocab_size: int = 1000):
    """A sentencepiece-style tokenizer (NFKC, metaspace) with XLM-R's specials and pair template.

    BPE rather than XLM-R's Unigram: the `tokenizers` Unigram trainer gives a different vocabulary on every run,
    BPE's is reproducible, and the checkpoint must be.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    bos, eos = core.token_to_id("<s>"), core.token_to_id("</s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def _metric(kind: str, encoder_dir: Path, xl: bool):
    """The COMET class and settings each kind mirrors, scaled down (word_layer must be < layers + 1)."""
    from comet.models import RegressionMetric, UnifiedMetric, XCOMETMetric

    common = {"pretrained_model": str(encoder_dir), "load_pretrained_weights": False, "hidden_sizes": HEAD}
    if kind == "regression":  # wmt22-comet-da: XLM-R, avg pooling over a layer mix, reference-based
        return RegressionMetric(encoder_model="XLM-RoBERTa", **common)
    if (
        kind == "kiwi"
    ):  # wmt22/23-cometkiwi-da: a UnifiedMetric restricted to [mt, src], CLS sentence embedding
        return UnifiedMetric(
            encoder_model="XLM-RoBERTa-XL" if xl else "XLM-RoBERTa",  # the XXL Kiwi: XLM-R XXL, an XL class
            input_segments=["mt", "src"],
            word_level_training=False,
            word_layer=ENCODER["num_hidden_layers"],
            **common,
        )
    if kind == "xcomet":  # XCOMET-XL/XXL: XLM-R XL encoder, error-span tagging, with or without a reference
        return XCOMETMetric(
            encoder_model="XLM-RoBERTa-XL",
            word_layer=ENCODER["num_hidden_layers"],
            final_activation="Sigmoid",
            **common,
        )
    raise ValueError(f"unknown tiny COMET kind '{kind}' (known: {', '.join(KINDS)})")


def build_tiny_comet(
    out_dir: Path,
    kind: str,
    texts: list[str],
    seed: int = 0,
    encoder_id: str | None = None,
    xl: bool | None = None,
) -> Path:
    """Write a tiny COMET model of `kind` to `out_dir` (replaced atomically) and return its checkpoint path.
    `encoder_id`: the Hub id its hyper-parameters name as `pretrained_model` (None: `out_dir/encoder` by
    absolute path). `xl`: an XLM-RoBERTa-XL encoder (None: for xcomet only), as XLM-R XXL models have."""
    from transformers import XLMRobertaConfig, XLMRobertaXLConfig

    if kind not in KINDS:
        raise ValueError(f"unknown tiny COMET kind '{kind}' (known: {', '.join(KINDS)})")
    if xl is None:
        xl = kind == "xcomet"
    if xl != (kind == "xcomet") and kind != "kiwi":  # only Kiwi comes in both (wmt22: XLM-R, wmt23 XXL: XL)
        raise ValueError(
            f"a tiny {kind} COMET has {'an XLM-RoBERTa-XL' if kind == 'xcomet' else 'an XLM-RoBERTa'} encoder"
        )
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = train_xlmr_tokenizer(texts)
        config_class = XLMRobertaXLConfig if xl else XLMRobertaConfig
        config = config_class(
            vocab_size=len(tokenizer),
            max_position_embeddings=514,  # XLM-R: 512 tokens + padding offset
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **ENCODER,
        )
        tokenizer.save_pretrained(tmp / "encoder")
        config.save_pretrained(tmp / "encoder")
        with torch.random.fork_rng(devices=[]), quiet_comet():  # seeded, leaving the caller's RNG alone
            torch.manual_seed(seed)
            model = _metric(kind, tmp / "encoder", xl)
            import pytorch_lightning  # after COMET, inside quiet_comet: its import warns about pkg_resources
        hparams = dict(model.hparams)
        # the Hub id, or where the encoder folder will live after the rename
        hparams["pretrained_model"] = encoder_id or str(out_dir / "encoder")
        (tmp / "hparams.yaml").write_text(yaml.safe_dump(hparams, sort_keys=True), encoding="utf-8")
        (tmp / "checkpoints").mkdir()
        checkpoint = {
            "state_dict": model.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": pytorch_lightning.__version__,  # Lightning's loader requires it
        }
        torch.save(checkpoint, tmp / "checkpoints" / "model.ckpt")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "checkpoints" / "model.ckpt"
