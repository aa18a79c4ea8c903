"""Benchmark `slmtune eval` generation: batched vs one-at-a-time on the same records, and a full eval's wall time.

    python scripts/bench_eval.py                      # SmolLM2-135M, 200 weather records, batch 8 & 16
    python scripts/bench_eval.py --model /path/run --n 50 --n-seq 16 --threads 1

Part 1 generates the first `--n-seq` records with the same prompts and `max_new_tokens`: one at a time (plain),
one at a time with the shared-prefix cache, then batched; it prints wall time, tokens/s, the speed-up over plain
one-at-a-time and whether the texts are identical. Part 2 runs the whole `slmtune.eval.evaluate.evaluate` on
`--n` records (model load, generation, scoring, report files) and prints its wall time.
Timings are noisy on a shared machine: run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from slmtune.eval.evaluate import GenSettings, evaluate, load, resolve_model
from slmtune.infer.generate import generate, token_budget, wall_time
from slmtune.io import write_jsonl
from slmtune.render import make_renderer, prompt_text, target_text
from slmtune.synthetic.tiny import weather_records


def compare_batching(model_spec: str, records: list[dict], batch_sizes: list[int]) -> list[dict]:
    """(batch size, shared-prefix cache) runs over the same prompts; the first is plain one-at-a-time."""
    model, tok = load(resolve_model(model_spec))
    r = make_renderer(tok)
    prompts = [prompt_text(r, rec) for rec in records]
    budget = token_budget(tok, [target_text(r, rec) for rec in records])
    generate(model, tok, prompts[:2], 4, batch_size=2)  # warm-up: first-call allocations are not generation
    rows: list[dict] = []
    for bs, share in [(1, False), (1, True), *((b, True) for b in batch_sizes)]:
        gens = generate(model, tok, prompts, budget, batch_size=bs, share_prefix=share)
        wall = wall_time(gens)
        tokens = sum(g.n_tokens for g in gens)
        rows.append({"batch_size": bs, "shared_prefix": share, "records": len(prompts), "max_new_tokens": budget,
                     "wall_s": round(wall, 2), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                     "speedup_vs_one_at_a_time": round(rows[0]["wall_s"] / wall, 2) if rows else 1.0,
                     "same_text_as_one_at_a_time": [g.text for g in gens] == rows[0]["texts"] if rows else True,
                     "texts": [g.text for g in gens]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "texts"}), flush=True)
    return rows


def full_eval(model_spec: str, records: list[dict], batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "weather" / "eval.jsonl"
        write_jsonl(data, records)
        t0 = time.perf_counter()
        report = evaluate(data, Path(d) / "out", model=model_spec, baseline="none",
                          settings=GenSettings(batch_size=batch_size, decoding="free")).report  # as first measured
        wall = time.perf_counter() - t0
    return {"records": len(records), "wall_s": round(wall, 1), "perf": report["models"]["tuned"]["perf"],
            "parse_rate": report["models"]["tuned"]["metrics"]["parse_rate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=200, help="records for the full eval")
    ap.add_argument("--n-seq", type=int, default=48, help="records for the batched-vs-sequential comparison")
    ap.add_argument("--batch-sizes", default="8,16")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the full eval")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); on a machine "
                    "busy with other jobs, 1 avoids OpenMP spin-waiting against them")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    records = weather_records(args.n, seed=7)
    if not args.skip_compare:
        compare_batching(args.model, records[:args.n_seq], [int(b) for b in args.batch_sizes.split(",")])
    if not args.skip_full:
        print(json.dumps({"full_eval": full_eval(args.model, records, args.batch_size)}))


if __name__ == "__main__":
    main()
