"""The `slmtune` command line: parses arguments, calls one stage function, prints the result.

Heavy libraries (torch, transformers, peft, trl) are imported inside the stage modules that need them, so
`--help` and the data stages start fast.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from slmtune.errors import SlmtuneError
from slmtune.fielddoc import field_docs
from slmtune.infer.generate import MAX_BATCH_TOKENS
from slmtune.ui import fmt, human_size

app = typer.Typer(
    name="slmtune",
    help="Turn an AI agent's own LLM traffic into small, specialized language models.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion: bash/zsh/fish complete commands and the choices below
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _edge(fn):
    """Turn SlmtuneError into one line on stderr and its exit code: no traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlmtuneError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"slmtune {version('slmtune')}")
        except PackageNotFoundError:  # run from a source tree without an install
            from slmtune import __version__

            typer.echo(f"slmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="Print slmtune's version and exit.")] = False,
) -> None:
    pass


# Options with a fixed set of values: Typer lists them in --help, completes them, and refuses others with a usage
# error (exit 2). The stage functions check the same values for Python callers.
def _choice(name: str, *values: str) -> type[Enum]:
    return Enum(name, [(v, v) for v in values], type=str)


LogFormat = _choice("LogFormat", "auto", "openai", "messages", "anthropic")
OnSecret = _choice("OnSecret", "redact", "drop")
Scrubber = _choice("Scrubber", "regex", "presidio")
Embedder = _choice("Embedder", "tfidf", "minilm")
SaveDtype = _choice("SaveDtype", "auto", "float32", "bfloat16", "float16")
Engine = _choice("Engine", "embedded", "llamacpp", "vllm")  # = serve.server.ENGINES (tested)
Decoding = _choice("Decoding", "auto", "free", "constrained")  # = eval.evaluate.DECODINGS (tested)
GgufType = _choice("GgufType", "f16", "q8_0", "q4_0", "q4_k_m")  # = export.gguf_export.GGUF_TYPES (tested)
# Options that set a config dataclass field take its docstring as their help (one declaration: slmtune.fielddoc).
CURATE = field_docs("data/curate.py", "CurateConfig")
GEN = field_docs("eval/evaluate.py", "GenSettings")
FLYWHEEL = field_docs("flywheel/loop.py", "FlywheelConfig")
SERVE = field_docs("serve/config.py", "ServeConfig")
GPU_HELP = "auto (CUDA device 0's memory, else cpu), cpu, or the card's memory: 8gb, 12gb, 24gb, 7.5gb, …"


def _gpu_sizes() -> list[str]:  # shell completion for --gpu: the forms, with common card sizes
    return ["auto", "cpu", "8gb", "12gb", "16gb", "24gb", "40gb", "48gb", "80gb"]


def _gpu(value: str) -> str:
    """`--gpu` as the plan stage wants it ("24GB" → "24gb", auto → this machine's); a bad value is a usage error."""
    from slmtune.device import GPU_FORMS, gpu_spec

    try:
        return gpu_spec(value)
    except SlmtuneError:
        raise typer.BadParameter(f"{value!r} is not {GPU_FORMS}.") from None


# ----------------------------------------------------------------------------- data stages (issue 3)
# `ingest` and `curate` are registered below by their owners.
class _Lines:
    """Progress where rich draws nothing — stderr is a log file, CI, a script's pipe: a plain line when the stage
    changes, when it completes, and within a stage at most every `every_s` seconds (a 20-minute eval shows it is
    alive without flooding the log)."""

    def __init__(self, label: str, every_s: float = 15.0):
        self.label, self.every_s, self.stage, self.last, self.closed = label, every_s, None, 0.0, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        finished = bool(total) and done >= total and self.closed != stage
        if stage == self.stage and now - self.last < self.every_s and not finished:
            return
        self.stage, self.last, self.closed = stage, now, stage if finished else self.closed
        count = f"{done:,}/{total:,}" if total else f"{done:,}" if done else ""
        typer.echo(f"{self.label}: {stage} {count}".rstrip(), err=True)


