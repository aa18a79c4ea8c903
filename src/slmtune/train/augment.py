"""Tool-set augmentation: teach a model to pick a tool by its description, not its place in the list, and to
answer in text when no offered tool fits.

Recipe `augment:` (all off by default, `recipe.AUGMENT_DEFAULTS`); `train.dataset.prepare` applies it once to the
training records — never to eval records — so every epoch sees the same augmented set:

* `shuffle_tools` — the offered `tools` of each tool-calling record in a random order;
* `distractors: N` — N tools (fewer if the file has fewer) that other records of the same file offer and this one
  does not (by name), each inserted at a random position;
* `irrelevance: p` — round(p × tool-calling records) extra records: a tool-calling record whose target answers a
  user turn, without the tool(s) its target calls, and a text target saying no offered function fits. A record
  that offers nothing else is used only when distractors are on (it then offers distractors only), and one whose
  prompt already calls a removed tool is not used. The text is the data's own wording when it has one
  (`no_fit_text`), else `NO_FIT_TEXT`;
* `mask_names: p` — for round(p × tool-calling records), function and top-level parameter names become opaque
  ids (`func_3k9x`, `arg_7q2`) alike in the tools (`properties`, every `required` list that names them), in every
  tool call (name, argument keys) and in tool results' `name`. Nested objects' own keys and the prose of
  descriptions and messages are left as they are.

A tool-calling record offers `tools` and its target calls only offered functions; every other record passes
through unchanged (the very object). Augmented records keep every other key, `arguments` stay JSON strings, and
`meta.augment` lists what was done. Each record draws from its own `random.Random(f"{seed}:{what}:{index}")` (str
seeds hash with SHA-512: the same on every machine and run), so the result depends on records, settings and seed
only, and which records get masked or copied does not depend on the other knobs.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass

from slmtune.recipe import AugmentSection
from slmtune.records import target_index

# The irrelevance target when the data has no no-fit wording of its own (see `no_fit_text`).
NO_FIT_TEXT = "None of the offered functions fits this request, so I cannot call one."
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
# 36**4 = 1.7M function ids, 36**3 = 46,656 parameter ids: plenty for one record's tools.
_FUNC_ID, _ARG_ID = ("func_", 4), ("arg_", 3)
# Schema keywords whose subschemas constrain the same object, so their `properties` / `required` name its keys.
_SAME_OBJECT = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else")

Item = tuple[str, dict]  # ("file:line" for error messages, record)


@dataclass(frozen=True)
class AugmentStats:
    """What augmentation did to the training records (metrics.json `augment`)."""

    tool_calling: int = 0  # records augmentation applies to
    shuffled: int = 0  # records (irrelevance copies included) whose 2+ tools were shuffled
    distractors_added: int = 0  # tools added, summed over records
    irrelevance: int = 0  # extra records with a no-fit text target
    masked: int = 0  # records with masked names
    no_fit_text: str | None = None  # the irrelevance records' answer (None: irrelevance off)

    def as_dict(self) -> dict:
        return asdict(self)


def augment(items: list[Item], cfg: AugmentSection, seed: int) -> tuple[list[Item], AugmentStats]:
    """The training records augmented (input order, then the irrelevance copies) and what was done."""
    recs = [rec for _, rec in items]
    calling = [i for i, rec in enumerate(recs) if is_tool_calling(rec)]
    pool = tool_pool(recs) if cfg.distractors else []
    masked = set(_pick(calling, cfg.mask_names, len(calling), random.Random(f"{seed}:mask")))
    stats: Counter[str] = Counter()
    out = list(items)
    for i in calling:
        out[i] = (items[i][0], _vary(recs[i], cfg, pool, _called(recs[i]), i in masked, _rng(seed, "vary", i), stats))
    text = no_fit_text(recs) if cfg.irrelevance else None
    if text is not None:
        sources = [i for i in calling if _no_fit_source(recs[i], cfg, pool)]
        for i in _pick(sources, cfg.irrelevance, len(calling), random.Random(f"{seed}:irrelevance")):
            where, rec = items[i]
            copy_ = _no_fit(rec, text, where)
            out.append((f"{where} (no-fit copy)",
                        _vary(copy_, cfg, pool, _called(rec), False, _rng(seed, "no-fit", i), stats)))
            stats["irrelevance"] += 1
    return out, AugmentStats(tool_calling=len(calling), no_fit_text=text, **stats)


def is_tool_calling(rec: dict) -> bool:
    """The record offers tools and its target calls only offered ones."""
    tools, calls = rec.get("tools") or [], _target(rec).get("tool_calls") or []
    return bool(tools and calls) and _called(rec) <= set(_names(tools))


def tool_pool(records: list[dict]) -> list[dict]:
    """Every distinct tool the records offer (the first spec of each name), in file order: the distractors."""
    seen: dict[str, dict] = {}
    for rec in records:
        for tool in rec.get("tools") or []:
            seen.setdefault(tool["function"]["name"], tool)
    return list(seen.values())


def no_fit_text(records: list[dict]) -> str:
    """The agent's own answer when no tool fits: the most common text target (seen at least twice, so one chatty
    reply does not become the rule) that answers a user turn while tools are offered; else `NO_FIT_TEXT`."""
    counts: Counter[str] = Counter()
    for rec in records:
        msgs = rec["messages"]
        t = target_index(msgs)
        content = msgs[t].get("content")
        if (rec.get("tools") and not msgs[t].get("tool_calls") and isinstance(content, str) and content.strip()
                and t and msgs[t - 1]["role"] == "user"):
            counts[content] += 1
    best = counts.most_common(1)  # ties: the first seen
    return best[0][0] if best and best[0][1] >= 2 else NO_FIT_TEXT


def _target(rec: dict) -> dict:
    return rec["messages"][target_index(rec["messages"])]


def _names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _called(rec: dict) -> set[str]:
    return {c["function"]["name"] for c in _target(rec).get("tool_calls") or []}


def _rng(seed: int, what: str, i: int) -> random.Random:
    return random.Random(f"{seed}:{what}:{i}")


def _pick(indices: list[int], share: float, of: int, rng: random.Random) -> list[int]:
    """round(share × of) of `indices` (all of them if fewer), in input order."""
    k = min(len(indices), int(share * of + 0.5))
    return sorted(rng.sample(indices, k))


def _vary(rec: dict, cfg: AugmentSection, pool: list[dict], avoid: set[str], mask: bool, rng: random.Random,
          stats: Counter[str]) -> dict:
    """Distractors, shuffle and masking for one record that offers tools; the record itself when none applies."""
    tools, done = list(rec["tools"]), []
    offered = set(_names(tools)) | avoid
    extra = [t for t in pool if t["function"]["name"] not in offered]
    picks = rng.sample(extra, min(cfg.distractors, len(extra)))
    for tool in picks:
        tools.insert(rng.randint(0, len(tools)), tool)
    if picks:
        stats["distractors_added"] += len(picks)
        done.append(f"distractors:{len(picks)}")
    if cfg.shuffle_tools and len(tools) > 1:
        rng.shuffle(tools)
        stats["shuffled"] += 1
        done.append("shuffle")
    if not done and not mask:
        return rec
    new = copy.deepcopy({**rec, "tools": tools})
    if mask:
        new = _mask(new, rng)
        stats["masked"] += 1
        done.append("mask")
    new["meta"] = {**(new.get("meta") or {}), "augment": [*(new.get("meta") or {}).get("augment", []), *done]}
    return new


def _no_fit_source(rec: dict, cfg: AugmentSection, pool: list[dict]) -> bool:
    """The record can give an irrelevance copy: its target answers a user turn, its prompt never calls a tool the
    copy removes, and something is left to offer (another tool, or distractors when they are on)."""
    msgs, called = rec["messages"], _called(rec)
    t = target_index(msgs)
    if not t or msgs[t - 1]["role"] != "user":
        return False
    if any(c["function"]["name"] in called for m in msgs[:t] for c in m.get("tool_calls") or []):
        return False
    return bool(set(_names(rec["tools"])) - called) or any(n not in called for n in _names(pool))


def _no_fit(rec: dict, text: str, where: str) -> dict:
    """The record without the tools its target calls, answering `text` instead."""
    msgs, called = rec["messages"], _called(rec)
    t = target_index(msgs)
    return copy.deepcopy({
        **rec,
        "id": f"{rec.get('id', where)}#no-fit",
        "messages": [*msgs[:t], {"role": "assistant", "content": text}],
        "tools": [tool for tool in rec["tools"] if tool["function"]["name"] not in called],
        "meta": {**(rec.get("meta") or {}), "augment": ["irrelevance"]},
    })


def _mask(rec: dict, rng: random.Random) -> dict:
    """Function and top-level parameter names → opaque ids, the same way in tools, calls and tool results."""
    names = list(dict.fromkeys(_names(rec["tools"])))
    fmap = dict(zip(names, _ids(rng, *_FUNC_ID, len(names)), strict=True))
    pmaps: dict[str, dict[str, str]] = {}
    tools = []
    for tool in rec["tools"]:
        fn = {**tool["function"], "name": fmap[tool["function"]["name"]]}
        props = (fn.get("parameters") or {}).get("properties")
        if isinstance(props, dict) and props:
            pmap = dict(zip(props, _ids(rng, *_ARG_ID, len(props)), strict=True))
            pmaps.setdefault(tool["function"]["name"], pmap)
            fn["parameters"] = _rename_keys(fn["parameters"], pmap)
        tools.append({**tool, "function": fn})
    messages = []
    for m in rec["messages"]:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_mask_call(c, fmap, pmaps) for c in m["tool_calls"]]}
        if m.get("role") == "tool" and m.get("name") in fmap:
            m = {**m, "name": fmap[m["name"]]}
        messages.append(m)
    return {**rec, "messages": messages, "tools": tools}


def _ids(rng: random.Random, prefix: str, n_chars: int, k: int) -> list[str]:
    """k distinct random ids: random, not numbered, so an id tells nothing about the tool's position."""
    out: dict[str, None] = {}
    while len(out) < k:
        out[prefix + "".join(rng.choices(_ID_CHARS, k=n_chars))] = None
    return list(out)


