"""Metric functions on hand-written cases whose answers are worked out by hand in the comments."""

import json

import pytest

from slmtune.eval.metrics import aggregate, label_of, parse_json_text, rouge_l, score, token_f1, values_equal
from slmtune.render import parse_output

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"},
                                           "days": {"type": "integer"}}, "required": ["city"]}
SCHEMA = {"type": "tool_calls", "tools": [{"type": "function", "function": {"name": "get_weather",
                                                                           "parameters": PARAMS}}]}


def call(name, **args):
    return {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def msg(*calls, content=None):
    m = {"role": "assistant", "content": content}
    if calls:
        m["tool_calls"] = list(calls)
    return m


def tool_score(pred, ref):
    return score("tool_calling", SCHEMA, pred, ref)


def test_values_compare_type_aware():
    assert values_equal(5, 5.0) and values_equal({"a": 1, "b": [1, 2]}, {"b": [1.0, 2], "a": 1})
    assert not values_equal("5", 5) and not values_equal(True, 1) and not values_equal([1, 2], [2, 1])
    assert not values_equal(None, 0) and values_equal(None, None)


def test_exact_call_scores_one_everywhere():
    v = tool_score(msg(call("get_weather", city="Paris")), msg(call("get_weather", city="Paris")))
    assert v == {"parse_rate": [1.0], "schema_valid_rate": [1.0], "tool_name_accuracy": [1.0],
                 "arguments_exact_match": [1.0], "arguments_f1": [1.0], "exact_match": [1.0]}


def test_wrong_tool():
    v = tool_score(msg(call("get_time", city="Paris")), msg(call("get_weather", city="Paris")))
    # parses, but the tool is unknown to the schema; the name is wrong so no argument credit either
    assert v["parse_rate"] == [1.0] and v["schema_valid_rate"] == [0.0]
    assert v["tool_name_accuracy"] == [0.0] and v["arguments_exact_match"] == [0.0]
    assert v["arguments_f1"] == [0.0] and v["exact_match"] == [0.0]


def test_missing_required_argument():
    v = tool_score(msg(call("get_weather", unit="celsius")), msg(call("get_weather", city="Paris", unit="celsius")))
    assert v["schema_valid_rate"] == [0.0]  # city is required
    assert v["tool_name_accuracy"] == [1.0] and v["arguments_exact_match"] == [0.0]
    assert v["arguments_f1"] == [pytest.approx(2 / 3)]  # tp 1 (unit); 2·1 / (1 pred + 2 ref)
    assert v["exact_match"] == [0.0]


def test_extra_argument():
    v = tool_score(msg(call("get_weather", city="Paris", unit="celsius")), msg(call("get_weather", city="Paris")))
    assert v["schema_valid_rate"] == [1.0]  # unit is a declared, optional parameter
    assert v["arguments_exact_match"] == [0.0] and v["arguments_f1"] == [pytest.approx(2 / 3)]
    strict = {"type": "tool_calls", "tools": [{"function": {"name": "get_weather", "parameters": {
        **PARAMS, "additionalProperties": False}}}]}
    v = score("tool_calling", strict, msg(call("get_weather", city="Paris", mood="happy")),
              msg(call("get_weather", city="Paris")))
    assert v["schema_valid_rate"] == [0.0]


def test_string_five_is_not_integer_five_but_float_five_is():
    ref = msg(call("get_weather", city="Paris", days=5))
    v = tool_score(msg(call("get_weather", city="Paris", days="5")), ref)
    assert v["schema_valid_rate"] == [0.0] and v["arguments_exact_match"] == [0.0]
    assert v["arguments_f1"] == [0.5]  # tp 1 (city) of 2 + 2 keys
    v = tool_score(msg(call("get_weather", days=5.0, city="Paris")), ref)  # key order ignored too
    assert v["arguments_exact_match"] == [1.0] and v["exact_match"] == [1.0]


def test_parallel_calls_in_another_order():
    ref = msg(call("get_weather", city="Paris"), call("get_weather", city="Rome", unit="celsius"))
    pred = msg(call("get_weather", city="Rome", unit="celsius"), call("get_weather", city="Paris"))
    v = tool_score(pred, ref)
    assert v["tool_name_accuracy"] == [1.0, 1.0] and v["arguments_exact_match"] == [1.0, 1.0]
    assert v["exact_match"] == [1.0]


def test_missing_and_extra_parallel_calls():
    ref = msg(call("get_weather", city="Paris"), call("get_weather", city="Rome"))
    v = tool_score(msg(call("get_weather", city="Rome")), ref)
    # Rome aligns with Rome; Paris has no partner → 0 on every per-call metric
    assert v["arguments_exact_match"] == [0.0, 1.0] and v["tool_name_accuracy"] == [0.0, 1.0]
    assert v["exact_match"] == [0.0]
    v = tool_score(msg(call("get_weather", city="Paris"), call("get_weather", city="Paris")),
                   msg(call("get_weather", city="Paris")))
    assert v["arguments_exact_match"] == [1.0] and v["exact_match"] == [0.0]  # extra call fails the record


def test_unparseable_text_and_empty_output():
    ref = msg(call("get_weather", city="Paris"))
    for text in ("I think it is sunny in Paris.", "", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n'
                                                      "</tool_call>"):
        v = tool_score(parse_output(text), ref)
        assert v["parse_rate"] == [0.0] and v["schema_valid_rate"] == [0.0], text
        assert v["arguments_exact_match"] == [0.0] and v["exact_match"] == [0.0], text


def test_teacher_answered_without_a_call():
    ref = msg(content="Which city do you mean?")
    assert tool_score(msg(content="Which city?"), ref)["exact_match"] == [1.0]  # no call, as the teacher
    v = tool_score(msg(call("get_weather", city="Paris")), ref)
    assert v["parse_rate"] == [1.0] and v["exact_match"] == [0.0] and v["tool_name_accuracy"] == []


def test_tool_call_text_round_trip_from_model_format():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    v = tool_score(parse_output(text), msg(call("get_weather", city="Paris")))
    assert v["exact_match"] == [1.0] and v["schema_valid_rate"] == [1.0]


def test_extraction_json_in_code_fence_and_field_f1():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    ref = msg(content='{"name": "Ada", "age": 36}')
    v = score("extraction", schema, msg(content='```json\n{"age": 36.0, "name": "Ada"}\n```'), ref)
    assert v == {"parse_rate": [1.0], "schema_valid_rate": [1.0], "fields_f1": [1.0], "exact_match": [1.0]}
    v = score("extraction", schema, msg(content='{"name": "Ada", "age": "36"}'), ref)
    assert v["schema_valid_rate"] == [0.0] and v["fields_f1"] == [0.5] and v["exact_match"] == [0.0]
    for bad in ("", "name: Ada", "```\nnot json\n```"):
        v = score("extraction", schema, msg(content=bad or None), ref)
        assert v == {"parse_rate": [0.0], "schema_valid_rate": [0.0], "fields_f1": [0.0], "exact_match": [0.0]}
    assert parse_json_text("```\n[1, 2]\n```") == [1, 2]


def test_classification_label_case_insensitive_and_enum():
    schema = {"type": "string", "enum": ["negative", "neutral", "positive"]}
    ref = msg(content="positive")
    assert score("classification", schema, msg(content="  Positive\n"), ref) == {
        "parse_rate": [1.0], "schema_valid_rate": [1.0], "label_accuracy": [1.0]}
    assert score("classification", schema, msg(content="great"), ref) == {
        "parse_rate": [1.0], "schema_valid_rate": [0.0], "label_accuracy": [0.0]}
    assert score("classification", schema, msg(content=""), ref)["parse_rate"] == [0.0]
    assert label_of(msg(content='```\n"neutral"\n```')) == "neutral"


def test_text_overlap_metrics():
    assert token_f1("the cat sat", "The cat sat down.") == pytest.approx(6 / 7)  # 3 common of 3 + 4 tokens
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert token_f1("cat the", "the cat") == 1.0 and rouge_l("cat the", "the cat") == 0.5  # LCS 1 of 2 + 2
    assert rouge_l("", "anything") == 0.0 and token_f1("", "") == 1.0
    v = score("summarization", None, msg(content="the cat sat"), msg(content="the cat sat down"))
    assert v["parse_rate"] == [1.0] and v["exact_match"] == [0.0] and "schema_valid_rate" not in v


def test_aggregate_means_over_units_with_counts():
    ref2 = msg(call("get_weather", city="Paris"), call("get_weather", city="Rome"))
    verdicts = [tool_score(msg(call("get_weather", city="Rome")), ref2),           # calls 0, 1
                tool_score(parse_output("nope"), msg(call("get_weather", city="Oslo")))]  # call 0
    agg = aggregate(verdicts, "tool_calling")
    assert agg["parse_rate"] == {"value": 0.5, "count": 2}
    assert agg["arguments_exact_match"] == {"value": pytest.approx(1 / 3, abs=1e-6), "count": 3}
    assert agg["exact_match"] == {"value": 0.0, "count": 2}
    assert aggregate([], "summarization")["rouge_l"] == {"value": None, "count": 0}
