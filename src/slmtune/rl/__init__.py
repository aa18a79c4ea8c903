"""Stage 6b: reinforcement learning after SFT (`method: grpo`), rewarded by eval's own comparison of each sampled
answer with the teacher's. It stands after eval (its reward is eval's scoring) and before export (which ships
its adapters like any LoRA run's). torch, transformers, peft and trl are imported inside the functions."""

from __future__ import annotations

from slmtune.rl.grpo import from_start, train_grpo
from slmtune.rl.reward import reward

__all__ = ["from_start", "reward", "train_grpo"]
