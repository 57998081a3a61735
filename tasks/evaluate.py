"""Stage 6, evaluate: translate the test sets with the baseline and the CPO model, score them with sacreBLEU
(BLEU, chrF, with signatures) and the configured COMET metrics -> eval.parquet, hypotheses.parquet. With
evaluate.decoding qe_rerank or mbr, the CPO model's beam candidates are also reranked (systems cpo+qe_rerank,
cpo+mbr: tasks/shared/quality_decoding.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from alma_r.config import RunConfig, config_base_dir, resolve_path
from alma_r.data.io import read_rows, write_table
from alma_r.data.readers import IngestError, read_lines
from alma_r.data.schemas import EVAL_RESULTS, HYPOTHESES, SCORES, SEGMENTS
from alma_r.models import progress
from alma_r.models.evaluate.significance import sacrebleu_paired_bs, segment_paired_bs
from alma_r.models.generate.hf_backend import Decoding, generate_n_best, generate_translations
from alma_r.models.loading import load_model, load_tokenizer, pick_device
from alma_r.models.prompts import make_prompt
from alma_r.models.score.cache import ScoreCache
from alma_r.models.score.scorers import corpus_score, sentence_scores
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.quality_decoding import rerank
from alma_r.tasks.shared.scoring import (
    LanguageScorers,
    cache_path_for,
    make_scorer,
    resolved_records,
    score_items,
)

METRICS = ("bleu", "chrf")


def translate_test_sets(
    cfg: RunConfig, tests: list[dict], model_path: str, adapter: str | None, name: str, n_best: int = 0
) -> tuple[list[str], int, list[list[str] | None]]:
    """Hypotheses in `tests` order; a prompt over its direction's limit gets an empty hypothesis and is counted.
    With `n_best`, also each prompt's n best beams (quality-aware decoding's candidates; None over the limit)."""
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = load_model(
        model_path,
        adapter=adapter,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        device=pick_device(),
    )
    e = cfg.evaluate
    decoding = Decoding(num_beams=e.num_beams, max_new_tokens=e.max_new_tokens)
    hyps: list[str | None] = [None] * len(tests)
    candidates: list[list[str] | None] = [None] * len(tests)
    by_lp: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(tests):
        by_lp[r["lp"]].append(i)
    for lp, idx in by_lp.items():
        prompts = [make_prompt(tests[i]["src"], tests[i]["src_lang"], tests[i]["tgt_lang"]) for i in idx]
        limit = e.max_prompt_tokens_by_lp.get(lp, e.max_prompt_tokens)
        if n_best:
            # Beam search's best of the n is the beam output itself when n <= num_beams (the same search):
            # one pass gives both; more candidates than beams need a wider search of their own.
            n_outs = generate_n_best(
                model,
                tokenizer,
                prompts,
                decoding,
                n_best,
                e.batch_size,
                limit,
                cfg.run.seed,
                desc=f"evaluate {name} {lp} candidates",
            )
            for i, out in zip(idx, n_outs, strict=True):
                candidates[i] = out
        if n_best and n_best <= e.num_beams:
            outs = [None if c is None else c[0] for c in n_outs]
        else:
            outs = generate_translations(
                model,
                tokenizer,
                prompts,
                decoding,
                e.batch_size,
                limit,
                seed=cfg.run.seed,
                desc=f"evaluate {name} {lp}",
            )
        for i, out in zip(idx, outs, strict=True):
            hyps[i] = out
    return [h if h is not None else "" for h in hyps], sum(h is None for h in hyps), candidates


def reranked_systems(
    cfg: RunConfig,
    tests: list[dict],
    name: str,
    beams: list[list[str] | None],
    cache: ScoreCache,
    counts: dict,
) -> dict[str, list[str]]:
    """evaluate.decoding's reranked systems of one model, `<name>+qe_rerank` (and `<name>+mbr` with mbr: its
    candidates are reranked by QE too), from the model's beams (translate_test_sets' n best); none for beam."""
    e = cfg.evaluate
    out = {}
    for mode in {"beam": [], "qe_rerank": ["qe_rerank"], "mbr": ["qe_rerank", "mbr"]}[e.decoding]:
        metric = e.qe_metric if mode == "qe_rerank" else e.mbr_utility
        chosen = rerank(tests, beams, mode, LanguageScorers(cfg, metric), metric, cache, counts)
        out[f"{name}+{mode}"] = [c if c is not None else "" for c in chosen]
    return out


def imported_hypotheses(cfg: RunConfig, tests: list[dict]) -> dict[str, list[str | None]]:
    """Outputs of other systems from files, aligned line by line with the test segments they translate."""
    out = {}
    for system in cfg.evaluate.imported:
        hyps: list[str | None] = [None] * len(tests)
        for lp, file in system.files.items():
            rows = [i for i, r in enumerate(tests) if r["lp"] == lp and r["origin"] == system.origin]
            path = resolve_path(file, config_base_dir(cfg))
            lines = read_lines(path)
            if len(lines) < len(rows):
                raise IngestError(
                    f"{path}:{len(lines) + 1}: {system.name} has {len(lines)} lines, "
                    f"the {system.origin} {lp} test set has {len(rows)} segments"
                )
            for i, line in zip(rows, lines, strict=False):
                hyps[i] = line
        out[system.name] = hyps
    return out


def score_systems(
    tests: list[dict],
    systems: dict[str, list[str | None]],
    comet: dict | None = None,
    bootstrap_samples: int = 0,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Per system, test set and direction: corpus BLEU and chrF (sacreBLEU, with signatures) and the mean of each
    COMET metric's segment scores x 100, with paired-bootstrap p-values against `baseline`. Returns (results,
    hypothesis rows, segment score rows). A system not covering a whole test set and direction is left out of it.

    comet: {metric: (scorer, cache)} for segment-level metrics.
    """
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(tests):
        groups[(r["origin"], r["lp"])].append(i)
    results, hyp_rows, segment_rows = [], [], []
    # Corpus scores are quick; paired bootstrap and COMET metrics on full test sets are not.
    progress.report(0, len(groups), "evaluate scoring", unit="test set")
    for done, ((test_set, lp), idx) in enumerate(sorted(groups.items()), start=1):
        covering = {
            name: [hyps[i] for i in idx]
            for name, hyps in systems.items()
            if all(hyps[i] is not None for i in idx)
        }
        refs, tgt_lang = [tests[i]["ref"] for i in idx], tests[idx[0]]["tgt_lang"]
        others = {n: h for n, h in covering.items() if n != "baseline"}
        p_values = {}
        if bootstrap_samples and "baseline" in covering:
            p_values = sacrebleu_paired_bs(covering["baseline"], others, refs, tgt_lang, bootstrap_samples)
        chrf_signature = None
        for system, sys_hyps in covering.items():
            for metric in METRICS:
                score, signature = corpus_score(metric, sys_hyps, refs, tgt_lang=tgt_lang)
                results.append(
                    {
                        "test_set": test_set,
                        "lp": lp,
                        "system": system,
                        "metric": metric,
                        "score": score,
                        "signature": signature,
                        "n_segments": len(idx),
                        "p_value": p_values.get((system, metric)),
                    }
                )
            chrf_values, chrf_signature = sentence_scores("chrf", sys_hyps, refs, tgt_lang)
            segment_rows += [
                {
                    "segment_id": tests[i]["id"],
                    "lp": lp,
                    "system": system,
                    "metric": "chrf",
                    "model_id": chrf_signature,
                    "score": v,
                    "error_spans": None,
                    "flag": None if h.strip() else "empty_hypothesis",
                }
                for i, h, v in zip(idx, sys_hyps, chrf_values, strict=True)
            ]
            hyp_rows += [
                {
                    "segment_id": tests[i]["id"],
                    "test_set": test_set,
                    "lp": lp,
                    "system": system,
                    "hypothesis": h,
                }
                for i, h in zip(idx, sys_hyps, strict=True)
            ]
        for metric, (scorer, cache) in (comet or {}).items():
            per_system = {}
            for system, sys_hyps in covering.items():
                items = [(tests[i], system, h, []) for i, h in zip(idx, sys_hyps, strict=True)]
                rows = score_items(scorer, metric, items, cache, {})
                segment_rows += rows
                per_system[system] = [r["score"] for r in rows]
            for system, values in per_system.items():
                p = None
                if bootstrap_samples and system != "baseline" and "baseline" in per_system:
                    p = segment_paired_bs(per_system["baseline"], values, bootstrap_samples)
                results.append(
                    {
                        "test_set": test_set,
                        "lp": lp,
                        "system": system,
                        "metric": metric,
                        "score": 100 * sum(values) / len(values),
                        "signature": scorer.signature,
                        "n_segments": len(idx),
                        "p_value": p,
                    }
                )
        progress.report(done, len(groups), "evaluate scoring", unit="test set")
    return results, hyp_rows, segment_rows


