"""What clustering sees of a record, and how records are grouped into tasks.

Records whose answers are of a different kind (tool call / JSON / label / code / text) or that offer tools of
different applications belong to different errands and are never grouped together (`block_key`). An
application is a *tool family*: tool sets sharing at least half of the smaller set's tools, joined transitively
(`join_tool_families`) — an agent offers its file-system tools alone in one step and beside its messaging tools
in the next, and both steps are one errand's. Inside a block a record is three texts (`View`): its
system-prompt template, the rest of its prompt (user turns, tool results), and *structure tokens* (the JSON keys
of the answer, the shape of the last turn: answering the user directly or after tool results, with or without
earlier turns). The functions called are not structure: like a label's value they are the answer's content,
and one errand calls many. Each text is TF-IDF vectorized (numbers masked), L2-normalized and weighted, so the
cosine similarity of two records is

    sim = 0.4·sim(system template) + 0.4·sim(prompt) + 0.2·sim(structure)

The system-prompt *template* is the system prompt less its boilerplate: sentences (keyed by their plain words,
so a pasted password does not make them unique) that recur across most output structures, like the policy
preamble every errand of an agent carries (`strip_boilerplate`).

Grouping a block: average-linkage clustering of a sample (at most 2,000 records: 2,000² float64 distances =
32 MB) cut at cosine distance 0.5 finds the number of groups; every record joins its nearest group centroid,
and records close to none (similarity < 0.5) are clustered again, up to 3 rounds. Groups whose centroids are
nearly the same (cosine ≥ 0.6) are merged (`merge_close`), and groups under --min-size dissolve into the
nearest big group of their block when close enough, else into `unassigned` (`absorb_small`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from slmtune.records import split_prompt_target
from slmtune.tasks.schema import output_kind, parse_json_output

WEIGHTS = {"system": 0.4, "prompt": 0.4, "struct": 0.2}
# Average cosine distance at which groups stop merging. On the synthetic fixture, records of one errand average
# sim ≈ 0.6-0.75 with each other (one template, similar prompts), two errands of one block ≤ 0.45.
CUT = 0.5
MERGE = 0.6
SAMPLE_CAP = 2000
ROUNDS = 3
_NUM = re.compile(r"\d+")
_SENT = re.compile(r"(?<=[.!?:])\s+|\n+")


@dataclass(frozen=True)
class View:
    system: str
    prompt: str
    struct: str
    kind: str
    tools: tuple[str, ...]
    called: tuple[str, ...]
    target_text: str
    family: str = ""  # the tool family's key: its own tool set, until `join_tool_families` widens it


def view(rec: dict) -> View:
    """The parts of a record that distinguish one agent errand from another (no ids, no metadata)."""
    prompt, target = split_prompt_target(rec)
    system = "\n".join(m.get("content") or "" for m in prompt if m.get("role") == "system")
    rest = "\n".join(m.get("content") or "" for m in prompt if m.get("role") != "system")
    tools = tuple(sorted({(t.get("function") or {}).get("name") or "" for t in rec.get("tools") or []}))
    called = tuple(sorted({(c.get("function") or {}).get("name") or "" for c in target.get("tool_calls") or []}))
    kind = output_kind(target)
    toks = _turn_shape(prompt)
    if kind == "json":
        value = parse_json_output(target.get("content"))
        keys = value.keys() if isinstance(value, dict) else []
        toks += [f"key_{k}" for k in keys]
    return View(system, rest, " ".join(toks), kind, tools, called, target.get("content") or "", "|".join(tools))


def _turn_shape(prompt: list[dict]) -> list[str]:
    """`turn_after_user` or `turn_after_tool` (what the answer follows in its turn), and `turn_history` when
    earlier turns precede it: a bounded set, where the whole role sequence would make each step of a long
    conversation a structure of its own."""
    roles = [m.get("role") for m in prompt if m.get("role") != "system"]
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=-1)
    toks = ["turn_after_tool" if roles and roles[-1] == "tool" else "turn_after_user"]
    return toks + (["turn_history"] if last_user > 0 else [])


def block_key(v: View) -> str:
    """Records of a different output kind or tool family never share a task."""
    return v.kind + ":" + v.family


def join_tool_families(views: list[View], overlap: float = 0.5) -> list[View]:
    """Each view's `family`: the sorted union of the tool sets joined with its own. Two tool sets join when they
    share at least `overlap` of the smaller one's tools; joins are transitive (union-find over the distinct sets,
    candidate pairs found through a tool-name index, so traffic where every call brings new functions stays
    near-linear)."""
    sets = sorted({v.tools for v in views if v.tools})
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holders: dict[str, list[int]] = {}
    for i, ts in enumerate(sets):
        shared: dict[int, int] = {}
        for t in ts:
            for j in holders.get(t, []):
                shared[j] = shared.get(j, 0) + 1
            holders.setdefault(t, []).append(i)
        for j, n in shared.items():
            if n >= overlap * min(len(ts), len(sets[j])):
                parent[find(i)] = find(j)
    union: dict[int, set[str]] = {}
    for i, ts in enumerate(sets):
        union.setdefault(find(i), set()).update(ts)
    key = {ts: "|".join(sorted(union[find(i)])) for i, ts in enumerate(sets)}
    return [replace(v, family=key.get(v.tools, "")) for v in views]


def strip_boilerplate(views: list[View]) -> list[View]:
    """Drop system-prompt sentences shared across output structures (policy preambles every errand carries).

    A sentence found under ≥ half of the distinct (output kind, tool family) signatures, when
    there are at least 3, says nothing about which errand a record is; what remains is the errand's template.
    """
    # Output kind + tool family; not the tools called (one agent errand calls many) nor the JSON keys, whose
    # optional fields would make one extraction errand look like many structures and its template boilerplate.
    sigs = [block_key(v) for v in views]
    n_sigs = len(set(sigs))
    if n_sigs < 3:
        return views
    spread: dict[str, set[str]] = {}
    split = [_sentences(v.system) for v in views]
    for sents, sig in zip(split, sigs, strict=True):
        for s in sents:
            spread.setdefault(s, set()).add(sig)
    shared = {s for s, where in spread.items() if len(where) >= max(3, n_sigs / 2)}
    return [replace(v, system=" ".join(s for s in sents if s not in shared))
            for v, sents in zip(views, split, strict=True)]


def _sentences(text: str) -> list[str]:
    """Sentences keyed by their plain words: a pasted password or id varies, the sentence around it does not."""
    return [k for k in map(_sentence_key, _SENT.split(text)) if k]


@functools.lru_cache(maxsize=1 << 16)
def _sentence_key(sentence: str) -> str:
    # Cached: agents repeat the same sentences in every call, so most lookups are hits.
    words = (w.strip(".,;:!?()'\"") for w in sentence.lower().split())
    return " ".join(w for w in words if w.isalpha())


def _mask(text: str) -> str:
    return _NUM.sub(" ", text.lower())


@dataclass
class Features:
    X: sp.csr_matrix  # weighted, L2-normalized [system | prompt | structure] rows
    text: sp.csr_matrix  # TF-IDF of system template + prompt words, for top terms
    terms: np.ndarray  # the column names of `text`


def vectorize(views: list[View], embed: Callable[[list[str]], np.ndarray] | None = None) -> Features:
    """TF-IDF each part, weight, join. `embed` (a sentence-embedding model) replaces the prompt's TF-IDF."""
    sys_v = TfidfVectorizer(preprocessor=_mask, sublinear_tf=True, min_df=2, max_features=1 << 15, dtype=np.float32)
    pr_v = TfidfVectorizer(preprocessor=_mask, sublinear_tf=True, min_df=2, max_features=1 << 16, dtype=np.float32)
    st_v = TfidfVectorizer(token_pattern=r"\S+", lowercase=False, dtype=np.float32)
    sys_m = _fit(sys_v, [v.system for v in views])
    pr_m = _fit(pr_v, [v.prompt for v in views])
    prompt_part = sp.csr_matrix(embed([v.prompt for v in views]).astype(np.float32)) if embed else pr_m
    blocks = [sys_m, prompt_part, _fit(st_v, [v.struct for v in views])]
    weighted = [normalize(b) * np.sqrt(w) for b, w in zip(blocks, WEIGHTS.values(), strict=True)]
    X = normalize(sp.hstack(weighted, format="csr"))
    text = normalize(sp.hstack([normalize(sys_m), normalize(pr_m)], format="csr"))
    terms = np.concatenate([_names(sys_v, sys_m), _names(pr_v, pr_m)])
    return Features(X, text, terms)