def _counter_progress(label: str):
    """A rich progress line counting records; returns (context manager, callback)."""
    import contextlib

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not console.is_terminal:
        lines = _Lines(label)
        return contextlib.nullcontext(), lambda n: lines("lines", n, 0)

    bar = Progress(SpinnerColumn(), TextColumn(f"{label} {{task.completed:,}} lines"), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda n: bar.update(task, completed=n)


@app.command()
@_edge
def ingest(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH", help="Log files, directories or globs (.jsonl, .jsonl.gz, .json, .parquet).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Canonical records JSONL to write.")],
    format_: Annotated[LogFormat, typer.Option("--format", help="Log format; auto detects it per line.")
                       ] = "auto",
    rejected: Annotated[
        Optional[Path], typer.Option("--rejected", help="Rejected lines (default: OUT with .rejected.jsonl).")
    ] = None,
) -> None:
    """Convert agent LLM logs (OpenAI, messages, Anthropic) into canonical training records."""
    from slmtune.data.ingest import ingest as do_ingest

    bar, tick = _counter_progress("ingest")
    with bar:
        s = do_ingest(paths, out, fmt=format_.value, rejected=rejected, progress=tick)
    formats = ", ".join(f"{k} {v:,}" for k, v in sorted(s.by_format.items())) or "none"
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(s.by_reason.items())) or "none"
    console.print(f"ingested {s.lines_in:,} lines: [green]{s.kept:,} records[/] ({formats}), "
                  f"[yellow]{s.rejected:,} rejected[/] ({reasons})")
    console.print(f"records: {s.out}\nrejected: {s.rejected_path}")


@app.command()
@_edge
def curate(
    records: Annotated[Path, typer.Argument(help="Records JSONL written by `slmtune ingest`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Curated records JSONL to write.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the counts as JSON here.")] = None,
    on_secret: Annotated[OnSecret, typer.Option("--on-secret", help=CURATE["on_secret"])
                         ] = "redact",
    near_dup: Annotated[float, typer.Option(
        "--near-dup", min=0.0, max=1.0, help=CURATE["near_dup"])] = 0.9,
    max_chars: Annotated[int, typer.Option("--max-chars", min=1, help=CURATE["max_chars"])] = 32_000,
    scrubber: Annotated[Scrubber, typer.Option("--scrubber", help=CURATE["scrubber"])
                        ] = "regex",
    workers: Annotated[
        int, typer.Option("--workers", min=0, help=CURATE["workers"])
    ] = 0,
    keep_slm_served: Annotated[bool, typer.Option(
        "--keep-slm-served", help=CURATE["keep_slm_served"])
    ] = False,
) -> None:
    """Scrub PII and secrets, filter broken records, and drop duplicates."""
    from slmtune.data.curate import CurateConfig
    from slmtune.data.curate import curate as do_curate

    config = CurateConfig(on_secret=on_secret.value, near_dup=near_dup, max_chars=max_chars, scrubber=scrubber.value,
                          workers=workers, keep_slm_served=keep_slm_served)
    bar, tick = _counter_progress("curate")
    with bar:
        res = do_curate(records, out, report=report, config=config, progress=tick)
    reasons = ", ".join(f"{k} {v:,}" for k, v in res.rejected_by_reason.items()) or "none"
    pii = ", ".join(f"{k} {v:,}" for k, v in res.pii_placeholders.items()) or "none"
    console.print(f"curated {res.records_in:,} records: [green]{res.kept:,} kept[/], "
                  f"[yellow]{res.rejected:,} rejected[/] ({reasons})")
    console.print(f"placeholders: {pii}\nkept: {res.output}\nrejected: {res.rejected_output}")


# ----------------------------------------------------------------------------- tasks (issue 4)
@app.command()
@_edge
def cluster(
    curated: Annotated[Path, typer.Argument(help="Curated canonical records (JSONL).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Tasks directory to write.")],
    min_size: Annotated[int, typer.Option("--min-size", min=1, help="Smaller groups go to `unassigned`.")] = 20,
    eval_fraction: Annotated[float, typer.Option(
        "--eval-fraction", min=0.0, max=1.0, help="Share of each task held out (below 1).")] = 0.2,
    embedder: Annotated[
        Embedder, typer.Option("--embedder", help="Prompt features: tfidf, or minilm if installed locally.")
    ] = "tfidf",
) -> None:
    """Find the agent's recurring tasks and write one train/eval dir per task."""
    from slmtune.tasks.cluster import cluster as do_cluster

    with _stage_progress("cluster") as tick:
        result = do_cluster(curated, out, min_size=min_size, eval_fraction=eval_fraction, embedder=embedder.value,
                            progress=tick)
    _print_tasks(result)


