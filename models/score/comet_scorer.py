"""COMET models (XCOMET, CometKiwi, wmt22-comet-da or a local checkpoint) behind the scorer interface.

The paper ranks candidate translations with XCOMET-XXL and KIWI-XXL, both reference-free. COMET is imported
lazily (~5 s) and each scorer loads its model once. Scores match `comet-score` on the same checkpoint and
precision; the difference is the precision default: the CLI (2.2.5+) calls `model.half()` unconditionally, even
on CPU, while the Python API never does. Here fp16 is applied on GPU only, unless `fp16=` says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from alma_r.data.hub import HubError, HubSnapshot, hub_snapshot, is_local

# Lightning's device banners and "Tip" adverts, COMET's "Encoder model frozen." are INFO logs on these.
_CHATTY_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric", "comet")


@contextlib.contextmanager
def quiet_comet() -> Iterator[None]:
    """Silence what COMET and Lightning print that says nothing about the scores, only while inside.

    That is: INFO logs, torchmetrics' import of the deprecated pkg_resources (COMET's loader imports it too),
    and Lightning 2.6's LeafSpec deprecation from its own _pytree module. The progress bar is left alone.
    """
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@dataclass(frozen=True)
class CometResult:
    """One item's score; `error_spans` is None for models that predict no spans (XCOMET-style models give a list,
    empty when they found no error), each span a dict with text, confidence, severity, start and end."""

    score: float
    error_spans: list[dict] | None = None


def is_hub_id(model: str) -> bool:
    """Anything but what data/hub.py takes for local (an existing file or folder, a name written as a path) or
    a checkpoint file's name."""
    return not (is_local(model) or model.endswith(".ckpt"))


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local `.ckpt`, a model folder holding `checkpoints/model.ckpt`, or else a Hub id to download at
    `revision` (None: main)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        checkpoint = path / "checkpoints" / "model.ckpt"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"COMET model folder {path} has no checkpoints/model.ckpt")
        return checkpoint
    if not is_hub_id(model):
        raise FileNotFoundError(f"no COMET checkpoint at {path}")
    return download(model, revision)


def hub_revision(model: str, revision: str | None = None) -> HubSnapshot:
    """The commit `revision` of a COMET repository is at now, with only its hparams.yaml fetched: enough to key
    its scores and to know whether it reads references, without downloading a checkpoint of many GB."""
    return _comet_snapshot(model, revision, allow_patterns=["hparams.yaml"])


def download(model: str, revision: str | None = None) -> Path:
    """The checkpoint of a COMET repository at `revision` (a branch, tag or commit; None: main), fetched into the
    Hub cache (data/hub.py; offline: found there). A COMET checkpoint is a Lightning pickle, COMET's own format:
    it is loaded as COMET loads it, not through the safetensors policy of models/weights.py."""
    return _comet_snapshot(model, revision).path / "checkpoints" / "model.ckpt"


def _comet_snapshot(model: str, revision: str | None, allow_patterns: list[str] | None = None) -> HubSnapshot:
    try:
        return hub_snapshot(model, revision, allow_patterns=allow_patterns)
    except HubError as err:
        gated = " (a gated model: accept its licence on huggingface.co and log in or set HF_TOKEN)"
        raise HubError(f"COMET {err}{gated if 'GatedRepoError' in str(err) else ''}") from None


def accepts_reference(hparams) -> bool:
    """Whether a COMET model can use a reference, from its hyper-parameters (hparams.yaml or `model.hparams`).

    UnifiedMetric (CometKiwi: [mt, src]) says so in input_segments; XCOMETMetric forces [mt, src, ref]; the
    regression and ranking metrics always use one, ReferencelessRegression never.
    """
    kind = hparams.get("class_identifier")
    if kind == "xcomet_metric":
        return True
    if kind == "unified_metric":
        return "ref" in hparams.get("input_segments", ["mt", "src", "ref"])
    if kind == "referenceless_regression_metric":
        return False
    if kind in ("regression_metric", "ranking_metric"):
        return True
    raise ValueError(f"unknown COMET class_identifier {kind!r}")


def read_hparams(checkpoint: Path) -> dict:
    """hparams.yaml beside checkpoints/ (COMET reads class_identifier from it), {} if absent."""
    path = checkpoint.parents[1] / "hparams.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def _check_encoder(checkpoint: Path) -> None:
    """A checkpoint whose encoder was a local folder that has since moved fails deep in transformers with a
    Hub error about an invalid repo id; say what happened instead."""
    encoder = read_hparams(checkpoint).get("pretrained_model")
    if isinstance(encoder, str) and Path(encoder).is_absolute() and not Path(encoder).exists():
        raise FileNotFoundError(
            f"COMET checkpoint {checkpoint} names its encoder by a path that no longer exists: {encoder} "
            "(moved? rebuild the checkpoint where it will be used)"
        )


