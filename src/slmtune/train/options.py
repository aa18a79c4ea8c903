"""The recipe's `trainer:` and `logging:` sections → TrainingArguments keywords, checked against the installed
transformers before anything loads.

`trainer:` is a free mapping of TrainingArguments fields (`optim`, `weight_decay`, `max_grad_norm`,
`lr_scheduler_kwargs`, `adam_beta1`, `dataloader_num_workers`, ...). The recipe already refuses the keys slmtune
sets from its own sections (`recipe.TRAINER_OWNED`); here every other key must be a field of the installed
TrainingArguments, of its type. `trainer.attn_implementation` is a model-load keyword (`models.load_model`).

`logging:` picks the trackers. By default TensorBoard, when installed, writes its event files to
OUTPUT_DIR/tensorboard (`TENSORBOARD_LOGGING_DIR` wins when set). W&B and MLflow read their own variables
(WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...); `logging.project` fills WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
when they are unset, and `logging.run_name` (default: the recipe's `name`) names the run.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.recipe import Recipe

PROJECT_ENV = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}


def check(recipe: Recipe) -> None:
    """Fail early, before data or model load, on a `trainer:` or `logging:` value transformers would refuse."""
    trainer_options(recipe)
    report_to(recipe)


def trainer_options(recipe: Recipe) -> dict:
    """`trainer:` keys as TrainingArguments keywords (`attn_implementation` excluded: it goes to the model load)."""
    import dataclasses
    import typing

    import transformers
    from pydantic import TypeAdapter, ValidationError
    from transformers import TrainingArguments

    fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    hints = typing.get_type_hints(TrainingArguments)
    options = dict(recipe.trainer.model_extra or {})
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"Did you mean `trainer.{close[0]}`?" if close else "See transformers' TrainingArguments."
            raise SlmtuneError(f"`trainer.{key}`: not a TrainingArguments field (transformers "
                               f"{transformers.__version__}).", hint)
        try:
            TypeAdapter(hints[key]).validate_python(value, strict=True)
        except ValidationError as e:
            raise SlmtuneError(f"`trainer.{key}`: {e.errors()[0]['msg'].lower()} ({hints[key]}), "
                               f"got {value!r}.") from None
    return options


def report_to(recipe: Recipe) -> list[str]:
    """The trackers to report to: `logging.report_to`, or TensorBoard when installed; each must be installed."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    wanted = recipe.logging.report_to
    if wanted is None:
        return ["tensorboard"] if "tensorboard" in installed else []
    if wanted == ["all"]:
        return installed
    for name in wanted:
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            raise SlmtuneError(f"`logging.report_to`: unknown tracker {name!r}.",
                               f"Did you mean {close[0]!r}?" if close else
                               f"Known: {', '.join(INTEGRATION_TO_CALLBACK)}; [] for none.")
        if name not in installed:
            raise SlmtuneError(f"`logging.report_to`: {name} is not installed.",
                               f"Install it (e.g. `pip install {name.replace('_', '-')}`) or drop it from the list.")
    return list(wanted)


def tracking_args(recipe: Recipe) -> dict:
    """report_to / run_name / project for TrainingArguments; `logging.project` fills the trackers' env defaults."""
    trackers, project = report_to(recipe), recipe.logging.project
    for name in trackers:
        if project and name in PROJECT_ENV:
            os.environ.setdefault(PROJECT_ENV[name], project)  # the callbacks read these at train start
    return {"report_to": trackers, "run_name": recipe.logging.run_name or recipe.name,
            **({"project": project} if project else {})}


def point_tensorboard(trainer, log_dir: Path) -> None:
    """TensorBoard's event files go to `log_dir` (transformers' default: OUTPUT_DIR/checkpoints/runs/<date_host>)."""
    from transformers.integrations import TensorBoardCallback

    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(log_dir)
