"""The wise_ft stage of the sequence-cpo flow: weight-space ensembles of the MLE and CPO models, one model folder
per alpha of the grid ("Sequence-level Large Language Model Training with Contrastive Preference Optimization",
anonymous ACL submission, section 5, "Weight-space ensemble"; WiSE-FT, Wortsman et al., CVPR 2022)."""

from __future__ import annotations

from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.models.sequence.wise_ft import alpha_dir_name, wise_ft_grid
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def run_wise_ft(
    cfg: SequenceRunConfig, mle: StageResult, cpo: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    grid = wise_ft_grid(mle.outputs["model"], cpo.outputs["model"], cfg.wise_ft.alphas, out_dir / "models")
    return {alpha_dir_name(a): path for a, path in grid.items()}, {"models": len(grid)}


def wise_ft_key(cfg: SequenceRunConfig, run_dir: Path, mle: StageResult, cpo: StageResult) -> StageKey:
    key = stage_key("wise_ft", cfg.section_hash("wise_ft"), [mle, cpo], module=__name__)
    return StageKey("wise_ft", Path(run_dir) / "wise_ft", key)


def wise_ft_stage(cfg: SequenceRunConfig, run_dir: Path, mle: StageResult, cpo: StageResult) -> StageResult:
    """alpha * theta_MLE + (1 - alpha) * theta_CPO for every alpha of the grid -> models/alpha-<a>/."""
    return run_stage(wise_ft_key(cfg, run_dir, mle, cpo), lambda out: run_wise_ft(cfg, mle, cpo, out))


wise_ft_task = stage_task(wise_ft_stage, wise_ft_key)
