"""Selective answering (`slmtune.eval.selective`) on crafted confidences and verdicts with hand-computed
numbers: the risk–coverage curve, the AUROC, the Clopper–Pearson bound and the calibrated threshold."""

import pytest

from slmtune.eval.selective import auroc, calibrate, cross_fit, curve, lower_bound, record_scores, selective


def test_curve_and_auroc_by_hand():
    conf, scores = [0.9, 0.8, 0.8, 0.3], [1.0, 1.0, 0.0, 0.0]
    assert [(p["threshold"], p["coverage"], p["accuracy"], p["agree"]) for p in curve(conf, scores)] == [
        (0.9, 0.25, 1.0, 1), (0.8, 0.75, pytest.approx(2 / 3, abs=1e-6), 2), (0.3, 1.0, 0.5, 2)]
    # agreeing {0.9, 0.8} vs not {0.8, 0.3}: 0.9 beats both, 0.8 ties 0.8 (half) and beats 0.3 → 3.5 of 4
    assert auroc(conf, scores) == 0.875
    assert auroc([0.5, 0.6], [1.0, 1.0]) is None  # nothing to separate


def test_per_record_key_metric_from_verdicts():
    verdicts = [{"exact_match": [1.0]}, {"exact_match": [0.0]}, {"label_accuracy": [1.0]}]
    assert record_scores(verdicts, "exact_match") == [1.0, 0.0, 0.0]


def test_clopper_pearson_lower_bound():
    # k = n: the bound is (1 - level) ** (1 / n); 22 of 22 is the least that certifies 0.9, 45 of 45 for 0.95
    assert lower_bound(10, 10) == pytest.approx(0.1 ** (1 / 10))
    assert lower_bound(21, 21) < 0.9 <= lower_bound(22, 22)
    assert lower_bound(44, 44) < 0.95 <= lower_bound(45, 45)
    assert lower_bound(0, 5) == 0.0
    assert 0.6 < lower_bound(9, 10) < 0.9  # one miss in ten: well below the rate 0.9


def test_calibration_picks_the_lowest_threshold_whose_bound_reaches_the_target():
    # 25 agreeing answers at confidence 0.50 … 0.74, 5 disagreeing at 0.10 … 0.14
    conf = [0.5 + i / 100 for i in range(25)] + [0.1 + i / 100 for i in range(5)]
    scores = [1.0] * 25 + [0.0] * 5
    got = calibrate(conf, scores, 0.9)
    assert got["threshold"] == 0.5 and got["answered"] == 25 and got["n"] == 30
    assert got["coverage"] == pytest.approx(25 / 30, abs=1e-6) and got["accuracy"] == 1.0
    assert got["lower_bound"] == pytest.approx(0.1 ** (1 / 25), abs=1e-6)
    # one disagreeing answer among the confident ones: the threshold rises above it, coverage falls
    scores2 = list(scores)
    scores2[2] = 0.0  # confidence 0.52
    got2 = calibrate(conf, scores2, 0.9)
    assert got2["threshold"] == 0.53 and got2["answered"] == 22 and got2["accuracy"] == 1.0


def test_too_few_records_earn_no_threshold():
    got = calibrate([0.9] * 10, [1.0] * 10, 0.9)  # 10 of 10 certifies only 0.79
    assert got["threshold"] is None and got["coverage"] == 0.0 and got["answered"] == 0
    assert got["lower_bound"] == pytest.approx(0.1 ** (1 / 10), abs=1e-6)
    assert "no threshold reaches 0.9" in got["reason"]
    assert calibrate([], [], 0.9)["reason"] == "no records"
    text = calibrate([0.9] * 50, [1.0] * 50, 0.9, text_task=True)
    assert text["threshold"] is None and "free-text" in text["reason"]


def test_selective_needs_a_confidence_for_every_record():
    assert selective([0.5, None], [1.0, 0.0]) is None  # predictions and teacher rows have none
    sel = selective([0.9, 0.2], [1.0, 0.0], target=0.5)
    assert sel["auroc"] == 1.0 and sel["target"] == 0.5 and len(sel["curve"]) == 2
    assert sel["cross_fit"] == cross_fit([0.9, 0.2], [1.0, 0.0], 0.5)  # the flywheel's coverage, from the report


def test_cross_fitting_judges_each_part_by_the_other_parts_threshold():
    # 50 records: the 48 most confident agree; the 2 least confident (positions 0 and 1) do not
    conf = [0.01, 0.02] + [0.5 + i / 100 for i in range(48)]
    scores = [0.0, 0.0] + [1.0] * 48
    got = cross_fit(conf, scores, 0.9)
    # each part (25 records, 24 agreeing + 1 not) is judged by the other part's threshold: its 24 agreeing answers
    # certify 0.9 (0.1^(1/24) = 0.908) down to their lowest confidence, 0.51 for the odd part and 0.50 for the
    # even one. The even part, judged by 0.51, defers its 0.50 record; the odd part, judged by 0.50, answers its
    # 24; both defer their disagreeing record: 47 of 50 answered, all agreeing
    assert got == {"folds": 2, "coverage": 0.94, "accuracy": 1.0, "answered": 47, "n": 50}
    assert cross_fit(conf[:20], scores[:20], 0.9)["answered"] == 0  # 10 per part certify nothing


def test_answers_serving_would_not_hand_the_agent_are_never_answered():
    """On a tool-calling task a text answer goes to the LLM whatever its confidence: 30 right abstentions at
    confidence 0.99 do not buy a route for the calls (here 5 of 10 right)."""
    from slmtune.eval.selective import servable

    text, call = {"role": "assistant", "content": "No tool fits."}, {"role": "assistant", "tool_calls": [{}]}
    assert not servable("tool_calling", text) and servable("tool_calling", call) and servable("classification", text)
    conf = [0.99] * 30 + [0.5 + i / 100 for i in range(10)]
    scores = [1.0] * 30 + [1.0, 0.0] * 5
    serves = [False] * 30 + [True] * 10
    assert calibrate(conf, scores, 0.9)["threshold"] is not None  # counting the abstentions: 30 of 30 certify
    sel = selective(conf, scores, 0.9, serves=serves)
    assert sel["threshold"] is None and sel["coverage"] == 0.0 and sel["auroc"] == auroc(conf, scores)
    assert sel["curve"][-1]["answered"] == 10 and sel["curve"][-1]["coverage"] == 0.25


def test_an_answer_holding_a_placeholder_its_prompt_does_not_is_not_servable():
    from slmtune.eval.selective import servable

    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "login", "arguments": '{"password": "<SECRET_1>"}'}}]}
    assert not servable("tool_calling", call, [{"role": "user", "content": "my password is hunter2"}])
    assert servable("tool_calling", call, [{"role": "user", "content": "my password is <SECRET_1>"}])
    assert not servable("extraction", {"role": "assistant", "content": '{"email": "<EMAIL_1>"}'}, [])
