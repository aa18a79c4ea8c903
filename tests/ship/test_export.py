"""`slmtune export` and `slmtune models` for real on the tiny model: tags, manifest, card, reload without slmtune."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import write_json, write_jsonl
from slmtune.synthetic.tiny import weather_records

SCHEMA = {"type": "tool_calls", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
RECIPE = """\
name: weather
task: {{name: weather, category: tool_calling, schema_hash: 0123456789abcdef}}
model: {{base: {model}}}
data: {{train: weather/train.jsonl, max_length: 256, packing: true}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: 3, lr: 2.0e-2, batch_size: 4, warmup_ratio: 0.0, scheduler: constant}}
output: {{dir: {out}}}
"""
MANIFEST_KEYS = {"version", "name", "format", "task", "tags", "base_model", "recipe", "data", "curate", "eval",
                 "merge", "training", "source_run", "versions", "created"}
# Reload in a clean interpreter that never imports slmtune: the export must stand on its own.
RELOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
if sys.argv[2] == "adapter":
    from peft import PeftModel
    cfg = json.load(open(folder + "/adapter_config.json"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), folder)
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
ids = tok.apply_chat_template([{"role": "user", "content": "Weather in Oslo?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
assert out.shape[1] > ids["input_ids"].shape[1]
assert not any(m.startswith("slmtune") for m in sys.modules), "slmtune was imported"
print("ok", type(model).__name__)
"""


def cli(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + (result.stderr or "")
    return result


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """A trained run on a task dir (with a curate report beside its index, as the flywheel writes) + its eval."""
    root = tmp_path_factory.mktemp("export")
    task_dir = root / "weather"
    write_jsonl(task_dir / "train.jsonl", weather_records(12, seed=0))
    write_jsonl(task_dir / "eval.jsonl", weather_records(3, seed=1))
    write_json(task_dir / "task.json", {"name": "weather", "category": "tool_calling", "schema": SCHEMA,
                                        "schema_hash": "0123456789abcdef"})
    write_json(root / "curate_report.json", {"records_in": 20, "kept": 15, "rejected": 5,
                                             "rejected_by_reason": {"duplicate": 5}, "pii_placeholders": {"EMAIL": 3}})
    (root / "recipe.yaml").write_text(RECIPE.format(model=tiny_model, out=root / "run"))
    cli("train", root / "recipe.yaml")
    cli("eval", "--model", root / "run", "--data", task_dir / "eval.jsonl", "-o", root / "eval",
        "--max-new-tokens", "8")
    return root


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def merged(run):
    res = cli("export", run / "run", "-o", run / "exports", "--report", run / "eval")
    return Path(res.output.strip().split("exported: ")[1])


def test_merged_export_carries_task_and_schema_tags(merged):
    folder = merged
    assert folder.name.startswith("weather-") and folder.name.endswith("-01234567")
    assert (folder / "model.safetensors").is_file()
    meta = json.loads((folder / "slmtune.json").read_text())
    assert MANIFEST_KEYS <= meta.keys()
    tags = ["slmtune", "task:weather", "category:tool_calling", "schema:0123456789abcdef"]
    assert meta["tags"] == tags and meta["format"] == "merged"
    assert meta["task"]["schema"] == SCHEMA and meta["task"]["schema_hash"] == "0123456789abcdef"
    assert meta["merge"]["greedy_identical"] and meta["merge"]["reload_greedy_identical"]
    assert meta["curate"]["pii_placeholders"] == {"EMAIL": 3} and meta["curate"]["rejected"] == 5
    assert meta["data"]["train"]["records"] == 12 and meta["recipe"]["name"] == "weather"
    assert set(meta["eval"]["metrics"]) == {"tuned", "base", "teacher"} and meta["eval"]["n"] == 3
    assert meta["eval"]["metrics"]["teacher"]["exact_match"] == 1.0
    card = front_matter(folder / "README.md")
    assert card["tags"] == tags and card["library_name"] == "transformers" and card["base_model"]
    assert card["license"] and card["model-index"][0]["results"][0]["metrics"]
    assert not list(folder.parent.glob(".*")), "no temp dir left behind"


def test_merged_export_reloads_without_slmtune(merged):
    out = subprocess.run([sys.executable, "-c", RELOAD, str(merged), "merged"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok LlamaForCausalLM" in out.stdout


def test_adapter_only_export_reloads_with_peft(run, tmp_path):
    folder = Path(cli("export", run / "run", "-o", tmp_path, "--adapter-only").output.strip().split("exported: ")[1])
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    meta = json.loads((folder / "slmtune.json").read_text())
    assert meta["format"] == "adapter" and meta["merge"] is None and meta["eval"] is None
    assert front_matter(folder / "README.md")["library_name"] == "peft"
    out = subprocess.run([sys.executable, "-c", RELOAD, str(folder), "adapter"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok PeftModel" in out.stdout


def test_models_lists_exports_as_table_and_json(merged):
    exports = merged.parent
    (exports / "not-an-export").mkdir(exist_ok=True)
    rows = json.loads(cli("models", exports, "--json").output)
    assert len(rows) == 1
    row = rows[0]
    assert (row["task"], row["category"], row["schema_hash"]) == ("weather", "tool_calling", "0123456789abcdef")
    assert row["key_metric"] == "exact_match" and row["teacher"] == 1.0 and row["size_bytes"] > 10_000
    table = cli("models", exports).output
    assert "weather" in table and "tool_calling" in table and "01234567" in table


def test_export_of_a_non_run_fails_cleanly(tmp_path):
    res = cli("export", tmp_path, "-o", tmp_path / "x", code=1)
    assert "not a run directory" in res.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
