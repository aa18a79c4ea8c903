"""`method: grpo`: reinforcement learning after SFT, with TRL's GRPOTrainer and eval's own comparison as reward.

Start: `model.base` is the SFT run directory (a full fine-tune's `model/` is used, and the run's base-model name
and task tags are carried on), or any checkpoint folder (e.g. `slmtune merge`'s output of a LoRA run). A LoRA
adapter (`lora:`, QLoRA with `model.quantization: 4bit`) is trained on top, so the KL term's reference is the SFT
model itself: the adapter switched off (`rl.beta`).

Each step takes `train.batch_size` training prompts (rendered by the template SFT and eval render with), samples
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
from slmtune.train.runfiles import Phase, peak_memory_mb, write_run_files
from slmtune.train.trainer import checkpoint_to_resume, precision_choice

REWARD_NAME = "teacher_agreement"
FORWARD_TOKENS = {"cpu": 4096, "gpu": 32768}  # padded tokens per training forward (`forward_rows`)


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
    if p.name == "model" and (p.parent / "manifest.json").is_file():  # a run's model/: the run (name, task tags)
        p = p.parent
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
    with Phase() as load:
        prep = prepare(recipe)
        prep = replace(prep, ref=BaseRef(str(start.folder), None, start.name))
        recipe = resolve_auto(recipe, len(prep.train), 0, prep.longest, prep.cap)
        category, schema = _task(recipe)
        trainer, rewarded = _build_trainer(recipe, prep, category, schema)
    guard = _collapse_guard(recipe.rl.collapse_patience)
    trainer.add_callback(guard)
    with Phase() as fit:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    weights_dir = recipe.output.dir / "adapter"
    trainer.model.save_pretrained(weights_dir)
    prep.renderer.tokenizer.save_pretrained(weights_dir)
    metrics = _metrics(trainer, recipe, prep, rewarded, fit.wall_s, guard, category)
    metrics["peak_anon_memory_mb"] = max(load.peak, fit.peak)
    metrics["phases"] = {"load": {"wall_s": round(load.wall_s, 2), "peak_rss_mb": load.peak},
                         "train": {"wall_s": round(fit.wall_s, 2), "peak_rss_mb": fit.peak}}
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
    """How many rollouts the reward function scored (metrics.json's `rollouts`, `prompts_seen`)."""

    rollouts: int = 0


def _build_trainer(recipe: Recipe, prep, category: str, schema: Any):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

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
        rewarded.rollouts += len(completion_ids)
        return [reward(category, schema, completion_text(tok, ids, stops), records[i])
                for ids, i in zip(completion_ids, index, strict=True)]

    extra = trainer_options(recipe)
    rollouts = t.batch_size * rl.num_generations  # one optimizer step's answers (× grad_accum)
    # a group's answers share their prompt, run once per forward (`trainer_class`): a forward holds one group
    shared = shares_prompts(model) and not t.gradient_checkpointing  # (checkpointed layers keep no KV cache)
    rows = rl.num_generations if shared else forward_rows(rollouts, prep.max_length + budget)
    kwargs = dict(
        output_dir=str(recipe.output.dir / "checkpoints"), num_train_epochs=t.epochs, max_steps=t.max_steps,
        # one generation of `rollouts` answers per optimizer step, trained in forwards of `rows` answers each
        learning_rate=t.lr, per_device_train_batch_size=rows, steps_per_generation=rollouts // rows,
        gradient_accumulation_steps=t.grad_accum * rollouts // rows, num_generations=rl.num_generations,
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
    trainer = trainer_class()(model=model, reward_funcs=[teacher_agreement], args=args, train_dataset=data,
                              processing_class=tok, peft_config=lora)
    trainer.share_prompts = shared
    point_tensorboard(trainer, recipe.output.dir / "tensorboard")
    return trainer, rewarded


def trainer_class():
    """TRL's GRPOTrainer, with the answers of one prompt scored on one pass of that prompt.

    TRL scores each of a group's `num_generations` answers as prompt + answer, so a forward of G answers runs the
    prompt G times (BFCL prompts are ~600–1,900 tokens, answers ~30–60): the policy's forward and backward and the
    KL reference's forward are mostly the same prompt, again. Here the prompt minus its last token runs once with
    a KV cache, copied (differentiably) to the group's rows, and each row runs only its last prompt token and its
    answer — the same log-probabilities (`tests/rl`), as slmtune's SFT shares a batch's prefix. The fused LM head
    TRL patches in (log-probabilities without full logits, at the sampling temperature) scores the answers.

    For that a forward must hold whole groups, in order: TRL shuffles a generation's answers before cutting them
    into forwards, which only decides which answers share a forward — every forward of a generation feeds the same
    optimizer step (gradient accumulation spans the generation), so the step's gradient is the same sum either way.
    The shuffle is skipped."""
    from trl import GRPOTrainer
    from trl.trainer import grpo_trainer

    class SlmtuneGRPOTrainer(GRPOTrainer):
        share_prompts = True  # False: TRL's own scoring and sampling (gradient checkpointing, MoE, multimodal)

        def _prepare_inputs(self, generation_batch):
            shuffle = grpo_trainer.shuffle_sequence_dict
            grpo_trainer.shuffle_sequence_dict = lambda batch: batch
            try:
                return super()._prepare_inputs(generation_batch)
            finally:
                grpo_trainer.shuffle_sequence_dict = shuffle

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **extra):
            if compute_aux_loss or any(v is not None for v in extra.values()) or not self.share_prompts:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                    **extra)
            return shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy,
                                       self.accelerator.autocast)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            plain = not (self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields)
            if not (plain and self.share_prompts):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            from trl.models import unwrap_model_for_generation

            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             generation_kwargs=self.generation_kwargs,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                             ) as model:
                return sample_groups(model, prompt_ids, self.generation_config, self.eos_token_ids,
                                     self._tokenizer.pad_token_id), None

    return SlmtuneGRPOTrainer


