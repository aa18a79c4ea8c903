"""Rendering and masking: what training sees is what generation sees; tools reach templates that ignore them."""

import json

import pytest
import torch

from slmtune.errors import SlmtuneError
from slmtune.render import check_mask, encode, make_renderer, parse_output, prompt_text, target_text
from slmtune.synthetic.tiny import WEATHER_TOOL, build_tokenizer, weather_records


@pytest.fixture(scope="module")
def r():
    return make_renderer(build_tokenizer())


def test_fallback_puts_tools_in_system_and_calls_as_json(r):
    rec = weather_records(1)[0]
    prompt = prompt_text(r, rec)
    assert r.mode == "slmtune-hermes"
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert prompt.startswith("<|im_start|>system\nYou are a weather assistant.")
    assert prompt.endswith("<|im_start|>assistant\n")
    args = json.loads(rec["messages"][-1]["tool_calls"][0]["function"]["arguments"])
    expected = "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": args}) + "\n</tool_call>"
    assert target_text(r, rec) == expected + "<|im_end|>\n"


def test_prompt_plus_target_is_the_full_conversation(r):
    rec = weather_records(1)[0]
    full = r.tokenizer.apply_chat_template(
        [{"role": "system", "content": prompt_text(r, rec).split("<|im_end|>")[0].removeprefix("<|im_start|>system\n")},
         {"role": "user", "content": rec["messages"][1]["content"]},
         {"role": "assistant", "content": target_text(r, rec).removesuffix("<|im_end|>\n")}],
        tokenize=False)
    assert prompt_text(r, rec) + target_text(r, rec) == full


def test_encode_masks_exactly_the_target(r):
    rec = weather_records(1)[0]
    enc = encode(r, rec, max_length=4096)
    assert len(enc.input_ids) == len(enc.labels) == enc.n_prompt + enc.n_target
    assert all(x == -100 for x in enc.labels[:enc.n_prompt])
    assert enc.labels[enc.n_prompt:] == enc.input_ids[enc.n_prompt:]
    assert r.tokenizer.decode(enc.input_ids[enc.n_prompt:]) == target_text(r, rec)
    assert r.tokenizer.decode(enc.input_ids[:enc.n_prompt]) == prompt_text(r, rec)


def test_truncation_keeps_the_target_and_drops_prompt_from_the_left(r):
    rec = weather_records(1)[0]
    full = encode(r, rec, 4096)
    short = encode(r, rec, full.n_target + 5)
    assert short.truncated and short.n_target == full.n_target and short.n_prompt == 5
    assert short.input_ids == full.input_ids[-(full.n_target + 5):]


def test_mask_check_rejects_prompt_less_examples(r):
    rec = weather_records(1)[0]
    n_target = encode(r, rec, 4096).n_target
    with pytest.raises(SlmtuneError, match="covers the whole sequence"):
        check_mask(encode(r, rec, n_target), "x.jsonl:1")
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    enc = encode(r, empty, 4096)
    check_mask(enc, "x.jsonl:2")  # the end-of-turn token alone is still something to learn
    assert enc.n_target >= 1


def test_tool_results_become_tool_response_turns(r):
    rec = {"messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "It is 3 degrees in Oslo."}], "tools": [WEATHER_TOOL]}
    p = prompt_text(r, rec)
    assert '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>' in p
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in p
    assert target_text(r, rec) == "It is 3 degrees in Oslo.<|im_end|>\n"


def test_native_templates_receive_tools_and_decoded_arguments():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
        "</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    r = make_renderer(tok)
    assert r.mode == "native"
    rec = weather_records(1)[0]
    assert prompt_text(r, rec).startswith("TOOLS:get_weather\n")
    city = json.loads(rec["messages"][-1]["tool_calls"][0]["function"]["arguments"])["city"]
    assert target_text(r, rec) == f"CALL get_weather {city}</s>"


def test_parse_output_round_trips_the_target(r):
    rec = weather_records(1)[0]
    msg = parse_output(target_text(r, rec).removesuffix("<|im_end|>\n"))
    want = rec["messages"][-1]["tool_calls"][0]["function"]
    assert msg["content"] is None
    assert msg["tool_calls"][0]["function"]["name"] == want["name"]
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == json.loads(want["arguments"])


def test_parse_output_keeps_broken_calls_and_plain_text():
    msg = parse_output('Sure.\n<tool_call>\n{"name": "x", "arguments": {"a": 1\n</tool_call>')
    assert msg["content"] == "Sure." and msg["tool_calls"][0]["function"]["name"] is None
    assert parse_output("  just text ") == {"role": "assistant", "content": "just text"}


def test_packed_examples_do_not_attend_across_boundaries(tmp_path):
    """Padding-free packing (TRL's collator → position_ids) gives each example the logits it has alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from slmtune.synthetic.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    r = make_renderer(build_tokenizer())
    encs = [encode(r, rec, 4096) for rec in weather_records(2, seed=3)]
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in encs])
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        # use_cache=False as in training: transformers detects packed sequences only when no KV cache is built.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in encs]
    n0 = len(encs[0].input_ids)
    torch.testing.assert_close(packed[:n0], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[n0:n0 + len(encs[1].input_ids)], alone[1], atol=1e-4, rtol=1e-4)


def three_turn_record() -> dict:
    """Three assistant turns: text, a tool call (after a second question), text (after the tool result)."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    return {"id": "three", "tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, which city?"},
        {"role": "user", "content": "Oslo, please."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "It is 3 degrees in Oslo."},
    ]}


def labelled_runs(r, enc) -> list[str]:
    """The decoded runs of tokens that carry a label (labels equal to their tokens)."""
    from itertools import groupby

    assert all(lab in (-100, i) for i, lab in zip(enc.input_ids, enc.labels, strict=True))
    return [r.tokenizer.decode([i for i, _ in run])
            for target, run in groupby(zip(enc.input_ids, enc.labels, strict=True), key=lambda p: p[1] != -100)
            if target]


def test_all_assistant_labels_exactly_the_three_assistant_turns(r):
    rec = three_turn_record()
    # each assistant turn as rendered when it is the conversation's target (render_pair's cut)
    turns = [target_text(r, {**rec, "messages": rec["messages"][:k + 1]}) for k in (2, 4, 6)]
    assert turns[0] == "Hello, which city?<|im_end|>\n" and turns[1].startswith("<tool_call>\n{\"name\"")
    every = encode(r, rec, 4096, train_on="all_assistant")
    assert labelled_runs(r, every) == turns
    assert every.n_target == sum(lab != -100 for lab in every.labels) and every.labels[every.n_prompt] != -100
    assert all(lab == -100 for lab in every.labels[:every.n_prompt])
    last = encode(r, rec, 4096)
    assert labelled_runs(r, last) == turns[2:]
    # same text either way: the whole conversation, prompt and targets
    assert r.tokenizer.decode(every.input_ids) == r.tokenizer.decode(last.input_ids) == prompt_text(r, rec) + turns[2]
    check_mask(every, "x.jsonl:1")


def test_all_assistant_truncation_drops_a_turn_cut_at_the_left_edge(r):
    rec = three_turn_record()
    full = encode(r, rec, 4096, train_on="all_assistant")
    first_target = full.n_prompt
    cut = len(full.input_ids) - (first_target + 2)  # the window starts 2 tokens into the first assistant turn
    short = encode(r, rec, cut, train_on="all_assistant")
    assert short.truncated and short.input_ids == full.input_ids[-cut:]
    assert len(labelled_runs(r, short)) == 2 and short.labels[0] == -100  # the cut turn carries no labels
    check_mask(short, "x.jsonl:1")
