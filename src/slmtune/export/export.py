"""`slmtune export`: a finished run in, a tagged, self-describing checkpoint folder out.

Export folder (`EXPORTS_DIR/<task>-<base>-<schema_hash[:8]>/`)::

    model.safetensors, config.json, generation_config.json   merged weights (default; via `slmtune merge`,
                        whose logit / greedy / reload checks must pass), loadable with
                        `AutoModelForCausalLM.from_pretrained(folder)`
    adapter_config.json, adapter_model.safetensors           instead, with --adapter-only: the LoRA adapter,
                        loadable with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`
    tokenizer files     `chat_template.jinja` renders records exactly as training did (`slmtune.export.template`):
                        `apply_chat_template(messages, tools=tools, add_generation_prompt=True)` in plain
                        transformers or vLLM (`--tool-call-parser hermes`) gives the training prompt
    slmtune_render.json how training rendered prompts and tool calls (serving must do the same)
    merge_report.json   the merge verification (merged exports only)
    <name>.<type>.gguf, Modelfile   with --gguf f16|q8_0|q4_0: the merged weights as a GGUF written by llama.cpp's
                        converter, and an Ollama Modelfile for it (`slmtune.export.gguf_export`)
    README.md           model card: YAML front matter (base_model, library_name, license, tags, model-index)
    slmtune.json        the manifest below

`slmtune.json` keys (version 1): `version`, `name` (folder name), `format` (merged | adapter), `task` {name,
category, schema, schema_hash}, `tags`, `base_model` {spec, name, path}, `recipe` (as trained), `data`
{train, eval: {sha256, records}}, `curate` ({records_in, kept, rejected, rejected_by_reason, pii_placeholders}
or null when no curate report is found), `eval` ({n, key_metric, metrics: {tuned, base, teacher: {metric:
value}}, gate, decoding: free | constrained (how eval decoded the model rows), report_sha256} or null
without --report), `merge` (merge_report.json, null for adapters),
`training` {global_step, final_train_loss, wall_time_s}, `gguf` ({file, type} or null without --gguf),
`source_run`, `versions`, `created`.

The folder is built in a temp dir beside it and swapped in with `os.replace`: a failed export leaves the
previous one (or nothing) in place.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from slmtune.errors import SlmtuneError
from slmtune.eval.metrics import key_metric
from slmtune.export.gguf_export import card_lines, check_gguf_type, gguf_filename, write_gguf, write_modelfile
from slmtune.io import atomic_dir, atomic_open, file_fingerprint, write_json
from slmtune.models import bundled

MANIFEST = "slmtune.json"
MANIFEST_VERSION = 1


def export_name(task: str, base: str, schema_hash: str | None) -> str:
    """`<task>-<base>-<schema_hash[:8]>`, the base shortened to its last path part, lower-case."""
    short = re.sub(r"[^a-z0-9.]+", "-", base.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
    return f"{task}-{short}-{(schema_hash or 'text')[:8]}"


def export_run(run_dir: str | Path, exports_dir: str | Path, adapter_only: bool = False,
               report: str | Path | None = None, curate_report: str | Path | None = None,
               extra: dict | None = None, gguf: str | None = None) -> Path:
    """Export `run_dir` into `exports_dir/<name>/`; returns that folder. `report`: an eval report dir or json;
    `gguf`: also write a GGUF of that type (f16, q8_0, q4_0) and an Ollama Modelfile."""
    run_dir, exports_dir = Path(run_dir), Path(exports_dir)
    if gguf:
        check_gguf_type(gguf, adapter_only)  # before the merge: a refused type costs nothing
    run = _read_run(run_dir)
    if adapter_only and run["weights"].name == "model":
        raise SlmtuneError(f"{run_dir}: a full fine-tune (method: full) has no adapter to export.",
                           "Export it merged (drop --adapter-only).")
    if adapter_only and run["manifest"].get("method") == "grpo":
        raise SlmtuneError(f"{run_dir}: an RL run's adapter sits on its local SFT model, not on the base model "
                           "others have.", "Export it merged (drop --adapter-only).")
    task = _task_tags(run["manifest"])
    if not task.get("name"):
        raise SlmtuneError(f"{run_dir}: the run has no task tags (recipe `task.name`).",
                           "Export needs a task: train from a recipe written by `slmtune plan`.")
    name = export_name(task["name"], run["manifest"]["base_model"]["name"], task.get("schema_hash"))
    eval_report = _read_report(report) if report else None
    curate = _read_curate(curate_report, run["manifest"])
    with atomic_dir(exports_dir / name) as stage:  # a crash leaves no half export under the real name
        merge = None if adapter_only else _merged(run_dir, stage)
        if adapter_only:
            shutil.copytree(run_dir / "adapter", stage, dirs_exist_ok=True)
            _adapter_tokenizer(stage)
        gguf_info = {"file": gguf_filename(name, gguf), "type": gguf} if gguf else None
        manifest = build_manifest(name, run, task, eval_report, curate, merge, extra, gguf_info)
        write_json(stage / MANIFEST, manifest)
        mode = json.loads((stage / "slmtune_render.json").read_text(encoding="utf-8"))["mode"]
        with atomic_open(stage / "README.md") as f:
            f.write(model_card(manifest, mode))
        if gguf:  # after the card: the converter copies its license and tags into the GGUF's general.* keys
            write_gguf(stage, gguf, name)
            write_modelfile(stage, gguf_info["file"], name)
    return exports_dir / name


def _merged(run_dir: Path, out: Path) -> dict:
    from dataclasses import asdict

    from slmtune.export.merge import merge_run

    return asdict(merge_run(run_dir, out, dtype="auto"))


def _adapter_tokenizer(folder: Path) -> None:
    """Re-save the adapter's tokenizer with the export chat template, plus `slmtune_render.json` (as merge does)."""
    from transformers import AutoTokenizer

    from slmtune.export.merge import render_info
    from slmtune.export.template import save_tokenizer
    from slmtune.render import make_renderer

    r = make_renderer(AutoTokenizer.from_pretrained(folder))
    save_tokenizer(r, folder)
    write_json(folder / "slmtune_render.json", render_info(r))


