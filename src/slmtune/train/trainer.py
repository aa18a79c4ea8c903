"""`slmtune train`: a recipe in, a LoRA / QLoRA adapter (or, `method: full`, a whole model) and a documented
run directory out.

Run directory (`output.dir`)::

    adapter/            peft adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
    model/              instead, `method: full`: the whole trained model (safetensors) + tokenizer
    checkpoints/        Trainer checkpoints (every `train.save_steps`), what `--resume` continues from
    recipe.yaml         the resolved recipe (absolute paths)
    manifest.json       base model, quantization, render mode, data fingerprints, task tags, library versions
    metrics.json        train/eval loss history, tokens, wall time, tokens/s, peak memory
    loss.png            the loss curve
    tensorboard/        TensorBoard event files (`logging.report_to`, default when tensorboard is installed)
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from slmtune.device import bf16_verdict, cuda, world_size
from slmtune.errors import SlmtuneError
from slmtune.io import write_json
from slmtune.models import clear_gguf_marker, keep_4bit_off_cpu_repacking, load_model, pick_dtype
from slmtune.plan.catalog import from_config_dir
from slmtune.recipe import Recipe, resolve_auto
from slmtune.render import Renderer
from slmtune.train import heap, options, prefix
from slmtune.train.attention import restore, use_packed_attention
from slmtune.train.dataset import Example, Prepared, prepare, step_bins, to_dataset, token_stats
from slmtune.train.flops import linear_weights, peak_flops, training_flops
from slmtune.train.loss import target_loss
from slmtune.train.runfiles import PeakSampler, Phase, last_checkpoint, peak_memory_mb, write_run_files


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    weights_dir: Path  # adapter/ (LoRA, QLoRA) or model/ (`method: full`)
    metrics: dict


def dry_run(recipe: Recipe, out: Console) -> Prepared:
    """Validate recipe and data, show two rendered examples with their loss masks and the token counts."""
    options.check(recipe)
    prep = prepare(recipe)
    for ex in prep.train[:2]:
        out.rule(f"{ex.where}  id={ex.id}")
        out.print(_masked_text(prep.renderer, ex))
    table = Table(title=f"{recipe.name}: {prep.ref.name} · render mode {prep.renderer.mode}")
    for col in ("split", "examples", "tokens", "target tokens", "max tokens", "truncated"):
        table.add_column(col, justify="right")
    for split, exs in (("train", prep.train), ("eval", prep.eval)):
        if exs:
            s = token_stats(exs)
            table.add_row(split, *map(str, (s.n_examples, s.tokens, s.target_tokens, s.max_tokens, s.n_truncated)))
    out.print(table)
    auto = " (auto: the longest record)" if recipe.data.max_length == "auto" else ""
    out.print(f"max_length {prep.max_length}{auto}; records left out (over the cap): {len(prep.left_out)}"
              + (f" — {', '.join(prep.left_out[:5])}{' …' if len(prep.left_out) > 5 else ''}" if prep.left_out else ""))
    a = prep.augment
    if a.shuffled or a.distractors_added or a.irrelevance or a.masked:
        out.print(f"augment: {prep.augment.as_dict()}")
    out.print("[dim]Legend: [green]green[/green] tokens carry the loss; the rest is prompt. Dry run: not training.")
    return prep


def _masked_text(r: Renderer, ex: Example) -> Text:
    text = Text()
    for target, run in groupby(zip(ex.enc.input_ids, ex.enc.labels, strict=True), key=lambda p: p[1] != -100):
        text.append(r.tokenizer.decode([i for i, _ in run]), style="bold green" if target else "dim")
    return text


def train(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train `recipe` into its run directory (see module docstring): four steps, each timed with its peak memory."""
    ckpt = checkpoint_to_resume(recipe, resume)
    options.check(recipe)
    with Phase() as load:
        prep = prepare(recipe)
        # what the run used: `data.max_length`, `method`, `train.epochs` and `train.lr` resolved when `auto`
        # (the run dir's recipe.yaml shows the numbers)
        recipe = resolve_auto(recipe, len(prep.train), _params(prep, recipe), prep.longest, prep.cap)
        trainer, data = _build_trainer(recipe, prep, recipe.output.dir / "checkpoints")
    with PeakSampler() as fit_memory:
        fit = _fit(recipe, trainer, ckpt)
    eval_metrics = trainer.evaluate() if prep.eval else {}
    weights_dir = recipe.output.dir / ("model" if recipe.method == "full" else "adapter")
    if world_size() > 1:
        write_rank_record(recipe.output.dir, trainer)
    if not trainer.is_world_process_zero():
        return TrainResult(recipe.output.dir, weights_dir, {})
    with Phase() as save:
        _save(recipe, prep, trainer, data, weights_dir)
    metrics = _metrics(trainer, prep, fit.wall_s, eval_metrics, resumed_from=ckpt, steps=fit.steps)
    metrics |= _run_facts(recipe, prep, trainer, data, fit.tensors)
    metrics.update(_utilisation(trainer, metrics, fit.device_peak, full=recipe.method == "full"))
    metrics["peak_anon_memory_mb"] = max(load.peak, fit_memory.peak)
    metrics["phases"] = {
        "load": {"wall_s": round(load.wall_s, 2), "peak_rss_mb": load.peak},
        "train": {"wall_s": round(fit.wall_s, 2), "peak_rss_mb": fit_memory.peak,
                  "tokens_per_s": metrics["tokens_per_s"], "mfu": metrics["mfu"]},
        "save": {"wall_s": round(save.wall_s, 2), "peak_rss_mb": save.peak}}
    write_run_files(recipe, prep, metrics)
    return TrainResult(recipe.output.dir, weights_dir, metrics)


