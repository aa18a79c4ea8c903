"""bench_quality's teacher answers: the first acceptable value of every argument, as BFCL's possible answers give it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_quality as bq  # noqa: E402


def test_first_value_takes_the_first_acceptable_value_at_every_depth():
    # each key lists its acceptable values; "" first means the argument may be left out
    possible = {"unit": ["celsius", "fahrenheit"], "days": ["", 3], "where": [{"city": ["Paris"], "zip": [""]}]}
    assert bq.first_value(possible) == {"unit": "celsius", "where": {"city": "Paris"}}


def test_first_value_keeps_a_plain_value_where_a_nested_object_holds_one():
    # live_multiple_121-46-0's ego_info: its acceptable `position` object holds plain numbers, not lists of options
    possible = {"position": [{"lateral": 10.5, "longitudinal": 50}], "orientation": [30]}
    assert bq.first_value(possible) == {"position": {"lateral": 10.5, "longitudinal": 50}, "orientation": 30}
