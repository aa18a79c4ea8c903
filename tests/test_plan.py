"""`slmtune plan` through the real CLI: recipes that load, fit the budget, carry the task, and dry-run."""

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.jsonl import write_jsonl
from slmtune.memory import GiB
from slmtune.plan import budget_bytes
from slmtune.recipe import load_recipe
from slmtune.synthetic import generate_logs

runner = CliRunner()
ERRANDS = {"tool_calling-get_weather": 60, "extraction-ticket": 60, "classification-sentiment": 60,
           "summarization-thread": 60}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("plan")
    rows = []
    for errand, n in ERRANDS.items():
        for i, (log, _) in enumerate(generate_logs(n, seed=5, formats=("messages",), errands=[errand])):
            rows.append({"id": f"r{len(rows):05d}", **log})
    write_jsonl(work / "records.jsonl", rows)
    res = runner.invoke(app, ["cluster", str(work / "records.jsonl"), "-o", str(work / "tasks")])
    assert res.exit_code == 0, res.output
    return work / "tasks"


def _plan(tasks_dir: Path, out: Path, *args: str) -> list[Path]:
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return sorted(out.glob("*.yaml"))


def test_cpu_recipes_load_and_carry_the_task(tasks_dir, tmp_path):
    paths = _plan(tasks_dir, tmp_path / "recipes", "--gpu", "cpu")
    index = json.loads((tasks_dir / "index.json").read_text())
    assert [p.stem for p in paths] == sorted(t["name"] for t in index["tasks"]) and len(paths) == len(ERRANDS)
    for path in paths:
        recipe = load_recipe(path)
        task = json.loads((tasks_dir / path.stem / "task.json").read_text())
        assert recipe.model.base == "smollm2-135m" and recipe.model.quantization == "none"
        assert recipe.task.name == task["name"] and recipe.task.category == task["category"]
        assert recipe.task.output_schema == task["schema"] and recipe.task.schema_hash == task["schema_hash"]
        assert recipe.data.train == (tasks_dir / path.stem / "train.jsonl").resolve()
        assert recipe.data.eval == (tasks_dir / path.stem / "eval.jsonl").resolve()
        # minutes on 2 cores: ≤ 512 tokens and ~45k tokens of work
        assert recipe.data.max_length <= 512 and 10 <= recipe.train.max_steps <= 60
        assert recipe.data.max_length >= min(task["tokens"]["p95"], 512)  # CPU runs cap at 512 tokens


def test_header_has_purpose_hardware_command_override_and_arithmetic(tasks_dir, tmp_path):
    path = _plan(tasks_dir, tmp_path / "r", "--gpu", "8gb")[0]
    text = path.read_text()
    header = text.split("\nname:")[0].splitlines()
    assert all(line.startswith("#") for line in header)
    joined = "\n".join(header)
    for word in ("Purpose:", "Hardware:", f"Command:  slmtune train {path}", "Override:", "weights", "lora",
                 "activations", "logits", "total"):
        assert word in joined, word
    total = float(re.search(r"total\s+([\d.]+) GiB", joined).group(1))
    assert total <= budget_bytes("8gb") / GiB


@pytest.mark.parametrize("gpu", ["cpu", "8gb", "16gb", "24gb", "48gb", "80gb"])
def test_every_gpu_plan_is_within_budget(tasks_dir, tmp_path, gpu):
    for path in _plan(tasks_dir, tmp_path / gpu, "--gpu", gpu):
        text = path.read_text()
        total = float(re.search(r"# +total\s+([\d.]+) GiB", text).group(1))
        assert total <= budget_bytes(gpu) / GiB + 0.005
        raw = yaml.safe_load(text)
        assert raw["train"]["batch_size"] >= 1 and raw["data"]["max_length"] >= 128


def test_tool_calling_gets_a_tool_template_model_on_gpu(tasks_dir, tmp_path):
    paths = _plan(tasks_dir, tmp_path / "r", "--gpu", "24gb")
    weather = load_recipe(next(p for p in paths if "get_weather" in p.name))
    assert weather.model.base in ("Qwen/Qwen3-4B", "meta-llama/Llama-3.2-3B-Instruct")


def test_same_tasks_give_byte_identical_recipes(tasks_dir, tmp_path):
    a = _plan(tasks_dir, tmp_path / "a", "--gpu", "16gb")
    b = _plan(tasks_dir, tmp_path / "b", "--gpu", "16gb")
    for pa, pb in zip(a, b):
        assert pa.read_text().replace(str(tmp_path / "a"), "") == pb.read_text().replace(str(tmp_path / "b"), "")


def test_bad_arguments_are_one_line_errors(tasks_dir, tmp_path):
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(tmp_path / "r"), "--gpu", "12gb"])
    assert res.exit_code != 0 and "--gpu must be one of" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["plan", str(tmp_path), "-o", str(tmp_path / "r")])
    assert res.exit_code != 0 and "index.json: no such file" in res.output
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(tmp_path / "r"), "--base-model", "gpt-5"])
    assert res.exit_code != 0 and "not in the catalog" in res.output
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(tmp_path / "r"), "--gpu", "8gb",
                              "--base-model", "nemotron-nano-9b-v2"])
    assert res.exit_code != 0 and "does not fit" in res.output


def test_each_recipe_passes_train_dry_run_with_the_tiny_model(tasks_dir, tmp_path):
    pytest.importorskip("torch")
    from slmtune.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    paths = _plan(tasks_dir, tmp_path / "r", "--gpu", "cpu", "--base-model", str(model))
    assert paths
    for path in paths:
        assert load_recipe(path).model.base == str(Path(model).resolve())
        res = runner.invoke(app, ["train", str(path), "--dry-run"])
        assert res.exit_code == 0, (path.name, res.output)


def test_data_stages_do_not_import_the_training_stack():
    import subprocess
    import sys

    code = ("import sys, slmtune.cli, slmtune.cluster, slmtune.plan; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
