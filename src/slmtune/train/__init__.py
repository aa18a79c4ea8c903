"""Stage 5: a recipe → a LoRA / QLoRA run directory (`train`), with the data preparation and run files it
uses. torch, transformers, peft and trl are imported inside the functions that need them."""

from __future__ import annotations

from slmtune.device import huge_page_allocations

huge_page_allocations()  # before torch is imported: PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation

from slmtune.train.dataset import Prepared, prepare  # noqa: E402
from slmtune.train.runfiles import read_run  # noqa: E402
from slmtune.train.trainer import TrainResult, dry_run, train  # noqa: E402

__all__ = ["Prepared", "TrainResult", "dry_run", "prepare", "read_run", "train"]
