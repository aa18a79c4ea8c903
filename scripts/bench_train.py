#!/usr/bin/env python
"""Training speed: slmtune's defaults vs a plain TRL SFTTrainer baseline, same model, data and LoRA settings.

    python scripts/bench_train.py                      # SmolLM2-135M, 64 weather tool-calling records
    python scripts/bench_train.py --model /tmp/tiny --n 32

(a) baseline — written the way TRL's docs show: a conversational prompt/completion dataset (so the loss is on
    the completion, like slmtune's), `SFTTrainer(model, args=SFTConfig(...), train_dataset, peft_config)`, no
    packing, padding per batch, default precision. Its messages are slmtune-rendered (tools in the system turn),
    so both arms train on the same tokens.
(b) slmtune — `slmtune.train.train(recipe)` with default settings (shared-prefix batches / packing, dtype auto).

Each arm runs in its own process (clean peak-memory figures). Prints trained (non-pad) tokens/s, the ratio,
peak memory, the final training loss (mean of the last 3 logged steps) and the held-out loss of both after
training (same function for both), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def make_data(folder: Path, n: int, n_eval: int) -> tuple[Path, Path]:
    from slmtune.jsonl import write_jsonl
    from slmtune.testing import weather_records

    write_jsonl(folder / "train.jsonl", weather_records(n, seed=0))
    write_jsonl(folder / "eval.jsonl", weather_records(n_eval, seed=1))
    return folder / "train.jsonl", folder / "eval.jsonl"


def heldout_loss(model, tokenizer, eval_path: Path) -> float:
    """Mean target-token cross-entropy on the eval records, rendered by slmtune (identical for both arms)."""
    import torch

    from slmtune.dataset import encode_records

    from slmtune.render import make_renderer

    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in encode_records(make_renderer(tokenizer), eval_path, 2048):
            ids = torch.tensor([ex.enc.input_ids])
            labels = torch.tensor([ex.enc.labels])
            out = model(input_ids=ids, labels=labels, use_cache=False)
            k = int((labels[0, 1:] != -100).sum())
            total, n = total + out.loss.item() * k, n + k
    return total / n


def arm_baseline(a) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from slmtune.jsonl import read_jsonl
    from slmtune.models import load_model, load_tokenizer, resolve_base
    from slmtune.records import split_prompt_target
    from slmtune.render import chat_messages, make_renderer

    ref = resolve_base(a.model)
    tok = load_tokenizer(ref)
    r = make_renderer(tok)
    rows = []
    for rec in read_jsonl(a.train):
        prompt, target = split_prompt_target(rec)
        msgs, _ = chat_messages(r, [*prompt, target], rec.get("tools"))
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    model = load_model(ref)  # default precision: float32 weights, no autocast
    args = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
                     learning_rate=a.lr, max_length=a.max_length, logging_steps=1, report_to="none",
                     save_strategy="no", seed=0, use_cpu=not _cuda(), lr_scheduler_type="constant")
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)  # unpadded, as stored
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _result(wall, tokens, losses, heldout_loss(trainer.model, tok, Path(a.eval)))


def arm_slmtune(a) -> dict:
    import yaml

    from slmtune.recipe import load_recipe
    from slmtune.train import train

    recipe = {"name": "bench", "model": {"base": a.model},
              "data": {"train": a.train, "eval": None, "max_length": a.max_length},
              "lora": LORA, "train": {"epochs": 1, "lr": a.lr, "batch_size": a.batch_size, "scheduler": "constant",
                                      "warmup_ratio": 0.0},
              "output": {"dir": a.out}}
    path = Path(a.out) / "recipe.in.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    result = train(load_recipe(path))
    m = result.metrics
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(result.adapter_dir)
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    out = _result(m["wall_time_s"], m["tokens_seen"], [h["loss"] for h in m["train_loss"]],
                  heldout_loss(model, tok, Path(a.eval)))
    out["batching"] = m["batching"]
    return out


def _result(wall: float, tokens: int, losses: list[float], heldout: float) -> dict:
    from slmtune.runinfo import peak_memory_mb

    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "final_loss": round(sum(losses[-3:]) / len(losses[-3:]), 4), "heldout_loss": round(heldout, 4),
            "peak_memory_mb": peak_memory_mb()}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_arm(name: str, a, folder: Path) -> dict:
    out = folder / name
    cmd = [sys.executable, __file__, "--arm", name, "--model", a.model, "--train", str(a.train), "--eval",
           str(a.eval), "--out", str(out), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
           "--max-length", str(a.max_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} arm failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=64, help="training records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--arm", choices=["baseline", "slmtune"], help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.arm:
        result = arm_baseline(a) if a.arm == "baseline" else arm_slmtune(a)
        print(json.dumps(result))
        return
    from slmtune.models import bf16_fast, resolve_base

    resolve_base(a.model)  # convert a GGUF once, before timing anything
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a.train, a.eval = make_data(folder, a.n, 16)
        base = run_arm("baseline", a, folder)
        ours = run_arm("slmtune", a, folder)
    ratio = ours["tokens_per_s"] / base["tokens_per_s"]
    print(f"model {a.model}, {a.n} records, batch {a.batch_size}, bf16 fast here: {bf16_fast()}")
    print(f"{'':10}{'tokens/s':>10}{'wall s':>9}{'peak MB':>9}{'final loss':>12}{'held-out loss':>15}")
    for name, r in (("TRL", base), ("slmtune", ours)):
        print(f"{name:10}{r['tokens_per_s']:>10}{r['wall_s']:>9}{r['peak_memory_mb']:>9}{r['final_loss']:>12}"
              f"{r['heldout_loss']:>15}")
    print(f"speed-up {ratio:.2f}x; held-out loss ratio {ours['heldout_loss'] / base['heldout_loss']:.3f}; "
          f"slmtune batching {ours.get('batching')}")
    print(json.dumps({"baseline": base, "slmtune": ours, "speedup": round(ratio, 3)}))


if __name__ == "__main__":
    main()
