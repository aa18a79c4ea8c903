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


# ----------------------------------------------------------------------------- --gguf (llama.cpp / Ollama)
def held_out_prompts(run: Path, tokenizer) -> list[str]:
    """The eval records' prompts (never trained on) with their tools, and two plain chats, as a server renders them."""
    from slmtune.io import read_jsonl
    from slmtune.records import split_prompt_target

    prompts = []
    for rec in read_jsonl(run / "weather" / "eval.jsonl"):
        messages, _ = split_prompt_target(rec)
        prompts.append(tokenizer.apply_chat_template(messages, tools=rec["tools"], add_generation_prompt=True,
                                                     tokenize=False))
    for q in ("Weather in Tokyo please", "Is it raining in Seoul?"):
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=False))
    return prompts


def greedy(model, tokenizer, prompts: list[str], new_tokens: int = 24) -> list[list[int]]:
    import torch

    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outs.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return outs


@pytest.fixture(scope="module")
def gguf_export(run):
    """`slmtune export --gguf q8_0`, then f16 and q4_0 GGUFs written into copies of that export (no re-merge)."""
    import shutil

    from slmtune.export.gguf_export import write_gguf

    folder = Path(cli("export", run / "run", "-o", run / "gguf-exports", "--gguf", "q8_0"
                      ).output.strip().split("exported: ")[1])
    files = {"q8_0": folder / f"{folder.name}.q8_0.gguf"}
    for qtype in ("f16", "q4_0"):
        copy = run / f"gguf-{qtype}" / folder.name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.gguf"))
        files[qtype] = write_gguf(copy, qtype, folder.name)
    return folder, files


def test_gguf_export_carries_chat_template_stop_token_and_ollama_files(gguf_export):
    import gguf

    from slmtune.export.gguf_export import write_gguf

    folder, files = gguf_export
    export_template = (folder / "chat_template.jinja").read_text()
    meta = json.loads((folder / "slmtune.json").read_text())
    assert meta["gguf"] == {"file": files["q8_0"].name, "type": "q8_0"}
    eos = json.loads((folder / "tokenizer_config.json").read_text())["eos_token"]
    fields = gguf.GGUFReader(files["q8_0"]).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith(("tokenizer.ggml.tokens",
                                                                            "tokenizer.ggml.merges"))}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert value["general.architecture"] == "llama" and value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.merges"].contents()
    assert value["tokenizer.chat_template"] == export_template  # the export template, tools prelude included
    assert tokens[value["tokenizer.ggml.eos_token_id"]] == eos == "<|im_end|>"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    again = write_gguf(files["f16"].parent, "q8_0", folder.name)  # another folder, same checkpoint: same bytes
    assert again.read_bytes() == files["q8_0"].read_bytes()
    q4 = gguf.GGUFReader(files["q4_0"])
    assert q4.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert {t.name: t.tensor_type.name for t in q4.tensors}["blk.0.attn_q.weight"] == "Q4_0"

    modelfile = (folder / "Modelfile").read_text()
    lines = modelfile.splitlines()
    assert f"FROM ./{files['q8_0'].name}" in lines and 'PARAMETER stop "<|im_end|>"' in lines
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    for turn in ('{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}',
                 '{{ "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n" }}',
                 '{{- end }}{{ "<|im_start|>assistant\\n" }}'):
        assert turn in template
    card = (folder / "README.md").read_text()
    assert f"ollama create {folder.name} -f THIS_FOLDER/Modelfile" in card
    assert f"llama-server -m THIS_FOLDER/{files['q8_0'].name} --jinja" in card


