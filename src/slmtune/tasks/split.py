"""Deterministic train/eval split that keeps near-duplicates on one side.

Near-duplicates (an agent's retries, lightly reworded re-asks) are found by `slmtune.data.dedupe` — the same shingles,
MinHash, bands and verification `curate` uses — over the prompt (system prompt excluded: every record of a task
shares it), at Jaccard threshold 0.7: 32 bands of 4 rows make a pair at 0.7 a candidate with probability
1 - (1 - 0.7⁴)³² = 0.9998, and a candidate counts if the signatures agree on ≥ 80 of 128 positions, which a pair
at 0.7 does 97% of the time (one at 0.5: 0.3%). Verified pairs link records into components (connected
components of the pair graph), and whole components go to eval, in the order of a hash of their smallest record
id, until eval holds `round(fraction · n)` records.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from slmtune.data.dedupe import Lsh, near_pairs, signature, signatures

__all__ = ["SPLIT_JACCARD", "eval_mask", "near_duplicate_components", "signature"]

SPLIT_JACCARD = 0.7


def near_duplicate_components(texts: list[str]) -> np.ndarray:
    """Component id per text: texts linked by near-duplicate chains share one."""
    n = len(texts)
    pairs = near_pairs(signatures(texts), Lsh.for_threshold(SPLIT_JACCARD))
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def eval_mask(ids: list[str], components: list[int], fraction: float) -> np.ndarray:
    """True for the records of one task that go to eval; whole components move together."""
    n = len(ids)
    want = round(fraction * n)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(components):
        members.setdefault(c, []).append(i)
    order = sorted(members.values(), key=lambda rows: _digest(min(ids[r] for r in rows)))
    mask = np.zeros(n, dtype=bool)
    taken = 0
    for rows in order:
        if taken >= want:
            break
        if taken + len(rows) > want + max(1, want // 10):
            continue  # a big component would overshoot (or empty train): try the next, smaller one
        mask[rows] = True
        taken += len(rows)
    return mask


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