@app.command()
@_edge
def plan(
    tasks_dir: Annotated[Path, typer.Argument(help="Tasks directory written by `slmtune cluster`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Directory for the recipe YAMLs.")],
    gpu: Annotated[str, typer.Option("--gpu", parser=_gpu, autocompletion=_gpu_sizes, metavar="auto|cpu|NNgb",
                                     help=GPU_HELP)] = "24gb",
    base_model: Annotated[
        Optional[str],
        typer.Option("--base-model", help="Use this model for every task (catalog key, hub id or folder)."),
    ] = None,
    candidates: Annotated[
        Optional[str],
        typer.Option("--candidates", help="Also write a recipe per candidate model for a bake-off "
                     "(<task>@<model>.yaml): auto (CPU: the offline models installed here; GPU: the category's "
                     "top two that fit) or catalog keys / folders, comma-separated."),
    ] = None,
) -> None:
    """Propose one recipe per task that fits the GPU's memory."""
    from rich.table import Table

    from slmtune.plan.planner import plan as do_plan

    result = do_plan(tasks_dir, out, gpu=gpu, base_model=base_model, candidates=candidates)
    table = Table(title=f"{len(result.planned)} recipes for --gpu {gpu}")
    for col in ("recipe", "model", "quant", "batch×accum", "max_length", "left out", "est. memory"):
        table.add_column(col)
    for p in result.planned:
        table.add_row(str(p.path), p.model, p.quantization, f"{p.batch_size}×{p.grad_accum}", str(p.max_length),
                      str(len(p.lengths.dropped)), f"{p.memory_gib:.2f} / {p.budget_gib:.2f} GiB")
    Console().print(table)
    for f in result.failed:
        Console(stderr=True).print(f"[yellow]not planned[/yellow] {f['task']}: {f['reason']}", highlight=False)


