"""`slmtune flywheel` end to end through the CLI on the tiny model: two rounds, reuse, pinned eval sets, resume."""

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.export.router import route
from slmtune.synthetic.logs import write_logs
from slmtune.train.runfiles import run_weights

WEATHER, SENTIMENT = "tool_calling-get_weather", "classification-sentiment"


def cli(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + (result.stderr or "") + repr(result.exception)
    return result


def flywheel(logs, workdir, model, *extra):
    """A round of the tiny model, which earns no route on its own (2 steps, 3 eval records): `--min-coverage 0`
    routes every task the gate exports (the calibrated routing is `test_a_task_routes_only_when_...`)."""
    return cli("flywheel", logs, "-w", workdir, "--gpu", "cpu", "--base-model", model, "--max-steps", 2,
               "--eval-limit", 3, "--min-size", 8, "--min-coverage", 0, *extra)


def summary(round_dir: Path) -> dict:
    return {t["task"]: t for t in json.loads((round_dir / "summary.json").read_text())["tasks"]}


@pytest.fixture(scope="module")
def rounds(tiny_model, tmp_path_factory):
    """Round 1 on two errands; round 2 adds logs of the weather errand only."""
    root = tmp_path_factory.mktemp("flywheel")
    write_logs(root / "first", 56, seed=3, errands=[WEATHER, SENTIMENT])
    write_logs(root / "more", 24, seed=4, errands=[WEATHER])
    gate = root / "gate.yaml"
    gate.write_text("parse_rate: {min: 0.0}\n")  # the tiny model learns little in 2 steps: gate on nothing
    work = root / "work"
    one = flywheel(root / "first" / "logs", work, tiny_model, "--gate", gate)
    one_summary = summary(work / "round-001")
    manifests = {t["task"]: json.loads((Path(t["export"]) / "slmtune.json").read_text()) for t in one_summary.values()}
    two = flywheel(root / "more" / "logs", work, tiny_model, "--gate", gate)
    return {"root": root, "work": work, "model": tiny_model, "gate": gate, "out1": one.output, "out2": two.output,
            "s1": one_summary, "manifests": manifests}


def test_round_one_trains_evaluates_and_exports_every_task(rounds):
    work, s1 = rounds["work"], rounds["s1"]
    assert len(s1) == 2 and {t["category"] for t in s1.values()} == {"tool_calling", "classification"}
    assert all(t["status"] == "trained" and t["gate_passed"] and t["export"] for t in s1.values())
    for t in s1.values():
        meta = rounds["manifests"][t["task"]]
        assert f"task:{t['task']}" in meta["tags"] and meta["flywheel"]["round"] == "round-001"
        assert meta["curate"]["records_in"] > 0 and meta["eval"]["n"] == 3
    for stage in ("ingest", "curate", "cluster", "tasks", "plan"):
        assert (work / "round-001" / stage / "stage.done.json").is_file()
    assert "flywheel round-001" in rounds["out1"] and "exports:" in rounds["out1"]
    assert "{'loss'" not in rounds["out1"] and "loss" in (work / "flywheel.log").read_text()


def test_round_two_retrains_only_the_changed_task_and_keeps_eval_sets(rounds):
    work = rounds["work"]
    s2 = summary(work / "round-002")
    weather = next(n for n, t in s2.items() if t["category"] == "tool_calling")
    sentiment = next(n for n, t in s2.items() if t["category"] == "classification")
    assert s2[weather]["status"] == "trained" and s2[weather]["trained_in"] == "round-002"
    assert s2[sentiment]["status"] == "reused" and s2[sentiment]["trained_in"] == "round-001"
    assert s2[sentiment]["run_dir"] == rounds["s1"][sentiment]["run_dir"]
    assert s2[weather]["n_train"] > rounds["s1"][weather]["n_train"]
    for name in (weather, sentiment):  # eval sets pinned in round 1, byte for byte
        one = (work / "round-001" / "tasks" / name / "eval.jsonl").read_bytes()
        assert one == (work / "round-002" / "tasks" / name / "eval.jsonl").read_bytes()
    train1 = (work / "round-001" / "tasks" / sentiment / "train.jsonl").read_bytes()
    assert train1 == (work / "round-002" / "tasks" / sentiment / "train.jsonl").read_bytes()
    eval_ids = {json.loads(x)["id"] for x in (work / "round-002" / "tasks" / weather / "eval.jsonl").open()}
    train_ids = {json.loads(x)["id"] for x in (work / "round-002" / "tasks" / weather / "train.jsonl").open()}
    assert eval_ids and not eval_ids & train_ids, "no eval record leaks into train"
    comparison = json.loads((work / "round-002" / "comparison.json").read_text())
    assert comparison["previous"] == "round-001"
    rows = {r["task"]: r for r in comparison["tasks"]}
    assert rows[weather]["n_train_before"] == rounds["s1"][weather]["n_train"]
    assert "vs round-001" in rounds["out2"]


def test_router_names_a_checkpoint_per_exported_task(rounds):
    router = json.loads((rounds["work"] / "router.json").read_text())
    assert router["fallback"] == "llm" and router["round"] == "round-002" and len(router["routes"]) == 2
    for r in router["routes"]:  # 3 eval records calibrate nothing: no threshold, nothing answered cross-fit
        assert (r["threshold"], r["target"], r["coverage"]) == (None, 0.95, 0.0)
    tools = next(r for r in router["routes"] if r["category"] == "tool_calling")
    assert tools["match"]["tools"] == ["get_weather"] and Path(tools["checkpoint"], "slmtune.json").is_file()
    text = next(r for r in router["routes"] if r["category"] == "classification")
    assert text["match"]["centroid_terms"] and text["match"]["system_fingerprints"]
    ask = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [{"type": "function", "function":
                                                                                     {"name": "get_weather"}}]}
    assert route(ask, router)["task"] == tools["task"]
    assert route({"messages": [{"role": "user", "content": "write me a poem"}]}, router) is None


