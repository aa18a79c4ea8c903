"""`slmtune flywheel`: logs in; ingest → curate → cluster → tasks → plan → train → eval → export, by rounds.

Work dir::

    WORKDIR/.lock                  held (flock) by the running flywheel, with its pid (see `slmtune.lock`)
    WORKDIR/flywheel.json          registry: inputs, finished rounds, each task's pinned eval set (flywheel_state)
    WORKDIR/router.json            which export serves which requests (see `slmtune.export.router`)
    WORKDIR/exports/<export>/      gated, tagged checkpoints (see `slmtune.export.export`)
    WORKDIR/round-NNN/
      round.json                   inputs, their fingerprint, settings, start time
      ingest/records.jsonl         `slmtune ingest` of every input so far
      curate/curated.jsonl, report.json
      cluster/                     `slmtune cluster` output
      tasks/                       task dirs with eval sets pinned across rounds (see `slmtune.flywheel.tasks`)
      plan/<task>.yaml, plan.json  `slmtune plan`: recipes, lengths, tasks that could not be planned
      train/<task>/                run dir (`slmtune train`), or only a marker naming an earlier round's run
      eval/<task>/                 eval report (`slmtune eval`), or a marker naming an earlier one
      export/<task>/               marker naming the export folder
      failures/<task>.txt          the traceback of a task whose stage failed (its one-line reason is in summary)
      summary.json                 one row per task (see `TaskOutcome`) + the tasks not trained, with reasons
      comparison.json              this round vs the previous one, per task

Tasks are isolated: a task whose plan, train, eval or export fails is recorded as `failed` (stage and one-line
reason) in `summary.json`, in `round.json`'s `outcome` and in the router's `not_routed`, and every other task goes
on. `slmtune flywheel` exits 0 when at least one task ran through (or none was trainable), 1 when every task it
tried failed.

Every stage dir gets `stage.done.json` (fingerprint of inputs + parameters) written last. A rerun skips a
stage whose marker matches; a training run interrupted mid-way resumes from its last checkpoint; a task whose
train data and recipe match a previous round's reuses that round's run, eval and export instead of retraining.
A run killed mid-write leaves temps (`.NAME.XXXXXXXX.tmp`) or a replaced export moved aside; the next run
deletes the first and puts the second back before it starts (`slmtune.io.clean_stale_temps`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.eval.metrics import key_metric
from slmtune.export.export import export_run
from slmtune.flywheel import state as st
from slmtune.io import clean_stale_temps, file_fingerprint, fingerprint, now, read_json_or_none, write_json
from slmtune.lock import workdir_lock
from slmtune.ui import Progress, fmt, ticker

DATA_STAGES = ("ingest", "curate", "cluster", "tasks", "plan")
STARTED = "stage.started.json"  # a run dir's fingerprint, written first: resume only the same training
# eval decodes as serve does (tool calls under the offered tools' grammar); in the eval fingerprint, so a round
# evaluated before that default changed is evaluated again, not compared across decodings
EVAL_DECODING = "auto"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlywheelConfig:
    gpu: str = "cpu"
    """The hardware `slmtune plan` plans for: auto (CUDA device 0's memory, else cpu), cpu, or the card's memory
    (8gb, 12gb, 24gb, 7.5gb, …). Default cpu: runs anywhere."""
    base_model: str | None = None
    """One base model for every task (catalog key, hub id or folder); unset: plan's choice per task."""
    candidates: str | None = None
    """Bake-off: train every task on each candidate that fits (auto: on the CPU the offline models installed here,
    on a GPU the category's top two; or catalog keys / folders, comma-separated), evaluate all on the same
    held-out calls and export the winner (coverage at --target-accuracy, then the key metric)."""
    rl: bool = False
    """After SFT, RL on each task's winner (`method: grpo`: the task's training records, rewarded by agreement with
    the teacher; the plan's step count for SFT, one epoch where the plan trains by epochs, or --max-steps):
    evaluated on the same held-out calls as a candidate of its own, and exported only when it beats the SFT model
    (coverage at --target-accuracy, then the key metric). A winner trained as LoRA gets no RL (it would need a
    merge first): the task keeps its SFT winner, and the RL row says why."""
    max_steps: int | None = None
    """Optimizer steps per task, overriding plan's estimate (the RL stage's too)."""
    max_tasks: int | None = None
    """Train only the N largest tasks; the rest stay with the LLM."""
    eval_limit: int | None = 100
    """Score at most this many records of each task's eval set (the first N: the same ones every round). The
    confidence calibration wants many: certifying 0.95 takes 45 agreeing answers in a row."""
    eval_batch_size: int = 8
    """Records generated together during eval."""
    gate: Path | None = None
    """Eval thresholds (JSON/YAML) a task must pass to be exported; default: it earns a route (--min-coverage)."""
    target_accuracy: float = 0.95
    """How often a routed task's SLM answers must agree with the teacher: its confidence threshold is the lowest
    whose answered held-out calls reach this with a 90 % lower bound (`slmtune eval --target-accuracy`)."""
    min_coverage: float = 0.2
    """Route a task only when, at --target-accuracy, its SLM answers at least this share of held-out calls,
    counted on calls that did not set the threshold (2-fold cross-fit). 0: route every exported task (answers
    below a calibrated threshold still go to the LLM)."""
    adapter_only: bool = False
    """Export adapters instead of merged weights."""
    gguf: str | None = None
    """Each export also gets a GGUF of this type + Ollama Modelfile: f16, q8_0 or q4_0 (as `export --gguf`)."""
    min_size: int = 20
    """Smallest task cluster keeps."""
    eval_fraction: float = 0.2
    """Share of a new task's records held out for eval and calibration (fixed in its first round)."""
    overrides: tuple[str, ...] = ()
    """Recipe override for every task, as `slmtune train --set` (e.g. train.lr=1e-3; repeatable)."""


@dataclass
class TaskOutcome:
    task: str
    category: str
    n_train: int
    n_eval: int
    status: str = "pending"  # trained | resumed | reused | failed
    stage: str = "plan"  # the last stage started: plan | train | eval | export
    trained_in: str | None = None
    run_dir: str | None = None
    key_metric: str = ""
    metrics: dict = field(default_factory=dict)  # {tuned|base|teacher: key metric value}
    gate_passed: bool | None = None
    reason: str | None = None
    export: str | None = None
    # the tuned model's calibration: {"target", "threshold" (all held-out calls), "lower_bound", "coverage",
    # "accuracy", "answered", "n"} — coverage and accuracy cross-fit (`slmtune.eval.selective.cross_fit`)
    selective: dict | None = None
    # --candidates: [{"model", "recipe", "status", <key metric>, "coverage", "threshold", "winner"}] per candidate
    candidates: list[dict] | None = None


@dataclass(frozen=True)
class FlywheelResult:
    workdir: Path
    round_dir: Path
    previous: Path | None
    tasks: list[TaskOutcome]
    not_trained: list[dict]
    comparison: list[dict]
    router_path: Path
    exports_dir: Path


def run_flywheel(logs: Sequence[str | Path], workdir: str | Path, config: FlywheelConfig = FlywheelConfig(),
                 progress: Progress | None = None) -> FlywheelResult:
    """One flywheel round over every log given now or in earlier rounds (see the module docstring).

    Holds `WORKDIR/.lock` throughout (`slmtune.lock`): a second run on the same work dir raises at once.
    """
    from slmtune.export.gguf_export import check_gguf_type

    if config.gguf:
        check_gguf_type(config.gguf, config.adapter_only)  # refused now, not after every task has trained
    workdir = Path(workdir).resolve()
    tick = ticker(progress)
    with workdir_lock(workdir):  # a second flywheel on this work dir fails here, before reading a round
        cleaned = clean_stale_temps(workdir)
        if cleaned.restored or cleaned.removed:
            tick(f"cleaned up after a killed run: {len(cleaned.restored)} folders restored, "
                 f"{len(cleaned.removed)} temps removed", 0, 0)
        return _round(logs, workdir, config, tick)


def _round(logs: Sequence[str | Path], workdir: Path, config: FlywheelConfig, tick: Progress) -> FlywheelResult:
    from slmtune.data.ingest import expand_inputs

    registry = st.load_registry(workdir)
    inputs = list(dict.fromkeys([*registry["inputs"], *(str(Path(p).resolve()) for p in logs)]))
    files = expand_inputs(inputs)
    if not files:
        raise SlmtuneError(f"no log files in {', '.join(map(str, logs))}.", "Give .jsonl/.json/.parquet logs.")
    inputs_fp = fingerprint([file_fingerprint(f) for f in files])
    round_dir, prev = st.pick_round(workdir, registry, inputs_fp)
    if not (round_dir / "round.json").is_file():
        write_json(round_dir / "round.json", {"round": round_dir.name, "inputs": inputs,
                                              "files": [str(f) for f in files], "inputs_fingerprint": inputs_fp,
                                              "config": _config_json(config), "started": now()})
    selection = _data_stages(files, round_dir, registry, config, tick)
    tasks = selection["tasks"]
    # A plan stage finished by an older slmtune (marker, no plan.json) counts as no task failed.
    plan_json = read_json_or_none(round_dir / "plan" / "plan.json") or {}
    plan_failed = {f["task"]: f["reason"] for f in plan_json.get("failed", [])}
    # --candidates: the recipe stems plan wrote per task (`<task>@<model>`); a task without a bake-off trains its own
    bake_offs = {p["task"]: [Path(c["recipe"]).stem for c in p["candidates"]]
                 for p in plan_json.get("planned", []) if len(p.get("candidates") or []) > 1}
    outcomes = []
    for i, task in enumerate(tasks):
        def step(s, d, t, i=i, name=task["name"]):
            tick(f"[{i + 1}/{len(tasks)}] {name}: {s}", d, t)
        outcomes.append(_isolated(task, round_dir, prev, workdir, config, step, plan_failed.get(task["name"]),
                                  bake_offs.get(task["name"], [task["name"]])))
    return _finish(workdir, round_dir, prev, registry, inputs, selection, outcomes, config)


def ran_through(outcome: TaskOutcome) -> bool:
    return outcome.status != "failed"


def _config_json(config: FlywheelConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


# ----------------------------------------------------------------------------- data stages
def _data_stages(files: list[Path], round_dir: Path, registry: dict, config: FlywheelConfig, tick: Progress) -> dict:
    from slmtune.data.curate import curate
    from slmtune.data.ingest import ingest
    from slmtune.flywheel.tasks import build_tasks
    from slmtune.plan.planner import plan

    d = {s: round_dir / s for s in DATA_STAGES}
    records, curated = d["ingest"] / "records.jsonl", d["curate"] / "curated.jsonl"
    _stage(d["ingest"], "ingest", [file_fingerprint(f) for f in files], tick,
           lambda: ingest(files, records, progress=lambda n: tick("ingest", n, 0)))
    _stage(d["curate"], "curate", [file_fingerprint(records)], tick,
           lambda: curate(records, curated, report=d["curate"] / "report.json"))
    _stage(d["cluster"], "cluster", [file_fingerprint(curated), config.min_size, config.eval_fraction], tick,
           lambda: _cluster(curated, d["cluster"], config, tick))
    known = registry["tasks"]
    _stage(d["tasks"], "tasks", [file_fingerprint(d["cluster"] / "index.json"), known, config.max_tasks], tick,
           lambda: build_tasks(d["cluster"], d["tasks"], known, round_dir.parent, round_dir.name, config.max_tasks,
                               d["curate"] / "report.json"))
    # (candidates join the fingerprint only when set, so plans made before --candidates existed stay reusable)
    _stage(d["plan"], "plan", [file_fingerprint(d["tasks"] / "index.json"), config.gpu, config.base_model,
                               *([config.candidates] if config.candidates else [])], tick,
           lambda: plan(d["tasks"], d["plan"], gpu=config.gpu, base_model=config.base_model,
                        candidates=config.candidates))
    return json.loads((d["tasks"] / "selection.json").read_text(encoding="utf-8"))


def _cluster(curated: Path, out: Path, config: FlywheelConfig, tick: Progress) -> None:
    from slmtune.tasks.cluster import cluster

    cluster(curated, out, min_size=config.min_size, eval_fraction=config.eval_fraction,
            progress=lambda s, d, t: tick(f"cluster: {s}", d, t))


def _stage(stage_dir: Path, name: str, inputs: list, tick: Progress, run: Callable[[], object]) -> bool:
    """Run `run` unless the stage's marker matches `inputs`; True when it ran."""
    fp = fingerprint([name, inputs])
    if st.is_done(stage_dir, fp):
        return False
    tick(name, 0, 0)
    run()
    st.mark_done(stage_dir, name, fp)
    return True


# ----------------------------------------------------------------------------- per-task stages
def _isolated(task: dict, round_dir: Path, prev: Path | None, workdir: Path, config: FlywheelConfig,
              tick: Progress, plan_failure: str | None, recipes: list[str]) -> TaskOutcome:
    """One task's stages (trained from each of `recipes`, plan's recipe stems: more than one is a bake-off);
    whatever fails is this task's outcome, never the round's."""
    out = TaskOutcome(task["name"], task["category"], task["n_train"], task["n_eval"],
                      key_metric=key_metric(task["category"]))
    if plan_failure:
        out.status, out.reason = "failed", f"plan: {plan_failure}"
        return out
    try:
        _task_stages(task, out, round_dir, prev, workdir, config, tick, recipes)
    except Exception as e:  # noqa: BLE001 - one task's crash (bad data, OOM, a library bug) must not sink the round
        import traceback

        out.status = "failed"
        out.reason = f"{out.stage}: {_one_line(e)}"
        path = round_dir / "failures" / f"{task['name']}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(traceback.format_exception(e)), encoding="utf-8")
        except OSError as write_error:  # a full disk (often why the task failed) must not sink the round too
            log.warning("could not write %s (%s); %s's reason stays in summary.json", path, write_error,
                        task["name"])
    return out


def _one_line(e: Exception) -> str:
    """What stopped a stage, in one line: a SlmtuneError's message, else the exception's type and text."""
    first = (e.message if isinstance(e, SlmtuneError) else f"{type(e).__name__}: {e}").strip().splitlines()
    return first[0] if first else type(e).__name__


def _task_stages(task: dict, out: TaskOutcome, round_dir: Path, prev: Path | None, workdir: Path,
                 config: FlywheelConfig, tick: Progress, recipes: list[str]) -> None:
    name = task["name"]
    tried = []
    for stem in recipes:  # [name] without a bake-off
        recipe, train_fp = _recipe(round_dir, stem, config)
        label = _labelled(tick, stem.partition("@")[2]) if stem != name else tick
        tried.append(_candidate(stem, recipe, train_fp, recipe.model.base, name, out, round_dir, prev, config,
                                label))
    best = max(tried, key=_bake_off_score)  # ties: the first listed (plan's order: the cheaper model first)
    rl_failed = None
    if config.rl:  # RL on the winner, a candidate of its own: kept only when it ranks strictly higher
        stem, model = f"{best['stem']}+rl", f"{best['model']}+rl"
        try:
            recipe, train_fp = _recipe(round_dir, best["stem"], config, rl_from=best)
            tried.append(_candidate(stem, recipe, train_fp, model, name, out, round_dir, prev, config,
                                    _labelled(tick, model)))
        except Exception as e:  # noqa: BLE001 - RL failing (a LoRA winner, OOM) leaves the SFT winner standing
            rl_failed = {"model": model, "recipe": stem, "status": "failed", "reason": f"{out.stage}: {_one_line(e)}",
                         "winner": False}
            log.warning("%s: RL stage failed (%s); the SFT winner stands", name, rl_failed["reason"])
        best = max(tried, key=_bake_off_score)
        out.stage = "eval"
    if len(tried) > 1 or rl_failed:
        out.candidates = [{"model": t["model"], "recipe": t["stem"], "status": t["run"]["status"],
                           out.key_metric: t["metrics"].get("tuned"),
                           "coverage": (t["selective"] or {}).get("coverage"),
                           "threshold": (t["selective"] or {}).get("threshold"), "winner": t is best} for t in tried]
    if rl_failed:
        out.candidates.append(rl_failed)
    run, report = best["run"], best["report"]
    out.status, out.trained_in, out.run_dir = run["status"], run["trained_in"], run["run_dir"]
    out.metrics, out.selective = best["metrics"], best["selective"]
    out.gate_passed, out.reason = _gate(report, out, config)
    if out.gate_passed:
        out.stage = "export"
        out.export = _export(round_dir / "export" / name, prev and prev / "export" / name, run, best["eval_fp"],
                             workdir, round_dir, config, tick, eval_stage=best["stem"], bake_off=out.candidates)


def _eval_fp(train_fp: str, round_dir: Path, name: str, config: FlywheelConfig) -> str:
    # "cross_fit", "placeholder": reports written before eval wrote `selective.cross_fit`, or before an answer
    # holding a scrub placeholder its prompt does not became unservable, are redone
    return fingerprint(["eval", train_fp, file_fingerprint(round_dir / "tasks" / name / "eval.jsonl"),
                        config.eval_limit, config.eval_batch_size, EVAL_DECODING,
                        file_fingerprint(config.gate) if config.gate else None, config.target_accuracy,
                        "cross_fit", "placeholder"])


def _candidate(stem: str, recipe, train_fp: str, model: str, name: str, out: TaskOutcome, round_dir: Path,
               prev: Path | None, config: FlywheelConfig, tick: Progress) -> dict:
    """One candidate of a task trained (`train/<stem>`) and evaluated on the task's eval set (`eval/<stem>`), as
    the bake-off ranks it."""
    out.stage = "train"
    run = _train(round_dir / "train" / stem, prev and prev / "train" / stem, recipe, train_fp, tick)
    eval_fp = _eval_fp(train_fp, round_dir, name, config)
    out.stage = "eval"
    report_dir = _eval(round_dir / "eval" / stem, prev and prev / "eval" / stem, run, eval_fp, round_dir, name,
                       config, tick)
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    return {"stem": stem, "run": run, "train_fp": train_fp, "eval_fp": eval_fp, "report": report, "model": model,
            "metrics": {row: report["models"][row]["metrics"][out.key_metric]["value"]
                        for row in ("base", "tuned", "teacher") if row in report["models"]},
            "selective": _calibration(report)}


RL_OWNED = ("method", "train.lr", "train.epochs", "model.", "output.", "data.train", "data.eval")


def sft_overrides(overrides: Sequence[str]) -> list[str]:
    """--set overrides for the SFT recipes: all but `rl.*` (RL's own, refused by a recipe of another method)."""
    return [o for o in overrides if not o.startswith("rl.")]


def rl_overrides(overrides: Sequence[str]) -> list[str]:
    """--set overrides for the RL stage: `rl.*` and the training keys RL shares with SFT (batch size, precision,
    `trainer:` ...), not those RL sets itself (method, lr, epochs, where the model and data come from)."""
    return [o for o in overrides if not o.startswith(RL_OWNED)]


def _labelled(tick: Progress, model: str) -> Progress:
    return lambda s, d, t: tick(f"{model}: {s}", d, t)


def _bake_off_score(t: dict) -> tuple[float, float]:
    """A candidate's rank: coverage at the target accuracy (cross-fit), then the tuned key metric."""
    sel = t["selective"] or {}
    return (sel.get("coverage") or 0.0, t["metrics"].get("tuned") or 0.0)


def _recipe(round_dir: Path, name: str, config: FlywheelConfig, rl_from: dict | None = None):
    """Plan's recipe `name` for this round (output `train/<name>`, or with `rl_from`, an SFT candidate, the RL
    stage on it: `train/<name>+rl`) and its training fingerprint.

    RL (`method: grpo` from `rl_from`'s run): the plan's lr and epochs were the SFT's, so RL takes its own `auto`s;
    it keeps the plan's step count (an RL step costs several SFT steps' time) or --max-steps; --set overrides
    reach it except the keys it sets itself (`rl_overrides`). The SFT candidate's training fingerprint stands for
    its weights: a retrained SFT model is a new start for RL."""
    from slmtune.recipe import load_recipe, recipe_to_dict

    path = round_dir / "plan" / f"{name}.yaml"
    overrides = rl_overrides(config.overrides) if rl_from else sft_overrides(config.overrides)
    steps = config.max_steps or load_recipe(path, overrides).train.max_steps
    # Checkpoint ~4 times a run so an interrupted flywheel loses at most a quarter of a task's training.
    save = max(1, steps // 4) if steps > 0 else 200
    # As data, not `key=value` text: a work dir whose path holds "#" or ": " must not reparse as YAML.
    values = {"output.dir": str(round_dir / "train" / (f"{name}+rl" if rl_from else name)), "data.eval": None,
              "train.save_steps": save, **({"train.max_steps": config.max_steps} if config.max_steps else {})}
    if rl_from:
        values |= {"method": "grpo", "model.base": rl_from["run"]["run_dir"], "model.gguf_file": None,
                   "train.lr": "auto", "train.epochs": "auto"}
    recipe = load_recipe(path, overrides, values=values)
    d = recipe_to_dict(recipe)
    d["data"].pop("train"), d["data"].pop("eval"), d["output"].pop("dir")  # round-specific paths
    if rl_from:
        d["model"].pop("base")  # the SFT run's folder: its fingerprint stands for it
        return recipe, fingerprint(["train-rl", rl_from["train_fp"], file_fingerprint(recipe.data.train), d])
    return recipe, fingerprint(["train", file_fingerprint(recipe.data.train), d])


def _reuse(stage_dir: Path, prev_dir: Path | None, stage: str, fp: str, usable: Callable[[dict], object],
           carried: Callable[[dict], dict]) -> dict | None:
    """The marker of a finished stage with this fingerprint whose outputs are still there (`usable`): this
    round's, else the previous round's — then marked done here too, with the `carried` fields, so this round
    names what it reused. None: run the stage."""
    for d in (stage_dir, prev_dir):
        marker = st.read_marker(d) if d else None
        if marker and marker.get("fingerprint") == fp and usable(marker):
            return st.mark_done(stage_dir, stage, fp, **carried(marker)) if d == prev_dir else marker
    return None


def _train(stage_dir: Path, prev_dir: Path | None, recipe, fp: str, tick: Progress) -> dict:
    from slmtune.train.runfiles import last_checkpoint, run_weights
    from slmtune.train.trainer import train

    hit = _reuse(stage_dir, prev_dir, "train", fp, lambda m: run_weights(Path(m["run_dir"])),
                 lambda m: {"status": "reused", "run_dir": m["run_dir"], "trained_in": m["trained_in"]})
    if hit is not None:
        return {k: hit[k] for k in ("status", "run_dir", "trained_in")}
    started = read_json_or_none(stage_dir / STARTED) or {}
    resume = started.get("fingerprint") == fp and last_checkpoint(stage_dir / "checkpoints") is not None
    if stage_dir.exists() and not resume:
        shutil.rmtree(stage_dir)  # died before its first checkpoint, or trained other data/settings: start over
    if not resume:
        write_json(stage_dir / STARTED, {"fingerprint": fp, "started": now()})
    what = "RL " if recipe.method == "grpo" else ""
    tick(f"{what}train ({recipe.train.max_steps} steps{', resuming' if resume else ''})", 0, 0)
    if recipe.method == "grpo":
        from slmtune.rl import train_grpo

        train_grpo(recipe, resume=resume)
    else:
        train(recipe, resume=resume)
    _prune_checkpoints(stage_dir / "checkpoints")
    status = "resumed" if resume else "trained"
    st.mark_done(stage_dir, "train", fp, run_dir=str(stage_dir), trained_in=stage_dir.parent.parent.name,
                 status=status)
    return {"status": status, "run_dir": str(stage_dir), "trained_in": stage_dir.parent.parent.name}


def _prune_checkpoints(root: Path) -> None:
    """A finished run keeps only its newest checkpoint: the weights are saved, and each checkpoint of a full
    fine-tune holds the model and its Adam state (~1.6 GB for SmolLM2-135M in fp32; four a run filled a disk)."""
    from slmtune.train.runfiles import last_checkpoint

    keep = last_checkpoint(root)
    for p in root.glob("checkpoint-*") if root.is_dir() else []:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def _eval(stage_dir: Path, prev_dir: Path | None, run: dict, fp: str, round_dir: Path, name: str,
          config: FlywheelConfig, tick: Progress) -> Path:
    """The eval report dir (report.json, predictions.jsonl) of this task's run."""
    from slmtune.eval.evaluate import GenSettings, evaluate

    hit = _reuse(stage_dir, prev_dir, "eval", fp, lambda m: Path(m["report_dir"], "report.json").is_file(),
                 lambda m: {"report_dir": m["report_dir"]})
    if hit is not None:
        return Path(hit["report_dir"])
    evaluate(round_dir / "tasks" / name / "eval.jsonl", stage_dir, model=run["run_dir"], gate=config.gate,
             settings=GenSettings(batch_size=config.eval_batch_size, decoding=EVAL_DECODING),
             limit=config.eval_limit, target_accuracy=config.target_accuracy,
             progress=lambda s, d, t: tick(f"eval {s}", d, t))
    st.mark_done(stage_dir, "eval", fp, report_dir=str(stage_dir))
    return stage_dir


def _calibration(report: dict) -> dict | None:
    """The tuned row's calibration (threshold from every evaluated call) with its coverage and accuracy
    cross-fit: measured only on calls that did not set the threshold they were judged by (eval's report)."""
    sel = report["models"].get("tuned", {}).get("selective")
    if not sel or "target" not in sel:
        return None
    fit = sel["cross_fit"]
    return {"target": sel["target"], "threshold": sel["threshold"], "lower_bound": sel["lower_bound"],
            "coverage": fit["coverage"], "accuracy": fit["accuracy"], "answered": fit["answered"], "n": fit["n"],
            **({"reason": sel["reason"]} if sel.get("reason") else {})}


def earned(out: TaskOutcome, config: FlywheelConfig) -> tuple[bool, str | None]:
    """Whether the task's SLM earns a route: a calibrated threshold whose cross-fit coverage reaches
    `min_coverage` (always, with min_coverage 0); else the figures that fell short."""
    sel = out.selective
    if config.min_coverage == 0:
        return True, None
    if sel is None:
        return False, "no confidence calibration (a text task, or an eval without confidences)"
    if sel["threshold"] is not None and sel["coverage"] >= config.min_coverage:
        return True, None
    why = f"coverage {sel['coverage']:.2f} at accuracy {sel['target']:g} (needs {config.min_coverage:g}"
    return False, why + (f"; {sel['reason']})" if sel.get("reason") else f"; {sel['answered']} of {sel['n']} "
                         "held-out calls answered, cross-fit)")


def _gate(report: dict, out: TaskOutcome, config: FlywheelConfig) -> tuple[bool, str | None]:
    """Export a task when it passes --gate, or without one when it earns a route (beating the untuned base is
    no reason to answer the agent: agreeing with the teacher is)."""
    if config.gate is not None:
        gate = report["gate"]
        why = "; ".join(f"{f['metric']} = {fmt(f['value'])} (needs {f['op']} {f['threshold']})"
                        for f in gate["failures"])
        return gate["passed"], why or None
    return earned(out, config)


def _export(stage_dir: Path, prev_dir: Path | None, run: dict, eval_fp: str, workdir: Path, round_dir: Path,
            config: FlywheelConfig, tick: Progress, eval_stage: str | None = None,
            bake_off: list[dict] | None = None) -> str:
    # (gguf joins the fingerprint only when set, so exports made before --gguf existed stay reusable)
    fp = fingerprint(["export", eval_fp, config.adapter_only, *([config.gguf] if config.gguf else [])])
    hit = _reuse(stage_dir, prev_dir, "export", fp, lambda m: Path(m["export_dir"], "slmtune.json").is_file(),
                 lambda m: {"export_dir": m["export_dir"]})
    if hit is not None:
        return hit["export_dir"]
    tick("export", 0, 0)
    eval_marker = st.read_marker(round_dir / "eval" / (eval_stage or stage_dir.name)) or {}
    path = export_run(run["run_dir"], workdir / "exports", adapter_only=config.adapter_only, gguf=config.gguf,
                      report=eval_marker.get("report_dir"),
                      extra={"flywheel": {"workdir": str(workdir), "round": round_dir.name,
                                          "trained_in": run["trained_in"]},
                             **({"bake_off": bake_off} if bake_off else {})})
    st.mark_done(stage_dir, "export", fp, export_dir=str(path))
    return str(path)


# ----------------------------------------------------------------------------- round end
def _finish(workdir: Path, round_dir: Path, prev: Path | None, registry: dict, inputs: list[str], selection: dict,
            outcomes: list[TaskOutcome], config: FlywheelConfig) -> FlywheelResult:
    from slmtune.export.router import build_router, route_entry, write_router

    not_trained = selection["not_trained"]
    failed = [{"task": o.task, "reason": f"failed at {o.reason}"} for o in outcomes if not ran_through(o)]
    gate = "gate: " if config.gate is not None else ""
    gated = [{"task": o.task, "reason": f"{gate}{o.reason}"} for o in outcomes if ran_through(o) and not o.gate_passed]
    # exported through --gate, but the SLM's answers did not earn a route: the LLM keeps the task
    unearned = [(o, earned(o, config)) for o in outcomes if o.export]
    gated += [{"task": o.task, "reason": why} for o, (ok, why) in unearned if not ok]
    comparison = _compare(prev, outcomes)
    write_json(round_dir / "summary.json", {"round": round_dir.name, "tasks": [asdict(o) for o in outcomes],
                                            "not_trained": not_trained + failed})
    round_info = read_json_or_none(round_dir / "round.json") or {}
    write_json(round_dir / "round.json", round_info | {"finished": now(), "outcome": {
        "ran_through": [o.task for o in outcomes if ran_through(o)],
        "exported": [o.task for o in outcomes if o.export],
        "failed": [{"task": o.task, "stage": o.stage, "reason": o.reason} for o in outcomes if not ran_through(o)],
        "not_trained": not_trained,
        **({"bake_off": {o.task: o.candidates for o in outcomes if o.candidates}} if config.candidates else {})}})
    write_json(round_dir / "comparison.json", {"round": round_dir.name,
                                               "previous": prev.name if prev else None, "tasks": comparison})
    by_name = {t["name"]: t for t in selection["tasks"]}
    routes = [route_entry(by_name[o.task], Path(o.export), "adapter" if _is_adapter(o.export) else "merged",
                          {o.key_metric: o.metrics}, o.selective) for o, (ok, _) in unearned if ok]
    router_path = workdir / "router.json"
    write_router(router_path, build_router(routes, not_trained + failed + gated, round_dir.name))
    registry["tasks"] = selection["registry_tasks"]
    registry["inputs"] = inputs
    registry["rounds"] = [r for r in registry["rounds"] if r != round_dir.name] + [round_dir.name]
    st.save_registry(workdir, registry)
    return FlywheelResult(workdir, round_dir, prev, outcomes, not_trained + failed + gated, comparison,
                          router_path, workdir / "exports")


def _is_adapter(export_dir: str) -> bool:
    return (Path(export_dir) / "adapter_config.json").is_file()


def _compare(prev: Path | None, outcomes: list[TaskOutcome]) -> list[dict]:
    """Per task: train size and key metric of the previous round beside this one's."""
    before = {}
    if prev is not None and (prev / "summary.json").is_file():
        before = {t["task"]: t for t in json.loads((prev / "summary.json").read_text(encoding="utf-8"))["tasks"]}
    rows = []
    for o in outcomes:
        b = before.get(o.task) or {}
        rows.append({"task": o.task, "status": o.status, "key_metric": o.key_metric,
                     "n_train_before": b.get("n_train"), "n_train": o.n_train,
                     "tuned_before": (b.get("metrics") or {}).get("tuned"), "tuned": o.metrics.get("tuned"),
                     "base": o.metrics.get("base"), "teacher": o.metrics.get("teacher"),
                     "exported_before": b.get("export"), "export": o.export})
    return rows
