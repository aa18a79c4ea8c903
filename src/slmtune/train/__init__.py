"""Stage 5: a recipe → a LoRA / QLoRA run directory (`train`), with the data preparation and run files it
uses. torch, transformers, peft and trl are imported inside the functions that need them."""

from __future__ import annotations

from slmtune.train.dataset import Prepared, prepare
from slmtune.train.runfiles import read_run
from slmtune.train.trainer import TrainResult, dry_run, train

__all__ = ["Prepared", "TrainResult", "dry_run", "prepare", "read_run", "train"]
