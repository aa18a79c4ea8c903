#!/usr/bin/env python
"""Peak memory of LoRA vs QLoRA training on the same model, at several sequence lengths.

    python scripts/bench_memory.py                         # SmolLM2-135M at 512/1024/2048 tokens, GC off and on
    python scripts/bench_memory.py --lengths 512 --checkpointing on

Each cell is one `slmtune train` run in its own process (batch 1, a few steps, same records, one after the other)
and reads three figures from `metrics.json`:
  - `peak_tensor_memory_mb` (recipe `train.track_tensor_memory: true`): peak bytes held by torch tensors — weights,
    quantization state, adapters, gradients, optimizer state, activations — what CUDA's max_memory_allocated is
    on a GPU. The fair LoRA-vs-QLoRA comparison, and the ratio printed.
  - `peak_anon_memory_mb`: private process memory (sampled every 20 ms). Unfair to QLoRA on a CPU: LoRA's fp32
    weights stay memory-mapped file pages and are not counted, QLoRA's 4-bit copies are.
  - `peak_memory_mb`: peak RSS (mapped pages counted as far as they were resident).
Prints a Markdown table per checkpointing setting, then one JSON line; writes `bench_memory.json` and
`bench_memory.png` to `--out-dir`.
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
    from slmtune.synthetic.tiny import weather_records

    out = []
    for rec in weather_records(n, seed=2):
        repeat = max(1, (n_tokens - 330) // 24)  # ~24 tokens per filler sentence, ~330 for the rest
        rec["messages"][1]["content"] = FILLER * repeat + rec["messages"][1]["content"]
        out.append(rec)
    return out


def run_cell(folder: Path, model: str, length: int, quant: str, steps: int, ckpt: bool) -> dict:
    from slmtune.io import write_jsonl

    cell = folder / f"{quant}-{length}-{'gc' if ckpt else 'nogc'}"
    cell.mkdir(parents=True)
    write_jsonl(cell / "train.jsonl", records(length, steps))
    recipe = {"name": cell.name, "model": {"base": model, "quantization": quant},
              "data": {"train": "train.jsonl", "max_length": length + 64},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
              "train": {"max_steps": steps, "batch_size": 1, "gradient_checkpointing": ckpt,
                        "track_tensor_memory": True},
              "output": {"dir": str(cell / "run")}}
    (cell / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "slmtune.cli", "train", str(cell / "recipe.yaml")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{cell.name} failed:\n{proc.stderr[-2000:]}")
    m = json.loads((cell / "run" / "metrics.json").read_text())
    tokens = m["train_tokens_per_epoch"] // max(m["train_examples"], 1)
    return {"tensor_mb": m["peak_tensor_memory_mb"], "anon_mb": m["peak_anon_memory_mb"],
            "rss_mb": m["peak_memory_mb"], "tokens": tokens, "tokens_per_s": m["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run: off, on or both")
    p.add_argument("--out-dir", default="runs/bench", help="where bench_memory.json and bench_memory.png go")
    a = p.parse_args()
    from slmtune.io import write_json
    from slmtune.models import resolve_base

    resolve_base(a.model)
    lengths = [int(x) for x in a.lengths.split(",")]
    names = [x.strip() for x in a.checkpointing.split(",") if x.strip()]
    if not names or any(x not in ("off", "on") for x in names):
        sys.exit(f"--checkpointing: off, on or off,on; got {a.checkpointing!r}")
    settings = [x == "on" for x in names]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in settings:
            for length in lengths:
                for quant in ("none", "4bit"):
                    key = f"{quant}-{length}-{'gc' if ckpt else 'nogc'}"
                    results[key] = run_cell(Path(tmp), a.model, length, quant, a.steps, ckpt)
                    print(f"{key}: {results[key]}", file=sys.stderr)
    for ckpt in settings:
        tag = "gc" if ckpt else "nogc"
        print(f"\n{a.model}, batch 1, LoRA r=16 all-linear, gradient checkpointing {'on' if ckpt else 'off'}\n")
        print("| tokens | LoRA tensors MB | QLoRA tensors MB | QLoRA / LoRA | LoRA private MB | QLoRA private MB "
              "| LoRA RSS MB | QLoRA RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for length in lengths:
            lo, q = results[f"none-{length}-{tag}"], results[f"4bit-{length}-{tag}"]
            print(f"| {lo['tokens']} | {lo['tensor_mb']:.0f} | {q['tensor_mb']:.0f} | "
                  f"{q['tensor_mb'] / lo['tensor_mb']:.2f} | {lo['anon_mb']:.0f} | {q['anon_mb']:.0f} "
                  f"| {lo['rss_mb']:.0f} | {q['rss_mb']:.0f} |")
    out = Path(a.out_dir)
    write_json(out / "bench_memory.json", {"model": a.model, "cells": results})
    plot(results, lengths, settings, out / "bench_memory.png", a.model)
    print(f"\nwrote {out / 'bench_memory.json'} and {out / 'bench_memory.png'}")
    print(json.dumps(results))


def plot(results: dict, lengths: list[int], settings: list[bool], path: Path, model: str) -> None:
    """Peak tensor memory vs sequence length: LoRA and QLoRA, with and without gradient checkpointing."""
    from slmtune.plots import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for ckpt in settings:
        tag = "gc" if ckpt else "nogc"
        for quant, label in (("none", "LoRA"), ("4bit", "QLoRA")):
            xs = [results[f"{quant}-{n}-{tag}"]["tokens"] for n in lengths]
            ys = [results[f"{quant}-{n}-{tag}"]["tensor_mb"] for n in lengths]
            ax.plot(xs, ys, marker="o", linestyle="-" if quant == "none" else "--",
                    label=f"{label}{', grad. checkpointing' if ckpt else ''}")
    ax.set(xlabel="tokens per example (batch 1)", ylabel="peak tensor memory (MB)", title=f"{model}: training peak")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=110)


if __name__ == "__main__":
    main()
