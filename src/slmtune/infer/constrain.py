"""Grammar-constrained decoding to a task's schema, with llguidance (PyPI `llguidance`) masks in a transformers
logits processor.

What the grammar allows, per category (the formats `slmtune.render` trains and `parse_output` reads):

* tool_calling — 1..K blocks ``<tool_call>\\n{"name": <tool>, "arguments": {...}}\\n</tool_call>`` joined by
  newlines, where each block's JSON is `anyOf` one tool (name `const`, arguments = its parameter schema) and K
  is the most calls any teacher target made; or, when some teacher targets answer in text (no offered tool
  fits), a text answer that does not open with ``<`` (`allow_text`);
* extraction — one JSON value of the task schema;
* classification — exactly one of the enum labels;
* text tasks — unconstrained.

JSON is written as `json.dumps` writes it (", " and ": ", no other whitespace), as in training. So that
generation must end within its token budget, the schema is *tightened* first (`tighten`): objects with listed
properties take no others, free strings hold at most `max_chars`, arrays at most `max_items`, integers stay
within ±1e15. Anything the tightened schema accepts the original accepts too, so every finished constrained
output is schema-valid.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.infer.calls import CLASSIFICATION, EXTRACTION, TOOL_CALLING, decode_calls, parse_json_text, tool_specs

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
INT_BOUND = 10**15


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise SlmtuneError("Constrained decoding needs llguidance (a slmtune dependency): `pip install llguidance`.")


# ----------------------------------------------------------------------------- schema → grammar
def caps_from(targets: list[dict]) -> tuple[int, int, int]:
    """(max string chars, max array items, max calls) from the teacher targets: 2 × the longest seen + slack."""
    strs, items, calls = [0], [0], [1]

    def walk(v: Any) -> None:
        if isinstance(v, str):
            strs.append(len(v))
        elif isinstance(v, list):
            items.append(len(v))
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    for t in targets:
        got = decode_calls(t)
        calls.append(len(got))
        for _, args in got:
            walk(args)
        walk(parse_json_text(t.get("content")) if not got else None)
    return 2 * max(strs) + 16, 2 * max(items) + 2, max(calls)


def tighten(schema: Any, max_chars: int, max_items: int) -> Any:
    """A copy of `schema` whose every instance is finite in size (see module docstring) and valid for `schema`."""
    s = copy.deepcopy(schema)
    _tighten(s, max_chars, max_items)
    return s


def _tighten(s: Any, max_chars: int, max_items: int) -> None:
    if not isinstance(s, dict):
        return
    if "oneOf" in s:  # llguidance reads anyOf only
        s["anyOf"] = s.pop("oneOf")
    types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
    free = "enum" not in s and "const" not in s
    if "properties" in s and "additionalProperties" not in s:
        s["additionalProperties"] = False
    if "string" in types and free and "pattern" not in s and "format" not in s:
        s["maxLength"] = min(s.get("maxLength", max_chars), max_chars)
    if "array" in types:
        s["maxItems"] = min(s.get("maxItems", max_items), max_items)
    if ("integer" in types or "number" in types) and free:
        s.setdefault("maximum", INT_BOUND)
        s.setdefault("minimum", -INT_BOUND)
    for key in ("properties", "$defs", "definitions"):
        for sub in (s.get(key) or {}).values():
            _tighten(sub, max_chars, max_items)
    for key in ("items", "additionalProperties"):
        _tighten(s.get(key), max_chars, max_items)
    for key in ("anyOf", "allOf", "prefixItems"):
        for sub in s.get(key) or []:
            _tighten(sub, max_chars, max_items)


def _json(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


# A text answer instead of calls (a tool-calling task whose teacher sometimes answers in text: nothing offered fits):
# any text that does not open like a tool call.
TEXT_ANSWER = "text: /[^<\\s][^\\x00]*/\n"


def grammar_for(category: str, schema: Any, record_tools: list | None, caps: tuple[int, int, int],
                allow_text: bool = False) -> str | None:
    """The Lark grammar (llguidance dialect) of an answer of this task, or None when unconstrained. `allow_text`:
    a tool-calling answer may instead be text (see `TEXT_ANSWER`)."""
    max_chars, max_items, max_calls = caps
    if category == TOOL_CALLING:
        specs = tool_specs(schema, record_tools)
        if not specs:
            return None
        one = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": name}, "arguments": tighten(params or {"type": "object"}, max_chars, max_items)},
            "required": ["name", "arguments"], "additionalProperties": False} for name, params in specs.items()]}
        block = '"<tool_call>\\n" ' + _json(one) + ' "\\n</tool_call>"'
        more = f' ("\\n" call){{0,{max_calls - 1}}}' if max_calls > 1 else ""
        if allow_text:
            return f"start: text | call{more}\ncall: {block}\n{TEXT_ANSWER}"
        return f"start: call{more}\ncall: {block}\n"
    if category == EXTRACTION and isinstance(schema, dict):
        return "start: " + _json(tighten(schema, max_chars, max_items)) + "\n"
    if category == CLASSIFICATION and isinstance(schema, dict) and schema.get("enum"):
        return "start: " + " | ".join(json.dumps(str(x)) for x in schema["enum"]) + "\n"
    return None


# ----------------------------------------------------------------------------- logits processor
_TOKENIZERS: dict = {}


def ll_tokenizer(tokenizer, n_vocab: int, stops: list[int]):
    """llguidance's view of a fast HF tokenizer (built once per tokenizer: ~1 s for a 50k vocabulary)."""
    from llguidance import LLTokenizer

    key = (id(tokenizer), n_vocab, tuple(stops))
    if key not in _TOKENIZERS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise SlmtuneError("Constrained decoding needs a fast (Rust `tokenizers`) tokenizer.")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        _TOKENIZERS[key] = LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=stops)
    return _TOKENIZERS[key]


