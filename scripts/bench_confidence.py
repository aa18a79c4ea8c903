#!/usr/bin/env python
"""Per-answer confidence (`slmtune.infer.confidence`): how well each candidate separates right from wrong answers,
and what recording it costs. Reads what other runs wrote; generates only for the cost figure.

    python scripts/bench_confidence.py --reports runs/demo/round-001/eval/*     # AUROC per candidate, per task
    python scripts/bench_confidence.py --bfcl-run runs/bq --target-accuracy 0.9 # a bench_quality.py run, re-scored
    python scripts/bench_confidence.py --cost                                   # recorder vs a SmolLM2 decode step

* `--reports DIR...`: `slmtune eval` report dirs (e.g. a flywheel round's `eval/<task>/`). Per model row with
  confidences: its key metric and each candidate's AUROC against it (`slmtune.eval.selective.auroc`).
* `--bfcl-run DIR`: a `bench_quality.py` out-dir whose slmtune arm ran; its saved eval outputs are scored again by
  BFCL's checker and passed through `bench_quality.selective_figures` (AUROC per candidate, over call answers, and
  the threshold calibrated on one test half judged on the other), with the code of this checkout.
* `--cost`: the log-probability recorder's per-step time (one log-softmax over the vocabulary + a gather) for 1
  and 16 rows, beside one decode step of SmolLM2-135M for one row, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def report_aurocs(dirs: list[Path]) -> list[dict]:
    from slmtune.eval.metrics import key_metric
    from slmtune.eval.selective import auroc, record_scores
    from slmtune.infer.confidence import CANDIDATES

    out = []
    for d in dirs:
        report = json.loads((d / "report.json").read_text())
        lines = [json.loads(x) for x in (d / "predictions.jsonl").open()]
        metric = key_metric(report["task"]["category"])
        for row in lines[0]["outputs"] if lines else []:
            outs = [x["outputs"][row] for x in lines]
            if not all(o.get("confidences") for o in outs):
                continue  # predictions and teacher rows carry no confidence
            scores = record_scores([o["verdicts"] for o in outs], metric)
            out.append({"task": report["task"]["name"], "row": row, "n": len(outs), "metric": metric,
                        "accuracy": round(sum(scores) / len(scores), 3),
                        "auroc": {k: auroc([o["confidences"][k] for o in outs], scores) for k in CANDIDATES}})
            print(f"{out[-1]['task']} [{row}] n={len(outs)} {metric} {out[-1]['accuracy']:.3f}  AUROC "
                  + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} —" for k, v in out[-1]["auroc"].items()))
    return out


def bfcl_rescore(run: Path, target: float) -> dict:
    import bench_quality as bq

    b = bq.bfcl()
    ids = [json.loads(x)["response"]["id"] for x in (run / "logs" / "test.jsonl").open()]
    entries = {e["id"]: e for e in bq.load_entries(b)}
    preds = bq.predictions(run / "eval-slmtune")["tuned"]
    s = bq.selective_figures(b, {i: entries[i] for i in ids}, preds, bq.confidences(run / "eval-slmtune", "tuned"),
                             target)
    bq.print_selective(s)
    return s


def cost() -> dict:
    import torch

    from slmtune.eval.evaluate import load, resolve_model

    torch.set_num_threads(2)
    model, tok = load(resolve_model("smollm2-135m"), dtype="float32")
    vocab = model.get_output_embeddings().weight.shape[0]
    out = {"vocab": vocab}
    for rows in (1, 16):
        scores, prev = torch.randn(rows, vocab), torch.log_softmax(torch.randn(rows, vocab), -1)
        ids = torch.randint(0, vocab, (rows, 1))
        t0 = time.perf_counter()
        for _ in range(200):
            prev.gather(1, ids)
            prev = torch.log_softmax(scores.float(), dim=-1)
        out[f"recorder_ms_{rows}_rows"] = round((time.perf_counter() - t0) / 200 * 1e3, 3)
    ids = tok("The weather in Oslo is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        past = model(ids, use_cache=True).past_key_values
        step = torch.tensor([[ids[0, -1].item()]])
        for _ in range(3):  # warm-up
            model(step, past_key_values=past, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(20):
            model(step, past_key_values=past, use_cache=True)
    out["decode_step_ms_1_row"] = round((time.perf_counter() - t0) / 20 * 1e3, 2)
    out["recorder_share_1_row"] = round(out["recorder_ms_1_rows"] / out["decode_step_ms_1_row"], 5)
    print(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", nargs="*", type=Path, default=[])
    p.add_argument("--bfcl-run", type=Path)
    p.add_argument("--target-accuracy", type=float, default=0.9)
    p.add_argument("--cost", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = p.parse_args()
    if not (a.reports or a.bfcl_run or a.cost):
        p.error("give --reports, --bfcl-run and/or --cost")
    cpu = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "AVX2-only or other"
    results: dict = {"cpu": cpu}
    if a.reports:
        results["reports"] = report_aurocs(a.reports)
    if a.bfcl_run:
        results["bfcl"] = bfcl_rescore(a.bfcl_run, a.target_accuracy)
    if a.cost:
        results["cost"] = cost()
    if a.out:
        from slmtune.io import write_json

        write_json(a.out, results)


if __name__ == "__main__":
    main()