# ----------------------------------------------------------------------------- inputs
def _read_run(run_dir: Path) -> dict:
    from slmtune.train.runfiles import read_run, run_weights

    manifest = read_run(run_dir)  # raises a clear error for a folder that is not a finished run
    weights = run_weights(run_dir)  # adapter/, or model/ of a full fine-tune
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    return {"dir": run_dir, "manifest": manifest, "recipe": recipe, "metrics": metrics, "weights": weights}


def _task_tags(manifest: dict) -> dict:
    """The run's task tags, completed from `task.json` beside its training data (cluster's task dir)."""
    task = dict(manifest.get("task") or {})
    train = ((manifest.get("data") or {}).get("train") or {}).get("path")
    task_json = Path(train).parent / "task.json" if train else None
    if task_json is not None and task_json.is_file():
        info = json.loads(task_json.read_text(encoding="utf-8"))
        if info.get("name") == task.get("name") or not task.get("name"):
            for k in ("name", "category", "schema", "schema_hash"):
                task[k] = task.get(k) if task.get(k) is not None else info.get(k)
    return task


def _read_report(report: str | Path) -> dict:
    path = Path(report)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise SlmtuneError(f"--report {report}: no report.json there.", "Give the folder `slmtune eval -o` wrote.")
    rep = json.loads(path.read_text(encoding="utf-8"))
    rep["_sha256"] = file_fingerprint(path)
    return rep


def _read_curate(curate_report: str | Path | None, manifest: dict) -> dict | None:
    """The curate report given, else `curate_report.json` beside the tasks index the training data came from."""
    path = Path(curate_report) if curate_report else None
    train = ((manifest.get("data") or {}).get("train") or {}).get("path")
    if path is None and train:
        path = Path(train).parent.parent / "curate_report.json"
    if path is None or not path.is_file():
        return None
    rep = json.loads(path.read_text(encoding="utf-8"))
    keys = ("records_in", "kept", "rejected", "rejected_by_reason", "pii_placeholders", "records_with_secrets")
    return {k: rep.get(k) for k in keys}


# ----------------------------------------------------------------------------- manifest and card
def tags_for(task: dict) -> list[str]:
    return ["slmtune", f"task:{task['name']}", f"category:{task.get('category')}",
            f"schema:{task.get('schema_hash') or 'none'}"]


def eval_summary(report: dict) -> dict:
    category = report["task"]["category"]
    rows = {row: {m: v["value"] for m, v in report["models"][row]["metrics"].items()}
            for row in ("tuned", "base", "teacher") if row in report["models"]}
    return {"n": report["n"], "key_metric": key_metric(category), "metrics": rows, "gate": report.get("gate"),
            "decoding": (report.get("decoding") or {}).get("used", "free"), "report_sha256": report.get("_sha256")}


