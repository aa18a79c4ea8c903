#!/usr/bin/env python
"""An agent's own traffic, end to end: BFCL v4's multi-turn applications as an agent's logs (issue 30).

    python scripts/bench_agent.py --out-dir runs/bench_agent                 # the development applications
    python scripts/bench_agent.py --apps TradingBot,VehicleControlAPI,TicketAPI,TravelAPI   # the reserved ones

This first part writes the logs; serving them through `slmtune flywheel` + `slmtune serve` and scoring the
replay is the next step of issue 30.

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

Writes `OUT/logs/{train,test}.jsonl` and `OUT/split.json` (conversation ids per side, steps per application).
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
    """`multi_turn_miss_param_12` → `multi_turn_base_12`: the conversation a variant rewrites."""
    return "multi_turn_base_" + variant_id.rsplit("_", 1)[1]


def score_step(b, entry_docs: list[dict], answer: dict | None, ground_truth: str) -> bool:
    """Whether `answer` (an OpenAI assistant message) makes exactly the step's ground-truth call (BFCL's checker)."""
    calls = (answer or {}).get("tool_calls") or []
    decoded = []
    for c in calls:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError):
            return False
        if not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            return False
        decoded.append({fn["name"]: args})
    if len(decoded) != 1:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--apps", default=",".join(DEV_APPS), help="conversations whose classes all lie in this set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-share", type=float, default=0.3, help="share of conversations held out")
    p.add_argument("--variants", action="store_true", help="add the train conversations' long-context / "
                   "missing-parameter / missing-function variants to the training traffic")
    p.add_argument("--out-dir", type=Path, default=Path("bench_agent"))
    a = p.parse_args()
    apps = {x.strip() for x in a.apps.split(",") if x.strip()}
    if unknown := apps - set(DOC_FILES):
        p.error(f"unknown application(s): {', '.join(sorted(unknown))} (known: {', '.join(DOC_FILES)})")
    s = write_logs(bfcl(), apps, a.seed, a.test_share, a.variants, a.out_dir)
    print(f"{len(s['train_conversations'])} train / {len(s['test_conversations'])} test conversations; steps: "
          f"{json.dumps(s['steps'])}; wrote {a.out_dir / 'logs'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