def sample_groups(model, prompt_ids: list[list[int]], config, eos: list[int], pad: int) -> list[list[int]]:
    """Sampled answers to `prompt_ids` (a generation batch: each prompt repeated for its group, consecutively),
    each cut after its first end-of-turn token — what TRL's transformers path returns, with each distinct prompt
    prefilled once instead of once per answer and padded to the batch's longest.

    Each prompt but its last token runs once; its KV cache is left-padded to the longest and copied to its rows,
    and `generate` continues all rows together from there (positions follow the attention mask, so a row's
    cached tokens sit at the positions they were computed at). Four BFCL prompts × 4 answers: the prefill was
    16 × the longest prompt (~30 k tokens), it is the four prompts' own ~2.4 k."""
    import torch
    from transformers import DynamicCache

    distinct: list[list[int]] = []
    rows: list[int] = []  # each row's prompt in `distinct`
    for ids in map(list, prompt_ids):
        if not distinct or distinct[-1] != ids:
            distinct.append(ids)
        rows.append(len(distinct) - 1)
    width = max(map(len, distinct))
    device, was_training = model.device, model.training
    model.eval()
    with torch.no_grad():
        caches = [model(input_ids=torch.tensor([ids[:-1]], device=device), use_cache=True,
                        logits_to_keep=1).past_key_values if len(ids) > 1 else None for ids in distinct]
        index = torch.tensor(rows, device=device)
        cache = DynamicCache(config=model.config)
        for layer in range(model.config.get_text_config(decoder=True).num_hidden_layers):
            keys, values = [], []
            for c in caches:
                k, v = (c.layers[layer].keys, c.layers[layer].values) if c is not None else (None, None)
                keys.append(_left_pad(k, width - 1, model))
                values.append(_left_pad(v, width - 1, model))
            cache.update(torch.cat(keys)[index], torch.cat(values)[index], layer)
        input_ids = torch.tensor([[pad] * (width - len(distinct[r])) + distinct[r] for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(distinct[r])) + [1] * len(distinct[r]) for r in rows], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                             generation_config=config)
    model.train(was_training)
    answers = []
    for row in out[:, width:].tolist():
        end = next((k for k, t in enumerate(row) if t in eos), None)
        answers.append(row if end is None else row[:end + 1])
    return answers


