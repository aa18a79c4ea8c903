"""Fault benchmark: does `slmtune flywheel` recover from a SIGKILL at any moment, and (part 2) what do hostile
requests do to `slmtune serve`?

    python scripts/bench_faults.py                          # both parts; 10 kills
    python scripts/bench_faults.py --part kills --kills 3 --seed 1

Part 1 (`kills`) builds the tiny model (`slmtune.synthetic.tiny`) and synthetic logs of two errands, then runs
one flywheel round uninterrupted twice in a subprocess (`python -m slmtune.cli flywheel`, CPU, 2 steps per task,
2 eval records, a gate that passes everything): the first warms caches, the second is the reference, timed; the
two outcomes must agree. Then, `--kills` times: a fresh flywheel in a new work dir is SIGKILLed at a time drawn
uniformly in (0, reference duration), and the same command is run again to completion. A kill counts as
*recovered* when the rerun exits 0 and its outcome equals the reference's: the same tasks routed (router.json
routes: task, category, format, export folder name) and not routed, the same export folders, the same round name,
and no atomic-write temps left (`slmtune.io.stale_temps`).
Prints a row per kill (time killed or `ended` when the run finished first, the last stage finished by then,
temps the kill left, rerun seconds, recovered) and `kills recovered: K of N`; writes runs/bench_faults.json and
runs/bench_faults.png (kill time vs rerun time, coloured by recovery). Timings are noisy on a shared machine; the
recovery verdicts are not.

Part 2 (`requests`) runs one such flywheel, then starts `slmtune serve` on it twice as a subprocess on 127.0.0.1 —
the default decoding and `--decoding free` (where a tool schema reaches the guard's validator) — with the stand-in
upstream, and sends each the same 430 malformed and hostile requests (`hostile_corpus` + `raw_socket_faults`:
every top-level field with 11 wrong-typed values, wrong message fields, 27 bad or external-`$ref` tool schemas
aimed at a loopback canary, nesting to 200,000 levels, 3.5 MB prompts, 5 MB bodies, 3,000 messages, wrong content
types, bad UTF-8 and lone surrogates, truncated and garbage HTTP, foreign Host headers). It counts the statuses
(a 5xx is a failure; 0 means no HTTP answer, as for a body the client cut), the tracebacks in the server's own
log, the canary's hits, and checks a normal call (unrouted and routed) is answered afterwards. Prints
`hostile requests with a 5xx: K of N`; writes the JSON and runs/bench_faults_requests.png (statuses per server).
Every address it sends to is on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slmtune.io import read_json_or_none, stale_temps
from slmtune.synthetic.logs import write_logs
from slmtune.synthetic.tiny import build_tiny_model

ERRANDS = ["tool_calling-get_weather", "classification-sentiment"]
PARTS = ("kills", "requests")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}


# ----------------------------------------------------------------------------- part 1: kills
def setup(root: Path, seed: int) -> dict:
    """The tiny model, two errands' logs (56 records: both clear --min-size 8) and a gate that passes all."""
    gate = root / "gate.yaml"
    gate.write_text("parse_rate: {min: 0.0}\n")  # 2 steps teach the tiny model little: export whatever it learns
    write_logs(root / "logs", 56, seed=seed, errands=ERRANDS)
    return {"model": str(build_tiny_model(root / "tiny-model")), "logs": str(root / "logs" / "logs"),
            "gate": str(gate)}


def flywheel_cmd(inputs: dict, work: Path) -> list[str]:
    return [sys.executable, "-m", "slmtune.cli", "flywheel", inputs["logs"], "-w", str(work), "--gpu", "cpu",
            "--base-model", inputs["model"], "--max-steps", "2", "--eval-limit", "2", "--min-size", "8",
            "--gate", inputs["gate"]]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # own session: the kill can take every process the run started, as the OOM killer or a closed terminal would
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | ENV,
                                start_new_session=True)