def _names(vec: TfidfVectorizer, m: sp.csr_matrix) -> np.ndarray:
    return vec.get_feature_names_out() if hasattr(vec, "vocabulary_") else np.array([""] * m.shape[1])


def _fit(vec: TfidfVectorizer, texts: list[str]) -> sp.csr_matrix:
    try:
        return vec.fit_transform(texts).tocsr()
    except ValueError:  # every text empty (no system prompts at all): an all-zero block
        return sp.csr_matrix((len(texts), 1), dtype=np.float32)


def group(X: sp.csr_matrix, blocks: list[str], on_block: Callable[[int], None] | None = None) -> np.ndarray:
    """Group label per row (-1 = fits no group); deterministic, numbered in row order."""
    labels = np.full(X.shape[0], -1, dtype=np.int64)
    next_id = 0
    by_block: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        by_block.setdefault(b, []).append(i)
    for key in sorted(by_block):
        rows = np.asarray(by_block[key])
        sub = _group_rows(X[rows])
        for g in np.unique(sub[sub >= 0]):
            labels[rows[sub == g]] = next_id
            next_id += 1
        if on_block:
            on_block(len(rows))
    return renumber(labels)


def _group_rows(X: sp.csr_matrix) -> np.ndarray:
    labels = np.full(X.shape[0], -1, dtype=np.int64)
    todo = np.arange(X.shape[0])
    next_id = 0
    for _ in range(ROUNDS):
        if len(todo) == 0:
            break
        sub, n = _one_round(X[todo])
        hit = sub >= 0
        labels[todo[hit]] = sub[hit] + next_id
        next_id += n
        todo = todo[~hit]
    return merge_close(X, labels)


