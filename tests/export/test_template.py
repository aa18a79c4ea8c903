"""Exports carry a chat template that renders as training did: plain `apply_chat_template` on an exported
tokenizer equals slmtune's rendered prompt (and prompt + target) byte for byte, with and without tools."""

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.export.template import export_template
from slmtune.io import write_jsonl
from slmtune.records import split_prompt_target
from slmtune.render import encode, make_renderer, prompt_text, render_pair
from slmtune.synthetic.tiny import WEATHER_TOOL, build_tokenizer, weather_records

RECIPE = """\
name: weather
task: {{name: weather, category: tool_calling, schema_hash: 0123456789abcdef}}
model: {{base: {model}}}
data: {{train: {train}, max_length: 256}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: 2, lr: 2.0e-2, batch_size: 4, warmup_ratio: 0.0, scheduler: constant}}
output: {{dir: {out}}}
"""
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the docs — returns passages.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}}}}}


def call(i: int, name: str, arguments) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


def records() -> list[dict]:
    """Tools or not, system or not, single and parallel calls, tool results in history, arguments as compact and
    spaced JSON strings and as dicts."""
    history = [
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call(0, "get_weather", '{"city":"Oslo"}'), call(1, "get_weather", {"city": "Lima", "unit": "celsius"})]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 3}'},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 19}'},
    ]
    return [
        weather_records(1)[0],  # system + tools, one call, spaced JSON string
        {"messages": [*history, {"role": "assistant", "content": "Oslo 3°C, Lima 19°C."}],
         "tools": [WEATHER_TOOL, SEARCH_TOOL]},  # no system, parallel calls, tool results, text target
        {"messages": [{"role": "system", "content": "Be brief."}, *history,
                      {"role": "assistant", "content": "Let me check.", "tool_calls": [
                          call(2, "search", '{ "query" : "Z\\u00fcrich \\"weather\\"\\n" , "k":3 }'),
                          call(3, "search", {"query": "Zürich", "k": 2})]}],
         "tools": [SEARCH_TOOL]},  # text + parallel calls as target
        {"messages": [{"role": "system", "content": "Classify the sentiment."},
                      {"role": "user", "content": "I love it"}, {"role": "assistant", "content": "positive"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "Extract the city: I live in Rome."},
                      {"role": "assistant", "content": '{"city": "Rome"}'}]},  # no tools, no system
    ]


def assert_renders_as_training(r, tokenizer, rec: dict) -> None:
    prompt, target = split_prompt_target(rec)
    tools = rec.get("tools")
    got = tokenizer.apply_chat_template(copy.deepcopy(prompt), tools=tools, add_generation_prompt=True,
                                        tokenize=False)
    assert got == prompt_text(r, rec)
    head, tail = render_pair(r, rec)
    assert tokenizer.apply_chat_template(copy.deepcopy([*prompt, target]), tools=tools, tokenize=False) == head + tail
    ids = tokenizer.apply_chat_template(copy.deepcopy(prompt), tools=tools, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    enc = encode(r, rec, 4096)
    assert ids == enc.input_ids[:enc.n_prompt], "the served prompt tokens are the trained prompt tokens"


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return Path(result.output.strip().split("exported: ")[1]) if "exported: " in result.output else None


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory):
    """One tiny run (2 steps), exported merged and adapter-only, plus its training renderer."""
    root = tmp_path_factory.mktemp("template")
    write_jsonl(root / "train.jsonl", weather_records(8, seed=0))
    (root / "recipe.yaml").write_text(RECIPE.format(model=tiny_model, train=root / "train.jsonl", out=root / "run"))
    cli("train", root / "recipe.yaml")
    merged = cli("export", root / "run", "-o", root / "merged")
    adapter = cli("export", root / "run", "-o", root / "adapter", "--adapter-only")
    r = make_renderer(AutoTokenizer.from_pretrained(root / "run" / "adapter"))
    return {"merged": merged, "adapter": adapter, "renderer": r, "run": root / "run"}


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_exported_template_renders_records_as_training_did(exports, kind):
    r = exports["renderer"]
    assert r.mode == "slmtune-hermes"
    folder = exports[kind]
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == export_template(r)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # plain transformers, nothing from slmtune
    assert tokenizer.chat_template != r.tokenizer.chat_template
    for rec in records():
        assert_renders_as_training(r, tokenizer, rec)
    info = json.loads((folder / "slmtune_render.json").read_text())
    assert info["mode"] == "slmtune-hermes" and "<tool_call>" in info["tool_call_format"]


