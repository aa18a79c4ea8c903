#!/usr/bin/env python
"""Quality on real public data: BFCL v4's development categories as teacher logs, scored by BFCL's own checker.

    python scripts/bench_quality.py                 # default sizes: 39 min, 2-core AVX512-BF16 CPU (README)
    python scripts/bench_quality.py --quick         # ~10 minutes: tiny split, short training
    python scripts/bench_quality.py --arms slmtune --set method=lora    # one ablation of the slmtune arm

Data: the Berkeley Function-Calling Leaderboard (BFCL v4) files shipped in the `bfcl-eval` wheel (installed with
`--no-deps` by `scripts/setup_env.sh bench`; only its data and checker are used). Only the development categories
are read — live_multiple, parallel_multiple, live_parallel, live_parallel_multiple, irrelevance, live_irrelevance;
the other categories are kept for independent checks and are never trained, tuned or chosen on here.

Each BFCL entry becomes one OpenAI chat-completions log (request: its messages + its functions as OpenAI tools,
converted by BFCL's own `convert_to_tool`; response: the teacher's answer): for call categories the teacher calls
the ground truth with the first acceptable value of every argument (an argument whose first acceptable value is
"" — may be omitted — is left out); for the irrelevance categories the teacher answers in text and calls nothing.
Entries are split by a fixed seed, stratified by category, into `--train` and `--test` logs.

Arms, each run the way its user would (the `slmtune` CLI; the slmtune arm with its defaults, unless `--set`
measures an option):

* base         — `slmtune eval --decoding free` of the untuned base model (`--max-new-tokens 160`: it rarely stops
                 by itself), prompted as a user without slmtune would;
* trl          — a plain TRL script written from TRL's docs: `SFTTrainer` on the same training records (messages
                 rendered as slmtune renders them, so the model sees the same tools; prompt/completion format so the
                 loss is on the answer), LoRA r=16 on all linear layers, lr 2e-4, 1 epoch, fp32, TRL's own
                 `max_length` (1,024: its padded batches of 2,048-token records ran out of 24 GB here); merged
                 and evaluated by `slmtune eval --decoding free` (plain greedy generation, what that user has);
* slmtune      — `slmtune ingest` → `slmtune curate` → `slmtune train` on a recipe naming only the model, the data
                 and the output directory (so `method`, `train.epochs`, `train.lr` are `auto`: for SmolLM2-135M on
                 ~100 records a full fine-tune, 2 epochs at 1e-4; docs/defaults.md) → `slmtune eval` with its
                 defaults (tool calls decoded under the llguidance grammar of each record's offered tools, a text
                 answer allowed, as `slmtune serve` decodes them);
* free         — (not run by default) the same model decoded free (`slmtune eval --compare-decodings` compares both in
                 one run): what training alone does.
* rl           — (not run by default) RL after the slmtune arm's SFT: `slmtune train` on a recipe with
                 `method: grpo`, `model.base` the SFT run (or `--sft-run`, one of the same split) and the same
                 training records (the rest `auto`, or `--rl-set`), then `slmtune eval` as the slmtune arm; train
                 time is the RL stage's alone.

Answering only when confident (the slmtune arm, `--target-accuracy A`): each test answer's confidence
candidates (`slmtune.infer.confidence`: min_prob, mean_prob, first_prob) are scored by their AUROC against BFCL's
verdict (correct vs not) over every test record. Then the test records are dealt into two halves by position
(sorted by id, alternating): the default candidate's threshold is calibrated on the calibration half
(`slmtune.eval.selective.calibrate`: the lowest whose answered records' 90 % lower bound of BFCL accuracy reaches
A), and applied to the other half, which reports the share the SLM answered (coverage) and those answers' BFCL
accuracy, beside the raw accuracy of answering every call. Then the halves swap and both are reported. As
serving does, only answers that call a tool count as answered: a text answer ("none of the offered functions
fits") goes to the LLM whatever its confidence (`slmtune.eval.selective.servable`), even when it is right, and so
does a call holding a scrub placeholder (`<SECRET_1>`: curate scrubbed the training logs) that its prompt does not.

Scoring: every prediction (an OpenAI assistant message) is decoded as BFCL decodes an OpenAI function-calling
model's output (`[{name: arguments}]`) and checked by `bfcl_eval`'s `ast_checker` against the category's possible
answers; an irrelevance entry is correct when the model makes no call (BFCL's relevance rule, `is_empty_output`).
Per category × arm: parse rate (every call has a name and JSON-object arguments; a text answer parses),
accuracy (AST for call categories, abstention for irrelevance), and train time. "calls" = all call categories
together, "overall" = every test entry. Writes `bench_quality.json` and `bench_quality.png` to `--out-dir`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

CATEGORIES = ("live_multiple", "parallel_multiple", "live_parallel", "live_parallel_multiple", "irrelevance",
              "live_irrelevance")
IRRELEVANCE = ("irrelevance", "live_irrelevance")
NO_CALL = "None of the offered functions fits this request, so I cannot call one."
ARMS = ("base", "trl", "slmtune", "free", "rl")
DEFAULT_ARMS = ("base", "trl", "slmtune")
# The untuned model rarely stops on its own: it would fill the whole budget (1.5 × the longest test target + 16,
# ~330 tokens) on most records. Its answers are cut at 160 tokens, which only a few parallel calls need more than.
BASE_MAX_NEW_TOKENS = 160
MODEL_NAME = "slmtune-bench"  # BFCL's checker asks this name's config: OpenAI-style (dots in names became "_")


# ----------------------------------------------------------------------------- BFCL (data and checker)
def bfcl():
    """bfcl_eval's data folder, checker and helpers. Its model registry (`constants.model_config`) imports every
    provider SDK; the AST checker reads one flag from it, so that module is replaced by a one-entry stand-in."""
    import types

    class Config:
        underscore_to_dot = True  # as for OpenAI function-calling models: "a.b" is offered and called as "a_b"

    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = collections.defaultdict(Config)
    sys.modules.setdefault("bfcl_eval.constants.model_config", stub)
    try:
        import bfcl_eval
        from bfcl_eval.constants.enums import Language, ModelStyle
        from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.model_handler.utils import convert_to_tool
        from bfcl_eval.utils import is_empty_output, is_function_calling_format_output
    except ImportError as e:
        sys.exit(f"bench_quality needs bfcl-eval ({e}): run `bash scripts/setup_env.sh bench`.")
    return types.SimpleNamespace(
        data=Path(bfcl_eval.__file__).parent / "data", Language=Language, ast_checker=ast_checker,
        tools=lambda fns: convert_to_tool(fns, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS),
        is_empty_output=is_empty_output, is_call_format=is_function_calling_format_output)


def load_entries(b) -> list[dict]:
    entries = []
    for cat in CATEGORIES:
        answers = {}
        pa = b.data / "possible_answer" / f"BFCL_v4_{cat}.json"
        if pa.is_file():
            for line in pa.read_text().splitlines():
                a = json.loads(line)
                answers[a["id"]] = a["ground_truth"]
        for line in (b.data / f"BFCL_v4_{cat}.json").read_text().splitlines():
            e = json.loads(line)
            entries.append({**e, "category": cat, "ground_truth": answers.get(e["id"])})
    return entries


def split(entries: list[dict], n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified by category: each category's share of the test and train sets is its share of the data."""
    by = collections.defaultdict(list)
    for e in entries:
        by[e["category"]].append(e)
    train, test = [], []
    for cat in CATEGORIES:
        items = sorted(by[cat], key=lambda e: e["id"])
        random.Random(f"{seed}:{cat}").shuffle(items)
        share = len(items) / len(entries)
        k_test = max(2, round(n_test * share))
        k_train = max(1, round(n_train * share))
        test += items[:k_test]
        train += items[k_test:k_test + k_train]
    return train, test