def test_rerun_with_the_same_logs_redoes_nothing(rounds):
    work = rounds["work"]
    markers = {p: p.stat().st_mtime_ns for p in (work / "round-002").rglob("stage.done.json")}
    flywheel(rounds["root"] / "more" / "logs", work, rounds["model"], "--gate", rounds["gate"])
    assert not (work / "round-003").exists()
    assert markers == {p: p.stat().st_mtime_ns for p in (work / "round-002").rglob("stage.done.json")}


def test_interrupted_training_resumes_from_its_checkpoint(rounds):
    work = rounds["work"]
    weather = next(n for n, t in summary(work / "round-002").items() if t["category"] == "tool_calling")
    run = work / "round-002" / "train" / weather
    assert len(list((run / "checkpoints").glob("checkpoint-*"))) == 1  # a finished run keeps its newest only
    weights = run_weights(run)  # model/: the plan's `method` for a model this small is a full fine-tune
    (run / "stage.done.json").unlink()  # as if killed after the last checkpoint, before the weights were saved
    shutil.rmtree(weights)
    flywheel(rounds["root"] / "more" / "logs", work, rounds["model"], "--gate", rounds["gate"])
    assert summary(work / "round-002")[weather]["status"] == "resumed"
    assert run_weights(run) == weights and list(weights.glob("*.safetensors"))


def test_a_task_routes_only_when_its_confident_answers_earn_coverage(rounds, tmp_path):
    """Without --gate a task is exported and routed only when, at --target-accuracy, its SLM answers at least
    --min-coverage of the held-out calls; beating the untuned base is no reason. With --gate the gate decides the
    export, and the route still has to be earned."""
    logs = rounds["root"] / "first" / "logs"
    flywheel_args = ("--gpu", "cpu", "--base-model", rounds["model"], "--max-steps", 2, "--eval-limit", 3,
                     "--min-size", 8, "--max-tasks", 1)
    res = cli("flywheel", logs, "-w", tmp_path / "plain", *flywheel_args)
    (task,) = summary(tmp_path / "plain" / "round-001").values()
    sel = task["selective"]
    assert (sel["target"], sel["threshold"], sel["coverage"], sel["n"]) == (0.95, None, 0.0, 3)
    assert not task["gate_passed"] and not task["export"]
    router = json.loads((tmp_path / "plain" / "router.json").read_text())
    why = next(r["reason"] for r in router["not_routed"] if r["task"] == task["task"])
    assert router["routes"] == [] and why.startswith("coverage 0.00 at accuracy 0.95 (needs 0.2")
    assert "no threshold reaches 0.95" in why and "not routed" in res.output
    cli("flywheel", logs, "-w", tmp_path / "gated", *flywheel_args, "--gate", rounds["gate"], "--target-accuracy",
        0.9)
    (task,) = summary(tmp_path / "gated" / "round-001").values()
    router = json.loads((tmp_path / "gated" / "router.json").read_text())
    assert task["gate_passed"] and task["export"] and router["routes"] == []
    assert any(r["task"] == task["task"] and "at accuracy 0.9 " in r["reason"] for r in router["not_routed"])


def test_gate_failures_and_skipped_tasks_are_listed_not_exported(rounds, tmp_path):
    gate = tmp_path / "gate.json"
    gate.write_text('{"parse_rate": {"min": 1.01}}')
    res = flywheel(rounds["root"] / "first" / "logs", tmp_path / "work", rounds["model"], "--gate", gate,
                   "--max-tasks", 1)
    s = summary(tmp_path / "work" / "round-001")
    assert len(s) == 1 and not any(t["export"] for t in s.values())
    router = json.loads((tmp_path / "work" / "router.json").read_text())
    reasons = [r["reason"] for r in router["not_routed"]]
    assert router["routes"] == [] and len(reasons) == 2
    assert any("over --max-tasks 1" in r for r in reasons) and any("parse_rate" in r for r in reasons)
    assert "not routed" in res.output


