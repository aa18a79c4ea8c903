"""Shared-prefix batching: compute an agent's long common prompt once per batch, not once per example.

Agent traffic repeats itself: every call of one errand starts with the same system prompt and tool specs —
often most of the tokens (weather calls on SmolLM2: ~250 shared of ~320). Plain SFT re-encodes that prefix for
every example. Here each micro-batch is a group of examples with a common token prefix; the prefix goes through
the model once, its keys/values are broadcast to the batch, and only the suffixes (rest of prompt + target) are
run per example. Gradients flow back through the shared prefix, so loss and gradients are the same as for the
plain batch (up to float rounding) — only the redundant work is gone:

    plain:   B × (P + S) tokens      e.g. 8 × (250 + 70) = 2,560 token-passes per step
    shared:  P + B × S tokens             250 + 8 × 70  =   810  (3.2× fewer)

Logits are computed only where a target token is predicted (the LM head on SmolLM2 is 576 × 49,152 ≈ 28M MACs
per position: a third of the model's per-token work).
"""

from __future__ import annotations

from dataclasses import dataclass

from slmtune.render import Encoded


@dataclass(frozen=True)
class PrefixPlan:
    batches: list[dict]  # rows: {"prefix_ids", "suffix_ids", "suffix_labels"}
    tokens: int  # tokens of the examples (what plain training would compute)
    computed: int  # tokens actually run through the model


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_batches(encs: list[Encoded], batch_size: int) -> PrefixPlan:
    """Group examples into micro-batches of `batch_size` that share the longest prefixes.

    Sorting by token ids puts examples with common prefixes side by side (as a trie would); each consecutive
    chunk of the sorted list is one batch, its prefix the chunk's common prefix, cut so that every example keeps
    at least one prompt token in its suffix (the position that predicts the first target token).
    """
    order = sorted(range(len(encs)), key=lambda i: encs[i].input_ids)
    batches, computed = [], 0
    for start in range(0, len(order), batch_size):
        group = [encs[i] for i in order[start:start + batch_size]]
        p = min(e.n_prompt for e in group) - 1
        for e in group[1:]:
            p = min(p, _lcp(group[0].input_ids, e.input_ids))
        p = max(p, 0)
        batches.append({
            "prefix_ids": group[0].input_ids[:p],
            "suffix_ids": [e.input_ids[p:] for e in group],
            "suffix_labels": [e.labels[p:] for e in group],
        })
        computed += p + sum(len(e.input_ids) - p for e in group)
    return PrefixPlan(batches, sum(len(e.input_ids) for e in encs), computed)


def worth_it(plan: PrefixPlan, min_saving: float = 0.2) -> bool:
    """Use shared-prefix batching only when it saves at least `min_saving` of the token-passes."""
    return plan.tokens > 0 and 1 - plan.computed / plan.tokens >= min_saving


def collate(pad_id: int):
    """Collator for rows of `plan_batches` (the DataLoader batch size is 1 row = 1 micro-batch)."""
    import torch

    def fn(rows: list[dict]) -> dict:
        assert len(rows) == 1, "shared-prefix rows are whole micro-batches; use per_device batch size 1"
        row = rows[0]
        width = max(len(s) for s in row["suffix_ids"])
        ids = torch.full((len(row["suffix_ids"]), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros((ids.shape[0], len(row["prefix_ids"]) + width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(row["suffix_ids"], row["suffix_labels"])):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(row["prefix_ids"]) + len(s)] = 1
        return {"prefix_ids": torch.tensor([row["prefix_ids"]], dtype=torch.long), "input_ids": ids,
                "labels": labels, "attention_mask": mask}

    return fn


def loss(model, inputs: dict, num_items_in_batch=None):
    """Mean cross-entropy over target tokens, prefix computed once (see module docstring)."""
    import torch
    import torch.nn.functional as F

    prefix, ids, labels = inputs["prefix_ids"], inputs["input_ids"], inputs["labels"]
    batch, p = ids.shape[0], prefix.shape[1]
    kwargs: dict = {}
    if p > 0:
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch)  # a differentiable copy: gradients reach the prefix once per example
        kwargs = {"past_key_values": cache, "position_ids": torch.arange(p, p + ids.shape[1]).expand(batch, -1)}
    # Position j predicts token j+1: keep only positions whose next token is a target.
    next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    keep = (next_labels != -100).any(dim=0).nonzero().flatten()
    out = model(input_ids=ids, attention_mask=inputs["attention_mask"], logits_to_keep=keep, use_cache=p > 0,
                **kwargs)
    logits = out.logits.float()
    target = next_labels[:, keep]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    n = (target != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(n, device=total.device).clamp(min=1)
