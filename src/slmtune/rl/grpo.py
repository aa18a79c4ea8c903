"""`method: grpo`: reinforcement learning after SFT, with TRL's GRPOTrainer and eval's own comparison as reward.

Start: `model.base` is the SFT run directory (a full fine-tune's `model/` is used, and the run's base-model name
and task tags are carried on), or any checkpoint folder (e.g. `slmtune merge`'s output of a LoRA run). A LoRA
adapter (`lora:`, QLoRA with `model.quantization: 4bit`) is trained on top, so the KL term's reference is the SFT
model itself: the adapter switched off (`rl.beta`).

Each step takes `train.batch_size` training prompts (rendered exactly as SFT and eval render them), samples
`rl.num_generations` answers to each at `rl.temperature`, scores every answer against the record's teacher answer
(`slmtune.rl.reward`) and takes a GRPO step (TRL's defaults: DAPO token-level loss, rewards scaled by their group's
standard deviation).

Group collapse: a group whose answers all score alike (all wrong, or all right) has advantage 0 for every answer,
so it is *skipped* — it adds no policy gradient, only the KL pull (TRL's arithmetic, kept). The share of such
groups is logged per step (`frac_reward_zero_std`); when every group of `rl.collapse_patience` logged steps in a
row had none, the run stops early (`metrics.json` `stopped_early`): there is nothing left to learn from, and
further steps would only let the KL and noise move the model. The graded reward makes this rarer than an
all-or-nothing one: wrong answers still differ in format, tool name, argument names and values.

Run directory, as `slmtune train` writes it for a LoRA run (so eval, merge, export and serve take it as one):
`adapter/` + tokenizer, `recipe.yaml`, `manifest.json` (method grpo, `rl`, the SFT start), `metrics.json` (reward
history per step, wall time, minutes per 100 records, peak memory), `reward.png`, `checkpoints/`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slmtune.device import cuda
from slmtune.errors import SlmtuneError
from slmtune.models import BaseRef, load_model, pick_dtype
from slmtune.recipe import Recipe, resolve_auto
from slmtune.render import prompt_text
from slmtune.rl.reward import TEXT_WEIGHTS, WEIGHTS, reward
from slmtune.train import TrainResult, prepare
from slmtune.train.options import check, point_tensorboard, tracking_args, trainer_options
from slmtune.train.runfiles import PeakSampler, peak_memory_mb, write_run_files
from slmtune.train.trainer import checkpoint_to_resume, precision_choice

REWARD_NAME = "teacher_agreement"


@dataclass(frozen=True)
class Start:
    """The SFT model RL starts from."""

    folder: Path  # a checkpoint folder (config.json + weights + tokenizer)
    name: str  # the base model's name, for manifests and model cards
    run: Path | None  # the SFT run directory, when `model.base` named one
    task: dict | None  # its task tags


def start_of(base: str) -> Start:
    """`model.base` of a grpo recipe → the model to start from (see the module docstring)."""
    p = Path(base)
    if (p / "manifest.json").is_file():
        manifest = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
        if (p / "model" / "config.json").is_file():
            return Start(p / "model", manifest["base_model"]["name"], p, manifest.get("task"))
        if (p / "adapter" / "adapter_config.json").is_file():
            raise SlmtuneError(f"model.base: {p} is a LoRA run; RL trains its own adapter on a whole model.",
                               f"Merge it first (slmtune merge {p} -o {p}-merged) and set model.base to that folder.")
        raise SlmtuneError(f"model.base: {p} holds no trained model/ (did the SFT run finish?).")
    if (p / "config.json").is_file():
        return Start(p, _name_of(p), None, None)
    raise SlmtuneError(f"model.base: {base!r} is neither an SFT run directory nor a checkpoint folder.",
                       "method: grpo starts from a trained model: point model.base at `slmtune train`'s output.dir.")


def from_start(recipe: Recipe) -> tuple[Recipe, Start]:
    """The recipe with `model.base` pointing at the start's checkpoint folder, and its task tags when it has none."""
    start = start_of(recipe.model.base)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"base": str(start.folder)})})
    if recipe.task is None and start.task:
        from slmtune.recipe import TaskTags

        recipe = recipe.model_copy(update={"task": TaskTags.model_validate(start.task)})
    return recipe, start