def test_slmtune_renders_an_export_as_training_did(exports):
    """slmtune code loading an export (eval, serving) sees a template that handles tools itself ("native") and
    still produces the training bytes."""
    r = exports["renderer"]
    r_export = make_renderer(AutoTokenizer.from_pretrained(exports["merged"]))
    assert r_export.mode == "native"
    for rec in records():
        assert prompt_text(r_export, rec) == prompt_text(r, rec)
        assert render_pair(r_export, rec) == render_pair(r, rec)
    assert export_template(r_export) == r_export.tokenizer.chat_template, "exporting an export changes nothing"


def test_generation_markers_survive(exports):
    tokenizer = AutoTokenizer.from_pretrained(exports["merged"])
    rec = weather_records(1)[0]
    out = tokenizer.apply_chat_template(rec["messages"], tools=rec["tools"], return_dict=True,
                                        return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == render_pair(exports["renderer"], rec)[1].removesuffix("\n")


def test_model_cards_show_transformers_and_vllm_serving(exports):
    merged = (exports["merged"] / "README.md").read_text()
    adapter = (exports["adapter"] / "README.md").read_text()
    for card in (merged, adapter):
        assert "apply_chat_template(messages, tools=tools, add_generation_prompt=True" in card
        assert "--enable-auto-tool-choice --tool-call-parser hermes" in card
    assert "vllm serve THIS_FOLDER --enable-auto-tool-choice --tool-call-parser hermes" in merged
    name = exports["adapter"].name
    assert f"--enable-lora --lora-modules {name}=THIS_FOLDER" in adapter
    assert "--chat-template THIS_FOLDER/chat_template.jinja" in adapter


def test_model_card_snippet_runs_and_parses_the_training_format(exports):
    """The card's transformers code, run as written (THIS_FOLDER filled in), on the export."""
    folder = exports["merged"]
    card = (folder / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace("THIS_FOLDER", str(folder))
    code = code.replace("tools = [...]", "tools = TOOLS").replace('"content": "..."', '"content": "Weather in Oslo?"')
    scope = {"TOOLS": [WEATHER_TOOL]}
    exec(compile(code.split("calls = ")[0], "card", "exec"), scope)
    assert scope["text"] is not None
    rec = weather_records(1)[0]
    scope["text"] = "Sure.\n" + render_pair(exports["renderer"], rec)[1].removesuffix("<|im_end|>\n")
    exec(compile("calls = " + code.split("calls = ")[1], "card", "exec"), scope)
    want = rec["messages"][-1]["tool_calls"][0]["function"]
    assert scope["calls"] == [{"name": want["name"], "arguments": json.loads(want["arguments"])}]


# Arguments as JSON strings: the template re-serialises them as training's json.dumps(json.loads(s)) does.
ARGUMENTS = [
    '{"city":"Oslo"}', '{"city": "Oslo"}', ' {\n  "city" :\t"Oslo" ,"n":[1,2 ,{"a":null}]}\n',
    '{"x": 1.50, "y": 1E2, "z": -0, "w": -0.0, "t": true, "f": false, "big": 123456789012345678901234567890}',
    '{"inf": 1e400, "e": 2.5e-3}',
    json.dumps({"city": "Zürich", "q": 'a"b\\c\n\t\x01/é😀'}),  # json.dumps' default: \u escapes
    '{"s": "\\/\\u0041\\u00e9\\ud83d\\ude00\\u0022\\u005c\\u000a\\u001f\\u007f"}',
    '{"nested": {"list": [[], {}, [{"a": [1, {"b": "}]"}]}]]}, "colon:comma,": "a: b, c"}',
    "[]", "{}", '"just a string"', "42", "null",
    "Oslo", "", '{"a": 1', '{"a": "open', "{}}",  # not JSON: training quotes them as a string
    {"city": "Oslo", "n": [1, 2.5, None]}, None,
]


@pytest.mark.parametrize("arguments", ARGUMENTS, ids=range(len(ARGUMENTS)))
def test_arguments_render_as_training_did(arguments):
    r = make_renderer(build_tokenizer())
    served = build_tokenizer()
    served.chat_template = export_template(r)
    rec = {"messages": [{"role": "user", "content": "go"},
                        {"role": "assistant", "content": None, "tool_calls": [call(0, "get_weather", arguments)]},
                        {"role": "tool", "tool_call_id": "call_0", "content": "ok"},
                        {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", arguments)]}],
           "tools": [WEATHER_TOOL]}
    assert_renders_as_training(r, served, rec)


def test_native_templates_are_kept():
    tok = build_tokenizer()
    tok.chat_template = ("{% if tools %}TOOLS{% endif %}{% for m in messages %}{{ m.role }}{% if m.tool_calls %}"
                         "CALL{% endif %}{% endfor %}")
    r = make_renderer(tok)
    assert r.mode == "native" and export_template(r) == tok.chat_template


def test_the_prelude_leaves_the_base_template_lexed_as_alone():
    """Whitespace at the template's start and block-trimming at its first tag behave as without the prelude."""
    tok = build_tokenizer()
    for base in ("  {% for m in messages %}[{{ m.content }}]{% endfor %}",
                 "\n{{ messages | length }}\n  {%- if 1 %}x{% endif %}"):
        tok.chat_template = base
        r = make_renderer(tok)
        alone = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        tok.chat_template = export_template(r)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == alone


NESTED_TOOL = {"type": "function", "function": {
    "name": "book", "description": "Book a trip.", "parameters": {"type": "object", "properties": {
        "legs": {"type": "array", "items": {"type": "object", "properties": {
            "from": {"type": "string", "description": "IATA code"}, "when": {"type": ["string", "null"]}},
            "required": ["from"]}},
        "class": {"type": "string", "enum": ["economy", "business", "ünïcode \"q\""], "default": "economy"},
        "seats": {"type": "integer", "default": 1}, "note": {}, "meta": {"type": "object"}},
        "required": ["legs"]}}}


def test_compact_tool_docs_are_signature_lines_that_the_export_template_writes_alike(exports, tmp_path):
    """`data.tool_docs: compact`: a signature line per tool, descriptions dropped; the marked tokenizer and the
    export's Jinja prelude render every record byte for byte alike, nested and odd schemas included."""
    from slmtune.render import mark_tool_docs, tool_signature

    assert tool_signature(NESTED_TOOL) == ('book(legs: array<{from: string, when?: string|null}>, class?: "economy"|'
                                           '"business"|"ünïcode \\"q\\"" = "economy", seats?: integer = 1, note?: '
                                           'any, meta?: object)')
    r = exports["renderer"]
    tok = AutoTokenizer.from_pretrained(exports["run"] / "adapter")
    mark_tool_docs(tok, "compact")
    compact = make_renderer(tok)
    assert compact.tool_docs == "compact" and compact.mode == "slmtune-hermes"
    recs = [*records(), {"messages": [{"role": "user", "content": "Fly me to Rome"}, {"role": "assistant",
            "content": None, "tool_calls": [call(9, "book", '{"legs": [{"from": "OSL"}]}')]}],
            "tools": [NESTED_TOOL, WEATHER_TOOL, SEARCH_TOOL]}]
    text = prompt_text(compact, recs[-1])
    assert "book(legs: array<" in text and "Book a trip" not in text and "IATA" not in text
    assert len(text) < len(prompt_text(r, recs[-1])) / 2
    (tmp_path / "t").mkdir()
    tok.chat_template = export_template(compact)
    tok.save_pretrained(tmp_path / "t")
    exported = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert make_renderer(exported).tool_docs == "compact"  # the marker travels inside the export template
    for rec in recs:
        assert_renders_as_training(compact, exported, rec)
        assert prompt_text(make_renderer(exported), rec) == prompt_text(compact, rec)
    mark_tool_docs(tok, "full")
    assert make_renderer(tok).tool_docs == "full"


def test_gemmas_turn_format_renders_tools_calls_and_results_and_exports_alike(exports, tmp_path):
    """`gemma3-270m`'s GGUF has no chat template; slmtune's (`GEMMA_TEMPLATE`) folds the system turn into the first
    user turn, calls the assistant `model`, and accepts two user turns in a row (parallel tool results). Tools go
    through slmtune's rendering, and the export template gives the training bytes, as for SmolLM2."""
    from slmtune.models import GEMMA_TEMPLATE

    tok = AutoTokenizer.from_pretrained(exports["run"] / "adapter")
    tok.chat_template = GEMMA_TEMPLATE
    r = make_renderer(tok)
    assert r.mode == "slmtune-hermes"
    rec = records()[2]  # system, parallel calls, two tool results in a row, text + calls as the target
    head, tail = render_pair(r, rec)
    first = head.split("<end_of_turn>")[0]
    assert first.startswith("<start_of_turn>user\nBe brief.\n\n# Tools\n") and "<tools>\n{" in first
    assert head.endswith("<start_of_turn>model\n") and "<start_of_turn>system" not in head
    assert head.count("<start_of_turn>user\n<tool_response>") == 2
    assert tail.startswith("Let me check.\n<tool_call>\n") and tail.endswith("</tool_call><end_of_turn>\n")
    tok.chat_template = export_template(r)
    tok.save_pretrained(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    for rec in records():
        assert_renders_as_training(r, exported, rec)