def run_evaluate(
    cfg: RunConfig,
    segments_path: Path,
    model_path: str,
    base_adapter: str | None,
    cpo_model: str,
    cpo_adapter: str | None,
    out_dir: Path,
) -> tuple[dict, dict]:
    tests = [r for r in read_rows(segments_path, SEGMENTS) if r["split"] == "test" and r["ref"]]
    if not tests:
        raise ValueError("no test segments: add a source with split: test to ingest.sources")
    systems: dict[str, list[str | None]] = {}
    counts = {"test_segments": len(tests)}
    e, cache = cfg.evaluate, ScoreCache(cache_path_for(cfg))
    beams_of: dict[str, list[list[str] | None]] = {}
    for name, model, adapter in (("baseline", model_path, base_adapter), ("cpo", cpo_model, cpo_adapter)):
        n_best = e.candidates if name == "cpo" and e.decoding != "beam" else 0
        systems[name], too_long, beams_of[name] = translate_test_sets(
            cfg, tests, model, adapter, name, n_best
        )
        counts[f"{name}/prompt_too_long"] = too_long
    systems.update(reranked_systems(cfg, tests, "cpo", beams_of["cpo"], cache, counts))
    systems.update(imported_hypotheses(cfg, tests))
    comet = {m: (make_scorer(cfg, m, ""), cache) for m in e.metrics if m not in METRICS}
    results, hyp_rows, segment_rows = score_systems(tests, systems, comet, cfg.evaluate.bootstrap_samples)
    results = [r for r in results if r["metric"] in e.metrics]
    outputs = {
        "eval": write_table(results, out_dir / "eval.parquet", EVAL_RESULTS),
        "hypotheses": write_table(hyp_rows, out_dir / "hypotheses.parquet", HYPOTHESES),
        "segment_scores": write_table(segment_rows, out_dir / "segment_scores.parquet", SCORES),
    }
    if resolved := resolved_records(scorer for scorer, _ in comet.values()):
        counts["resolved"] = resolved
    return outputs, {**counts, "results": len(results)}


