"""`alma-r judge`: pairwise LLM-judge win rate of outputs against references, both answer orders, through an
OpenAI-compatible endpoint (the evaluation of "Sequence-level Large Language Model Training with Contrastive
Preference Optimization", anonymous ACL submission, section 5).

    alma-r judge --input runs/dolly/outputs.parquet --system cpo \\
        --base-url https://api.openai.com/v1 --model gpt-3.5-turbo-0613 \\
        --output runs/dolly/judge/cpo.json

Input rows (Parquet, JSON lines or a JSON list) hold the query, the model's output and the ground truth, in the
columns named by --query-column / --output-column / --reference-column (default prompt, output, reference).
The endpoint comes from flags, or from --endpoint FILE (YAML: base_url, model, api, api_key_env,
api_key_secret, ...), which the flags override. The key is read from the Prefect Secret block api_key_secret
when set, else from the environment variable api_key_env, and is never printed. Writes the result as JSON
(--output), every item's raw answers as JSON lines beside it (<output>.items.jsonl) and caches requests in
<output folder>/_cache/judge.sqlite, so a rerun asks nothing twice; prints the markdown row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alma_r.cli.common import add_command

SUMMARY = "LLM-judge win rate of outputs against references (both answer orders)"


def add_judge_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "judge", SUMMARY, __doc__, run_judge_cli)
    p.add_argument("--input", required=True, help="Parquet, JSON lines or JSON list of rows")
    p.add_argument("--output", required=True, help="result JSON to write")
    p.add_argument("--system", default="model", help="name of the judged system in the table row")
    p.add_argument("--query-column", default="prompt")
    p.add_argument("--output-column", default="output")
    p.add_argument("--reference-column", default="reference")
    p.add_argument("--endpoint", help="YAML file with the endpoint's fields (base_url, model, api, ...)")
    p.add_argument("--base-url", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="the judge model the server knows, e.g. gpt-3.5-turbo-0613")
    p.add_argument("--api", choices=["chat", "completions"])
    p.add_argument("--api-key-env", help="environment variable holding the key ('' for none)")
    p.add_argument("--api-key-secret", help="Prefect Secret block holding the key (wins over --api-key-env)")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--template", choices=["dolly", "wiki"], default="dolly")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--cache", help="request cache (default: <output folder>/_cache/judge.sqlite)")
    return p


def endpoint_from_args(args: argparse.Namespace):
    import yaml
    from pydantic import ValidationError

    from alma_r.config import EndpointSection
    from alma_r.tasks.shared.endpoints import endpoint_config

    fields = {}
    if args.endpoint:
        fields = yaml.safe_load(Path(args.endpoint).read_text(encoding="utf-8")) or {}
        if not isinstance(fields, dict):
            raise ValueError(f"{args.endpoint}: expected a mapping of endpoint fields")
    flags = {
        "base_url": args.base_url,
        "model": args.model,
        "api": args.api,
        "api_key_env": args.api_key_env,
        "api_key_secret": args.api_key_secret,
        "max_concurrency": args.max_concurrency,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    if fields.get("api_key_env") == "":
        fields["api_key_env"] = None  # a local server needs no key
    try:
        section = EndpointSection(**fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"endpoint: {problems}") from None
    # The key (api_key_secret's Prefect Secret block, else api_key_env's variable) is resolved here, not in the
    # backend.
    return endpoint_config(section)


def read_judge_rows(path: Path, columns: tuple[str, str, str]) -> tuple[list[str], list[str], list[str]]:
    """The three columns of every row; a missing or non-string value stops with `<file>:<n>: ...`."""
    from alma_r.data.readers import IngestError, read_records

    records = read_records(path)
    if not records:
        raise IngestError(f"{path}:0: no rows to judge")
    out: tuple[list[str], list[str], list[str]] = ([], [], [])
    for where, record in records:
        if not isinstance(record, dict):
            raise IngestError(f"{path}:{where}: {type(record).__name__} where a JSON object was expected")
        for column, values in zip(columns, out, strict=True):
            value = record.get(column)
            if not isinstance(value, str):
                got = "missing" if value is None else f"{type(value).__name__}, expected a string"
                raise IngestError(f"{path}:{where}: field '{column}' is {got}")
            values.append(value)
    return out


def run_judge_cli(args: argparse.Namespace) -> int:
    from alma_r.data.readers import IngestError
    from alma_r.models.evaluate.judge import (
        MARKDOWN_HEADER,
        JudgeConfig,
        judge_against_references,
        markdown_row,
        write_items_jsonl,
        write_result_json,
    )

    out = Path(args.output)
    try:
        endpoint = endpoint_from_args(args)
        cfg = JudgeConfig(template=args.template, max_tokens=args.max_tokens, confidence=args.confidence)
        columns = (args.query_column, args.output_column, args.reference_column)
        queries, outputs, references = read_judge_rows(Path(args.input), columns)
    except (IngestError, ValueError, OSError) as err:
        print(f"alma-r judge: {err}", file=sys.stderr)
        return 2
    cache = Path(args.cache) if args.cache else out.parent / "_cache" / "judge.sqlite"
    run = judge_against_references(endpoint, queries, outputs, references, cache, cfg)
    write_result_json(run.result, out)
    write_items_jsonl(run.items, out.with_suffix(".items.jsonl"))
    stats = run.request_stats
    print(f"{stats['requests']} requests ({stats['retries']} retries), {stats['cached']} from the cache")
    print(f"{MARKDOWN_HEADER}\n{markdown_row(run.result, args.system)}")
    return 0