def first_value(v):
    """The teacher's value: the first acceptable one, recursively for nested objects ("" = may be omitted)."""
    if isinstance(v, dict):  # each key's acceptable values; a few entries hold a plain value there instead
        return {k: first_value(vals[0] if isinstance(vals, list) else vals) for k, vals in v.items()
                if not isinstance(vals, list) or (vals and vals[0] != "")}
    if isinstance(v, list):
        return [first_value(x) for x in v]
    return v


def teacher_log(b, e: dict) -> dict:
    messages = e["question"][0]
    if e["ground_truth"] is None:
        answer = {"role": "assistant", "content": NO_CALL}
        finish = "stop"
    else:
        calls = [{"id": f"call_{i}", "type": "function",
                  "function": {"name": name.replace(".", "_"),
                               "arguments": json.dumps({k: first_value(vals[0]) for k, vals in args.items()
                                                        if vals and vals[0] != ""}, ensure_ascii=False)}}
                 for i, gt in enumerate(e["ground_truth"]) for name, args in gt.items()]
        answer = {"role": "assistant", "content": None, "tool_calls": calls}
        finish = "tool_calls"
    return {"id": f"log-{e['id']}", "metadata": {"bfcl_category": e["category"]},
            "request": {"model": "teacher", "messages": messages, "tools": b.tools(e["function"])},
            "response": {"id": e["id"], "object": "chat.completion", "model": "teacher",
                         "choices": [{"index": 0, "message": answer, "finish_reason": finish}]}}


