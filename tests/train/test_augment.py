"""Tool-set augmentation (`augment:`): targets stay valid against what is offered, no-fit copies call nothing and
do not offer what they removed, masking renames alike in tools and calls, same seed → same records, off = as is."""

import copy
import json
import re

import jsonschema
import pytest

from slmtune.errors import SlmtuneError
from slmtune.recipe import AUGMENT_DEFAULTS, AugmentSection, load_recipe
from slmtune.records import record_problems, split_prompt_target
from slmtune.train.augment import NO_FIT_TEXT, augment, is_tool_calling, no_fit_text


def tool(name, description, properties, required, **extra):
    params = {"type": "object", "properties": properties, "required": required, **extra}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


WEATHER = tool("get_weather", "Current weather for a city.",
               {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
TIME = tool("get_time", "Local time in a timezone.", {"tz": {"type": "string"}}, ["tz"])
EMAIL = tool("send_email", "Send an email.",  # `anyOf` names top-level parameters in nested `required` lists
             {"to": {"type": "string"}, "cc": {"type": "string"}, "subject": {"type": "string"},
              "body": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
             ["subject"], anyOf=[{"required": ["to"]}, {"required": ["cc"]}], additionalProperties=False)
STOCK = tool("get_stock", "Share price of a ticker.", {"ticker": {"type": "string"}}, ["ticker"])
REFUSAL = "Sorry, I can't help with that."


def call(name, args, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def rec(i, tools, *turns):
    msgs = [{"role": "system", "content": "You are an assistant. Use the tools."}, *turns]
    out = {"id": f"r{i}", "messages": msgs, "meta": {"source": "test"}}
    return {**out, "tools": tools} if tools is not None else out


def user(text):
    return {"role": "user", "content": text}


def says(*calls, text=None):
    return {"role": "assistant", "content": text, "tool_calls": list(calls)} if calls else \
        {"role": "assistant", "content": text}


def records() -> list[dict]:
    """A little agent log: one-tool and many-tool calls, parallel calls, a multi-turn call, text answers."""
    out = []
    for city in ["Oslo", "Lima", "Rome", "Kyiv", "Pune", "Bern"]:
        out.append(rec(len(out), [WEATHER, TIME], user(f"Weather in {city}?"),
                       says(call("get_weather", {"city": city}))))
        out.append(rec(len(out), [TIME], user(f"Time in {city}?"), says(call("get_time", {"tz": f"Europe/{city}"}))))
        out.append(rec(len(out), [EMAIL, WEATHER, TIME], user(f"Mail {city}"),
                       says(call("send_email", {"to": f"{city}@x.org", "subject": "hi", "body": {"text": "yo"}}))))
        out.append(rec(len(out), [WEATHER, TIME], user(f"Weather and time in {city}?"),
                       says(call("get_weather", {"city": city, "unit": "celsius"}),
                            call("get_time", {"tz": "UTC"}, 1))))
    out.append(rec(len(out), [STOCK, WEATHER], user("Weather in Oslo, then its time."),
                   says(call("get_weather", {"city": "Oslo"})),
                   {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "5 C"},
                   says(call("get_time", {"tz": "Europe/Oslo"}, 1))))  # calls get_time, which it does not offer
    out.append(rec(len(out), [STOCK, WEATHER], user("Weather in Oslo, then the ACME price."),
                   says(call("get_weather", {"city": "Oslo"})),
                   {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "5 C"},
                   says(call("get_stock", {"ticker": "ACME"}, 1))))
    out.append(rec(len(out), None, user("Hello!"), says(text="Hi there.")))
    out += [rec(len(out) + k, [WEATHER], user(f"Book a flight {k}"), says(text=REFUSAL)) for k in range(2)]
    assert not any(record_problems(r) for r in out)
    return out


def items(recs=None):
    return [(f"train.jsonl:{i + 1}", r) for i, r in enumerate(recs or records())]


def run(seed=0, recs=None, **cfg):
    out, stats = augment(items(recs), AugmentSection(**cfg), seed)
    return [r for _, r in out], stats


ALL_ON = {"shuffle_tools": True, "distractors": 2, "irrelevance": 0.5, "mask_names": 0.5}


def offered(r):
    return {t["function"]["name"]: t["function"] for t in r.get("tools") or []}


def assert_target_valid(r):
    """Every called function is offered; its arguments (a JSON string) validate against that tool's parameters,
    with no key the parameters do not name and every required one present."""
    assert not record_problems(r), record_problems(r)
    tools = offered(r)
    for c in split_prompt_target(r)[1].get("tool_calls") or []:
        assert c["function"]["name"] in tools, (c["function"]["name"], list(tools))
        assert isinstance(c["function"]["arguments"], str)
        args = json.loads(c["function"]["arguments"])
        params = tools[c["function"]["name"]]["parameters"]
        jsonschema.validate(args, {**params, "additionalProperties": False})


def test_the_fixture_targets_are_valid():
    for r in records():
        if is_tool_calling(r):
            assert_target_valid(r)


def test_off_by_default_records_are_the_very_same():
    assert AugmentSection().model_dump(exclude={"seed"}) == AUGMENT_DEFAULTS
    before = items()
    snapshot = copy.deepcopy(before)
    out, stats = augment(before, AugmentSection(), seed=0)
    assert out == snapshot and all(a is b for (_, a), (_, b) in zip(out, before, strict=True))
    assert stats.as_dict() == {"tool_calling": 25, "shuffled": 0, "distractors_added": 0, "irrelevance": 0,
                               "masked": 0, "no_fit_text": None}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_everything_on_targets_stay_valid_and_input_is_untouched(seed):
    recs = records()
    snapshot = copy.deepcopy(recs)
    out, stats = run(seed, recs, **ALL_ON)
    assert recs == snapshot, "augmentation never mutates its input"
    passed = [r for r in recs if not is_tool_calling(r)]  # incl. r24, which calls a tool it does not offer
    assert all(any(o is r for o in out) for r in passed), "non-tool-calling records pass through as they are"
    for r in out:
        if not any(r is p for p in passed):
            assert_target_valid(r)
    assert len(out) == len(recs) + stats.irrelevance
    assert (stats.tool_calling, stats.masked, stats.irrelevance) == (25, 13, 13)  # round(0.5 × 25) = 13
    assert stats.distractors_added == sum(int(a.split(":")[1]) for r in out
                                          for a in r.get("meta", {}).get("augment", []) if a.startswith("distr"))
    assert sum("mask" in r.get("meta", {}).get("augment", []) for r in out) == 13


def test_shuffle_keeps_the_tool_set_and_moves_tools():
    recs = records()
    out, stats = run(shuffle_tools=True, recs=recs)
    many = [i for i, r in enumerate(recs) if is_tool_calling(r) and len(r["tools"]) > 1]
    assert stats.shuffled == len(many) == 19
    assert all(sorted(offered(out[i])) == sorted(offered(recs[i])) for i in many)
    assert any(list(offered(out[i])) != list(offered(recs[i])) for i in many)
    single = next(i for i, r in enumerate(recs) if is_tool_calling(r) and len(r["tools"]) == 1)
    assert out[single] is recs[single]
    assert all(out[i]["messages"] == recs[i]["messages"] for i in many), "only the tools move"


def test_distractors_come_from_other_records_and_are_never_offered_twice():
    recs = records()
    out, stats = run(distractors=2, recs=recs)
    pool = {"get_weather", "get_time", "send_email", "get_stock"}
    positions = set()
    for before, after in zip(recs, out, strict=True):
        if not is_tool_calling(before):
            assert after is before
            continue
        names, old = list(offered(after)), list(offered(before))
        assert len(names) == len(set(names)) and set(old) <= set(names) <= pool
        assert len(names) - len(old) == min(2, len(pool - set(old)))
        assert [n for n in names if n in old] == old, "the offered tools keep their order"
        positions |= {k for k, n in enumerate(names) if n not in old}
        assert after["tools"][names.index(old[0])] == before["tools"][0], "specs copied whole"
    assert stats.distractors_added == 2 * 19 + 1 * 6  # 19 records offer ≤ 2 of the 4 tools, 6 offer 3
    assert len(positions) > 1, "distractors land at random positions, not always last"


def test_irrelevance_copies_call_nothing_and_offer_no_removed_tool():
    recs = records()
    out, stats = run(irrelevance=1.0, recs=recs)
    copies = out[len(recs):]
    by_id = {r["id"]: r for r in recs}
    assert stats.irrelevance == len(copies) > 0 and stats.no_fit_text == REFUSAL, "the data's own wording"
    for c in copies:
        source = by_id[c["id"].removesuffix("#no-fit")]
        prompt, target = split_prompt_target(c)
        removed = {x["function"]["name"] for x in split_prompt_target(source)[1]["tool_calls"]}
        assert target == {"role": "assistant", "content": REFUSAL} and prompt == split_prompt_target(source)[0]
        assert c["tools"] and not removed & set(offered(c))
        assert c["meta"] == {"source": "test", "augment": ["irrelevance"]}
    sources = {c["id"].removesuffix("#no-fit") for c in copies}
    # Records whose every offered tool is called give no copy without distractors (the get_time-only and the
    # parallel calls), nor does a target that follows a tool result.
    assert len(sources) == 12 and not any(by_id[s]["tools"] == [TIME] for s in sources)
    assert not any(by_id[s]["messages"][-2]["role"] == "tool" for s in sources)
    assert out[:len(recs)] == recs and all(a is b for a, b in zip(out, recs, strict=False))


def test_irrelevance_with_distractors_offers_distractors_when_nothing_else_is_left():
    recs = records()
    out, stats = run(irrelevance=1.0, distractors=1, recs=recs)
    copies = out[len(recs):]
    time_only = [c for c in copies if "Time in" in c["messages"][1]["content"]]
    assert len(copies) == stats.irrelevance == 24 and len(time_only) == 6  # 25 tool-calling, 1 ends on a tool result
    for c in time_only:
        assert len(c["tools"]) == 1 and c["tools"][0]["function"]["name"] != "get_time"
        assert c["meta"]["augment"] == ["irrelevance", "distractors:1"]


def test_irrelevance_share_and_fixed_sentence():
    recs = [r for r in records() if r["messages"][-1].get("content") != REFUSAL]  # no wording of its own
    out, stats = run(irrelevance=0.1, recs=recs)
    assert stats.no_fit_text == NO_FIT_TEXT and stats.irrelevance == 3  # round(0.1 × 25)
    assert [r["messages"][-1]["content"] for r in out[len(recs):]] == [NO_FIT_TEXT] * 3
    once = recs + [rec(99, [WEATHER], user("Sing"), says(text="La la la."))]
    assert no_fit_text(once) == NO_FIT_TEXT, "a text answer seen once is not the agent's rule"


def test_masking_renames_alike_in_tools_calls_and_results():
    recs = records()
    out, stats = run(mask_names=1.0, recs=recs)
    assert stats.masked == 25
    for before, after in zip(recs, out, strict=True):
        if not is_tool_calling(before):
            continue
        assert_target_valid(after)
        # Descriptions are the only way back: map each masked tool to its original by description.
        back = {t["function"]["name"]: t["function"] for t in before["tools"]}
        by_desc = {f["description"]: f for f in back.values()}
        fmap = {}
        for t_new, t_old in zip(after["tools"], before["tools"], strict=True):
            new, old = t_new["function"], t_old["function"]
            assert re.fullmatch(r"func_[a-z0-9]{4}", new["name"]) and by_desc[new["description"]] is old
            fmap[old["name"]] = new["name"]
            p_new, p_old = new["parameters"], old["parameters"]
            assert all(re.fullmatch(r"arg_[a-z0-9]{3}", k) for k in p_new["properties"])
            assert list(p_new["properties"].values()) == list(p_old["properties"].values()), "schemas kept"
            assert {k: v for k, v in p_new.items() if k not in ("properties", "required", "anyOf")} == \
                {k: v for k, v in p_old.items() if k not in ("properties", "required", "anyOf")}
            assert t_new["type"] == "function"
        assert len(set(fmap.values())) == len(fmap)
        for m_new, m_old in zip(after["messages"], before["messages"], strict=True):
            for c_new, c_old in zip(m_new.get("tool_calls") or [], m_old.get("tool_calls") or [], strict=True):
                name = c_old["function"]["name"]
                assert c_new["function"]["name"] == fmap.get(name, name) and c_new["id"] == c_old["id"]
                args_new, args_old = (json.loads(c["function"]["arguments"]) for c in (c_new, c_old))
                assert list(args_new.values()) == list(args_old.values())
            if m_old.get("name"):
                assert m_new["name"] == fmap[m_old["name"]]


def test_masking_renames_nested_required_lists():
    r = rec(0, [EMAIL], user("Mail Bob"), says(call("send_email", {"cc": "bob@x.org", "subject": "s",
                                                                     "body": {"text": "t"}})))
    (masked,), _ = run(mask_names=1.0, recs=[r])
    params = masked["tools"][0]["function"]["parameters"]
    pmap = dict(zip(EMAIL["function"]["parameters"]["properties"], params["properties"], strict=True))
    assert params["required"] == [pmap["subject"]]
    assert params["anyOf"] == [{"required": [pmap["to"]]}, {"required": [pmap["cc"]]}]
    assert params["properties"][pmap["body"]]["required"] == ["text"], "a nested object's own keys stay"
    args = json.loads(split_prompt_target(masked)[1]["tool_calls"][0]["function"]["arguments"])
    assert args == {pmap["cc"]: "bob@x.org", pmap["subject"]: "s", pmap["body"]: {"text": "t"}}
    jsonschema.validate(args, params)
    with pytest.raises(jsonschema.ValidationError):  # the anyOf still bites under the new names
        jsonschema.validate({pmap["subject"]: "s"}, params)


def test_deterministic_for_a_seed():
    assert run(3, **ALL_ON) == run(3, **ALL_ON)
    assert run(3, **ALL_ON)[0] != run(4, **ALL_ON)[0]
    # Which records get masked does not depend on the other knobs.
    masked = {r["id"] for r in run(3, mask_names=0.5)[0] if "mask" in r.get("meta", {}).get("augment", [])}
    assert masked == {r["id"] for r in run(3, **ALL_ON)[0] if "mask" in r.get("meta", {}).get("augment", [])}


RECIPE = """\
name: t
model: {base: some/model}
data: {train: train.jsonl}
output: {dir: out}
"""


def _recipe(tmp_path, text=RECIPE):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


def test_recipe_keys_load_and_default_off(tmp_path):
    r = load_recipe(_recipe(tmp_path))
    assert r.augment.model_dump() == {**AUGMENT_DEFAULTS, "seed": None}
    text = RECIPE + "augment: {shuffle_tools: true, distractors: 3, irrelevance: 0.1, mask_names: 0.25, seed: 5}\n"
    a = load_recipe(_recipe(tmp_path, text)).augment
    assert (a.shuffle_tools, a.distractors, a.irrelevance, a.mask_names, a.seed) == (True, 3, 0.1, 0.25, 5)
    assert load_recipe(_recipe(tmp_path), ["augment.distractors=4"]).augment.distractors == 4


def test_recipe_rejects_bad_values_all_at_once(tmp_path):
    text = RECIPE + "augment:\n  distractors: -1\n  irrelevance: 1.5\n  mask_names: -0.1\n  shufle_tools: true\n"
    with pytest.raises(SlmtuneError) as e:
        load_recipe(_recipe(tmp_path, text))
    msg = str(e.value)
    assert "r.yaml:6: `augment.distractors`: Input should be greater than or equal to 0, got -1" in msg, msg
    assert "r.yaml:7: `augment.irrelevance`: Input should be less than or equal to 1, got 1.5" in msg
    assert "`augment.mask_names`" in msg and "did you mean `shuffle_tools`?" in msg


def test_prepare_augments_training_records_only(tmp_path):
    """Through `prepare` with the tiny tokenizer: the copies render and carry loss, eval is untouched, the stats
    ride on `Prepared`, and `augment.seed` defaults to `train.seed`."""
    from slmtune.io import write_jsonl
    from slmtune.synthetic.tiny import build_tokenizer
    from slmtune.train.dataset import prepare

    tok = tmp_path / "tok"
    build_tokenizer().save_pretrained(tok)
    (tok / "config.json").write_text('{"model_type": "llama"}')
    write_jsonl(tmp_path / "train.jsonl", records())
    write_jsonl(tmp_path / "eval.jsonl", records())
    data = "train.jsonl, eval: eval.jsonl, max_length: 1024}"
    text = RECIPE.replace("some/model", str(tok)).replace("train.jsonl}", data)
    (tmp_path / "r.yaml").write_text(text + "augment: {shuffle_tools: true, distractors: 1, irrelevance: 0.2, "
                                            "mask_names: 0.2}\ntrain: {seed: 3}\n")
    prep = prepare(load_recipe(tmp_path / "r.yaml"))
    assert prep.augment.irrelevance == 5 and prep.augment.masked == 5 and prep.augment.shuffled > 0
    assert len(prep.train) == 34 and [e.record for e in prep.eval] == records()
    copies = prep.train[29:]
    assert all(e.where.endswith("(no-fit copy)") and e.id.endswith("#no-fit") and e.enc.n_target > 0 for e in copies)
    expected = augment(items(), AugmentSection(shuffle_tools=True, distractors=1, irrelevance=0.2, mask_names=0.2), 3)
    assert [e.record for e in prep.train] == [r for _, r in expected[0]] and prep.augment == expected[1]
    assert prep.train[0].where == f"{tmp_path / 'train.jsonl'}:1"
