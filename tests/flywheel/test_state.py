"""Which round a run works in, after the ways a killed run can leave the work dir (no model, no training)."""

from slmtune.flywheel.state import pick_round
from slmtune.io import write_json

EMPTY = {"version": 1, "inputs": [], "rounds": [], "tasks": {}}


def test_a_round_killed_before_its_round_json_is_taken_over_not_skipped(tmp_path):
    (tmp_path / "round-001").mkdir()  # what a kill while writing round.json leaves once its temp is cleaned
    assert pick_round(tmp_path, EMPTY, "fp-a") == (tmp_path / "round-001", None)


def test_a_killed_round_resumes_with_the_same_inputs_and_is_left_with_new_ones(tmp_path):
    write_json(tmp_path / "round-001" / "round.json", {"inputs_fingerprint": "fp-a"})
    assert pick_round(tmp_path, EMPTY, "fp-a") == (tmp_path / "round-001", None)
    assert pick_round(tmp_path, EMPTY, "fp-b") == (tmp_path / "round-002", None)


def test_after_a_finished_round_an_empty_next_round_is_taken_over(tmp_path):
    write_json(tmp_path / "round-001" / "round.json", {"inputs_fingerprint": "fp-a"})
    (tmp_path / "round-002").mkdir()
    registry = EMPTY | {"rounds": ["round-001"]}
    assert pick_round(tmp_path, registry, "fp-b") == (tmp_path / "round-002", tmp_path / "round-001")
    assert pick_round(tmp_path, registry | {"rounds": ["round-001", "round-002"]}, "fp-b") == (
        tmp_path / "round-003", tmp_path / "round-002")