def _name_of(folder: Path) -> str:
    """A merged checkpoint names its base in `merge_report.json` (slmtune merge); else the folder is the name."""
    info = folder / "merge_report.json"
    if info.is_file():
        return json.loads(info.read_text(encoding="utf-8")).get("base_model") or str(folder)
    return str(folder)


def train_grpo(recipe: Recipe, resume: bool = False) -> TrainResult:
    """RL-train `recipe` (method grpo; `model.base` the SFT run or checkpoint) into its run directory."""
    ckpt = checkpoint_to_resume(recipe, resume)
    check(recipe)
    recipe, start = from_start(recipe)
    t0 = time.perf_counter()
    with PeakSampler() as load_mem:
        prep = prepare(recipe)
        prep = replace(prep, ref=BaseRef(str(start.folder), None, start.name))
        recipe = resolve_auto(recipe, len(prep.train), 0, prep.longest, prep.cap)
        category, schema = _task(recipe)
        trainer, rewarded = _build_trainer(recipe, prep, category, schema)
    load_s = time.perf_counter() - t0
    guard = _collapse_guard(recipe.rl.collapse_patience)
    trainer.add_callback(guard)
    with PeakSampler() as fit_mem:
        t1 = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        wall = time.perf_counter() - t1
    weights_dir = recipe.output.dir / "adapter"
    trainer.model.save_pretrained(weights_dir)
    prep.renderer.tokenizer.save_pretrained(weights_dir)
    metrics = _metrics(trainer, recipe, prep, rewarded, wall, guard)
    metrics["peak_anon_memory_mb"] = max(load_mem.peak, fit_mem.peak)
    metrics["phases"] = {"load": {"wall_s": round(load_s, 2), "peak_rss_mb": load_mem.peak},
                         "train": {"wall_s": round(wall, 2), "peak_rss_mb": fit_mem.peak}}
    metrics["start"] = {"folder": str(start.folder), "run": str(start.run) if start.run else None}
    write_run_files(recipe, prep, metrics)
    plot_reward(metrics, recipe.output.dir / "reward.png", recipe.name)
    return TrainResult(recipe.output.dir, weights_dir, metrics)


def _task(recipe: Recipe) -> tuple[str, Any]:
    """The task's category and output schema: the recipe's tags, else eval's reading of the training data."""
    t = recipe.task
    if t is not None and t.category:
        return t.category, t.output_schema
    from slmtune.eval.evaluate import load_task, read_records

    task = load_task(recipe.data.train, read_records(recipe.data.train))
    return task.category, task.schema


@dataclass
class Rewarded:
    """How often the reward function ran, and on how many rollouts (metrics.json's `prompts_seen`)."""

    calls: int = 0
    rollouts: int = 0


def _build_trainer(recipe: Recipe, prep, category: str, schema: Any):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from slmtune.infer.generate import completion_text, stop_ids, token_budget
    from slmtune.render import target_text

    tok = prep.renderer.tokenizer
    records = [e.record for e in prep.train]
    prompts = [_untokenized_bos(tok, prompt_text(prep.renderer, r)) for r in records]
    rl, t = recipe.rl, recipe.train
    budget = token_budget(tok, [target_text(prep.renderer, r) for r in records]) \
        if rl.max_completion_length == "auto" else rl.max_completion_length
    precision = precision_choice(recipe)["used"]
    model = load_model(prep.ref, recipe.model.quantization, pick_dtype(recipe.model.dtype),
                       recipe.model.trust_remote_code, attn_implementation=recipe.trainer.attn_implementation)
    stops = stop_ids(tok, model)
    model.generation_config.eos_token_id = stops  # the template's end of turn ends a rollout, as in eval
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rewarded = Rewarded()

    def teacher_agreement(prompts, completions, completion_ids, index, **_):
        rewarded.calls += 1
        rewarded.rollouts += len(completion_ids)
        return [reward(category, schema, completion_text(tok, ids, stops), records[i])
                for ids, i in zip(completion_ids, index, strict=True)]

    extra = trainer_options(recipe)
    kwargs = dict(
        output_dir=str(recipe.output.dir / "checkpoints"), num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.lr, per_device_train_batch_size=t.batch_size * rl.num_generations,
        gradient_accumulation_steps=t.grad_accum, num_generations=rl.num_generations,
        max_completion_length=budget, beta=rl.beta, temperature=rl.temperature,
        warmup_steps=min(t.warmup_ratio, 0.999), lr_scheduler_type=t.scheduler, seed=t.seed, data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=not cuda(), remove_unused_columns=False, **tracking_args(recipe))
    try:
        args = GRPOConfig(**kwargs, **({"logging_first_step": True, "disable_tqdm": False} | extra))
    except ValueError as e:
        raise SlmtuneError(f"GRPO settings refused: {str(e).splitlines()[0]}",
                           "Check train.batch_size, rl.num_generations and `trainer:` keys.") from None
    lo = recipe.lora
    lora = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                      use_dora=lo.use_dora, use_rslora=lo.use_rslora, task_type="CAUSAL_LM")
    data = Dataset.from_dict({"prompt": prompts, "index": list(range(len(prompts)))})
    trainer = GRPOTrainer(model=model, reward_funcs=[teacher_agreement], args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora)
    point_tensorboard(trainer, recipe.output.dir / "tensorboard")
    return trainer, rewarded


