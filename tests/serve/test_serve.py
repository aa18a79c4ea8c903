"""`slmtune serve` over real HTTP on 127.0.0.1: a flywheel workdir of the tiny model, the stand-in upstream, the
real `openai` client and httpx. One flywheel round (`work`, tests/serve/conftest.py) feeds every test."""

import asyncio
import json
import math
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.serve.asgi import serve_in_thread
from slmtune.serve.config import ServeConfig, checkpoints, load_router
from slmtune.serve.engine import EmbeddedEngine
from slmtune.serve.guard import check_answer, request_problems, to_record
from slmtune.serve.jobs import Params
from slmtune.serve.server import create_app
from slmtune.serve.vllm import vllm_commands
from slmtune.serve.wire import StreamAssembler
from slmtune.synthetic.upstream import UNKNOWN_ANSWER

WEATHER, SENTIMENT = "tool_calling-get_weather", "classification-sentiment"
POEM = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "Write me a poem about the sea."}]}


def cli(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + (result.stderr or "") + repr(result.exception)
    return result


def router_with_thresholds(work, thresholds: dict) -> Path:
    """A copy of the flywheel's router.json whose routes carry these confidence thresholds (by category)."""
    router = json.loads((work["work"] / "router.json").read_text())
    for r in router["routes"]:
        r["threshold"] = thresholds.get(r["category"])
    folder = work["root"] / ("router-" + "-".join(f"{k}{v}" for k, v in sorted(thresholds.items())))
    folder.mkdir(exist_ok=True)
    (folder / "router.json").write_text(json.dumps(router))
    return folder / "router.json"


@pytest.fixture(scope="module")
def servers(work, upstream, server_pool):
    """Servers started on demand by name, each with its own config and served-log folder; stopped at the end."""
    up = upstream["url"] + "/v1"
    yield from server_pool({
        "sure": dict(upstream=up, router=router_with_thresholds(work, {"tool_calling": 0.0})),
        "picky": dict(upstream=up, router=router_with_thresholds(work, {"tool_calling": 1.0})),
        "main": dict(upstream=up),
        "constrained": dict(upstream=up, decoding="constrained"),
        "free": dict(upstream=up, decoding="free"),
        "locked": dict(api_key_env="SLMTUNE_TEST_KEY", max_body_bytes=20_000, min_score=(("*", 0.5),)),
        "impatient": dict(upstream=up, slm_timeout_s=0.001),
    }, "served-")


def ask(server: dict, **request):
    raw = server["client"].chat.completions.with_raw_response.create(**request)
    return raw.parse(), raw.headers


def served_lines(log_dir: Path, *response_ids: str, timeout_s: float = 20.0) -> list[dict]:
    """The served log's lines once every given response id is in it (the writer thread appends after the
    response, in order, so earlier calls' lines are then in too)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(x) for p in sorted(log_dir.glob("*.jsonl")) for x in p.open()]
        if set(response_ids) <= {(x.get("response") or {}).get("id") for x in lines} or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def teacher(log: dict) -> dict:
    return log["response"]["choices"][0]["message"]


# ----------------------------------------------------------------------------- routed requests
def test_routed_tool_call_is_answered_by_its_export_or_falls_back_with_a_reason(work, servers):
    log = work["weather_logs"][0]
    resp, headers = ask(servers("main"), **log["request"], max_tokens=48)
    assert headers["x-slmtune-task"] == work["weather"]["task"]
    export = Path(work["weather"]["checkpoint"]).name
    if "x-slmtune-fallback" in headers:  # the 2-step tiny model rarely writes a valid call: the LLM answered
        assert headers["x-slmtune-fallback"] in ("invalid_output", "schema_invalid")
        assert headers["x-slmtune-route"] == "llm" and resp.model.startswith("stand-in/")
        call = resp.choices[0].message.tool_calls[0].function
        assert (call.name, json.loads(call.arguments)) == (
            teacher(log)["tool_calls"][0]["function"]["name"],
            json.loads(teacher(log)["tool_calls"][0]["function"]["arguments"]))
    else:
        assert headers["x-slmtune-route"] == work["weather"]["task"] and resp.model == export
        assert resp.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_constrained_decoding_passes_the_guard_and_the_export_answers(work, servers):
    """By default a tool-calling route decodes under the request's tools grammar: with tool_choice "required"
    (no text answer allowed) even the 2-step tiny model writes a call that passes the guard, which it does not
    when decoding free."""
    log = work["weather_logs"][1]
    # 400 tokens: room for the grammar's longest call (free strings hold up to 256 characters while serving)
    request = {**log["request"], "max_tokens": 400, "parallel_tool_calls": False, "tool_choice": "required"}
    _, headers = ask(servers("free"), **request)
    assert headers["x-slmtune-fallback"] in ("invalid_output", "schema_invalid")
    server = servers("main")
    resp, headers = ask(server, **request)
    assert "x-slmtune-fallback" not in headers
    assert headers["x-slmtune-route"] == work["weather"]["task"]
    assert resp.model == Path(work["weather"]["checkpoint"]).name
    assert resp.choices[0].finish_reason == "tool_calls" and len(resp.choices[0].message.tool_calls) == 1
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), log["request"]["tools"][0]["function"]["parameters"])
    assert resp.usage.completion_tokens > 0

    named = {**request, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    resp, headers = ask(servers("constrained"), **named)
    assert "x-slmtune-fallback" not in headers and resp.choices[0].message.tool_calls[0].function.name == "get_weather"

    label_log = work["sentiment_logs"][0]  # labels are decoded under their grammar with --decoding constrained only
    resp, headers = ask(servers("constrained"), **label_log["request"], max_tokens=32)
    assert headers["x-slmtune-route"] == work["sentiment"]["task"] and "x-slmtune-fallback" not in headers
    labels = json.loads(Path(work["sentiment"]["checkpoint"], "slmtune.json").read_text())["task"]["schema"]["enum"]
    assert resp.choices[0].message.content in labels


def test_an_answer_below_its_routes_confidence_threshold_goes_upstream(work, servers):
    """router.json's per-route `threshold` (calibrated by the flywheel): a well-formed answer less confident than
    it goes to the upstream (`low_confidence`); either way the served log keeps the SLM answer's confidence."""
    log = work["weather_logs"][1]
    request = {**log["request"], "max_tokens": 400, "parallel_tool_calls": False, "tool_choice": "required"}
    sure, picky = servers("sure"), servers("picky")
    resp, headers = ask(sure, **request)  # threshold 0: the answer that passes the guard is served
    assert "x-slmtune-fallback" not in headers and headers["x-slmtune-route"] == work["weather"]["task"]
    line = next(x for x in served_lines(sure["log_dir"], resp.id) if x["response"].get("id") == resp.id)
    conf = line["metadata"]["slmtune_confidence"]
    assert 0.0 < conf < 1.0  # the tiny model is never certain of a city name
    resp, headers = ask(picky, **request)  # threshold 1: no answer is that sure
    assert headers["x-slmtune-fallback"] == "low_confidence" and headers["x-slmtune-route"] == "llm"
    assert headers["x-slmtune-task"] == work["weather"]["task"] and resp.model.startswith("stand-in/")
    line = next(x for x in served_lines(picky["log_dir"], resp.id) if x["response"].get("id") == resp.id)
    meta = line["metadata"]
    assert meta["slmtune_fallback"] == "low_confidence" and meta["slmtune_answered_by"] == "llm"
    assert meta["slmtune_confidence"] == pytest.approx(conf, abs=1e-4)  # same request, same greedy answer
    metrics = httpx.get(picky["url"] + "/metrics").text
    assert f'slmtune_answer_confidence_count{{route="{work["weather"]["task"]}"}} 1.0' in metrics
    assert 'slmtune_fallbacks_total{reason="low_confidence"} 1.0' in metrics


def test_serve_grammar_follows_tool_choice_and_the_decoding_default():
    """The serving grammar: a named tool_choice narrows the call to that tool, "required" (or a named tool) rules
    the text answer out; `decoding` auto (the default) constrains tool-calling routes only."""
    import concurrent.futures

    from slmtune.serve.grammar import request_grammar
    from slmtune.serve.jobs import Checkpoint, Job

    tool = {"type": "function", "function": {"name": "a_tool", "parameters": {"type": "object", "properties": {
        "x": {"type": "string"}}, "required": ["x"]}}}
    decoy = {"type": "function", "function": {"name": "b_tool", "parameters": {"type": "object"}}}
    ck = Checkpoint("e", "t", "tool_calling", None, "p", "merged", None)
    record = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool, decoy]}

    def grammar(**params) -> str:
        return request_grammar(Job(ck, record, Params(constrained=True, **params), 0.0,
                             future=concurrent.futures.Future()))

    free = grammar()
    assert "a_tool" in free and "b_tool" in free and "text" in free.split("\n")[0]
    narrowed = grammar(tool="b_tool", allow_text=False)
    assert "b_tool" in narrowed and "a_tool" not in narrowed and "text" not in narrowed.split("\n")[0]
    config = ServeConfig(router=Path("router.json"))
    assert config.constrained_for("tool_calling") and not config.constrained_for("classification")
    assert ServeConfig(router=Path("r"), decoding="constrained").constrained_for("classification")
    assert not ServeConfig(router=Path("r"), decoding="free").constrained_for("tool_calling")


