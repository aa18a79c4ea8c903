"""`slmtune eval` end to end through the CLI: crafted predictions with hand-computed numbers, the gate's exit
code, the tiny model generating (plain and grammar-constrained), and a trained run dir against its base."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.eval.metrics import aggregate
from slmtune.infer.confidence import DEFAULT
from slmtune.io import read_jsonl, write_json, write_jsonl
from slmtune.synthetic.tiny import WEATHER_TOOL, build_tiny_model, weather_records
from slmtune.tasks.schema import schema_hash, task_schema

runner = CliRunner()


def call(name, **args):
    return {"id": "c0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def record(rid, question, *calls, content=None):
    return {"id": rid, "tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": content, "tool_calls": list(calls)} if calls else
        {"role": "assistant", "content": content}]}


def write_task(d: Path, category: str, recs: list[dict]) -> Path:
    write_jsonl(d / "eval.jsonl", recs)
    schema = task_schema(category, recs)
    write_json(d / "task.json", {"name": d.name, "category": category, "schema": schema,
                                 "schema_hash": schema_hash(schema)})
    return d / "eval.jsonl"


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are too small to split; on a busy 2-core machine two spinning threads per
    process only fight other jobs (measured 3× slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def weather(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("tasks") / "weather", "tool_calling", weather_records(4, seed=3))


# ----------------------------------------------------------------------------- --predictions, exact numbers
@pytest.fixture
def crafted(tmp_path):
    recs = [record("r0", "Weather in Oslo?", call("get_weather", city="Oslo")),
            record("r1", "Paris in celsius?", call("get_weather", city="Paris", unit="celsius")),
            record("r2", "Rome?", call("get_weather", city="Rome")),
            record("r3", "Lima?", call("get_weather", city="Lima"))]
    data = write_task(tmp_path / "weather", "tool_calling", recs)
    preds = [
        {"id": "r0", "message": {"role": "assistant", "content": None,
                                 "tool_calls": [call("get_weather", city="Oslo")]}},        # all right
        {"id": "r1", "text": '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", '
                             '"city": "Rome"}}\n</tool_call>'},                              # wrong city
        {"id": "r2", "text": "It is sunny in Rome."},                                        # no call
        {"id": "zz", "text": "not an eval record: ignored"},                                 # r3 missing
    ]
    write_jsonl(tmp_path / "pred.jsonl", preds)
    return data, tmp_path / "pred.jsonl"


def test_predictions_reproduce_hand_computed_metrics(crafted, tmp_path):
    data, pred = crafted
    res = invoke("eval", "--predictions", pred, "--data", data, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    m = report["models"]["predictions"]["metrics"]
    assert m["parse_rate"] == {"value": 0.5, "count": 4}             # r0, r1 of 4
    assert m["schema_valid_rate"] == {"value": 0.5, "count": 4}      # Rome is still a valid city string
    assert m["tool_name_accuracy"] == {"value": 0.5, "count": 4}
    assert m["arguments_exact_match"] == {"value": 0.25, "count": 4}
    assert m["arguments_f1"] == {"value": 0.375, "count": 4}         # (1 + 2·1/4 + 0 + 0) / 4
    assert m["exact_match"] == {"value": 0.25, "count": 4}
    assert report["models"]["predictions"]["missing"] == 1
    assert all(v["value"] == 1.0 for v in report["models"]["teacher"]["metrics"].values())
    assert report["primary"] == "predictions" and report["gate"] is None
    assert report["task"] == {"name": "weather", "category": "tool_calling",
                              "schema_hash": json.loads((data.parent / "task.json").read_text())["schema_hash"],
                              "schema_source": "task.json"}
    lines = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [line["id"] for line in lines] == ["r0", "r1", "r2", "r3"]
    assert lines[1]["outputs"]["predictions"]["verdicts"]["arguments_f1"] == [0.5]


def test_predictions_report_lists_failure_kinds(crafted, tmp_path):
    data, pred = crafted
    res = invoke("eval", "--predictions", pred, "--data", data, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    f = report["models"]["predictions"]["failures"]
    assert f["n"] == 4 and f["failed"] == 3  # r0 is right
    assert {k: v["count"] for k, v in f["kinds"].items()} == {"no_call": 2, "wrong_value": 1}
    assert [e["id"] for e in f["kinds"]["no_call"]["examples"]] == ["r2", "r3"]  # r3: no prediction at all
    assert f["kinds"]["wrong_value"]["examples"] == [{
        "id": "r1", "expected": 'get_weather({"city": "Paris", "unit": "celsius"})',
        "got": 'get_weather({"unit": "celsius", "city": "Rome"})',
        "detail": 'get_weather.city: "Rome", the teacher gave "Paris"'}]
    assert "failures" not in report["models"]["teacher"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Failures of `predictions`: 3 of 4 records" in md
    assert '| no_call | 2 | 50% | `r2`: answered in text; the teacher made 1 call — got `"It is sunny in Rome."`' in md
    assert "| wrong_value | 1 | 25% | `r1`: get_weather.city:" in md


def test_gate_misses_exit_3_and_passes_exit_0(crafted, tmp_path):
    data, pred = crafted
    (tmp_path / "strict.yaml").write_text("parse_rate: 0.9\narguments_f1: {min: 0.3}\n")
    res = invoke("eval", "--predictions", pred, "--data", data, "-o", tmp_path / "o1",
                 "--gate", tmp_path / "strict.yaml")
    assert res.exit_code == 3, res.output
    gate = json.loads((tmp_path / "o1" / "report.json").read_text())["gate"]
    assert gate["passed"] is False
    assert gate["failures"] == [{"metric": "parse_rate", "value": 0.5, "op": "min", "threshold": 0.9}]
    (tmp_path / "easy.json").write_text('{"parse_rate": 0.5, "exact_match": {"min": 0.25}}')
    res = invoke("eval", "--predictions", pred, "--data", data, "-o", tmp_path / "o2", "--gate", tmp_path / "easy.json")
    assert res.exit_code == 0, res.output
    (tmp_path / "typo.json").write_text('{"parse_rat": 0.5, "rouge_l": "high"}')
    res = invoke("eval", "--predictions", pred, "--data", data, "-o", tmp_path / "o3", "--gate", tmp_path / "typo.json")
    assert res.exit_code == 1 and "parse_rat" in res.output and "rouge_l" in res.output


def test_inferred_task_without_task_json(tmp_path):
    recs = [record(f"c{i}", f"Review {i}: fine", content=label)
            for i, label in enumerate(["positive", "negative", "neutral"] * 3)]
    write_jsonl(tmp_path / "reviews" / "eval.jsonl", recs)
    write_jsonl(tmp_path / "pred.jsonl", [{"id": r["id"], "text": " Positive "} for r in recs])
    res = invoke("eval", "--predictions", tmp_path / "pred.jsonl", "--data", tmp_path / "reviews" / "eval.jsonl",
                 "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"]["category"] == "classification" and report["task"]["schema_source"] == "inferred"
    assert "failures" not in report["models"]["predictions"]  # failure kinds are for tool-calling tasks
    assert report["models"]["predictions"]["metrics"]["label_accuracy"] == {"value": pytest.approx(1 / 3, abs=1e-6),
                                                                            "count": 9}


# ----------------------------------------------------------------------------- the tiny model generating
@pytest.mark.slow
def test_tiny_model_end_to_end_constrained(tiny, weather, tmp_path):
    out = tmp_path / "out"
    res = invoke("eval", "--model", tiny, "--data", weather, "-o", out, "--compare-decodings", "--batch-size", "4",
                 "--target-accuracy", "0.9")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    lines = read_jsonl(out / "predictions.jsonl")
    # every generated row has its risk–coverage curve and calibration; 4 records cannot certify 0.9
    for row, sel in (("tuned", report["models"]["tuned"]["selective"]),
                     ("tuned+constrained", report["constrained"]["tuned"]["selective"])):
        calls = sum(1 for line in lines if line["outputs"][row]["message"].get("tool_calls"))
        # only answers that call a tool could be served: the curve ends at their share
        assert max([p["answered"] for p in sel["curve"]], default=0) == calls
        assert sel["target"] == 0.9 and sel["n"] == len(lines)
        assert sel["threshold"] is None and sel["coverage"] == 0.0 and "no threshold" in sel["reason"]
    assert "selective" not in report["models"]["teacher"]
    assert (out / "selective.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Answering only when confident" in (out / "report.md").read_text()
    ids = [r["id"] for r in read_jsonl(weather)]
    assert [line["id"] for line in lines] == ids
    # report.json is the aggregate of the per-record verdicts in predictions.jsonl, and report.md shows it
    for row, metrics in [("tuned", report["models"]["tuned"]["metrics"]),
                         ("tuned+constrained", report["constrained"]["tuned"]["metrics"])]:
        assert aggregate([line["outputs"][row]["verdicts"] for line in lines], "tool_calling") == metrics
    md = (out / "report.md").read_text()
    for name, v in report["models"]["tuned"]["metrics"].items():
        assert f"| {name} | {v['value']:.3f} |" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    cons = report["constrained"]["tuned"]
    assert cons["metrics"]["schema_valid_rate"] == {"value": 1.0, "count": len(ids)}
    assert cons["metrics"]["parse_rate"]["value"] == 1.0 and cons["perf"]["unfinished"] == 0
    perf = report["models"]["tuned"]["perf"]
    assert perf["generated_tokens"] == sum(line["outputs"]["tuned"]["n_tokens"] for line in lines)
    for line in lines:  # every generated answer carries its confidence, the default among the candidates
        for row in ("tuned", "tuned+constrained"):
            out = line["outputs"][row]
            assert 0.0 <= out["confidence"] <= 1.0 and out["confidence"] == out["confidences"][DEFAULT]
    assert "base" not in report["models"]  # a plain checkpoint has no implied baseline
    # --compare-decodings: the models rows decoded free, the constrained section under the grammar
    assert (perf["decoding"], cons["perf"]["decoding"]) == ("free", "constrained")
    assert report["decoding"] == {"requested": "auto", "used": "free"}


@pytest.mark.slow
def test_tool_calls_decode_under_the_grammar_by_default(tiny, weather, tmp_path):
    """`--decoding auto` (the default) decodes a tool-calling task as `serve` does: every call names an offered
    tool with schema-valid arguments; `--decoding free` lets the tiny random model write whatever it likes."""
    got, run = {}, make_run_dir(tiny, tmp_path / "run")
    for decoding in ("auto", "free"):
        res = invoke("eval", "--model", run, "--data", weather, "-o", tmp_path / decoding, "--limit", "4",
                     *(["--decoding", decoding] if decoding != "auto" else []))
        assert res.exit_code == 0, res.output
        got[decoding] = json.loads((tmp_path / decoding / "report.json").read_text())
    auto, free = got["auto"], got["free"]
    assert auto["decoding"] == {"requested": "auto", "used": "constrained"} and "constrained" not in auto
    assert free["decoding"] == {"requested": "free", "used": "free"}
    for row in ("tuned", "base"):  # the base row is decoded as the tuned one, so the two compare
        assert auto["models"][row]["perf"]["decoding"] == "constrained"
        assert free["models"][row]["perf"]["decoding"] == "free"
        m = auto["models"][row]["metrics"]
        assert m["parse_rate"]["value"] == 1.0 and m["schema_valid_rate"]["value"] == 1.0, m
        assert m["tool_name_accuracy"]["value"] == 1.0  # the one offered tool is the only name the grammar allows
    assert free["models"]["tuned"]["metrics"]["schema_valid_rate"]["value"] < 1.0  # so the grammar did the work


@pytest.mark.slow
def test_auto_decodes_free_where_a_grammar_cannot_be_built(tiny, tmp_path):
    """A tool schema llguidance refuses (an unknown string format) fails an explicit `--decoding constrained`
    with a one-line error, while the default decodes those records free and counts them."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"day": {"type": "string", "format": "weird-format"}}, "required": ["day"]}}}
    recs = [{**record(f"w{i}", f"Look up day {i}", call("lookup", day=str(i))), "tools": [tool]} for i in range(2)]
    data = write_task(tmp_path / "odd", "tool_calling", recs)
    res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / "auto", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    perf = report["models"]["tuned"]["perf"]
    assert (perf["decoding"], perf["grammar_fallbacks"]) == ("free", 2) and report["decoding"]["used"] == "free"
    res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / "strict", "--decoding", "constrained")
    assert res.exit_code == 1 and "could not become a grammar" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_constrained_extraction_and_classification_are_schema_valid(tiny, tmp_path):
    ext = [record(f"e{i}", f"Extract: order {i} for {c}",
                  content=json.dumps({"customer": c, "qty": i, "rush": i % 2 == 0}))
           for i, c in enumerate(["Ada", "Bob", "Cy", "Di"])]
    cls = [record(f"k{i}", f"Ticket {i}", content=lab) for i, lab in enumerate(["billing", "bug", "other"] * 2)]
    for name, cat, recs in (("ext", "extraction", ext), ("cls", "classification", cls)):
        data = write_task(tmp_path / name, cat, recs)
        res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / f"out-{name}", "--decoding",
                     "constrained")
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / f"out-{name}" / "report.json").read_text())
        assert report["decoding"] == {"requested": "constrained", "used": "constrained"}
        assert report["models"]["tuned"]["metrics"]["schema_valid_rate"] == {"value": 1.0, "count": len(recs)}
        assert report["models"]["tuned"]["perf"]["grammar_fallbacks"] == 0
    # auto leaves them free (only tool calls are constrained by default), and the two flags don't combine
    res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / "out-auto", "--limit", "2",
                 "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out-auto" / "report.json").read_text())["decoding"]["used"] == "free"
    res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / "out-both", "--compare-decodings",
                 "--decoding", "constrained")
    assert res.exit_code == 1 and "drop --decoding constrained" in res.output


