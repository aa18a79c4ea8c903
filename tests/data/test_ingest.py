"""`slmtune ingest` through the real CLI on hand-written fixture logs of all three formats."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import read_jsonl
from slmtune.records import record_problems

FIXTURES = Path(__file__).parents[1] / "fixtures" / "logs"
runner = CliRunner()


def run_ingest(*args: str) -> object:
    result = runner.invoke(app, ["ingest", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def ingest_files(tmp_path: Path, *names: str) -> tuple[list[dict], list[dict]]:
    out = tmp_path / "records.jsonl"
    result = run_ingest(*[str(FIXTURES / n) for n in names], "-o", str(out))
    assert result.exit_code == 0, result.output
    return read_jsonl(out), read_jsonl(tmp_path / "records.rejected.jsonl")


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def test_every_format_becomes_valid_canonical_records(tmp_path):
    records, rejected = ingest_files(tmp_path, "openai.jsonl", "messages.jsonl", "anthropic.jsonl", "array.json")
    assert len(records) == 4 + 2 + 3 + 2 and len(rejected) == 1 + 1 + 1
    for rec in records:
        assert record_problems(rec) == [], rec
        assert rec["messages"][-1]["role"] == "assistant"
    assert {r["meta"]["format"] for r in records} == {"openai", "messages", "anthropic"}
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "records.jsonl"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(records)


def test_openai_log_keeps_id_tools_and_meta(tmp_path):
    records, _ = ingest_files(tmp_path, "openai.jsonl")
    rec = by_id(records)["chatcmpl-fx001"]
    call = rec["messages"][-1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert rec["tools"][0]["function"]["name"] == "get_weather"
    meta = rec["meta"]
    assert meta["source"].endswith("openai.jsonl") and meta["line"] == 1
    assert meta["model"] == "gpt-4o-mini-2024-07-18" and meta["finish_reason"] == "tool_calls"
    assert meta["usage"]["total_tokens"] == 79 and meta["latency_ms"] == 412
    assert meta["timestamp"] == "2026-01-05T08:00:00Z"
    assert meta["metadata"] == {"agent": "travel-bot", "workload": "weather"}
    history = by_id(records)["chatcmpl-fx002"]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "tool", "assistant"]
    parts = by_id(records)["chatcmpl-fx003"]["messages"]
    assert parts[0] == {"role": "system", "content": "Answer in one word."}  # developer role, content parts
    assert by_id(records)["chatcmpl-fx004"]["meta"]["finish_reason"] == "length"  # curate drops it, not ingest


def test_envelope_id_is_kept_as_log_id(tmp_path):
    """A gateway's own request id (top-level `id`) survives beside the response id, for OpenAI and Anthropic logs."""
    lines = []
    for name in ("openai.jsonl", "anthropic.jsonl"):
        first = json.loads((FIXTURES / name).read_text().splitlines()[0])
        lines.append(json.dumps({"id": f"gw-{name}", **{k: v for k, v in first.items() if k != "id"}}))
    (tmp_path / "logs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "records.jsonl"
    assert run_ingest(str(tmp_path / "logs.jsonl"), "-o", str(out)).exit_code == 0
    records = read_jsonl(out)
    assert [r["meta"]["log_id"] for r in records] == ["gw-openai.jsonl", "gw-anthropic.jsonl"]
    assert records[0]["id"] == "chatcmpl-fx001"  # the record id stays the response's own
    no_envelope_id, _ = ingest_files(tmp_path / "plain", "openai.jsonl")
    assert "log_id" not in by_id(no_envelope_id)["chatcmpl-fx001"]["meta"]


def test_anthropic_blocks_become_openai_roles_and_tool_calls(tmp_path):
    records, rejected = ingest_files(tmp_path, "anthropic.jsonl")
    first = by_id(records)["msg_01fx001"]
    assert first["messages"][0] == {"role": "system", "content": "You are a weather bot."}
    target = first["messages"][-1]
    assert target["content"] == "Let me check."
    assert json.loads(target["tool_calls"][0]["function"]["arguments"]) == {"city": "Lima", "unit": "celsius"}
    assert first["tools"][0]["function"]["parameters"]["required"] == ["city", "unit"]
    assert first["meta"]["finish_reason"] == "tool_calls"
    assert first["meta"]["usage"] == {"prompt_tokens": 80, "completion_tokens": 30, "total_tokens": 110}
    msgs = by_id(records)["msg_01fx002"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user", "assistant"]
    assert msgs[2]["tool_calls"][0]["id"] == msgs[3]["tool_call_id"] == "toolu_01a"
    assert msgs[3]["content"] == '{"temp": 19}' and msgs[4]["content"] == "And is that warm?"
    assert by_id(records)["msg_01fx003"]["meta"]["finish_reason"] == "length"
    assert [(r["line"], r["reason"]) for r in rejected] == [(4, "no_completion")]
    assert "overloaded" in rejected[0]["detail"].lower()


def test_messages_format_ids_are_the_logs_own_or_a_stable_hash(tmp_path):
    records, rejected = ingest_files(tmp_path, "messages.jsonl")
    ids = [r["id"] for r in records]
    assert ids[1] == "trl-0002" and ids[0].startswith("h_")
    again, _ = ingest_files(tmp_path / "again", "messages.jsonl")
    assert [r["id"] for r in again] == ids
    assert [(r["line"], r["reason"]) for r in rejected] == [(3, "no_completion")]


def test_malformed_lines_are_rejected_with_line_and_reason(tmp_path):
    out = tmp_path / "r.jsonl"
    result = run_ingest(str(FIXTURES / "malformed.jsonl"), "-o", str(out), "--rejected", str(tmp_path / "bad.jsonl"))
    assert result.exit_code == 0, result.output
    rejected = read_jsonl(tmp_path / "bad.jsonl")
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "invalid_json"), (3, "invalid_json"), (4, "not_an_object"), (5, "blank_line"), (6, "blank_line"),
        (7, "unknown_shape"), (10, "bad_record")]
    assert all(r["file"].endswith("malformed.jsonl") and r["detail"] for r in rejected)
    kept = read_jsonl(out)
    assert [r["meta"]["line"] for r in kept] == [1, 8, 9]  # bad tool calls are curate's to judge
    n_lines = len((FIXTURES / "malformed.jsonl").read_text().splitlines())
    assert len(kept) + len(rejected) == n_lines
    assert "invalid_json 2" in result.output and "3 records" in result.output


