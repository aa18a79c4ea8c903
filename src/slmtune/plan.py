"""`slmtune plan`: one recipe per task that fits the GPU, with the memory arithmetic in its header.

Per task: the model is the first of the category's preference list (or `--base-model`) whose estimate fits the
budget; then the cheapest way to fit it — bf16 LoRA before QLoRA, no gradient checkpointing before
checkpointing, bigger micro-batches first — with `grad_accum` making up an effective batch of 16 sequences.
`max_length` covers the task's 95th-percentile record (estimated tokens, chars / 3.5) plus 10%, rounded up to a
multiple of 64. On `--gpu cpu` the model is SmolLM2-135M in fp32 and `max_steps` is set so a run takes about
five minutes on two cores.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from slmtune.catalog import CATALOG, ModelSpec, lookup
from slmtune.errors import SlmtuneError
from slmtune.jsonl import atomic_open
from slmtune.memory import GiB, Estimate, Setup, estimate, fmt_gib
from slmtune.recipe import Recipe, dump_recipe_yaml, load_recipe

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
    "extraction": ["qwen3-1.7b", "llama3.2-1b", "qwen3-0.6b", "gemma3-270m", "smollm2-360m", "smollm2-135m"],
    "classification": ["qwen3-0.6b", "gemma3-270m", "smollm2-360m", "smollm2-135m"],
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
class Planned:
    path: Path
    model: str
    quantization: str
    batch_size: int
    grad_accum: int
    max_length: int
    memory_gib: float
    budget_gib: float


def budget_bytes(gpu: str) -> float:
    """Usable memory: 90% of the card (allocator fragmentation) minus 0.5 GiB of CUDA context; CPU: 8 GiB."""
    if gpu not in GPUS:
        raise SlmtuneError(f"--gpu must be one of {', '.join(GPUS)}, got {gpu!r}.")
    return CPU_RAM_BUDGET if gpu == "cpu" else GPUS[gpu] * GiB * 0.9 - 0.5 * GiB


def fit_model(spec: ModelSpec, max_length: int, gpu: str, lora_r: int = 16) -> Fit | None:
    """The cheapest setup of `spec` within the budget, or None when even batch 1 + checkpointing + 4-bit is over."""
    budget = budget_bytes(gpu)
    cpu = gpu == "cpu"
    quants = ["none"] if cpu or spec.gguf else ["none", "4bit"]
    length = min(max_length, spec.context)
    for quant in quants:
        for bs, ckpt in CPU_LADDER if cpu else BATCH_LADDER:
            setup = Setup(quant, cpu, lora_r, bs, length, ckpt)
            est = estimate(spec.arch, setup)
            if est.total <= budget:
                return Fit(spec, setup, est, budget)
    return None


def choose(category: str, max_length: int, gpu: str, base_model: str | None) -> Fit:
    """The model and setup for one task."""
    if base_model:
        spec = lookup(base_model)
        fit = fit_model(spec, max_length, gpu, lora_r=8 if gpu == "cpu" else 16)
        if fit is None:
            raise SlmtuneError(f"--base-model {base_model}: does not fit --gpu {gpu} even at batch 1 with "
                               f"4-bit weights and gradient checkpointing ({max_length} tokens).",
                               "Pick a smaller model or a bigger --gpu.")
        return fit
    names = ["smollm2-135m"] if gpu == "cpu" else PREFERENCE.get(category, PREFERENCE["generation"])
    for name in names:
        fit = fit_model(CATALOG[name], max_length, gpu, lora_r=8 if gpu == "cpu" else 16)
        if fit:
            return fit
    raise SlmtuneError(f"no catalog model fits --gpu {gpu} at {max_length} tokens.", "Use a bigger --gpu.")


def max_length_for(tokens: dict, gpu: str) -> int:
    """p95 tokens + 10%, rounded up to 64, within [128, 4096] (CPU: [128, 512] to finish in minutes)."""
    want = math.ceil(tokens["p95"] * 1.1 / 64) * 64
    return max(128, min(want, 512 if gpu == "cpu" else 4096))


def plan(tasks_dir: str | Path, out_dir: str | Path, gpu: str = "24gb", base_model: str | None = None) -> list[Planned]:
    """Write `<out_dir>/<task>.yaml` for every task in `tasks_dir/index.json`; each is validated on write."""
    tasks_dir, out_dir = Path(tasks_dir), Path(out_dir)
    budget_bytes(gpu)  # reject a bad --gpu before reading anything
    index = _read_json(tasks_dir / "index.json", hint="Run `slmtune cluster CURATED.jsonl -o TASKS_DIR` first.")
    out = []
    for entry in index.get("tasks", []):
        task = _read_json(tasks_dir / entry["dir"] / "task.json", hint="The tasks dir is incomplete: re-run cluster.")
        out.append(plan_task(tasks_dir / entry["dir"], task, out_dir, gpu, base_model))
    return out


def plan_task(task_dir: Path, task: dict, out_dir: Path, gpu: str, base_model: str | None) -> Planned:
    fit = choose(task["category"], max_length_for(task["tokens"], gpu), gpu, base_model)
    recipe = build_recipe(task_dir, task, out_dir, fit, gpu)
    path = out_dir / f"{task['name']}.yaml"
    header = recipe_header(path, task, fit, gpu)
    with atomic_open(path) as f:
        f.write(dump_recipe_yaml(recipe, header))
    load_recipe(path)  # the same check `slmtune train` runs: what we write must load
    s = fit.setup
    return Planned(path, fit.spec.base, s.quantization, s.batch_size, recipe.train.grad_accum,
                   s.max_length, fit.est.total / GiB, fit.budget / GiB)


def build_recipe(task_dir: Path, task: dict, out_dir: Path, fit: Fit, gpu: str) -> Recipe:
    s = fit.setup
    n_train = max(1, task["n_train"])
    train: dict = {"batch_size": s.batch_size, "grad_accum": EFFECTIVE_BATCH // s.batch_size,
                   "gradient_checkpointing": s.grad_ckpt, "epochs": 3 if n_train < 2000 else 1, "lr": 2.0e-4}
    if gpu == "cpu":
        train |= {"epochs": 1, "max_steps": cpu_steps(s.batch_size, s.max_length), "grad_accum": 1,
                  "precision": "fp32"}
    data = {"train": _rel(task_dir / "train.jsonl", out_dir), "max_length": s.max_length, "packing": True}
    if task.get("n_eval"):
        data["eval"] = _rel(task_dir / "eval.jsonl", out_dir)
    raw = {
        "name": task["name"],
        "task": {"name": task["name"], "category": task["category"], "schema": task["schema"],
                 "schema_hash": task["schema_hash"]},
        "model": {"base": fit.spec.base, "quantization": s.quantization,
                  "dtype": "float32" if gpu == "cpu" else "auto"},
        "data": data,
        "lora": {"r": s.lora_r, "alpha": 2 * s.lora_r},
        "train": train,
        "output": {"dir": f"runs/{task['name']}"},
    }
    return Recipe.model_validate(raw)


def cpu_steps(batch_size: int, max_length: int) -> int:
    """Optimizer steps that fit ~5 minutes: 150 tok/s × 300 s = 45k tokens / (batch × max_length) per step."""
    return max(10, CPU_TOKENS_PER_SEC * CPU_SECONDS // (batch_size * max_length))


def recipe_header(path: Path, task: dict, fit: Fit, gpu: str) -> str:
    s = fit.setup
    hw = "CPU (2 cores, fp32)" if gpu == "cpu" else f"one {gpu.upper()} GPU"
    method = "QLoRA (4-bit NF4 base)" if s.quantization == "4bit" else "LoRA"
    lines = [
        f"{method} fine-tune of {fit.spec.hf_id} for task `{task['name']}` ({task['category']}, "
        f"{task['n_train']} train / {task['n_eval']} eval records); written by `slmtune plan`.",
        f"Purpose: replace the LLM on this errand; output schema hash {task['schema_hash'] or '-'}.",
        f"Hardware: {hw}; memory budget {fmt_gib(fit.budget)}.",
        f"Command:  slmtune train {path}",
        f"Override: slmtune train {path} --set train.lr=1e-4 --set train.batch_size={max(1, s.batch_size // 2)}",
        "",
        f"Memory estimate: batch {s.batch_size} × {s.max_length} tokens, gradient checkpointing "
        f"{'on' if s.grad_ckpt else 'off'} (see slmtune.memory for each term):",
        *("  " + x for x in fit.est.lines),
        f"  fits: {fmt_gib(fit.est.total)} ≤ budget {fmt_gib(fit.budget)}",
        f"max_length {s.max_length}: task p95 {task['tokens']['p95']} tokens (chars / 3.5) + 10%, rounded up to 64, "
        f"within [128, {512 if gpu == 'cpu' else 4096}] and the model's {fit.spec.context:,}-token context.",
    ]
    if gpu == "cpu":
        lines.append(f"max_steps: {CPU_TOKENS_PER_SEC} tok/s × {CPU_SECONDS} s / ({s.batch_size} × {s.max_length})"
                     f" = {cpu_steps(s.batch_size, s.max_length)} steps ≈ 5 minutes.")
    return "".join(f"# {x}\n" if x else "#\n" for x in lines)


def _rel(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def _read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise SlmtuneError(f"{path}: no such file.", hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SlmtuneError(f"{path}: not valid JSON ({e}).", hint) from None