def _stage_progress(label: str):
    """A rich progress bar fed by a library `progress(stage, done, total)` callback."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    @contextlib.contextmanager
    def cm():
        if not console.is_terminal:
            yield _Lines(label)
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("reading", total=None)

            def tick(stage: str, done: int, total: int) -> None:
                bar.update(task, description=stage, completed=done, total=total or None)

            yield tick

    return cm()


def _print_tasks(result) -> None:
    from rich.table import Table

    table = Table(title=f"{len(result.tasks)} tasks from {result.n_records:,} records "
                        f"({result.n_unassigned:,} unassigned)")
    for col in ("task", "category", "train", "eval", "schema", "top terms"):
        table.add_column(col)
    for t in result.tasks:
        table.add_row(t["name"], t["category"], str(t["n_train"]), str(t["n_eval"]), t["schema_hash"] or "-",
                      ", ".join(t["top_terms"][:4]))
    Console().print(table)
    typer.echo(f"index: {result.index_path}")
    typer.echo(f"map:   {result.map_path}")


# ----------------------------------------------------------------------------- eval (issue 5)
@app.command("eval")
@_edge
def eval_(
    data: Annotated[Path, typer.Option("--data", help="Eval records (JSONL); task.json beside it gives the schema.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Report directory to write.")],
    model: Annotated[
        Optional[str], typer.Option("--model", help="Run dir, merged/exported checkpoint, or base model.")
    ] = None,
    baseline: Annotated[
        Optional[str], typer.Option("--baseline", help="Second model to compare (default for a run dir: its base; "
                                    "`none` to skip).")
    ] = None,
    predictions: Annotated[
        Optional[Path], typer.Option("--predictions", help="Score existing outputs: {id, message|text} lines.")
    ] = None,
    decoding: Annotated[Decoding, typer.Option(
        "--decoding", help=GEN["decoding"])
    ] = Decoding.auto,
    compare_decodings: Annotated[
        bool, typer.Option("--compare-decodings", help="Decode free, and the primary model also under the "
                           "task's grammar (report section `constrained`).")
    ] = False,
    old_compare: Annotated[bool, typer.Option(
        "--constrained", hidden=True, help="Old name of --compare-decodings.")] = False,
    gate: Annotated[
        Optional[Path], typer.Option("--gate", help="Thresholds per metric (JSON/YAML); exit 3 when one is missed.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help=GEN["batch_size"])] = 16,
    batch_tokens: Annotated[int, typer.Option(
        "--batch-tokens", min=0, help=GEN["batch_tokens"])] = MAX_BATCH_TOKENS,
    max_new_tokens: Annotated[
        Optional[int], typer.Option("--max-new-tokens", min=1, help=GEN["max_new_tokens"])
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N records.")] = None,
    target_accuracy: Annotated[Optional[float], typer.Option(
        "--target-accuracy", min=0.0, max=1.0, help="Calibrate each model row's confidence threshold: the lowest "
        "whose answered records agree with the teacher at this rate (90 % lower bound); report.json "
        "`selective`.")] = None,
) -> None:
    """Score a model's outputs against the teacher's: parse, schema, tool calls, labels, text overlap."""
    from slmtune.eval.evaluate import GenSettings, evaluate
    from slmtune.eval.report import markdown

    with _stage_progress("eval") as tick:
        result = evaluate(data, out, model=model, baseline=baseline, predictions=predictions,
                          constrained=compare_decodings or old_compare, gate=gate, limit=limit, progress=tick,
                          target_accuracy=target_accuracy,
                          settings=GenSettings(batch_size=batch_size, batch_tokens=batch_tokens or None,
                                               max_new_tokens=max_new_tokens, decoding=decoding.value))
    typer.echo(markdown(result.report))
    typer.echo(f"report: {out / 'report.json'}")
    if not result.gate_passed:
        failed = ", ".join(f["metric"] for f in result.report["gate"]["failures"])
        typer.echo(f"gate failed: {failed}", err=True)
        raise typer.Exit(3)


# ----------------------------------------------------------------------------- train / merge (issue 2)
@app.command()
@_edge
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate recipe and data, show two rendered examples, don't train.")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in output.dir.")] = False,
) -> None:
    """Train a LoRA / QLoRA adapter (or a full fine-tune) from a recipe; `method: grpo` runs RL after SFT."""
    from slmtune.recipe import load_recipe

    rec = load_recipe(recipe, set_ or [])
    if dry_run:
        from slmtune.train.trainer import dry_run as do_dry_run

        if rec.method == "grpo":
            from slmtune.rl import from_start

            rec, _ = from_start(rec)  # model.base: the SFT run → its trained model (train_grpo does the same)
        do_dry_run(rec, out=Console())
        return
    from slmtune.train import distributed

    if rec.distributed.strategy != "none" and not distributed.launched():
        raise typer.Exit(distributed.relaunch(rec, recipe, set_ or [], resume))
    if rec.method == "grpo":
        from slmtune.rl import train_grpo as do_train
    else:
        from slmtune.train.trainer import train as do_train

    result = do_train(rec, resume=resume)
    if result.metrics:  # only rank 0 reports (and writes the run files)
        typer.echo(f"{result.weights_dir.name}: {result.weights_dir}")
        typer.echo(f"metrics: {result.run_dir / 'metrics.json'}")


@app.command()
@_edge
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `slmtune train`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the merged checkpoint.")],
    dtype: Annotated[SaveDtype, typer.Option("--dtype", help="Saved weights dtype; auto keeps the base's.")
                     ] = "auto",
) -> None:
    """Merge a run's adapter into full-precision base weights, verify it, and save a normal checkpoint."""
    from slmtune.export.merge import merge_run

    report = merge_run(run_dir, out, dtype=dtype.value)
    typer.echo(f"merged: {out}  max |logit diff| = {report.max_abs_logit_diff:.2e}  "
               f"greedy outputs identical: {report.greedy_identical}")