def _left_pad(kv, length: int, model):
    """A cached key or value tensor (1, heads, n, dim) left-padded with zeros to `length` positions (masked out)."""
    import torch

    if kv is None:
        cfg = model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return torch.zeros(1, heads, length, dim, dtype=model.dtype, device=model.device)
    return torch.nn.functional.pad(kv, (0, 0, length - kv.shape[2], 0))


def full_attention(config) -> bool:
    """Every layer attends to the whole context (no sliding window, no linear attention): `sample_groups` lays
    the cache out itself, which a sliding window's rolling cache would not take."""
    config = config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not getattr(config, "sliding_window", None)


def shared_prompt_logps(model, input_ids, attention_mask, n_answer: int, compute_entropy: bool, autocast):
    """Per-token log-probabilities (and entropies) of the last `n_answer` columns (left-padded prompts, right-padded
    answers, as TRL lays them out), each distinct prompt run once (see `trainer_class`)."""
    import torch

    prompts, answers = input_ids[:, :-n_answer], input_ids[:, -n_answer:]
    p_mask, a_mask = attention_mask[:, :-n_answer], attention_mask[:, -n_answer:]
    groups: dict[tuple, list[int]] = {}
    for i in range(input_ids.shape[0]):
        groups.setdefault(tuple(prompts[i][p_mask[i].bool()].tolist()), []).append(i)
    logps = input_ids.new_zeros(answers.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logps) if compute_entropy else None
    for prompt, rows in groups.items():
        n, p = len(rows), len(prompt)
        ids = torch.tensor([prompt], device=input_ids.device)
        with autocast():
            cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values \
                if p > 1 else None
            if p > 1 and cache is None:
                raise SlmtuneError("the model kept no KV cache of the prompt (gradient checkpointing?); slmtune's "
                                   "shared-prompt scoring needs one.")
            if cache is not None:
                cache.batch_repeat_interleave(n)  # a differentiable copy: gradients reach the prompt once per row
            tail = torch.cat([ids[:, -1:].expand(n, 1), answers[rows]], dim=1)
            labels = tail.masked_fill(torch.cat([tail.new_ones(n, 1), a_mask[rows]], dim=1) == 0, -100)
            labels[:, 0] = -100
            mask = torch.cat([a_mask.new_ones(n, p), a_mask[rows]], dim=1)
            out = model(input_ids=tail, attention_mask=mask, past_key_values=cache,
                        position_ids=torch.arange(p - 1, p + n_answer, device=ids.device).expand(n, -1),
                        labels=labels, fused_lm_head=True)
        index = torch.tensor(rows, device=input_ids.device)
        logps = logps.index_copy(0, index, out.log_probs.to(logps.dtype))
        if compute_entropy:
            entropy = entropy.index_copy(0, index, out.entropy.to(entropy.dtype))
    return logps, entropy, None


def shares_prompts(model) -> bool:
    """Whether `shared_prompt_logps` can run `model`: a plain text decoder whose every layer attends to the whole
    context (TRL's own path otherwise: MoE, multimodal, or sliding-window layers such as Gemma 3's, untested)."""
    config = model.config
    return not getattr(config, "vision_config", None) and not getattr(config, "num_experts", None) and \
        full_attention(config)


def forward_rows(rollouts: int, row_tokens: int) -> int:
    """Answers per training forward: the most that keep a forward within `FORWARD_TOKENS` (padded prompt +
    answer, as SFT's records mode keeps a forward within max_length), dividing the step's `rollouts` evenly.
    One forward of all 16 answers to 4 BFCL prompts (~2,300 tokens each, padded) ran a 24 GB CPU out of memory."""
    cap = max(1, FORWARD_TOKENS["gpu" if cuda() else "cpu"] // max(row_tokens, 1))
    return max(d for d in range(1, rollouts + 1) if rollouts % d == 0 and d <= cap)


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


def _metrics(trainer, recipe: Recipe, prep, rewarded: Rewarded, wall: float, guard, category: str) -> dict:
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
        "reward": {"name": REWARD_NAME, "category": category, "terms": WEIGHTS.get(category, TEXT_WEIGHTS)},
    }


def _mean_reward(steps: list[dict]) -> float | None:
    return round(sum(h["reward"] for h in steps) / len(steps), 4) if steps else None


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

