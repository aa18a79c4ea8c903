"""Output kinds, categories and inferred output schemas, on hand-written answers."""

import json
import random
from collections import Counter

import jsonschema

from slmtune.tasks.schema import (
    categorize,
    infer_json_schema,
    output_kind,
    schema_hash,
    task_schema,
)


def _rec(content=None, tool_calls=None, tools=None, user="hi"):
    target = {"role": "assistant", "content": content}
    if tool_calls:
        target["tool_calls"] = tool_calls
    rec = {"id": "x", "messages": [{"role": "user", "content": user}, target]}
    if tools:
        rec["tools"] = tools
    return rec


def _call(name, args):
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def test_output_kind_of_each_answer_shape():
    assert output_kind({"role": "assistant", "tool_calls": [_call("f", {})]}) == "tool_call"
    assert output_kind({"content": '{"a": 1}'}) == "json"
    assert output_kind({"content": '```json\n{"a": 1}\n```'}) == "json"
    assert output_kind({"content": "```sql\nSELECT 1;\n```"}) == "code"
    assert output_kind({"content": "SELECT id FROM orders LIMIT 5;"}) == "code"
    assert output_kind({"content": "positive"}) == "label"
    assert output_kind({"content": "Thanks for reaching out. I have reversed the duplicate charge today."}) == "text"


TICKETS = [{"category": c, "urgency": u, "product": p, "count": n}
           for c, u, p, n in [("billing", "high", "Router X2", 1), ("technical", "low", "Team Chat", 2),
                              ("account", "medium", "Fitness Band", 3), ("shipping", "high", "Mobile App", 4)] * 6]


def test_extraction_schema_keys_types_enums():
    schema = infer_json_schema(TICKETS)
    assert schema["type"] == "object"
    assert schema["required"] == ["category", "count", "product", "urgency"]
    props = schema["properties"]
    assert props["category"] == {"type": "string", "enum": ["account", "billing", "shipping", "technical"]}
    assert props["urgency"]["enum"] == ["high", "low", "medium"]
    assert props["count"] == {"type": "integer"}
    for obj in TICKETS:
        jsonschema.validate(obj, schema)


def test_high_cardinality_strings_are_not_enums():
    values = [{"name": f"Person {i}"} for i in range(50)]
    assert infer_json_schema(values)["properties"]["name"] == {"type": "string"}


def test_type_conflicts_resolved():
    objs = [{"price": 1}, {"price": 2.5}, {"price": 3}]  # integer + number → number
    assert infer_json_schema(objs)["properties"]["price"] == {"type": "number"}
    objs = [{"email": f"a{i}@x.org"} for i in range(10)] + [{"email": None}]  # null → nullable
    assert infer_json_schema(objs)["properties"]["email"]["type"] == ["string", "null"]
    objs = [{"n": i} for i in range(19)] + [{"n": "twenty"}]  # 95% integer: the majority wins
    assert infer_json_schema(objs)["properties"]["n"] == {"type": "integer"}
    objs = [{"n": i} for i in range(5)] + [{"n": str(i)} for i in range(5)]  # a real split keeps both
    assert infer_json_schema(objs)["properties"]["n"]["type"] == ["integer", "string"]


def test_optional_keys_and_nested_values():
    objs = [{"a": 1, "tags": ["x", "y"], "who": {"id": "u1"}}, {"a": 2, "tags": [], "who": {"id": "u2", "vip": True}}]
    schema = infer_json_schema(objs)
    assert schema["required"] == ["a", "tags", "who"]
    assert schema["properties"]["tags"]["items"]["type"] == "string"
    assert schema["properties"]["who"]["required"] == ["id"]
    assert schema["properties"]["who"]["properties"]["vip"] == {"type": "boolean"}


def test_classification_schema_is_the_label_enum():
    recs = [_rec(lab) for lab in ["positive", "negative", "neutral"] * 5]
    assert task_schema("classification", recs) == {"type": "string", "enum": ["negative", "neutral", "positive"]}


def test_tool_calling_schema_lists_called_tools_with_offered_parameters():
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}},
             {"type": "function", "function": {"name": "never_called", "parameters": {}}}]
    recs = [_rec(tool_calls=[_call("get_weather", {"city": c})], tools=tools) for c in ["Paris", "Oslo"]]
    recs.append(_rec(tool_calls=[_call("unoffered", {"n": 3})], tools=tools))
    schema = task_schema("tool_calling", recs)
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in schema["tools"]}
    assert set(by_name) == {"get_weather", "unoffered"}
    assert by_name["get_weather"] == params
    assert by_name["unoffered"]["properties"]["n"] == {"type": "integer"}


def test_schema_hash_is_independent_of_record_and_key_order():
    objs = list(TICKETS)
    h = schema_hash(infer_json_schema(objs))
    for seed in range(5):
        random.Random(seed).shuffle(objs)
        reordered = [dict(reversed(list(o.items()))) for o in objs]
        assert schema_hash(infer_json_schema(reordered)) == h
    assert len(h) == 16
    assert schema_hash(None) is None
    assert schema_hash({"type": "string", "enum": ["a"]}) != schema_hash({"type": "string", "enum": ["b"]})


def test_categorize_text_tasks():
    long_prompt = "From: Ann\n" + "The router drops the connection every hour. " * 20
    assert categorize(Counter(text=10), Counter(), ["Summarize the thread."] * 10, ["Ann reports x."] * 10) \
        == "summarization"
    assert categorize(Counter(text=10), Counter(), [long_prompt] * 10, ["Ann's router drops."] * 10) \
        == "summarization"
    notes = "Attendees: Ann, Bob, Chen. Budget review moved to Friday; Chen owns the vendor shortlist. " * 3
    assert categorize(Counter(text=10), Counter(), [notes] * 10, ["Budget review moves to Friday."] * 10,
                      ["Summarize the meeting notes in one sentence."] * 10) == "summarization"
    email = "Dear team, here is the plan for the week ..." * 6
    assert categorize(Counter(text=10), Counter(), [notes] * 10, [email] * 10,
                      ["Draft a friendly e-mail to the team."] * 10) == "generation"
    assert categorize(Counter(text=10), Counter(), ["Write a reply to Bob."] * 10, ["Hi Bob, thanks"] * 10) \
        == "generation"
    # short answers that never repeat are not a label set
    assert categorize(Counter(label=30), Counter({f"ok {i}": 1 for i in range(30)}), ["x"] * 30, ["y"] * 30) \
        == "generation"
    assert categorize(Counter(label=30), Counter(yes=15, no=15), ["x"] * 30, ["y"] * 30) == "classification"
