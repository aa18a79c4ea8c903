"""The one place a canonical record becomes text and tokens — for training, eval, merge checks and serving.

What the model sees in training is byte-for-byte what it sees in use:

* `prompt_text(r, rec)` — every message before the target, rendered with the tokenizer's own chat template
  and its generation prompt (e.g. ``<|im_start|>assistant\\n``);
* `target_text(r, rec)` — the target assistant turn as the template closes it (e.g. ``...<|im_end|>\\n``);
* `encode(r, rec, max_length)` — prompt tokens + target tokens, labels = -100 on the prompt. The two parts are
  tokenized separately, exactly as generation sees them (prompt in, target out), so no BPE merge crosses the
  boundary. With `train_on="all_assistant"` every assistant turn is a target (`render_turns`).

**Tools when the template ignores them** (SmolLM2's and most small models' do). Then slmtune uses one
documented format, the Hermes/Qwen convention most open models are already familiar with:

* the tool specs go at the end of the system turn (a system turn is added when there is none)::

      # Tools

      You may call one or more functions. Function signatures, one per line, inside <tools></tools>:
      <tools>
      {"type": "function", "function": {"name": "get_weather", ...}}
      </tools>
      To call a function, reply with one JSON object per call inside <tool_call></tool_call> tags:
      <tool_call>
      {"name": "<function-name>", "arguments": <arguments-json-object>}
      </tool_call>

* with `data.tool_docs: compact` each tool is one signature line instead of its JSON spec (`tool_signature`):
  ``post_tweet(content: string, tags?: array<string>, unit?: "c"|"f" = "c")`` — parameters in schema order,
  `?` when not required, enums, array items, nested objects and defaults kept, every description dropped. An
  agent's tool docs are most of its prompt (BFCL's file-system and messaging tools: ~5,000 of ~5,700 tokens); a
  model tuned on one application's traffic learns its tools from the calls. The choice travels with the
  tokenizer saved beside the weights (`TOOL_DOCS_MARK`, a Jinja comment at the head of its chat template), so
  eval, export and serve render what training rendered;
* an assistant tool call becomes
  ``<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>`` (one block per call,
  after any text; JSON with `json.dumps` default separators);
* a `tool` message becomes a `user` turn ``<tool_response>\\n...\\n</tool_response>``.

When the template does handle `tools` / `tool_calls` natively (Qwen3, Llama 3.2…), the template is used as is,
with `arguments` decoded to objects as those templates expect. `parse_output` reads the model's text back into
an assistant message in either case.

**Argument order.** In both modes a call's arguments are written in the order of the offered tool's parameter
schema (`properties`, at every nesting level; keys the schema does not list keep their place after those it does).
Constrained decoding (`slmtune.infer.constrain`, llguidance) writes object properties in schema order only, so a
model trained on a teacher's other orders would learn an order its grammar forbids and close the object early.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.records import split_prompt_target
from slmtune.schema_check import tool_params

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions. Function signatures, one per line, inside <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with one JSON object per call inside <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": "<function-name>", "arguments": <arguments-json-object>}}\n</tool_call>'
)
# A Jinja comment: renders nothing and strips nothing; in a tokenizer's chat template it means `tool_docs: compact`.
TOOL_DOCS_MARK = "{# slmtune tool_docs: compact #}"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


@dataclass(frozen=True)
class Renderer:
    """A tokenizer plus how its chat template treats tools (decided once, from the template text)."""

    tokenizer: Any
    native_tools: bool
    native_tool_calls: bool
    tool_docs: str = "full"  # "compact": one signature line per tool (slmtune-hermes mode only)

    @property
    def mode(self) -> str:
        return "native" if self.native_tools and self.native_tool_calls else "slmtune-hermes"


def make_renderer(tokenizer, tool_docs: str | None = None) -> Renderer:
    """The renderer of `tokenizer`; `tool_docs` None = as its chat template is marked (`TOOL_DOCS_MARK`)."""
    template = tokenizer.chat_template
    if not template or not isinstance(template, str):
        raise SlmtuneError(
            "The tokenizer has no chat template.", "Use an instruct/chat model or add `chat_template` to its tokenizer."
        )
    docs = tool_docs or ("compact" if TOOL_DOCS_MARK in template else "full")
    return Renderer(tokenizer, native_tools="tools" in template, native_tool_calls="tool_calls" in template,
                    tool_docs=docs)


def mark_tool_docs(tokenizer, tool_docs: str) -> None:
    """Mark (or unmark) `tokenizer`'s chat template with `tool_docs`, so whoever loads it renders tools alike."""
    template = (tokenizer.chat_template or "").replace(TOOL_DOCS_MARK, "")
    tokenizer.chat_template = TOOL_DOCS_MARK + template if tool_docs == "compact" else template


