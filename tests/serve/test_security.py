"""`slmtune serve` under hostile input, over real HTTP on 127.0.0.1 (the `openai` client and raw httpx): schemas
that would make the server reach out, cross-site posts, bad schemas in a batch, prompts past the context, an
upstream that breaks off or leaks, a client that goes away, a work dir a flywheel is writing."""

import contextlib
import http.server
import json
import logging
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from slmtune.errors import SlmtuneError
from slmtune.schema_check import SchemaProblem, is_valid, schema_problem, validation_error
from slmtune.serve.config import ServeConfig, checkpoints, load_router
from slmtune.serve.engine import EmbeddedEngine
from slmtune.serve.guard import check_answer, request_problems, to_record
from slmtune.serve.jobs import GrammarFailed, Params
from slmtune.serve.server import create_app

POEM = {"model": "m", "messages": [{"role": "user", "content": "Write me a poem about the sea."}]}
# Valid Draft 7, but llguidance can't compile the pattern (look-behind): the grammar fails, not the schema check.
LOOKBEHIND = {"type": "object", "properties": {"city": {"type": "string", "pattern": "(?<=x)a"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def canary():
    """An HTTP server on loopback that records every request it gets: nothing in these tests may reach it."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "seen": seen}
    server.shutdown()


@pytest.fixture(scope="module")
def sec(upstream, server_pool):
    """Servers for these tests, by name, each with its own served-log folder."""
    up = upstream["url"] + "/v1"
    yield from server_pool({
        "main": dict(upstream=up),
        "free": dict(upstream=up, decoding="free"),
        "bare": dict(),  # no upstream, no key
        "keyed": dict(upstream=up, api_key_env="SLMTUNE_SEC_KEY"),
        "patient": dict(upstream=up, batch_window_ms=5000.0),  # a request waits 5 s for batch-mates
    }, "served-sec-")


def weather(work, **params) -> dict:
    """A routed weather request whose tool takes these parameters."""
    req = json.loads(json.dumps(work["weather_logs"][0]["request"]))
    if params:
        req["tools"][0]["function"]["parameters"] = params
    return req


def post(server, body=None, **kw):
    kw.setdefault("timeout", 120)
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, **kw)


def log_lines(folder: Path, suffix: str) -> list[dict]:
    return [json.loads(x) for p in sorted(folder.glob(f"*{suffix}")) for x in p.open()]


# ----------------------------------------------------------------------------- schemas never leave the process
def test_the_canary_sees_a_direct_fetch(canary):
    """The canary works: a plain fetch reaches it (so its silence below means something)."""
    urllib.request.urlopen(canary["url"] + "/probe", timeout=5).read()
    assert canary["seen"] == ["/probe"]
    canary["seen"].clear()


def test_external_refs_are_never_fetched_by_any_validator(canary, tmp_path):
    from slmtune.data.curate import _schema_error
    from slmtune.eval.metrics import _fits

    local = tmp_path / "ref.json"
    local.write_text('{"type": "string"}')
    for ref in (canary["url"] + "/ref.json", local.as_uri()):
        schema = {"type": "object", "properties": {"city": {"$ref": ref}}}
        assert "only local refs" in schema_problem(schema)
        with pytest.raises(SchemaProblem):
            validation_error({"city": 5}, schema)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
        call = {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": 5}'}}]}
        assert check_answer("tool_calling", None, call, True, tools) == "schema_invalid"  # the guard: upstream
        assert _schema_error(schema, {"city": 5}) is None  # curate: a broken tool schema drops no call
        assert _fits({"city": 5}, schema)  # eval: it constrains nothing it can check
    # A ref hidden behind a local one, and an $id that rebases it, resolve in the empty registry or not at all.
    rebased = {"$id": canary["url"] + "/base/", "properties": {"a": {"$ref": "#/definitions/x"}},
               "definitions": {"x": {"type": "string"}}}
    assert is_valid({"a": "s"}, rebased, broken=False) and not is_valid({"a": 1}, rebased, broken=True)
    nested = {"properties": {"a": {"$id": canary["url"] + "/n.json", "$ref": "#/definitions/y"}}}
    assert not is_valid({"a": 1}, nested, broken=False)
    assert canary["seen"] == []


def test_tool_schemas_are_checked_when_the_request_arrives(work, sec, canary):
    server = sec("free")
    cases = {
        "only local refs": {"type": "object", "properties": {"city": {"$ref": canary["url"] + "/x.json"}}},
        "file:": {"type": "object", "properties": {"city": {"$ref": "file:///etc/passwd"}}},
        "properties: [1]": {"type": "object", "properties": [1]},
        "maxLength: 'x'": {"type": "object", "properties": {"city": {"type": "string", "maxLength": "x"}}},
        "points nowhere": {"type": "object", "properties": {"city": {"$ref": "#/definitions/none"}}},
    }
    for needle, params in cases.items():
        resp = post(server, weather(work, **params))
        assert resp.status_code == 400, (needle, resp.text)
        message = resp.json()["error"]["message"]
        assert "tools[0] ('get_weather')" in message and needle in message, message
    assert canary["seen"] == []
    # (a schema nesting past 64 levels is a body nesting past 64: test_caps_on_messages_tools_tokens_and_nesting)
    assert "deeper than 64" in schema_problem(json.loads('{"items": ' * 70 + "{}" + "}" * 70))


def test_one_bad_grammar_fails_only_its_own_request(work):
    """Two requests generated as one batch: the one whose tools can't become a grammar fails alone."""
    ck = checkpoints(load_router(work["work"] / "router.json"))[work["weather"]["task"]]
    good, bad = weather(work), weather(work, **LOOKBEHIND)
    assert schema_problem(LOOKBEHIND) is None  # it passes the request check: only the grammar fails
    engine = EmbeddedEngine(max_loaded=1, batch_window_s=2.0)  # both wait for one batch
    params = Params(max_tokens=64, constrained=True, allow_text=False)
    try:
        futures = [engine.submit(ck, to_record(r), params) for r in (good, bad)]
        assert futures[0].result(timeout=300).completion_tokens > 0
        with pytest.raises(GrammarFailed, match="look-around"):
            futures[1].result(timeout=300)
    finally:
        engine.close()


def test_a_request_whose_grammar_fails_falls_back_as_schema_invalid(work, sec):
    raw = sec("main")["client"].chat.completions.with_raw_response.create(
        **{**weather(work, **LOOKBEHIND), "max_tokens": 32, "tool_choice": "required"})
    assert raw.http_response.status_code == 200 and raw.headers["x-slmtune-fallback"] == "schema_invalid"


# ----------------------------------------------------------------------------- cross-site posts, binding
def test_only_json_from_loopback_hosts_gets_in(sec, monkeypatch):
    server = sec("bare")
    url = server["url"] + "/v1/chat/completions"
    # What a web page can send without a CORS preflight: text/plain, a form.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        resp = httpx.post(url, content=json.dumps(POEM).encode(), headers=headers)
        assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type", ctype
    assert post(server, POEM, headers={"content-type": "application/json; charset=utf-8"}).status_code == 503
    # DNS rebinding: the browser sends the attacker's host name.
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80"):
        resp = post(server, POEM, headers={"host": host})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_host", host
    assert httpx.get(server["url"] + "/healthz", headers={"host": "evil.example"}).status_code == 400
    for host in ("localhost:1", "127.0.0.1", "[::1]:8000"):
        assert post(server, POEM, headers={"host": host}).status_code == 503, host  # in, but nothing answers it
    # With a key, the key is the guard: any Host is fine.
    monkeypatch.setenv("SLMTUNE_SEC_KEY", "s3cret")
    keyed = sec("keyed")
    resp = post(keyed, POEM, headers={"host": "gateway.internal", "authorization": "Bearer s3cret"})
    assert resp.status_code == 200


def test_a_public_bind_without_a_key_is_refused(work):
    from typer.testing import CliRunner

    from slmtune.cli import app

    router = work["work"] / "router.json"
    with pytest.raises(SlmtuneError, match="--insecure"):
        create_app(ServeConfig(router=router, host="0.0.0.0"))
    create_app(ServeConfig(router=router, host="0.0.0.0", insecure=True))  # built, never bound
    result = CliRunner().invoke(app, ["serve", str(work["work"]), "--host", "0.0.0.0"])
    out = result.output + (result.stderr or "")
    assert result.exit_code == 1 and "--insecure" in out and "Traceback" not in out, out


def test_serve_refuses_a_work_dir_a_flywheel_is_writing(work):
    from slmtune.lock import workdir_lock

    with workdir_lock(work["work"]):
        with pytest.raises(SlmtuneError, match="locked"):
            create_app(ServeConfig(router=work["work"] / "router.json"))
    create_app(ServeConfig(router=work["work"] / "router.json"))


@pytest.mark.parametrize("threshold", [1.5, -0.1, "0.9", True])
def test_a_routes_confidence_threshold_must_be_a_number_in_0_1(work, tmp_path, threshold):
    """router.json is a file a person may edit: a bad `threshold` is one line naming the route, at start-up."""
    from typer.testing import CliRunner

    from slmtune.cli import app

    router = json.loads((work["work"] / "router.json").read_text())
    router["routes"][0]["threshold"] = threshold
    (tmp_path / "router.json").write_text(json.dumps(router))
    result = CliRunner().invoke(app, ["serve", "--router", str(tmp_path / "router.json"), "--port", "0"])
    out = result.output + (result.stderr or "")
    assert result.exit_code == 1 and "`threshold` must be a number in [0, 1]" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- sizes and shapes
def test_caps_on_messages_tools_tokens_and_nesting(work, sec):
    server = sec("bare")
    many = {"messages": [{"role": "user", "content": "hi"}] * 2049}
    tools = weather(work)
    tools["tools"] = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]
    cases = [(many, "over the limit of 2048"), (tools, "over the limit of 128"),
             ({**POEM, "max_tokens": 10**9}, "at most 32768"), ({**POEM, "max_completion_tokens": 40000}, "at most"),
             ({**POEM, "stream_options": "yes"}, "stream_options"), ({**POEM, "stream_options": [1]}, "stream_options"),
             ({**POEM, "metadata": [1]}, "metadata"), ({**POEM, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
             ({**POEM, "messages": [{"role": "user", "content": "x", "name": 5}]}, "name"),
             ({**POEM, "messages": [{"role": "assistant", "tool_calls": [{"function": 1}]}]}, "tool_calls"),
             ({**POEM, "extra": json.loads("[" * 200 + "]" * 200)}, "deeper than 64")]
    for body, needle in cases:
        resp = post(server, body)
        assert resp.status_code == 400 and needle in resp.json()["error"]["message"], (needle, resp.text)
    deep = b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # past json's own recursion limit
    resp = httpx.post(server["url"] + "/v1/chat/completions", content=deep,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert request_problems({**POEM, "max_tokens": 100}) == []


def test_lone_surrogates_and_cut_off_bodies_are_refused_quietly(work, sec, caplog):
    """A `\\ud800` escape parses to a string no UTF-8 log line, tokenizer or response can hold: 400. A body cut
    off mid-way (the client closed its side) is answered 400, with nothing in the server log."""
    import socket

    server = sec("main")
    url = server["url"] + "/v1/chat/completions"
    lone = b'{"messages": [{"role": "user", "content": "Weather in \\ud800 Oslo?"}]}'
    resp = httpx.post(url, content=lone, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "surrogate" in resp.json()["error"]["message"]
    pair = b'{"model": "m", "messages": [{"role": "user", "content": "a poem about \\ud83c\\udf0a"}]}'
    assert httpx.post(url, content=pair, headers={"content-type": "application/json"}).status_code == 200
    host, port = server["url"].removeprefix("http://").split(":")
    for cut in (b"Content-Length: 5000\r\n\r\n" + json.dumps(POEM).encode(),
                b"Transfer-Encoding: chunked\r\n\r\n100\r\n" + b'{"messages": ['):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n" + cut)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
    time.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert post(server, POEM).status_code == 200


def test_a_prompt_past_the_context_goes_upstream_or_gets_400(work, sec):
    long = weather(work)
    long["messages"][-1]["content"] += " and more" * 3000  # ~6,000 tokens: over the tiny model's 2,048
    raw = sec("main")["client"].chat.completions.with_raw_response.create(**long)
    assert raw.http_response.status_code == 200 and raw.headers["x-slmtune-fallback"] == "too_long"
    resp = post(sec("bare"), long)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    huge = weather(work)
    huge["messages"][-1]["content"] = "x" * 1_000_000  # refused before any template or tokenizer runs
    resp = post(sec("bare"), huge)
    assert resp.status_code == 400 and resp.headers["x-slmtune-fallback"] == "too_long"


# ----------------------------------------------------------------------------- the upstream misbehaving
@pytest.fixture
def fault(upstream):
    def set_(**told):
        httpx.post(upstream["url"] + "/standin/error", json=told)

    yield set_
    set_(status=None, fault=None)


@pytest.mark.parametrize("kind", ["break_stream", "cut_stream"])
def test_a_broken_upstream_stream_ends_in_an_error_event_and_is_not_logged_as_served(sec, fault, kind):
    server = sec("free")
    fault(fault=kind)
    body = {**POEM, "stream": True, "metadata": {"probe": kind}}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        events = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
    assert events[-1] != "[DONE]"
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_stream_broken"
    with pytest.raises(openai.APIError):  # the openai client raises on it rather than return a cut answer
        list(server["client"].chat.completions.create(**body))
    time.sleep(0.5)  # the log writer thread
    assert not [x for x in log_lines(server["log_dir"], ".jsonl") if x["metadata"].get("probe") == kind]
    errors = [x for x in log_lines(server["log_dir"], ".errors.log") if x["metadata"].get("probe") == kind]
    assert len(errors) == 2 and errors[0]["metadata"]["slmtune_status"] == 502


def test_upstream_error_bodies_are_scrubbed_and_auth_errors_say_nothing(sec, fault):
    server = sec("free")
    key = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2
    fault(status=401, message=f"Incorrect API key provided: {key}.")
    resp = post(server, POEM)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_auth"
    assert key[-8:] not in resp.text
    fault(status=500, message=f"internal error for jane.doe@example.com using {key}")
    resp = post(server, POEM)
    assert resp.status_code == 500 and "jane.doe@example.com" not in resp.text and key not in resp.text
    fault(status=None, fault="not_json")
    resp = post(server, POEM)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_invalid"
    time.sleep(0.5)
    logged = "".join(p.read_text() for p in server["log_dir"].glob("*"))
    assert key[-8:] not in logged and "jane.doe@example.com" not in logged


# ----------------------------------------------------------------------------- a client that goes away
def test_a_client_that_disconnects_cancels_its_generation(work, sec):
    server = sec("patient")
    metrics = server["url"] + "/metrics"

    def metric(name: str) -> float:
        """The metric's value, summed over its labels."""
        lines = httpx.get(metrics).text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith((name + " ", name + "{")))

    with pytest.raises(httpx.ReadTimeout):  # the request waits 5 s for batch-mates; the client leaves at 0.5 s
        post(server, {**weather(work), "max_tokens": 32}, timeout=0.5)
    deadline = time.monotonic() + 10
    while metric("slmtune_cancelled_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric("slmtune_cancelled_total") == 1
    time.sleep(6)  # past the batch window: a request still queued would have generated by now
    assert metric("slmtune_batch_size_count") == 0 and metric("slmtune_generated_tokens_total") == 0
    assert "slmtune_served_log_dropped_lines 0.0" in httpx.get(metrics).text


def test_cancelling_a_running_request_stops_its_row(work):
    """The engine: a request cancelled once it runs emits end-of-turn at its next token (`complete` sets that
    flag when its caller is cancelled; one cancelled while queued never runs: the HTTP test above)."""
    ck = checkpoints(load_router(work["work"] / "router.json"))[work["weather"]["task"]]
    engine = EmbeddedEngine(max_loaded=1, batch_window_s=0.0)
    # a required call under the grammar: at least `<tool_call>`, the name and the arguments' braces
    params = Params(max_tokens=200, constrained=True, allow_text=False)
    record = to_record(weather(work))
    try:
        full = engine.submit(ck, record, params).result(timeout=300)
        assert full.completion_tokens >= 10
        job = engine._submit(ck, record, params)
        while not job.future.running():
            time.sleep(0.001)
        job.cancelled.set()
        assert job.future.result(timeout=300).completion_tokens < full.completion_tokens
    finally:
        engine.close()