def merge_close(X: sp.csr_matrix, labels: np.ndarray) -> np.ndarray:
    """Join groups whose centroids have cosine ≥ 0.6: the cut splits a small errand by company name, say
    (centroids ~0.75 apart), while distinct errands sharing a block stay ≤ ~0.45 (sentiment vs intent)."""
    labels = labels.copy()
    while True:
        groups = np.unique(labels[labels >= 0])
        if len(groups) < 2:
            return labels
        C = centroids(X, labels, groups)
        sims = np.triu((C @ C.T).toarray(), k=1)
        a, b = np.unravel_index(int(sims.argmax()), sims.shape)
        if sims[a, b] < MERGE:
            return labels
        labels[labels == groups[b]] = groups[a]


def _one_round(X: sp.csr_matrix) -> tuple[np.ndarray, int]:
    """Cluster a sample by average linkage, then give every row the nearest centroid if close enough."""
    n = X.shape[0]
    idx = np.arange(n) if n <= SAMPLE_CAP else np.linspace(0, n - 1, SAMPLE_CAP).astype(np.int64)
    S = X[idx]
    if len(idx) == 1:
        sample_labels = np.array([0])
    else:
        dist = np.clip(1.0 - (S @ S.T).toarray(), 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        Z = linkage(squareform(dist, checks=False), method="average")
        sample_labels = fcluster(Z, t=CUT, criterion="distance") - 1
    k = int(sample_labels.max()) + 1
    member = sp.csr_matrix((np.ones(len(idx)), (sample_labels, np.arange(len(idx)))), shape=(k, len(idx)))
    centroids = normalize(member @ S)
    sims = (X @ centroids.T).toarray()
    best = sims.argmax(axis=1)
    ok = sims[np.arange(n), best] >= 1.0 - CUT
    return np.where(ok, best, -1), k


def absorb_small(X: sp.csr_matrix, labels: np.ndarray, blocks: list[str], min_size: int) -> np.ndarray:
    """Groups under `min_size` dissolve: each record joins the nearest big group of its block when its similarity
    to that centroid is ≥ 1 - cut (a pasted note in a system prompt should not exile a record), else -1."""
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    big = [g for g in range(len(sizes)) if sizes[g] >= min_size]
    out = np.where(np.isin(labels, big), labels, -1)
    small = np.where((labels >= 0) & (out < 0))[0]
    if len(big) == 0 or len(small) == 0:
        return renumber(out)
    C = centroids(X, labels, np.asarray(big))
    block_of = {g: blocks[int(np.argmax(labels == g))] for g in big}
    sims = (X[small] @ C.T).toarray()
    for row, i in enumerate(small):
        same = [j for j, g in enumerate(big) if block_of[g] == blocks[i]]
        if same:
            j = max(same, key=lambda j: (sims[row, j], -j))
            if sims[row, j] >= 1.0 - CUT:
                out[i] = big[j]
    return renumber(out)


def centroids(X: sp.csr_matrix, labels: np.ndarray, groups: np.ndarray) -> sp.csr_matrix:
    """L2-normalized mean row of each group in `groups` (sorted group ids)."""
    rows = np.where(np.isin(labels, groups))[0]
    member = sp.csr_matrix((np.ones(len(rows)), (np.searchsorted(groups, labels[rows]), rows)),
                           shape=(len(groups), X.shape[0]))
    return normalize(member @ X)


def renumber(labels: np.ndarray) -> np.ndarray:
    """Number groups 0, 1, ... by first appearance, so the labelling depends only on row order."""
    out = np.full_like(labels, -1)
    seen: dict[int, int] = {}
    for i, g in enumerate(labels):
        if g >= 0:
            out[i] = seen.setdefault(int(g), len(seen))
    return out
