"""`slmtune plan` through the real CLI: recipes that load, fit the budget, carry the task, and dry-run."""

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import read_jsonl, write_jsonl
from slmtune.plan.estimate import GiB
from slmtune.plan.lengths import record_lengths, tokenizer_for
from slmtune.plan.planner import budget_bytes
from slmtune.recipe import load_recipe
from slmtune.synthetic.logs import generate_logs

runner = CliRunner()
ERRANDS = {"tool_calling-get_weather": 60, "extraction-ticket": 60, "classification-sentiment": 60,
           "summarization-thread": 60}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("plan")
    rows = []
    for errand, n in ERRANDS.items():
        for _i, (log, _) in enumerate(generate_logs(n, seed=5, formats=("messages",), errands=[errand])):
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
        # minutes on 2 cores: ~45k tokens of work; max_length covers the longest record in SmolLM2's own tokens
        assert 128 <= recipe.data.max_length <= 2048 and 10 <= recipe.train.max_steps <= 60
        longest = max(x.total for x in record_lengths(tokenizer_for("smollm2-135m"), recipe.data.train))
        assert longest <= recipe.data.max_length < longest + 64, (path.stem, longest, recipe.data.max_length)
    planned = json.loads((tmp_path / "recipes" / "plan.json").read_text())
    assert planned["failed"] == [] and all(p["lengths"]["source"] == "tokenizer" and not p["lengths"]["dropped"]
                                           for p in planned["planned"])


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


@pytest.mark.parametrize("gpu, canonical, budget", [("12gb", "12gb", 10.3), ("40GB", "40gb", 35.5),
                                                    ("7.5gb", "7.5gb", 6.25)])
def test_any_gpu_size_sets_the_budget_plan_writes(tasks_dir, tmp_path, gpu, canonical, budget):
    paths = _plan(tasks_dir, tmp_path / "r", "--gpu", gpu)
    planned = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert planned["gpu"] == canonical and planned["budget_gib"] == budget  # size × 0.9 − 0.5 GiB
    for path in paths:
        text = path.read_text()
        assert f"Hardware: one {canonical.upper()} GPU; memory budget {budget:.2f} GiB." in text
        assert float(re.search(r"# +total\s+([\d.]+) GiB", text).group(1)) <= budget + 0.005


def test_gpu_auto_is_this_machines_memory_or_cpu(tasks_dir, tmp_path):
    from slmtune.device import detect_gpu

    _plan(tasks_dir, tmp_path / "r", "--gpu", "auto")
    planned = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert planned["gpu"] == detect_gpu()
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:  # this CPU-only machine
        assert planned["gpu"] == "cpu" and planned["budget_gib"] == 8.0


def test_tool_calling_gets_a_tool_template_model_on_gpu(tasks_dir, tmp_path):
    paths = _plan(tasks_dir, tmp_path / "r", "--gpu", "24gb")
    weather = load_recipe(next(p for p in paths if "get_weather" in p.name))
    assert weather.model.base in ("Qwen/Qwen3-4B", "meta-llama/Llama-3.2-3B-Instruct")


def test_same_tasks_give_byte_identical_recipes(tasks_dir, tmp_path):
    a = _plan(tasks_dir, tmp_path / "a", "--gpu", "16gb")
    b = _plan(tasks_dir, tmp_path / "b", "--gpu", "16gb")
    for pa, pb in zip(a, b, strict=False):
        assert pa.read_text().replace(str(tmp_path / "a"), "") == pb.read_text().replace(str(tmp_path / "b"), "")


def test_bad_arguments_are_one_line_errors(tasks_dir, tmp_path):
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(tmp_path / "r"), "--gpu", "12tb"])
    assert res.exit_code == 2 and "--gpu" in res.output and "Traceback" not in res.output  # a usage error
    res = runner.invoke(app, ["plan", str(tmp_path), "-o", str(tmp_path / "r")])
    assert res.exit_code != 0 and "index.json: no such file" in res.output
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(tmp_path / "r"), "--base-model", "gpt-5"])
    assert res.exit_code != 0 and "not in the catalog" in res.output
    res = runner.invoke(app, ["plan", str(tasks_dir), "-o", str(tmp_path / "r"), "--gpu", "8gb",
                              "--base-model", "nemotron-nano-9b-v2"])
    assert res.exit_code != 0 and "does not fit" in res.output


def test_each_recipe_passes_train_dry_run_with_the_tiny_model(tasks_dir, tmp_path):
    pytest.importorskip("torch")
    from slmtune.synthetic.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    paths = _plan(tasks_dir, tmp_path / "r", "--gpu", "cpu", "--base-model", str(model))
    assert paths
    for path in paths:
        assert load_recipe(path).model.base == str(Path(model).resolve())
        res = runner.invoke(app, ["train", str(path), "--dry-run"])
        assert res.exit_code == 0, (path.name, res.output)


