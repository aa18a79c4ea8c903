"""`--candidates`: plan writes a recipe per candidate, the flywheel trains and evaluates each on the same held-out
calls and exports the winner; two tiny models of different widths, through the real CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.synthetic.logs import write_logs

WEATHER, SENTIMENT = "tool_calling-get_weather", "classification-sentiment"


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (result.stderr or "") + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def bake_off(tmp_path_factory):
    from slmtune.synthetic.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bake-off")
    narrow = build_tiny_model(root / "tiny-narrow", seed=1, hidden=64, intermediate=128)
    wide = build_tiny_model(root / "tiny-wide", seed=2, hidden=128, intermediate=256)
    write_logs(root / "first", 40, seed=3, errands=[WEATHER])
    write_logs(root / "more", 40, seed=4, errands=[SENTIMENT])
    (root / "gate.yaml").write_text("parse_rate: {min: 0.0}\n")
    work = root / "work"

    def round_(logs):
        return cli("flywheel", logs, "-w", work, "--gpu", "cpu", "--candidates", f"{narrow},{wide}", "--max-steps",
                   2, "--eval-limit", 3, "--min-size", 8, "--min-coverage", 0, "--gate", root / "gate.yaml")

    round_(root / "first" / "logs")
    round_(root / "more" / "logs")
    return {"work": work, "models": [str(Path(narrow).resolve()), str(Path(wide).resolve())]}


def tasks(round_dir: Path) -> dict:
    return {t["task"]: t for t in json.loads((round_dir / "summary.json").read_text())["tasks"]}


def test_every_candidate_trains_on_the_same_calls_and_the_best_is_exported(bake_off):
    work = bake_off["work"]
    (name, task), = tasks(work / "round-001").items()
    plan = json.loads((work / "round-001" / "plan" / "plan.json").read_text())["planned"][0]
    assert [c["recipe"] for c in plan["candidates"]] == [f"{name}@tiny-narrow.yaml", f"{name}@tiny-wide.yaml"]
    rows = task["candidates"]
    assert [r["model"] for r in rows] == bake_off["models"] and all(r["status"] == "trained" for r in rows)
    for r in rows:  # each trained and evaluated on its own, on the task's one eval set
        assert (work / "round-001" / "train" / r["recipe"] / "metrics.json").is_file()
        report = json.loads((work / "round-001" / "eval" / r["recipe"] / "report.json").read_text())
        assert report["n"] == 3 and report["models"]["tuned"]["metrics"][task["key_metric"]]["value"] == r[
            task["key_metric"]]
    best = max(rows, key=lambda r: (r["coverage"] or 0.0, r[task["key_metric"]] or 0.0))
    assert [r["winner"] for r in rows] == [r is best for r in rows]
    assert task["run_dir"].endswith(best["recipe"])
    manifest = json.loads((Path(task["export"]) / "slmtune.json").read_text())
    assert manifest["base_model"]["name"] == best["model"] and manifest["bake_off"] == rows
    card = (Path(task["export"]) / "README.md").read_text()
    assert "## Candidates" in card and all(m in card for m in bake_off["models"])
    assert json.loads((work / "round-001" / "round.json").read_text())["outcome"]["bake_off"] == {name: rows}


def test_a_candidate_whose_data_did_not_change_is_not_retrained(bake_off):
    work = bake_off["work"]
    one, two = tasks(work / "round-001"), tasks(work / "round-002")
    (weather,) = one
    assert set(two) > {weather}  # round 2 brought a second errand
    assert [r["status"] for r in two[weather]["candidates"]] == ["reused", "reused"]
    new = next(t for n, t in two.items() if n != weather)
    assert [r["status"] for r in new["candidates"]] == ["trained", "trained"]


def test_bad_candidates_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "-o", str(tmp_path / "r"), "--candidates",
                                      "smollm2-135m,no-such-model"])
    assert result.exit_code != 0 and "no-such-model" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "-o", str(tmp_path / "r"), "--candidates", "auto",
                                      "--base-model", "smollm2-135m"])
    assert result.exit_code != 0 and "--candidates" in result.output
