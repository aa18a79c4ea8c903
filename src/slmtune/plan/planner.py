"""`slmtune plan`: one recipe per task that fits the GPU, with the memory arithmetic in its header.

Per task: the model is the first of the category's preference list (or `--base-model`) whose estimate fits the
budget; then the cheapest way to fit it — full fine-tuning for models below 0.5 B parameters (`method: auto`'s
rule, `slmtune.recipe.auto_method`) before LoRA, bf16 before QLoRA, no gradient checkpointing before
checkpointing, bigger micro-batches first — with `grad_accum` making up an effective batch of 16 sequences.
Epochs and learning rate are what `train` gives `auto` (2 epochs below 1,000 records, else 1; lr 1e-4 full,
2e-4 LoRA), written out.

`max_length` covers the task's longest training record, measured in the candidate model's own tokens as
`slmtune train` will render it (`slmtune.plan.lengths`: tokenizers + the chat template, no torch), rounded up to a
multiple of 64, within [128, 2048] on the CPU and [128, 4096] on a GPU. A record longer than that cap is not
truncated: it is left out of the recipe's training file (`RECIPES_DIR/data/<task>.train.jsonl`) and counted in
the header and `plan.json`. When records of a tool-calling task go over the cap, they are measured again with
`data.tool_docs: compact` (a signature line per tool instead of its JSON spec: an agent's tool docs are most of
its prompt), and the recipe gets it when that keeps more of them. When the model's tokenizer is not on this
machine, lengths are estimated from characters (cluster's chars / 3.5) and the header says so. On `--gpu cpu`
the model is SmolLM2-135M in fp32 and `max_steps` is set so a run takes about five minutes on two cores.

`--gpu` is cpu, auto (CUDA device 0's memory, else cpu) or any card size such as 12gb or 7.5gb.

Writes `RECIPES_DIR/<task>.yaml` per task and `RECIPES_DIR/plan.json`: `{"gpu", "budget_gib", "planned": [{task,
recipe, model, max_length, lengths}], "failed": [{task, reason}]}` — a task that cannot be planned (every record
over the cap, no model fits) is listed there with its reason, and the other tasks are still planned.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from slmtune.device import MAX_LENGTH_CAP, gpu_gib, gpu_spec
from slmtune.errors import SlmtuneError
from slmtune.io import atomic_open, iter_jsonl, read_json, write_json, write_jsonl
from slmtune.plan.catalog import CATALOG, ModelSpec, lookup
from slmtune.plan.estimate import Estimate, GiB, Setup, estimate, fmt_gib
from slmtune.recipe import AUTO_LR, Recipe, auto_epochs, auto_max_length, auto_method, dump_recipe_yaml, load_recipe

# Common cards, for the tests' sweep; `--gpu` takes any size (`slmtune.device.gpu_spec`).
GPUS = {"cpu": 0, "8gb": 8, "16gb": 16, "24gb": 24, "48gb": 48, "80gb": 80}
CPU_RAM_BUDGET = 8 * GiB  # the flywheel's 2-core box runs other stages beside training
# SmolLM2-135M LoRA (r=8, all-linear), fp32 forward+backward+AdamW on a 2-core box: measured ~105 tokens/s at
# batch 2 × 512 with a second job sharing the cores, so ~150 tokens/s alone is the planning figure;
# 5 minutes ≈ 150 × 300 = 45k tokens.
CPU_TOKENS_PER_SEC = 150
CPU_SECONDS = 300
EFFECTIVE_BATCH = 16
# (micro-batch, gradient checkpointing), cheapest first: checkpointing costs ~30% more compute.
BATCH_LADDER = [(16, False), (8, False), (4, False), (16, True), (8, True), (4, True), (2, False), (2, True),
                (1, False), (1, True)]
# On the CPU, small micro-batches: the same tokens give more optimizer steps in the few minutes there are.
CPU_LADDER = [(4, False), (2, False), (1, False), (4, True), (2, True), (1, True)]
PREFERENCE = {
    "tool_calling": ["qwen3-4b", "llama3.2-3b", "qwen3-1.7b", "llama3.2-1b", "qwen3-0.6b", "smollm2-360m",
                     "smollm2-135m"],
    "coding": ["qwen3-4b", "phi4-mini", "qwen3-1.7b", "qwen3-0.6b", "smollm2-360m", "smollm2-135m"],
    "extraction": ["qwen3-1.7b", "llama3.2-1b", "qwen3-0.6b", "gemma3-270m-it", "smollm2-360m", "smollm2-135m"],
    "classification": ["qwen3-0.6b", "gemma3-270m-it", "smollm2-360m", "smollm2-135m"],
    "summarization": ["qwen3-4b", "llama3.2-3b", "qwen3-1.7b", "gemma3-1b", "qwen3-0.6b", "smollm2-360m",
                      "smollm2-135m"],
    "generation": ["qwen3-4b", "llama3.2-3b", "qwen3-1.7b", "gemma3-1b", "qwen3-0.6b", "smollm2-360m",
                   "smollm2-135m"],
}


@dataclass(frozen=True)
class Fit:
    spec: ModelSpec
    setup: Setup
    est: Estimate
    budget: float


@dataclass(frozen=True)
class Lengths:
    """A task's training records in the candidate model's tokens."""

    source: str  # "tokenizer" (measured) or "estimate" (chars / 3.5: the model's tokenizer is not here)
    max_length: int  # what the recipe gets
    longest: int  # longest record kept
    p95: int
    n_records: int
    dropped: tuple[int, ...] = ()  # line numbers of records over the cap (left out of training)
    tool_docs: str = "full"  # `data.tool_docs`: compact when full tool specs put records over the cap


@dataclass(frozen=True)
class Planned:
    task: str
    path: Path
    model: str
    quantization: str
    batch_size: int
    grad_accum: int
    max_length: int
    memory_gib: float
    budget_gib: float
    lengths: Lengths
    candidates: tuple[Planned, ...] = ()  # --candidates: one recipe per candidate that fits (`<task>@<key>.yaml`)
    unfit: tuple[dict, ...] = ()  # --candidates that do not fit: {"model", "reason"}


@dataclass(frozen=True)
class PlanResult:
    planned: list[Planned]
    failed: list[dict]  # {"task", "reason"}: not planned; the other tasks were


def budget_bytes(gpu: str) -> float:
    """Usable memory: 90% of the card (allocator fragmentation) minus 0.5 GiB of CUDA context; CPU: 8 GiB.
    12gb → 12 × 0.9 − 0.5 = 10.3 GiB."""
    gib = gpu_gib(gpu)
    return CPU_RAM_BUDGET if gib == 0 else gib * GiB * 0.9 - 0.5 * GiB


def fit_model(spec: ModelSpec, max_length: int, gpu: str, lora_r: int = 16) -> Fit | None:
    """The cheapest setup of `spec` within the budget, or None when even batch 1 + checkpointing + 4-bit is over."""
    budget = budget_bytes(gpu)
    cpu = gpu == "cpu"
    quants = ["none"] if cpu or spec.gguf else ["none", "4bit"]
    length = min(max_length, spec.context)
    for quant in quants:
        # `method: auto`'s choice (full fine-tuning for small unquantized models), then LoRA if that does not fit
        for full in dict.fromkeys([auto_method(spec.params, quant) == "full", False]):
            for bs, ckpt in CPU_LADDER if cpu else BATCH_LADDER:
                setup = Setup(quant, cpu, lora_r, bs, length, ckpt, full)
                est = estimate(spec.arch, setup)
                if est.total <= budget:
                    return Fit(spec, setup, est, budget)
    return None


def choose(category: str, max_length: int, gpu: str, base_model: str | None) -> Fit:
    """The model and setup for one task whose records are up to `max_length` tokens."""
    return _first_fit(_candidates(category, gpu, base_model), lambda spec: max_length, gpu, bool(base_model))


def _candidates(category: str, gpu: str, base_model: str | None) -> list[ModelSpec]:
    if base_model:
        return [lookup(base_model)]
    names = ["smollm2-135m"] if gpu == "cpu" else PREFERENCE.get(category, PREFERENCE["generation"])
    return [CATALOG[n] for n in names]


def _first_fit(specs: list[ModelSpec], length_of, gpu: str, asked: bool) -> Fit:
    """The first model whose cheapest setup fits; `length_of(spec)` is the task's max_length in its tokens."""
    for spec in specs:
        fit = fit_model(spec, length_of(spec), gpu, lora_r=8 if gpu == "cpu" else 16)
        if fit:
            return fit
    if asked:
        raise SlmtuneError(f"--base-model {specs[0].key}: does not fit --gpu {gpu} even at batch 1 with "
                           f"4-bit weights and gradient checkpointing ({length_of(specs[0])} tokens).",
                           "Pick a smaller model or a bigger --gpu.")
    raise SlmtuneError(f"no catalog model fits --gpu {gpu} at this task's length.", "Use a bigger --gpu.")


