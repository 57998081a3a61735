"""`alma-r judge` against the fake judge server of tests/test_judge.py: result JSON, items, table row, cache."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from alma_r.cli import main
from tests.test_judge import BEHAVIOURS, fake_judge, items, rule_by_query  # noqa: F401  (fixture)


def test_judge_cli_writes_the_result_and_prints_the_row(fake_judge, tmp_path, capsys):  # noqa: F811
    judge = fake_judge(rule_by_query)
    queries, outputs, references = items(BEHAVIOURS)
    source = tmp_path / "outputs.parquet"
    pq.write_table(pa.table({"instruction": queries, "hypothesis": outputs, "response": references}), source)
    endpoint = tmp_path / "endpoint.yaml"
    endpoint.write_text(f"base_url: {judge.endpoint.base_url}\nmodel: fake-judge\napi_key_env: null\n")
    out = tmp_path / "judge" / "cpo.json"
    argv = [
        "judge",
        "--input",
        str(source),
        "--output",
        str(out),
        "--system",
        "cpo",
        "--endpoint",
        str(endpoint),
    ]
    argv += [
        "--query-column",
        "instruction",
        "--output-column",
        "hypothesis",
        "--reference-column",
        "response",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| cpo | fake-judge | 12 | 10 | 0.800 | 95% [0.490, 0.943] | 7 / 2 / 1 | 3 / 24 |" in printed
    assert "24 requests (0 retries), 0 from the cache" in printed
    result = json.loads(out.read_text())
    assert (result["items"], result["judgements"], result["invalid"], result["win_rate"]) == (12, 24, 3, 0.8)
    lines = (tmp_path / "judge" / "cpo.items.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[10])["answer_output_first"] == "Response A is better"
    assert (tmp_path / "judge" / "_cache" / "judge.sqlite").is_file() and len(judge.prompts) == 24

    # A rerun asks nothing; flags override the endpoint file.
    assert main(argv + ["--max-concurrency", "2"]) == 0
    assert "0 requests (0 retries), 24 from the cache" in capsys.readouterr().out
    assert len(judge.prompts) == 24 and json.loads(out.read_text()) == result


def test_judge_cli_reads_json_lines_with_the_default_columns(fake_judge, tmp_path, capsys):  # noqa: F811
    judge = fake_judge(rule_by_query)
    source = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": q, "output": o, "reference": r} for q, o, r in zip(*items(["always-B"] * 3), strict=True)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["judge", "--input", str(source), "--output", str(tmp_path / "r.json")]
    argv += ["--base-url", judge.endpoint.base_url, "--model", "fake-judge", "--api-key-env", ""]
    assert main(argv) == 0
    assert "| model | fake-judge | 3 | 3 | 0.500 |" in capsys.readouterr().out


def test_judge_cli_input_and_endpoint_errors_are_one_line(tmp_path, capsys):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"prompt": "q", "output": "o", "reference": "r"}) + "\n")
    source.write_text(
        source.read_text() + json.dumps({"prompt": "q", "output": None, "reference": "r"}) + "\n"
    )
    base = ["judge", "--input", str(source), "--output", str(tmp_path / "r.json")]
    assert main(base + ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    assert capsys.readouterr().err.strip() == f"alma-r judge: {source}:2: field 'output' is missing"
    assert main(base + ["--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err.strip() == "alma-r judge: endpoint: model: Field required"
    assert not (tmp_path / "r.json").exists()