def compile_grammar(ll_tok, grammar: str):
    """Check a grammar once (so a schema llguidance can't read fails up front, with its message)."""
    matcher(ll_tok, grammar)
    return grammar


def matcher(ll_tok, grammar: str):
    """An llguidance matcher of `grammar`; a grammar llguidance can't read raises with its message."""
    from llguidance import LLMatcher

    m = LLMatcher(ll_tok, grammar)
    if m.is_error():
        raise SlmtuneError(f"Constrained decoding: the task schema could not become a grammar: {m.get_error()}")
    return m


def make_processor(ll_tok, grammars: list[str | None], prompt_len: int, stops: list[int]):
    """A LogitsProcessor masking row i's logits to what `grammars[i]` allows next (None: no mask). A matcher
    that has stopped (its grammar is complete) allows only the end-of-turn tokens."""
    import torch
    from llguidance import LLMatcher
    from transformers import LogitsProcessor

    class GrammarMask(LogitsProcessor):
        def __init__(self) -> None:
            self.matchers = [LLMatcher(ll_tok, g) if g else None for g in grammars]

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > prompt_len:
                for m, tok in zip(self.matchers, input_ids[:, -1].tolist(), strict=False):
                    if m is not None and not (m.is_stopped() or m.is_error()):
                        m.consume_token(tok)
            vocab = scores.shape[1]
            for i, m in enumerate(self.matchers):
                if m is not None:
                    allowed = torch.from_numpy(allowed_tokens(m, vocab, stops)).to(scores.device)
                    scores[i] = scores[i].masked_fill(~allowed, float("-inf"))
            return scores

    return GrammarMask()


def allowed_tokens(matcher, vocab: int, stops: list[int]):
    """A numpy bool mask of the `vocab` token ids `matcher` allows next: the end-of-turn tokens alone once it has
    stopped (its grammar is complete). Both serving engines and eval mask with it."""
    import numpy as np

    allowed = np.zeros(vocab, dtype=bool)
    if matcher.is_stopped() or matcher.is_error():
        allowed[stops] = True
        return allowed
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    n = min(vocab, len(bits))
    allowed[:n] = bits[:n].astype(bool)
    return allowed