def measure(spec: ModelSpec, train: Path, task: dict, gpu: str) -> Lengths:
    """The task's record lengths in `spec`'s tokens and the max_length that covers them (see module docstring)."""
    from slmtune.plan.lengths import record_lengths, tokenizer_for
    from slmtune.render import make_renderer

    cap = min(MAX_LENGTH_CAP["cpu" if gpu == "cpu" else "gpu"], spec.context)
    tokenizer = tokenizer_for(spec.base)
    if tokenizer is None:
        est = task["tokens"]
        return Lengths("estimate", auto_max_length(est["max"], cap), min(est["max"], cap), est["p95"], task["n_train"])
    lengths, tool_docs = record_lengths(tokenizer, train), "full"
    kept = sorted(x.total for x in lengths if x.total <= cap)
    if len(kept) < len(lengths) and task.get("tools") and make_renderer(tokenizer).mode != "native":
        compact = record_lengths(tokenizer, train, "compact")
        fit = sorted(x.total for x in compact if x.total <= cap)
        if len(fit) > len(kept):
            lengths, kept, tool_docs = compact, fit, "compact"
    if not kept:
        raise SlmtuneError(f"{train}: all {len(lengths)} records are longer than {cap} tokens of {spec.key} "
                           f"(shortest {min((x.total for x in lengths), default=0)}).",
                           "Use a GPU plan (longer cap) or shorten the prompts.")
    p95 = kept[math.ceil(0.95 * len(kept)) - 1]
    dropped = tuple(x.line for x in lengths if x.total > cap)
    return Lengths("tokenizer", auto_max_length(kept[-1], cap), kept[-1], p95, len(lengths), dropped, tool_docs)


