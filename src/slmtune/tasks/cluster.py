"""`slmtune cluster`: find the agent's recurring tasks in curated records and write one task dir per task.

Task-dir format (what `plan`, eval and the flywheel read)::

    TASKS_DIR/
      index.json            # the task table, for routing a new request to a task
      tasks.png             # 2-D map of the records coloured by task
      <task>/train.jsonl    # canonical records, sorted by id
      <task>/eval.jsonl     # held out; near-duplicates of a train record never land here
      <task>/task.json
      unassigned/records.jsonl   # records of groups smaller than --min-size (the LLM keeps those)

`task.json` keys: `name` (slug, also the folder name), `category` (tool_calling | extraction | classification |
summarization | coding | generation), `schema` (output schema, see `slmtune.tasks.schema`; null for free text),
`schema_hash`, `n_train`, `n_eval`, `output_kind` (majority kind of the answers), `kinds` ({kind: count}),
`tools` (names of the tools offered), `tools_called` ({name: count}), `system_fingerprints` ([[sha256-16 of the
errand's system-prompt template, count]], most common first, at most 5), `top_terms` (10 words that set the
task's prompts apart), `example_prompts` (3 last-user-message excerpts), `tokens` ({p50, p95, max} of whole
records in estimated tokens, chars / 3.5), `files` ({train, eval}).

`index.json` keys: `version` (1), `source` (input file name), `source_sha256`, `n_records`, `n_assigned`,
`n_unassigned`, `params` ({min_size, eval_fraction, embedder}), `tasks` (one entry per task, in index order:
`name`, `dir`, `category`, `output_kind`, `tools`, `tools_called`, `system_fingerprints`, `top_terms`,
`schema_hash`, `n_train`, `n_eval`), `unassigned` ({dir, n}).

Same input file → byte-identical output: records are put in id order first, and every step after is
deterministic.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from slmtune.errors import SlmtuneError
from slmtune.io import dumps, file_fingerprint, write_json, write_jsonl
from slmtune.records import iter_records, split_prompt_target
from slmtune.tasks import features as cf
from slmtune.tasks.schema import categorize, code_language, is_label, parse_json_output, schema_hash, task_schema
from slmtune.tasks.split import eval_mask, near_duplicate_components
from slmtune.tasks.taskmap import write_task_map
from slmtune.ui import Progress, ticker

CHARS_PER_TOKEN = 3.5  # English prose and JSON average 3.5-4 chars per BPE token; 3.5 errs long
MSG_OVERHEAD_TOKENS = 4  # role markers and separators the chat template adds per message


@dataclass(frozen=True)
class ClusterResult:
    tasks: list[dict]  # the task.json of each task
    n_records: int
    n_unassigned: int
    index_path: Path
    map_path: Path


def cluster(input_path: str | Path, out_dir: str | Path, min_size: int = 20, eval_fraction: float = 0.2,
            embedder: str = "tfidf", progress: Progress | None = None) -> ClusterResult:
    """Group curated records into tasks and write the task dirs (format in the module docstring)."""
    _check_args(min_size, eval_fraction, embedder)
    input_path, out_dir = Path(input_path), Path(out_dir)
    tick = ticker(progress)
    ids, recs = load_records(input_path, tick)
    views, feats, labels = group_records(recs, min_size, embedder, tick)
    tick("near-duplicates", 0, 1)
    comps = near_duplicate_components([v.prompt for v in views])
    groups = [np.where(labels == g)[0] for g in range(int(labels.max()) + 1)]
    infos = [describe(rows, recs, views, feats) for rows in groups]
    tasks = []
    for info, name, rows in zip(infos, unique_names([i["name"] for i in infos]), groups, strict=True):
        tick("writing", len(tasks), len(groups))
        tasks.append(write_task(out_dir, info | {"name": name}, rows, ids, recs, comps, eval_fraction))
    unassigned = np.where(labels < 0)[0]
    _clear_stale(out_dir, {t["name"] for t in tasks})
    write_jsonl(out_dir / "unassigned" / "records.jsonl", (recs[i] for i in unassigned))
    index = _index(input_path, len(recs), len(unassigned), tasks, min_size, eval_fraction, embedder)
    write_json(out_dir / "index.json", index)
    write_task_map(out_dir / "tasks.png", feats.X, labels, [t["name"] for t in tasks])
    return ClusterResult(tasks, len(recs), len(unassigned), out_dir / "index.json", out_dir / "tasks.png")


def group_records(recs: list[dict], min_size: int, embedder: str, tick: Progress
                  ) -> tuple[list[cf.View], cf.Features, np.ndarray]:
    """Views, features and a task label per record (-1 = unassigned)."""
    views = cf.strip_boilerplate(cf.join_tool_families([cf.view(r) for r in recs]))
    tick("vectorizing", 0, 1)
    feats = cf.vectorize(views, _embedder(embedder))
    done = [0]

    def on_block(n: int) -> None:
        done[0] += n
        tick("grouping", done[0], len(recs))

    blocks = [cf.block_key(v) for v in views]
    labels = cf.absorb_small(feats.X, cf.group(feats.X, blocks, on_block), blocks, min_size)
    return views, feats, labels


def _check_args(min_size: int, eval_fraction: float, embedder: str) -> None:
    if min_size < 1:
        raise SlmtuneError(f"--min-size must be ≥ 1, got {min_size}.")
    if not 0 <= eval_fraction < 1:
        raise SlmtuneError(f"--eval-fraction must be in [0, 1), got {eval_fraction}.")
    if embedder not in ("tfidf", "minilm"):
        raise SlmtuneError(f"--embedder must be tfidf or minilm, got {embedder!r}.")


# ----------------------------------------------------------------------------- input
def load_records(path: Path, tick: Progress) -> tuple[list[str], list[dict]]:
    """Valid canonical records in id order (ties by content), so input order never changes the output."""
    rows: list[tuple[str, dict]] = []
    for lineno, rec in iter_records(path):
        rid = rec.get("id")
        rows.append((rid if isinstance(rid, str) else _content_id(rec), rec))
        if lineno % 5000 == 0:
            tick("reading", lineno, 0)
    if not rows:
        raise SlmtuneError(f"{path}: no records.", "Cluster needs curated records (JSONL).")
    counts = Counter(r[0] for r in rows)
    # Serializing every record would cost seconds per 100k; only records sharing an id need the tie-break.
    rows.sort(key=lambda r: (r[0], dumps(r[1]) if counts[r[0]] > 1 else ""))
    return [r[0] for r in rows], [r[1] for r in rows]


def _content_id(rec: dict) -> str:
    return "c_" + hashlib.sha256(dumps(rec).encode("utf-8")).hexdigest()[:24]


def _embedder(name: str) -> Callable[[list[str]], np.ndarray] | None:
    if name == "tfidf":
        return None
    try:
        from sentence_transformers import SentenceTransformer  # optional; only with --embedder minilm
    except ImportError:
        raise SlmtuneError("--embedder minilm needs sentence-transformers: `pip install sentence-transformers`.",
                           "Or use the default --embedder tfidf.") from None
    try:
        model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure means "not available locally"
        raise SlmtuneError(f"--embedder minilm: all-MiniLM-L6-v2 is not available locally ({type(e).__name__}).",
                           "Download it once into the Hugging Face cache, or use --embedder tfidf.") from None
    return lambda texts: model.encode(texts, batch_size=64, normalize_embeddings=True)


# ----------------------------------------------------------------------------- describing a task
def describe(rows: np.ndarray, recs: list[dict], views: list[cf.View], feats: cf.Features) -> dict:
    """Category, schema, name and routing facts of the records `rows` (everything but the split)."""
    vs = [views[i] for i in rows]
    task_recs = [recs[i] for i in rows]
    kinds = Counter(v.kind for v in vs)
    labels = Counter(v.target_text.strip() for v in vs if v.kind == "label" and is_label(v.target_text))
    category = categorize(kinds, labels, [v.prompt for v in vs], [v.target_text for v in vs], [v.system for v in vs])
    schema = task_schema(category, task_recs)
    called = Counter(c for v in vs for c in v.called)
    terms = top_terms(rows, feats)
    return {
        "name": task_name(category, vs, called, schema, terms),
        "category": category,
        "schema": schema,
        "schema_hash": schema_hash(schema),
        "output_kind": min(kinds, key=lambda k: (-kinds[k], k)),
        "kinds": dict(sorted(kinds.items())),
        "tools": sorted({t for v in vs for t in v.tools}),
        "tools_called": dict(sorted(called.items())),
        "system_fingerprints": _fingerprints(vs),
        "top_terms": terms,
        "example_prompts": [_last_user(r)[:300] for r in task_recs[:3]],
        "tokens": token_stats(task_recs),
    }


def top_terms(rows: np.ndarray, feats: cf.Features, k: int = 10) -> list[str]:
    """Words weighted most in this task's prompts relative to all prompts (mean TF-IDF difference)."""
    inside = np.asarray(feats.text[rows].mean(axis=0)).ravel()
    overall = np.asarray(feats.text.mean(axis=0)).ravel()
    score = inside - overall
    order = np.lexsort((feats.terms, -score))  # ties broken by the term itself
    out: list[str] = []
    for i in order:
        term = str(feats.terms[i])
        if score[i] <= 0 or len(out) == k:
            break
        if term and term not in ENGLISH_STOP_WORDS and term not in out:
            out.append(term)
    return out


