"""A task's failure stays the task's, even when its traceback cannot be written (no model, no training)."""

import logging

from slmtune.flywheel.loop import FlywheelConfig, _isolated

TASK = {"name": "classification-sentiment", "category": "classification", "n_train": 40, "n_eval": 8}


def test_a_traceback_that_cannot_be_written_keeps_the_reason_and_the_round(tmp_path, caplog):
    round_dir = tmp_path / "round-001"
    round_dir.mkdir()
    (round_dir / "failures").write_text("a file where the folder goes: writing beneath it fails as a full disk does")
    with caplog.at_level(logging.WARNING, logger="slmtune.flywheel.loop"):
        out = _isolated(TASK, round_dir, None, tmp_path, FlywheelConfig(), lambda *a: None, None, [TASK["name"]])
    assert out.status == "failed" and out.stage == "plan" and "no such recipe file" in out.reason  # no plan yaml
    assert "could not write" in caplog.text and "classification-sentiment" in caplog.text
