"""scripts/bench_agent.py on real BFCL v4 multi-turn conversations: the converter (tool results are the
application's own, positional arguments named, excluded functions absent), the scorer (BFCL's AST checker) and
the development/reserved and train/test splits."""

import json
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("bfcl_eval")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_agent as ba  # noqa: E402


@pytest.fixture(scope="module")
def b():
    return ba.bfcl()


@pytest.fixture(scope="module")
def base(b):
    return {e["id"]: e for e in ba.load_conversations(b)}


def executor_results(b, entry) -> list[str]:
    """The application's results for the whole ground truth, run by bfcl-eval's executor on its own."""
    run_id, out = f"check_{uuid.uuid4().hex}", []
    for calls in entry["ground_truth"]:
        results, _ = b.utils.execute_multi_turn_func_call(calls, entry["initial_config"], entry["involved_classes"],
                                                          run_id, entry["id"])
        out += results
    return out


@pytest.mark.parametrize("bfcl_id", ["multi_turn_base_0", "multi_turn_base_3"])
def test_a_conversation_becomes_one_log_per_call_with_the_applications_results(b, base, bfcl_id):
    entry = base[bfcl_id]
    logs = ba.conversation_logs(b, entry)
    calls = [c for turn in entry["ground_truth"] for c in turn]
    assert [x["ground_truth"] for x in logs] == calls
    # each log's history holds the earlier calls' results: the last log's tool messages are every result but its own
    last = logs[-1]["request"]["messages"]
    results = [m["content"] for m in last if m["role"] == "tool"]
    assert results == executor_results(b, entry)[:len(calls) - 1]
    offered = {t["function"]["name"] for t in logs[0]["request"]["tools"]}
    assert offered and not offered & set(entry["excluded_function"])
    for x in logs:  # the logged answer is that step's call, positional arguments named after the documentation
        (call,) = x["response"]["choices"][0]["message"]["tool_calls"]
        name, args = ba.parse_call(x["ground_truth"], ba.func_docs(b, entry["involved_classes"], []))
        assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (name, args)
    if bfcl_id == "multi_turn_base_0":
        sort = next(x for x in logs if x["ground_truth"] == "sort('final_report.pdf')")
        assert json.loads(sort["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {
            "file_name": "final_report.pdf"}
    # converting again gives the same logs: the executor's state does not leak from one replay to the next
    again = ba.conversation_logs(b, entry)
    assert [x["request"]["messages"] for x in again] == [x["request"]["messages"] for x in logs]


def test_the_scorer_is_bfcls_checker(b, base):
    entry = base["multi_turn_base_0"]
    docs = ba.func_docs(b, entry["involved_classes"], entry["excluded_function"])

    def answer(*calls):
        return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": n,
                                                     "arguments": json.dumps(a)}} for n, a in calls]}

    gt = "mv(source='final_report.pdf', destination='temp')"
    assert ba.score_step(b, docs, answer(("mv", {"destination": "temp", "source": "final_report.pdf"})), gt)
    assert not ba.score_step(b, docs, answer(("mv", {"source": "final_report.pdf", "destination": "tmp"})), gt)
    assert not ba.score_step(b, docs, answer(("cp", {"source": "final_report.pdf", "destination": "temp"})), gt)
    two = answer(("mv", {"source": "final_report.pdf", "destination": "temp"}), ("ls", {}))
    assert not ba.score_step(b, docs, two, gt)
    assert not ba.score_step(b, docs, {"role": "assistant", "content": "Done."}, gt)
    assert ba.score_step(b, docs, answer(("sort", {"file_name": "final_report.pdf"})), "sort('final_report.pdf')")


def test_development_and_reserved_apps_and_the_train_test_split(b, tmp_path):
    dev = ba.write_logs(b, set(ba.DEV_APPS), 0, 0.3, True, tmp_path / "dev")
    train, test = set(dev["train_conversations"]), set(dev["test_conversations"])
    assert train and test and not train & test
    lines = [json.loads(x) for x in (tmp_path / "dev" / "logs" / "train.jsonl").open()]
    assert any(x["metadata"]["bfcl_id"].startswith("multi_turn_miss_param") for x in lines)
    for x in lines:  # variants only of train conversations; every step's apps within the development set
        bid = x["metadata"]["bfcl_id"]
        assert ba.variant_of(bid) in train
        assert set(x["metadata"]["apps"]) <= set(ba.DEV_APPS)
    tests = [json.loads(x) for x in (tmp_path / "dev" / "logs" / "test.jsonl").open()]
    assert {x["metadata"]["bfcl_id"] for x in tests} <= test
    reserved = ba.write_logs(b, set(ba.RESERVED_APPS), 0, 0.3, False, tmp_path / "reserved")
    assert not set(reserved["train_conversations"] + reserved["test_conversations"]) & (train | test)


def test_one_applications_traffic_is_one_task_that_every_held_out_step_routes_to(b, tmp_path):
    """The application's steps offer its tools in several subsets (file system alone, beside messaging...) and
    each step's prompt holds the one before: curate keeps every step, cluster finds one task over the tool
    family, and the router sends every held-out request (some with tool subsets no train step offered) to it."""
    from typer.testing import CliRunner

    from slmtune.cli import app
    from slmtune.export.router import route

    ba.write_logs(b, set(ba.DEV_APPS), 0, 0.3, False, tmp_path)
    runner = CliRunner()
    for args in (["ingest", str(tmp_path / "logs" / "train.jsonl"), "-o", str(tmp_path / "r.jsonl")],
                 ["curate", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "c.jsonl")],
                 ["cluster", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "tasks")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    train = [json.loads(x) for x in (tmp_path / "logs" / "train.jsonl").open()]
    tool_sets = {tuple(sorted(t["function"]["name"] for t in x["request"]["tools"])) for x in train}
    assert len(tool_sets) > 3  # several subsets of the one application's tools
    index = json.loads((tmp_path / "tasks" / "index.json").read_text())
    assert index["n_records"] == len(train) and index["n_unassigned"] == 0 and len(index["tasks"]) == 1
    task = index["tasks"][0]
    assert task["category"] == "tool_calling" and set(task["tools"]) == {t for s in tool_sets for t in s}
    router = {"routes": [{"task": task["name"], "match": {"tools": task["tools"], "centroid_terms": []}}]}
    held_out = [json.loads(x)["request"] for x in (tmp_path / "logs" / "test.jsonl").open()]
    assert any(tuple(sorted(t["function"]["name"] for t in r["tools"])) not in tool_sets for r in held_out)
    assert all(route(r, router)["task"] == task["name"] for r in held_out)
    other = {"messages": [], "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
    assert route(other, router) is None  # a tool outside the family: the LLM's


def test_the_second_rounds_feedback_half_shares_no_conversation_with_round_one(b, tmp_path):
    ba.write_logs(b, set(ba.DEV_APPS), 0, 0.3, True, tmp_path)
    first, feedback = ba.feedback_split(tmp_path, 0)

    def base_ids(path):
        ids = [json.loads(x)["metadata"]["bfcl_id"] for x in path.open()]
        return [ba.variant_of(i) for i in ids]

    a, f = base_ids(first), base_ids(feedback)
    assert a and f and not set(a) & set(f)  # a conversation and its variants stay on one side
    train = (tmp_path / "logs" / "train.jsonl").read_text().splitlines()
    assert sorted(train) == sorted(first.read_text().splitlines() + feedback.read_text().splitlines())