def test_a_tool_choice_naming_a_tool_not_offered_goes_upstream(work, servers):
    log = work["weather_logs"][5]
    request = {**log["request"], "max_tokens": 48,
               "tool_choice": {"type": "function", "function": {"name": "not_offered"}}}
    _, headers = ask(servers("main"), **request)
    assert headers["x-slmtune-fallback"] == "unsupported" and headers["x-slmtune-route"] == "llm"


def test_streamed_export_answer_matches_the_whole_one(work, servers):
    server = servers("main")
    request = {**work["weather_logs"][2]["request"], "max_tokens": 400, "parallel_tool_calls": False,
               "tool_choice": "required"}
    whole, _ = ask(server, **request)
    raw = server["client"].chat.completions.with_raw_response.create(
        **request, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-slmtune-route"] == work["weather"]["task"]
    chunks = list(raw.parse())
    assert chunks[0].model == whole.model and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_an_answer_that_fails_the_guard_goes_to_the_llm(work, servers, upstream):
    log = work["weather_logs"][3]
    resp, headers = ask(servers("main"), **log["request"], max_tokens=1)  # one token can't be a whole tool call
    assert headers["x-slmtune-fallback"] == "invalid_output" and headers["x-slmtune-route"] == "llm"
    assert headers["x-slmtune-task"] == work["weather"]["task"]
    assert resp.model.startswith("stand-in/") and resp.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert upstream["app"].state.requests[-1] == {**log["request"], "max_tokens": 1}, "forwarded verbatim"


def test_a_timed_out_export_falls_back(work, servers):
    resp, headers = ask(servers("impatient"), **work["weather_logs"][4]["request"], max_tokens=48)
    assert headers["x-slmtune-fallback"] == "timeout" and resp.model.startswith("stand-in/")


# ----------------------------------------------------------------------------- the upstream
def test_unknown_requests_go_upstream(servers):
    server = servers("main")
    resp, headers = ask(server, **POEM)
    assert headers["x-slmtune-route"] == "llm" and headers["x-slmtune-fallback"] == "no_route"
    assert "x-slmtune-task" not in headers
    assert resp.choices[0].message.content == UNKNOWN_ANSWER and resp.model == "stand-in/teacher"
    other_tool = [{"type": "function", "function": {"name": "send_email", "parameters": {"type": "object"}}}]
    _, headers = ask(server, **POEM, tools=other_tool)
    assert headers["x-slmtune-fallback"] == "no_route"


def test_upstream_stream_passes_through(servers):
    server = servers("main")
    raw = server["client"].chat.completions.with_raw_response.create(**POEM, stream=True)
    assert raw.headers["x-slmtune-fallback"] == "no_route"
    chunks = list(raw.parse())
    assert len(chunks) > 3 and "".join(c.choices[0].delta.content or "" for c in chunks) == UNKNOWN_ANSWER


def test_upstream_errors_come_back_with_their_status(servers, upstream):
    server = servers("main")
    httpx.post(upstream["url"] + "/standin/error", json={"status": 429})
    try:
        with pytest.raises(openai.RateLimitError) as err:
            ask(server, **POEM)
    finally:
        httpx.post(upstream["url"] + "/standin/error", json={"status": None})
    assert err.value.status_code == 429 and err.value.response.headers["x-slmtune-route"] == "llm"
    assert err.value.body["code"] == "standin_429"  # the upstream's own error body, not a traceback


# ----------------------------------------------------------------------------- security and bad requests
def test_api_key_body_size_and_bad_requests(work, servers, monkeypatch):
    monkeypatch.setenv("SLMTUNE_TEST_KEY", "s3cret")
    server = servers("locked")
    url = server["url"] + "/v1/chat/completions"
    with pytest.raises(openai.AuthenticationError):
        ask(server, **POEM)  # the client sends `Bearer test-key`
    assert httpx.post(url, json=POEM).status_code == 401
    assert httpx.get(server["url"] + "/healthz").json()["status"] == "ok"  # probes need no key
    auth = {"authorization": "Bearer s3cret"}
    bad = httpx.post(url, content=b"{not json", headers=auth | {"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    shape = httpx.post(url, json={"model": "m", "messages": "hi", "temperature": 9}, headers=auth)
    assert shape.status_code == 400 and "messages" in shape.json()["error"]["message"]
    assert "temperature" in shape.json()["error"]["message"]
    big = httpx.post(url, json={**POEM, "padding": "x" * 30_000}, headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    unrouted = httpx.post(url, json=POEM, headers=auth)  # no upstream configured
    assert unrouted.status_code == 503 and unrouted.json()["error"]["code"] == "no_upstream"
    assert unrouted.headers["x-slmtune-fallback"] == "no_route"
    disabled = httpx.post(url, json=work["weather_logs"][0]["request"], headers=auth)  # tuned 0.0 < --min-score
    assert disabled.status_code == 503 and disabled.headers["x-slmtune-fallback"] == "disabled"
    models = httpx.get(server["url"] + "/v1/models", headers=auth).json()["data"]
    assert {m["id"] for m in models} == {Path(work[k]["checkpoint"]).name for k in ("weather", "sentiment")}
    assert not any(m["enabled"] for m in models)


def test_request_shape_problems_are_all_named():
    assert request_problems({"messages": []}) == ["`messages` must be a non-empty array"]
    problems = request_problems({"messages": [{"role": "bot"}], "max_tokens": 0, "stream": "yes",
                                 "tools": [{"name": "x"}], "tool_choice": "maybe"})
    assert len(problems) == 5
    assert request_problems(POEM) == []


def test_the_guard_names_what_is_wrong():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

    def call(name, args):
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": name, "arguments": args}}]}

    assert check_answer("tool_calling", None, call("get_weather", '{"city": "Oslo"}'), True, tools) is None
    assert check_answer("tool_calling", None, call("get_weather", '{"city": "Oslo"}'), False, tools) == \
        "invalid_output"
    assert check_answer("tool_calling", None, call("get_weather", "{city"), True, tools) == "invalid_output"
    assert check_answer("tool_calling", None, {"content": "It is sunny."}, True, tools) == "invalid_output"
    assert check_answer("tool_calling", None, call("send_email", "{}"), True, tools) == "schema_invalid"
    assert check_answer("tool_calling", None, call("get_weather", '{"city": 5}'), True, tools) == "schema_invalid"
    named = {"type": "function", "function": {"name": "other"}}
    assert check_answer("tool_calling", None, call("get_weather", '{"city": "Oslo"}'), True, tools, named) == \
        "schema_invalid"
    labels = {"type": "string", "enum": ["positive", "negative"]}
    assert check_answer("classification", labels, {"content": "Positive"}, True, None) is None
    assert check_answer("classification", labels, {"content": "meh"}, True, None) == "schema_invalid"
    obj = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert check_answer("extraction", obj, {"content": '```json\n{"n": 1}\n```'}, True, None) is None
    assert check_answer("extraction", obj, {"content": '{"n": "one"}'}, True, None) == "schema_invalid"
    assert check_answer("extraction", obj, {"content": "n is 1"}, True, None) == "invalid_output"
    assert check_answer("summarization", None, {"content": "  "}, True, None) == "invalid_output"


def test_the_guard_defers_a_scrub_placeholder_the_request_does_not_hold():
    """An SLM trained on scrubbed logs learned that a password is written <SECRET_1>: asked with the real one, it
    may still answer the placeholder (6 of 428 BFCL calls in bench_quality, at confidence up to 0.96)."""
    tools = [{"type": "function", "function": {"name": "add_server", "parameters": {
        "type": "object", "properties": {"host": {"type": "string"}, "password": {"type": "string"}}}}}]
    asked = [{"role": "user", "content": "Add db.example.com with password 1234567890."}]
    answer = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add_server", "arguments": '{"host": "db.example.com", "password": "<SECRET_1>"}'}}]}
    assert check_answer("tool_calling", None, answer, True, tools) == "placeholder"  # no prompt: nothing holds it
    assert check_answer("tool_calling", None, answer, True, tools, prompt=asked) == "placeholder"
    scrubbed = [{"role": "user", "content": "Add db.example.com with password <SECRET_1>."}]
    assert check_answer("tool_calling", None, answer, True, tools, prompt=scrubbed) is None  # the client's own
    angle = {"role": "assistant", "content": "Use <br_1> or <Secret_1> or <ZIP_1>."}  # not slmtune's placeholders
    assert check_answer("summarization", None, angle, True, None, prompt=asked) is None
    email = {"role": "assistant", "content": "Forward it to <EMAIL_2>."}
    assert check_answer("summarization", None, email, True, None, prompt=asked) == "placeholder"
    assert check_answer("tool_calling", None, {"content": "<SECRET_1>"}, True, tools, prompt=asked) == \
        "invalid_output"  # form first: a text answer to a tool-calling route


# ----------------------------------------------------------------------------- load, logs, metrics
def test_32_concurrent_requests_are_all_answered_and_logged_once(work, servers):
    server = servers("main")
    kinds = [work["weather_logs"], work["sentiment_logs"], [{"request": POEM}]]
    requests = [{**kinds[i % 3][i % len(kinds[i % 3])]["request"], "max_tokens": 24, "metadata": {"probe": str(i)}}
                for i in range(32)]
    client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="k", max_retries=0, timeout=300)

    async def one(req):
        raw = await client.chat.completions.with_raw_response.create(**req)
        return raw.http_response.status_code, raw.parse()

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    assert [status for status, _ in results] == [200] * 32 and all(r.choices for _, r in results)
    lines = served_lines(server["log_dir"], *(r.id for _, r in results))
    probes = [x["metadata"].get("probe") for x in lines if x["metadata"].get("probe") is not None]
    assert sorted(probes, key=int) == [str(i) for i in range(32)], "every call logged exactly once"
    text = httpx.get(server["url"] + "/metrics").text
    batches = {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith(
        "slmtune_batch_size_") and "_created" not in ln and "bucket" not in ln)}
    count = sum(v for k, v in batches.items() if k.startswith("slmtune_batch_size_count"))
    total = sum(v for k, v in batches.items() if k.startswith("slmtune_batch_size_sum"))
    assert total > count, f"concurrent requests were generated in batches ({total} requests in {count} batches)"


def test_served_logs_ingest_cleanly_and_curate_drops_slm_answers(work, servers):
    poem, _ = ask(servers("main"), **POEM)
    label, _ = ask(servers("constrained"), **work["sentiment_logs"][1]["request"], max_tokens=32)
    dirs = [servers(n)["log_dir"] for n in ("main", "constrained")]
    n_lines = len(served_lines(dirs[0], poem.id)) + len(served_lines(dirs[1], label.id))
    out = work["root"] / "served-records.jsonl"
    cli("ingest", *dirs, "-o", out)
    assert (work["root"] / "served-records.rejected.jsonl").read_text() == ""
    records = [json.loads(x) for x in out.open()]
    assert len(records) == n_lines
    slm = [r for r in records if r["meta"]["metadata"]["slmtune_answered_by"] == "slm"]
    assert slm and all(r["meta"]["metadata"]["slmtune_route"] != "llm" for r in slm)
    assert all(r["meta"]["latency_ms"] >= 0 and r["meta"]["usage"]["total_tokens"] > 0 for r in slm)
    report = work["root"] / "curate-report.json"
    cli("curate", out, "-o", work["root"] / "curated.jsonl", "--report", report, "--near-dup", 0)
    assert json.loads(report.read_text())["flagged_by_reason"]["slm_served"] == len(slm)
    cli("curate", out, "-o", work["root"] / "curated-all.jsonl", "--report", report, "--near-dup", 0,
        "--keep-slm-served")
    assert "slm_served" not in json.loads(report.read_text())["flagged_by_reason"]


def test_served_logs_are_scrubbed(servers):
    server = servers("main")
    secret = "Write a poem for jane.doe@example.com, card 4111 1111 1111 1111."
    resp, _ = ask(server, model="m", messages=[{"role": "user", "content": secret}],
                  metadata={"note": "jane.doe@example.com"})
    line = next(x for x in served_lines(server["log_dir"], resp.id) if x["response"].get("id") == resp.id)
    text = json.dumps(line)
    assert "jane.doe@example.com" not in text and "4111" not in text
    assert "<EMAIL_1>" in line["request"]["messages"][0]["content"] and line["metadata"]["note"] == "<EMAIL_1>"


def test_metrics_and_health(work, servers):
    server = servers("main")
    ask(server, **POEM)
    text = httpx.get(server["url"] + "/metrics").text
    for name in ('slmtune_requests_total{outcome="llm",route="llm"}', 'slmtune_fallbacks_total{reason="no_route"}',
                 'slmtune_request_seconds_bucket{answered_by="llm"', "slmtune_loaded_models",
                 "slmtune_generated_tokens_total"):
        assert name in text, name
    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}  # no key: it tells nothing else


# ----------------------------------------------------------------------------- engines
def test_adapter_exports_share_one_base_and_unload_lru(work):
    from slmtune.export.export import export_run

    summary = json.loads(next(work["work"].glob("round-*/summary.json")).read_text())
    folders = [export_run(t["run_dir"], work["root"] / "adapters", adapter_only=True) for t in summary["tasks"]]
    router = load_router(work["work"] / "router.json")
    by_task = {json.loads((p / "slmtune.json").read_text())["task"]["name"]: p for p in folders}
    for r in router["routes"]:
        r["checkpoint"], r["format"] = str(by_task[r["task"]]), "adapter"
    ckpts = checkpoints(router)
    weather, sentiment = ckpts[work["weather"]["task"]], ckpts[work["sentiment"]["task"]]
    assert weather.base_path == sentiment.base_path == str(work["model"])
    engine = EmbeddedEngine(max_loaded=2)
    try:
        for ck, log in ((weather, work["weather_logs"][0]), (sentiment, work["sentiment_logs"][0])):
            out = engine.submit(ck, to_record(log["request"]), Params(max_tokens=8)).result(timeout=120)
            assert out.completion_tokens > 0
        assert engine.loaded()["bases"] == {str(work["model"]): sorted([weather.name, sentiment.name])}
    finally:
        engine.close()
    engine = EmbeddedEngine(max_loaded=1)
    try:
        for ck, log in ((weather, work["weather_logs"][0]), (sentiment, work["sentiment_logs"][0])):
            engine.submit(ck, to_record(log["request"]), Params(max_tokens=4)).result(timeout=120)
        assert engine.loaded() == {"exports": [sentiment.name], "bases": {str(work["model"]): [sentiment.name]}}
    finally:
        engine.close()
    commands = vllm_commands([weather, sentiment])
    assert len(commands) == 1 and "--lora-modules" in commands[0]["command"] and "--enable-lora" in commands[0][
        "command"] and set(commands[0]["models"]) == {weather.name, sentiment.name}


def test_one_batch_keeps_each_requests_own_limit(work):
    ckpt = checkpoints(load_router(work["work"] / "router.json"))[work["sentiment"]["task"]]
    rec = to_record(work["sentiment_logs"][0]["request"])
    engine = EmbeddedEngine(batch_window_s=0.5, sample=True)  # a long window: the three requests meet in one batch
    try:
        asks = [Params(max_tokens=3), Params(max_tokens=9), Params(max_tokens=9, temperature=1.0)]
        outs = [f.result(timeout=120) for f in [engine.submit(ckpt, rec, p) for p in asks]]
    finally:
        engine.close()
    assert [o.batch_size for o in outs] == [3, 3, 3]
    assert all(o.completion_tokens <= p.max_tokens and (o.finished or o.completion_tokens == p.max_tokens)
               for o, p in zip(outs, asks, strict=True))
    assert outs[0].prompt_tokens == outs[1].prompt_tokens > 0


def test_vllm_engine_sends_the_rendered_prompt_to_completions(work, upstream):
    """A stand-in vLLM (its /v1/completions answers one fixed tool call) behind --engine vllm."""
    from fastapi import FastAPI

    fake_vllm, seen = FastAPI(), []

    @fake_vllm.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
        return {"choices": [{"text": text, "finish_reason": "stop",
                             "logprobs": {"token_logprobs": [-0.1, -0.7, -0.05]}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 20}}

    vllm = serve_in_thread(fake_vllm)
    config = ServeConfig(router=work["work"] / "router.json", engine="vllm", engine_urls=(vllm.url + "/v1",),
                         upstream=upstream["url"] + "/v1", log_dir=work["root"] / "served-vllm")
    server = serve_in_thread(create_app(config))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(**work["weather_logs"][0]["request"])
        resp = raw.parse()
        assert raw.headers["x-slmtune-route"] == work["weather"]["task"]
        assert resp.model == Path(work["weather"]["checkpoint"]).name
        assert json.loads(resp.choices[0].message.tool_calls[0].function.arguments)["city"] == "Oslo"
        assert seen[0]["model"] == resp.model and "get_weather" in seen[0]["prompt"] and seen[0]["temperature"] == 0
        # the confidence comes from vLLM's token log-probabilities: the least likely pick, exp(-0.7)
        assert seen[0]["logprobs"] == 1
        line = next(x for x in served_lines(work["root"] / "served-vllm", resp.id) if x["response"]["id"] == resp.id)
        assert line["metadata"]["slmtune_confidence"] == pytest.approx(math.exp(-0.7), abs=1e-6)
    finally:
        server.stop()
        vllm.stop()


def test_print_vllm_command_and_help(work):
    out = cli("serve", work["work"], "--print-vllm-command").output
    assert out.count("vllm serve") == 2 and "--enable-auto-tool-choice --tool-call-parser hermes" in out
    assert "--engine vllm --engine-url" in out
    cli("serve", code=2)  # neither WORKDIR nor --router: a usage error
    assert "--batch-window-ms" in cli("serve", "--help").output


def test_stream_assembler_rebuilds_tool_calls():
    acc = StreamAssembler()
    events = [{"id": "x", "model": "m", "choices": [{"delta": {"role": "assistant"}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get_",
                                                                                          "arguments": '{"ci'}}]}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "weather",
                                                                               "arguments": 'ty": "Oslo"}'}}]}}]},
              {"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "usage": {"total_tokens": 3}}]
    blob = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    for i in range(0, len(blob), 7):  # bytes arrive in arbitrary pieces
        acc.feed(blob[i:i + 7].encode())
    out = acc.completion()
    assert out["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                        "arguments": '{"city": "Oslo"}'}
    assert out["choices"][0]["finish_reason"] == "tool_calls" and out["usage"] == {"total_tokens": 3}


def test_engine_llamacpp_without_llama_cpp_is_refused_in_one_line(work, monkeypatch):
    """Where llama-cpp-python is missing (or its library does not load), `serve --engine llamacpp` stops before
    serving, in one line naming the extra to install."""
    import slmtune.serve.llamacpp as llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    result = cli("serve", work["work"], "--engine", "llamacpp", code=1)
    text = result.output + (result.stderr or "")
    assert "--engine llamacpp needs llama-cpp-python" in text and "slmtune[llamacpp]" in text
    assert "Traceback" not in text