def test_gz_parquet_directories_and_globs_give_the_same_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    shutil.copy(FIXTURES / "openai.jsonl", src / "a.jsonl")
    with gzip.open(src / "nested" / "b.jsonl.gz", "wt") as f:
        f.write((FIXTURES / "anthropic.jsonl").read_text())
    rows = read_jsonl(FIXTURES / "messages.jsonl")
    # Parquet logs usually hold nested objects as JSON strings.
    pq.write_table(pa.table({"id": [r.get("id") for r in rows], "messages": [json.dumps(r["messages"]) for r in rows],
                             "tools": [json.dumps(r["tools"]) if "tools" in r else None for r in rows]}),
                   src / "nested" / "c.parquet")
    out = tmp_path / "all.jsonl"
    assert run_ingest(str(src), str(src / "*.jsonl"), "-o", str(out)).exit_code == 0
    records = read_jsonl(out)
    expected, _ = ingest_files(tmp_path / "ref", "openai.jsonl", "anthropic.jsonl", "messages.jsonl")
    strip = [{k: v for k, v in r.items() if k != "meta"} for r in records]
    assert sorted(strip, key=lambda r: r["id"]) == sorted(
        ({k: v for k, v in r.items() if k != "meta"} for r in expected), key=lambda r: r["id"])
    assert {Path(r["meta"]["source"]).name for r in records} == {"a.jsonl", "b.jsonl.gz", "c.parquet"}


def test_same_input_gives_byte_identical_output(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "logs")
    outputs = []
    for _ in range(2):  # the outputs live in the input directory: the second run must not read them
        assert run_ingest(str(tmp_path / "logs"), "-o", str(tmp_path / "logs" / "r.jsonl")).exit_code == 0
        outputs.append([(tmp_path / "logs" / n).read_bytes() for n in ("r.jsonl", "r.rejected.jsonl")])
    assert outputs[0] == outputs[1]


def test_forced_format_rejects_other_shapes(tmp_path):
    out = tmp_path / "r.jsonl"
    assert run_ingest(str(FIXTURES / "openai.jsonl"), "-o", str(out), "--format", "anthropic").exit_code == 0
    assert read_jsonl(out) == []
    assert {r["reason"] for r in read_jsonl(tmp_path / "r.rejected.jsonl")} == {"unknown_shape"}


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl"], "missing.jsonl: no such file"),
    (["BROKEN_GZ"], "cannot read"),
])
def test_bad_input_is_one_line_error_without_traceback(tmp_path, args, message):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"messages": []}\n' * 100)[:40])
    args = [str(FIXTURES / "openai.jsonl") if a == "FIX" else str(broken) if a == "BROKEN_GZ" else a for a in args]
    result = run_ingest(*args, "-o", str(tmp_path / "r.jsonl"))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r.jsonl").exists()  # atomic: nothing half-written


def test_data_stages_do_not_import_the_training_stack():
    code = ("import sys, slmtune.cli, slmtune.data.ingest, slmtune.data.curate, slmtune.data.scrub, "
            "slmtune.synthetic.logs; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
