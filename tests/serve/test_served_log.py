"""The served-call log on its own, with real files: a bounded queue that drops and counts, size rotation that
ingest reads back in order, message names scrubbed with the rest, and curate's scrubber backends."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from slmtune.data.ingest import expand_inputs, ingest
from slmtune.errors import SlmtuneError
from slmtune.io import dumps, read_jsonl
from slmtune.serve.served_log import ServedLog, log_files, log_line, scrub_line, scrub_text


def line(i: int, day: str = "2026-03-14", **msg) -> dict:
    request = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": f"Question number {i}?"} | msg]}
    response = {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4.1-mini", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"Answer {i}."}}]}
    out = log_line(f"call-{i}", request, response, 0.25, task=None, answered_by="llm", reason="no_route", extra={})
    return out | {"timestamp": f"{day}T12:00:{i % 60:02d}Z"}


def written(folder: Path, errors: bool = False) -> list[dict]:
    return [x for f in log_files(folder, errors) for x in read_jsonl(f)]


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path, monkeypatch, caplog):
    served = ServedLog(tmp_path, False, max_queue=3)
    holding, release = threading.Event(), threading.Event()
    real = served._write_one

    def blocked(item: dict, errors: bool) -> None:  # the writer stuck on a slow disk, holding line 0
        holding.set()
        release.wait(30)
        real(item, errors)

    monkeypatch.setattr(served, "_write_one", blocked)  # looked up per line by the writer thread
    served.write(line(0))
    assert holding.wait(30)
    with caplog.at_level(logging.WARNING, logger="slmtune.serve"):
        for i in range(1, 11):
            served.write(line(i))  # a put that waited would hang here: the writer is held
    assert served.dropped == 7  # lines 1-3 fill the queue of 3; 4-10 are dropped
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "queue is full (3 lines)" in warnings[0].getMessage()  # once a minute at most
    release.set()
    served.close()
    assert [x["id"] for x in written(tmp_path)] == ["call-0", "call-1", "call-2", "call-3"]


def test_files_roll_over_under_max_bytes_and_ingest_reads_them_all_in_order(tmp_path):
    lines = [line(i) for i in range(33)] + [line(i, day="2026-03-15") for i in range(33, 43)]
    size = len(dumps(lines[0])) + 1
    max_bytes = 3 * size + size // 2  # three lines a file
    folder = tmp_path / "served"
    served = ServedLog(folder, False, max_bytes=max_bytes)
    for x in lines:
        served.write(x)
    served.write(line(99), errors=True)
    served.close()
    files = log_files(folder)
    assert [f.name for f in files[:3]] == ["2026-03-14.jsonl", "2026-03-14.1.jsonl", "2026-03-14.2.jsonl"]
    assert [f.name for f in files[9:12]] == ["2026-03-14.9.jsonl", "2026-03-14.10.jsonl", "2026-03-15.jsonl"]
    assert len(files) == 15
    assert all(f.stat().st_size <= max_bytes and f.read_bytes().endswith(b"\n") for f in files)
    assert written(folder) == lines  # every line once, whole, in the order written
    assert [f.name for f in log_files(folder, errors=True)] == ["2026-03-14.errors.log"]
    assert expand_inputs([folder]) == files  # in the order written (.10 after .9); error logs are not training data

    summary = ingest([folder], tmp_path / "records.jsonl")
    assert summary.kept == len(lines) and summary.rejected == 0
    assert [r["id"] for r in read_jsonl(summary.out)] == [f"chatcmpl-{i}" for i in range(43)]

    again = ServedLog(folder, False, max_bytes=max_bytes)  # a restarted server goes on after the last file
    again.write(line(43, day="2026-03-15"))
    again.write(line(44, day="2026-03-15") | {"pad": "x" * max_bytes})  # too long for any file: one of its own
    again.close()
    assert [f.name for f in log_files(folder)[-3:]] == ["2026-03-15.2.jsonl", "2026-03-15.3.jsonl",
                                                          "2026-03-15.4.jsonl"]
    assert [x["id"] for x in written(folder)[-3:]] == ["call-42", "call-43", "call-44"]


def test_message_names_share_placeholders_with_the_text(tmp_path):
    x = line(1, name="jane.doe@example.com", content="Mail jane.doe@example.com, or call +1 415 555 0134.")
    x["request"]["messages"] += [
        {"role": "assistant", "name": "+1 415 555 0134", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup_customer", "arguments": "{}"}}]},
        {"role": "tool", "name": "lookup_customer", "tool_call_id": "c1", "content": "{\"found\": true}"}]
    x["response"]["choices"][0]["message"]["name"] = "agent for jane.doe@example.com"
    clean = scrub_line(x)
    user, helper, tool = clean["request"]["messages"]
    assert user == {"role": "user", "content": "Mail <EMAIL_1>, or call <PHONE_1>.", "name": "<EMAIL_1>"}
    assert helper["name"] == "<PHONE_1>" and tool["name"] == "lookup_customer"
    assert clean["response"]["choices"][0]["message"]["name"] == "agent for <EMAIL_1>"
    assert [m.get("name") for m in x["request"]["messages"]][:2] == ["jane.doe@example.com", "+1 415 555 0134"]

    served = ServedLog(tmp_path, True)  # the writer scrubs the same way
    served.write(x)
    served.close()
    text = (tmp_path / "2026-03-14.jsonl").read_text()
    assert "jane.doe" not in text and "415" not in text and json.loads(text) == clean


def test_scrub_text_for_upstream_error_bodies():
    body = '{"error": {"message": "quota exceeded for key sk-proj-Ab3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3f (ann@x.org)"}}'
    assert scrub_text(body) == '{"error": {"message": "quota exceeded for key <API_KEY_1> (<EMAIL_1>)"}}'


def test_presidio_scrubber_is_used_when_asked(tmp_path):
    pytest.importorskip("presidio_analyzer")
    x = line(1, name="Ann Lee", content="Hello, my name is Ann Lee and I live at 12 Baker Street, London.")
    x["request"]["messages"].append({"role": "tool", "name": "Get_Order", "tool_call_id": "c1", "content": "{}"})
    regex = scrub_line(x)["request"]["messages"][0]
    assert regex["name"] == "Ann Lee" and "Ann Lee" in regex["content"]  # regexes know no names
    served = ServedLog(tmp_path, True, "presidio")
    served.write(x)
    served.close()
    user, tool = json.loads((tmp_path / "2026-03-14.jsonl").read_text())["request"]["messages"]
    assert user["name"] == "<PERSON_1>" and user["content"] == "Hello, my name is <PERSON_1> and I live at <ADDRESS_1>."
    assert tool["name"] == "Get_Order"  # a function name is no person
    assert scrub_text("Upstream: my name is Ann Lee.", "presidio") == "Upstream: my name is <PERSON_1>."


def test_bad_settings_and_a_missing_presidio_fail_at_construction(tmp_path, monkeypatch):
    with pytest.raises(SlmtuneError) as e:
        ServedLog(tmp_path, True, "spacy", max_queue=0)
    assert "got 'spacy'" in str(e.value) and "max_queue must be >= 1, got 0" in str(e.value)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "presidio_analyzer" else find_spec(name, *a))
    with pytest.raises(SlmtuneError, match="presidio-analyzer") as e:
        ServedLog(tmp_path, True, "presidio")
    assert "slmtune[presidio]" in e.value.hint
    ServedLog(tmp_path, False, "presidio").close()  # nothing to scrub, nothing to load


def test_a_scrubber_that_fails_to_load_drops_lines_rather_than_leak(tmp_path, monkeypatch):
    from slmtune.serve import served_log

    def broken(name: str):
        raise RuntimeError("spaCy is broken")

    monkeypatch.setattr(served_log, "_backend", broken)
    served = ServedLog(tmp_path, True)
    served.write(line(1))
    served.close()
    assert served.dropped == 1 and log_files(tmp_path) == []
