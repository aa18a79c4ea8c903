"""The synthetic log generator: deterministic, label-free logs, correct teacher outputs, planted PII."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

from slmtune.data.ingest import Rejected, to_record
from slmtune.data.scrub import SECRET_TYPES, scrub_record
from slmtune.io import read_jsonl
from slmtune.records import record_problems
from slmtune.synthetic.errands import INTENTS, SENTIMENT
from slmtune.synthetic.logs import ERRANDS, generate_logs, generate_logs_planted, write_logs


def records(n: int, seed: int = 0, **kw) -> list[tuple[dict, str]]:
    return [(to_record(log)[0], errand) for log, errand in generate_logs(n, seed, **kw)]


def test_errands_and_their_categories():
    assert len(ERRANDS) >= 10
    assert ERRANDS["tool_calling-get_weather"] == "tool_calling"
    assert ERRANDS["classification-sentiment"] == "classification"
    assert {"extraction-ticket", "extraction-contact", "summarization-thread", "coding-sql",
            "generation-reply", "tool_calling-search_orders", "tool_calling-create_ticket",
            "classification-intent"} <= set(ERRANDS)


def test_same_seed_same_logs_other_seed_other_logs():
    dump = lambda seed: [json.dumps(x) for x in generate_logs(300, seed=seed)]  # noqa: E731
    assert dump(7) == dump(7)
    assert dump(7) != dump(8)


def test_label_never_leaks_and_every_format_and_errand_appears():
    seen_formats, seen_errands = Counter(), Counter()
    for log, errand in generate_logs(3000, seed=1):
        text = json.dumps(log)
        assert errand not in text and errand.split("-", 1)[0] not in text
        fmt = "messages" if "messages" in log else ("anthropic" if "content" in log["response"] else "openai")
        seen_formats[fmt] += 1
        seen_errands[errand] += 1
    assert set(seen_formats) == {"openai", "messages", "anthropic"}
    assert set(seen_errands) == set(ERRANDS) and min(seen_errands.values()) > 200


def test_teacher_outputs_are_a_function_of_the_input():
    for rec, errand in records(2000, seed=2):
        assert record_problems(rec) == []
        user = " ".join(next(m["content"] for m in rec["messages"] if m["role"] == "user").split())
        target = rec["messages"][-1]
        calls = target.get("tool_calls") or []
        args = json.loads(calls[0]["function"]["arguments"]) if calls else None
        if errand == "tool_calling-get_weather":
            assert args["city"] in user
            assert args["unit"] == ("fahrenheit" if re.search("fahrenheit|°F", user) else "celsius")
        elif errand == "tool_calling-search_orders" and calls[0]["function"]["name"] == "search_orders":
            assert args["customer_email"] in user and str(args["limit"]) in user
        elif errand == "tool_calling-create_ticket":
            tool = next(m for m in rec["messages"] if m["role"] == "tool")
            assert args["customer_id"] == json.loads(tool["content"])["customer_id"]
        elif errand == "classification-sentiment":
            assert any(w in user for w in SENTIMENT[target["content"]])
        elif errand == "classification-intent":
            assert any(p.lower() in user.lower() for p in INTENTS[target["content"]])
        elif errand in ("extraction-ticket", "extraction-contact"):
            assert isinstance(json.loads(target["content"]), dict)
        elif errand == "coding-sql":
            assert target["content"].startswith("```sql\nSELECT")


def test_many_distinct_prompts_per_errand_with_some_near_duplicates():
    prompts = defaultdict(list)
    for rec, errand in records(4000, seed=3, pii=False):
        prompts[errand].append(next(m["content"] for m in rec["messages"] if m["role"] == "user"))
    for errand, texts in prompts.items():
        assert len(set(texts)) > 0.6 * len(texts) and len(set(texts)) > 150, errand
    lowered = sum(len(texts) - len({t.lower().strip() for t in texts}) for texts in prompts.values())
    assert 0 < lowered < 0.2 * 4000  # repeats and light rewording exist, but are a minority


def test_planted_pii_is_in_the_log_and_consistent_with_tool_arguments():
    n_planted, kinds = 0, set()
    for log, _errand, planted in generate_logs_planted(1500, seed=4):
        text = json.dumps(log, ensure_ascii=False)
        for _, value in planted:
            assert json.dumps(value, ensure_ascii=False)[1:-1] in text
        n_planted += len(planted)
        call = to_record(log)[0]["messages"][-1].get("tool_calls", [{}])[0].get("function", {})
        if call.get("name") == "search_orders":
            assert ("EMAIL", json.loads(call["arguments"])["customer_email"]) in planted
        kinds.update(t for t, _ in planted)
    assert n_planted > 1500 * 0.5
    assert kinds >= {
        "EMAIL", "PHONE", "CARD", "IBAN", "SSN", "IP", "API_KEY", "JWT", "SECRET", "PRIVATE_KEY", "URL_CREDENTIALS"}


def test_without_pii_nothing_is_planted_and_no_secret_is_found():
    for log, _, planted in generate_logs_planted(500, seed=5, pii=False):
        assert planted == []
        _, counts = scrub_record(to_record(log)[0])
        assert not set(counts) & SECRET_TYPES


def test_noise_makes_defects_ingest_or_curate_can_name():
    rejected = sum(1 for log, _ in generate_logs(1000, seed=6, noise=0.2) if _rejects(log))
    assert 20 < rejected < 200  # errored / empty Anthropic responses have no completion at all


def _rejects(log: dict) -> bool:
    try:
        to_record(log)
    except Rejected:
        return True
    return False


def test_write_logs_labels_match_the_ids_ingest_assigns(tmp_path):
    paths = write_logs(tmp_path, 400, seed=9)
    assert sorted(paths) == ["anthropic", "labels", "messages", "openai"]
    labels = read_jsonl(paths["labels"])
    assert len(labels) == 400 and set(Counter(x["errand"] for x in labels)) <= set(ERRANDS)
    for lab in labels[:60]:
        lines = (tmp_path / "logs" / lab["file"]).read_text().splitlines()
        rec, _ = to_record(json.loads(lines[lab["line"] - 1]))
        assert rec["id"] == lab["id"]
