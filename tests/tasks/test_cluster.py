"""`slmtune cluster` end to end: synthetic mixed-format agent logs → ingest → cluster, through the real CLI."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import read_jsonl, write_jsonl
from slmtune.synthetic.logs import ERRANDS, write_logs
from slmtune.tasks.split import signature

runner = CliRunner()
N = 1200


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """1,200 logged calls of all ten errands in three log formats, ingested; the errand labels kept aside."""
    work = tmp_path_factory.mktemp("logs")
    paths = write_logs(work / "logs", N, seed=0)
    logs = [str(p) for k, p in paths.items() if k != "labels"]
    res = runner.invoke(app, ["ingest", *logs, "-o", str(work / "records.jsonl")])
    assert res.exit_code == 0, res.output
    truth = {o["id"]: o["errand"] for o in read_jsonl(paths["labels"]) if o["id"]}
    return work / "records.jsonl", truth


@pytest.fixture(scope="module")
def clustered(fixture, tmp_path_factory) -> Path:
    records, _ = fixture
    out = tmp_path_factory.mktemp("run") / "tasks"
    res = runner.invoke(app, ["cluster", str(records), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "tasks from 1,200 records" in res.output
    return out


def _assignments(tasks_dir: Path) -> dict[str, str]:
    found = {}
    for t in json.loads((tasks_dir / "index.json").read_text())["tasks"]:
        for split in ("train", "eval"):
            for rec in read_jsonl(tasks_dir / t["dir"] / f"{split}.jsonl"):
                found[rec["id"]] = t["name"]
    for rec in read_jsonl(tasks_dir / "unassigned" / "records.jsonl"):
        found[rec["id"]] = "unassigned"
    return found


def test_fixture_is_mixed_and_keeps_labels_out(fixture):
    records, truth = fixture
    recs = read_jsonl(records)
    assert len({r["meta"]["format"] for r in recs}) == 3
    assert set(truth.values()) == set(ERRANDS)
    text = records.read_text()
    assert not any(label in text for label in ERRANDS)  # clustering never sees the ground truth


def test_tasks_recovered_with_ari_and_right_categories(fixture, clustered):
    _, truth = fixture
    found = _assignments(clustered)
    ids = sorted(found)
    ari = adjusted_rand_score([truth[i] for i in ids], [found[i] for i in ids])
    assert ari >= 0.9, ari
    tasks = json.loads((clustered / "index.json").read_text())["tasks"]
    assert len(tasks) == len(ERRANDS)
    for t in tasks:
        majority = Counter(truth[i] for i in ids if found[i] == t["name"]).most_common(1)[0][0]
        assert t["category"] == ERRANDS[majority], (t["name"], majority)
    names = {t["name"] for t in tasks}
    assert {"tool_calling-get_weather", "tool_calling-create_ticket", "coding-sql"} <= names
    assert "extraction-category-urgency-product" in names


def test_full_pipeline_ingest_curate_cluster(fixture, tmp_path):
    """The way users run it: curated (PII scrubbed, duplicates dropped) records still give the same tasks."""
    records, truth = fixture
    res = runner.invoke(app, ["curate", str(records), "-o", str(tmp_path / "curated.jsonl")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cluster", str(tmp_path / "curated.jsonl"), "-o", str(tmp_path / "tasks")])
    assert res.exit_code == 0, res.output
    found = _assignments(tmp_path / "tasks")
    ids = sorted(i for i in found if i in truth)
    assert len(ids) > 0.8 * N
    assert adjusted_rand_score([truth[i] for i in ids], [found[i] for i in ids]) >= 0.9


def _task(tasks_dir: Path, name_prefix: str) -> dict:
    (match,) = [p for p in tasks_dir.glob(f"{name_prefix}*/task.json")]
    return json.loads(match.read_text())


def test_task_json_schemas(clustered):
    ticket = _task(clustered, "extraction-category")
    s = ticket["schema"]
    assert s["required"] == ["category", "product", "urgency"]
    assert s["properties"]["category"]["enum"] == ["account", "billing", "shipping", "technical"]
    assert s["properties"]["urgency"]["enum"] == ["high", "low", "medium"]
    assert s["properties"]["product"]["type"] == "string"
    contact = _task(clustered, "extraction-name")
    assert contact["schema"]["required"] == ["company", "email", "name", "phone"]
    sentiment = _task(clustered, "classification-negative")
    assert sentiment["schema"] == {"type": "string", "enum": ["negative", "neutral", "positive"]}
    weather = _task(clustered, "tool_calling-get_weather")
    (tool,) = weather["schema"]["tools"]
    assert tool["function"]["parameters"]["required"] == ["city", "unit"]
    assert _task(clustered, "coding-sql")["schema"] is None
    for t in (ticket, contact, sentiment, weather):
        assert len(t["schema_hash"]) == 16
        assert t["n_train"] + t["n_eval"] > 60
        assert t["top_terms"] and t["example_prompts"] and t["tokens"]["p95"] >= t["tokens"]["p50"] > 0


def test_split_is_about_a_fifth_and_near_duplicates_stay_together(clustered):
    for t in json.loads((clustered / "index.json").read_text())["tasks"]:
        train = read_jsonl(clustered / t["dir"] / "train.jsonl")
        evals = read_jsonl(clustered / t["dir"] / "eval.jsonl")
        n = len(train) + len(evals)
        assert abs(len(evals) - 0.2 * n) <= 0.05 * n + 2, (t["name"], len(evals), n)
        prompts = [_prompt(r) for r in train]
        sigs = np.stack([signature(p) for p in prompts])
        for r in evals:
            assert _prompt(r) not in prompts
            agree = (sigs == signature(_prompt(r))).mean(axis=1).max()
            assert agree < 0.9, (t["name"], _prompt(r))
        assert [r["id"] for r in train] == sorted(r["id"] for r in train)


def _prompt(rec: dict) -> str:
    return "\n".join(m.get("content") or "" for m in rec["messages"][:-1] if m["role"] != "system")


def test_index_routes_and_map(clustered):
    index = json.loads((clustered / "index.json").read_text())
    assert index["n_records"] == N and index["n_assigned"] + index["n_unassigned"] == N
    weather = next(t for t in index["tasks"] if t["name"] == "tool_calling-get_weather")
    assert weather["tools"] == ["get_weather"] and weather["system_fingerprints"][0][1] > 1
    assert (clustered / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_input_any_order_gives_byte_identical_output(fixture, clustered, tmp_path):
    records, _ = fixture
    lines = records.read_text().splitlines()
    random.Random(1).shuffle(lines)
    shuffled = tmp_path / "in" / records.name
    shuffled.parent.mkdir()
    shuffled.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["cluster", str(shuffled), "-o", str(tmp_path / "tasks")])
    assert res.exit_code == 0, res.output
    want = sorted(p.relative_to(clustered) for p in clustered.rglob("*") if p.is_file())
    got = sorted(p.relative_to(tmp_path / "tasks") for p in (tmp_path / "tasks").rglob("*") if p.is_file())
    assert got == want
    for rel in want:
        if rel.name == "index.json":  # names the input file's sha256, which shuffling changes
            a, b = json.loads((clustered / rel).read_text()), json.loads((tmp_path / "tasks" / rel).read_text())
            assert a["source_sha256"] != b["source_sha256"]
            assert {**a, "source_sha256": ""} == {**b, "source_sha256": ""}
        else:
            assert (clustered / rel).read_bytes() == (tmp_path / "tasks" / rel).read_bytes(), rel


def test_min_size_sends_small_groups_to_unassigned(tmp_path):
    recs = read_jsonl_fixture(tmp_path, {"classification-sentiment": 60, "coding-sql": 60, "extraction-ticket": 8})
    res = runner.invoke(app, ["cluster", str(recs), "-o", str(tmp_path / "t"), "--min-size", "20"])
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "t" / "index.json").read_text())
    assert sorted(t["category"] for t in index["tasks"]) == ["classification", "coding"]
    assert index["n_unassigned"] == 8 == len(read_jsonl(tmp_path / "t" / "unassigned" / "records.jsonl"))


def read_jsonl_fixture(tmp_path: Path, counts: dict[str, int]) -> Path:
    """Records of chosen errands, in the `messages` format (canonical already: an id is all they need)."""
    from slmtune.synthetic.logs import generate_logs

    rows = []
    for errand, n in counts.items():
        for i, (log, _) in enumerate(generate_logs(n, seed=3, formats=("messages",), errands=[errand])):
            rows.append({"id": f"{errand}-{i:04d}", **log})
    path = tmp_path / "records.jsonl"
    write_jsonl(path, rows)
    return path


def test_bad_input_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                   '"content": "yo"}]}\n{"id": "b", "messages": [{"role": "bot", "content": "x"}]}\n')
    res = runner.invoke(app, ["cluster", str(bad), "-o", str(tmp_path / "t")])
    assert res.exit_code != 0
    assert f"{bad}:2:" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["cluster", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "t")])
    assert res.exit_code != 0 and "no such file" in res.output
    res = runner.invoke(app, ["cluster", str(bad), "-o", str(tmp_path / "t"), "--eval-fraction", "1.5"])
    assert res.exit_code != 0 and "--eval-fraction" in res.output
    assert not (tmp_path / "t").exists()


def test_minilm_embedder_without_a_local_model_is_a_clear_error(tmp_path):
    recs = read_jsonl_fixture(tmp_path, {"coding-sql": 30})
    res = runner.invoke(app, ["cluster", str(recs), "-o", str(tmp_path / "t"), "--embedder", "minilm"])
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        assert res.exit_code != 0 and "sentence-transformers" in res.output and "Traceback" not in res.output
    else:  # installed: either the model is cached locally (success) or the error says how to get it
        assert res.exit_code == 0 or "not available locally" in res.output
    res = runner.invoke(app, ["cluster", str(recs), "-o", str(tmp_path / "t"), "--embedder", "bert"])
    assert res.exit_code == 2 and "--embedder" in res.output and "'bert'" in res.output  # a usage error


def test_tool_sets_sharing_half_the_smaller_one_join_one_family_transitively():
    from slmtune.tasks.features import View, join_tool_families

    def v(*tools: str) -> View:
        return View("", "", "", "tool_call", tuple(sorted(tools)), (), "")

    views = join_tool_families([v("cd", "ls"), v("cd", "ls", "post", "tweet"), v("post", "tweet", "follow"),
                                v("get_weather"), v("alert", "get_weather"), v("a", "b", "c"), v("a", "d", "e"), v()])
    fam = [x.family for x in views]
    assert fam[0] == fam[1] == fam[2] == "cd|follow|ls|post|tweet"  # 2 of 2 shared, then 2 of 3: joined
    assert fam[3] == fam[4] == "alert|get_weather"  # all of the smaller set
    assert (fam[5], fam[6]) == ("a|b|c", "a|d|e")  # 1 of 3: under half, two applications
    assert fam[7] == ""