def tool_signature(tool: dict) -> str:
    """One line per tool for `tool_docs: compact`: ``name(a: string, b?: array<integer> = [])``."""
    fn = tool.get("function") or tool
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    return f"{fn.get('name', '')}({_sig_fields(params)})"


def _sig_fields(schema: dict) -> str:
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    return ", ".join(f"{k}{'' if k in required else '?'}: {_sig_type(v)}" for k, v in props.items())


def _sig_type(s: Any) -> str:
    if not isinstance(s, dict):
        return "any"
    t = s.get("type")
    if isinstance(s.get("enum"), list):
        out = "|".join(json.dumps(v, ensure_ascii=False) for v in s["enum"])
    elif t == "array":
        out = f"array<{_sig_type(s.get('items'))}>"
    elif t == "object" and isinstance(s.get("properties"), dict):
        out = "{" + _sig_fields(s) + "}"
    elif isinstance(t, str):
        out = t
    elif isinstance(t, list):
        out = "|".join(str(x) for x in t)
    else:
        out = "any"
    return out + (" = " + json.dumps(s["default"], ensure_ascii=False) if "default" in s else "")


def format_call(call: dict) -> str:
    fn = call["function"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": _decode(fn.get("arguments"))},
                                        ensure_ascii=False) + "\n</tool_call>"


def _decode(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def _fallback_message(m: dict) -> dict:
    role, content = m["role"], m.get("content") or ""
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    if role == "assistant" and m.get("tool_calls"):
        blocks = "\n".join(format_call(c) for c in m["tool_calls"])
        return {"role": "assistant", "content": f"{content}\n{blocks}" if content else blocks}
    return {"role": role, "content": content}


def _native_message(m: dict) -> dict:
    out = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
    out["content"] = out.get("content") or ""
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": _decode(c["function"].get("arguments"))}}
            for c in m["tool_calls"]
        ]
    return out