def decode_calls(message: dict | None) -> tuple[list[dict], bool]:
    """An OpenAI assistant message's calls as BFCL reads a function-calling model's output: `[{name: arguments}]`,
    and whether every call parsed (a string name, JSON-object arguments); unparsed calls are left out."""
    decoded, parsed = [], True
    for c in (message or {}).get("tool_calls") or []:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError):
            args = None
        if not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            parsed = False
            continue
        decoded.append({fn["name"]: args})
    return decoded, parsed


def score(b, e: dict, message: dict | None) -> dict:
    """{parsed, correct, calls} for one prediction, by BFCL's rules."""
    calls = (message or {}).get("tool_calls") or []
    decoded, parsed = decode_calls(message)
    if e["category"] in IRRELEVANCE:
        made_call = bool(calls) and not (parsed and b.is_empty_output(decoded))
        return {"parsed": parsed, "correct": not made_call, "calls": len(calls)}
    if not parsed or not decoded or not b.is_call_format(decoded):
        return {"parsed": parsed, "correct": False, "calls": len(calls)}
    try:
        res = b.ast_checker(e["function"], decoded, e["ground_truth"], b.Language.PYTHON, e["category"], MODEL_NAME)
        ok = bool(res["valid"])
    except Exception:  # the checker raises on some malformed outputs: a wrong answer, as BFCL counts it
        ok = False
    return {"parsed": parsed, "correct": ok, "calls": len(calls)}


# ----------------------------------------------------------------------------- the arms
def slmtune(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "slmtune.cli", *map(str, args)]
    print("$", "slmtune", " ".join(map(str, args)), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"slmtune {args[0]} failed (exit {rc}); see {log}")