def checkpoint_to_resume(recipe: Recipe, resume: bool) -> Path | None:
    """The checkpoint `--resume` continues from; a run dir that holds one needs `--resume`."""
    ckpt_root = recipe.output.dir / "checkpoints"
    ckpt = last_checkpoint(ckpt_root)
    if resume and ckpt is None:
        raise SlmtuneError(f"--resume: no checkpoint in {ckpt_root}.",
                           "Set `train.save_steps` so runs leave checkpoints, or drop --resume.")
    if not resume and ckpt is not None:
        raise SlmtuneError(f"{recipe.output.dir} already holds checkpoints of a run.",
                           "Pass --resume to continue it, or choose another `output.dir`.")
    return ckpt


@dataclass(frozen=True)
class _Fitted:
    steps: int  # optimizer steps this process took (a resumed run takes only the rest)
    wall_s: float  # of `trainer.train` alone
    device_peak: dict  # the matmul peak MFU is measured against (`_device_peak`)
    tensors: Any  # the live-tensor tracker (`train.track_tensor_memory` on the CPU), else None


def _fit(recipe: Recipe, trainer, ckpt: Path | None) -> _Fitted:
    """Run the optimizer steps."""
    counter = _step_counter()
    trainer.add_callback(counter)
    peak = _device_peak(trainer)
    with _tensor_peak(recipe, trainer) as tensors:
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        wall = time.perf_counter() - start
    return _Fitted(counter.steps, wall, peak, tensors)


def _save(recipe: Recipe, prep: Prepared, trainer, data: DataMode, weights_dir: Path) -> None:
    """The trained weights as transformers and peft save them: the training-only patches undone first."""
    model = trainer.model
    if data.packed_attention:
        restore(model.get_base_model() if hasattr(model, "get_base_model") else model, data.packed_attention)
    from slmtune.train.fused import unfuse_lora, unfuse_mlps, unfuse_norms

    unfuse_mlps(model)
    unfuse_norms(model)
    unfuse_lora(model)
    model.__dict__.pop("zero_grad", None)
    model.zero_grad(set_to_none=True)  # keep_gradients' buffers: free before saving
    if recipe.method == "full":
        clear_gguf_marker(model)
    model.save_pretrained(weights_dir)
    prep.renderer.tokenizer.save_pretrained(weights_dir)


def _run_facts(recipe: Recipe, prep: Prepared, trainer, data: DataMode, tensors) -> dict:
    """metrics.json's account of how the run trained: batching, window, augmentation, precision."""
    facts = {
        "batching": {"mode": data.mode, "token_saving": round(data.saving, 4), "forwards": trainer.forwards,
                     "attention": "packed (per sequence)" if data.packed_attention else "transformers",
                     "mlp": "fused silu*up" if data.fused_mlp else "transformers",
                     "norm": "fused rmsnorm" if data.fused_norm else "transformers"},
        "max_length": prep.max_length, "left_out": list(prep.left_out), "augment": prep.augment.as_dict(),
        "precision": precision_choice(recipe) | {"weights_dtype": str(trainer.model.dtype).removeprefix("torch.")},
    }
    if tensors is not None:
        facts["peak_tensor_memory_mb"] = tensors.peak_mb
    return facts


