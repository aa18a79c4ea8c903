"""Duplicate detection: exact keys for `curate`, and the one near-duplicate search (MinHash + LSH) that `curate`
(drop near duplicates) and `cluster_split` (keep near duplicates on one side of the train/eval split) share.

Split in two so the costly half runs in curate's worker processes: `Keyer.keys(records)` computes each record's
exact key, MinHash signature and band keys (pure, picklable results); `Seen.check(...)` is the order-dependent
membership test run once, in input order, in the main process — the first record seen is the one kept.

Near duplicates, step by step (curate: a record is a near duplicate when its prompt and its answer both match a
kept record's at the threshold; the prompt finds candidates, the answer signatures are compared after):
1. Shingles: the text, lower-cased, cut into word 3-grams (under three words: one shingle), each hashed to 32 bits
   from its words' crc32s.
2. Signature: the minimum of each of NUM_PERM = 128 hash functions over the shingles. Two signatures agree at a
   position with probability s, the Jaccard similarity of the shingle sets, so the fraction of agreeing positions
   estimates s with standard error √(s(1 - s)/128) = 0.027 at s = 0.9.
3. Candidates (LSH): the 128 values cut into b bands of r rows; records sharing any whole band are candidates,
   with probability 1 - (1 - s^r)^b. `Lsh.for_threshold` picks (b, r) from that formula.
4. Verification: a candidate counts only if the signatures agree on ≥ `min_agree` positions. Agreement at s = the
   threshold is Binomial(128, s), below its mean half the time, so a cut at the threshold itself would catch only
   ~50 % of pairs right at it; the cut sits as far below as keeps 97 % of them (the binomial tail), e.g.
   109/128 = 0.85 for threshold 0.9.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from itertools import chain
from math import comb

import numpy as np

from slmtune.errors import SlmtuneError
from slmtune.io import dumps
from slmtune.records import target_index

NUM_PERM = 128
VERIFY_RECALL = 0.97  # P(a pair exactly at the threshold passes verification)
CANDIDATE_RECALL = 0.999  # P(it is a candidate): together ≥ 0.97 × 0.999 = 0.969 at the threshold, more above
# Candidates per band: the bucket's first text and the WINDOW latest before this one. Templated prompts can put
# thousands of texts in one bucket; comparing with all of them would make the search quadratic.
WINDOW = 16
# Multiply-shift hashing: h(x) = ((a·x + b) mod 2^64) >> 32 with odd a, 64-bit a and b — strongly universal for
# 32-bit x, and uint64 arithmetic wraps natively, so there is no slow modulo. Fixed seed: same text, same signature.
_rng = np.random.default_rng(20240601)
_A = _rng.integers(1, 1 << 63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, 1 << 63, NUM_PERM, dtype=np.uint64)
# One 64-bit key per band: a random odd-weighted sum of its r values mod 2^64, weights differing per position so
# equal values in different bands give different keys and all bands share one index.
_MIX = np.random.default_rng(1).integers(1, 1 << 63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_SHIFT = np.uint64(32)
# A 3-shingle's hash: (w0·g0 + w1·g1 + w2·g2 mod 2^64) >> 32 over its words' crc32s, g random odd: word order counts.
_GRAM = np.random.default_rng(2).integers(1, 1 << 63, 3, dtype=np.uint64) | np.uint64(1)
_WORD = re.compile(r"\w+")
_NO_ROWS = np.empty(0, dtype=np.int64)


# ----------------------------------------------------------------------------- shingles and signatures
def shingle_hashes(text: str) -> set[int]:
    """The text's shingle set, as the 32-bit hashes its signature is the minimum of."""
    flat, _ = _shingles([text])
    return set(flat.tolist())


def _shingles(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every word 3-shingle of every text, shingles per text); a text under three words is one shingle.

    Words are hashed once (crc32, in Python) and each run of three combined in numpy — 3× fewer Python-level
    hashes than hashing each 3-gram's string. Three zeros after each text pad a short text's one shingle.
    """
    if not texts:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    # map() rather than a comprehension: 12 µs instead of 19 per prompt of the synthetic logs.
    words = [[*map(zlib.crc32, map(str.encode, _WORD.findall(t.lower()))), 0, 0, 0] for t in texts]
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words)) - 3
    w = np.fromiter(chain.from_iterable(words), dtype=np.uint64, count=int(lens.sum()) + 3 * len(words))
    combined = w[:-2] * _GRAM[0] + w[1:-1] * _GRAM[1] + w[2:] * _GRAM[2]
    counts = np.maximum(lens - 2, 1)
    text_at = np.concatenate([[0], np.cumsum(lens + 3)[:-1]]).astype(np.int64)  # each text's first word in w
    shingle_at = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.repeat(text_at - shingle_at, counts) + np.arange(int(counts.sum()))
    return combined[idx] >> _SHIFT, counts


def signature(text: str) -> np.ndarray:
    """NUM_PERM MinHash values of the text's word 3-shingles."""
    return signatures([text])[0]