def plan(tasks_dir: str | Path, out_dir: str | Path, gpu: str = "24gb", base_model: str | None = None,
         candidates: str | None = None) -> PlanResult:
    """Write `<out_dir>/<task>.yaml` for every task in `tasks_dir/index.json` (each validated on write) and
    `<out_dir>/plan.json`; a task that cannot be planned is listed as failed and the others go on."""
    tasks_dir, out_dir = Path(tasks_dir), Path(out_dir)
    gpu = gpu_spec(gpu)  # "24GB" → "24gb", auto → this machine's; a bad --gpu fails before anything is read
    if base_model and candidates:
        raise SlmtuneError("--base-model and --candidates: give one (a single model, or several to compare).")
    if base_model:
        lookup(base_model)  # an unknown model is the user's mistake, not one task's
    if candidates and candidates != "auto":
        _keys(candidates)  # likewise
    index = read_json(tasks_dir / "index.json", hint="Run `slmtune cluster CURATED.jsonl -o TASKS_DIR` first.")
    planned, failed = [], []
    for entry in index.get("tasks", []):
        task = read_json(tasks_dir / entry["dir"] / "task.json", hint="The tasks dir is incomplete: re-run cluster.")
        try:
            planned.append(plan_task(tasks_dir / entry["dir"], task, out_dir, gpu, base_model, candidates))
        except SlmtuneError as e:
            failed.append({"task": task["name"], "reason": e.message})
    if failed and not planned:
        raise SlmtuneError(f"no task could be planned; {failed[0]['task']}: {failed[0]['reason']}")
    write_json(out_dir / "plan.json", {
        "gpu": gpu, "budget_gib": round(budget_bytes(gpu) / GiB, 2), "failed": failed,
        "planned": [_plan_entry(p) | ({"candidates": [_plan_entry(c) for c in p.candidates], "unfit": list(p.unfit)}
                                      if candidates else {}) for p in planned]})
    return PlanResult(planned, failed)


def _plan_entry(p: Planned) -> dict:
    return {"task": p.task, "recipe": p.path.name, "model": p.model, "max_length": p.max_length,
            "lengths": asdict(p.lengths)}