def test_plan_measures_real_tokens_drops_over_long_records_and_isolates_a_task(tasks_dir, tmp_path):
    """Lengths in the model's own tokens (equal to what `slmtune train` encodes); a record over the 2,048-token CPU
    cap is left out of training, never truncated; a task with no record under the cap fails alone."""
    pytest.importorskip("torch")
    import shutil

    from slmtune.recipe import load_recipe
    from slmtune.synthetic.tiny import build_tiny_model
    from slmtune.train.trainer import prepare

    model = build_tiny_model(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    shutil.copytree(tasks_dir, tasks)
    names = sorted(t["name"] for t in json.loads((tasks / "index.json").read_text())["tasks"])
    grow, doomed = names[0], names[1]
    rows = read_jsonl(tasks / grow / "train.jsonl")
    long = json.loads(json.dumps(rows[0]))
    long["messages"][-2]["content"] = "the quick brown fox 0123 " * 400  # ~10k characters: over 2,048 tokens
    write_jsonl(tasks / grow / "train.jsonl", [*rows, long])
    write_jsonl(tasks / doomed / "train.jsonl", [long] * 3)

    res = runner.invoke(app, ["plan", str(tasks), "-o", str(tmp_path / "r"), "--gpu", "cpu", "--base-model",
                              str(model)])
    assert res.exit_code == 0, res.output
    assert f"not planned {doomed}" in res.stderr and "longer than 2048 tokens" in res.stderr
    plan_json = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert [f["task"] for f in plan_json["failed"]] == [doomed]
    grown = next(p for p in plan_json["planned"] if p["task"] == grow)
    assert grown["lengths"]["dropped"] == [len(rows) + 1]
    recipe = load_recipe(tmp_path / "r" / f"{grow}.yaml")
    assert recipe.data.train == (tmp_path / "r" / "data" / f"{grow}.train.jsonl").resolve()
    assert "Left out: 1 of" in (tmp_path / "r" / f"{grow}.yaml").read_text()
    for name in set(names) - {doomed}:
        recipe = load_recipe(tmp_path / "r" / f"{name}.yaml")
        prep = prepare(recipe)  # what training encodes, with transformers' tokenizer
        assert not any(e.enc.truncated for e in prep.train)
        assert max(len(e.enc.input_ids) for e in prep.train) > recipe.data.max_length - 64
        light = record_lengths(tokenizer_for(str(model)), recipe.data.train)
        assert [x.total for x in light] == [len(e.enc.input_ids) for e in prep.train]


def test_data_stages_do_not_import_the_training_stack():
    import subprocess
    import sys

    code = ("import sys, slmtune.cli, slmtune.tasks.cluster, slmtune.plan.planner; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("base, method, lr", [("smollm2-135m", "full", 1.0e-4), ("qwen3-1.7b", "lora", 2.0e-4)])
def test_plan_writes_what_train_resolves_auto_to(tasks_dir, tmp_path, base, method, lr):
    """Below 0.5 B parameters a full fine-tune (its optimizer state in the estimate), else LoRA; fewer than 1,000
    records get 2 epochs — the numbers `method/epochs/lr: auto` resolve to at train time."""
    for path in _plan(tasks_dir, tmp_path / "r", "--gpu", "16gb", "--base-model", base):
        recipe, text = load_recipe(path), path.read_text()
        n_train = json.loads((tasks_dir / path.stem / "task.json").read_text())["n_train"]
        assert n_train < 1000 and (recipe.method, recipe.train.epochs, recipe.train.lr) == (method, 2.0, lr)
        assert ("optimizer" in text and "Full fine-tune" in text) == (method == "full")


def test_long_tool_docs_get_compact_signatures_that_training_and_its_outputs_keep(tasks_dir, tmp_path):
    """An agent's tool docs over the CPU cap: plan measures the records again with `data.tool_docs: compact` and
    writes it; training renders with it and saves a tokenizer marked so, which eval, export and serve load."""
    pytest.importorskip("torch")
    import shutil

    from transformers import AutoTokenizer

    from slmtune.render import make_renderer
    from slmtune.synthetic.tiny import build_tiny_model
    from slmtune.train.trainer import prepare

    model = build_tiny_model(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    shutil.copytree(tasks_dir, tasks)
    name = next(t["name"] for t in json.loads((tasks / "index.json").read_text())["tasks"] if t["tools"])
    rows = read_jsonl(tasks / name / "train.jsonl")[:24]
    for r in rows:  # the same tools, documented at length: ~9k characters of descriptions per record
        for t in r["tools"]:
            t["function"]["description"] = "Looks the value up in the live system and returns it. " * 80
    write_jsonl(tasks / name / "train.jsonl", rows)
    res = runner.invoke(app, ["plan", str(tasks), "-o", str(tmp_path / "r"), "--gpu", "cpu", "--base-model",
                              str(model)])
    assert res.exit_code == 0, res.output
    planned = {p["task"]: p for p in json.loads((tmp_path / "r" / "plan.json").read_text())["planned"]}
    assert planned[name]["lengths"]["tool_docs"] == "compact" and planned[name]["lengths"]["dropped"] == []
    assert all(p["lengths"]["tool_docs"] == "full" for t, p in planned.items() if t != name)
    recipe = load_recipe(tmp_path / "r" / f"{name}.yaml")
    assert recipe.data.tool_docs == "compact"
    full = record_lengths(tokenizer_for(str(model)), recipe.data.train)
    assert min(x.total for x in full) > 2048  # every record was over the cap with full specs
    prep = prepare(recipe)
    assert prep.renderer.tool_docs == "compact"
    assert [len(e.enc.input_ids) for e in prep.train] == [
        x.total for x in record_lengths(tokenizer_for(str(model)), recipe.data.train, "compact")]
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 1}),
                                       "output": recipe.output.model_copy(update={"dir": tmp_path / "run"})})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads(recipe.model_dump_json())))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert res.exit_code == 0, res.output
    saved = next(p.parent for p in (tmp_path / "run").rglob("tokenizer_config.json"))
    assert make_renderer(AutoTokenizer.from_pretrained(saved)).tool_docs == "compact"