def signatures(texts: list[str], chunk: int = 1 << 13) -> np.ndarray:
    """MinHash signatures (uint32, one row per text): all shingles hashed in one array, min-reduced per text."""
    flat, counts = _shingles(texts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = np.empty((len(texts), NUM_PERM), dtype=np.uint32)
    lo = 0
    # Chunks of ~8k shingles (8k × 128 × 8 B = 8 MB): big temporaries cost more in fresh-page faults than they
    # save in loop overhead (measured: 1M shingles in 0.26 s with 4k chunks, ~7 s as 128 MB arrays).
    while lo < len(texts):
        hi = max(int(np.searchsorted(starts, starts[lo] + chunk, side="right")), lo + 1)
        a, b = starts[lo], starts[hi - 1] + counts[hi - 1]
        perm = np.multiply.outer(flat[a:b], _A)
        perm += _B
        # min then shift: x ↦ x >> 32 keeps order, so one (texts × 128) shift replaces one per shingle.
        out[lo:hi] = np.minimum.reduceat(perm, starts[lo:hi] - a, axis=0) >> _SHIFT
        lo = hi
    return out


def agreement(sigs: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """Positions where each row of `sigs` equals `sig`: NUM_PERM × the estimated Jaccard similarity."""
    return (sigs == sig).sum(axis=-1)


# ----------------------------------------------------------------------------- banding
@dataclass(frozen=True)
class Lsh:
    """The band split and verification cut for one Jaccard threshold."""

    threshold: float
    bands: int
    rows: int
    min_agree: int
    """Signature positions that must agree for a candidate to count (of NUM_PERM)."""

    @staticmethod
    def for_threshold(threshold: float) -> Lsh:
        """The longest bands that still make a pair at the threshold a candidate with P ≥ CANDIDATE_RECALL.

        Threshold 0.9 → 16 bands × 8 rows: P = 1 - (1 - 0.9^8)^16 = 1 - 0.5695^16 = 0.9999; pairs at 0.7 are
        candidates with P = 1 - (1 - 0.7^8)^16 = 0.61 and at 0.5 with 0.06, and verification (cut 109/128 = 0.85)
        passes 0.4 % of those at 0.75. Longer bands cost recall: 10 × 12 gives 1 - (1 - 0.9^12)^10 = 0.964.
        Threshold 0.7 (the eval split) → 32 × 4: P = 1 - (1 - 0.7^4)^32 = 0.9998, cut 80/128 = 0.625.
        """
        if not 0 < threshold <= 1:
            raise SlmtuneError(f"near-duplicate threshold must be in (0, 1], got {threshold}.")
        fits = [r for r in range(1, NUM_PERM + 1)
                if 1 - (1 - threshold ** r) ** (NUM_PERM // r) >= CANDIDATE_RECALL]
        rows = max(fits, default=1)
        return Lsh(threshold, NUM_PERM // rows, rows, _min_agree(threshold))

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """One uint64 key per band, (texts × bands); the last NUM_PERM mod rows positions are only verified."""
        used = self.bands * self.rows
        mixed = sigs[:, :used].astype(np.uint64) * _MIX[:used]
        return mixed.reshape(len(sigs), self.bands, self.rows).sum(axis=2, dtype=np.uint64)


def _min_agree(threshold: float) -> int:
    """Largest k with P(Binomial(NUM_PERM, threshold) ≥ k) ≥ VERIFY_RECALL."""
    tail, k = 0.0, NUM_PERM
    while k > 0:
        tail += comb(NUM_PERM, k) * threshold ** k * (1 - threshold) ** (NUM_PERM - k)
        if tail >= VERIFY_RECALL:
            return k
        k -= 1
    return 0


def near_pairs(sigs: np.ndarray, lsh: Lsh, chunk: int = 8192) -> np.ndarray:
    """Verified near-duplicate pairs (i, j), i > j, among the rows of `sigs`, all at once (the eval split)."""
    n = len(sigs)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    keys = lsh.band_keys(sigs)
    codes = np.sort(np.concatenate([_bucket_pairs(keys[:, b]) for b in range(lsh.bands)]))
    # Verify each pair once. Sort + compare, not np.unique: numpy 2's hash-based unique took 11 s on 8.9M codes
    # (100k prompts) where this takes 0.4 s.
    codes = codes[np.r_[True, codes[1:] != codes[:-1]]]
    i, j = np.divmod(codes, n)
    # Chunks of 8k pairs: 2 × 8k × 128 × 4 B = 8 MB of gathered signatures at a time.
    ok = np.concatenate([agreement(sigs[i[s:s + chunk]], sigs[j[s:s + chunk]]) >= lsh.min_agree
                         for s in range(0, len(codes), chunk)] or [np.empty(0, dtype=bool)])
    return np.stack([i[ok], j[ok]], axis=1)


def _bucket_pairs(keys: np.ndarray) -> np.ndarray:
    """Pair codes i·n + j of each row i with the first row and the WINDOW rows before it that share its key."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")  # stable: rows of one bucket stay in row order
    k = keys[order]
    pos = np.arange(n)
    first = np.maximum.accumulate(np.where(np.r_[True, k[1:] != k[:-1]], pos, 0))  # bucket start per position
    out = []
    for d in range(1, WINDOW + 1):
        at = pos[pos - d >= first]
        if not len(at):
            break
        out.append(order[at] * n + order[at - d])
    at = pos[pos - WINDOW > first]
    out.append(order[at] * n + order[first[at]])
    return np.concatenate(out)


class NearIndex:
    """Signatures and band keys of the texts added so far; `matches` finds the verified near duplicates of one
    (the streaming twin of `near_pairs`, for curate, where only kept records join).

    Band keys go to a dict (key → first row; `more` holds later rows) and, once it holds 64k keys or 1/8 of
    the sorted ones, into one sorted array (key + row, 12 B per key) searched with numpy: a dict costs ~100 B
    per key, and merging at 1/8 keeps the O(n) inserts to ~9 copies per key. A text adds 256 B of signature
    (uint16: the low 16 bits of each value; two different values agree by chance with P = 2^-16, which moves an
    estimate by < 0.0001) + bands × 12 B: 448 B at threshold 0.9 (16 bands), + up to ~200 B in the dict.
    """

    def __init__(self, lsh: Lsh, merge_at: int = 1 << 16):
        self.lsh, self.merge_at = lsh, merge_at
        self.sigs = np.empty((1024, NUM_PERM), dtype=np.uint16)
        self.n = 0
        self.keys = np.empty(0, dtype=np.uint64)
        self.rows = np.empty(0, dtype=np.int32)
        self.recent: dict[int, int] = {}
        self.more: dict[int, list[int]] = {}

    def matches(self, sig: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, agreeing positions) of the earlier texts that pass verification, in row order."""
        rows = self._candidates(keys)
        if not len(rows):
            return rows, rows
        agree = agreement(self.sigs[rows], sig.astype(np.uint16, copy=False))
        ok = agree >= self.lsh.min_agree
        return rows[ok], agree[ok]

    def add(self, sig: np.ndarray, keys: np.ndarray) -> int:
        """Remember a text; returns its row."""
        n = self.n
        if n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs)])
        self.sigs[n] = sig.astype(np.uint16, copy=False)
        for k in keys.tolist():
            if self.recent.setdefault(k, n) != n:
                self.more.setdefault(k, []).append(n)
        if len(self.recent) >= max(self.merge_at, len(self.keys) >> 3):
            self._merge()
        self.n += 1
        return n

    def _candidates(self, keys: np.ndarray) -> np.ndarray:
        """Per band, the bucket's first row and its WINDOW latest rows (`_bucket_pairs`' rule)."""
        ks = keys.tolist()
        hits = self.recent.keys() & ks
        lo, hi = self.keys.searchsorted(keys).tolist(), self.keys.searchsorted(keys, "right").tolist()
        if not hits and lo == hi:  # the usual case: no earlier text shares a band (a few µs)
            return _NO_ROWS
        spans = {k: (a, b) for k, a, b in zip(ks, lo, hi, strict=True) if b > a}
        found: list[int] = []
        for k in hits | spans.keys():
            late = [self.recent[k], *self.more.get(k, ())] if k in hits else []
            if k in spans:
                a, b = spans[k]
                tail = max(a + 1, b - WINDOW + len(late))
                found += self.rows[a:b].tolist() if tail == a + 1 else [int(self.rows[a])] + self.rows[tail:b].tolist()
                found += late[-WINDOW:]
            else:
                found += late[:1] + late[1:][-WINDOW:]
        return np.array(sorted(set(found)), dtype=np.int64)

    def _merge(self) -> None:
        """Insert the recent keys into the sorted array: one O(n) copy instead of a re-sort."""
        keys = np.fromiter(self.recent.keys(), dtype=np.uint64, count=len(self.recent))
        rows = np.fromiter(self.recent.values(), dtype=np.int32, count=len(self.recent))
        extra = [(k, r) for k, rs in self.more.items() for r in rs]
        keys = np.concatenate([keys, np.array([k for k, _ in extra], dtype=np.uint64)])
        rows = np.concatenate([rows, np.array([r for _, r in extra], dtype=np.int32)])
        order = np.argsort(keys, kind="stable")  # a key's first row, then its later ones in order: row order
        at = np.searchsorted(self.keys, keys[order], side="right")
        self.keys, self.rows = np.insert(self.keys, at, keys[order]), np.insert(self.rows, at, rows[order])
        self.recent, self.more = {}, {}


# ----------------------------------------------------------------------------- curate's two halves
class Keyer:
    """Computes (exact key, near keys) for records; near keys are (prompt signature, its band keys, answer
    signature), None when near-dedupe is off (threshold 0)."""

    def __init__(self, threshold: float):
        self.lsh = Lsh.for_threshold(threshold) if threshold > 0 else None

    def keys(self, recs: list[dict]) -> list[tuple[bytes, tuple[bytes, bytes] | None]]:
        """Keys per record; MinHash runs once over the whole batch to amortise numpy. Signature (as uint16, what
        `NearIndex` keeps) and band keys travel as bytes: a worker pickles 384 B, not two numpy objects."""
        exact = [_exact_key(r) for r in recs]
        if self.lsh is None or not recs:
            return [(e, None) for e in exact]
        sigs = signatures([prompt_text(r) for r in recs])
        answers = signatures([answer_text(r) for r in recs])
        near = zip(map(bytes, sigs.astype(np.uint16)), map(bytes, self.lsh.band_keys(sigs)),
                   map(bytes, answers.astype(np.uint16)), strict=True)
        return list(zip(exact, near, strict=True))


def _exact_key(rec: dict) -> bytes:
    """8-byte digest of every message (role, content, tool calls; case and whitespace folded) and the tools."""
    parts = []
    for m in rec["messages"]:
        parts += [m["role"], m.get("content") or "", m.get("tool_call_id") or ""]
        parts += [c["function"]["name"] + c["function"]["arguments"] for c in m.get("tool_calls") or []]
    text = " ".join("\x1f".join(parts).lower().split()) + "\x1e" + dumps(rec.get("tools"))
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


class Seen:
    """The records kept so far: an 8-byte digest + id each, their prompt signatures and band keys (`NearIndex`)
    and their answer signatures.

    A near duplicate repeats a kept record's prompt *and* its answer (both Jaccard ≥ the threshold): it teaches
    nothing new. A near-identical prompt with a different answer is kept — in an agent's multi-step traffic each
    step's prompt holds the one before it plus a tool result, and the answer (the next call) is what differs."""

    def __init__(self, threshold: float):
        self.exact: dict[bytes, str] = {}
        self.near = NearIndex(Lsh.for_threshold(threshold)) if threshold > 0 else None
        self.near_ids: list[str] = []
        self.answers: list[np.ndarray] = []
        self.exact_removed = self.near_removed = 0

    def check(self, exact: bytes, near: tuple[bytes, bytes, bytes] | None,
              rec_id: object) -> tuple[str, str, str] | None:
        """(reason, detail, duplicate_of) when a kept record already has these keys; else remember them."""
        if exact in self.exact:
            self.exact_removed += 1
            return "duplicate", "same normalized messages and tools", self.exact[exact]
        if near is not None and self.near is not None:
            sig, bands = np.frombuffer(near[0], dtype=np.uint16), np.frombuffer(near[1], dtype=np.uint64)
            answer = np.frombuffer(near[2], dtype=np.uint16)
            rows, agree = self.near.matches(sig, bands)
            if len(rows):
                same = agreement(np.stack([self.answers[r] for r in rows]), answer) >= self.near.lsh.min_agree
                rows, agree = rows[same], agree[same]
            if len(rows):
                self.near_removed += 1
                best = int(np.argmax(agree))  # the most similar prompt; ties go to the earliest
                return "near_duplicate", (f"prompt and answer Jaccard >= {self.near.lsh.threshold} with an earlier "
                                          f"record ({self.near_ids[rows[best]]}, prompt MinHash estimate "
                                          f"{agree[best] / NUM_PERM:.2f})"), ""
            self.near.add(sig, bands)
            self.near_ids.append(str(rec_id))
            self.answers.append(answer)
        self.exact[exact] = str(rec_id)
        return None


def answer_text(rec: dict) -> str:
    """The target: its content and tool calls (name + arguments)."""
    target = rec["messages"][target_index(rec["messages"])]
    calls = [c["function"]["name"] + " " + c["function"]["arguments"] for c in target.get("tool_calls") or []]
    return "\n".join([target.get("content") or "", *calls])


def prompt_text(rec: dict) -> str:
    """Every non-system message before the target: content and tool calls (name + arguments)."""
    msgs = rec["messages"]
    parts = []
    for m in msgs[: target_index(msgs)]:
        if m.get("role") != "system":
            parts.append(m.get("content") or "")
            parts += [c["function"]["name"] + " " + c["function"]["arguments"] for c in m.get("tool_calls") or []]
    return "\n".join(parts)
