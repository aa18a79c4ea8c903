#!/usr/bin/env python
"""An agent's own traffic, end to end: BFCL v4's multi-turn applications as an agent's logs (issue 30).

    python scripts/bench_agent.py --out-dir runs/bench_agent                 # the development applications
    python scripts/bench_agent.py --apps TradingBot,VehicleControlAPI,TicketAPI,TravelAPI   # the reserved ones

**As a user would.** `slmtune flywheel` on the train logs (its defaults, `--min-coverage 0` so every task is
exported; each route keeps its calibrated `threshold` and `coverage`), then `slmtune serve` on 127.0.0.1 in front
of `slmtune.synthetic.upstream` (the stand-in LLM, answering from the same logs), and every held-out step
replayed through the `openai` client, twice:

* **calibrated** — the routes that earned coverage (`--min-coverage`, default 0.2: the flywheel's own rule) with
  their thresholds: what `slmtune flywheel` with its defaults serves;
* **every step** — every exported task routed, no threshold: today's system before confidence routing.

Output `OUT/bench_agent.json` — per system: `overall`, `per_app`, `per_function`: `test_steps`, `slm_share` (held-
out steps the SLM answered), `answered_accuracy` (of those), `slm_accuracy` (the SLM's accuracy had it answered
every routed step: the "every step" replay), `system_accuracy` (all steps, the stand-in LLM counting as right),
`p50_slm_s`, `p50_llm_s` — `rounds` (per round: its logs, router, both systems' `overall`, and the feedback
replay's) and `OUT/bench_agent.png` (share vs accuracy per application, last round).

**The flywheel's second round** (`--rounds 2`, the default): the train conversations are split in seeded halves;
round 1 trains on one (`logs/round1.jsonl`), the other (`logs/feedback.jsonl`) is replayed through the calibrated
serve, and its served log (SLM answers marked, so curate drops them; the LLM's kept) joins round 2's logs, as an
agent's served traffic would. Both rounds replay the same held-out steps: the LLM's share should shrink.

**Logs from the applications.** For each conversation of `multi_turn_base` whose involved classes all lie in
`--apps`, the ground truth is replayed turn by turn with bfcl-eval's own executor
(`multi_turn_utils.execute_multi_turn_func_call`, the entry's `initial_config`), so every tool result is what the
application really returns. Every ground-truth call becomes one agent log line in OpenAI request/response form:
a fixed agent system prompt, the involved classes' functions (`data/multi_turn_func_doc`, minus the entry's
`excluded_function`) as `tools`, the conversation so far (user turns, earlier assistant `tool_calls`, `tool`
results) as `messages`, and that call as the logged response. Positional arguments in the ground truth
(`sort('final_report.pdf')`) are named through the function's documented parameters. End-of-turn text answers
have no ground truth and are left out.

**Development vs reserved.** Develop on the default `--apps` (GorillaFileSystem, TwitterAPI, MathAPI,
MessageAPI) only; the other four applications are reserved for independent checks. Conversations are split
train/test by a seeded shuffle of their ids; the `multi_turn_long_context` / `miss_param` / `miss_func` variants
of a *train* conversation may join the training traffic (`--variants`), a test conversation's never do.

**Scoring** (`score_step`): an answer is right when it makes exactly the step's ground-truth call, by BFCL's own
AST checker (`ast_checker`, the `multiple` rule: one call among the offered functions; the call's arguments as
the only acceptable values, an optional parameter the ground truth leaves out may be left out).

Also writes `OUT/logs/{train,test}.jsonl` and `OUT/split.json` (conversation ids per side, steps per
application); `--logs-only` stops there.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import random
import sys
import uuid
from pathlib import Path

DEV_APPS = ("GorillaFileSystem", "TwitterAPI", "MathAPI", "MessageAPI")
RESERVED_APPS = ("TradingBot", "VehicleControlAPI", "TicketAPI", "TravelAPI")
DOC_FILES = {"GorillaFileSystem": "gorilla_file_system", "MathAPI": "math_api", "MessageAPI": "message_api",
             "TwitterAPI": "posting_api", "TicketAPI": "ticket_api", "TradingBot": "trading_bot",
             "TravelAPI": "travel_booking", "VehicleControlAPI": "vehicle_control"}
VARIANTS = ("multi_turn_long_context", "multi_turn_miss_param", "multi_turn_miss_func")
SYSTEM = ("You are an agent that operates the user's applications through the offered tools. Do one step at a "
          "time: call the tool the next step needs, with exact arguments.")
MODEL_NAME = "slmtune-bench"


def bfcl():
    """bfcl_eval's data folder, AST checker, tool converter and multi-turn executor (the model registry stubbed as in
    bench_quality)."""
    from bench_quality import bfcl as base

    b = base()
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    b.utils = multi_turn_utils
    return b


# ----------------------------------------------------------------------------- conversations
def load_conversations(b, category: str = "multi_turn_base") -> list[dict]:
    answers = {}
    for line in (b.data / "possible_answer" / f"BFCL_v4_{category}.json").read_text().splitlines():
        a = json.loads(line)
        answers[a["id"]] = a["ground_truth"]
    out = []
    for line in (b.data / f"BFCL_v4_{category}.json").read_text().splitlines():
        e = json.loads(line)
        out.append({**e, "ground_truth": answers[e["id"]]})
    return out


def in_apps(entry: dict, apps: set[str]) -> bool:
    return set(entry["involved_classes"]) <= apps


def func_docs(b, classes: list[str], excluded: list[str]) -> list[dict]:
    """The involved classes' documented functions (BFCL's Gorilla format), minus the excluded ones."""
    docs = []
    for c in classes:
        path = b.data / "multi_turn_func_doc" / f"{DOC_FILES[c]}.json"
        docs += [d for d in map(json.loads, path.read_text().splitlines()) if d["name"] not in set(excluded)]
    return docs


def parse_call(text: str, docs: list[dict]) -> tuple[str, dict]:
    """`name(a, b=1)` → (name, {param: value}); positional arguments named in the documented parameter order."""
    node = ast.parse(text, mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain call: {text!r}")
    name = node.func.id
    doc = next((d for d in docs if d["name"] == name), None)
    if doc is None:
        raise ValueError(f"{name} is not among the offered functions")
    order = list((doc.get("parameters") or {}).get("properties") or {})
    if len(node.args) > len(order):
        raise ValueError(f"{text!r}: more positional arguments than {name} documents")
    args = {order[i]: ast.literal_eval(a) for i, a in enumerate(node.args)}
    args |= {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return name, args


def conversation_logs(b, entry: dict) -> list[dict]:
    """One OpenAI request/response log per ground-truth call, tool results from the real application."""
    docs = func_docs(b, entry["involved_classes"], entry.get("excluded_function") or [])
    missed = entry.get("missed_function") or {}  # miss_func variants: {turn: [functions offered from then on]}

    def tools_at(turn: int) -> list[dict]:
        held = {f for k, fs in missed.items() if turn < int(k) for f in fs}
        return b.tools(json.loads(json.dumps([d for d in docs if d["name"] not in held])))  # it edits its argument

    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    run_id = f"{MODEL_NAME}_{uuid.uuid4().hex}"  # the executor keeps each conversation's state in its globals
    logs = []
    try:
        for t, (question, calls) in enumerate(zip(entry["question"], entry["ground_truth"], strict=False)):
            messages += [{"role": m["role"], "content": m["content"]} for m in question]
            for k, text in enumerate(calls):
                name, args = parse_call(text, docs)
                call = {"id": f"call_{t}_{k}", "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args)}}
                answer = {"role": "assistant", "content": None, "tool_calls": [call]}
                logs.append({
                    "id": f"{entry['id']}-t{t}-c{k}",
                    "metadata": {"bfcl_id": entry["id"], "turn": t, "step": k, "apps": entry["involved_classes"]},
                    "request": {"model": "teacher", "messages": json.loads(json.dumps(messages)),
                                "tools": tools_at(t)},
                    "response": {"id": f"{entry['id']}-t{t}-c{k}", "object": "chat.completion", "model": "teacher",
                                 "choices": [{"index": 0, "message": answer, "finish_reason": "tool_calls"}]},
                    "ground_truth": text})
                (result,), _ = b.utils.execute_multi_turn_func_call(
                    [text], entry["initial_config"], entry["involved_classes"], run_id, entry["id"],
                    long_context="long_context" in entry["id"])
                messages += [answer, {"role": "tool", "tool_call_id": call["id"], "content": result}]
    finally:
        for key in [k for k in vars(b.utils) if k.startswith(run_id.replace("-", "_"))]:
            delattr(b.utils, key)
    return logs


# ----------------------------------------------------------------------------- split and scoring
def split(ids: list[str], seed: int, test_share: float) -> tuple[list[str], list[str]]:
    """Conversations (base ids) into train and test by a seeded shuffle; every id on exactly one side."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    k = max(1, round(len(order) * test_share))
    return sorted(order[k:]), sorted(order[:k])