def confidences(report_dir: Path, row: str) -> dict[str, dict[str, float]]:
    """{record id: {candidate: confidence}} of one row of an eval report's predictions.jsonl."""
    out = {}
    for line in (report_dir / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        out[p["id"]] = p["outputs"][row].get("confidences") or {}
    return out


def selective_figures(b, by_id: dict[str, dict], preds: dict[str, dict], conf: dict[str, dict], target: float
                      ) -> dict:
    """AUROC per confidence candidate against BFCL's verdict, and the calibrated threshold of the default
    candidate judged on the half of the test records that did not set it (both ways round)."""
    from slmtune.eval.selective import auroc, calibrate, servable
    from slmtune.infer.confidence import CANDIDATES, DEFAULT

    ids = sorted(rid for rid in by_id if rid in preds and conf.get(rid))
    correct = {rid: float(score(b, by_id[rid], preds[rid])["correct"]) for rid in ids}
    served = {rid: conf[rid][DEFAULT] if servable("tool_calling", preds[rid], by_id[rid]["question"]) else None
              for rid in ids}
    calls = [r for r in ids if served[r] is not None]
    out = {"n": len(ids), "auroc": {k: auroc([conf[r][k] for r in ids], [correct[r] for r in ids])
                                    for k in CANDIDATES},
           "calls": len(calls), "calls_right": int(sum(correct[r] for r in calls)),
           "auroc_calls": auroc([served[r] for r in calls], [correct[r] for r in calls]),
           "default": DEFAULT, "target": target, "halves": []}
    halves = [ids[0::2], ids[1::2]]
    for cal, held in (halves, halves[::-1]):
        c = calibrate([served[r] for r in cal], [correct[r] for r in cal], target)
        answered = [r for r in held if c["threshold"] is not None and served[r] is not None
                    and served[r] >= c["threshold"]]
        out["halves"].append({
            "calibrated_on": len(cal), "threshold": c["threshold"], "lower_bound": c["lower_bound"],
            "judged_on": len(held), "answered": len(answered), "coverage": round(len(answered) / len(held), 3),
            "accuracy": round(sum(correct[r] for r in answered) / len(answered), 3) if answered else None,
            "raw_accuracy": round(sum(correct[r] for r in held) / len(held), 3),
            "by_category": dict(collections.Counter(by_id[r]["category"] for r in answered))})
    return out


def predictions(report_dir: Path) -> dict[str, dict[str, dict]]:
    """{row name: {record id: predicted message}} from an eval report's predictions.jsonl."""
    rows: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for line in (report_dir / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        for row, out in p["outputs"].items():
            rows[row][p["id"]] = out.get("message")
    return rows


def arm_trl(a) -> None:
    """The plain TRL script (run in its own process): train, merge, save a checkpoint `slmtune eval` can load."""
    from bench_train import trl_rows  # the same rows bench_train's TRL arms train on
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from slmtune.models import clear_gguf_marker, load_model, load_tokenizer, resolve_base

    ref = resolve_base(a.model)
    tok = load_tokenizer(ref)
    rows = trl_rows(tok, a.trl_train)
    model = load_model(ref)
    args = SFTConfig(output_dir=str(a.trl_out / "trainer"), per_device_train_batch_size=4, num_train_epochs=1,
                     learning_rate=2e-4, logging_steps=5, report_to="none", save_strategy="no",
                     seed=0, bf16=False, gradient_checkpointing=False)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    merged = trainer.model.merge_and_unload()
    clear_gguf_marker(merged)
    merged.save_pretrained(a.trl_out / "model")
    tok.save_pretrained(a.trl_out / "model")
    (a.trl_out / "train.json").write_text(json.dumps({"train_time_s": round(wall, 1), "records": len(rows)}))


def run(a) -> dict:
    b = bfcl()
    work = a.out_dir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    train_e, test_e = split(load_entries(b), a.train, a.test, a.seed)
    by_id = {e["id"]: e for e in test_e}
    for name, es in (("train", train_e), ("test", test_e)):
        (work / "logs").mkdir(exist_ok=True)
        (work / "logs" / f"{name}.jsonl").write_text("".join(json.dumps(teacher_log(b, e)) + "\n" for e in es))
    print(f"BFCL dev split (seed {a.seed}): {len(train_e)} train, {len(test_e)} test logs "
          f"({dict(collections.Counter(e['category'] for e in test_e))})", flush=True)

    data = work / "data"
    data.mkdir(exist_ok=True)
    slmtune("ingest", work / "logs" / "train.jsonl", "-o", data / "ingested.jsonl", log=log)
    slmtune("curate", data / "ingested.jsonl", "-o", data / "train.jsonl", "--report", data / "curate.json",
            log=log)
    (data / "test").mkdir(exist_ok=True)
    slmtune("ingest", work / "logs" / "test.jsonl", "-o", data / "test" / "test.jsonl", log=log)
    test_data = data / "test" / "test.jsonl"
    extra_eval = ["--limit", str(a.limit)] if a.limit else []
    results: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "arms": {}, "train_time_s": {}}
    rows: dict[str, dict[str, dict]] = {}

    if "base" in a.arms:
        slmtune("eval", "--data", test_data, "--model", a.model, "--baseline", "none", "-o", work / "eval-base",
                "--max-new-tokens", str(BASE_MAX_NEW_TOKENS), "--decoding", "free", *extra_eval, log=log)
        rows["base"] = predictions(work / "eval-base")["tuned"]
    if "trl" in a.arms:
        trl_out = work / "trl"
        cmd = [sys.executable, __file__, "--_trl", "--model", a.model, "--out-dir", str(work),
               "--_trl-train", str(data / "train.jsonl")]
        print("$ plain TRL script (SFTTrainer, LoRA r=16, 1 epoch)", flush=True)
        with log.open("a") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"the TRL arm failed; see {log}")
        results["train_time_s"]["trl"] = json.loads((trl_out / "train.json").read_text())["train_time_s"]
        slmtune("eval", "--data", test_data, "--model", trl_out / "model", "--baseline", "none", "-o",
                work / "eval-trl", "--decoding", "free", *extra_eval, log=log)
        rows["trl"] = predictions(work / "eval-trl")["tuned"]
    if ({"slmtune", "free"} & set(a.arms)) or ("rl" in a.arms and not a.sft_run):
        import yaml

        recipe = {"name": "bfcl", "model": {"base": a.model}, "data": {"train": str(data / "train.jsonl")},
                  "output": {"dir": str(work / "run")}}
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        sets = [x for s in a.set for x in ("--set", s)]
        t0 = time.perf_counter()
        slmtune("train", work / "recipe.yaml", *sets, log=log)
        for arm in ("slmtune", "free"):
            if arm in a.arms:
                results["train_time_s"][arm] = round(time.perf_counter() - t0, 1)
        # slmtune's default decoding alone, or (with the free arm) `--constrained`: free + grammar in one report
        how = ["--compare-decodings"] if "free" in a.arms else []
        slmtune("eval", "--data", test_data, "--model", work / "run", "--baseline", "none", "-o",
                work / "eval-slmtune", *how, *extra_eval, log=log)
        got = predictions(work / "eval-slmtune")
        if "free" in a.arms:
            rows["free"] = got["tuned"]
        if "slmtune" in a.arms:
            rows["slmtune"] = got["tuned+constrained" if how else "tuned"]
            if a.target_accuracy is not None:
                conf = confidences(work / "eval-slmtune", "tuned+constrained" if how else "tuned")
                results["selective"] = selective_figures(b, by_id, rows["slmtune"], conf, a.target_accuracy)
        report = json.loads((work / "eval-slmtune" / "report.json").read_text())
        tuned = {"free": report["models"]["tuned"], "slmtune": report["constrained"]["tuned"]} if how else {
            "slmtune": report["models"]["tuned"]}
        results["failures"] = {arm: {k: v["count"] for k, v in m["failures"]["kinds"].items()}
                               for arm, m in tuned.items() if arm in a.arms and m.get("failures")}
        results["decoding"] = {arm: m["perf"]["decoding"] for arm, m in tuned.items() if arm in a.arms}
        results["slmtune_metrics"] = json.loads((work / "run" / "metrics.json").read_text())
        results["slmtune_metrics"].pop("train_loss", None)
    if "rl" in a.arms:
        figures, results["train_time_s"]["rl"] = arm_rl(a, b, by_id, work, data / "train.jsonl", test_data,
                                                        extra_eval, log, rows)
        results.update(figures)

    # Teacher answers as scored by the checker: how faithful the logs are to BFCL's ground truth.
    teacher = {e["id"]: teacher_log(b, e)["response"]["choices"][0]["message"] for e in test_e}
    for name, preds in [("teacher", teacher), *rows.items()]:
        results["arms"][name] = table(b, by_id, preds)
    results["curate"] = json.loads((data / "curate.json").read_text()) if (data / "curate.json").is_file() else None
    return results