def _untokenized_bos(tok, text: str) -> str:
    """TRL tokenizes string prompts with the tokenizer's special tokens; a template that writes the BOS itself
    (Gemma's `<bos>`) would get two. Drop the written one when the tokenizer adds it."""
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        return text[len(bos):]
    return text


def _collapse_guard(patience: int):
    """Stop when `patience` logged steps in a row had no group with reward variance (module docstring)."""
    from transformers import TrainerCallback

    class CollapseGuard(TrainerCallback):
        run = 0
        stopped_at: int | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            share = (logs or {}).get("frac_reward_zero_std")
            if share is None:
                return
            self.run = self.run + 1 if share >= 1.0 else 0
            if patience and self.run >= patience:
                self.stopped_at = state.global_step
                control.should_training_stop = True

    return CollapseGuard()


def _metrics(trainer, recipe: Recipe, prep, rewarded: Rewarded, wall: float, guard) -> dict:
    state = trainer.state
    steps = [h for h in state.log_history if "reward" in h]
    history = [{"step": h["step"], "reward": round(h["reward"], 4), "reward_std": round(h.get("reward_std", 0), 4),
                "frac_reward_zero_std": h.get("frac_reward_zero_std"), "kl": h.get("kl"),
                "completion_length": h.get("completions/mean_length"), "loss": h.get("loss")} for h in steps]
    prompts = rewarded.rollouts // recipe.rl.num_generations
    quarter = max(1, len(history) // 4)
    return {
        "method": "grpo", "rewards": history, "reward_first_quarter": _mean_reward(history[:quarter]),
        "reward_last_quarter": _mean_reward(history[-quarter:]),
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if h["loss"] is not None],
        "global_step": state.global_step, "epochs": state.epoch or 0, "train_examples": len(prep.train),
        "prompts_seen": prompts, "rollouts": rewarded.rollouts, "wall_time_s": round(wall, 3),
        "minutes_per_100_records": round(wall / 60 / prompts * 100, 2) if prompts else None,
        "stopped_early": None if guard.stopped_at is None else {
            "step": guard.stopped_at, "reason": f"no reward variance in any group for {recipe.rl.collapse_patience} "
                                                "logged steps in a row"},
        "max_length": prep.max_length, "left_out": list(prep.left_out), "peak_memory_mb": peak_memory_mb(),
        "precision": precision_choice(recipe), "eval_loss": None,
        "reward": {"name": REWARD_NAME, "terms": _terms(recipe)},
    }


def _mean_reward(steps: list[dict]) -> float | None:
    return round(sum(h["reward"] for h in steps) / len(steps), 4) if steps else None


def _terms(recipe: Recipe) -> dict:
    category = recipe.task.category if recipe.task else None
    return WEIGHTS.get(category, TEXT_WEIGHTS) if category else {}


def plot_reward(metrics: dict, path: Path, title: str) -> None:
    """Mean reward per step (± its standard deviation over rollouts) and the share of groups without variance."""
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    h = metrics["rewards"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if h:
        steps = [x["step"] for x in h]
        r = [x["reward"] for x in h]
        sd = [x["reward_std"] for x in h]
        ax.plot(steps, r, marker="o", markersize=3, label="mean reward")
        ax.fill_between(steps, [a - b for a, b in zip(r, sd, strict=True)], [a + b for a, b in zip(r, sd, strict=True)],
                        alpha=0.2)
        z = [x["frac_reward_zero_std"] for x in h]
        if all(v is not None for v in z):
            ax.plot(steps, z, linestyle="--", color="tab:gray", label="groups without variance")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (teacher agreement)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{title}: GRPO")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)

