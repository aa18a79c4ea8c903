#!/usr/bin/env python
"""Training speed: slmtune's defaults vs a plain TRL SFTTrainer baseline, same model, data and LoRA settings.

    python scripts/bench_train.py                      # SmolLM2-135M, 64 weather tool-calling records
    python scripts/bench_train.py --arms baseline-fp32,slmtune     # skip the slow TRL-defaults arm
    python scripts/bench_train.py --model /tmp/tiny --n 32

(a) baseline — written the way TRL's docs show: a conversational prompt/completion dataset (so the loss is on
    the completion, like slmtune's), `SFTTrainer(model, args=SFTConfig(...), train_dataset, peft_config)`, no
    packing, padding per batch, default precision (TRL's SFTConfig defaults: bf16 autocast and gradient
    checkpointing on). Its messages are slmtune-rendered (tools in the system turn), so all arms train on the
    same tokens. Where bf16 is slow (no CUDA, no AVX512-BF16/AMX) this arm trains on the first `--n-defaults`
    (8) records only — tokens/s is a rate and still compares; its losses then are not compared.
(a') baseline-fp32 — the same script with TRL's best precision for a machine without fast bf16: `bf16=False`,
    everything else TRL's defaults (gradient checkpointing stays on). On a CPU without native bf16 (AVX2 only)
    TRL's bf16 default is the single biggest loss, so this arm shows how much of slmtune's lead is *not* just the
    precision choice.
(a'') baseline-tuned — tuned by hand beyond TRL's docs: `bf16=False, gradient_checkpointing=False` (fp32, every
    activation kept: faster than (a') where memory allows).
(b) slmtune — `slmtune.train.trainer.train(recipe)` with default settings (dtype auto: bf16 where it is fast).
(b') slmtune-fp32 / slmtune-bf16 — the same with `train.precision` set to the one `auto` did not pick here, so one
    run measures both precision paths (the default adds the other one; bf16 where it is emulated trains on
    `--n-defaults` records, like (a)).

Each arm runs in its own process, one after the other (clean peak-memory figures, no shared cores). Prints per
arm: trained (non-pad) tokens/s, wall time, peak memory and three losses — the logged mean of the last 3 steps
(the arms batch differently, so this one is noisy), and the trained model's mean target loss on all training
records ("final loss") and on 16 held-out records (same function for every arm) — then slmtune's ratios to
each baseline. Writes `bench_train.json` and `bench_train.png` (loss curves + tokens/s) to `--out-dir`.
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

from slmtune.device import cuda

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def write_records(path: Path, n: int, seed: int, scenario: str = "shared-prefix", max_length: int = 1024,
                  model: str = "smollm2-135m") -> Path:
    """`n` training records of the scenario (seeded; seed 0 = training, 1 = held-out, never overlapping).

    shared-prefix — synthetic weather tool calls: one system prompt and tool list, ~80 % of every record shared;
    heterogeneous — BFCL v4 development-category calls (see bench_quality.py), each with its own tools and prompt,
    as traffic from many agents is; only records that render within `max_length` tokens (none is truncated)."""
    from slmtune.io import write_jsonl

    if scenario == "shared-prefix":
        from slmtune.synthetic.tiny import weather_records

        write_jsonl(path, weather_records(n, seed=seed))
        return path
    write_jsonl(path, heterogeneous_records(n, seed, max_length, model))
    return path


def heterogeneous_records(n: int, seed: int, max_length: int, model: str) -> list[dict]:
    import random

    from bench_quality import bfcl, load_entries, teacher_log

    from slmtune.models import load_tokenizer, resolve_base
    from slmtune.render import encode, make_renderer

    b = bfcl()
    entries = sorted(load_entries(b), key=lambda e: e["id"])
    random.Random(0).shuffle(entries)
    r = make_renderer(load_tokenizer(resolve_base(model)))
    fits = []
    for e in entries:
        log = teacher_log(b, e)
        rec = {"id": e["id"], "messages": [*log["request"]["messages"], log["response"]["choices"][0]["message"]],
               "tools": log["request"]["tools"]}
        if len(encode(r, rec, 1 << 30).input_ids) <= max_length:
            fits.append(rec)
        if len(fits) >= 16 + n + 64:
            break
    return fits[:16] if seed == 1 else fits[16:16 + n]


def records_loss(model, tokenizer, path: Path) -> float:
    """Mean target-token cross-entropy of `model` on the records in `path`, rendered by slmtune (same for all arms)."""
    import torch

    from slmtune.render import make_renderer
    from slmtune.train.dataset import encode_records

    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in encode_records(make_renderer(tokenizer), path, 2048):
            ids = torch.tensor([ex.enc.input_ids])
            labels = torch.tensor([ex.enc.labels])
            out = model(input_ids=ids, labels=labels, use_cache=False)
            k = int((labels[0, 1:] != -100).sum())
            total, n = total + out.loss.item() * k, n + k
    return total / n


def trl_rows(tok, path) -> list[dict]:
    """TRL prompt/completion rows of the records in `path`, their messages rendered as slmtune renders them (tools
    in the system turn, calls as <tool_call> text), so a plain TRL script trains on the same tokens."""
    from slmtune.io import read_jsonl
    from slmtune.records import split_prompt_target
    from slmtune.render import chat_messages, make_renderer

    r = make_renderer(tok)
    rows = []
    for rec in read_jsonl(path):
        prompt, target = split_prompt_target(rec)
        msgs, _ = chat_messages(r, [*prompt, target], rec.get("tools"))
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return rows


def arm_baseline(a, fp32: bool = False, checkpointing: bool = True) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from slmtune.models import load_model, load_tokenizer, resolve_base

    ref = resolve_base(a.model)
    tok = load_tokenizer(ref)
    rows = trl_rows(tok, a.train)
    model = load_model(ref)  # float32 weights; the compute precision is SFTConfig's (bf16 autocast by default)
    args = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
                     learning_rate=a.lr, max_length=a.max_length, logging_steps=1, report_to="none",
                     save_strategy="no", seed=0, use_cpu=not cuda(), lr_scheduler_type="constant",
                     **({"bf16": False} if fp32 else {}),
                     **({} if checkpointing else {"gradient_checkpointing": False}))
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)  # unpadded, as stored
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _result(a, wall, tokens, losses, trainer.model, tok)


def arm_slmtune(a, precision: str = "auto") -> dict:
    # a precision asked for sets the weights' dtype too (`auto` loads bf16 weights where bf16 is fast)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(precision, "auto")
    return _train_slmtune(a, {"name": "bench", "model": {"base": a.model, "dtype": dtype},
                              "data": {"train": a.train, "eval": None, "max_length": a.max_length},
                              "lora": LORA, "train": {"epochs": 1, "lr": a.lr, "batch_size": a.batch_size,
                                                      "scheduler": "constant", "warmup_ratio": 0.0,
                                                      "precision": precision},
                              "output": {"dir": a.out}})


def arm_full(a) -> dict:
    """slmtune's default full fine-tune (`method: full`; lr, epochs, precision and weights dtype `auto`: for
    SmolLM2-135M on < 1,000 records 2 epochs at 1e-4, fp32 master weights, bf16 autocast where bf16 is fast)."""
    return _train_slmtune(a, {"name": "bench-full", "method": "full", "model": {"base": a.model},
                              "data": {"train": a.train, "eval": None, "max_length": a.max_length},
                              "train": {"batch_size": a.batch_size}, "output": {"dir": a.out}})


def _train_slmtune(a, recipe: dict) -> dict:
    import yaml

    from slmtune.recipe import load_recipe
    from slmtune.train.trainer import train

    path = Path(a.out) / "recipe.in.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    result = train(load_recipe(path))
    m = result.metrics
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = recipe.get("method") == "full"
    model = (AutoModelForCausalLM if full else AutoPeftModelForCausalLM).from_pretrained(result.weights_dir)
    tok = AutoTokenizer.from_pretrained(result.weights_dir)
    out = _result(a, m["wall_time_s"], m["tokens_seen"], [h["loss"] for h in m["train_loss"]], model, tok, full,
                  m["epochs"])
    out["batching"] = m["batching"]
    out["precision_used"] = m["precision"]["used"]
    return out


def _result(a, wall: float, tokens: int, losses: list[float], model, tok, full: bool = False,
            epochs: float = 1.0) -> dict:
    """Speed, memory and three losses: the logged mean of the last 3 steps (different batches per arm, so noisy)
    and, with the same function for every arm, the trained model's loss on all training and all held-out records."""
    from slmtune.io import read_jsonl
    from slmtune.render import make_renderer
    from slmtune.train.dataset import encode_records
    from slmtune.train.flops import linear_weights, training_flops
    from slmtune.train.runfiles import peak_memory_mb

    peak = peak_memory_mb()  # the training peak: taken before the loss passes below
    n_records = sum(1 for _ in read_jsonl(a.train)) * epochs
    targets = epochs * sum(ex.enc.n_target for ex in encode_records(make_renderer(tok), Path(a.train), 1 << 30))
    n_linear, n_head = linear_weights(model)
    flops = training_flops(n_linear, n_head, tokens, targets, full)  # useful work: same formula for every arm
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "records_per_s": round(n_records / wall, 4), "model_flops_per_s": round(flops / wall),
            "last_steps_loss": round(sum(losses[-3:]) / len(losses[-3:]), 4),
            "final_loss": (round(records_loss(model, tok, Path(a.train)), 4) if a.scenario == "shared-prefix"
                           else None),  # heterogeneous: held-out loss only (a full pass costs a third of training)
            "heldout_loss": round(records_loss(model, tok, Path(a.eval)), 4),
            "peak_memory_mb": peak, "losses": [round(x, 4) for x in losses]}


