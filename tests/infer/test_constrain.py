"""Tool-calling grammars: calls to offered tools always; a text answer only where the task's teacher gives them."""

import pytest

pytest.importorskip("llguidance")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def _accepts(tok, grammar: str, text: str) -> bool:
    from llguidance import LLMatcher

    from slmtune.infer import constrain

    ll = constrain.ll_tokenizer(tok, len(tok), [tok.eos_token_id])
    m = LLMatcher(ll, constrain.compile_grammar(ll, grammar))
    return all(m.consume_token(t) for t in tok(text, add_special_tokens=False)["input_ids"]) and m.is_accepting()


@pytest.mark.parametrize("allow_text", [False, True])
def test_text_answers_only_when_allowed(allow_text):
    from slmtune.infer.constrain import grammar_for
    from slmtune.synthetic.tiny import build_tokenizer

    tok = build_tokenizer()
    g = grammar_for("tool_calling", None, TOOLS, (40, 4, 2), allow_text=allow_text)
    assert _accepts(tok, g, CALL)
    assert _accepts(tok, g, CALL + "\n" + CALL)
    assert _accepts(tok, g, "No offered function fits this request.") is allow_text
    assert not _accepts(tok, g, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not _accepts(tok, g, "<b>not a call</b>")


def test_a_teacher_call_in_another_argument_order_trains_in_the_order_the_grammar_writes():
    """llguidance writes object properties in schema order only: a logged call whose arguments (and nested object
    keys) came in another order is rendered for training in schema order, which the grammar accepts — the raw
    order it rejects, so a model trained on it would learn to close the object early."""
    import json

    from slmtune.infer.constrain import grammar_for
    from slmtune.render import make_renderer, target_text
    from slmtune.synthetic.tiny import build_tokenizer

    tools = [{"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "date": {"type": "string"},
        "guest": {"type": "object", "properties": {"first": {"type": "string"}, "last": {"type": "string"}}},
        "note": {"type": "string"}}, "required": ["city"]}}}]
    args = {"note": "late", "guest": {"last": "Lund", "first": "Ada"}, "city": "Oslo"}
    rec = {"messages": [{"role": "user", "content": "Book Oslo for Ada Lund, arriving late."},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                         "function": {"name": "book", "arguments": json.dumps(args)}}]}], "tools": tools}
    tok = build_tokenizer()
    target = target_text(make_renderer(tok), rec).removesuffix("<|im_end|>\n")
    ordered = {"city": "Oslo", "guest": {"first": "Ada", "last": "Lund"}, "note": "late"}
    assert target == '<tool_call>\n' + json.dumps({"name": "book", "arguments": ordered}) + '\n</tool_call>'
    g = grammar_for("tool_calling", None, tools, (40, 4, 1))
    assert _accepts(tok, g, target)
    assert not _accepts(tok, g, '<tool_call>\n' + json.dumps({"name": "book", "arguments": args}) + '\n</tool_call>')