def run_to_end(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = start(cmd, log).wait()
    return rc, time.perf_counter() - t0


def kill_at(cmd: list[str], log: Path, after_s: float) -> bool:
    """Start the run and SIGKILL its process group `after_s` seconds in; False when it finished first."""
    proc = start(cmd, log)
    try:
        proc.wait(timeout=after_s)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def outcome(work: Path) -> dict:
    """What a finished round leaves that serving and the next round depend on (paths reduced to names)."""
    router = read_json_or_none(work / "router.json") or {}
    exports = work / "exports"
    return {"round": router.get("round"),
            "routes": sorted([r["task"], r["category"], r["format"], Path(r["checkpoint"]).name]
                             for r in router.get("routes", [])),
            "not_routed": sorted(r["task"] for r in router.get("not_routed", [])),
            "exports": sorted(p.name for p in exports.iterdir()) if exports.is_dir() else [],
            "rounds": (read_json_or_none(work / "flywheel.json") or {}).get("rounds", []),
            "temps": [str(p.relative_to(work)) for p in stale_temps(work)] if work.is_dir() else []}


def stage_reached(work: Path) -> str:
    """The last stage a killed run had finished: a data stage, or `train|eval|export k/n` tasks, or `done`."""
    rounds = sorted(work.glob("round-*"))
    if not rounds:
        return "-"
    if (read_json_or_none(work / "flywheel.json") or {}).get("rounds"):
        return "done"
    rd = rounds[-1]
    reached = next((s for s in ("plan", "tasks", "cluster", "curate", "ingest")
                    if (rd / s / "stage.done.json").is_file()), "started" if (rd / "round.json").is_file() else "-")
    n = len((read_json_or_none(rd / "tasks" / "selection.json") or {}).get("tasks", []))
    for stage in ("export", "eval", "train"):
        if k := len(list(rd.glob(f"{stage}/*/stage.done.json"))):
            return f"{stage} {k}/{n}" + (", summary" if (rd / "summary.json").is_file() else "")
    return reached + (", checkpoint" if list(rd.glob("train/*/checkpoints/checkpoint-*")) else "")


def one_kill(i: int, inputs: dict, root: Path, ref: dict, after_s: float) -> dict:
    work, log = root / f"kill-{i:02d}", root / f"kill-{i:02d}.log"
    cmd = flywheel_cmd(inputs, work)
    killed = kill_at(cmd, log, after_s)
    reached, left = stage_reached(work), outcome(work)["temps"]
    rc, rerun_s = run_to_end(cmd, log)
    got = outcome(work)
    diff = sorted(k for k in ref if got[k] != ref[k])
    statuses = {t["task"]: t["status"] for t in (read_json_or_none(work / "round-001" / "summary.json") or {})
                .get("tasks", [])}
    return {"kill": i, "killed_at_s": round(after_s, 1), "killed": killed, "stage_reached": reached,
            "temps_left_by_kill": left, "rerun_rc": rc, "rerun_s": round(rerun_s, 1), "statuses": statuses,
            "differs_in": diff, "recovered": rc == 0 and not diff}


def kills(args: argparse.Namespace) -> dict:
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_faults."))
    root.mkdir(parents=True, exist_ok=True)
    inputs = setup(root, args.seed)
    # Two uninterrupted runs: the first pays for cold caches (bytecode, shared libraries), the second's time sets
    # the kill window; their outcomes must agree, or no rerun could be expected to match.
    refs, times = [], []
    for name in ("reference-cold", "reference"):
        rc, secs = run_to_end(flywheel_cmd(inputs, root / name), root / f"{name}.log")
        if rc != 0:
            sys.exit(f"the uninterrupted run {name} failed (exit {rc}); see {root / name}.log")
        refs.append(outcome(root / name))
        times.append(secs)
    if refs[0] != refs[1]:
        sys.exit(f"two uninterrupted runs differ: {refs[0]} vs {refs[1]}")
    ref, ref_s = refs[1], times[1]
    print(json.dumps({"cold_s": round(times[0], 1), "reference_s": round(ref_s, 1), **ref}), flush=True)
    rng = random.Random(args.seed)
    rows = []
    print(f"{'kill':>4} {'at s':>6} {'killed':<6} {'stage reached':<24} {'temps':>5} {'rerun s':>7} {'rc':>3}  "
          "recovered", flush=True)
    for i in range(args.kills):
        row = one_kill(i, inputs, root, ref, rng.uniform(0, ref_s))
        rows.append(row)
        verdict = "yes" if row["recovered"] else f"NO, differs in {row['differs_in']}"
        print(f"{i:>4} {row['killed_at_s']:>6} {'yes' if row['killed'] else 'ended':<6} {row['stage_reached']:<24} "
              f"{len(row['temps_left_by_kill']):>5} "
              f"{row['rerun_s']:>7} {row['rerun_rc']:>3}  {verdict}", flush=True)
    k = sum(r["recovered"] for r in rows)
    print(f"kills recovered: {k} of {len(rows)}  (reference run {ref_s:.1f}s, work dirs under {root})", flush=True)
    return {"cold_s": round(times[0], 1), "reference_s": round(ref_s, 1), "reference": ref, "kills": rows,
            "recovered": k, "work": str(root)}


def plot_kills(result: dict, path: Path) -> None:
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for ok, colour, label in ((True, "tab:green", "recovered"), (False, "tab:red", "not recovered")):
        rows = [r for r in result["kills"] if r["recovered"] == ok]
        ax.scatter([r["killed_at_s"] for r in rows], [r["rerun_s"] for r in rows], c=colour, label=label)
    ax.axhline(result["reference_s"], color="grey", ls="--", label="uninterrupted run")
    ax.set(xlabel="killed at (s after start)", ylabel="rerun to the end (s)",
           title=f"flywheel SIGKILL recovery: {result['recovered']} of {len(result['kills'])}")
    ax.legend()
    save_png(fig, path, dpi=120, bbox_inches="tight")


# ----------------------------------------------------------------------------- part 2: hostile requests
POEM = {"model": "m", "messages": [{"role": "user", "content": "Write me a poem about the sea."}]}
BAD_VALUES = [None, True, 0, -1, 1.5, "x", [], {}, [1], {"a": 1}, 10**30]
TOP_KEYS = ["messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "n", "temperature", "stream",
            "stream_options", "logprobs", "parallel_tool_calls", "metadata", "model", "user"]


def bad_schemas(canary: str) -> list:
    """Tool `parameters` that are wrong, hostile or merely unusual (some valid: the grammar may still refuse)."""
    deep: dict = {}
    node = deep
    for _ in range(80):
        node["items"] = {}
        node = node["items"]
    return [
        {"type": "object", "properties": [1]}, {"type": "object", "properties": {"city": {"maxLength": "x"}}},
        {"type": "nope"}, {"type": "object", "required": "city"}, {"type": "object", "additionalProperties": "x"},
        {"type": "object", "properties": {"city": {"$ref": canary + "/schema.json"}}},
        {"type": "object", "properties": {"city": {"$ref": "file:///etc/passwd"}}},
        # what a cloud-metadata probe looks like, aimed at the loopback canary: never any other address
        {"type": "object", "properties": {"city": {"$ref": canary + "/latest/meta-data/iam/security-credentials/"}}},
        {"type": "object", "properties": {"city": {"$ref": "#/definitions/missing"}}},
        {"type": "object", "properties": {"city": {"$ref": "#"}}},
        {"$id": canary + "/base/", "type": "object", "properties": {"city": {"$ref": "other.json"}}},
        {"type": "object", "properties": {"city": {"$id": canary + "/n.json", "$ref": "#/definitions/y"}}},
        {"type": "object", "properties": {"city": {"type": "string", "pattern": "(?<=x)a"}}},
        {"type": "object", "properties": {"city": {"type": "string", "pattern": "("}}},
        {"type": "object", "properties": {"city": {"type": "string", "format": "no-such-format"}}},
        {"type": "object", "properties": {"city": {"not": {"type": "string"}}}},
        {"type": "object", "properties": {"city": {"enum": "x"}}},
        {"type": "object", "properties": {"city": {"minimum": "a"}}},
        {"type": "object", "properties": {"city": {"type": "string", "minLength": 5, "maxLength": 2}}},
        {"type": "object", "allOf": [{"required": ["a"]}, {"properties": {"a": False}}]},
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}},
        {"type": "object", "properties": {"city": {"const": "x" * 100_000}}},
        deep, [1, 2], "a string", 5, True, False, {},
    ]