def run_arm(name: str, a, folder: Path, n: int) -> dict:
    out = folder / name
    train = write_records(folder / f"train-{n}.jsonl", n, seed=0, scenario=a.scenario, max_length=a.max_length,
                          model=a.model)
    cmd = [sys.executable, __file__, "--arm", name, "--model", a.model, "--train", str(train), "--eval",
           str(a.eval), "--out", str(out), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
           "--max-length", str(a.max_length), "--scenario", a.scenario]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} arm failed:\n{proc.stderr[-3000:]}")
    return {"records": n, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scenario", choices=("heterogeneous", "shared-prefix"), default="heterogeneous",
                   help="heterogeneous: BFCL dev calls, each with its own tools (needs `setup_env.sh bench`); "
                        "shared-prefix: synthetic weather calls sharing one system prompt and tool list")
    p.add_argument("--n", type=int, default=64, help="training records")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--n-defaults", type=int, default=None,
                   help="records for the TRL-defaults arm (default: --n, but 8 where bf16 is slow: on an AVX2-only "
                        "CPU its bf16 autocast runs ~40x slower; tokens/s is still comparable, losses are not)")
    p.add_argument("--out-dir", default="runs/bench", help="where bench_train.json and bench_train.png go")
    p.add_argument("--arms", default=None, help="comma-separated subset of: " + ", ".join(ARMS) + " (default: the "
                   "baselines, slmtune, and slmtune in the other precision: slmtune-fp32 where bf16 is fast, "
                   "slmtune-bf16 on --n-defaults records where it is emulated)")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.arm:
        print(json.dumps(ARMS[a.arm](a)))
        return
    from slmtune.device import bf16_fast
    from slmtune.models import resolve_base

    fast_bf16 = cuda() or bf16_fast()
    other = "slmtune-fp32" if fast_bf16 else "slmtune-bf16"
    a.arms = a.arms or ",".join(["baseline", "baseline-fp32", "baseline-tuned", "slmtune", other])
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if not arms or any(x not in ARMS for x in arms) or not any(x.startswith("slmtune") for x in arms):
        sys.exit(f"--arms: pick from {', '.join(ARMS)} (a slmtune arm included); got {a.arms!r}")
    resolve_base(a.model)  # convert a GGUF once, before timing anything
    n_defaults = a.n_defaults or (a.n if fast_bf16 else min(a.n, 8))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a.eval = write_records(folder / "eval.jsonl", 16, seed=1, scenario=a.scenario, max_length=a.max_length,
                               model=a.model)
        results = {}
        for name in arms:  # one at a time: parallel arms would share the cores and distort each other
            slow_bf16 = name in ("baseline", "slmtune-bf16")  # bf16 emulated without native support: fewer records
            results[name] = run_arm(name, a, folder, n_defaults if slow_bf16 else a.n)
            print(f"{name}: {results[name]}", file=sys.stderr)
    import torch

    from slmtune.train.flops import peak_flops

    peaks = {"fp32": peak_flops(torch.float32, "cuda" if cuda() else "cpu")}
    if fast_bf16:
        peaks["bf16"] = peak_flops(torch.bfloat16, "cuda" if cuda() else "cpu")
    for name, r in results.items():  # the precision each arm computed in: slmtune's from its metrics; TRL's
        # defaults (the baseline arm) autocast to bf16, its other arms run fp32
        r["precision"] = r.pop("precision_used", None) or ("bf16" if name == "baseline" else "fp32")
        peak = peaks.get(r["precision"]) or peak_flops(torch.bfloat16)
        # shared-prefix batches compute each prefix once: count the token-passes actually run
        done = 1 - (r.get("batching") or {}).get("token_saving", 0.0)
        r["mfu"] = round(r["model_flops_per_s"] * done / peak, 4)
    ours = results.get("slmtune") or results[next(x for x in arms if x.startswith("slmtune"))]
    cpu = "CUDA" if cuda() else ("AVX512-BF16/AMX CPU" if bf16_fast() else "AVX2-only CPU (no native bf16)")
    print(f"model {a.model}, scenario {a.scenario}, {a.n} records ({ours['tokens']} tokens), batch {a.batch_size} "
          f"× {a.max_length}, lr {a.lr}, {cpu}; measured matmul peak: "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"{'':15}{'records':>8}{'prec':>6}{'rec/s':>8}{'tokens/s':>10}{'MFU':>7}{'wall s':>9}{'peak MB':>9}"
          f"{'last-3-steps':>14}{'train-set':>11}{'held-out':>10}")
    for name, r in results.items():
        print(f"{name:15}{r['records']:>8}{r['precision']:>6}{r['records_per_s']:>8.3f}{r['tokens_per_s']:>10}"
              f"{r['mfu']:>7.3f}{r['wall_s']:>9}{r['peak_memory_mb']:>9}{r['last_steps_loss']:>14}"
              f"{str(r['final_loss']):>11}{r['heldout_loss']:>10}")
    summary = {"model": a.model, "scenario": a.scenario, "n": a.n, "batch_size": a.batch_size,
               "max_length": a.max_length, "lr": a.lr, "cpu": cpu, "matmul_peak_flops": peaks, "arms": results,
               "slmtune_batching": ours.get("batching")}
    for name, r in results.items():
        if name not in ("slmtune", "slmtune-full") and "slmtune" in results:
            ratios = {"speedup": ours["records_per_s"] / r["records_per_s"],
                      "tokens_per_s_ratio": ours["tokens_per_s"] / r["tokens_per_s"],
                      "peak_memory_ratio": ours["peak_memory_mb"] / r["peak_memory_mb"]}
            if r["records"] == ours["records"]:  # losses compare only after training on the same examples
                ratios |= {"heldout_loss_ratio": ours["heldout_loss"] / r["heldout_loss"],
                           "last_steps_loss_ratio": ours["last_steps_loss"] / r["last_steps_loss"]}
            print(f"slmtune vs {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
            summary[f"vs_{name}"] = {k: round(v, 4) for k, v in ratios.items()}
    print(f"slmtune batching {ours.get('batching')}")
    out = Path(a.out_dir)
    from slmtune.io import write_json

    write_json(out / "bench_train.json", summary)
    plot(results, out / "bench_train.png", f"{a.model}, {a.scenario}: {a.n} records, batch {a.batch_size}")
    print(f"wrote {out / 'bench_train.json'} and {out / 'bench_train.png'}")
    print(json.dumps(summary))


def plot(results: dict, path: Path, title: str) -> None:
    """Training-loss curves of every arm (the curves should overlay) and their tokens/s."""
    from slmtune.plots import pyplot, save_png

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        left.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=name)
    left.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="loss per step")
    left.legend()
    names = list(results)
    right.bar(names, [results[n]["tokens_per_s"] for n in names], color="tab:green")
    right.set(ylabel="trained tokens / s", title="speed")
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


ARMS = {"baseline": arm_baseline, "baseline-fp32": lambda a: arm_baseline(a, fp32=True),
        "baseline-tuned": lambda a: arm_baseline(a, fp32=True, checkpointing=False), "slmtune": arm_slmtune,
        # slmtune in the precision `auto` did not pick on this machine: both precision paths measured in one run
        "slmtune-fp32": lambda a: arm_slmtune(a, "fp32"), "slmtune-bf16": lambda a: arm_slmtune(a, "bf16"),
        # the default full fine-tune (its peak memory; not a default arm: lr and epochs differ from the LoRA arms')
        "slmtune-full": arm_full}


if __name__ == "__main__":
    main()
