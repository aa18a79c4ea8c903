"""`slmtune curate` through the real CLI: secrets never survive, decoys do, filters and dedupe reconcile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import read_jsonl, write_jsonl
from slmtune.records import record_problems

FIXTURES = Path(__file__).parents[1] / "fixtures" / "logs"
runner = CliRunner()

# One planted value per line: (type, value). Every one goes into the system prompt, a user turn, a tool
# result and a tool call's arguments of its own log.
SECRETS = [
    ("EMAIL", "maria.kowalski@contoso-bank.com"),
    ("PHONE", "+1 415 555 0134"), ("PHONE", "+44 20 7946 0958"), ("PHONE", "+49 30 90182736"),
    ("PHONE", "+33 1 42 68 53 07"), ("PHONE", "(212) 555-0187"), ("PHONE", "+81-3-5412-7789"),
    ("CARD", "4539 1488 0343 6467"), ("CARD", "5500-0000-0000-0004"), ("CARD", "378282246310005"),
    ("IBAN", "DE89 3704 0044 0532 0130 00"), ("IBAN", "GB82WEST12345698765432"),
    ("SSN", "536-22-8190"),
    ("IP", "203.0.113.77"), ("IP", "2001:db8:85a3:0:0:8a2e:370:7334"),
    ("API_KEY", "sk-proj-Ab3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5hJ7kL9"),
    ("API_KEY", "AKIAIOSFODNN7EXAMPL3"),
    ("API_KEY", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("API_KEY", "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy"),
    ("JWT", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("SECRET", "hunter2-Correct!"),
    ("SECRET", "tok_9f8e7d6c5b4a39281706"),
    ("PRIVATE_KEY", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0t\n"
                    "Rgr7Ibp5Lx9hT0Zw3NqS7pQ==\n-----END RSA PRIVATE KEY-----"),
    ("URL_CREDENTIALS", "svc_admin:Pa55w0rdX9"),
]
# How each value is written in a sentence (the context that makes a password a password).
CONTEXT = {"SECRET": ["my password={v} works", "Authorization: Bearer {v}"],
           "URL_CREDENTIALS": ["db is postgres://{v}@db.internal:5432/prod"],
           "API_KEY": ["key {v} here"]}
DECOYS = ["Order #48213977", "2026-03-14", "$1,249.99", "v2.14.3", "SKU-4821-XL", "INV-2026-00413",
          "1Z999AA10123456784", "port 8080", "ref 4111 1111 1111 1112", "10.2.3", "03/14/2026", "14:30",
          "qty 12", "CUS-000123", "ORD-20481977"]
TOOL = {"type": "function", "function": {"name": "file_report", "description": "File a report.", "parameters": {
    "type": "object", "properties": {"note": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["note"], "additionalProperties": False}}}


def sentence(kind: str, value: str, i: int) -> str:
    templates = CONTEXT.get(kind, ["see {v} please"])
    return templates[i % len(templates)].format(v=value)


def secret_log(i: int, kind: str, value: str) -> dict:
    s = sentence(kind, value, i)
    args = json.dumps({"note": f"{s}; {DECOYS[i % len(DECOYS)]}", "count": i})
    return {"request": {"model": "gpt-4o", "messages": [
        {"role": "system", "content": f"Internal: {s}. Never share it."},
        {"role": "user", "content": f"Case {i}: {s}. Also {' / '.join(DECOYS)}."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "file_report", "arguments": args}}]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"status": "filed", "echo": s})}],
        "tools": [TOOL], "user": s},  # gateways log the end user beside the call: it lands in meta
        "response": {"id": f"chatcmpl-s{i}", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}b", "type": "function", "function": {
                "name": "file_report", "arguments": json.dumps({"note": f"again: {s}", "count": i + 1})}}]}}]}}


def cli(*args: str) -> object:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def ingest_and_curate(tmp_path: Path, logs: list[dict], *curate_args: str) -> tuple[list, list, dict]:
    write_jsonl(tmp_path / "logs.jsonl", logs)
    cli("ingest", str(tmp_path / "logs.jsonl"), "-o", str(tmp_path / "records.jsonl"))
    cli("curate", str(tmp_path / "records.jsonl"), "-o", str(tmp_path / "curated.jsonl"),
        "--report", str(tmp_path / "report.json"), *curate_args)
    return (read_jsonl(tmp_path / "curated.jsonl"), read_jsonl(tmp_path / "curated.rejected.jsonl"),
            json.loads((tmp_path / "report.json").read_text()))


@pytest.fixture(scope="module")
def scrubbed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secrets")
    kept, rejected, report = ingest_and_curate(tmp, [secret_log(i, k, v) for i, (k, v) in enumerate(SECRETS)],
                                               "--near-dup", "0")
    return tmp, kept, rejected, report


def test_planted_secrets_never_survive_in_any_form(scrubbed):
    tmp, kept, rejected, _ = scrubbed
    assert len(kept) == len(SECRETS) and rejected == []
    text = (tmp / "curated.jsonl").read_text()
    decoded = json.dumps(kept, ensure_ascii=False).replace("\\n", "\n").replace('\\"', '"')
    for kind, value in SECRETS:
        forms = {value, re.sub(r"\s", "", value)}
        if kind in ("PHONE", "CARD", "IBAN", "SSN"):
            forms.add(re.sub(r"\D", "", value))
        for form in forms:
            assert form not in text and form not in decoded, (kind, form)


def test_each_place_gets_the_same_typed_placeholder(scrubbed):
    _, kept, _, report = scrubbed
    for rec, (kind, _) in zip(kept, SECRETS, strict=False):
        system, user, call, tool, target = rec["messages"]
        ph = re.search(rf"<{kind}_\d+>", system["content"]).group()
        args = json.loads(call["tool_calls"][0]["function"]["arguments"])  # still valid JSON
        target_args = json.loads(target["tool_calls"][0]["function"]["arguments"])
        assert ph in user["content"] and ph in args["note"] and ph in target_args["note"], rec
        assert ph in json.loads(tool["content"])["echo"]
        assert isinstance(args["count"], int) and record_problems(rec) == []
    counts = report["pii_placeholders"]
    assert set(counts) == {k for k, _ in SECRETS}
    assert counts["PHONE"] == 6 and counts["CARD"] == 3


def test_decoy_numbers_survive(scrubbed):
    _, kept, _, _ = scrubbed
    for rec in kept:
        user = rec["messages"][1]["content"]
        for decoy in DECOYS:
            assert decoy in user, (decoy, user)


def test_same_value_in_other_spellings_maps_to_one_placeholder(tmp_path):
    log = {"messages": [{"role": "user", "content": "Call +1 415 555 0134 or (415) 555-0134; mail Ann@X.org"},
                        {"role": "assistant", "content": "Calling 415.555.0134 and writing to ann@x.org."}]}
    kept, _, _ = ingest_and_curate(tmp_path, [log])
    user, reply = (m["content"] for m in kept[0]["messages"])
    assert user == "Call <PHONE_1> or <PHONE_1>; mail <EMAIL_1>"
    assert reply == "Calling <PHONE_1> and writing to <EMAIL_1>."


def test_on_secret_drop_rejects_records_with_secrets_only(tmp_path):
    logs = [secret_log(i, k, v) for i, (k, v) in enumerate(SECRETS)]
    kept, rejected, report = ingest_and_curate(tmp_path, logs, "--on-secret", "drop", "--near-dup", "0")
    secret_kinds = {"API_KEY", "JWT", "SECRET", "PRIVATE_KEY", "URL_CREDENTIALS"}
    assert sorted(r["id"] for r in rejected) == sorted(f"chatcmpl-s{i}" for i, (k, _) in enumerate(SECRETS)
                                                       if k in secret_kinds)
    assert {r["reason"] for r in rejected} == {"secret"}
    assert len(kept) == sum(k not in secret_kinds for k, _ in SECRETS)
    text = (tmp_path / "curated.rejected.jsonl").read_text()
    assert all(v not in text for k, v in SECRETS if k != "PRIVATE_KEY")  # rejected records are scrubbed too
    assert report["records_in"] == report["kept"] + report["rejected"]


def record(user: str, reply: str | None = "ok", **extra) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply} | extra.pop("target", {})]
    return {"id": extra.pop("id", user[:20]), "messages": msgs} | extra


def call(name: str, arguments: str) -> dict:
    return {"content": None, "tool_calls": [{"id": "c1", "type": "function",
                                             "function": {"name": name, "arguments": arguments}}]}


LONG = "Please review the following quarterly numbers for the northern region and tell me what stands out " * 3


def test_every_filter_and_dedupe_has_its_reason_and_counts_reconcile(tmp_path):
    w = TOOL | {"function": TOOL["function"] | {"name": "w"}}
    rows = [
        record("keep me"),
        record("empty", ""),
        record("cut", "Roses are", meta={"finish_reason": "length"}),
        record("errored", "x", meta={"finish_reason": "error"}),
        record("bad json", target=call("w", '{"note": "x"'), tools=[w]),
        record("undefined", target=call("nope", '{"note": "x"}'), tools=[w]),
        record("schema", target=call("w", '{"note": 5, "count": "many"}'), tools=[w]),
        record("long " + "x" * 600),
        record("keep me", id="copy"),                    # exact duplicate of the first
        record("KEEP   me", id="copy2"),                 # the same once normalized
        record(LONG, "a"),
        record(LONG + " thanks", "a", id="near"),      # near duplicate of the prompt and answer above
        record(LONG + " please", "b", id="next"),      # the same prompt answered differently: kept
        record("keep tool", target=call("w", '{"note": "fine", "count": 2}'), tools=[w]),
    ]
    path = tmp_path / "records.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as f:
        f.write('{"id": "broken", "messages": [\n{"messages": "not a list"}\n\n')
    cli("curate", str(path), "-o", str(tmp_path / "out.jsonl"), "--report", str(tmp_path / "rep.json"),
        "--max-chars", "500")
    kept = read_jsonl(tmp_path / "out.jsonl")
    rejected = read_jsonl(tmp_path / "out.rejected.jsonl")
    assert [r["id"] for r in kept] == ["keep me", LONG[:20], "next", "keep tool"]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "empty_completion"), (3, "truncated"), (4, "errored"), (5, "tool_args_not_json"), (6, "unknown_tool"),
        (7, "tool_args_schema"), (8, "too_long"), (9, "duplicate"), (10, "duplicate"), (12, "near_duplicate"),
        (15, "invalid_json"), (16, "invalid_record"), (17, "blank_line")]
    assert rejected[7]["duplicate_of"] == "keep me" and "note" in rejected[5]["detail"]
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["records_in"] == 17 == rep["kept"] + rep["rejected"] == len(kept) + len(rejected)
    assert sum(rep["rejected_by_reason"].values()) == rep["rejected"]
    assert rep["duplicates_removed"] == {"exact": 2, "near": 1}


def test_a_logged_answer_without_finish_reason_is_unfinished(tmp_path):
    # An upstream stream that broke off was logged as an answer with finish_reason null: maybe cut off.
    def openai(i: int, finish: str | None) -> dict:
        return {"request": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"Where is order {i}?"}]},
                "response": {"id": f"chatcmpl-u{i}", "choices": [{"index": 0, "finish_reason": finish, "message": {
                    "role": "assistant", "content": "Your order is on its"}}]}}
    anthropic = {"request": {"model": "claude-3-5-haiku", "max_tokens": 64, "messages": [
        {"role": "user", "content": "Summarize the thread."}]},
        "response": {"id": "msg_u3", "type": "message", "content": [{"type": "text", "text": "Alice asked"}]}}
    plain = {"id": "plain", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    kept, rejected, report = ingest_and_curate(tmp_path, [openai(1, None), openai(2, "stop"), anthropic, plain],
                                               "--near-dup", "0")
    assert [r["id"] for r in kept] == ["chatcmpl-u2", "plain"]  # messages records never carry a finish_reason
    assert [(r["id"], r["reason"], r["detail"]) for r in rejected] == [
        (i, "unfinished", "no finish_reason: the answer may be cut off") for i in ("chatcmpl-u1", "msg_u3")]
    assert rejected[0]["record"]["messages"][-1]["content"] == "Your order is on its"
    assert report["rejected_by_reason"] == {"unfinished": 2}


def test_malformed_fixture_end_to_end_reconciles(tmp_path):
    cli("ingest", str(FIXTURES / "malformed.jsonl"), "-o", str(tmp_path / "r.jsonl"))
    cli("curate", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "c.jsonl"), "--report", str(tmp_path / "rep.json"))
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["rejected_by_reason"] == {"tool_args_not_json": 1, "unknown_tool": 1}
    n_lines = len((FIXTURES / "malformed.jsonl").read_text().splitlines())
    ingest_rejected = len(read_jsonl(tmp_path / "r.rejected.jsonl"))
    assert n_lines == ingest_rejected + rep["records_in"] and rep["records_in"] == rep["kept"] + rep["rejected"]


def test_curate_twice_is_byte_identical_and_bad_options_fail_cleanly(tmp_path):
    cli("ingest", str(FIXTURES), "-o", str(tmp_path / "r.jsonl"))
    for run in ("a", "b"):
        cli("curate", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / run / "c.jsonl"),
            "--report", str(tmp_path / run / "rep.json"))
    for name in ("c.jsonl", "c.rejected.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for bad in (["--on-secret", "keep"], ["--near-dup", "2"], ["--scrubber", "spacy"]):  # usage errors: exit 2
        result = runner.invoke(app, ["curate", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "x.jsonl"), *bad])
        assert result.exit_code == 2 and bad[0] in result.output and "Traceback" not in result.output, result.output
    from slmtune.data.curate import CurateConfig, curate
    from slmtune.errors import SlmtuneError

    with pytest.raises(SlmtuneError) as e:  # the stage checks the same for Python callers, every problem at once
        curate(tmp_path / "r.jsonl", tmp_path / "x.jsonl", config=CurateConfig(on_secret="keep", near_dup=2))
    assert "--on-secret must be redact or drop, got 'keep'" in str(e.value) and "--near-dup" in str(e.value)
    result = runner.invoke(app, ["curate", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1 and "nope.jsonl: no such file" in result.output


def test_worker_processes_give_the_same_bytes_as_one_process(tmp_path):
    from slmtune.synthetic.logs import write_logs

    write_logs(tmp_path / "syn", 600, seed=11, noise=0.05)
    cli("ingest", str(tmp_path / "syn" / "logs"), "-o", str(tmp_path / "r.jsonl"))
    for workers in ("1", "2"):
        cli("curate", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / workers / "c.jsonl"), "--workers", workers,
            "--report", str(tmp_path / workers / "rep.json"))
    for name in ("c.jsonl", "c.rejected.jsonl"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "2" / "c.jsonl"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(read_jsonl(tmp_path / "2" / "c.jsonl"))
    assert all(record_problems(r) == [] for r in read_jsonl(tmp_path / "2" / "c.jsonl"))
    rep, rep1 = (json.loads((tmp_path / w / "rep.json").read_text()) for w in ("2", "1"))
    assert {k: v for k, v in rep.items() if "output" not in k} == {k: v for k, v in rep1.items() if "output" not in k}
    assert rep["kept"] > 400 and rep["duplicates_removed"]["exact"] > 0 and rep["pii_placeholders"]["EMAIL"] > 50
    ingested, ingest_rejected = read_jsonl(tmp_path / "r.jsonl"), read_jsonl(tmp_path / "r.rejected.jsonl")
    assert len(ingested) + len(ingest_rejected) == 600 and rep["records_in"] == len(ingested)
    assert rep["records_in"] == rep["kept"] + rep["rejected"] == rep["kept"] + sum(rep["rejected_by_reason"].values())
