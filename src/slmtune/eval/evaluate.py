"""`slmtune eval`: does the small model do the agent's errand as the logged LLM (the teacher) did?

Every model evaluated generates the target turn of every eval record from the prompt `slmtune.render` builds
(the training rendering, tools included), batched and greedy; its text is parsed back with
`render.parse_output` and scored against the teacher's own target by `slmtune.eval.metrics`, per the task's
category and schema (`task.json` beside the data, else inferred with `slmtune.tasks.schema`). `--predictions`
scores existing outputs instead of generating. `--decoding` says how model rows are decoded: `auto` (the
default) decodes a tool-calling task under its grammar (`slmtune.infer.constrain`: a call must name an offered tool
with schema-valid arguments, or be a text answer when some teacher targets are text) when llguidance is
installed, as `slmtune serve` does, and every other task free; `free` / `constrained` force one way.
`--compare-decodings` compares both: the rows decoded free, plus the primary model under the grammar.

Output directory::

    predictions.jsonl   one line per eval record, in data order: {"id", "reference": teacher message,
                        "outputs": {row: {"text", "message", "verdicts", "n_tokens", "finished", "latency_s",
                        "confidence", "confidences"}}} (rows: tuned, base, predictions, teacher, and
                        "<row>+constrained"; verdicts are {metric: [unit scores]}, see `slmtune.eval.metrics`;
                        generated rows only: `confidence` in [0, 1], the default of `confidences`, every
                        candidate of `slmtune.infer.confidence`)
    report.json         the contract below
    report.md           the metrics table, one column per row; tool_calling: the primary row's failure kinds
    report.png          bar chart of the category's main metrics
    selective.png       rows with confidences: accuracy of the answered records vs share answered

`report.json` keys (version 1)::

    version   1
    task      {"name", "category", "schema_hash", "schema_source": "task.json" | "inferred"}
    data      {"path", "sha256", "records"}
    n         number of eval records
    primary   the row the gate checks: "tuned" (the --model row, whatever it is), else "predictions"
    models    {row: {"source", "kind", "metrics", "perf", "missing"}} for rows tuned | base | predictions |
              teacher. `kind`: run | checkpoint | base | predictions | teacher. `metrics`:
              {metric: {"value": float | null, "count": int}} (value = mean over count units; null when the
              metric has no unit); the names per category are `slmtune.eval.metrics.METRICS`: tool_calling →
              parse_rate, schema_valid_rate, tool_name_accuracy, arguments_exact_match, arguments_f1,
              exact_match; extraction → parse_rate, schema_valid_rate, fields_f1, exact_match;
              classification → parse_rate, schema_valid_rate, label_accuracy; summarization / coding /
              generation → parse_rate, token_f1, rouge_l, exact_match. `perf` (generated rows, else null):
              {"batch_size", "batch_tokens", "max_new_tokens", "render_mode", "wall_s", "s_per_record",
              "generated_tokens", "tokens_per_s", "unfinished", "decoding"} (unfinished = outputs cut by
              max_new_tokens; decoding = "free" | "constrained", as this row was decoded; rows meant to be
              constrained add "grammar_fallbacks": records decoded free under `auto` because their grammar could
              not be built — with an explicit constrained decoding that is an error).
              `missing`: records without a prediction (predictions row only; scored as empty output).
              `failures` (tool_calling tasks, every row but the teacher's): {"n", "failed", "kinds": {kind:
              {"count", "examples": [{"id", "expected", "got", "detail"}] (at most 2)}}}, one primary kind per
              failed record, precedence no_call > unwanted_call > unparsed > wrong_function > wrong_count >
              missing_argument > extra_argument > wrong_type > wrong_value (`slmtune.eval.failures`).
              `selective` (generated rows): {"auroc", "curve": [{"threshold", "coverage", "accuracy",
              "answered", "agree"}]} of the row's confidences against its per-record key metric, and with
              --target-accuracy the calibration: "target", "level", "threshold" (null: none reached), "coverage",
              "accuracy", "lower_bound", "n", "answered" (+ "reason" when no threshold), and "cross_fit":
              {"folds", "coverage", "accuracy", "answered", "n"} — each half of the records judged by the
              threshold the other half picks — see `slmtune.eval.selective`.
    decoding  {"requested": auto | free | constrained, "used": free | constrained}: how the model rows were
              decoded (used = free when nothing was generated, the task has no grammar, or auto found no
              llguidance; --compare-decodings decodes them free)
    constrained   present with --compare-decodings: {row: same shape as in models} for the primary model,
              plus "backend": "llguidance"; for text tasks only {"backend", "skipped": reason}
    gate      null without --gate, else {"passed": bool, "thresholds": {...}, "failures": [{"metric", "value",
              "op", "threshold"}]}
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.eval.failures import failure_report
from slmtune.eval.metrics import KEY_METRICS, TOOL_CALLING, aggregate, key_metric, score
from slmtune.eval.selective import record_scores, selective, servable
from slmtune.infer.decoding import decoding_for
from slmtune.infer.generate import MAX_BATCH_TOKENS
from slmtune.io import file_fingerprint, iter_jsonl
from slmtune.records import CATEGORIES, split_prompt_target
from slmtune.records import read_records as read_canonical
from slmtune.ui import Progress, ticker

REPORT_VERSION = 1


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    schema: Any
    schema_hash: str | None
    source: str  # "task.json" or "inferred"


@dataclass(frozen=True)
class ModelRef:
    """What to load for one model row: weights (+ adapter) and the tokenizer whose template renders prompts."""

    spec: str
    kind: str  # run | checkpoint | base
    path: str
    adapter: Path | None
    tokenizer: str
    base: str | None = None  # a full fine-tune's base model (else the base is `path`)


@dataclass
class Row:
    name: str
    kind: str
    source: str
    outputs: list[dict]  # per record: text, message, n_tokens, finished, latency_s; verdicts added by scoring
    perf: dict | None = None
    missing: int = 0
    metrics: dict = field(default_factory=dict)
    failures: dict | None = None  # tool_calling tasks: `slmtune.eval.failures.failure_report`
    selective: dict | None = None  # generated rows: `slmtune.eval.selective.selective`


@dataclass(frozen=True)
class EvalResult:
    report: dict
    out_dir: Path

    @property
    def gate_passed(self) -> bool:
        return self.report["gate"] is None or self.report["gate"]["passed"]


# ----------------------------------------------------------------------------- inputs
def read_records(path: Path) -> list[dict]:
    """Eval records in file order; a record without `id` gets `line-N`. Ids must be unique."""
    recs = [{**rec, "id": str(rec.get("id", f"line-{lineno}"))} for lineno, rec in read_canonical(path)]
    dupes = [i for i, c in Counter(r["id"] for r in recs).items() if c > 1]
    if dupes:
        raise SlmtuneError(f"{path}: duplicate record ids ({', '.join(dupes[:3])}).", "Ids must be unique.")
    return recs


def load_task(data: Path, records: list[dict]) -> Task:
    """The task from `task.json` beside the data, else inferred from the records' targets."""
    from slmtune.tasks import schema as sch

    path = data.parent / "task.json"
    if path.is_file():
        t = json.loads(path.read_text())
        category = t.get("category")
        if category not in CATEGORIES:
            raise SlmtuneError(f"{path}: category {category!r} is not one of {', '.join(CATEGORIES)}.")
        return Task(t.get("name") or data.parent.name, category, t.get("schema"),
                    t.get("schema_hash") or sch.schema_hash(t.get("schema")), "task.json")
    targets = [split_prompt_target(r)[1] for r in records]
    kinds = [sch.output_kind(t) for t in targets]
    texts = [(t.get("content") or "").strip() for t in targets]
    labels = Counter(x for x, k in zip(texts, kinds, strict=True) if k == "label")
    prompts = [" ".join(m.get("content") or "" for m in split_prompt_target(r)[0]) for r in records]
    category = sch.categorize(Counter(kinds), labels, prompts, texts)
    schema = sch.task_schema(category, records)
    return Task(data.parent.name or data.stem, category, schema, sch.schema_hash(schema), "inferred")