def build_manifest(name: str, run: dict, task: dict, report: dict | None, curate: dict | None, merge: dict | None,
                   extra: dict | None, gguf: dict | None = None) -> dict:
    from slmtune.io import now
    from slmtune.train.runfiles import versions

    m, metrics = run["manifest"], run["metrics"]
    data = {k: ({"sha256": v["sha256"], "records": v["records"]} if v else None)
            for k, v in (m.get("data") or {}).items()}
    return {
        "version": MANIFEST_VERSION, "name": name, "format": "adapter" if merge is None else "merged",
        "task": {"name": task["name"], "category": task.get("category"), "schema": task.get("schema"),
                 "schema_hash": task.get("schema_hash")},
        "tags": tags_for(task),
        "base_model": {k: m["base_model"].get(k) for k in ("spec", "name", "path")},
        "recipe": run["recipe"], "data": data, "curate": curate,
        "eval": eval_summary(report) if report else None, "merge": merge,
        "training": {k: metrics.get(k) for k in ("global_step", "final_train_loss", "wall_time_s")}, "gguf": gguf,
        "source_run": str(run["dir"].resolve()), "versions": versions(), "created": now(), **(extra or {}),
    }


def _licence(base_name: str) -> str:
    from slmtune.plan.catalog import CATALOG

    for spec in CATALOG.values():
        if spec.hf_id == base_name:
            return spec.licence.lower()
    return "other"


def model_card(manifest: dict, render_mode: str = "slmtune-hermes") -> str:
    """The export's README.md; `render_mode` is `slmtune_render.json`'s `mode` (how training rendered tools)."""
    task, ev = manifest["task"], manifest["eval"]
    front = {"base_model": manifest["base_model"]["name"],
             "library_name": "peft" if manifest["format"] == "adapter" else "transformers",
             "license": _licence(manifest["base_model"]["name"]), "pipeline_tag": "text-generation",
             "tags": manifest["tags"]}
    if ev:
        front["model-index"] = [{"name": manifest["name"], "results": [{
            "task": {"type": "text-generation", "name": task["category"]},
            "dataset": {"name": f"{task['name']} eval (held out agent logs)", "type": f"slmtune/{task['name']}"},
            "metrics": [{"type": k, "name": f"{k} (vs teacher)", "value": round(v, 4)}
                        for k, v in ev["metrics"].get("tuned", {}).items() if v is not None]}]}]
    body = [f"# {manifest['name']}", "",
            f"A {manifest['base_model']['name']} fine-tune by slmtune for one agent errand: "
            f"task `{task['name']}` ({task['category']}), output schema hash `{task['schema_hash'] or '-'}`. "
            f"Format: **{manifest['format']}**.", ""]
    if (manifest.get("recipe") or {}).get("method") == "grpo":
        body += ["Trained in two stages: supervised fine-tuning on the teacher's answers, then RL (GRPO, "
                 "`method: grpo`) rewarded by agreement with the teacher; its adapter's base is the SFT model "
                 f"(`{manifest['base_model']['path']}`).", ""]
    base = bundled(manifest["base_model"]["name"])
    if base:
        body += [f"**Licence of the base model:** {base.licence}.", ""]
        body += [base.template_note, ""] if base.template_note else []
    body += _transformers_lines(manifest, render_mode) + _vllm_lines(manifest, render_mode)
    body += card_lines(manifest["gguf"], manifest["name"]) if manifest.get("gguf") else []
    body += _eval_lines(ev) + _bake_off_lines(manifest) + _data_lines(manifest)
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"


def _bake_off_lines(manifest: dict) -> list[str]:
    """The flywheel's `--candidates` table: every candidate trained on this task, scored on the same held-out calls."""
    rows = manifest.get("bake_off")
    if not rows:
        return []
    metric = next((k for k in rows[0] if k not in ("model", "recipe", "status", "coverage", "threshold", "winner")),
                  "key metric")
    lines = ["## Candidates", "", "Each candidate was trained on the same records and evaluated on the same held-out "
             f"calls; the winner has the largest coverage at the target accuracy, then the best {metric}.", "",
             f"| model | {metric} | coverage at target | threshold | |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_fmt(r.get(metric))} | {_fmt(r.get('coverage'))} | "
                     f"{_fmt(r.get('threshold'))} | {'**exported**' if r.get('winner') else ''} |")
    return [*lines, ""]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _load_snippet(manifest: dict) -> list[str]:
    if manifest["format"] == "adapter":
        return ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f"base = AutoModelForCausalLM.from_pretrained({manifest['base_model']['path']!r})",
                "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')",
                "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')"]
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
            "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')"]