SEVEN = ["tool_calling-get_weather", "extraction-ticket", "classification-sentiment", "classification-intent",
         "summarization-thread", "coding-sql", "generation-reply"]


def test_seven_task_families_one_round_a_failing_task_stays_alone(tiny_model, tmp_path):
    """Seven recurring errands plus one whose every record is longer than the CPU plan's 2,048-token cap: the round
    trains, evaluates and exports the seven and lists the eighth with its reason (summary, round.json, router)."""
    write_logs(tmp_path / "seven", 7 * 14, seed=11, errands=SEVEN, formats=("messages",))
    rng = random.Random(0)
    words = "clause party liability damages notice term fee breach renewal venue indemnity waiver".split()
    with open(tmp_path / "seven" / "logs" / "legal.jsonl", "w") as f:
        for i in range(16):  # distinct ~9k-character contracts (no near-duplicates): > 2,048 tiny-model tokens
            doc = " ".join(f"{rng.choice(words)} {rng.randint(0, 99999)}" for _ in range(900))
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Rewrite the contract clause in plain English for a customer."},
                {"role": "user", "content": f"Contract v{i}: {doc}"},
                {"role": "assistant", "content": f"In short (v{i}): we only pay for direct damage."}]}) + "\n")
    work = tmp_path / "work"
    res = cli("flywheel", tmp_path / "seven" / "logs", "-w", work, "--gpu", "cpu", "--base-model", tiny_model,
              "--max-steps", 2, "--eval-limit", 2, "--min-size", 8, "--gate", _no_gate(tmp_path), "--min-coverage", 0)
    s = summary(work / "round-001")
    failed = {k: t for k, t in s.items() if t["status"] == "failed"}
    ran = {k: t for k, t in s.items() if t["status"] != "failed"}
    assert len(ran) >= 7 and all(t["export"] for t in ran.values()), {k: t["reason"] for k, t in s.items()}
    assert {t["category"] for t in ran.values()} >= {"tool_calling", "extraction", "classification",
                                                       "summarization", "coding", "generation"}
    assert len(failed) == 1, failed
    (name, bad), = failed.items()
    assert bad["stage"] == "plan" and "longer than 2048 tokens" in bad["reason"] and not bad["export"]
    outcome = json.loads((work / "round-001" / "round.json").read_text())["outcome"]
    assert outcome["failed"][0]["task"] == name and sorted(outcome["exported"]) == sorted(ran)
    router = json.loads((work / "router.json").read_text())
    assert len(router["routes"]) == len(ran)
    assert any(r["task"] == name and "longer than 2048 tokens" in r["reason"] for r in router["not_routed"])
    assert f"not routed {name}" in " ".join(res.output.split())


def test_a_round_whose_every_task_fails_exits_non_zero(tiny_model, tmp_path):
    write_logs(tmp_path / "one", 12, seed=12, errands=[WEATHER], formats=("messages",))
    res = cli("flywheel", tmp_path / "one" / "logs", "-w", tmp_path / "work", "--gpu", "cpu", "--base-model",
              tiny_model, "--max-steps", 2, "--eval-limit", 2, "--min-size", 8, "--set", "method=lora",
              "--set", "lora.target_modules=nope", code=1)
    s = summary(tmp_path / "work" / "round-001")
    assert [t["status"] for t in s.values()] == ["failed"] and "every task of round-001 failed" in res.stderr
    (task,) = s.values()
    assert task["stage"] == "train" and (tmp_path / "work" / "round-001" / "failures" / f"{task['task']}.txt").is_file()


def _no_gate(tmp_path: Path) -> Path:
    gate = tmp_path / "gate.yaml"
    gate.write_text("parse_rate: {min: 0.0}\n")  # the tiny model learns little in 2 steps: gate on nothing
    return gate


def test_a_work_dir_path_with_spaces_colons_and_hashes_is_used_as_given(tiny_model, tmp_path):
    """The flywheel hands paths to the recipe as data: `a: b #c` in a path reparsed as YAML would be a dict and a
    comment, and training would write somewhere else."""
    write_logs(tmp_path / "data", 40, seed=5, errands=[WEATHER])
    gate = tmp_path / "gate.yaml"
    gate.write_text("parse_rate: {min: 0.0}\n")
    work = tmp_path / "agent runs: v2 #1" / "work"
    flywheel(tmp_path / "data" / "logs", work, tiny_model, "--gate", gate)
    task = next(iter(summary(work / "round-001").values()))
    assert task["status"] == "trained" and Path(task["run_dir"]) == work / "round-001" / "train" / task["task"]
    assert run_weights(Path(task["run_dir"])) and task["export"].startswith(str(work))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent runs: v2 #1", "data", "gate.yaml"]
