"""The `slmtune` command line: parses arguments, calls one stage function, prints the result.

Heavy libraries (torch, transformers, peft, trl) are imported inside the stage modules that need them, so
`--help` and the data stages start fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from slmtune.errors import SlmtuneError

app = typer.Typer(
    name="slmtune",
    help="Turn an AI agent's own LLM traffic into small, specialized language models.",
    no_args_is_help=True,
    add_completion=False,
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


# ----------------------------------------------------------------------------- data stages (issue 3)
# `ingest` and `curate` are registered below by their owners.

# ----------------------------------------------------------------------------- tasks (issue 4)
# `cluster` and `plan` are registered below by their owners.


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
    """Train a LoRA / QLoRA adapter from a recipe."""
    from slmtune.recipe import load_recipe

    rec = load_recipe(recipe, set_ or [])
    if dry_run:
        from slmtune.train import dry_run as do_dry_run

        do_dry_run(rec, out=Console())
        return
    from slmtune.train import train as do_train

    result = do_train(rec, resume=resume)
    typer.echo(f"adapter: {result.adapter_dir}")
    typer.echo(f"metrics: {result.run_dir / 'metrics.json'}")


@app.command()
@_edge
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `slmtune train`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the merged checkpoint.")],
    dtype: Annotated[str, typer.Option(help="Saved weights dtype: float32, bfloat16, float16 or auto.")] = "auto",
) -> None:
    """Merge a run's adapter into full-precision base weights, verify it, and save a normal checkpoint."""
    from slmtune.merge import merge_run

    report = merge_run(run_dir, out, dtype=dtype)
    typer.echo(f"merged: {out}  max |logit diff| = {report['max_abs_logit_diff']:.2e}  "
               f"greedy outputs identical: {report['greedy_identical']}")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="slmtune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