def read_predictions(path: Path, records: list[dict]) -> Row:
    """A predictions row: `{"id", "message"}` or `{"id", "text"}` lines; records without a line score as empty."""
    from slmtune.render import parse_output

    known, by_id = {r["id"] for r in records}, {}
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or "id" not in obj or not ("message" in obj or "text" in obj):
            raise SlmtuneError(f"{path}:{lineno}: a prediction needs `id` and `message` or `text`.")
        if str(obj["id"]) in known:
            by_id[str(obj["id"])] = obj
    if not by_id:
        raise SlmtuneError(f"{path}: no prediction id matches an eval record id.")
    outputs = []
    for r in records:
        obj = by_id.get(r["id"], {"text": ""})
        if isinstance(obj.get("message"), dict):
            msg = obj["message"]
            text = obj.get("text", msg.get("content"))
        else:
            text = obj.get("text") or ""
            msg = parse_output(text)
        outputs.append({"text": text, "message": msg})
    return Row("predictions", "predictions", str(path), outputs, missing=len(records) - len(by_id))


def teacher_row(records: list[dict]) -> Row:
    outs = [{"text": None, "message": split_prompt_target(r)[1]} for r in records]
    return Row("teacher", "teacher", "the logged targets", outs)


# ----------------------------------------------------------------------------- models
def resolve_model(spec: str) -> ModelRef:
    """A run dir (base + adapter from its manifest, or a full fine-tune's model/), a checkpoint folder, or anything
    `resolve_base` takes."""
    from slmtune.models import resolve_base

    p = Path(spec)
    if (p / "manifest.json").is_file():
        from slmtune.train.runfiles import read_run, run_weights

        manifest = read_run(p)
        weights = run_weights(p)
        if weights.name == "model":
            return ModelRef(spec, "run", str(weights), None, str(weights), base=manifest["base_model"]["path"])
        return ModelRef(spec, "run", manifest["base_model"]["path"], weights, str(weights))
    if (p / "config.json").is_file():
        return ModelRef(spec, "checkpoint", str(p), None, str(p))
    ref = resolve_base(spec)
    return ModelRef(spec, "base", ref.path, None, ref.path)


