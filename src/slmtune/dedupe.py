"""Duplicate detection for `curate`: exact (normalized record) and near (MinHash LSH over the prompt).

Split in two so the costly half runs in worker processes: `Keyer.keys(records)` computes each record's
exact key and LSH band keys (pure, picklable results); `Seen.check(...)` is the order-dependent membership test
run once, in input order, in the main process — the first record seen is the one kept.

The prompt is every non-system message before the target (content and tool-call arguments), lower-cased
and cut into word 3-grams. MinHash uses datasketch's permutations and formula, vectorised with numpy;
datasketch also picks the band split (b bands x r rows) for the threshold.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from slmtune.jsonl import dumps
from slmtune.records import target_index

_WORD = re.compile(r"\w+")
_MERSENNE, _MAX_HASH = (1 << 61) - 1, (1 << 32) - 1


class Keyer:
    """Computes (exact key, band keys) for a record; band keys are [] when near-dedupe is off."""

    def __init__(self, threshold: float, num_perm: int = 64):
        self.threshold, self.b, self.r = threshold, 0, 0
        if threshold > 0:
            import numpy as np
            from datasketch import MinHash, MinHashLSH

            lsh = MinHashLSH(threshold=min(threshold, 0.99), num_perm=num_perm)
            self.b, self.r = lsh.b, lsh.r
            self.a, self.c = MinHash(num_perm=num_perm, seed=1).permutations
            self.mix = np.random.default_rng(1).integers(1, 2**63, size=self.r, dtype=np.uint64) | np.uint64(1)

    def keys(self, recs: list[dict]) -> list[tuple[bytes, list[int]]]:
        """(exact key, band keys) per record; MinHash runs once over the whole batch to amortise numpy."""
        exact = [_exact_key(r) for r in recs]
        if not self.b or not recs:
            return [(e, []) for e in exact]
        import numpy as np

        hashes: list[int] = []
        starts = []
        for rec in recs:
            starts.append(len(hashes))
            hashes += _gram_hashes(rec)
        h = np.array(hashes, dtype=np.uint64)
        # datasketch's permutation (a*h + c) mod (2^61 - 1), min per record: one numpy pass per batch
        # (~256 records) instead of ~10 small numpy calls per record.
        perm = ((np.outer(h, self.a) + self.c) % _MERSENNE) & _MAX_HASH
        mins = np.minimum.reduceat(perm, starts, axis=0)[:, : self.b * self.r].reshape(len(recs), self.b, self.r)
        # One 64-bit key per band: a random linear combination of its r values, wrapping mod 2^64.
        return list(zip(exact, (mins * self.mix).sum(axis=2).tolist()))


def _exact_key(rec: dict) -> bytes:
    """8-byte digest of every message (role, content, tool calls; case and whitespace folded) and the tools."""
    parts = []
    for m in rec["messages"]:
        parts += [m["role"], m.get("content") or "", m.get("tool_call_id") or ""]
        parts += [c["function"]["name"] + c["function"]["arguments"] for c in m.get("tool_calls") or []]
    text = " ".join("\x1f".join(parts).lower().split()) + "\x1e" + dumps(rec.get("tools"))
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _gram_hashes(rec: dict) -> list[int]:
    """crc32 of each word 3-gram of the prompt (repeats are harmless: a min ignores them)."""
    w = _WORD.findall(prompt_text(rec).lower())
    grams = [zlib.crc32(f"{a} {b} {c}".encode()) for a, b, c in zip(w, w[1:], w[2:])]
    return grams or [zlib.crc32(" ".join(w).encode())]  # under three words: the prompt is one shingle


class Seen:
    """Keys of the records kept so far: one 8-byte digest + id per record and one int per band (~0.3 kB)."""

    def __init__(self, n_bands: int, threshold: float):
        self.exact: dict[bytes, str] = {}
        self.bands: list[set[int]] = [set() for _ in range(n_bands)]
        self.threshold = threshold
        self.exact_removed = self.near_removed = 0

    def check(self, exact: bytes, bands: list[int], rec_id: Any) -> tuple[str, str, str] | None:
        """(reason, detail, duplicate_of) when a kept record already has these keys; else remember them."""
        if exact in self.exact:
            self.exact_removed += 1
            return "duplicate", "same normalized messages and tools", self.exact[exact]
        if any(h in band for h, band in zip(bands, self.bands)):
            self.near_removed += 1
            return "near_duplicate", f"prompt Jaccard >= {self.threshold} with an earlier record", ""
        self.exact[exact] = str(rec_id)
        for h, band in zip(bands, self.bands):
            band.add(h)
        return None


def prompt_text(rec: dict) -> str:
    msgs = rec["messages"]
    parts = []
    for m in msgs[: target_index(msgs)]:
        if m.get("role") != "system":
            parts.append(m.get("content") or "")
            parts += [c["function"]["name"] + " " + c["function"]["arguments"] for c in m.get("tool_calls") or []]
    return "\n".join(parts)