def _params(prep: Prepared, recipe: Recipe) -> int:
    """The base model's parameter count from its config.json (only `method: auto` needs it)."""
    if recipe.method != "auto":
        return 0
    folder = Path(prep.ref.path)
    if not (folder / "config.json").is_file():  # a hub id: its cached config
        from huggingface_hub import hf_hub_download

        folder = Path(hf_hub_download(prep.ref.path, "config.json")).parent
    return from_config_dir(folder).params


@contextmanager
def _tensor_peak(recipe: Recipe, trainer):
    """On the CPU with `train.track_tensor_memory`, count live tensor bytes (see slmtune.train.tensormem)."""
    if not recipe.train.track_tensor_memory or cuda():
        yield None  # on CUDA, peak_memory_mb is the allocator's own peak
        return
    from slmtune.train.tensormem import TensorPeak

    with TensorPeak() as mem:
        mem.track(trainer.model)
        yield mem


def _device_peak(trainer) -> dict:
    """Measured matmul peak in the dtype the run computes in (bf16 under bf16 autocast, else the weights')."""
    import torch

    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else torch.float32
    device = "cuda" if cuda() else "cpu"
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": peak_flops(dtype, device)}


def _utilisation(trainer, metrics: dict, peak: dict, full: bool) -> dict:
    """Achieved model FLOP/s and MFU of this process's training (see slmtune.train.flops for the arithmetic)."""
    n_linear, n_head = linear_weights(trainer.model)
    epochs = metrics["epochs_this_run"]
    share = 1 - metrics["batching"]["token_saving"]  # shared-prefix batches compute fewer token-passes
    flops = training_flops(n_linear, n_head, metrics["train_tokens_per_epoch"] * share * epochs,
                           metrics["target_tokens_per_epoch"] * epochs, full=full)
    achieved = flops / metrics["wall_time_s"] if metrics["wall_time_s"] else 0.0
    return {"model_flops": flops, "achieved_flops_per_s": achieved, "device_peak": peak,
            "mfu": achieved / peak["flops_per_s"] if peak["flops_per_s"] else None}


def _step_counter():
    """A callback counting optimizer steps taken by this process (a resumed run takes only the rest)."""
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepCounter()


def precision_choice(recipe: Recipe) -> dict:
    """Which compute precision runs and why: `metrics.json["precision"]`."""
    p = recipe.train.precision
    if p != "auto":
        return {"requested": p, "used": p, "reason": "set by train.precision"}
    fast, why = bf16_verdict()
    return {"requested": "auto", "used": "bf16" if fast else "fp32", "reason": why}


@dataclass(frozen=True)
class DataMode:
    """How batches are formed (see `_data_mode`) and the datasets and collator that form them."""

    mode: str  # prefix | records | packing
    saving: float  # share of token-passes shared-prefix batches skip (0 otherwise)
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset | None
    collator: Any  # None: TRL's own
    packed_attention: str | None = None  # the attention implementation packed attention replaced, when in use
    fused_mlp: bool = False  # the MLPs run train/fused.py's SiluMul (undone before saving)
    fused_norm: bool = False  # the RMSNorms run train/fused.py's RMSNormFn (undone before saving)


def _build_trainer(recipe: Recipe, prep: Prepared, ckpt_root: Path) -> tuple[Any, DataMode]:
    from peft import LoraConfig

    precision = precision_choice(recipe)["used"]
    data = _data_mode(recipe, prep)
    args = _sft_config(recipe, prep, ckpt_root, precision, data)  # refuses bad values early
    # A full fine-tune updates the weights themselves: a bf16 weight rounds small steps away (a 1e-4 step leaves
    # 44 % of N(0, 0.04²) weights unchanged and rounds the rest). `dtype: auto` keeps fp32 master weights (bf16
    # autocast computes where it is fast, `train.precision`); an explicit `model.dtype: bfloat16` is obeyed.
    full_auto = recipe.method == "full" and recipe.model.dtype == "auto"
    model = load_model(prep.ref, recipe.model.quantization, pick_dtype("float32" if full_auto else recipe.model.dtype),
                       recipe.model.trust_remote_code, fsdp=recipe.distributed.strategy == "fsdp",
                       attn_implementation=recipe.trainer.attn_implementation)
    if recipe.model.quantization == "4bit":
        keep_4bit_off_cpu_repacking(model)
    if data.mode in ("packing", "records") and not recipe.trainer.attn_implementation:
        # each packed sequence attends to itself, no dense mask (train/attention.py); undone before saving
        data = replace(data, packed_attention=use_packed_attention(model))
    from slmtune.train.fused import fuse_mlps, fuse_norms

    if fuse_mlps(model):  # silu(gate) * up as one autograd function: fewer activations kept (train/fused.py)
        data = replace(data, fused_mlp=True)
    if fuse_norms(model):  # RMSNorm keeping its input and scale only (train/fused.py)
        data = replace(data, fused_norm=True)
    lo = recipe.lora
    lora = None if recipe.method == "full" else LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules, use_dora=lo.use_dora,
        use_rslora=lo.use_rslora, task_type="CAUSAL_LM")
    trainer = trainer_class()(
        model=model, args=args, processing_class=prep.renderer.tokenizer, peft_config=lora,
        train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
    )
    from slmtune.train.fused import fuse_lora

    fuse_lora(trainer.model)  # base(x) + scaling·B(A(x)) as one addmm (train/fused.py); undone before saving
    keep_gradients(trainer.model)
    if data.mode == "records":
        trainer.bin_tokens = prep.max_length
    options.point_tensorboard(trainer, recipe.output.dir / "tensorboard")
    return trainer, data