def hostile_corpus(weather: dict, canary: str) -> list[dict]:
    """Requests as {"name", "body": bytes | object, "headers"?}: ≥ 300 of them (see the module docstring)."""
    out: list[dict] = []
    for base_name, base in (("poem", POEM), ("weather", weather)):
        for key in TOP_KEYS:
            for v in BAD_VALUES:
                out.append({"name": f"{base_name}.{key}={json.dumps(v)[:12]}", "body": {**base, key: v}})
    msg_fields = {"role": [None, 5, "robot", ""], "content": [5, {"a": 1}, [1, None, {"type": "text"}], True],
                  "name": [5, [], {}], "tool_calls": ["x", [1], [{"function": 1}], [{"function": {"name": 5}}],
                                                      [{"id": 5, "function": {"name": "f", "arguments": 7}}]],
                  "tool_call_id": [5, []]}
    for field, values in msg_fields.items():
        for v in values:
            out.append({"name": f"message.{field}={json.dumps(v)[:12]}",
                        "body": {**POEM, "messages": [{"role": "assistant", "content": "hi", field: v}]}})
    for i, schema in enumerate(bad_schemas(canary)):
        tools = json.loads(json.dumps(weather["tools"]))
        tools[0]["function"]["parameters"] = schema
        for choice in ("auto", "required"):
            out.append({"name": f"schema[{i}].{choice}", "body": {**weather, "tools": tools, "tool_choice": choice}})
    for depth in (65, 1_000, 200_000):
        nested = b"[" * depth + b"]" * depth
        out.append({"name": f"deep.messages.{depth}", "body": b'{"messages": ' + nested + b"}"})
        out.append({"name": f"deep.metadata.{depth}", "body": json.dumps(POEM)[:-1].encode() + b', "metadata": {"a": '
                    + nested + b"}}"})
    huge = "word " * 700_000  # 3.5 MB: under the 4 MiB body limit, far over any context
    out += [{"name": "huge.content.routed", "body": {**weather, "messages": [{"role": "user", "content": huge}]}},
            {"name": "huge.content.poem", "body": {**POEM, "messages": [{"role": "user", "content": huge}]}},
            {"name": "huge.over_limit", "body": {**POEM, "pad": "x" * (5 << 20)}},
            {"name": "huge.tool_name", "body": {**weather, "tools": [{"type": "function", "function": {
                "name": "f" * 1_000_000}}]}},
            {"name": "many.messages", "body": {**POEM, "messages": POEM["messages"] * 3000}},
            {"name": "many.tools", "body": {**weather, "tools": weather["tools"] * 200}},
            {"name": "many.keys", "body": {**POEM, **{f"k{i}": i for i in range(50_000)}}}]
    text = json.dumps(POEM).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
                  "application/json-patch+json", "text/json", "application/jsonx"):
        out.append({"name": f"content-type={ctype or '(none)'}", "body": text, "headers": {"content-type": ctype}})
    for name, raw in (("utf8.invalid", b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
                      ("utf8.overlong", b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}'),
                      ("utf8.lone_surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
                      ("utf8.surrogate_routed", json.dumps({**weather, "messages": [
                          {"role": "user", "content": "Weather in \ud800 Oslo?"}]}).encode()),
                      ("utf8.bom", b"\xef\xbb\xbf" + text), ("utf16", json.dumps(POEM).encode("utf-16")),
                      ("json.truncated", text[: len(text) // 2]), ("json.empty", b""), ("json.nan", b"NaN"),
                      ("json.trailing", text + b"garbage"), ("json.array", b"[1, 2]"), ("json.null", b"null"),
                      ("json.big_int", b'{"messages": [], "n": ' + b"9" * 5000 + b"}"),
                      ("json.dup_keys", b'{"messages": 1, "messages": [{"role": "user", "content": "x"}]}')):
        out.append({"name": name, "body": raw})
    out += [{"name": "host.evil", "body": POEM, "headers": {"host": "evil.example"}},
            {"name": "host.rebind", "body": POEM, "headers": {"host": "127.0.0.1.nip.example:80"}},
            {"name": "tool_choice.not_offered", "body": {**weather, "tool_choice": {"type": "function",
                                                                                     "function": {"name": "nope"}}}},
            {"name": "stream.routed.bad_options", "body": {**weather, "stream": True, "stream_options": 5}},
            {"name": "stream.routed", "body": {**weather, "stream": True, "max_tokens": 8}},
            {"name": "stream.poem", "body": {**POEM, "stream": True, "stream_options": {"include_usage": True}}}]
    return out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(work: Path, upstream: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "slmtune.cli", "serve", str(work), "--host", "127.0.0.1", "--port", str(port),
           "--upstream", upstream, *extra]
    proc = start(cmd, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        if proc.poll() is not None:
            sys.exit(f"slmtune serve exited ({proc.returncode}); see {log}")
        time.sleep(0.2)
    sys.exit(f"slmtune serve did not start in 120 s; see {log}")


def send(url: str, item: dict) -> int:
    """The status one hostile request got (0: no HTTP answer, e.g. the server closed the connection)."""
    import httpx

    body = item["body"]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"} | item.get("headers", {})
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", content=raw, headers=headers, timeout=120) as resp:
            resp.read()
            return resp.status_code
    except httpx.HTTPError:
        return 0


def raw_socket_faults(url: str) -> list[tuple[str, int]]:
    """Requests httpx won't send: a body shorter than its Content-Length, a chunked body cut off, garbage HTTP."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
    cases = {
        "truncated.content_length": head + b"Content-Length: 5000\r\n\r\n" + json.dumps(POEM).encode(),
        "truncated.chunked": head + b"Transfer-Encoding: chunked\r\n\r\n100\r\n" + b'{"messages": [',
        "bad.content_length": head + b"Content-Length: -5\r\n\r\n{}",
        "bad.request_line": b"POST /v1/chat/completions\r\n\r\n",
        "bad.http": b"\x00\x01\x02garbage\r\n\r\n",
        "bad.header": head + b"X-Bad: \x00\x7f\r\nContent-Length: 2\r\n\r\n{}",
    }
    out = []
    for name, data in cases.items():
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # the client stops sending: the body is cut where it is
            reply = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    reply += chunk
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        out.append((name, status))
    return out


def canary_server() -> tuple[str, list, object]:
    import http.server
    import threading

    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", seen, srv


def hostile_requests(args: argparse.Namespace) -> dict:
    """Part 2: ≥ 300 malformed and hostile requests to `slmtune serve` on 127.0.0.1, twice (default decoding, and
    --decoding free, where tool schemas reach the guard's validator): no 5xx, no traceback in the server's log,
    nothing reaches the canary, and a normal call is still answered afterwards."""
    from slmtune.serve.asgi import serve_in_thread
    from slmtune.synthetic.upstream import create_upstream_app

    root = Path(args.work or tempfile.mkdtemp(prefix="bench_faults.")) / "requests"
    root.mkdir(parents=True, exist_ok=True)
    inputs = setup(root, args.seed)
    work = root / "work"
    rc, secs = run_to_end(flywheel_cmd(inputs, work), root / "flywheel.log")
    if rc != 0:
        sys.exit(f"the flywheel for part 2 failed (exit {rc}); see {root / 'flywheel.log'}")
    router = json.loads((work / "router.json").read_text())
    tool_route = next(r for r in router["routes"] if r["category"] == "tool_calling")
    logs = [json.loads(x) for x in (Path(inputs["logs"]) / "openai.jsonl").open()]
    weather = next(x["request"] for x in logs if sorted(t["function"]["name"] for t in x["request"].get("tools") or [])
                   == tool_route["match"]["tools"])
    upstream = serve_in_thread(create_upstream_app([inputs["logs"]]))
    canary, seen, canary_srv = canary_server()
    corpus = hostile_corpus(weather, canary)
    servers = {}
    try:
        for name, extra in (("default", []), ("decoding-free", ["--decoding", "free"])):
            log = root / f"serve-{name}.log"
            proc, url = start_serve(work, upstream.url + "/v1", extra, log)
            try:
                t0 = time.perf_counter()
                statuses = [(item["name"], send(url, item)) for item in corpus] + raw_socket_faults(url)
                after = {"poem": send(url, {"body": POEM}),
                         "routed": send(url, {"body": {**weather, "max_tokens": 16}})}
                servers[name] = summarize(statuses, after, log, time.perf_counter() - t0)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            print_summary(name, servers[name])
    finally:
        upstream.stop()
        canary_srv.shutdown()
    verdict = {"servers": servers, "canary_requests": len(seen), "corpus": len(corpus) + 6,
               "flywheel_s": round(secs, 1), "work": str(root)}
    n5 = sum(s["5xx"] for s in servers.values())
    total = sum(s["sent"] for s in servers.values())
    print(f"hostile requests with a 5xx: {n5} of {total}; canary requests: {len(seen)}; server tracebacks: "
          f"{sum(s['tracebacks'] for s in servers.values())}; normal calls afterwards: "
          f"{[s['after'] for s in servers.values()]}", flush=True)
    return verdict


def summarize(statuses: list[tuple[str, int]], after: dict, log: Path, secs: float) -> dict:
    from collections import Counter

    text = log.read_text(errors="replace")
    return {"sent": len(statuses), "seconds": round(secs, 1),
            "by_status": dict(sorted(Counter(str(s) for _, s in statuses).items())),
            "5xx": sum(s >= 500 for _, s in statuses), "no_answer": [n for n, s in statuses if s == 0],
            "5xx_requests": [n for n, s in statuses if s >= 500],
            "tracebacks": text.count("Traceback"), "after": after,
            "2xx_requests": [n for n, s in statuses if 200 <= s < 300][:400]}


def plot_requests(result: dict, path: Path) -> None:
    """Hostile requests by the status they got, per server (0: no HTTP answer: the client cut its own body)."""
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    statuses = sorted({k for s in result["servers"].values() for k in s["by_status"]}, key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(result["servers"]))
    for i, (name, srv) in enumerate(result["servers"].items()):
        xs = [j + i * width for j in range(len(statuses))]
        ax.bar(xs, [srv["by_status"].get(k, 0) for k in statuses], width, label=name)
    ax.set_xticks([j + width * (len(result["servers"]) - 1) / 2 for j in range(len(statuses))], statuses)
    n5 = sum(s["5xx"] for s in result["servers"].values())
    total = sum(s["sent"] for s in result["servers"].values())
    ax.set(xlabel="HTTP status", ylabel="requests", yscale="log",
           title=f"hostile requests: {n5} of {total} got a 5xx; canary hits {result['canary_requests']}")
    ax.legend()
    save_png(fig, path, dpi=120, bbox_inches="tight")


def print_summary(name: str, s: dict) -> None:
    print(f"[{name}] {s['sent']} requests in {s['seconds']} s: by status {s['by_status']}; 5xx {s['5xx']} "
          f"{s['5xx_requests'][:10]}; no answer {s['no_answer']}; tracebacks in the server log {s['tracebacks']}; "
          f"afterwards {s['after']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default=",".join(PARTS), help=f"comma-separated parts to run: {', '.join(PARTS)}")
    ap.add_argument("--kills", type=int, default=10, help="part 1: flywheel runs killed and rerun")
    ap.add_argument("--seed", type=int, default=0, help="kill times and synthetic logs")
    ap.add_argument("--work", default=None, help="part 1: folder for the model, logs and work dirs (default: a temp)")
    ap.add_argument("--out", default="runs/bench_faults.json")
    args = ap.parse_args()
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        sys.exit(f"unknown --part {unknown}; choose from {', '.join(PARTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args)}
    for part in parts:
        result[part] = kills(args) if part == "kills" else hostile_requests(args)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each part: a failing part 2 keeps part 1
    if "kills" in result:
        plot_kills(result["kills"], out.with_suffix(".png"))
    if "requests" in result:
        plot_requests(result["requests"], out.with_name(out.stem + "_requests.png"))


if __name__ == "__main__":
    main()