def test_ollama_template_parts_rebuild_the_training_prompt_of_a_plain_chat(gguf_export):
    from transformers import AutoTokenizer

    from slmtune.export.gguf_export import chat_parts
    from slmtune.render import make_renderer, prompt_text

    folder, _ = gguf_export
    tokenizer = AutoTokenizer.from_pretrained(folder)
    parts = chat_parts(tokenizer)
    turns = [("system", "Answer in one word."), ("user", "Weather in Oslo?"), ("assistant", "Rain"),
             ("user", "And Lima?")]
    rec = {"messages": [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": "Sun"}]}
    ollama = "".join(parts[r][0] + c + parts[r][1] for r, c in turns) + parts["generation"]
    training = prompt_text(make_renderer(AutoTokenizer.from_pretrained(folder)), rec)
    assert ollama == training


def teacher_forced(ref, model, tokenizer, prompt: str, continuation: list[int]) -> list[tuple[bool, float, float]]:
    """Per step of the merged model's greedy `continuation`, fed to both models: (same argmax, the merged model's
    top-1 minus top-2 logit, max |logit difference| between the two)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    full = torch.cat([ids, torch.tensor([continuation])], dim=1)
    with torch.no_grad():
        a, b = (m(full).logits[0, ids.shape[1] - 1:-1].float() for m in (ref, model))
    top2 = a.topk(2).values
    return list(zip((a.argmax(-1) == b.argmax(-1)).tolist(), (top2[:, 0] - top2[:, 1]).tolist(),
                    (a - b).abs().max(-1).values.tolist(), strict=True))


def test_gguf_reloads_with_transformers_and_generates_as_the_merged_model(gguf_export, run, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, files = gguf_export
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = held_out_prompts(run, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = greedy(merged, tokenizer, prompts)
    report = {}
    for qtype, src in files.items():
        path = tmp_path / qtype / src.name  # alone, as a GGUF is shipped: no tokenizer.json beside it to fall back on
        path.parent.mkdir()
        shutil.copy(src, path)
        gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert gguf_tok.chat_template == tokenizer.chat_template and gguf_tok.eos_token == tokenizer.eos_token
        for p in prompts:  # the GGUF's own tokenizer cuts the held-out prompts as the export's does
            assert gguf_tok(p, add_special_tokens=False)["input_ids"] == tokenizer(p, add_special_tokens=False)[
                "input_ids"]
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        got = greedy(model, gguf_tok, prompts)
        pairs = list(zip(prompts, expected, strict=True))
        steps = [s for p, e in pairs for s in teacher_forced(merged, model, gguf_tok, p, e)]
        same_outputs = sum(g == e for g, e in zip(got, expected, strict=True))
        report[qtype] = {"identical_outputs": f"{same_outputs}/{len(prompts)}",
                         "top1_agreement": round(sum(same for same, _, _ in steps) / len(steps), 3),
                         "max_logit_diff": round(max(d for _, _, d in steps), 4)}
        if qtype == "f16":
            assert got == expected, "f16: greedy tokens differ from the merged model's"
        if qtype == "q8_0":
            # Q8_0 moves these logits by a few hundredths; 3 steps of training leave some top-2 gaps smaller than
            # that, so a token may flip — but only where rounding can break such a near tie.
            assert all(same or margin < 2 * diff for same, margin, diff in steps), steps
    print(f"\nGGUF vs merged model, greedy on {len(prompts)} held-out prompts × 24 tokens: {report}")


def test_gguf_refusals_cost_no_merge(run, tmp_path):
    res = cli("export", run / "run", "-o", tmp_path, "--gguf", "q4_k_m", code=1)
    assert "llama-quantize" in res.output and "--gguf q4_0" in res.output
    res = cli("export", run / "run", "-o", tmp_path, "--gguf", "q8_0", "--adapter-only", code=1)
    assert "--gguf needs merged weights" in res.output
    bad = cli("export", run / "run", "-o", tmp_path, "--gguf", "q5", code=2).output  # a usage error: exit 2
    assert "--gguf" in bad and "q4_k_m" in bad
    assert not any(tmp_path.iterdir())
    # the flywheel refuses it before ingesting anything, not after every task has trained
    res = cli("flywheel", run / "weather" / "train.jsonl", "-w", tmp_path / "wheel", "--gguf", "q4_k_m", code=1)
    assert "llama-quantize" in res.output and not (tmp_path / "wheel" / "round-001").exists()
