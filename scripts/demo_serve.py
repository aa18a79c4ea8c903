#!/usr/bin/env python
"""Replay a flywheel workdir's held-out calls through `slmtune serve`, with the official `openai` client.

Starts two servers on 127.0.0.1 and stops both at the end, whatever happens:

* a STAND-IN for the upstream LLM (`python -m slmtune.synthetic.upstream`): it answers from logged teacher
  responses — the replayed records' own targets first, then the logs — so "llm" answers below are the logged
  answers, not a live model's, and their accuracy is ~1.0 by construction;
* `slmtune serve WORKDIR --upstream <stand-in>`: each routed call to its task's tuned small model, the rest
  (and any small-model answer the guard rejects) to the stand-in.

Calls replayed, grouped by task, at most `--limit` per task: each task's pinned eval set (latest round's
`tasks/<task>/eval.jsonl`, held out from training) *past the records the flywheel evaluated* (its `eval_limit`:
those calibrated each route's confidence threshold, so the figures here come from calls that did not), then
records of tasks without an eval set (their cluster dir) and the cluster's unassigned records, so the LLM route
shows up. A call sends the record's
prompt (the messages before its target, and its tools); the answer is scored against the target with slmtune's
eval metrics by the task's key metric (exact_match: tool calls, extraction; label_accuracy; rouge_l: text).

Prints per route: calls, share, key-metric mean, p50/p95 client-side latency; per task: the share of its calls
the SLM answered and those answers' accuracy; fallbacks by reason; totals.
Writes the same, plus one row per call, to WORKDIR/serve_demo.json; server output and the served-call log go
to WORKDIR/serve_demo/.

    python scripts/demo_serve.py --workdir runs/demo                     # logs: the workdir's flywheel inputs
    python scripts/demo_serve.py --workdir W --logs LOGS --limit 5 --port 8000
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
from rich.console import Console
from rich.table import Table

from slmtune.eval.evaluate import load_task
from slmtune.eval.metrics import key_metric, score
from slmtune.io import write_json, write_jsonl
from slmtune.records import read_records, split_prompt_target

KEY_ENV = "SLMTUNE_DEMO_KEY"  # the key clients must send; a fresh one per run
STANDIN = "stand-in upstream (slmtune.synthetic.upstream: answers from logged teacher responses, not an LLM)"


# ----------------------------------------------------------------------------- the calls to replay
def latest_round(workdir: Path, router: dict) -> Path:
    rounds = sorted(workdir.glob("round-*"))
    named = workdir / str(router.get("round"))
    if named.is_dir():
        return named
    if not rounds:
        sys.exit(f"{workdir}: no round-* folder; run `slmtune flywheel LOGS -w {workdir}` first.")
    return rounds[-1]


def task_file(round_dir: Path, task: str) -> Path | None:
    """A task's records: its pinned eval set in this round (or an earlier one), else its cluster dir's."""
    rounds = [round_dir, *sorted(round_dir.parent.glob("round-*"), reverse=True)]
    places = [r / "tasks" / task for r in rounds] + [round_dir / "cluster" / task]
    return next((p / f for p in places for f in ("eval.jsonl", "train.jsonl") if (p / f).is_file()), None)


def task_calls(path: Path, task: str, routed: bool, limit: int, skip: int = 0) -> list[dict]:
    records = [rec for _, rec in read_records(path)][skip:skip + limit]
    if task == "unassigned":  # no task.json: each record's category is inferred from its own answer
        kinds = [load_task(path, [rec]) for rec in records]
    else:
        kinds = [load_task(path, records)] * len(records)
    return [{"task": task, "routed": routed, "category": k.category, "schema": k.schema, "record": rec}
            for k, rec in zip(kinds, records, strict=True)]


def gather_calls(workdir: Path, router: dict, limit: int) -> list[dict]:
    round_dir = latest_round(workdir, router)
    # the first `eval_limit` records of an eval set set its route's threshold: replay the ones after them
    calibrated = (json.loads((round_dir / "round.json").read_text()).get("config") or {}).get("eval_limit") or 0
    wanted = [(r["task"], True) for r in router["routes"]] + [(r["task"], False) for r in router["not_routed"]]
    calls = []
    for task, routed in wanted:
        path = task_file(round_dir, task)
        if path is None:
            print(f"(no records found for {task}; skipped)", file=sys.stderr)
            continue
        skip = calibrated if path.name == "eval.jsonl" else 0
        found = task_calls(path, task, routed, limit, skip)
        if not found:
            print(f"({task}: no held-out call past the {calibrated} the flywheel evaluated; skipped)", file=sys.stderr)
        calls += found
    unassigned = round_dir / "cluster" / "unassigned" / "records.jsonl"
    if unassigned.is_file() and unassigned.stat().st_size:
        calls += task_calls(unassigned, "unassigned", False, limit)
    return calls


def request_of(rec: dict) -> dict:
    prompt, _ = split_prompt_target(rec)
    body = {"model": (rec.get("meta") or {}).get("model") or "agent-llm", "messages": prompt}
    return body | ({"tools": rec["tools"]} if rec.get("tools") else {})


# ----------------------------------------------------------------------------- the two servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            sys.exit(f"{log.stem}: exited with {proc.returncode} before it was ready; last lines of {log}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{url} not ready after {timeout_s:.0f} s; see {log}.")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- replay and score
def replay(client: openai.OpenAI, call: dict) -> dict:
    rec, metric = call["record"], key_metric(call["category"])
    t0 = time.perf_counter()
    try:
        raw = client.chat.completions.with_raw_response.create(**request_of(rec))
        headers, status, done = raw.headers, raw.status_code, raw.parse()
        answer, model = done.choices[0].message.model_dump(exclude_none=True), done.model
        tokens = done.usage.completion_tokens if done.usage else None
    except openai.APIStatusError as e:
        headers, status, answer, model, tokens = e.response.headers, e.status_code, None, None, None
    ms = (time.perf_counter() - t0) * 1000
    units = None
    if answer is not None:
        units = score(call["category"], call["schema"], answer, split_prompt_target(rec)[1], rec.get("tools"))[metric]
    return {"id": rec.get("id"), "task": call["task"], "routed": call["routed"], "status": status,
            "route": headers.get("x-slmtune-route", "?") if answer is not None else "error",
            "fallback": headers.get("x-slmtune-fallback"), "model": model, "latency_ms": round(ms, 1),
            "completion_tokens": tokens,
            "key_metric": metric, "score": sum(units) / len(units) if units else None}


def pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default)."""
    if not xs:
        return None
    xs, k = sorted(xs), (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def group(name: str, rows: list[dict], total: int) -> dict:
    scores = [r["score"] for r in rows if r["score"] is not None]
    ms = [r["latency_ms"] for r in rows]
    return {"route": name, "calls": len(rows), "share": len(rows) / total if total else 0.0,
            "key_metrics": sorted({r["key_metric"] for r in rows}),
            "accuracy": sum(scores) / len(scores) if scores else None,
            "p50_ms": _round(pct(ms, 0.5)), "p95_ms": _round(pct(ms, 0.95))}


def summarize(rows: list[dict], routed: list[str]) -> dict:
    """Per SLM route (every route in router.json, used or not), all SLM routes, the LLM, errors, total."""
    n = len(rows)

    def on(*routes: str) -> list[dict]:
        return [r for r in rows if r["route"] in routes]

    fallbacks = Counter(r["fallback"] for r in rows if r["fallback"])
    errors = on("error")
    tasks = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        slm = [r for r in mine if r["route"] == task]
        scores = [r["score"] for r in slm if r["score"] is not None]
        tasks.append({"task": task, "routed": task in routed, "calls": len(mine), "slm_calls": len(slm),
                      "slm_share": len(slm) / len(mine), "slm_accuracy": sum(scores) / len(scores) if scores else None,
                      "deferred": dict(Counter(r["fallback"] for r in mine if r["fallback"]))})
    return {"routes": [group(t, on(t), n) for t in routed], "tasks": tasks,
            "slm": group("all SLM routes", on(*routed), n),
            "llm": group("llm (stand-in)", on("llm"), n), **({"errors": group("errors", errors, n)} if errors else {}),
            "total": group("total", rows, n),
            "fallbacks": {reason: {"calls": c, "tasks": dict(Counter(r["task"] for r in rows
                                                                      if r["fallback"] == reason))}
                          for reason, c in fallbacks.most_common()}}


# ----------------------------------------------------------------------------- output
def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def route_table(summary: dict) -> Table:
    t = Table(title="slmtune serve: held-out calls replayed through the openai client",
              caption=f"mean: each call's own task's key metric against the logged answer. Latency at the client; "
                      f"a fallback's includes the SLM's try. llm = {STANDIN}")
    for col in ("route", "calls", "share", "key metric", "mean", "p50 ms", "p95 ms"):
        t.add_column(col, justify="left" if col in ("route", "key metric") else "right")
    tail = [summary[k] for k in ("slm", "llm", "errors", "total") if k in summary]
    for i, g in enumerate([*summary["routes"], *tail]):
        metric = g["key_metrics"][0] if len(g["key_metrics"]) == 1 else "per task" if g["key_metrics"] else "—"
        t.add_row(g["route"], str(g["calls"]), f"{g['share']:.0%}", metric, _num(g["accuracy"], ".3f"),
                  _num(g["p50_ms"], ".0f"), _num(g["p95_ms"], ".0f"), end_section=i == len(summary["routes"]) - 1)
    return t


def task_table(summary: dict) -> Table:
    t = Table(title="per task: what the SLM answered, and how well (the rest went to the LLM)")
    for col in ("task", "routed", "calls", "SLM answered", "their accuracy", "deferred to the LLM"):
        t.add_column(col, justify="left" if col in ("task", "deferred to the LLM") else "right")
    for g in summary["tasks"]:
        t.add_row(g["task"], "yes" if g["routed"] else "no", str(g["calls"]),
                  f"{g['slm_calls']} ({g['slm_share']:.0%})", _num(g["slm_accuracy"], ".3f"),
                  ", ".join(f"{k} ×{v}" for k, v in g["deferred"].items()) or "—")
    return t


def fallback_table(summary: dict) -> Table:
    t = Table(title="fallbacks to the LLM, by reason (x-slmtune-fallback)")
    for col in ("reason", "calls", "tasks"):
        t.add_column(col, justify="right" if col == "calls" else "left")
    for reason, v in summary["fallbacks"].items():
        t.add_row(reason, str(v["calls"]), ", ".join(f"{task} ×{n}" for task, n in v["tasks"].items()))
    return t


def print_summary(summary: dict, console: Console) -> None:
    slm, llm, total = summary["slm"], summary["llm"], summary["total"]
    console.print(route_table(summary))
    console.print(task_table(summary))
    console.print(fallback_table(summary) if summary["fallbacks"] else "no fallbacks")
    console.print(f"SLMs served {slm['calls']} of {total['calls']} calls ({slm['share']:.0%}); p50 latency "
                  f"{_num(slm['p50_ms'], '.0f')} ms (SLM) vs {_num(llm['p50_ms'], '.0f')} ms (LLM stand-in).")


def default_logs(workdir: Path) -> list[str]:
    registry = workdir / "flywheel.json"
    inputs = json.loads(registry.read_text())["inputs"] if registry.is_file() else []
    return [p for p in inputs if Path(p).exists()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="flywheel workdir (router.json, exports, rounds)")
    ap.add_argument("--logs", nargs="*", help="logs the stand-in also answers from (default: the flywheel's inputs)")
    ap.add_argument("--port", type=int, default=0, help="port for slmtune serve (0: a free one)")
    ap.add_argument("--upstream-port", type=int, default=0, help="port for the stand-in upstream (0: a free one)")
    ap.add_argument("--limit", type=int, default=10, help="most calls per task")
    ap.add_argument("--constrained", action="store_true",
                    help="serve with --decoding constrained: labels and extraction JSON under their grammar too (tool "
                         "calls always are)")
    ap.add_argument("--engine", default="auto", choices=["auto", "embedded", "llamacpp", "vllm"],
                    help="slmtune serve --engine; auto: llamacpp when llama-cpp-python is installed and every routed "
                         "export has a GGUF (flywheel --gguf), else embedded")
    ap.add_argument("--serve-args", default="", help="more `slmtune serve` options, e.g. the --engine-url of vllm")
    ap.add_argument("--report", type=Path, help="where the JSON report goes (default: WORKDIR/serve_demo.json)")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds each server may take to start")
    ap.add_argument("--slm-timeout", type=float, default=30.0,
                    help="slmtune serve --slm-timeout: seconds an export may take before the upstream answers")
    args = ap.parse_args()
    work, out = args.workdir.resolve(), args.workdir.resolve() / "serve_demo"
    if not (work / "router.json").is_file():
        sys.exit(f"{work}: no router.json; run `slmtune flywheel LOGS -w {work}` first.")
    router = json.loads((work / "router.json").read_text())
    calls = gather_calls(work, router, args.limit)
    args.engine = pick_engine(args.engine, work)
    out.mkdir(exist_ok=True)
    write_jsonl(out / "replayed.jsonl", [c["record"] for c in calls])
    logs = args.logs if args.logs is not None else default_logs(work)
    rows = with_servers(args, work, out, [str(out / "replayed.jsonl"), *logs], calls)
    summary = summarize(rows, [r["task"] for r in router["routes"]])
    print_summary(summary, Console(width=None if sys.stdout.isatty() else 140))
    report = args.report or work / "serve_demo.json"
    write_json(report, {"upstream": STANDIN, "workdir": str(work), "engine": args.engine,
                                          "served_log": str(out / "served"), **summary, "calls": rows})
    print(f"Details: {report}; served-call log: {out / 'served'}")


def pick_engine(engine: str, work: Path) -> str:
    """`auto`: llamacpp when it is installed and every routed export carries a GGUF, else embedded."""
    if engine != "auto":
        return engine
    from slmtune.errors import SlmtuneError
    from slmtune.serve.config import checkpoints, load_router
    from slmtune.serve.llamacpp import check_router

    try:
        check_router(checkpoints(load_router(work / "router.json")))
    except SlmtuneError as e:
        print(f"engine: embedded ({e.message})")
        return "embedded"
    return "llamacpp"


def with_servers(args, work: Path, out: Path, sources: list[str], calls: list[dict]) -> list[dict]:
    """Start the stand-in and `slmtune serve`, replay `calls` through the openai client, stop both."""
    up_port, port, key = args.upstream_port or free_port(), args.port or free_port(), secrets.token_hex(16)
    py = sys.executable
    upstream = start([py, "-m", "slmtune.synthetic.upstream", *sources, "--port", str(up_port)], out / "upstream.log")
    serve = None
    try:
        wait_ready(f"http://127.0.0.1:{up_port}/v1/models", upstream, out / "upstream.log", args.start_timeout)
        serve = start([py, "-m", "slmtune.cli", "serve", str(work), "--port", str(port), "--api-key-env", KEY_ENV,
                       "--upstream", f"http://127.0.0.1:{up_port}/v1", "--log-dir", str(out / "served"),
                       "--slm-timeout", str(args.slm_timeout), "--engine", args.engine, *shlex.split(args.serve_args),
                       *(["--decoding", "constrained"] if args.constrained else [])],
                      out / "serve.log", env=os.environ | {KEY_ENV: key})
        wait_ready(f"http://127.0.0.1:{port}/healthz", serve, out / "serve.log", args.start_timeout)
        print(f"slmtune serve --engine {args.engine} on http://127.0.0.1:{port}/v1; upstream: {STANDIN}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
        return [replay_logged(client, call, i, len(calls)) for i, call in enumerate(calls, 1)]
    finally:
        for proc in (serve, upstream):
            if proc is not None:
                stop(proc)


def replay_logged(client: openai.OpenAI, call: dict, i: int, n: int) -> dict:
    r = replay(client, call)
    why = f" ({r['fallback']})" if r["fallback"] else ""
    print(f"[{i}/{n}] {r['task']}: route {r['route']}{why}, {r['latency_ms']:.0f} ms", flush=True)
    return r


if __name__ == "__main__":
    main()