def _transformers_lines(manifest: dict, mode: str) -> list[str]:
    hermes = mode != "native"
    about = ("Its chat template renders system, user and assistant turns, `tools`, assistant `tool_calls` "
             "(`arguments` as objects or JSON strings) and `tool` results exactly as training did: tool specs at "
             "the end of the system turn inside `<tools></tools>`, each call as `<tool_call>` JSON, each result "
             "as a `<tool_response>` user turn (the Hermes convention; see `slmtune_render.json`)." if hermes else
             "Its chat template is the base model's own, which handles `tools` and `tool_calls` natively; "
             "training rendered records with it unchanged.")
    code = [*(["import json, re"] if hermes else []), *_load_snippet(manifest),
            "tools = [...]  # the OpenAI-style function specs your agent sends, or None",
            'messages = [{"role": "user", "content": "..."}]',
            "inputs = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,",
            '                                       return_dict=True, return_tensors="pt")',
            "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)",
            'text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)']
    if hermes:
        code += ['calls = [json.loads(c) for c in re.findall(r"<tool_call>\\s*(.*?)\\s*</tool_call>", text, re.S)]',
                 '# each call: {"name": ..., "arguments": {...}}; the text outside the blocks is the reply']
    return ["## Use with transformers", "", about, "", "```python", *code, "```", ""]


def _vllm_lines(manifest: dict, mode: str) -> list[str]:
    parser = "hermes" if mode != "native" else "PARSER"
    tools = f"--enable-auto-tool-choice --tool-call-parser {parser}"
    if manifest["format"] == "adapter":
        r = ((manifest.get("recipe") or {}).get("lora") or {}).get("r") or 16
        # vLLM's --max-lora-rank defaults to 16 and takes only these values
        rank = "" if r <= 16 else f" --max-lora-rank {next((v for v in (32, 64, 128, 256, 512) if v >= r), r)}"
        cmd = [f"vllm serve {manifest['base_model']['path']} --enable-lora "
               f"--lora-modules {manifest['name']}=THIS_FOLDER{rank} \\",
               f"    --chat-template THIS_FOLDER/chat_template.jinja {tools}"]
        how = (f"Requests name the adapter: `\"model\": \"{manifest['name']}\"`. `--chat-template` makes vLLM prompt "
               "with this folder's template instead of the base model's; the base path is the one the adapter "
               "was trained on.")
    else:
        cmd, how = [f"vllm serve THIS_FOLDER {tools}"], "vLLM prompts with this folder's chat template."
    if mode != "native":
        how += (" The `hermes` parser turns the `<tool_call>` blocks into OpenAI `tool_calls`. (Older vLLM "
                "releases' hermes parser insists that `<tool_call>` be a single vocabulary token and refuses to "
                "start otherwise; a current vLLM matches the text.)")
    else:
        how += (f" PARSER: the tool-call parser vLLM documents for {manifest['base_model']['name']} (e.g. "
                "`hermes` for Qwen2.5/Qwen3, `llama3_json` for Llama 3.x).")
    return ["## Serve with vLLM", "", "```bash", *cmd, "```", "", how, ""]


def _eval_lines(ev: dict | None) -> list[str]:
    if not ev:
        return ["No eval report was attached (`slmtune export --report`).", ""]
    rows = [r for r in ("base", "tuned", "teacher") if r in ev["metrics"]]
    metrics = list(ev["metrics"].get("tuned") or ev["metrics"]["teacher"])
    lines = [f"## Eval ({ev['n']} held-out records; 1.0 = as the logged teacher LLM)", "",
             "| metric | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for m in metrics:
        vals = [ev["metrics"][r].get(m) for r in rows]
        lines.append(f"| {m} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    if ev.get("decoding") == "constrained":
        lines += ["", "Decoded as `slmtune serve` decodes tool calls: under the llguidance grammar of the offered "
                  "tools (a call names an offered tool with schema-valid arguments). Plain greedy decoding (HF, "
                  "GGUF, Ollama, vLLM without guided decoding) may score lower."]
    gate = ev.get("gate")
    if gate is not None:
        lines += ["", f"Gate: {'passed' if gate['passed'] else 'failed'}."]
    return lines + [""]


def _data_lines(manifest: dict) -> list[str]:
    d, c = manifest["data"], manifest["curate"]
    lines = ["## Data", "", f"Train records: {(d.get('train') or {}).get('records')}, "
             f"eval records: {(d.get('eval') or {}).get('records')} (sha256 in slmtune.json)."]
    if c:
        pii = ", ".join(f"{k} {v}" for k, v in (c.get("pii_placeholders") or {}).items()) or "none"
        lines.append(f"Curated from {c['records_in']} logged calls: {c['kept']} kept, {c['rejected']} rejected; "
                     f"PII replaced by placeholders: {pii}.")
    return lines
