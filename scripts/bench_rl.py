#!/usr/bin/env python
"""GRPO speed on the CPU: slmtune's `method: grpo` against TRL's own GRPOTrainer path, same run, same data.

    python scripts/bench_quality.py --arms slmtune --out-dir runs/bq     # an SFT run and the BFCL dev train split
    python scripts/bench_rl.py --sft runs/bq/run --data runs/bq/data/train.jsonl --steps 4

Both arms train the same recipe (`method: grpo`, `model.base` the SFT run, the recipe's defaults: 4 prompts × 4
answers per step, LoRA r 16, bf16 where the CPU has it) for `--steps` optimizer steps, each in a fresh process:

* trl      — TRL's `GRPOTrainer` as it comes: every answer scored as prompt + answer, answers sampled from
             prompts padded to the generation batch's longest, forwards of as many answers as fit 4,096 tokens;
* slmtune  — `slmtune.rl.grpo`: a group's prompt prefilled once for sampling and run once for scoring.

Sampling differs between the arms (different arithmetic, the same seed), so answers differ in length: the
figures are per step and per 1,000 generated tokens. Prints seconds per step, generated tokens per step,
seconds per 1,000 generated tokens, peak RSS, the reward curve, and slmtune's ratio to TRL; writes
`--out-dir/bench_rl.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def arm(name: str, sft: Path, data: Path, steps: int, out: Path) -> dict:
    import yaml

    from slmtune.recipe import load_recipe
    from slmtune.rl import grpo

    if name == "trl":  # TRL's own path: its trainer class, forwards sized by tokens alone
        from trl import GRPOTrainer

        grpo.trainer_class = lambda: GRPOTrainer
        grpo.shares_prompts = lambda model: False
    recipe = {"name": f"bench-rl-{name}", "method": "grpo", "model": {"base": str(sft)}, "data": {"train": str(data)},
              "train": {"max_steps": steps}, "output": {"dir": str(out / name)}, "logging": {"report_to": []}}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    m = grpo.train_grpo(load_recipe(out / f"{name}.yaml")).metrics
    wall = time.perf_counter() - t0
    tokens = sum(h["completion_length"] for h in m["rewards"]) * m["rollouts"] / max(len(m["rewards"]), 1)
    return {"arm": name, "steps": m["global_step"], "train_s": m["wall_time_s"], "wall_s": round(wall, 1),
            "s_per_step": round(m["wall_time_s"] / m["global_step"], 2),
            "generated_tokens": round(tokens), "tokens_per_step": round(tokens / m["global_step"], 1),
            "s_per_1k_generated_tokens": round(1000 * m["wall_time_s"] / tokens, 2) if tokens else None,
            "peak_anon_memory_mb": m["peak_anon_memory_mb"], "peak_rss_mb": m["peak_memory_mb"],
            "rewards": [h["reward"] for h in m["rewards"]], "precision": m["precision"]["used"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, required=True, help="an SFT run directory (a full fine-tune's)")
    p.add_argument("--data", type=Path, required=True, help="the canonical training records")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--arms", default="trl,slmtune")
    p.add_argument("--out-dir", type=Path, default=Path("bench_rl"))
    p.add_argument("--_arm", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a._arm:
        result = arm(a._arm, a.sft.resolve(), a.data.resolve(), a.steps, a.out_dir.resolve())
        (a.out_dir / f"{a._arm}.json").write_text(json.dumps(result))
        return
    import shutil

    results = {}
    for name in [x.strip() for x in a.arms.split(",") if x.strip()]:
        shutil.rmtree(a.out_dir / name, ignore_errors=True)
        print(f"== {name}: {a.steps} GRPO steps", flush=True)
        with (a.out_dir / f"{name}.log").open("w") as log:
            cmd = [sys.executable, __file__, "--_arm", name, "--sft", str(a.sft), "--data", str(a.data), "--steps",
                   str(a.steps), "--out-dir", str(a.out_dir)]
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"arm {name} failed; see {a.out_dir / f'{name}.log'}")
        results[name] = json.loads((a.out_dir / f"{name}.json").read_text())
    cols = ("s_per_step", "tokens_per_step", "s_per_1k_generated_tokens", "peak_anon_memory_mb")
    print(f"\n{'arm':10}" + "".join(f"{c:>28}" for c in cols))
    for name, r in results.items():
        print(f"{name:10}" + "".join(f"{r[c]!s:>28}" for c in cols) + f"   rewards {r['rewards']}")
    if {"trl", "slmtune"} <= set(results):
        t, s = results["trl"], results["slmtune"]
        results["ratio"] = {"per_step": round(t["s_per_step"] / s["s_per_step"], 2),
                            "per_generated_token": round(t["s_per_1k_generated_tokens"]
                                                         / s["s_per_1k_generated_tokens"], 2),
                            "peak_memory": round(s["peak_anon_memory_mb"] / t["peak_anon_memory_mb"], 2)}
        print(f"\nslmtune vs TRL: {results['ratio']['per_step']}× faster per step, "
              f"{results['ratio']['per_generated_token']}× per generated token, "
              f"{results['ratio']['peak_memory']}× the peak memory")
    from slmtune.io import write_json

    write_json(a.out_dir / "bench_rl.json", results)
    print(f"wrote {a.out_dir / 'bench_rl.json'}")


if __name__ == "__main__":
    main()