def keep_gradients(model) -> None:
    """Make the Trainer's `model.zero_grad()` zero the gradients in place instead of freeing them.

    With gradients freed after every optimizer step (the default, `set_to_none=True`), the next backward pass
    allocates them anew, in between the activations it frees: for a full fine-tune of SmolLM2-135M that is 0.5 GB
    of fp32 buffers per step that glibc's heap fits around holes, and the process kept 0.3–0.5 GB more resident at
    its peak (an ad-hoc probe: 4.72 vs 4.20–4.45 GB in the same 5 steps of 1,280-token records; same speed). Kept,
    they are allocated once. LoRA's adapter gradients are small either way. `_save` frees them."""
    import functools

    import torch

    model.zero_grad = functools.partial(torch.nn.Module.zero_grad, model, set_to_none=False)


def _data_mode(recipe: Recipe, prep: Prepared) -> DataMode:
    """Shared-prefix batches when they pay (see slmtune.train.prefix), else whole records, a step's records in
    forwards of at most max_length tokens (`records`, see `step_bins`), or
    TRL's padding-free packing into `max_length` bins (`data.packing: true`)."""
    from datasets import Dataset


    wanted = recipe.data.prefix_sharing
    possible = world_size() == 1 and not recipe.train.gradient_checkpointing
    if wanted == "on" and not possible:
        raise SlmtuneError("data.prefix_sharing: on needs one process and train.gradient_checkpointing: false.",
                           "Set data.prefix_sharing: auto.")
    if wanted != "off" and possible:
        plan = prefix.plan_batches([e.enc for e in prep.train], recipe.train.batch_size, recipe.train.seed)
        if wanted == "on" or prefix.worth_it(plan):
            evals = prefix.plan_batches([e.enc for e in prep.eval], recipe.train.batch_size) if prep.eval else None
            return DataMode("prefix", 1 - plan.computed / plan.tokens, Dataset.from_list(plan.batches),
                            Dataset.from_list(evals.batches) if evals else None,
                            prefix.collate(prep.renderer.tokenizer.pad_token_id))
    mode = "packing" if recipe.data.packing else "records"
    return DataMode(mode, 0.0, to_dataset(prep.train), to_dataset(prep.eval) if prep.eval else None, None)