def _rename_keys(schema: dict, pmap: dict[str, str]) -> dict:
    """An object schema with its keys renamed in `properties`, `required`, `dependentRequired`/`dependencies` and
    the subschemas that constrain the same object (anyOf: [{required: [a]}, ...]); every other key kept."""
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {pmap.get(k, k): v for k, v in out["properties"].items()}
    if isinstance(out.get("required"), list):
        out["required"] = [pmap.get(k, k) for k in out["required"]]
    for key in ("dependentRequired", "dependencies"):
        if isinstance(out.get(key), dict):
            out[key] = {pmap.get(k, k): [pmap.get(x, x) for x in v] if isinstance(v, list)
                        else _rename_keys(v, pmap) if isinstance(v, dict) else v for k, v in out[key].items()}
    for key in _SAME_OBJECT:
        sub = out.get(key)
        if isinstance(sub, dict):
            out[key] = _rename_keys(sub, pmap)
        elif isinstance(sub, list):
            out[key] = [_rename_keys(s, pmap) if isinstance(s, dict) else s for s in sub]
    return out


def _mask_call(call: dict, fmap: dict[str, str], pmaps: dict[str, dict[str, str]]) -> dict:
    fn = call.get("function") or {}
    name = fn.get("name")
    new = {**fn, "name": fmap.get(name, name)}
    try:
        args = json.loads(fn["arguments"]) if isinstance(fn.get("arguments"), str) else None
    except json.JSONDecodeError:
        args = None
    if isinstance(args, dict):
        pmap = pmaps.get(name, {})
        new["arguments"] = json.dumps({pmap.get(k, k): v for k, v in args.items()}, ensure_ascii=False)
    return {**call, "function": new}