def evaluate_key(
    cfg: RunConfig, run_dir: Path, segments: StageResult, policy: StageResult, trained: StageResult
) -> StageKey:
    files = [resolve_path(f, config_base_dir(cfg)) for s in cfg.evaluate.imported for f in s.files.values()]
    key = stage_key(
        "evaluate",
        cfg.section_hash("evaluate", "model"),
        [segments, policy, trained],
        files=files,
        module=__name__,
    )
    return StageKey("evaluate", Path(run_dir) / "evaluate", key)


def evaluate_stage(
    cfg: RunConfig, run_dir: Path, segments: StageResult, policy: StageResult, trained: StageResult
) -> StageResult:
    """Baseline (before CPO) vs CPO model on the test sets."""
    return run_stage(
        evaluate_key(cfg, run_dir, segments, policy, trained),
        lambda out: run_evaluate(
            cfg,
            segments.path("segments"),
            policy.outputs["model"],
            policy.outputs.get("adapter"),
            trained.outputs.get("model", policy.outputs["model"]),
            trained.outputs.get("adapter"),
            out,
        ),
    )


def publish_results(cfg: RunConfig, result: StageResult) -> None:
    """The evaluation table (system x direction x metric) as a Prefect table artifact."""
    try:
        from prefect.artifacts import create_table_artifact

        rows = read_rows(result.path("eval"), EVAL_RESULTS)
        create_table_artifact(
            table=rows,
            key=f"alma-r-eval-{cfg.run.name.lower().replace('_', '-')}",
            description="Evaluation on the test sets",
        )
    except Exception as err:  # the Parquet on disk is what matters; the UI copy is a convenience
        print(f"[evaluate] could not publish the results artifact: {err}")


evaluate_task = stage_task(evaluate_stage, evaluate_key, gpu=True, publish=publish_results)