def variant_of(variant_id: str) -> str:
    """`multi_turn_miss_param_12` → `multi_turn_base_12`: the conversation a variant rewrites (a base id is its
    own)."""
    return "multi_turn_base_" + variant_id.rsplit("_", 1)[1]


def score_step(b, entry_docs: list[dict], answer: dict | None, ground_truth: str) -> bool:
    """Whether `answer` (an OpenAI assistant message) makes exactly the step's ground-truth call (BFCL's checker)."""
    from bench_quality import decode_calls

    decoded, parsed = decode_calls(answer)
    if not parsed or len(decoded) != 1:
        return False
    name, args = parse_call(ground_truth, entry_docs)
    doc = next(d for d in entry_docs if d["name"] == name)
    required = set((doc.get("parameters") or {}).get("required") or [])
    optional = set((doc.get("parameters") or {}).get("properties") or {}) - required - set(args)
    possible = [{name: {k: [v] for k, v in args.items()} | {k: [""] for k in optional}}]
    try:
        res = b.ast_checker(entry_docs, decoded, possible, b.Language.PYTHON, "multiple", MODEL_NAME)
    except Exception:  # noqa: BLE001 - the checker raises on some malformed outputs: a wrong answer, as BFCL counts it
        return False
    return bool(res["valid"])