def make_run_dir(base: Path, run: Path) -> Path:
    """A run dir as `slmtune train` leaves it (manifest + peft adapter + tokenizer), with a random LoRA so the
    tuned weights differ from the base. Training itself is tested in test_train.py."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
    write_json(run / "manifest.json", {"name": "t", "base_model": {"spec": str(base), "name": "tiny",
                                                                     "path": str(base)}})
    return run


@pytest.mark.slow
def test_run_dir_is_evaluated_against_its_base(tiny, weather, tmp_path):
    run = make_run_dir(tiny, tmp_path / "run")
    res = invoke("eval", "--model", run, "--data", weather, "-o", tmp_path / "out", "--limit", "3",
                 "--max-new-tokens", "12", "--decoding", "free")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["models"]) == {"tuned", "base", "teacher"} and report["n"] == 3
    assert report["models"]["tuned"]["kind"] == "run" and report["models"]["base"]["source"] == str(tiny)
    assert report["models"]["tuned"]["perf"]["max_new_tokens"] == 12
    lines = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert any(line["outputs"]["tuned"]["text"] != line["outputs"]["base"]["text"] for line in lines)
    assert "| metric | base | tuned | teacher | count |" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_to_evaluate_is_a_clear_error(weather, tmp_path):
    res = invoke("eval", "--data", weather, "-o", tmp_path / "out")
    assert res.exit_code == 1 and "--model" in res.output


def test_common_prefix_leaves_every_prompt_a_token():
    from slmtune.infer.generate import common_prefix

    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == [1, 2]
    assert common_prefix([[1, 2], [1, 2, 3]]) == [1]
    assert common_prefix([[5], [5]]) == [] and common_prefix([[7, 8, 9]]) == [7, 8]


@pytest.mark.slow
def test_text_task_scores_overlap_and_skips_constraint(tiny, tmp_path):
    recs = [record(f"s{i}", f"Summarize: meeting {i} moved the launch to Friday.",
                   content=f"Launch moved to Friday ({i}).")
            for i in range(3)]
    data = write_task(tmp_path / "sum", "summarization", recs)
    res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / "out", "--decoding", "constrained",
                 "--max-new-tokens", "6")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["models"]["tuned"]["metrics"]) == {"parse_rate", "token_f1", "rouge_l", "exact_match"}
    assert report["decoding"] == {"requested": "constrained", "used": "free"}  # a text task has no grammar
    assert report["models"]["tuned"]["perf"]["decoding"] == "free" and "constrained" not in report
    # the old name of --compare-decodings, kept hidden for one release
    res = invoke("eval", "--model", tiny, "--data", data, "-o", tmp_path / "out2", "--constrained",
                 "--max-new-tokens", "6")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert report["constrained"]["skipped"] and "tuned" not in report["constrained"]
    assert report["models"]["teacher"]["metrics"]["rouge_l"] == {"value": 1.0, "count": 3}
