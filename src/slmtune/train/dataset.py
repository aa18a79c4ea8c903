"""Canonical records → tokenized training examples (through `slmtune.render`, the one place that renders)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slmtune.models import BaseRef, load_tokenizer, resolve_base
from slmtune.recipe import Recipe
from slmtune.records import read_records
from slmtune.render import Encoded, Renderer, check_mask, encode, make_renderer


@dataclass(frozen=True)
class Example:
    where: str  # "file:line" for error messages
    id: str
    record: dict
    enc: Encoded


@dataclass(frozen=True)
class TokenStats:
    n_examples: int
    tokens: int  # prompt + target
    target_tokens: int  # tokens that carry loss
    max_tokens: int
    n_truncated: int


def encode_records(r: Renderer, path: Path, max_length: int, train_on: str = "last") -> list[Example]:
    examples = []
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        enc = encode(r, rec, max_length, train_on)
        check_mask(enc, f"{where} (id {rec.get('id')!r})")
        examples.append(Example(where, str(rec.get("id", where)), rec, enc))
    return examples


def token_stats(examples: list[Example]) -> TokenStats:
    lengths = [len(e.enc.input_ids) for e in examples]
    return TokenStats(
        n_examples=len(examples),
        tokens=sum(lengths),
        target_tokens=sum(e.enc.n_target for e in examples),
        max_tokens=max(lengths, default=0),
        n_truncated=sum(e.enc.truncated for e in examples),
    )


def to_dataset(examples: list[Example]):
    """A `datasets.Dataset` with `input_ids` and `labels`: TRL takes it as already processed."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e.enc.input_ids for e in examples],
        "labels": [e.enc.labels for e in examples],
    })


@dataclass(frozen=True)
class Prepared:
    """A recipe's base model reference, renderer and encoded examples: what training and its run files use."""

    ref: BaseRef
    renderer: Renderer
    train: list[Example]
    eval: list[Example]


def prepare(recipe: Recipe) -> Prepared:
    """Resolve the base model, load its tokenizer, render and mask every example (fails on a bad one)."""
    ref = resolve_base(recipe.model.base, recipe.model.gguf_file)
    renderer = make_renderer(load_tokenizer(ref, recipe.model.trust_remote_code))
    d = recipe.data
    train = encode_records(renderer, d.train, d.max_length, d.train_on)
    evals = encode_records(renderer, d.eval, d.max_length, d.train_on) if d.eval else []
    return Prepared(ref, renderer, train, evals)
