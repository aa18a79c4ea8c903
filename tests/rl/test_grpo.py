"""`method: grpo` for real on the tiny model: SFT teaches the answer's form, RL on the teacher's reward moves the
model to the teacher's answers; the run directory is a LoRA run that eval reads; the collapse guard stops a run
that has nothing to learn from; the reward is eval's comparison, graded."""

import json
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import write_jsonl
from slmtune.rl.reward import argument_names, reward
from slmtune.synthetic.tiny import WEATHER_TOOL

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"]
LABELS = ["positive", "negative", "neutral"]
TASK = {"name": "mood", "category": "classification", "schema": {"type": "string", "enum": LABELS}}


def mood_records(n: int, seed: int, label=None) -> list[dict]:
    """Sentiment-like records; `label=None`: a random positive/negative label (SFT learns the form, not the
    answer), else every record's teacher answers `label` (the crafted task RL has to find)."""
    rng = random.Random(seed)
    return [{"id": f"m{seed}-{i}", "messages": [
        {"role": "user", "content": f"Classify the sentiment: the day was {rng.choice(WORDS)}."},
        {"role": "assistant", "content": label or rng.choice(LABELS[:2])}], "meta": {}} for i in range(n)]


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def data_dir(folder: Path, name: str, records: list[dict]) -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / name / "train.jsonl", records)
    (folder / name / "task.json").write_text(json.dumps(TASK))
    return folder / name / "train.jsonl"


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def sft_run(request, tiny_model, tmp_path_factory):
    """A full fine-tune that answers positive or negative at random (its training labels were random)."""
    w = tmp_path_factory.mktemp(f"sft-{request.param}")
    recipe = {"name": "mood-sft", "task": TASK, "model": {"base": str(tiny_model)}, "method": "full",
              "data": {"train": str(data_dir(w, "sft", mood_records(64, 1)))},
              "train": {"max_steps": 60, "lr": 3e-3, "batch_size": 8, "precision": request.param},
              "output": {"dir": str(w / "run")}, "logging": {"report_to": []}}
    (w / "sft.yaml").write_text(yaml.safe_dump(recipe))
    run_cli("train", w / "sft.yaml")
    return w, request.param


def grpo_recipe(w: Path, sft: Path, label: str, precision: str, steps: int, name: str, temperature=1.0) -> Path:
    recipe = {"name": name, "method": "grpo", "model": {"base": str(sft)},
              "data": {"train": str(data_dir(w, name, mood_records(64, 2, label)))},
              "lora": {"r": 8, "alpha": 16},
              "train": {"max_steps": steps, "lr": 1e-2, "batch_size": 4, "precision": precision},
              "rl": {"num_generations": 4, "temperature": temperature}, "output": {"dir": str(w / f"{name}-run")},
              "logging": {"report_to": []}}
    (w / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return w / f"{name}.yaml"


def greedy_labels(tmp_path: Path, model: Path, name: str) -> list[str]:
    """The labels `model` answers held-out prompts with, greedily, by `slmtune eval`."""
    held = data_dir(tmp_path, "held", mood_records(16, 3, "positive"))
    run_cli("eval", "--data", held, "--model", model, "--baseline", "none", "-o", tmp_path / name)
    lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line)["outputs"]["tuned"]["text"] for line in lines]


def test_grpo_reward_rises_and_moves_the_greedy_answer(sft_run, tmp_path):
    w, precision = sft_run
    before = greedy_labels(tmp_path, w / "run", "eval-sft")
    # The crafted task: the teacher always answers the label the SFT model's greedy answer is not.
    target = "negative" if before.count("positive") >= len(before) / 2 else "positive"
    run_cli("train", grpo_recipe(tmp_path, w / "run", target, precision, 20, "rl"))
    run = tmp_path / "rl-run"
    m = json.loads((run / "metrics.json").read_text())
    rewards = [h["reward"] for h in m["rewards"]]
    assert len(rewards) == 20 and m["stopped_early"] is None
    # 0.2 for a label of the enum, +0.8 when it is the teacher's: the SFT model says either about half the time
    start = sum(rewards[:2]) / 2
    assert start < 0.75 and m["reward_last_quarter"] > start + 0.15, rewards
    assert m["rollouts"] == 20 * 4 * 4 and m["minutes_per_100_records"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == "grpo" and manifest["rl"]["num_generations"] == 4 and manifest["lora"]["r"] == 8
    assert manifest["task"]["name"] == "mood"  # carried over from the SFT run, as its base model's name
    assert manifest["base_model"]["path"] == str(w / "run" / "model")
    assert manifest["base_model"]["name"] == json.loads((w / "run" / "manifest.json").read_text())["base_model"][
        "name"]
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "reward.png").stat().st_size > 0
    after = greedy_labels(tmp_path, run, "eval-rl")  # eval reads the GRPO run as a LoRA run on the SFT model
    assert after.count(target) >= before.count(target) + len(before) // 2, (before, after)
    exports = tmp_path / "exports"  # merged into the SFT model, the card says how it was trained
    run_cli("export", run, "-o", exports, "--report", tmp_path / "eval-rl")
    (export,) = [p for p in exports.iterdir() if p.is_dir()]
    assert json.loads((export / "slmtune.json").read_text())["recipe"]["method"] == "grpo"
    assert "then RL (GRPO" in (export / "README.md").read_text()


