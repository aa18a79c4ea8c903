#!/usr/bin/env python
"""Peak memory of LoRA vs QLoRA training on the same model, at several sequence lengths.

    python scripts/bench_memory.py                         # SmolLM2-135M at 512/1024/2048 tokens
    python scripts/bench_memory.py --lengths 512 --gradient-checkpointing

Each cell is one `slmtune train` run in its own process (batch 1, a few steps, same records) and reads
`metrics.json`: `peak_anon_memory_mb` (private memory the run allocated, sampled every 20 ms: weights,
activations, optimizer state; mmap-ed checkpoint pages excluded) and `peak_memory_mb` (peak RSS). Prints a
Markdown table and the QLoRA/LoRA ratio per length, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

FILLER = ("The customer wrote again about the delayed parcel, the wrong invoice address and the refund that "
          "never arrived, asking for a precise status and a date. ")


def records(n_tokens: int, n: int) -> list[dict]:
    """Weather tool-calling records padded with a long user message to ~n_tokens SmolLM2 tokens."""
    from slmtune.testing import weather_records

    out = []
    for rec in weather_records(n, seed=2):
        repeat = max(1, (n_tokens - 330) // 24)  # ~24 tokens per filler sentence, ~330 for the rest
        rec["messages"][1]["content"] = FILLER * repeat + rec["messages"][1]["content"]
        out.append(rec)
    return out


def run_cell(folder: Path, model: str, length: int, quant: str, steps: int, ckpt: bool) -> dict:
    from slmtune.jsonl import write_jsonl

    cell = folder / f"{quant}-{length}"
    cell.mkdir(parents=True)
    write_jsonl(cell / "train.jsonl", records(length, steps))
    recipe = {"name": cell.name, "model": {"base": model, "quantization": quant},
              "data": {"train": "train.jsonl", "max_length": length + 64},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
              "train": {"max_steps": steps, "batch_size": 1, "gradient_checkpointing": ckpt},
              "output": {"dir": str(cell / "run")}}
    (cell / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "slmtune.cli", "train", str(cell / "recipe.yaml")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{cell.name} failed:\n{proc.stderr[-2000:]}")
    m = json.loads((cell / "run" / "metrics.json").read_text())
    tokens = m["train_tokens_per_epoch"] // max(m["train_examples"], 1)
    return {"anon_mb": m["peak_anon_memory_mb"], "rss_mb": m["peak_memory_mb"], "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    a = p.parse_args()
    from slmtune.models import resolve_base

    resolve_base(a.model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for length in [int(x) for x in a.lengths.split(",")]:
            for quant in ("none", "4bit"):
                results[f"{quant}-{length}"] = run_cell(Path(tmp), a.model, length, quant, a.steps,
                                                        a.gradient_checkpointing)
    print(f"{a.model}, batch 1, LoRA r=16 all-linear, gradient checkpointing {a.gradient_checkpointing}\n")
    print("| tokens | LoRA peak (private MB) | QLoRA peak (private MB) | QLoRA / LoRA | LoRA peak RSS | QLoRA peak RSS |")
    print("|---|---|---|---|---|---|")
    for length in [int(x) for x in a.lengths.split(",")]:
        lo, q = results[f"none-{length}"], results[f"4bit-{length}"]
        print(f"| {lo['tokens']} | {lo['anon_mb']:.0f} | {q['anon_mb']:.0f} | {q['anon_mb'] / lo['anon_mb']:.2f} "
              f"| {lo['rss_mb']:.0f} | {q['rss_mb']:.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