def base_of(ref: ModelRef) -> ModelRef:
    """A run's base model, rendered with the run's tokenizer so both rows see identical prompts."""
    base = ref.base or ref.path
    return ModelRef(base, "base", base, None, ref.tokenizer)


def load(ref: ModelRef, dtype: str = "auto"):
    """(model, tokenizer) ready for inference; an adapter is merged in memory (faster generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmtune.models import pick_dtype

    try:
        tok = AutoTokenizer.from_pretrained(ref.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=pick_dtype(dtype))
    except OSError as e:
        raise SlmtuneError(f"--model {ref.spec!r} could not be loaded: {str(e).splitlines()[0]}",
                           "Give a run dir, a checkpoint folder, smollm2-135m or a cached hub id.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if ref.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ref.adapter).merge_and_unload()
    return model.eval(), tok


@dataclass(frozen=True)
class GenSettings:
    batch_size: int = 16
    """Records generated together, at most."""
    batch_tokens: int | None = MAX_BATCH_TOKENS
    """At most this many cache slots per batch: rows × (longest prompt + max new tokens); long prompts get fewer
    rows. 0 (CLI) or None = no bound."""
    max_new_tokens: int | None = None
    """Most tokens generated per record; default: 1.5 × the longest teacher target + 16 (`token_budget`)."""
    dtype: str = "auto"
    """Weights dtype for generation: auto, float32, bfloat16."""
    decoding: str = "auto"
    """How model rows are decoded: auto = under the task's grammar for tool-calling tasks when llguidance is
    installed (as serve does), else free; constrained also covers extraction and labels; free = no grammar."""


def generate_rows(ref: ModelRef, name: str, records: list[dict], task: Task, gs: GenSettings, decoding: str,
                  progress: Progress, compare: bool = False, strict: bool = True) -> list[Row]:
    """The model's row over `records`, decoded `decoding` (free | constrained); with `compare` also its
    "<name>+constrained" row. Not `strict` (`--decoding auto`): a record whose grammar can't be built (a schema
    llguidance refuses, a slow tokenizer) is decoded free instead of failing the eval (`perf.grammar_fallbacks`)."""
    from slmtune.infer.generate import generate, stop_ids, token_budget
    from slmtune.render import make_renderer, prompt_text, target_text

    model, tok = load(ref, gs.dtype)
    r = make_renderer(tok)
    prompts = [prompt_text(r, rec) for rec in records]
    budget = gs.max_new_tokens or token_budget(tok, [target_text(r, rec) for rec in records])
    factory, fallbacks = None, 0
    if decoding == "constrained" or compare:
        factory, fallbacks = _grammar_factory(model, tok, records, task, stop_ids(tok, model), strict)
    cbudget = gs.max_new_tokens or 2 * budget  # room for the grammar's longest strings (see constrain.caps_from)
    runs = [(name, decoding == "constrained")]  # (row, meant to decode under the grammar)
    if compare and factory is not None:
        runs.append((f"{name}+constrained", True))
    rows = []
    for row_name, want in runs:
        fac = factory if want else None
        b = budget if fac is None else cbudget
        gens = generate(model, tok, prompts, b, gs.batch_size, fac, _label(progress, row_name),
                        max_batch_tokens=gs.batch_tokens)
        row = _run(row_name, ref, gens, gs, b, r.mode, "free" if fac is None else "constrained")
        if want:
            row.perf["grammar_fallbacks"] = fallbacks
        rows.append(row)
    return rows


def _grammar_factory(model, tok, records: list[dict], task: Task, stops: list[int], strict: bool = True):
    """(per-batch logits-processor factory, records decoded free because their grammar failed) for constrained
    decoding; the factory is None when no record has a grammar. `strict`: a grammar that fails is an error."""
    from slmtune.infer import constrain

    constrain.require()
    targets = [split_prompt_target(rec)[1] for rec in records]
    caps = constrain.caps_from(targets)
    text_too = any(not t.get("tool_calls") for t in targets)  # the teacher sometimes answers in text: allow it
    grammars = [constrain.grammar_for(task.category, task.schema, rec.get("tools"), caps, allow_text=text_too)
                for rec in records]
    if not any(grammars):
        return None, 0
    try:
        ll = constrain.ll_tokenizer(tok, model.get_output_embeddings().weight.shape[0], stops)
    except SlmtuneError:
        if strict:
            raise
        return None, sum(g is not None for g in grammars)
    bad = set()
    for g in set(filter(None, grammars)):
        try:
            constrain.compile_grammar(ll, g)
        except SlmtuneError:
            if strict:
                raise
            bad.add(g)
    fallbacks = sum(g in bad for g in grammars)  # records without a grammar of their own are not fallbacks
    grammars = [None if g in bad else g for g in grammars]
    if not any(grammars):
        return None, fallbacks
    return lambda idx, prompt_len: constrain.make_processor(ll, [grammars[i] for i in idx], prompt_len, stops), \
        fallbacks


def _label(progress: Progress, name: str) -> Progress:
    return lambda stage, done, total: progress(f"{name}: {stage}", done, total)


def _run(name: str, ref: ModelRef, gens: list, gs: GenSettings, budget: int, mode: str, decoding: str) -> Row:
    from slmtune.infer.confidence import all_confidences, confidence
    from slmtune.infer.generate import wall_time
    from slmtune.render import parse_output

    outs = [{"text": g.text, "message": parse_output(g.text), "n_tokens": g.n_tokens, "finished": g.finished,
             "latency_s": g.latency_s, "confidence": confidence(g.token_logprobs),
             "confidences": all_confidences(g.token_logprobs)} for g in gens]
    wall = wall_time(gens)
    tokens = sum(g.n_tokens for g in gens)
    perf = {"batch_size": gs.batch_size, "batch_tokens": gs.batch_tokens, "max_new_tokens": budget,
            "render_mode": mode, "wall_s": round(wall, 3),
            "s_per_record": round(wall / max(len(gens), 1), 4), "generated_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
            "unfinished": sum(not g.finished for g in gens), "decoding": decoding}
    return Row(name, ref.kind, ref.spec, outs, perf)


# ----------------------------------------------------------------------------- scoring and the whole run
def score_row(row: Row, records: list[dict], task: Task, target: float | None = None) -> Row:
    serves = []  # whether serving would hand the agent each answer (`selective.servable`)
    for out, rec in zip(row.outputs, records, strict=False):
        prompt, reference = split_prompt_target(rec)
        out["verdicts"] = score(task.category, task.schema, out["message"], reference, rec.get("tools"))
        serves.append(servable(task.category, out["message"], prompt))
    row.metrics = aggregate([o["verdicts"] for o in row.outputs], task.category)
    if task.category == TOOL_CALLING and row.kind != "teacher":
        row.failures = failure_report(records, row.outputs, task.schema)
    verdicts = record_scores([o["verdicts"] for o in row.outputs], key_metric(task.category))
    row.selective = selective([o.get("confidence") for o in row.outputs], verdicts, target,
                              text_task=task.category not in KEY_METRICS,
                              serves=serves)
    return row


def evaluate(data: str | Path, out_dir: str | Path, model: str | None = None, baseline: str | None = None,
             predictions: str | Path | None = None, constrained: bool = False, gate: str | Path | None = None,
             settings: GenSettings = GenSettings(), limit: int | None = None,
             progress: Progress | None = None, target_accuracy: float | None = None) -> EvalResult:
    """Score `model` (and `baseline`, `predictions`, the teacher) on `data`; write the report files to `out_dir`.

    `baseline`: a model spec, "none", or None (= the run's base when `model` is a run dir). `target_accuracy`:
    calibrate each generated row's confidence threshold to it (`slmtune.eval.selective.calibrate`).
    """
    from slmtune.eval import report as eval_report

    data, out_dir = Path(data), Path(out_dir)
    tick = ticker(progress)
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise SlmtuneError(f"--target-accuracy must be in (0, 1], got {target_accuracy}.")
    if model is None and predictions is None:
        raise SlmtuneError("Nothing to evaluate.", "Give --model MODEL_OR_RUN_DIR and/or --predictions PRED.jsonl.")
    if constrained and model is None:
        raise SlmtuneError("--compare-decodings needs --model (it decodes under the task's grammar).")
    if constrained and settings.decoding == "constrained":
        raise SlmtuneError("--compare-decodings compares free and constrained decoding; drop --decoding constrained.")
    thresholds = eval_report.read_gate(Path(gate)) if gate else None
    records = read_records(data)[:limit] if limit else read_records(data)
    task = load_task(data, records)
    decoding = "free" if constrained else decoding_for(settings.decoding, task.category)
    rows: list[Row] = []
    if model is not None:
        ref = resolve_model(model)
        strict = constrained or settings.decoding == "constrained"
        rows += generate_rows(ref, "tuned", records, task, settings, decoding, tick, constrained, strict)
        base = _baseline(ref, baseline)
        if base is not None:
            rows += generate_rows(base, "base", records, task, settings, decoding, tick, strict=strict)
    if predictions is not None:
        rows.append(read_predictions(Path(predictions), records))
    rows.append(teacher_row(records))
    for row in rows:
        score_row(row, records, task, target_accuracy)
    report = _report(data, task, records, rows, primary="tuned" if model is not None else "predictions")
    decoded = {r.perf["decoding"] for r in rows if r.perf and not r.name.endswith("+constrained")}
    report["decoding"] = {"requested": settings.decoding,
                          "used": "constrained" if "constrained" in decoded else "free"}
    if constrained and "constrained" not in report:
        report["constrained"] = {"backend": "llguidance", "skipped": f"{task.category} tasks have no output grammar"}
    report["gate"] = eval_report.check_gate(report, thresholds) if thresholds is not None else None
    eval_report.write_all(out_dir, report, prediction_lines(records, rows))
    return EvalResult(report, out_dir)


def _baseline(ref: ModelRef, baseline: str | None) -> ModelRef | None:
    if baseline is None:
        return base_of(ref) if ref.kind == "run" else None
    if baseline.lower() == "none":
        return None
    return resolve_model(baseline)


def _row_json(row: Row) -> dict:
    out = {"source": row.source, "kind": row.kind, "metrics": row.metrics, "perf": row.perf}
    if row.kind == "predictions":
        out["missing"] = row.missing
    if row.failures is not None:
        out["failures"] = row.failures
    if row.selective is not None:
        out["selective"] = row.selective
    return out


def _report(data: Path, task: Task, records: list[dict], rows: list[Row], primary: str) -> dict:
    plain = {r.name: _row_json(r) for r in rows if not r.name.endswith("+constrained")}
    report = {
        "version": REPORT_VERSION,
        "task": {"name": task.name, "category": task.category, "schema_hash": task.schema_hash,
                 "schema_source": task.source},
        "data": {"path": str(data.resolve()), "sha256": file_fingerprint(data), "records": len(records)},
        "n": len(records),
        "primary": primary,
        "models": plain,
    }
    cons = {r.name.removesuffix("+constrained"): _row_json(r) for r in rows if r.name.endswith("+constrained")}
    if cons:
        report["constrained"] = {**cons, "backend": "llguidance"}
    return report


def prediction_lines(records: list[dict], rows: list[Row]) -> list[dict]:
    """One line per record: the teacher's message and every row's output with its verdicts."""
    lines = []
    for i, rec in enumerate(records):
        outs = {r.name: {k: v for k, v in r.outputs[i].items() if v is not None or k == "message"} for r in rows}
        lines.append({"id": rec["id"], "reference": split_prompt_target(rec)[1], "outputs": outs})
    return lines