def test_collapse_guard_stops_a_run_without_reward_variance(sft_run, tmp_path):
    """Teacher says `neutral`, which the SFT model never does, and rollouts sampled near-greedily are all alike:
    every group's answers score the same, so no group carries a policy gradient."""
    w, precision = sft_run
    run_cli("train", grpo_recipe(tmp_path, w / "run", "neutral", precision, 12, "dead", temperature=0.01))
    m = json.loads((tmp_path / "dead-run" / "metrics.json").read_text())
    assert m["stopped_early"] == {"step": 4, "reason": "no reward variance in any group for 4 logged steps in a row"}
    assert all(h["frac_reward_zero_std"] == 1.0 for h in m["rewards"]) and len(m["rewards"]) == 4


def test_grpo_refuses_a_lora_run_and_a_missing_start(tmp_path):
    lora = tmp_path / "lora-run"
    (lora / "adapter").mkdir(parents=True)
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    (lora / "manifest.json").write_text(json.dumps({"base_model": {"name": "x", "path": "x"}}))
    for base, expected in ((lora, "is a LoRA run"), (tmp_path / "nothing", "neither an SFT run")):
        path = grpo_recipe(tmp_path, base, "positive", "fp32", 2, "bad")
        result = CliRunner().invoke(app, ["train", str(path)])
        assert result.exit_code != 0 and expected in result.output


def test_rl_block_needs_method_grpo(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": {"base": "m"}, "data": {"train": "t.jsonl"},
                                    "rl": {"beta": 0.1}, "output": {"dir": "o"}}))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code != 0 and "rl: configures `method: grpo` only" in result.output


def _call(name: str, **args) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def test_reward_is_graded_by_evals_comparison():
    record = {"messages": [{"role": "user", "content": "weather in Paris in celsius"},
                           _call("get_weather", city="Paris", unit="celsius")], "tools": [WEATHER_TOOL]}

    def text(name, args):
        return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'

    got = {k: reward("tool_calling", None, t, record) for k, t in {
        "exact": text("get_weather", {"city": "Paris", "unit": "celsius"}),
        "one value wrong": text("get_weather", {"city": "Rome", "unit": "celsius"}),
        "one argument missing": text("get_weather", {"city": "Paris"}),
        "wrong tool": text("get_time", {"city": "Paris", "unit": "celsius"}),
        "not json": "<tool_call>\n{get_weather(Paris)\n</tool_call>",
        "text": "It is sunny in Paris."}.items()}
    assert got["exact"] == 1.0
    assert got["exact"] > got["one value wrong"] > got["wrong tool"] > got["not json"] == got["text"] == 0.0
    # format 0.1 + schema 0.1 + name 0.2 + argument names 0.2 + values F1 0.2·½ + exact 0
    assert got["one value wrong"] == pytest.approx(0.7)
    assert got["one argument missing"] == pytest.approx(0.1 + 0.1 + 0.2 + 0.2 * 2 / 3 + 0.2 * 2 / 3)
    # the teacher called no tool: format, schema and whole-answer agreement decide
    abstain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
               "tools": [WEATHER_TOOL]}
    assert reward("tool_calling", None, "Hi there.", abstain) == 1.0
    assert reward("tool_calling", None, text("get_weather", {"city": "x"}), abstain) == pytest.approx(0.5)


