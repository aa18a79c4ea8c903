"""Canonical records → tokenized training examples (through `slmtune.render`, the one place that renders)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.io import iter_jsonl
from slmtune.records import record_problems
from slmtune.render import Encoded, Renderer, check_mask, encode


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


def read_records(path: Path) -> list[tuple[str, dict]]:
    """Every record with its `file:line`; the first malformed one stops the run with a pointed error."""
    out = []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        problems = record_problems(rec)
        if problems:
            raise SlmtuneError(f"{where}: not a canonical record: {problems[0]}.",
                               "Run `slmtune ingest` on raw logs to produce canonical records.")
        out.append((where, rec))
    if not out:
        raise SlmtuneError(f"{path}: no records.")
    return out


def encode_records(r: Renderer, path: Path, max_length: int) -> list[Example]:
    examples = []
    for where, rec in read_records(path):
        enc = encode(r, rec, max_length)
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