# ----------------------------------------------------------------------------- export / models / flywheel (issue 6)
@app.command()
@_edge
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `slmtune train`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Exports folder; the export goes in a subfolder.")],
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Export the LoRA adapter, not merged weights.")
                            ] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Eval report dir (`slmtune eval -o`).")] = None,
    gguf: Annotated[Optional[GgufType], typer.Option(
        "--gguf", help="Also write a GGUF (llama.cpp's converter) + Ollama Modelfile: f16, q8_0 or q4_0 "
                       "(q4_k_m needs llama.cpp's llama-quantize; the error says how).")] = None,
) -> None:
    """Export a run as a tagged checkpoint: weights, tokenizer, model card, slmtune.json manifest."""
    from slmtune.export.export import export_run

    path = export_run(run_dir, out, adapter_only=adapter_only, report=report, gguf=gguf.value if gguf else None)
    typer.echo(f"exported: {path}")


@app.command()
@_edge
def models(
    exports_dir: Annotated[Path, typer.Argument(help="Folder of exports (`slmtune export -o`).")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON rows instead of a table.")] = False,
) -> None:
    """List exported checkpoints: task, category, schema, base, size, key metric vs base and teacher."""
    import json

    from slmtune.export.exports import list_models

    rows = list_models(exports_dir)
    if json_:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_models(rows, exports_dir)


def _print_models(rows: list[dict], exports_dir: Path) -> None:
    from rich.table import Table


    table = Table(title=f"{len(rows)} exported checkpoints in {exports_dir}")
    for col in ("task", "category", "schema", "base", "format", "size", "metric", "base", "tuned", "teacher",
                "created"):
        table.add_column(col)
    for r in rows:
        vals = [fmt(r[k]) for k in ("base_value", "tuned", "teacher")]
        table.add_row(r["task"], r["category"], (r["schema_hash"] or "-")[:8], r["base"], r["format"],
                      human_size(r["size_bytes"]), r["key_metric"], *vals, r["created"] or "-")
    Console(width=200).print(table)


@app.command()
@_edge
def flywheel(
    logs: Annotated[list[str], typer.Argument(metavar="LOGS", help="Log files, dirs or globs (new ones this round).")],
    workdir: Annotated[Path, typer.Option("-w", "--workdir", help="Flywheel folder: rounds, exports, router.json.")],
    gpu: Annotated[str, typer.Option("--gpu", parser=_gpu, autocompletion=_gpu_sizes, metavar="auto|cpu|NNgb",
                                     help=FLYWHEEL["gpu"])] = "cpu",
    base_model: Annotated[Optional[str], typer.Option("--base-model", help=FLYWHEEL["base_model"])] = None,
    candidates: Annotated[Optional[str], typer.Option("--candidates", help=FLYWHEEL["candidates"])] = None,
    rl: Annotated[bool, typer.Option("--rl", help=FLYWHEEL["rl"])] = False,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help=FLYWHEEL["max_steps"])] = None,
    gate: Annotated[Optional[Path], typer.Option("--gate", help=FLYWHEEL["gate"])] = None,
    max_tasks: Annotated[Optional[int], typer.Option("--max-tasks", min=1, help=FLYWHEEL["max_tasks"])
                         ] = None,
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help=FLYWHEEL["eval_limit"])] = 100,
    eval_fraction: Annotated[float, typer.Option(
        "--eval-fraction", min=0.0, max=0.9, help=FLYWHEEL["eval_fraction"])] = 0.2,
    target_accuracy: Annotated[float, typer.Option(
        "--target-accuracy", min=0.0, max=1.0, help=FLYWHEEL["target_accuracy"])] = 0.95,
    min_coverage: Annotated[float, typer.Option(
        "--min-coverage", min=0.0, max=1.0, help=FLYWHEEL["min_coverage"])] = 0.2,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help=FLYWHEEL["adapter_only"])] = False,
    gguf: Annotated[Optional[GgufType], typer.Option(
        "--gguf", help=FLYWHEEL["gguf"])
                    ] = None,
    min_size: Annotated[int, typer.Option("--min-size", min=1, help=FLYWHEEL["min_size"])] = 20,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=FLYWHEEL["overrides"])
                    ] = None,
) -> None:
    """Run the whole loop — ingest, curate, cluster, plan, train, eval, export — as a new round in WORKDIR."""
    import contextlib
    import os
    import warnings

    from slmtune.flywheel.loop import FlywheelConfig, run_flywheel

    os.environ.setdefault("TQDM_DISABLE", "1")  # one progress view: the trainer's own bars would tear it
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's business
    config = FlywheelConfig(gpu=gpu, base_model=base_model, candidates=candidates, rl=rl, max_steps=max_steps,
                            max_tasks=max_tasks,
                            eval_limit=eval_limit, gate=gate, adapter_only=adapter_only, min_size=min_size,
                            eval_fraction=eval_fraction, target_accuracy=target_accuracy, min_coverage=min_coverage,
                            overrides=tuple(set_ or []), gguf=gguf.value if gguf else None)
    workdir.mkdir(parents=True, exist_ok=True)
    # The trainer prints its loss dicts to stdout; they go to a log so the progress view and summary stay readable.
    with open(workdir / "flywheel.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            _flywheel_progress() as tick:
        result = run_flywheel(logs, workdir, config, progress=tick)
    _print_flywheel(result)
    typer.echo(f"log:     {workdir / 'flywheel.log'}")
    from slmtune.flywheel.loop import ran_through

    if result.tasks and not any(ran_through(o) for o in result.tasks):
        raise SlmtuneError(f"every task of {result.round_dir.name} failed; reasons above and in "
                           f"{result.round_dir / 'summary.json'}.")


def _flywheel_progress():
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def cm():
        if not console.is_terminal:
            yield _Lines("flywheel")
            return
        with Progress(TextColumn("flywheel"), TimeElapsedColumn(), TextColumn("{task.description}"), BarColumn(),
                      MofNCompleteColumn(), console=console, transient=True) as bar:
            task = bar.add_task("starting", total=None)
            yield lambda stage, done, total: bar.update(task, description=stage, completed=done, total=total or None)

    return cm()


def _print_flywheel(result) -> None:
    from rich.table import Table

    out = Console(width=200)
    prev = f" (previous: {result.previous.name})" if result.previous else ""
    table = Table(title=f"flywheel {result.round_dir.name}{prev}: {len(result.tasks)} tasks")
    # answers / their accuracy: the share of held-out calls the SLM answers at the target accuracy, and how many
    # of those agreed with the teacher (cross-fit: counted on calls that did not set the threshold)
    for col in ("task", "category", "train", "eval", "status", "metric", "base", "tuned", "teacher", "answers",
                "their acc.", "gate", "export"):
        table.add_column(col)
    for o in result.tasks:
        gate = "-" if o.status == "failed" else "[green]pass[/]" if o.gate_passed else "[red]fail[/]"
        sel = o.selective or {}
        share = f"{sel['coverage']:.0%}" if sel.get("coverage") is not None else "-"
        table.add_row(o.task, o.category, str(o.n_train), str(o.n_eval), o.status, o.key_metric,
                      *(fmt(o.metrics.get(k)) for k in ("base", "tuned", "teacher")), share, fmt(sel.get("accuracy")),
                      gate, Path(o.export).name if o.export else "-")
    out.print(table)
    for t in result.not_trained:
        out.print(f"[yellow]not routed[/] {t['task']}: {t['reason']}")
    if result.previous:
        for c in result.comparison:
            out.print(f"vs {result.previous.name}: {c['task']} {c['status']}, train {c['n_train_before']} → "
                      f"{c['n_train']}, {c['key_metric']} {fmt(c['tuned_before'])} → {fmt(c['tuned'])}")
    typer.echo(f"exports: {result.exports_dir}")
    typer.echo(f"router:  {result.router_path}")
    typer.echo(f"round:   {result.round_dir}")


# ----------------------------------------------------------------------------- serve (issue 14)
@app.command()
@_edge
def serve(
    workdir: Annotated[Optional[Path], typer.Argument(help="Flywheel workdir: serves its router.json.")] = None,
    router: Annotated[Optional[Path], typer.Option("--router", help="A router.json instead of WORKDIR's.")] = None,
    host: Annotated[str, typer.Option("--host", help=SERVE["host"])] = "127.0.0.1",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help=SERVE["insecure"])] = False,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help=SERVE["port"])] = 8000,
    upstream: Annotated[Optional[str], typer.Option(
        "--upstream", help=SERVE["upstream"])] = None,
    upstream_key_env: Annotated[Optional[str], typer.Option(
        "--upstream-key-env", help=SERVE["upstream_key_env"])] = None,
    upstream_timeout: Annotated[float, typer.Option("--upstream-timeout", help=SERVE["upstream_timeout_s"])
                                ] = 120.0,
    engine: Annotated[Engine, typer.Option("--engine", help=SERVE["engine"])
                      ] = "embedded",
    engine_url: Annotated[Optional[list[str]], typer.Option(
        "--engine-url", help=SERVE["engine_urls"])] = None,
    print_vllm_command: Annotated[bool, typer.Option(
        "--print-vllm-command", help="Print the vLLM commands for the router's exports and exit.")] = False,
    max_loaded: Annotated[int, typer.Option("--max-loaded", min=1, help=SERVE["max_loaded"])] = 2,
    batch_window_ms: Annotated[float, typer.Option(
        "--batch-window-ms", min=0, help=SERVE["batch_window_ms"])] = 10.0,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help=SERVE["max_batch"])] = 16,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, help=SERVE["max_new_tokens"])
                              ] = 512,
    decoding: Annotated[Decoding, typer.Option(
        "--decoding", help=SERVE["decoding"])] = Decoding.auto,
    old_constrained: Annotated[Optional[bool], typer.Option(
        "--constrained/--no-constrained", hidden=True, help="Old name: --decoding constrained / free.")] = None,
    sample: Annotated[bool, typer.Option(
        "--sample", help=SERVE["sample"])] = False,
    slm_timeout: Annotated[float, typer.Option(
        "--slm-timeout", help=SERVE["slm_timeout_s"])] = 30.0,
    min_score: Annotated[Optional[list[str]], typer.Option(
        "--min-score", help=SERVE["min_score"])] = None,
    api_key_env: Annotated[Optional[str], typer.Option(
        "--api-key-env", help=SERVE["api_key_env"])
                           ] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1, help=SERVE["max_body_bytes"])
                              ] = 4 << 20,
    max_tokens_cap: Annotated[int, typer.Option(
        "--max-tokens-cap", min=1, help=SERVE["max_tokens_cap"])] = 32768,
    max_concurrency: Annotated[int, typer.Option(
        "--max-concurrency", min=1, help=SERVE["max_concurrency"])] = 256,
    log_dir: Annotated[Optional[Path], typer.Option(
        "--log-dir", help=SERVE["log_dir"])] = None,
    log_scrub: Annotated[bool, typer.Option(
        "--log-scrub/--no-log-scrub", help=SERVE["log_scrub"])] = True,
    log_scrubber: Annotated[Scrubber, typer.Option(
        "--log-scrubber", help=SERVE["log_scrubber"])] = "regex",
) -> None:
    """Serve the exports as an OpenAI-compatible API: routed requests to their small model, the rest upstream."""
    from slmtune.serve import config as serve_config
    from slmtune.serve.server import run

    if (workdir is None) == (router is None):
        raise typer.BadParameter("give a flywheel WORKDIR or --router router.json (one of them).")  # exit 2
    router_path = router if router is not None else workdir / "router.json"
    if print_vllm_command:
        typer.echo(serve_config.vllm_command_text(router_path))
        return
    config = serve_config.ServeConfig(
        router=router_path, host=host, port=port, engine=engine.value, engine_urls=tuple(engine_url or ()),
        upstream=upstream, upstream_key_env=upstream_key_env, upstream_timeout_s=upstream_timeout,
        max_loaded=max_loaded, batch_window_ms=batch_window_ms, max_batch=max_batch, max_new_tokens=max_new_tokens,
        decoding=_serve_decoding(decoding, old_constrained), sample=sample, slm_timeout_s=slm_timeout,
        min_score=serve_config.parse_min_score(min_score or []), api_key_env=api_key_env, max_body_bytes=max_body_bytes,
        log_dir=log_dir, log_scrub=log_scrub, insecure=insecure, max_tokens_cap=max_tokens_cap,
        max_concurrency=max_concurrency, log_scrubber=Scrubber(log_scrubber).value)
    run(config)


def _serve_decoding(decoding, old_constrained: bool | None) -> str:
    """`--decoding`, or what the old `--constrained/--no-constrained` (kept hidden for one release) asked."""
    if old_constrained is None:
        return decoding.value
    if decoding.value != "auto":
        raise SlmtuneError("give --decoding or the old --constrained/--no-constrained, not both.")
    return "constrained" if old_constrained else "free"


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="slmtune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