def task_name(category: str, vs: list[cf.View], called: Counter, schema: dict | None, terms: list[str]) -> str:
    """A readable slug: the tools called, the JSON keys, the code language, or the top terms."""
    if category == "tool_calling" and called:
        total = sum(called.values())
        parts = [t for t, c in sorted(called.items(), key=lambda x: (-x[1], x[0])) if c >= 0.2 * total][:3]
    elif category == "extraction":
        parts = _key_order(vs)[:3]
    elif category == "classification" and schema and len(schema["enum"]) <= 3:
        parts = list(schema["enum"])
    elif category == "coding":
        parts = [code_language(v.target_text for v in vs) or "code"]
    else:
        parts = [t for t in terms if " " not in t][:2]
    return slug("-".join([category, *parts]))


def _key_order(vs: list[cf.View]) -> list[str]:
    """Keys of the most common answer object, in their written order (ties: the smallest sequence)."""
    seqs = Counter(tuple(o) for o in (parse_json_output(v.target_text) for v in vs) if isinstance(o, dict))
    return list(min(seqs, key=lambda s: (-seqs[s], s))) if seqs else []


def slug(text: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9_.-]+", "-", text.lower())).strip("-")[:80] or "task"


def unique_names(names: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _fingerprints(vs: list[cf.View]) -> list[list]:
    c = Counter(hashlib.sha256(v.system.encode()).hexdigest()[:16] for v in vs if v.system)
    return [[h, n] for h, n in sorted(c.items(), key=lambda x: (-x[1], x[0]))[:5]]


def _last_user(rec: dict) -> str:
    prompt, _ = split_prompt_target(rec)
    return next((m.get("content") or "" for m in reversed(prompt) if m.get("role") == "user"), "")


def token_stats(recs: list[dict]) -> dict:
    """p50/p95/max record length in tokens, estimated as chars / 3.5 + 4 per message (no tokenizer needed)."""
    lens = np.array([_est_tokens(r) for r in recs])
    return {"p50": int(np.percentile(lens, 50)), "p95": int(np.percentile(lens, 95)), "max": int(lens.max()),
            "chars_per_token": CHARS_PER_TOKEN}


def _est_tokens(rec: dict) -> int:
    chars = sum(len(m.get("content") or "") + (len(dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
                for m in rec["messages"])
    chars += len(dumps(rec["tools"])) if rec.get("tools") else 0
    return int(chars / CHARS_PER_TOKEN) + MSG_OVERHEAD_TOKENS * len(rec["messages"])


# ----------------------------------------------------------------------------- output
def write_task(out_dir: Path, info: dict, rows: np.ndarray, ids: list[str], recs: list[dict],
               comps: np.ndarray, eval_fraction: float) -> dict:
    mask = eval_mask([ids[i] for i in rows], [int(comps[i]) for i in rows], eval_fraction)
    tdir = out_dir / info["name"]
    n_train = write_jsonl(tdir / "train.jsonl", (recs[i] for i, e in zip(rows, mask, strict=True) if not e))
    n_eval = write_jsonl(tdir / "eval.jsonl", (recs[i] for i, e in zip(rows, mask, strict=True) if e))
    task = {"name": info["name"], "category": info["category"], "schema": info["schema"],
            "schema_hash": info["schema_hash"], "n_train": n_train, "n_eval": n_eval,
            **{k: v for k, v in info.items() if k not in ("name", "category", "schema", "schema_hash")},
            "files": {"train": "train.jsonl", "eval": "eval.jsonl"}}
    write_json(tdir / "task.json", task)
    return task


def _clear_stale(out_dir: Path, keep: set[str]) -> None:
    """Remove task dirs a previous run listed in index.json that this run no longer has."""
    old = out_dir / "index.json"
    if not old.is_file():
        return
    try:
        entries = [str(t["dir"]) for t in json.loads(old.read_text(encoding="utf-8"))["tasks"]]
    except (KeyError, TypeError, ValueError):
        return  # not an index we wrote: leave the folder alone
    for d in entries:
        path = out_dir / d
        if d not in keep and path.is_dir() and (path / "task.json").is_file():
            shutil.rmtree(path)


def _index(src: Path, n: int, n_un: int, tasks: list[dict], min_size: int, frac: float, embedder: str) -> dict:
    keys = ("category", "output_kind", "tools", "tools_called", "system_fingerprints", "top_terms",
            "schema_hash", "n_train", "n_eval")
    return {
        "version": 1, "source": src.name, "source_sha256": file_fingerprint(src),
        "n_records": n, "n_assigned": n - n_un, "n_unassigned": n_un,
        "params": {"min_size": min_size, "eval_fraction": frac, "embedder": embedder},
        "tasks": [{"name": t["name"], "dir": t["name"], **{k: t[k] for k in keys}} for t in tasks],
        "unassigned": {"dir": "unassigned", "n": n_un},
    }