class CometScorer:
    """Score {"src", "mt"[, "ref"]} items with one COMET model, loaded on first use.

    `model`: a Hub id (Unbabel/XCOMET-XXL, Unbabel/wmt23-cometkiwi-da-xxl, Unbabel/wmt22-comet-da), a checkpoint
    file or a folder holding checkpoints/model.ckpt. `gpus`: 1 if CUDA is available else 0 (one device at most:
    COMET's multi-GPU path re-launches the script under DDP). `reference`: None uses a reference whenever the
    model accepts one; False scores reference-free (XCOMET as a QE model, the paper's setting); True insists.
    `fp16`: None halves the model on GPU only (as `comet-score` does, which also halves on CPU). `revision`: of
    a Hub id (a branch, tag or commit; None: main).
    """

    def __init__(
        self,
        model: str,
        batch_size: int = 16,
        gpus: int | None = None,
        reference: bool | None = None,
        fp16: bool | None = None,
        progress_bar: bool = True,
        revision: str | None = None,
    ) -> None:
        if gpus is None:
            gpus = 1 if torch.cuda.is_available() else 0
        if gpus not in (0, 1):
            raise ValueError(f"gpus={gpus}: a CometScorer uses one device at most (0 or 1); run one per GPU")
        self._name = str(model)
        self.revision = revision
        self.batch_size = batch_size
        self.gpus = gpus
        self.reference = reference
        self.fp16 = gpus > 0 if fp16 is None else fp16
        self.progress_bar = progress_bar
        self.segments_scored = 0  # items sent to the model, so callers can prove a cache skipped work
        self._checkpoint: Path | None = None
        self._from_hub = is_hub_id(self._name)
        self._resolved: HubSnapshot | None = None
        self._model = None
        self._lock = threading.RLock()

    @property
    def model_name(self) -> str:
        """The model as given: COMET model names are what users cite."""
        return self._name

    @property
    def resolved(self) -> HubSnapshot | None:
        """The Hub commit a Hub id's revision resolved to (once, on first use: every score of this scorer is of
        that commit), None for a local checkpoint."""
        if self._resolved is None and self._from_hub:
            with self._lock:
                if self._resolved is None:
                    self._resolved = hub_revision(self._name, self.revision)
        return self._resolved

    @property
    def model_id(self) -> str:
        """The model as given, and for a Hub id `@<commit>`: scores of another revision are other scores, so the
        score cache keyed by it never hands them out for this one."""
        resolved = self.resolved
        return f"{self._name}@{resolved.commit}" if resolved else self._name

    @property
    def signature(self) -> str:
        """The model as given, marked when a reference-capable model is forced reference-free (different
        scores, so a cache must not share them)."""
        return self.model_id if self.reference is not False else f"{self.model_id}|ref:no"

    @property
    def checkpoint(self) -> Path:
        """The checkpoint file (a Hub id is downloaded on first access)."""
        if self._checkpoint is None:
            with self._lock, quiet_comet():
                if self._checkpoint is None:
                    resolved = self.resolved  # the commit the scores are keyed by, downloaded at last
                    self._checkpoint = (
                        download(self._name, resolved.commit) if resolved else resolve_checkpoint(self._name)
                    )
        return self._checkpoint

    @property
    def model(self):
        """The loaded COMET model (loads it on first access, once per scorer)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        with quiet_comet():
            import comet

            _check_encoder(self.checkpoint)
            model = comet.load_from_checkpoint(str(self.checkpoint))
        model.eval()
        if self.fp16:
            model.half()
        if self.reference and not accepts_reference(model.hparams):
            raise ValueError(f"COMET model {self._name} takes no reference (reference=True was asked)")
        if self.reference is False and model.requires_references():
            raise ValueError(f"COMET model {self._name} needs a reference (reference=False was asked)")
        return model

    @property
    def uses_reference(self) -> bool:
        """Whether `score` sends the items' "ref" to the model: the `reference` flag when given (checked against
        the model when it loads), else whether the model accepts one, read without loading its weights (so a
        caller whose requests are all cached never loads a 10B-parameter model)."""
        if self.reference is not None:
            return self.reference
        if self._model is not None:
            return accepts_reference(self._model.hparams)
        resolved = self.resolved  # a Hub id: its hparams.yaml is fetched, its checkpoint need not be
        checkpoint = resolved.path / "checkpoints" / "model.ckpt" if resolved else self.checkpoint
        return accepts_reference(read_hparams(checkpoint))

    def score(self, items: list[dict]) -> list[CometResult]:
        """One result per item, in input order. Empty translations are scored like any other (the caller flags
        them); a NaN or infinite score raises, naming the item and the model."""
        if not items:
            return []
        use_ref = self.uses_reference
        samples = []
        for i, item in enumerate(items):
            keys = ("src", "mt", "ref") if use_ref else ("src", "mt")
            missing = [k for k in keys if not isinstance(item.get(k), str)]
            if missing:
                raise ValueError(f"item {i} has no string {missing} for COMET model {self._name}")
            samples.append({k: item[k] for k in keys})
        with quiet_comet():
            output = self.model.predict(
                samples,
                batch_size=self.batch_size,
                gpus=self.gpus,
                progress_bar=self.progress_bar,
                num_workers=0 if self.gpus == 0 else None,  # None: COMET's 2 workers per GPU
                length_batching=True,  # sorts by source length, restores input order
            )
        self.segments_scored += len(samples)
        spans = None
        if "metadata" in output and "error_spans" in output.metadata:
            spans = output.metadata.error_spans
        results = []
        for i, score in enumerate(output.scores):
            score = float(score)
            if not math.isfinite(score):
                raise ValueError(f"COMET model {self._name} gave item {i} a non-finite score ({score})")
            results.append(CometResult(score, None if spans is None else [dict(s) for s in spans[i]]))
        return results
