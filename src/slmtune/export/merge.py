"""`slmtune merge`: fold a run's LoRA adapter into full-precision base weights, prove it, save a checkpoint.

The merge always happens on the full-precision base (a QLoRA adapter is merged into the dequantized-free
original weights, never into 4-bit ones). Before saving we check, on a few training prompts rendered by
`slmtune.render`, that the merged model's logits match base+adapter (max |diff| recorded) and that greedy
outputs are identical; after saving we reload the checkpoint with plain `from_pretrained` and generate again.
All figures go to `OUT_DIR/merge_report.json`; a failed check raises (non-zero exit) and leaves no checkpoint.
A full fine-tune (`method: full`) has no adapter: its `model/` is saved the same way (max |diff| 0 by
construction; the reload check still runs).

`OUT_DIR` holds: model.safetensors + config, the tokenizer whose `chat_template.jinja` renders records exactly as
training did (`slmtune.export.template`: plain `apply_chat_template(messages, tools=tools)` gives the training
prompt), `slmtune_render.json` (how prompts and tool calls were rendered in training), `merge_report.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.export.template import save_tokenizer
from slmtune.io import atomic_dir, iter_jsonl, write_json
from slmtune.render import TOOLS_PREAMBLE, Renderer, make_renderer, prompt_text
from slmtune.train.runfiles import read_run, run_weights

# fp32 merge arithmetic differs from the unmerged path only by rounding; a real mistake (wrong scale, adapter
# not applied) moves logits by whole units.
LOGIT_TOLERANCE = 1e-3
N_PROMPTS, NEW_TOKENS = 3, 16


def check_prompts(r: Renderer, manifest: dict) -> list[str]:
    """A few training prompts, rendered exactly as in training (falls back to a fixed one if data moved)."""
    train = (manifest.get("data") or {}).get("train") or {}
    prompts = []
    if train.get("path") and Path(train["path"]).is_file():
        for _, rec in iter_jsonl(train["path"]):
            prompts.append(prompt_text(r, rec))
            if len(prompts) == N_PROMPTS:
                break
    return prompts or [prompt_text(r, {"messages": [{"role": "user", "content": "Hello"},
                                                     {"role": "assistant", "content": ""}]})]


def _logits_and_greedy(model, tokenizer, prompts: list[str]):
    import torch

    logits, outs = [], []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
            logits.append(model(**ids).logits.float())
            gen = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outs.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return logits, outs


@dataclass(frozen=True)
class MergeReport:
    """What `merge_report.json` records: the checks that passed before the checkpoint was kept."""

    run_dir: str
    base_model: str
    quantization_trained: str | None
    prompts_checked: int
    max_abs_logit_diff: float
    logit_tolerance: float
    greedy_identical: bool  # merged vs base+adapter, before saving
    saved_dtype: str
    reload_greedy_identical: bool  # the saved checkpoint, reloaded with plain from_pretrained


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> MergeReport:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = read_run(run_dir)
    weights = run_weights(run_dir)  # adapter/, or model/ of a full fine-tune
    tokenizer = AutoTokenizer.from_pretrained(weights)
    r = make_renderer(tokenizer)
    prompts = check_prompts(r, manifest)
    if weights.name == "model":  # nothing to fold in: the trained model is the checkpoint, diff 0 by construction
        merged = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
        diff, (_, new_out) = 0.0, _logits_and_greedy(merged, tokenizer, prompts)
    else:
        merged, diff, new_out = _fold_adapter(manifest["base_model"]["path"], weights, tokenizer, prompts)
    checked = {"run_dir": str(run_dir.resolve()), "base_model": manifest["base_model"]["name"],
               "quantization_trained": manifest.get("quantization"), "prompts_checked": len(prompts),
               "max_abs_logit_diff": diff, "logit_tolerance": LOGIT_TOLERANCE, "greedy_identical": True}
    save_dtype = _save_dtype(dtype, merged)
    return _save_atomically(merged.to(save_dtype), tokenizer, r, out_dir, checked, prompts, new_out)


def _fold_adapter(base_path: str, adapter: Path, tokenizer, prompts):
    """(merged model, max |logit diff|, greedy outputs): the adapter folded into the fp32 base, checked against
    base+adapter; a failed check raises before anything is written."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ref_logits, ref_out = _logits_and_greedy(model, tokenizer, prompts)
    merged = model.merge_and_unload().eval()
    new_logits, new_out = _logits_and_greedy(merged, tokenizer, prompts)
    diff = max((a - b).abs().max().item() for a, b in zip(ref_logits, new_logits, strict=True))
    if diff > LOGIT_TOLERANCE or ref_out != new_out:
        raise SlmtuneError(f"merge check failed: max |logit diff| {diff:.3g} (tolerance {LOGIT_TOLERANCE}), "
                           f"greedy identical: {ref_out == new_out}.", "Nothing was written.")
    return merged, diff, new_out


def _save_dtype(dtype: str, model):
    import torch

    if dtype == "auto":
        return getattr(model.config, "dtype", None) or torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SlmtuneError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}.")
    return getattr(torch, dtype)


def _save_atomically(model, tokenizer, r: Renderer, out_dir: Path, checked: dict, prompts,
                     expected) -> MergeReport:
    from transformers import AutoModelForCausalLM

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(r, tmp)
        write_json(tmp / "slmtune_render.json", render_info(r))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        _, again = _logits_and_greedy(reloaded, tokenizer, prompts)
        report = MergeReport(**checked, saved_dtype=str(model.dtype).removeprefix("torch."),
                             reload_greedy_identical=again == expected)
        write_json(tmp / "merge_report.json", asdict(report))
    return report


def render_info(r: Renderer) -> dict:
    """How training rendered records; serving code must render the same way (see slmtune.render)."""
    return {
        "mode": r.mode,
        "tools": "native chat template" if r.mode == "native" else "appended to the system turn",
        "tools_preamble": None if r.mode == "native" else TOOLS_PREAMBLE,
        "tool_docs": r.tool_docs,
        "tool_line": None if r.mode == "native" else "the tool's JSON spec" if r.tool_docs == "full" else
        'a signature (slmtune.render.tool_signature): name(a: string, b?: array<integer> = 1, c?: "x"|"y") — '
        "parameters in schema order, ? when optional, enums, array items, nested objects and defaults; "
        "no descriptions",
        "tool_call_format": None if r.mode == "native" else
        '<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>',
        "tool_result_format": None if r.mode == "native" else "user turn: <tool_response>\n...\n</tool_response>",
        "chat_template": "the base model's own" if r.mode == "native" else
        "the base template behind a prelude that renders this format (slmtune.export.template)",
        "target": "the last assistant message",
    }
