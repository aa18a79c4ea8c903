"""`flywheel --rl`: RL (`method: grpo`) on each task's SFT winner, evaluated on the same held-out calls as a
candidate of its own, exported only when it ranks higher, reused when nothing it starts from changed."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.synthetic.logs import write_logs

WEATHER, SENTIMENT = "tool_calling-get_weather", "classification-sentiment"


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def rl_rounds(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("rl-stage")
    write_logs(root / "first", 40, seed=3, errands=[WEATHER])
    write_logs(root / "more", 40, seed=4, errands=[SENTIMENT])
    work = root / "work"
    for logs in (root / "first" / "logs", root / "more" / "logs"):
        cli("flywheel", logs, "-w", work, "--gpu", "cpu", "--base-model", tiny_model, "--rl", "--max-steps", 2,
            "--eval-limit", 3, "--min-size", 8, "--min-coverage", 0)
    return work


def summary(round_dir: Path) -> dict:
    return {t["task"]: t for t in json.loads((round_dir / "summary.json").read_text())["tasks"]}


def test_rl_trains_on_the_sft_winner_and_competes_with_it(rl_rounds):
    work = rl_rounds / "round-001"
    (name, task), = summary(work).items()
    sft, rl = task["candidates"]
    assert (sft["recipe"], rl["recipe"]) == (name, f"{name}+rl") and rl["model"] == sft["model"] + "+rl"
    assert sft["status"] == rl["status"] == "trained"
    run = work / "train" / f"{name}+rl"
    manifest = json.loads((run / "manifest.json").read_text())
    recipe = (run / "recipe.yaml").read_text()
    assert manifest["method"] == "grpo" and manifest["base_model"]["path"] == str(work / "train" / name / "model")
    assert "max_steps: 2" in recipe and "lr: 2.0e-05" in recipe  # RL's own `auto` lr, not the SFT plan's
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and len(metrics["rewards"]) == 2
    report = json.loads((work / "eval" / f"{name}+rl" / "report.json").read_text())
    assert report["n"] == 3 and report["models"]["tuned"]["metrics"][task["key_metric"]]["value"] == rl[
        task["key_metric"]]
    score = [((r["coverage"] or 0.0), r[task["key_metric"]] or 0.0) for r in (sft, rl)]
    assert rl["winner"] == (score[1] > score[0]) and sft["winner"] != rl["winner"]  # ties stay with SFT
    assert task["run_dir"].endswith(rl["recipe"] if rl["winner"] else sft["recipe"])


def test_rl_is_reused_when_its_start_and_data_did_not_change(rl_rounds):
    two = summary(rl_rounds / "round-002")
    weather = next(t for n, t in two.items() if "weather" in n)
    assert [r["status"] for r in weather["candidates"]] == ["reused", "reused"]
    new = next(t for n, t in two.items() if "weather" not in n)
    assert [r["status"] for r in new["candidates"]] == ["trained", "trained"]


def test_rl_on_a_lora_winner_is_a_failed_row_not_a_failed_task(tmp_path, tiny_model):
    """`--set method=lora` reaches the SFT recipe only (RL sets its own method); RL refuses a LoRA start, and the
    task keeps its SFT winner, exported."""
    write_logs(tmp_path / "w", 40, seed=3, errands=[WEATHER])
    cli("flywheel", tmp_path / "w" / "logs", "-w", tmp_path / "work", "--gpu", "cpu", "--base-model", tiny_model,
        "--rl", "--max-steps", 2, "--eval-limit", 3, "--min-size", 8, "--min-coverage", 0, "--set", "method=lora")
    (name, task), = summary(tmp_path / "work" / "round-001").items()
    sft, rl = task["candidates"]
    assert task["status"] == "trained" and task["export"] and task["run_dir"].endswith(name)
    assert sft["winner"] and rl["status"] == "failed" and "is a LoRA run" in rl["reason"]