def test_argument_names_pairs_calls_as_eval_does():
    ref = {"tool_calls": [_call("a", x=1, y=2)["tool_calls"][0], _call("b", z=3)["tool_calls"][0]]}
    pred = {"tool_calls": [_call("b", z=9)["tool_calls"][0], _call("a", x=5)["tool_calls"][0]]}
    assert argument_names(pred, ref) == [pytest.approx(2 / 3), 1.0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_prompt_scoring_equals_trls(tiny_model, tmp_path, precision):
    """A group's prompt run once (slmtune) gives TRL's log-probabilities, entropies and gradients (prompt run per
    answer), on left-padded prompts of two lengths and right-padded answers."""
    import torch
    from trl import GRPOTrainer

    from slmtune.recipe import load_recipe, resolve_auto
    from slmtune.rl.grpo import _build_trainer, from_start
    from slmtune.train import prepare

    path = grpo_recipe(tmp_path, tiny_model, "positive", precision, 1, "eq")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]  # not `auto`: the weights in this precision too
    recipe, _ = from_start(load_recipe(path, [f"model.dtype={dtype}"]))
    prep = prepare(recipe)
    recipe = resolve_auto(recipe, len(prep.train), 0, prep.longest, prep.cap)
    trainer, _ = _build_trainer(recipe, prep, "classification", TASK["schema"])
    torch.manual_seed(0)
    for name, p in trainer.model.named_parameters():  # a non-zero adapter, so the LoRA path counts too
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    pad = trainer.processing_class.pad_token_id
    prompts = [[5, 9, 14, 3, 7, 22], [8, 4, 30]]
    answers = [[40, 41, 2], [43], [50, 51, 52, 53], [60, 61]]
    width = max(map(len, prompts))
    rows = [(prompts[i // 2], a) for i, a in enumerate(answers)]  # two answers per prompt
    ids = torch.tensor([[pad] * (width - len(p)) + p + a + [pad] * (4 - len(a)) for p, a in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(a)) + [0] * (4 - len(a)) for p, a in rows])
    got, want = [], []
    for fn, out in ((trainer._get_per_token_logps_and_entropies, got),
                    (lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k), want)):
        trainer.model.zero_grad()
        logps, entropy, _ = fn(trainer.model, ids, mask, 4, compute_entropy=True)
        (logps * mask[:, -4:]).sum().backward()
        grads = [p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad]
        out += [logps * mask[:, -4:], entropy * mask[:, -4:], grads]
    tol = 1e-4 if precision == "fp32" else 5e-2
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=max(tol, 1e-3))


def test_grouped_rollouts_equal_trls_generation(tiny_model, tmp_path):
    """Each prompt prefilled once and its cache shared by its group (slmtune) generates what TRL's padded batch
    generates: compared greedily, on prompts of three lengths, two answers each."""
    import torch
    from trl import GRPOTrainer

    from slmtune.recipe import load_recipe, resolve_auto
    from slmtune.rl.grpo import _build_trainer, from_start, full_attention
    from slmtune.train import prepare

    path = grpo_recipe(tmp_path, tiny_model, "positive", "fp32", 1, "gen")
    recipe, _ = from_start(load_recipe(path, ["model.dtype=float32"]))
    prep = prepare(recipe)
    recipe = resolve_auto(recipe, len(prep.train), 0, prep.longest, prep.cap)
    trainer, _ = _build_trainer(recipe, prep, "classification", TASK["schema"])
    trainer.generation_config.do_sample = False
    assert full_attention(trainer.model.config) and trainer.share_prompts  # slmtune's path runs, not TRL's
    torch.manual_seed(0)
    for name, p in trainer.model.named_parameters():  # a non-zero adapter: sampling must use it
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    tok = trainer.processing_class
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("Call the tool get_weather with the city", "Paris", "What is the weather in Berlin, London?")]
    batch = [p for p in prompts for _ in range(2)]
    ours, _ = trainer._generate_single_turn(batch, None, {}, 2)
    theirs, _ = GRPOTrainer._generate_single_turn(trainer, batch, None, {}, 2)
    assert ours == theirs and all(ours)
    for name, p in trainer.model.named_parameters():  # and the adapter changes what is generated
        if "lora_B" in name:
            p.data.zero_()
    assert trainer._generate_single_turn(batch, None, {}, 2)[0] != ours