def schema_ordered(value: Any, schema: Any) -> Any:
    """`value` with every object's keys in its schema's `properties` order (unlisted keys after, as they were)."""
    if isinstance(value, dict) and isinstance(schema, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: schema_ordered(value[k], props.get(k)) for k in keys}
    if isinstance(value, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        return [schema_ordered(v, schema["items"]) for v in value]
    return value


def _ordered_arguments(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Assistant calls with their arguments in the offered tools' schema order (see "Argument order" above)."""
    params = tool_params(tools)
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls") and params:
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                args = _decode(fn.get("arguments"))
                if isinstance(args, dict) and isinstance(params.get(fn.get("name")), dict):
                    # a decoded object: both message forms below take `arguments` as a JSON string or an object
                    c = {**c, "function": {**fn, "arguments": schema_ordered(args, params[fn["name"]])}}
                calls.append(c)
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def chat_messages(r: Renderer, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list | None]:
    """Messages (and tools, when native) as the template should receive them."""
    messages = _ordered_arguments(messages, tools)
    if r.native_tools and r.native_tool_calls:
        return [_native_message(m) for m in messages], tools or None
    msgs = [_fallback_message(m) for m in messages]
    if tools:
        line = tool_signature if r.tool_docs == "compact" else (lambda t: json.dumps(t, ensure_ascii=False))
        block = TOOLS_PREAMBLE.format(tools="\n".join(map(line, tools)))
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{msgs[0]['content']}\n\n{block}"}
        else:
            msgs.insert(0, {"role": "system", "content": block})
    return msgs, None


def _apply(r: Renderer, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
    kwargs = {"tools": tools} if tools else {}
    try:
        return r.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
    except Exception as e:  # jinja raises TemplateError / ValueError for roles it refuses
        raise SlmtuneError(f"The chat template refused these messages: {e}") from None


def prompt_text(r: Renderer, rec: dict) -> str:
    prompt, _ = split_prompt_target(rec)
    msgs, tools = chat_messages(r, prompt, rec.get("tools"))
    return _apply(r, msgs, tools, generation_prompt=True)


def render_pair(r: Renderer, rec: dict) -> tuple[str, str]:
    """(prompt text, target text): the target turn closed as the template closes an assistant turn."""
    prompt, target = split_prompt_target(rec)
    msgs, tools = chat_messages(r, [*prompt, target], rec.get("tools"))
    head = _apply(r, msgs[:-1], tools, generation_prompt=True)
    full = _apply(r, msgs, tools, generation_prompt=False)
    if full.startswith(head):
        return head, full[len(head):]
    # Templates that rewrite history (e.g. strip reasoning) break the prefix property; fall back to the
    # content closed by EOS, which is what generation stops on anyway.
    return head, msgs[-1]["content"] + (r.tokenizer.eos_token or "")


def target_text(r: Renderer, rec: dict) -> str:
    """The target turn's text, closed as the template closes an assistant turn."""
    return render_pair(r, rec)[1]


def render_turns(r: Renderer, rec: dict) -> list[tuple[str, bool]]:
    """The conversation through its target as (text, is an assistant turn) pieces whose concatenation is the
    full rendering; each assistant turn is cut as `render_pair` cuts the target (after the generation prompt,
    through the template's close of the turn). Needs a template that renders earlier turns unchanged."""
    prompt, target = split_prompt_target(rec)
    msgs, tools = chat_messages(r, [*prompt, target], rec.get("tools"))
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = _apply(r, msgs[:i], tools, generation_prompt=True)
        full = _apply(r, msgs[:i + 1], tools, generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise SlmtuneError("data.train_on: all_assistant needs a chat template that renders earlier turns "
                               "unchanged; this one rewrites them (e.g. drops their reasoning).",
                               "Set data.train_on: last.")
        pieces += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    return pieces


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_prompt: int  # tokens before the first target token (a shared prefix never reaches past them)
    n_target: int  # tokens that carry the loss
    truncated: bool


def encode(r: Renderer, rec: dict, max_length: int, train_on: str = "last") -> Encoded:
    """Prompt + target tokens with the loss mask. Over-long examples lose prompt tokens from the left (the
    target is what we learn); a target that alone fills `max_length` leaves no prompt, which `check_mask`
    rejects. `train_on="all_assistant"`: every assistant turn is a target (see `_encode_turns`)."""
    if train_on == "all_assistant":
        return _encode_turns(r, rec, max_length)
    tok = r.tokenizer
    head, tail = render_pair(r, rec)
    p = tok(head, add_special_tokens=False)["input_ids"]
    t = tok(tail, add_special_tokens=False)["input_ids"]
    truncated = len(p) + len(t) > max_length
    if truncated:
        t = t[:max_length]
        p = p[len(p) - (max_length - len(t)):] if len(t) < max_length else []
    return Encoded(p + t, [-100] * len(p) + list(t), len(p), len(t), truncated)


def _encode_turns(r: Renderer, rec: dict, max_length: int) -> Encoded:
    """Labels on every assistant turn's tokens. Each piece of `render_turns` is tokenized apart, as `encode`
    splits prompt and target, so no BPE merge crosses a label boundary. Over-long examples keep their last
    `max_length` tokens; an assistant turn cut at the left edge loses its labels (its start is gone)."""
    tok = r.tokenizer
    pieces = [(tok(text, add_special_tokens=False)["input_ids"], target) for text, target in render_turns(r, rec)]
    if len(pieces[-1][0]) >= max_length:
        return encode(r, rec, max_length)  # the target alone fills the window: `check_mask` says so
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if target else -100 for piece, target in pieces for t in piece]
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[-max_length:], labels[-max_length:]
        i = 0
        while i < len(labels) and labels[i] != -100:
            labels[i] = -100
            i += 1
    n_prompt = next((i for i, lab in enumerate(labels) if lab != -100), len(labels))
    return Encoded(ids, labels, n_prompt, sum(lab != -100 for lab in labels), truncated)


def check_mask(enc: Encoded, where: str) -> None:
    """A training example must learn something and must not learn its prompt."""
    if enc.n_target == 0:
        raise SlmtuneError(f"{where}: the loss mask is empty (no target tokens).",
                           "The last assistant message renders to nothing; check the record.")
    if enc.n_prompt == 0:
        raise SlmtuneError(f"{where}: the loss mask covers the whole sequence (no prompt tokens left).",
                           "Raise `data.max_length` so the prompt fits beside the target.")


def parse_output(text: str) -> dict:
    """Model text → assistant message {"role", "content", "tool_calls"?}. Unparseable calls are kept as raw
    `arguments` strings so callers can score them as parse failures."""
    calls, n = [], 0
    for m in _CALL_RE.finditer(text):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
            name, args = obj.get("name"), obj.get("arguments", {})
            args_s = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        except (json.JSONDecodeError, AttributeError):
            name, args_s = None, body
        calls.append({"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": args_s}})
        n += 1
    content = _CALL_RE.sub("", text).strip() if calls else text.strip()
    msg: dict = {"role": "assistant", "content": content or None}
    if calls:
        msg["tool_calls"] = calls
    return msg
