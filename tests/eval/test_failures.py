"""Failure kinds on crafted predictions: one prediction per kind lands on exactly that kind, correct answers (any key
order, parallel calls in any order) on None, and the report counts kinds and keeps two examples each."""


import pytest
from test_metrics import call, msg

from slmtune.eval.failures import KINDS, classify, diagnose, failure_report, show
from slmtune.render import parse_output

PARAMS = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "default": "celsius"},
    "days": {"type": "integer"}, "hourly": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": PARAMS}}
         for name in ("get_weather", "get_forecast")]
SPECS = {"get_weather": PARAMS, "get_forecast": PARAMS}




PARIS = msg(call("get_weather", city="Paris", days=3))
TWO = msg(call("get_weather", city="Paris"), call("get_forecast", city="Rome", days=2))
# kind: (prediction, reference) — each prediction is wrong in that one way only
CASES = {
    "no_call": (msg(content="It is sunny in Paris."), PARIS),
    "unwanted_call": (msg(call("get_weather", city="Paris")), msg(content="Which city do you mean?")),
    "unparsed": (parse_output('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'), PARIS),
    "wrong_function": (msg(call("get_forecast", city="Paris", days=3)), PARIS),
    "wrong_count": (msg(call("get_weather", city="Paris", days=3), call("get_weather", city="Paris", days=3)),
                    PARIS),
    "missing_argument": (msg(call("get_weather", city="Paris")), PARIS),
    "extra_argument": (msg(call("get_weather", city="Paris", days=3, hourly=True)), PARIS),
    "wrong_type": (msg(call("get_weather", city="Paris", days="3")), PARIS),
    "wrong_value": (msg(call("get_weather", city="Paris", days=4)), PARIS),
}


def test_cases_cover_every_kind():
    assert list(CASES) == list(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_one_crafted_prediction_per_kind(kind):
    pred, ref = CASES[kind]
    assert classify(pred, ref, SPECS) == kind


def test_correct_predictions_are_none():
    # key order, 3 vs 3.0, parallel calls in another order: all as the teacher did
    assert classify(msg(call("get_weather", days=3.0, city="Paris")), PARIS, SPECS) is None
    swapped = msg(call("get_forecast", days=2, city="Rome"), call("get_weather", city="Paris"))
    assert classify(swapped, TWO, SPECS) is None
    assert classify(msg(content="Which city?"), msg(content="Which city do you mean?"), SPECS) is None
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"days": 3, "city": "Paris"}}\n</tool_call>'
    assert classify(parse_output(text), PARIS, SPECS) is None
    # an argument on one side only with the schema default as its value counts as absent, either way
    assert classify(msg(call("get_weather", city="Paris", days=3, unit="celsius")), PARIS, SPECS) is None
    assert classify(PARIS, msg(call("get_weather", city="Paris", days=3, unit="celsius")), SPECS) is None
    assert classify(msg(call("get_weather", city="Paris", days=3, unit="kelvin")), PARIS, SPECS) == "extra_argument"


def test_precedence_picks_the_earliest_kind():
    # a missing call to get_forecast and a wrong value in get_weather: the count comes first
    assert classify(msg(call("get_weather", city="Oslo")), TWO, SPECS) == "wrong_count"
    # one unparsed call beside a wrong function: unparsed comes first
    pred = msg(call("get_time"), {"function": {"name": "get_weather", "arguments": "[1]"}})
    assert classify(pred, TWO, SPECS) == "unparsed"
    # missing beats type beats value, across the aligned pairs of parallel calls
    pred = msg(call("get_forecast", city="Rome", days="2"), call("get_weather", city="Nice"))
    assert classify(pred, TWO, SPECS) == "wrong_type"
    pred = msg(call("get_forecast", city="Rome"), call("get_weather", city="Nice"))
    assert classify(pred, TWO, SPECS) == "missing_argument"
    # the teacher answered in text: even a broken call is an unwanted call
    assert classify(CASES["unparsed"][0], msg(content="Which city?"), SPECS) == "unwanted_call"
    assert classify(msg(content=None), PARIS, SPECS) == "no_call"


def test_types_follow_the_schema_else_the_teacher():
    assert classify(msg(call("get_weather", city="Paris", days=3.5)), PARIS, SPECS) == "wrong_type"  # integer
    assert classify(msg(call("get_weather", city="Paris", days=True)), PARIS, SPECS) == "wrong_type"  # not a number
    # no schema: the teacher's value decides, integers and floats being one kind of number
    assert classify(msg(call("get_weather", city="Paris", days=3.5)), PARIS, {}) == "wrong_value"
    assert classify(msg(call("get_weather", city="Paris", days=[3])), PARIS, {}) == "wrong_type"


def test_details_name_the_failure():
    assert diagnose(*CASES["wrong_type"], SPECS)[1] == 'get_weather.days: string "3", wants integer'
    assert diagnose(*CASES["wrong_value"], SPECS)[1] == "get_weather.days: 4, the teacher gave 3"
    assert diagnose(msg(call("get_time")), PARIS, SPECS)[1] == "called get_time, not an offered tool"
    assert diagnose(*CASES["wrong_function"], SPECS)[1] == "called get_forecast; the teacher called get_weather"
    assert diagnose(*CASES["no_call"], SPECS)[1] == "answered in text; the teacher made 1 call"


def record(rid, target):
    return {"id": rid, "tools": TOOLS, "messages": [{"role": "user", "content": f"question {rid}"}, target]}


def test_failure_report_counts_and_keeps_two_examples():
    long_city = "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch " * 4
    preds = [CASES["wrong_value"][0]] * 3 + [msg(call("get_weather", city=long_city, days=3)),
                                             CASES["no_call"][0], PARIS]
    recs = [record(f"r{i}", PARIS) for i in range(len(preds))]
    rep = failure_report(recs, [{"message": m} for m in preds])
    assert rep["n"] == 6 and rep["failed"] == 5
    assert list(rep["kinds"]) == ["wrong_value", "no_call"]  # most frequent first
    assert rep["kinds"]["wrong_value"]["count"] == 4 and rep["kinds"]["no_call"]["count"] == 1
    ex = rep["kinds"]["wrong_value"]["examples"]
    assert [e["id"] for e in ex] == ["r0", "r1"]  # capped at two, in data order
    assert ex[0] == {"id": "r0", "expected": 'get_weather({"city": "Paris", "days": 3})',
                     "got": 'get_weather({"city": "Paris", "days": 4})',
                     "detail": "get_weather.days: 4, the teacher gave 3"}
    assert rep["kinds"]["no_call"]["examples"][0]["got"] == '"It is sunny in Paris."'
    # long strings are cut to 120 characters
    got = show(preds[3])
    assert len(got) == 120 and got.endswith("…")
    assert failure_report([], []) == {"n": 0, "failed": 0, "kinds": {}}