def arm_rl(a, b, by_id: dict, work: Path, train: Path, test_data: Path, extra_eval: list, log: Path,
           rows: dict) -> tuple[dict, float]:
    """GRPO on the SFT run (`method: grpo`), evaluated as the slmtune arm: its figures for the results, and the
    RL stage's train time."""
    import yaml

    recipe = {"name": "bfcl-rl", "method": "grpo", "model": {"base": str(a.sft_run or work / "run")},
              "data": {"train": str(train)}, "output": {"dir": str(work / "run-rl")}}
    (work / "recipe-rl.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    sets = [x for s in a.rl_set for x in ("--set", s)]
    t0 = time.perf_counter()
    slmtune("train", work / "recipe-rl.yaml", *sets, log=log)
    wall = round(time.perf_counter() - t0, 1)
    slmtune("eval", "--data", test_data, "--model", work / "run-rl", "--baseline", "none", "-o", work / "eval-rl",
            *extra_eval, log=log)
    rows["rl"] = predictions(work / "eval-rl")["tuned"]
    metrics = json.loads((work / "run-rl" / "metrics.json").read_text())
    out = {"rl_metrics": {k: v for k, v in metrics.items() if k != "train_loss"}}
    if a.target_accuracy is not None:
        out["selective_rl"] = selective_figures(b, by_id, rows["rl"], confidences(work / "eval-rl", "tuned"),
                                                a.target_accuracy)
    return out, wall


def table(b, by_id: dict[str, dict], preds: dict[str, dict]) -> dict:
    cells: dict[str, dict] = collections.defaultdict(lambda: {"n": 0, "parsed": 0, "correct": 0})
    for rid, e in by_id.items():
        if rid not in preds:
            continue
        s = score(b, e, preds[rid])
        for key in (e["category"], "calls" if e["category"] not in IRRELEVANCE else "irrelevance (all)", "overall"):
            c = cells[key]
            c["n"] += 1
            c["parsed"] += s["parsed"]
            c["correct"] += s["correct"]
    return {k: {**v, "parse_rate": round(v["parsed"] / v["n"], 3), "accuracy": round(v["correct"] / v["n"], 3)}
            for k, v in cells.items()}


def print_table(results: dict) -> None:
    arms = list(results["arms"])
    keys = [*CATEGORIES, "calls", "irrelevance (all)", "overall"]
    head = f"{'category':24}{'n':>5} " + "".join(f"{a:>22}" for a in arms)
    print("\naccuracy (parse rate) — AST accuracy for call categories, abstention for irrelevance")
    print(head)
    for k in keys:
        cells = [results["arms"][a].get(k) for a in arms]
        n = next((c["n"] for c in cells if c), 0)
        if not n:
            continue
        row = "".join(f"{c['accuracy']:>13.3f} ({c['parse_rate']:.2f})" if c else f"{'-':>22}" for c in cells)
        print(f"{k:24}{n:>5} {row}")
    times = results["train_time_s"]
    print(f"{'train time (s)':30}" + "".join(f"{times.get(a, '-'):>22}" for a in arms))
    for arm, kinds in (results.get("failures") or {}).items():
        how = (results.get("decoding") or {}).get(arm, "")
        listed = ", ".join(f"{k} {n}" for k, n in kinds.items())
        print(f"failure kinds ({arm}, {how} decoding; slmtune eval): {listed}")


def print_selective(s: dict) -> None:
    print(f"\nconfidence AUROC vs BFCL's verdict ({s['n']} test records): "
          + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} —" for k, v in s["auroc"].items()))
    print(f"call answers: {s['calls_right']} of {s['calls']} right; {s['default']} AUROC over them "
          + ("—" if s["auroc_calls"] is None else f"{s['auroc_calls']:.3f}"))
    for h in s["halves"]:
        acc = "—" if h["accuracy"] is None else f"{h['accuracy']:.3f}"
        thr = "none" if h["threshold"] is None else f"{h['threshold']:.4f}"
        print(f"{s['default']} threshold {thr} (calibrated on {h['calibrated_on']} at {s['target']:g}, lower bound "
              f"{h['lower_bound']}) on the other {h['judged_on']}: SLM answers {h['answered']} "
              f"({h['coverage']:.0%}) at BFCL accuracy {acc}; answering every call: {h['raw_accuracy']:.3f}")


def plot(results: dict, path: Path) -> None:
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    arms = list(results["arms"])
    keys = [k for k in (*CATEGORIES, "calls", "overall") if any(k in results["arms"][a] for a in arms)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        ax.bar([j + i * width for j in range(len(keys))],
               [results["arms"][a].get(k, {}).get("accuracy", 0) for k in keys], width, label=a)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=20, fontsize=8)
    ax.set_ylabel("BFCL accuracy (AST / abstention)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("BFCL v4 dev categories, held-out split — SmolLM2-135M")
    save_png(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train", type=int, default=100, help="training logs (stratified by category)")
    p.add_argument("--test", type=int, default=100, help="held-out logs (stratified by category)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--set", action="append", default=[], help="recipe override for the slmtune arm (key=value)")
    p.add_argument("--rl-set", action="append", default=[], help="recipe override for the rl arm (key=value)")
    p.add_argument("--sft-run", type=Path, default=None, help="rl arm: start from this SFT run (of the same split) "
                   "instead of training the slmtune arm's")
    p.add_argument("--limit", type=int, default=None, help="score only the first N test records")
    p.add_argument("--quick", action="store_true", help="16 train / 12 test logs, 4 training steps (~10 min)")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="slmtune arm: AUROC of each confidence candidate, and the calibrated threshold's coverage "
                        "and BFCL accuracy on the test half that did not set it")
    p.add_argument("--out-dir", type=Path, default=Path("bench_quality"))
    p.add_argument("--_trl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_trl-train", dest="trl_train", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a._trl:
        a.trl_out = a.out_dir / "trl"
        a.trl_out.mkdir(parents=True, exist_ok=True)
        arm_trl(a)
        return
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if unknown := set(a.arms) - set(ARMS):
        p.error(f"unknown arm(s): {', '.join(sorted(unknown))}")
    if a.quick:
        a.train, a.test = 16, 12
        a.set = ["train.max_steps=4", *a.set]
        a.rl_set = ["train.max_steps=2", *a.rl_set]
    start = time.perf_counter()
    results = run(a)
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    print_table(results)
    for key, arm in (("selective", "slmtune"), ("selective_rl", "rl")):
        if key in results:
            print(f"\n[{arm}]", end="")
            print_selective(results[key])
    if "rl_metrics" in results:
        m = results["rl_metrics"]
        print(f"\nRL: reward {m['reward_first_quarter']} (first quarter of steps) → {m['reward_last_quarter']} (last), "
              f"{m['global_step']} steps, {m['prompts_seen']} prompts, {m['minutes_per_100_records']} min per 100 "
              f"records, peak {m.get('peak_anon_memory_mb') or 0:.0f} MB, stopped early: {m['stopped_early']}")
    from slmtune.io import write_json

    write_json(a.out_dir / "bench_quality.json", results)
    plot(results, a.out_dir / "bench_quality.png")
    print(f"\nwall time {results['wall_time_s']:.0f} s; wrote {a.out_dir / 'bench_quality.json'} and "
          f"{a.out_dir / 'bench_quality.png'}")


if __name__ == "__main__":
    main()
