"""Canonical records → tokenized training examples (through `slmtune.render`, the one place that renders)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from slmtune.device import MAX_LENGTH_CAP, cuda
from slmtune.errors import SlmtuneError
from slmtune.models import BaseRef, load_tokenizer, resolve_base
from slmtune.recipe import Recipe, auto_max_length
from slmtune.records import read_records
from slmtune.render import Encoded, Renderer, check_mask, encode, make_renderer, mark_tool_docs
from slmtune.train.augment import AugmentStats, augment

NO_LIMIT = 1 << 30


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


def read_items(path: Path) -> list[tuple[str, dict]]:
    """("file:line", record) for every record of a JSONL file."""
    return [(f"{path}:{lineno}", rec) for lineno, rec in read_records(path)]


def encode_records(r: Renderer, path: Path, max_length: int, train_on: str = "last") -> list[Example]:
    return encode_items(r, read_items(path), max_length, train_on)


def encode_items(r: Renderer, items: list[tuple[str, dict]], max_length: int, train_on: str = "last") -> list[Example]:
    examples = []
    for where, rec in items:
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
    augment: AugmentStats = AugmentStats()  # what `augment:` did to the training records
    max_length: int = 0  # the window trained with (`data.max_length`, `auto` resolved)
    left_out: tuple[str, ...] = ()  # "file:line" of training records over the `auto` cap (not trained on)
    longest: int | None = None  # `auto`: the longest training record kept, in tokens
    cap: int | None = None  # `auto`: the longest record a run trains on (`slmtune.device.MAX_LENGTH_CAP`)


def prepare(recipe: Recipe) -> Prepared:
    """Resolve the base model, load its tokenizer, augment the training records (`augment:`; never eval's), render
    and mask every example (fails on a bad one). The augmented set is made once: every epoch sees the same one."""
    ref = resolve_base(recipe.model.base, recipe.model.gguf_file)
    d, a = recipe.data, recipe.augment
    tokenizer = load_tokenizer(ref, recipe.model.trust_remote_code)
    if d.tool_docs == "compact" and make_renderer(tokenizer).mode == "native":
        raise SlmtuneError("data.tool_docs: compact needs a chat template that leaves tools to slmtune; this "
                           "model's template renders them itself.", "Set data.tool_docs: full for this model.")
    mark_tool_docs(tokenizer, d.tool_docs)  # saved beside the weights: eval, export and serve render alike
    renderer = make_renderer(tokenizer)
    items, stats = augment(read_items(d.train), a, recipe.train.seed if a.seed is None else a.seed)
    if d.max_length != "auto":
        train = encode_items(renderer, items, d.max_length, d.train_on)
        evals = encode_records(renderer, d.eval, d.max_length, d.train_on) if d.eval else []
        return Prepared(ref, renderer, train, evals, stats, d.max_length)
    # `auto`: measured on the records as trained (after augmentation, which lengthens prompts); none truncated.
    cap = MAX_LENGTH_CAP["gpu" if cuda() else "cpu"]
    every = encode_items(renderer, items, NO_LIMIT, d.train_on)
    train = [e for e in every if len(e.enc.input_ids) <= cap]
    if not train:
        raise SlmtuneError(f"{d.train}: every training record is longer than {cap} tokens (data.max_length: auto).",
                           "Set data.max_length to a number to train on truncated prompts, or shorten them.")
    longest = max(len(e.enc.input_ids) for e in train)
    max_length = auto_max_length(longest, cap)  # what `resolve_auto(longest=, cap=)` gives the trainer
    evals = [e for e in (encode_records(renderer, d.eval, NO_LIMIT, d.train_on) if d.eval else [])
             if len(e.enc.input_ids) <= max_length]
    left_out = tuple(e.where for e in every if len(e.enc.input_ids) > cap)
    return Prepared(ref, renderer, train, evals, stats, max_length, left_out, longest, cap)


def step_bins(inputs: dict, max_tokens: int) -> list[dict]:
    """A padding-free batch (its records end to end in one row, `cu_seq_lens_q` their bounds) split into rows of
    at most `max_tokens` tokens, whole records each (first-fit by decreasing length); one row if it fits already.

    Records mode runs one optimizer step's records this way: a forward holds at most `max_tokens` tokens of
    activations, as a single record would, but short records share a forward, so the frozen weights are read from
    memory once per row rather than once per record (the same gradient: attention stays within each record)."""
    import torch

    cu = inputs.get("cu_seq_lens_q")
    ids = inputs["input_ids"]
    if cu is None or ids.shape[0] != 1 or ids.shape[1] <= max_tokens:
        return [inputs]
    bounds = [int(x) for x in cu.tolist()]
    spans = sorted(zip(bounds[:-1], bounds[1:], strict=True), key=lambda s: s[0] - s[1])  # longest first
    bins: list[list[tuple[int, int]]] = []
    for s, e in spans:
        room = next((b for b in bins if sum(y - x for x, y in b) + e - s <= max_tokens), None)
        if room is None:
            bins.append([(s, e)])
        else:
            room.append((s, e))
    rows = []
    for b in sorted(sorted(b) for b in bins):  # in batch order
        idx = torch.cat([torch.arange(s, e, device=ids.device) for s, e in b])
        lens = [e - s for s, e in b]
        row = {k: (v[:, idx] if torch.is_tensor(v) and v.dim() == 2 and v.shape == ids.shape else v)
               for k, v in inputs.items()}
        cu_row = torch.tensor([0, *accumulate(lens)], dtype=cu.dtype, device=cu.device)
        row |= {"cu_seq_lens_q": cu_row, "cu_seq_lens_k": cu_row, "max_length_q": max(lens), "max_length_k": max(lens)}
        if "seq_idx" in inputs:
            row["seq_idx"] = torch.repeat_interleave(torch.arange(len(lens), device=ids.device),
                                                     torch.tensor(lens, device=ids.device))[None].to(
                                                         inputs["seq_idx"].dtype)
        rows.append(row)
    return rows