def _sft_config(recipe: Recipe, prep: Prepared, ckpt_root: Path, precision: str, data: DataMode):
    from trl import SFTConfig

    t, pre = recipe.train, data.mode == "prefix"
    pack = data.mode == "packing"
    one = data.mode == "records"  # batch_size records per optimizer step, in forwards of ≤ max_length tokens
    extra = options.trainer_options(recipe)  # `trainer:` keys; slmtune's defaults below give way to them
    defaults = {"logging_first_step": True, "use_liger_kernel": _liger(), "disable_tqdm": False,
                "dataloader_num_workers": 0}
    if recipe.method == "full" and not cuda():
        # A full fine-tune on the CPU: Adam's moments in 8 bits (bitsandbytes, blockwise): 1.0 GB → 0.27 GB for
        # SmolLM2-135M. 277 records × 2 epochs at 1,280 tokens: peak 4.78 GB (fused fp32 AdamW: 8.0 GB before the
        # heap trimming, ~5.0–5.3 with it), held-out loss 0.0463 vs 0.0469, 14 % slower (README, docs/defaults.md).
        # `trainer: {optim: adamw_torch_fused}` takes the fp32 optimizer back.
        defaults["optim"] = "adamw_bnb_8bit"
    kwargs = dict(
        output_dir=str(ckpt_root),
        num_train_epochs=t.epochs, max_steps=t.max_steps, learning_rate=t.lr,
        # Shared-prefix batches are one dataset row. Records mode takes batch_size records per optimizer step and
        # runs them in forwards of at most max_length tokens, whole records each, nothing padded (`step_bins`):
        # a forward holds one bin's activations, not the batch's. Packed bins run one per forward and batch_size
        # of them are accumulated. Losses are normalised over all the step's target tokens (`num_items_in_batch`).
        per_device_train_batch_size=t.batch_size if one else 1, per_device_eval_batch_size=1,
        gradient_accumulation_steps=t.grad_accum * (1 if pre or one else t.batch_size),
        warmup_steps=min(t.warmup_ratio, 0.999),
        lr_scheduler_type=t.scheduler, seed=t.seed, data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (t.eval_steps and prep.eval) else "no", eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda(),
        # records mode: examples are already within max_length (TRL refuses a limit it would not enforce)
        max_length=None if one else prep.max_length, packing=pack, packing_strategy="bfd", padding_free=pack or one,
        dataset_kwargs={"skip_prepare_dataset": True} if pre else None,
        remove_unused_columns=False, prediction_loss_only=True, **options.tracking_args(recipe),
    )
    try:
        return SFTConfig(**kwargs, **(defaults | extra))
    except ValueError as e:
        if not extra:
            raise
        raise SlmtuneError(f"`trainer:` ({', '.join(extra)}): TrainingArguments refused a value: "
                           f"{str(e).splitlines()[0]}") from None


def trainer_class():
    """TRL's SFTTrainer with slmtune's loss: logits only at target positions, shared prefixes run once."""
    from trl import SFTTrainer

    class SlmtuneTrainer(SFTTrainer):
        bin_tokens: int | None = None  # records mode: a step's records run in forwards of at most this many tokens
        trim_heap = not cuda() and heap.available()  # CPU: glibc's heap trimmed after every forward+backward
        forwards = 0  # training forwards run (records mode: bins)

        def training_step(self, model, inputs, num_items_in_batch=None):
            rows = step_bins(inputs, self.bin_tokens) if self.bin_tokens else [inputs]
            self.forwards += len(rows)
            total = None
            for i, row in enumerate(rows):  # gradients accumulate locally; DDP reduces them after the last row
                with self.accelerator.no_sync(model) if i < len(rows) - 1 else nullcontext():
                    loss = super().training_step(model, row, num_items_in_batch)
                total = loss if total is None else total + loss
                if self.trim_heap:  # the forward's activations are freed: give their pages back (train/heap.py)
                    heap.trim()
            return total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = target_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages, the sum is wanted
            return (loss, {"loss": loss}) if return_outputs else loss

    return SlmtuneTrainer


def write_rank_record(run_dir: Path, trainer) -> None:
    """`ranks/rank-N.json`: this rank's view of the adapter after training (DDP ranks must agree)."""
    h = hashlib.sha256()
    n = 0
    for name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
            n += p.numel()
    rank = trainer.args.process_index
    write_json(run_dir / "ranks" / f"rank-{rank}.json", {
        "rank": rank, "world_size": trainer.args.world_size, "trainable_parameters": n,
        "adapter_sha256": h.hexdigest(), "global_step": trainer.state.global_step,
        "backend": trainer.args.ddp_backend or _backend()})


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _liger() -> bool:
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA, when installed."""
    return cuda() and importlib.util.find_spec("liger_kernel") is not None


def _metrics(trainer, prep: Prepared, wall: float, eval_metrics: dict, resumed_from: Path | None,
             steps: int) -> dict:
    state = trainer.state
    history = [h for h in state.log_history if "loss" in h]
    stats = token_stats(prep.train)
    # This process's share of the run (a resumed run only trains the remaining steps).
    epochs_this_run = (state.epoch or 0) * steps / max(state.global_step, 1)
    tokens = epochs_this_run * stats.tokens  # non-pad example tokens trained by this process
    return {
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history],
        "eval_loss": eval_metrics.get("eval_loss"),
        "final_train_loss": history[-1]["loss"] if history else None,
        "global_step": state.global_step,
        "epochs": state.epoch or 0,
        "steps_this_run": steps,
        "epochs_this_run": epochs_this_run,
        "train_examples": stats.n_examples,
        "train_tokens_per_epoch": stats.tokens,
        "target_tokens_per_epoch": stats.target_tokens,
        "tokens_seen": round(tokens),
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "peak_memory_mb": peak_memory_mb(),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "resumed_from_step": int(resumed_from.name.rsplit("-", 1)[1]) if resumed_from else 0,
    }
