"""Near-duplicate detection: pairs planted at a known shingle Jaccard are caught at and above the threshold, and
distinct records survive — in `Seen` (curate's index), through `curate` on real files, and in the eval split."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from math import comb

import numpy as np
import pytest

from slmtune.data.curate import CurateConfig, curate
from slmtune.data.dedupe import NUM_PERM, Keyer, Lsh, NearIndex, Seen, shingle_hashes, signatures
from slmtune.errors import SlmtuneError
from slmtune.io import read_jsonl, write_jsonl
from slmtune.tasks.split import SPLIT_JACCARD, near_duplicate_components

# Jaccard → (words, edits). Each edit replaces one word, at least 3 apart, so it swaps 3 of the n - 2 shingles
# for 3 new ones: J = (n - 2 - 3k) / (n - 2 + 3k), e.g. 116 words, 2 edits: (114 - 6) / (114 + 6) = 0.9.
LEVELS = {0.95: (119, 1), 0.9: (116, 2), 0.85: (113, 3), 0.75: (107, 5), 0.7: (121, 7), 0.5: (119, 13)}
PAIRS = 400


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=8))  # letters only: nothing for the scrubber to take


def _pair(rng: random.Random, n: int, edits: int) -> tuple[str, str]:
    a = [_word(rng) for _ in range(n)]
    b = list(a)
    for at in rng.sample(range(2, n - 2, 3), edits):
        b[at] = _word(rng)
    return " ".join(a), " ".join(b)


def _jaccard(a: str, b: str) -> float:
    sa, sb = shingle_hashes(a), shingle_hashes(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def planted() -> dict[float, list[tuple[str, str]]]:
    """PAIRS pairs per level, their Jaccard checked exactly with the shingling the signatures use."""
    rng = random.Random(12)
    pairs = {level: [_pair(rng, n, k) for _ in range(PAIRS)] for level, (n, k) in LEVELS.items()}
    for level, ps in pairs.items():
        assert all(abs(_jaccard(a, b) - level) < 1e-9 for a, b in ps[:50]), level
    return pairs


def _record(rid: str, text: str, answer: str | None = None) -> dict:
    return {"id": rid, "messages": [{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": text},
                                    {"role": "assistant", "content": answer or f"answer {rid}"}]}


def _interleaved(planted) -> list[dict]:
    """Each pair's first record, then its second, both given the same answer: a pair's halves meet in input order."""
    return [_record(f"{level}-{i}-{half}", text, f"the answer to pair {level}-{i}") for level, ps in planted.items()
            for i, pair in enumerate(ps) for half, text in zip("ab", pair, strict=True)]


def _caught_by_level(rejected_ids: set[str]) -> dict[float, float]:
    return {level: sum(f"{level}-{i}-b" in rejected_ids for i in range(PAIRS)) / PAIRS for level in LEVELS}


def test_seen_catches_pairs_at_and_above_the_threshold_and_keeps_distinct_ones(planted):
    recs = _interleaved(planted)
    keyer, seen = Keyer(0.9), Seen(0.9)
    found = {r["id"]: seen.check(*keys, r["id"]) for r, keys in zip(recs, keyer.keys(recs), strict=True)}
    assert not any(found[r["id"]] for r in recs if r["id"].endswith("-a"))  # first halves are all new
    caught = _caught_by_level({rid for rid, dup in found.items() if dup})
    # A pair right at the threshold passes the 109/128 cut with P = 0.97 (binomial tail), above it ~1.
    assert caught[0.9] >= 0.95 and caught[0.95] >= 0.99, caught
    assert caught[0.5] == caught[0.7] == 0, caught  # distinct records all survive
    assert caught[0.75] <= 0.02 and caught[0.85] < caught[0.9], caught
    assert seen.near_removed == sum(round(c * PAIRS) for c in caught.values())
    reason, detail, _ = found["0.95-0-b"]
    assert reason == "near_duplicate" and detail.startswith(
        "prompt and answer Jaccard >= 0.9 with an earlier record (0.95-0-a, ")


def test_a_near_identical_prompt_answered_differently_is_kept(planted):
    """An agent's next step: the prompt is the previous one plus a tool result, the answer is a different call.
    Same prompts, same answers: dropped; same prompts, other answers: kept."""
    pairs = planted[0.95][:100]
    keyer, seen = Keyer(0.9), Seen(0.9)
    for i, (a, b) in enumerate(pairs):
        recs = [_record(f"{i}-a", a, f"cd folder {i}"), _record(f"{i}-b", b, f"ls {i} hidden"),
                _record(f"{i}-c", b + " x", f"cd folder {i}")]
        verdicts = [seen.check(*keys, r["id"]) for r, keys in zip(recs, keyer.keys(recs), strict=True)]
        assert verdicts[0] is None and verdicts[1] is None, verdicts  # another answer: a step of its own
        assert verdicts[2] is not None and verdicts[2][0] == "near_duplicate", verdicts
    assert seen.near_removed == len(pairs)


def test_curate_drops_planted_near_duplicates_and_keeps_distinct_records(planted, tmp_path):
    src = tmp_path / "records.jsonl"
    write_jsonl(src, _interleaved(planted))
    rep = curate(src, tmp_path / "out.jsonl", tmp_path / "report.json", CurateConfig(near_dup=0.9))
    rejected = read_jsonl(tmp_path / "out.rejected.jsonl")
    assert {r["reason"] for r in rejected} == {"near_duplicate"}
    caught = _caught_by_level({r["id"] for r in rejected})
    assert caught[0.9] >= 0.95 and caught[0.95] >= 0.99 and caught[0.5] == caught[0.7] == 0, caught
    kept = {r["id"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert all(f"{level}-{i}-{half}" in kept for level in (0.5, 0.7) for i in range(PAIRS) for half in "ab")
    assert rep.report["duplicates_removed"] == {"exact": 0, "near": len(rejected)}
    assert json.loads((tmp_path / "report.json").read_text())["kept"] == len(kept) == 2 * len(LEVELS) * PAIRS - len(
        rejected)


def test_near_dup_zero_turns_near_dedupe_off(planted, tmp_path):
    src = tmp_path / "records.jsonl"
    write_jsonl(src, [_record(f"{i}-{h}", t, "same") for i, p in enumerate(planted[0.95][:20])
                      for h, t in zip("ab", p, strict=True)])
    rep = curate(src, tmp_path / "out.jsonl", config=CurateConfig(near_dup=0))
    assert rep.kept == 40 and rep.report["duplicates_removed"] == {"exact": 0, "near": 0}


def test_band_split_and_cut_give_the_promised_recall_at_every_threshold():
    for t in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99):
        lsh = Lsh.for_threshold(t)
        p_candidate = 1 - (1 - t ** lsh.rows) ** lsh.bands
        p_verified = sum(comb(NUM_PERM, k) * t ** k * (1 - t) ** (NUM_PERM - k) for k in range(lsh.min_agree, 129))
        assert lsh.bands * lsh.rows <= NUM_PERM and p_candidate * p_verified >= 0.95, (t, lsh)
        assert lsh.min_agree / NUM_PERM < t  # the cut sits below the threshold, by the estimate's noise
    assert Lsh.for_threshold(0.9) == Lsh(0.9, 16, 8, 109)
    assert Lsh.for_threshold(0.7) == Lsh(0.7, 32, 4, 80)
    with pytest.raises(SlmtuneError, match="got 1.5"):
        Lsh.for_threshold(1.5)


def test_index_lookups_match_after_its_keys_move_to_the_sorted_array(planted):
    """merge_at=64 sends every key but the latest few to the numpy half: answers must not change."""
    texts = [t for level in (0.95, 0.9, 0.5) for pair in planted[level][:100] for t in pair]
    lsh = Lsh.for_threshold(0.9)
    sigs = signatures(texts)
    keys = lsh.band_keys(sigs)
    answers = []
    for merge_at in (1 << 20, 64):
        index, found = NearIndex(lsh, merge_at=merge_at), []
        for sig, k in zip(sigs, keys, strict=True):
            found.append(index.matches(sig, k)[0].tolist())
            index.add(sig, k)
        answers.append(found)
    assert len(index.keys) > 0 and answers[0] == answers[1]
    assert sum(map(bool, answers[0])) >= 0.95 * 200  # the b halves of the 0.95 and 0.9 pairs


def test_eval_split_links_pairs_above_its_threshold_and_not_distinct_ones(planted):
    assert SPLIT_JACCARD == 0.7
    for level, most in ((0.75, None), (0.5, 0.02)):
        texts = [t for pair in planted[level] for t in pair]
        comps = near_duplicate_components(texts)
        linked = np.mean([comps[2 * i] == comps[2 * i + 1] for i in range(PAIRS)])
        assert (linked >= 0.99) if most is None else (linked <= most), (level, linked)
        assert len(set(comps[0::2].tolist())) == PAIRS  # no two pairs merged


def test_signatures_do_not_depend_on_the_process_hash_seed():
    code = ("from slmtune.data.dedupe import signatures; import hashlib; "
            "print(hashlib.sha256(signatures(['a b c d e f g', 'the same old story', '']).tobytes()).hexdigest())")
    out = {subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONHASHSEED": seed},
                          capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(out) == 1
