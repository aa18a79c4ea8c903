"""Deterministic synthetic agent logs: ten errands, three log formats, planted PII, known ground truth.

Each item is one logged LLM call. The teacher output is a *correct*, deterministic function of the
input (the city named in the text is the `city` argument, the sentiment word list decides the label),
so a small model can learn it. The errand label never appears in the log object; it is returned beside
it as ground truth for clustering tests.

    for log, errand in generate_logs(1000, seed=0): ...
    write_logs("syn/", 1000)    # -> {"openai": syn/logs/openai.jsonl, "messages": ..., "anthropic": ...,
                                #     "labels": syn/labels.jsonl}

`labels.jsonl` lines are `{"file", "line", "id", "errand"}`: the log file's name, its 1-based line, the
id `slmtune ingest` assigns to the record (null for a defective item ingest rejects) and the errand.
`generate_logs_planted` also yields the secrets planted in each item, as
`[(pii_type, value), ...]`, for measuring scrubber recall. `generate_logs_placed` makes support-agent logs
with one value of a `synthetic_pii.PLANTED` kind each, in turn in the system prompt, the user turn, a tool
call's arguments and a tool result: recall per kind and place.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from slmtune.synthetic import pii as fk
from slmtune.synthetic.errands import BUILDERS, COMPANY_POLICIES

FORMATS = ("openai", "messages", "anthropic")
ERRANDS: dict[str, str] = {label: label.split("-", 1)[0] for label in BUILDERS}
MODELS = {"openai": ["gpt-4o-2024-08-06", "gpt-4.1-mini", "gpt-4o-mini"],
          "anthropic": ["claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"]}
AGENTS = ["helpdesk-prod", "ops-copilot", "shop-assistant", "crm-agent"]
NOISE_KINDS = ("length", "bad_args", "undefined_tool", "schema", "empty", "error")
_EPOCH = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)


def generate_logs(n: int, seed: int = 0, formats: Sequence[str] = FORMATS, pii: bool = True,
                  errands: Sequence[str] | None = None, noise: float = 0.0) -> Iterator[tuple[dict, str]]:
    """Yield (log_line_object, errand_label) — one logged LLM call per item, format drawn per item.

    `noise` is the fraction of items given a realistic defect (truncated, errored, bad tool call, ...).
    """
    for log, errand, _ in generate_logs_planted(n, seed, formats, pii, errands, noise):
        yield log, errand


def generate_logs_planted(n: int, seed: int = 0, formats: Sequence[str] = FORMATS, pii: bool = True,
                          errands: Sequence[str] | None = None, noise: float = 0.0,
                          ) -> Iterator[tuple[dict, str, list[tuple[str, str]]]]:
    """Like `generate_logs`, plus the `(pii_type, value)` pairs planted in each item."""
    labels = list(errands) if errands is not None else list(ERRANDS)
    unknown = sorted(set(labels) - set(ERRANDS)) + sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown errand/format {unknown}; known: {list(ERRANDS)}, {list(FORMATS)}")
    r = random.Random(seed)
    recent: list[tuple[dict, str, list]] = []
    for i in range(n):
        if recent and r.random() < 0.06:
            # Agents retry and re-ask: ~6% repeat an earlier conversation, half of them lightly reworded.
            conv, errand, planted = _repeat(r, r.choice(recent))
        else:
            errand = r.choice(labels)
            conv = BUILDERS[errand](r, pii)
            planted = conv.pop("planted")
            recent = (recent + [(conv, errand, planted)])[-200:]
        fmt = r.choice(list(formats))
        if noise and r.random() < noise:
            conv = _defect(r, conv, r.choice(NOISE_KINDS), fmt)
        yield _render(r, i, fmt, conv), errand, planted


def write_logs(out_dir: str | Path, n: int, seed: int = 0, formats: Sequence[str] = FORMATS, pii: bool = True,
               errands: Sequence[str] | None = None, noise: float = 0.0) -> dict[str, Path]:
    """Write `logs/<format>.jsonl` per format plus `labels.jsonl` under `out_dir`; returns {name: path}."""
    from slmtune.data.ingest import Rejected, detect_format, to_record  # labels carry the id ingest assigns
    from slmtune.io import atomic_open, dumps

    out = Path(out_dir)
    # Logs go under logs/ so `slmtune ingest OUT/logs` does not also read the labels.
    paths = {f: out / "logs" / f"{f}.jsonl" for f in formats} | {"labels": out / "labels.jsonl"}
    lines = dict.fromkeys(formats, 0)
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(atomic_open(paths["labels"]))
        files = {f: stack.enter_context(atomic_open(paths[f])) for f in formats}
        for log, errand in generate_logs(n, seed, formats, pii, errands, noise):
            fmt = detect_format(log)
            lines[fmt] += 1
            files[fmt].write(dumps(log) + "\n")
            try:
                rid = to_record(log, fmt)[0]["id"]
            except Rejected:
                rid = None  # a defective item (noise) that ingest rejects
            lab.write(dumps({"file": paths[fmt].name, "line": lines[fmt], "id": rid, "errand": errand}) + "\n")
    return paths


# ----------------------------------------------------------------------------- one planted value per log
UPDATE_CUSTOMER = {"type": "function", "function": {
    "name": "update_customer", "description": "Update a customer's record.", "parameters": {
        "type": "object", "properties": {"customer_id": {"type": "string"}}, "required": ["customer_id"]}}}
PROBLEMS = ["My last delivery never arrived.", "I was charged twice this month.", "Please update my account.",
            "The app logs me out every hour.", "I want to change my plan."]


def generate_logs_placed(n: int, seed: int = 0) -> Iterator[tuple[dict, dict]]:
    """(OpenAI-format log, truth) for n support-agent calls; kinds and places take turns, so each of the
    9 kinds x 4 places gets n/36 logs. truth: {"id", "kind", "type", "place", "value", "ordinary"}, where
    `ordinary` lists sentences (order ids, non-birth dates, prices, plain phrases) a scrubber must keep."""
    r = random.Random(seed)
    kinds = list(fk.PLANTED)
    for i in range(n):
        kind, place = kinds[i % len(kinds)], fk.PLACES[i // len(kinds) % len(fk.PLACES)]
        pii_type, value, sentence, key = fk.planted(r, kind)
        said, noted = fk.ordinary(r), fk.ordinary(r)
        company, cid = r.choice(fk.COMPANIES), f"CUS-{fk.digits(r, 6)}"
        system = f"You are the support agent of {company}. Keep customer records current." + COMPANY_POLICIES[company]
        user = f"{r.choice(PROBLEMS)} {said}"
        args, result = {"customer_id": cid}, {"customer_id": cid, "status": "updated", "message": noted}
        planted_in = {"system": None, "user": None, "tool_args": args, "tool_result": result}[place]
        if place == "system":
            system += f"\nInternal note: {sentence}"
        elif place == "user":
            user += f" {sentence}"
        else:  # JSON: a free-text note, or the value under its own key
            planted_in.update({"note": sentence} if r.random() < 0.5 else {key: value})
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "update_customer",
                                                                      "arguments": json.dumps(args)}}
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}]
        log = {"request": {"model": "gpt-4o-mini", "messages": messages, "tools": [UPDATE_CUSTOMER]},
               "response": {"id": f"chatcmpl-placed{i}", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                   "role": "assistant", "content": f"Done: the record of {cid} is up to date."}}]}}
        yield log, {"id": f"chatcmpl-placed{i}", "kind": kind, "type": pii_type, "place": place, "value": value,
                    "ordinary": [said, noted]}


# ----------------------------------------------------------------------------- variation and defects
def _repeat(r: random.Random, item: tuple[dict, str, list]) -> tuple[dict, str, list]:
    conv, errand, planted = item
    conv = json.loads(json.dumps(conv))
    if r.random() < 0.5:
        first_user = next(m for m in conv["turns"] if m["role"] == "user")
        first_user["content"] = fk.perturb(r, first_user["content"])
    return conv, errand, planted


def _defect(r: random.Random, conv: dict, kind: str, fmt: str) -> dict:
    conv = json.loads(json.dumps(conv))
    target = conv["target"]
    calls = target.get("tool_calls")
    if kind in ("bad_args", "undefined_tool", "schema") and not calls:
        kind = "length"
    if kind == "bad_args" and fmt == "anthropic":
        kind = "schema"  # Anthropic logs carry `input` as an object: it cannot be non-JSON
    if kind == "length":
        text = target.get("content") or json.dumps(calls)
        conv["target"] = {"role": "assistant", "content": text[: max(1, len(text) // 3)]}
        conv["finish"] = "length"
    elif kind == "bad_args":
        calls[0]["function"]["arguments"] = calls[0]["function"]["arguments"][:-2]
    elif kind == "undefined_tool":
        calls[0]["function"]["name"] = r.choice(["get_forecast", "lookup_order", "send_email"])
    elif kind == "schema":
        args = json.loads(calls[0]["function"]["arguments"])
        args[next(iter(args))] = r.choice([42, None, ["x"]])
        calls[0]["function"]["arguments"] = json.dumps(args)
    elif kind == "empty":
        conv["target"] = {"role": "assistant", "content": ""}
    else:
        conv["error"] = True
    return conv


# ----------------------------------------------------------------------------- the three log formats
def _render(r: random.Random, i: int, fmt: str, conv: dict) -> dict:
    if fmt == "messages":
        msgs = ([{"role": "system", "content": conv["system"]}] if conv["system"] else []) + conv["turns"]
        out: dict = {"messages": _with_ids(msgs + [conv["target"]], "call_")}
        if conv["tools"]:
            out["tools"] = conv["tools"]
        return out
    ts = _EPOCH + timedelta(seconds=i * 7 + r.randrange(7))
    meta = {"agent": r.choice(AGENTS), "session_id": f"sess_{r.getrandbits(40):010x}", "env": "prod"}
    usage_in, usage_out = _tokens(conv)
    return (_openai if fmt == "openai" else _anthropic)(r, conv, ts, meta, usage_in, usage_out)


def _tokens(conv: dict) -> tuple[int, int]:
    # ~4 characters per token, the usual rule of thumb for English text.
    prompt = len(conv["system"] or "") + sum(len(json.dumps(m)) for m in conv["turns"])
    return prompt // 4 + 12, len(json.dumps(conv["target"])) // 4 + 3


def _with_ids(msgs: list[dict], prefix: str) -> list[dict]:
    out = json.loads(json.dumps(msgs))
    for m in out:
        for c in m.get("tool_calls") or []:
            c["id"] = prefix + c["id"]
        if m.get("tool_call_id"):
            m["tool_call_id"] = prefix + m["tool_call_id"]
    return out


def _openai(r, conv, ts, meta, usage_in, usage_out) -> dict:
    msgs = ([{"role": "system", "content": conv["system"]}] if conv["system"] else []) + conv["turns"]
    request: dict = {"model": r.choice(MODELS["openai"]), "messages": _with_ids(msgs, "call_"),
                     "temperature": r.choice([0, 0.2, 0.7])}
    if conv["tools"]:
        request |= {"tools": conv["tools"], "tool_choice": "auto"}
    if conv.get("error"):
        response: dict = {"error": {"message": "The server had an error while processing your request.",
                                    "type": "server_error", "code": 500}}
    else:
        target = _with_ids([conv["target"]], "call_")[0]
        finish = conv.get("finish") or ("tool_calls" if target.get("tool_calls") else "stop")
        response = {"id": f"chatcmpl-{fk.token(r, 29)}", "object": "chat.completion",
                    "created": int(ts.timestamp()), "model": request["model"],
                    "choices": [{"index": 0, "message": {"content": None} | target, "finish_reason": finish}],
                    "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                              "total_tokens": usage_in + usage_out}}
    return {"request": request, "response": response, "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "latency_ms": 250 + usage_out * r.randrange(8, 30), "metadata": meta}


def _anthropic(r, conv, ts, meta, usage_in, usage_out) -> dict:
    request: dict = {"model": r.choice(MODELS["anthropic"]), "max_tokens": 1024,
                     "messages": _anthropic_messages(r, conv["turns"])}
    if conv["system"]:
        request["system"] = conv["system"]
    if conv["tools"]:
        request["tools"] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                             "input_schema": t["function"]["parameters"]} for t in conv["tools"]]
    if conv.get("error"):
        response: dict = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    else:
        blocks = _anthropic_blocks(conv["target"])
        stop = {"length": "max_tokens"}.get(conv.get("finish"), "tool_use" if conv["target"].get("tool_calls")
                                                                  else "end_turn")
        response = {"id": f"msg_01{fk.token(r, 22)}", "type": "message", "role": "assistant",
                    "model": request["model"], "content": blocks, "stop_reason": stop,
                    "usage": {"input_tokens": usage_in, "output_tokens": usage_out}}
    return {"request": request, "response": response, "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "latency_ms": 300 + usage_out * r.randrange(8, 30), "metadata": meta}


def _anthropic_messages(r: random.Random, turns: list[dict]) -> list[dict]:
    out: list[dict] = []
    for m in turns:
        if m["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": "toolu_01" + m["tool_call_id"], "content": m["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif m["role"] == "assistant":
            out.append({"role": "assistant", "content": _anthropic_blocks(m)})
        else:
            as_blocks = r.random() < 0.5
            out.append({"role": "user",
                        "content": [{"type": "text", "text": m["content"]}] if as_blocks else m["content"]})
    return out


def _anthropic_blocks(msg: dict) -> list[dict]:
    blocks: list[dict] = [{"type": "text", "text": msg["content"]}] if msg.get("content") else []
    for c in msg.get("tool_calls") or []:
        try:
            args = json.loads(c["function"]["arguments"])
        except json.JSONDecodeError:
            args = {"_raw": c["function"]["arguments"]}
        blocks.append({"type": "tool_use", "id": "toolu_01" + c["id"], "name": c["function"]["name"],
                       "input": args})
    return blocks
