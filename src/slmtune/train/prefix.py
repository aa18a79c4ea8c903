"""Shared-prefix batching: compute an agent's long common prompt once per batch, not once per example.

Agent traffic repeats itself: every call of one errand starts with the same system prompt and tool specs —
often most of the tokens (weather calls on SmolLM2: ~250 shared of ~320). Plain SFT re-encodes that prefix for
every example. Here each micro-batch is a group of examples with a common token prefix; the prefix goes through
the model once, its keys/values are broadcast to the batch, and only the suffixes (rest of prompt + target) are
run per example. Gradients flow back through the shared prefix, so loss and gradients are the same as for the
plain batch (up to float rounding) — only the redundant work is gone:

    plain:   B × (P + S) tokens      e.g. 8 × (250 + 70) = 2,560 token-passes per step
    shared:  P + B × S tokens             250 + 8 × 70  =   810  (3.2× fewer)

The loss itself (prefix KV broadcast, logits only at target positions) is `slmtune.train.loss.target_loss`.
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


def plan_batches(encs: list[Encoded], batch_size: int, seed: int = 0) -> PrefixPlan:
    """Group examples into micro-batches of `batch_size` that share a long prefix, and are otherwise random.

    Sorting by token ids puts examples with common prefixes side by side (as a trie would). The sorted list is
    cut into *families* wherever neighbours share fewer than `_family_cut` tokens (one family per system prompt
    + tool set, in agent traffic). Each family is shuffled (seeded) before it is chunked, so a batch is a random
    sample of its family — not a run of near-identical neighbours, which would make each step's gradient far
    less diverse than plain SFT's and train worse. Leftovers of all families are chunked in sorted order.
    A batch's prefix is its members' common prefix, cut so that every example keeps at least one prompt token
    in its suffix (the position that predicts the first target token).
    """
    import random

    order = sorted(range(len(encs)), key=lambda i: encs[i].input_ids)
    cut = _family_cut(encs)
    families: list[list[int]] = []
    for prev, cur in zip([None, *order], order, strict=False):
        if prev is None or _lcp(encs[prev].input_ids, encs[cur].input_ids) < cut:
            families.append([])
        families[-1].append(cur)
    rng = random.Random(seed)
    groups, rest = [], []
    for family in families:
        rng.shuffle(family)
        full = len(family) - len(family) % batch_size
        groups += [family[i:i + batch_size] for i in range(0, full, batch_size)]
        rest += family[full:]
    rest.sort(key=lambda i: encs[i].input_ids)
    groups += [rest[i:i + batch_size] for i in range(0, len(rest), batch_size)]
    batches, computed = [], 0
    for members in groups:
        group = [encs[i] for i in members]
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


def _family_cut(encs: list[Encoded]) -> int:
    """Neighbours sharing fewer tokens than this start a new family: half the median prompt, at least 32."""
    prompts = sorted(e.n_prompt for e in encs)
    return max(32, prompts[len(prompts) // 2] // 2) if prompts else 32


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
        for i, (s, lab) in enumerate(zip(row["suffix_ids"], row["suffix_labels"], strict=True)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(row["prefix_ids"]) + len(s)] = 1
        return {"prefix_ids": torch.tensor([row["prefix_ids"]], dtype=torch.long), "input_ids": ids,
                "labels": labels, "attention_mask": mask}

    return fn