def plan_task(task_dir: Path, task: dict, out_dir: Path, gpu: str, base_model: str | None,
              candidates: str | None = None) -> Planned:
    measured: dict[str, Lengths] = {}

    def length_of(spec: ModelSpec) -> int:
        if spec.key not in measured:
            measured[spec.key] = measure(spec, task_dir / "train.jsonl", task, gpu)
        return measured[spec.key].max_length

    if not candidates:
        fit = _first_fit(_candidates(task["category"], gpu, base_model), length_of, gpu, bool(base_model))
        return _write_recipe(task_dir, task, out_dir, gpu, fit, measured[fit.spec.key], task["name"])
    fits, unfit = [], []
    for spec in candidate_specs(candidates, task["category"], gpu):
        try:
            fit = fit_model(spec, length_of(spec), gpu, lora_r=8 if gpu == "cpu" else 16)
        except SlmtuneError as e:  # e.g. every record over the cap in this model's tokens
            unfit.append({"model": spec.key, "reason": e.message})
            continue
        if not fit:
            unfit.append({"model": spec.key, "reason": f"does not fit --gpu {gpu} at {length_of(spec)} tokens"})
            continue
        fits.append(fit)
        if candidates == "auto" and gpu != "cpu" and len(fits) == 2:
            break  # on a GPU, `auto` = the category's top two that fit
    if not fits:
        why = "; ".join(f"{u['model']}: {u['reason']}" for u in unfit)
        raise SlmtuneError(f"no --candidates model fits: {why}")
    names = _candidate_names([f.spec.key for f in fits])
    each = tuple(_write_recipe(task_dir, task, out_dir, gpu, f, measured[f.spec.key], f"{task['name']}@{n}")
                 for f, n in zip(fits, names, strict=True))
    primary = _write_recipe(task_dir, task, out_dir, gpu, fits[0], measured[fits[0].spec.key], task["name"])
    return replace(primary, candidates=each, unfit=tuple(unfit))


def _write_recipe(task_dir: Path, task: dict, out_dir: Path, gpu: str, fit: Fit, lengths: Lengths,
                  name: str) -> Planned:
    """`<out_dir>/<name>.yaml` for `fit` (records over the cap left out into `data/<name>.train.jsonl`)."""
    train = task_dir / "train.jsonl"
    if lengths.dropped:
        train = out_dir / "data" / f"{name}.train.jsonl"
        skip = set(lengths.dropped)
        write_jsonl(train, (rec for line, rec in iter_jsonl(task_dir / "train.jsonl") if line not in skip))
    recipe = build_recipe(task_dir, task, out_dir, fit, gpu, train, lengths, run_name=name)
    path = out_dir / f"{name}.yaml"
    header = recipe_header(path, task, fit, gpu, lengths)
    with atomic_open(path) as f:
        f.write(dump_recipe_yaml(recipe, header))
    load_recipe(path)  # the same check `slmtune train` runs: what we write must load
    s = fit.setup
    return Planned(task["name"], path, fit.spec.base, s.quantization, s.batch_size, recipe.train.grad_accum,
                   s.max_length, fit.est.total / GiB, fit.budget / GiB, lengths)


def candidate_specs(candidates: str, category: str, gpu: str) -> list[ModelSpec]:
    """`--candidates`: `auto` = on the CPU the offline models installed here (`slmtune.models.BUILTIN`), on a GPU
    the category's preference list (the caller keeps the first two that fit); else the listed keys/folders."""
    if candidates != "auto":
        return [lookup(k) for k in _keys(candidates)]
    if gpu == "cpu":
        from slmtune.models import installed_builtins

        return [lookup(k) for k in installed_builtins()] or [CATALOG["smollm2-135m"]]
    return [CATALOG[n] for n in PREFERENCE.get(category, PREFERENCE["generation"])]


def _keys(candidates: str) -> list[str]:
    keys = list(dict.fromkeys(k.strip() for k in candidates.split(",") if k.strip()))
    if not keys:
        raise SlmtuneError("--candidates: give auto or a comma-separated list of catalog keys or model folders.")
    for k in keys:
        lookup(k)
    return keys


def _candidate_names(keys: list[str]) -> list[str]:
    """File-safe, unique names for the candidates' recipes and stage folders."""
    out: list[str] = []
    for k in keys:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", k).strip("-") or "model"
        name, i = base, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out.append(name)
    return out