# ----------------------------------------------------------------------------- main
def write_logs(b, apps: set[str], seed: int, test_share: float, variants: bool, out: Path) -> dict:
    base = [e for e in load_conversations(b) if in_apps(e, apps)]
    train_ids, test_ids = split([e["id"] for e in base], seed, test_share)
    train = set(train_ids)
    sides: dict[str, list[dict]] = {"train": [], "test": []}
    for e in base:
        sides["train" if e["id"] in train else "test"] += conversation_logs(b, e)
    if variants:
        for cat in VARIANTS:
            for e in load_conversations(b, cat):
                if in_apps(e, apps) and variant_of(e["id"]) in train:  # a test conversation's variants: never
                    sides["train"] += conversation_logs(b, e)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for side, logs in sides.items():
        (out / "logs" / f"{side}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in logs))
    summary = {"apps": sorted(apps), "seed": seed, "train_conversations": train_ids, "test_conversations": test_ids,
               "steps": {side: dict(collections.Counter("+".join(sorted(x["metadata"]["apps"])) for x in logs))
                         for side, logs in sides.items()}}
    (out / "split.json").write_text(json.dumps(summary, indent=1))
    return summary


def replay(b, client, lines: list[dict], docs: dict[str, list[dict]], label: str) -> list[dict]:
    """Every held-out step through `slmtune serve`: who answered, whether it is the step's call, how long."""
    import time

    import openai

    rows = []
    for i, x in enumerate(lines, 1):
        req = x["request"]
        t0 = time.perf_counter()
        try:
            raw = client.chat.completions.with_raw_response.create(model="agent", messages=req["messages"],
                                                                   tools=req["tools"])
            headers, answer = raw.headers, raw.parse().choices[0].message.model_dump(exclude_none=True)
        except openai.APIStatusError as e:
            headers, answer = e.response.headers, None
        seconds = time.perf_counter() - t0
        name, _ = parse_call(x["ground_truth"], docs[x["metadata"]["bfcl_id"]])
        rows.append({"id": x["id"], "app": "+".join(sorted(x["metadata"]["apps"])), "function": name,
                     "route": headers.get("x-slmtune-route", "error"), "fallback": headers.get("x-slmtune-fallback"),
                     "correct": score_step(b, docs[x["metadata"]["bfcl_id"]], answer, x["ground_truth"]),
                     "seconds": round(seconds, 3)})
        r = rows[-1]
        why = f" ({r['fallback']})" if r["fallback"] else ""
        print(f"[{label} {i}/{len(lines)}] {r['app']}: {r['route']}{why}, {'right' if r['correct'] else 'wrong'}, "
              f"{seconds:.1f} s", flush=True)
    return rows


def figures(rows: list[dict], every: list[dict] | None) -> dict:
    """`overall`, `per_app`, `per_function` of one replay (`every`: the every-step replay, for slm_accuracy)."""
    import statistics

    def one(rs: list[dict], ev: list[dict]) -> dict:
        slm = [r for r in rs if r["route"] not in ("llm", "error")]
        llm = [r for r in rs if r["route"] == "llm"]
        routed = [r for r in ev if r["route"] != "llm" or r["fallback"] != "no_route"]
        return {"test_steps": len(rs), "slm_share": round(len(slm) / len(rs), 4) if rs else None,
                "answered_accuracy": round(sum(r["correct"] for r in slm) / len(slm), 4) if slm else None,
                "slm_accuracy": round(sum(r["correct"] and r["route"] != "llm" for r in routed) / len(routed), 4)
                if routed else None,
                "system_accuracy": round(sum(r["correct"] or r["route"] == "llm" for r in rs) / len(rs), 4)
                if rs else None,
                "p50_slm_s": statistics.median(r["seconds"] for r in slm) if slm else None,
                "p50_llm_s": statistics.median(r["seconds"] for r in llm) if llm else None}

    ev = every if every is not None else rows
    out = {"overall": one(rows, ev)}
    for key, name in (("app", "per_app"), ("function", "per_function")):
        groups = sorted({r[key] for r in rows})
        out[name] = {g: one([r for r in rows if r[key] == g], [r for r in ev if r[key] == g]) for g in groups}
    return out


def feedback_split(out: Path, seed: int) -> tuple[Path, Path]:
    """`--rounds` > 1: the train conversations in two seeded halves, `logs/round1.jsonl` (round 1 trains on it)
    and `logs/feedback.jsonl` (replayed through serve after round 1: its served log is round 2's new traffic)."""
    lines = [json.loads(x) for x in (out / "logs" / "train.jsonl").open()]
    convs = sorted({variant_of(x["metadata"]["bfcl_id"]) for x in lines})
    first, _ = split(convs, seed + 1, 0.5)
    keep = set(first)
    sides = {"round1": [], "feedback": []}
    for x in lines:
        sides["round1" if variant_of(x["metadata"]["bfcl_id"]) in keep else "feedback"].append(x)
    for side, xs in sides.items():
        (out / "logs" / f"{side}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in xs))
    return out / "logs" / "round1.jsonl", out / "logs" / "feedback.jsonl"


def pipeline(a, b, out: Path) -> dict:
    """Per round: flywheel on the traffic so far, then the held-out steps replayed through serve (every exported
    task routed; the calibrated routes). Between rounds the feedback half of the train traffic goes through the
    calibrated serve and its served log joins the next round's logs."""
    import os
    import secrets

    import openai
    from bench_quality import slmtune
    from demo_serve import free_port, start, stop, wait_ready

    log = out / "commands.log"
    work = out / "work"
    quick = ["--max-steps", "4", "--eval-limit", "8"] if a.quick else []
    test = [json.loads(x) for x in (out / "logs" / "test.jsonl").open()][:a.limit]
    logs, feedback = [out / "logs" / "train.jsonl"], []
    if a.rounds > 1:
        first, fb = feedback_split(out, a.seed)
        logs, feedback = [first], [json.loads(x) for x in fb.open()][:a.limit]
    convs = {e["id"]: e for e in load_conversations(b)}
    docs = {bid: func_docs(b, convs[bid]["involved_classes"], convs[bid].get("excluded_function") or [])
            for bid in {x["metadata"]["bfcl_id"] for x in test + feedback}
            if bid in convs}
    for x in feedback:  # variants carry their base conversation's classes, less what they hold back
        bid = x["metadata"]["bfcl_id"]
        if bid not in docs:
            e = next(v for v in load_conversations(b, bid.rsplit("_", 1)[0]) if v["id"] == bid)
            docs[bid] = func_docs(b, e["involved_classes"], e.get("excluded_function") or [])
    up_port = free_port()
    sources = [str(out / "logs" / "train.jsonl"), str(out / "logs" / "test.jsonl")]
    upstream = start([sys.executable, "-m", "slmtune.synthetic.upstream", *sources, "--port", str(up_port)],
                     out / "upstream.log")

    def served(router: dict, name: str, lines: list[dict], label: str) -> list[dict]:
        folder = out / name
        folder.mkdir(exist_ok=True)
        (folder / "router.json").write_text(json.dumps(router))
        port, key = free_port(), secrets.token_hex(8)
        serve = start([sys.executable, "-m", "slmtune.cli", "serve", "--router", str(folder / "router.json"),
                       "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}/v1", "--api-key-env",
                       "BENCH_AGENT_KEY", "--slm-timeout", "300", "--log-dir", str(folder / "served")],
                      folder / "serve.log", env=os.environ | {"BENCH_AGENT_KEY": key})
        try:
            wait_ready(f"http://127.0.0.1:{port}/healthz", serve, folder / "serve.log", 300)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=900)
            return replay(b, client, lines, docs, label)
        finally:
            stop(serve)

    rounds, results = [], {}
    try:
        wait_ready(f"http://127.0.0.1:{up_port}/v1/models", upstream, out / "upstream.log", 300)
        for k in range(1, a.rounds + 1):
            print(f"== round {k}: slmtune flywheel on {', '.join(p.name for p in logs)}", flush=True)
            cands = (["--candidates", a.candidates] if a.candidates else []) + (["--rl"] if a.rl else [])
            slmtune("flywheel", *logs, "-w", work, "--gpu", "cpu", "--min-coverage", "0", *cands, *quick, log=log)
            router = json.loads((work / "router.json").read_text())
            earned = dict(router, routes=[r for r in router["routes"] if r.get("threshold") is not None
                                          and (r.get("coverage") or 0) >= a.min_coverage])
            every = dict(router, routes=[dict(r, threshold=None) for r in router["routes"]])
            rows = {"every_step": served(every, f"round{k}-every_step", test, f"r{k} every step"),
                    "calibrated": served(earned, f"round{k}-calibrated", test, f"r{k} calibrated")}
            figs = {"every_step": figures(rows["every_step"], None),
                    "calibrated": figures(rows["calibrated"], rows["every_step"])}
            summary = json.loads((work / router["round"] / "summary.json").read_text())
            rounds.append({"round": k, "logs": [p.name for p in logs], "round_dir": router.get("round"),
                           "candidates": {t["task"]: t.get("candidates") for t in summary["tasks"]},
                           "router": {"routes": [{x: r.get(x) for x in ("task", "threshold", "coverage", "accuracy")}
                                                 for r in router["routes"]], "not_routed": router["not_routed"]},
                           **{n: f["overall"] for n, f in figs.items()},
                           "per_app": {n: f["per_app"] for n, f in figs.items()}})
            results = {**figs, "router": rounds[-1]["router"], "steps": rows}
            if k < a.rounds:
                print(f"== feedback: {len(feedback)} steps of the other train conversations through serve "
                      "(calibrated routes); its served log joins the next round", flush=True)
                fb_rows = served(earned, f"round{k}-feedback", feedback, f"r{k} feedback")
                rounds[-1]["feedback"] = figures(fb_rows, None)["overall"]
                logs = [*logs, *sorted((out / f"round{k}-feedback" / "served").glob("*.jsonl"))]
    finally:
        stop(upstream)
    return {**results, "rounds": rounds}


def plot(results: dict, path: Path) -> None:
    """Left: share vs accuracy per application (last round; a system that answered nothing sits at share 0,
    accuracy 0, marked so). Right: per round, the SLM's share (calibrated) and its accuracy (every step)."""
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    for name, marker in (("calibrated", "o"), ("every_step", "x")):
        for app, f in results[name]["per_app"].items():
            acc = f["answered_accuracy"]
            ax.scatter([f["slm_share"]], [acc if acc is not None else 0.0], marker=marker, s=60,
                       label=f"{name}: {app}" + (" (answered none)" if acc is None else ""))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("share of held-out steps the SLM answered")
    ax.set_ylabel("accuracy of its answers (BFCL AST checker)")
    ax.set_title("BFCL multi-turn as an agent's traffic, through slmtune serve", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left")
    ks = [r["round"] for r in results["rounds"]]
    rx.plot(ks, [r["calibrated"]["slm_share"] for r in results["rounds"]], "o-", label="SLM share (calibrated)")
    rx.plot(ks, [1 - r["calibrated"]["slm_share"] for r in results["rounds"]], "s--", label="LLM share (calibrated)")
    rx.plot(ks, [r["every_step"]["slm_accuracy"] for r in results["rounds"]], "x-",
            label="SLM accuracy, every step routed")
    rx.set_xticks(ks)
    rx.set_ylim(-0.02, 1.02)
    rx.set_xlabel("flywheel round")
    rx.set_title("rounds", fontsize=9)
    rx.grid(alpha=0.3)
    rx.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--apps", default=",".join(DEV_APPS), help="conversations whose classes all lie in this set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-share", type=float, default=0.3, help="share of conversations held out")
    p.add_argument("--variants", action="store_true", help="add the train conversations' long-context / "
                   "missing-parameter / missing-function variants to the training traffic")
    p.add_argument("--out-dir", type=Path, default=Path("bench_agent"))
    p.add_argument("--logs-only", action="store_true", help="write the logs and the split, nothing else")
    p.add_argument("--min-coverage", type=float, default=0.2, help="the calibrated system's routing rule")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N held-out steps")
    p.add_argument("--rounds", type=int, default=2, help="flywheel rounds; between two, the feedback half of the "
                   "train traffic is served and its served log feeds the next round")
    p.add_argument("--candidates", default=None, help="the flywheel's bake-off: auto or catalog keys, comma-"
                   "separated (default: none, plan's one model)")
    p.add_argument("--rl", action="store_true", help="the flywheel's RL stage (`flywheel --rl`): GRPO on each "
                   "task's SFT winner, exported only when it ranks higher on the held-out calls")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 training steps, 8 eval records, 20 steps")
    a = p.parse_args()
    apps = {x.strip() for x in a.apps.split(",") if x.strip()}
    if unknown := apps - set(DOC_FILES):
        p.error(f"unknown application(s): {', '.join(sorted(unknown))} (known: {', '.join(DOC_FILES)})")
    if a.quick and a.limit is None:
        a.limit = 20
    import time

    start_s = time.perf_counter()
    b = bfcl()
    s = write_logs(b, apps, a.seed, a.test_share, a.variants, a.out_dir)
    print(f"{len(s['train_conversations'])} train / {len(s['test_conversations'])} test conversations; steps: "
          f"{json.dumps(s['steps'])}; wrote {a.out_dir / 'logs'}", flush=True)
    if a.logs_only:
        return
    results = {"apps": sorted(apps), "checker": "bfcl_eval ast_checker", "split": s, **pipeline(a, b, a.out_dir)}
    results["wall_time_s"] = round(time.perf_counter() - start_s, 1)
    from slmtune.io import write_json

    write_json(a.out_dir / "bench_agent.json", results)
    plot(results, a.out_dir / "bench_agent.png")
    for r in results["rounds"]:
        for name in ("every_step", "calibrated"):
            print(f"round {r['round']} {name}: {json.dumps(r[name])}")
    print(f"wall time {results['wall_time_s']:.0f} s; wrote {a.out_dir / 'bench_agent.json'} and "
          f"{a.out_dir / 'bench_agent.png'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
