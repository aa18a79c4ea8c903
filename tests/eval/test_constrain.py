"""Tool-calling grammars: calls to offered tools always; a text answer only where the task's teacher gives them."""

import pytest

pytest.importorskip("llguidance")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def _accepts(tok, grammar: str, text: str) -> bool:
    from llguidance import LLMatcher

    from slmtune.eval import constrain

    ll = constrain.ll_tokenizer(tok, len(tok), [tok.eos_token_id])
    m = LLMatcher(ll, constrain.compile_grammar(ll, grammar))
    return all(m.consume_token(t) for t in tok(text, add_special_tokens=False)["input_ids"]) and m.is_accepting()


@pytest.mark.parametrize("allow_text", [False, True])
def test_text_answers_only_when_allowed(allow_text):
    from slmtune.eval.constrain import grammar_for
    from slmtune.synthetic.tiny import build_tokenizer

    tok = build_tokenizer()
    g = grammar_for("tool_calling", None, TOOLS, (40, 4, 2), allow_text=allow_text)
    assert _accepts(tok, g, CALL)
    assert _accepts(tok, g, CALL + "\n" + CALL)
    assert _accepts(tok, g, "No offered function fits this request.") is allow_text
    assert not _accepts(tok, g, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not _accepts(tok, g, "<b>not a call</b>")