def build_recipe(task_dir: Path, task: dict, out_dir: Path, fit: Fit, gpu: str, train_file: Path,
                 lengths: Lengths, run_name: str | None = None) -> Recipe:
    s = fit.setup
    n_train = max(1, task["n_train"])
    method = "full" if s.full else "lora"
    # the numbers `train` gives `auto` (slmtune.recipe.resolve_auto), written out so the recipe shows them
    train: dict = {"batch_size": s.batch_size, "grad_accum": EFFECTIVE_BATCH // s.batch_size,
                   "gradient_checkpointing": s.grad_ckpt, "epochs": auto_epochs(n_train), "lr": AUTO_LR[method]}
    if gpu == "cpu":
        train |= {"epochs": 1, "max_steps": cpu_steps(s.batch_size, s.max_length), "grad_accum": 1,
                  "precision": "fp32"}
    data = {"train": _rel(train_file, out_dir), "max_length": s.max_length}
    if lengths.tool_docs != "full":
        data["tool_docs"] = lengths.tool_docs
    if task.get("n_eval"):
        data["eval"] = _rel(task_dir / "eval.jsonl", out_dir)
    raw = {
        "name": task["name"],
        "task": {"name": task["name"], "category": task["category"], "schema": task["schema"],
                 "schema_hash": task["schema_hash"]},
        "model": {"base": fit.spec.base, "quantization": s.quantization,
                  "dtype": "float32" if gpu == "cpu" else "auto"},
        "data": data,
        "method": method,
        **({"lora": {"r": s.lora_r, "alpha": 2 * s.lora_r}} if method == "lora" else {}),
        "train": train,
        "output": {"dir": f"runs/{run_name or task['name']}"},
    }
    return Recipe.model_validate(raw)


def cpu_steps(batch_size: int, max_length: int) -> int:
    """Optimizer steps that fit ~5 minutes: 150 tok/s × 300 s = 45k tokens / (batch × max_length) per step."""
    return max(10, CPU_TOKENS_PER_SEC * CPU_SECONDS // (batch_size * max_length))


def recipe_header(path: Path, task: dict, fit: Fit, gpu: str, lengths: Lengths) -> str:
    s = fit.setup
    hw = "CPU (2 cores, fp32)" if gpu == "cpu" else f"one {gpu.upper()} GPU"
    method = "QLoRA (4-bit NF4 base)" if s.quantization == "4bit" else "Full" if s.full else "LoRA"
    lines = [
        f"{method} fine-tune of {fit.spec.hf_id} for task `{task['name']}` ({task['category']}, "
        f"{task['n_train']} train / {task['n_eval']} eval records); written by `slmtune plan`.",
        f"Purpose: replace the LLM on this errand; output schema hash {task['schema_hash'] or '-'}.",
        f"Hardware: {hw}; memory budget {fmt_gib(fit.budget)}.",
        f"Command:  slmtune train {path}",
        f"Override: slmtune train {path} --set train.lr=1e-4 --set train.batch_size={max(1, s.batch_size // 2)}",
        "",
        f"Memory estimate: batch {s.batch_size} × {s.max_length} tokens, gradient checkpointing "
        f"{'on' if s.grad_ckpt else 'off'} (see slmtune.plan.estimate for each term):",
        *("  " + x for x in fit.est.lines),
        f"  fits: {fmt_gib(fit.est.total)} ≤ budget {fmt_gib(fit.budget)}",
        f"max_length {s.max_length}: the longest training record, {lengths.longest} tokens "
        f"({_length_source(lengths, fit.spec)}; p95 {lengths.p95}), rounded up to 64, within [128, "
        f"{min(MAX_LENGTH_CAP['cpu' if gpu == 'cpu' else 'gpu'], fit.spec.context)}].",
    ]
    if lengths.tool_docs == "compact":
        lines.append("data.tool_docs: compact — the offered tools as signature lines, not JSON specs: with full "
                     "specs records went over the cap.")
    if lengths.dropped:
        shown = ", ".join(map(str, lengths.dropped[:10])) + (" ..." if len(lengths.dropped) > 10 else "")
        lines.append(f"Left out: {len(lengths.dropped)} of {lengths.n_records} records longer than that (lines "
                     f"{shown} of {task['name']}/train.jsonl); training reads data/{task['name']}.train.jsonl.")
    if gpu == "cpu":
        lines.append(f"max_steps: {CPU_TOKENS_PER_SEC} tok/s × {CPU_SECONDS} s / ({s.batch_size} × {s.max_length})"
                     f" = {cpu_steps(s.batch_size, s.max_length)} steps ≈ 5 minutes.")
    return "".join(f"# {x}\n" if x else "#\n" for x in lines)


def _length_source(lengths: Lengths, spec: ModelSpec) -> str:
    if lengths.source == "tokenizer":
        return f"measured with {spec.key}'s tokenizer and chat template"
    return f"estimated as chars / 3.5: {spec.key}'s tokenizer is not on this machine"


def _rel(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())
