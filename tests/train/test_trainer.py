"""`slmtune train` and `slmtune merge` for real on the tiny model: LoRA, QLoRA (NF4 on the CPU), resume, merge."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.io import write_jsonl
from slmtune.recipe import load_recipe
from slmtune.synthetic.tiny import CHAT_TEMPLATE, build_tokenizer, weather_records

RECIPE = """\
name: tiny-weather
task: {{name: weather, category: tool_calling}}
model: {{base: {model}, quantization: {quant}}}
data: {{train: train.jsonl, eval: eval.jsonl, max_length: 512, packing: true}}
lora: {{r: 8, alpha: 16, dropout: 0.0}}
train: {{epochs: 3, lr: 2.0e-2, batch_size: 4, warmup_ratio: 0.0, scheduler: constant, save_steps: {save}}}
output: {{dir: {out}}}
"""


def make_recipe(folder: Path, model: Path, quant="none", save="null", n=16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", weather_records(n, seed=0))
    write_jsonl(folder / "eval.jsonl", weather_records(4, seed=1))
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, quant=quant, save=save, out=folder / "run"))
    return path


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result


def losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())["train_loss"]]


def assert_lora_trained(adapter_dir: Path):
    """peft initialises every lora_B to zero: after training each must have moved."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert b and len(b) == sum("lora_A" in k for k in tensors)
    assert all(v.abs().sum() > 0 for v in b.values()), [k for k, v in b.items() if v.abs().sum() == 0]
    assert not any("base_layer" in k or "embed_tokens" in k for k in tensors), "only adapter weights are saved"


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    recipe = make_recipe(tmp_path_factory.mktemp("lora"), tiny_model)
    run_cli("train", recipe)
    return recipe.parent / "run"


def test_lora_loss_logged_and_fell(lora_run):
    ls = losses(lora_run)
    assert len(ls) >= 6
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.05, ls


def test_lora_run_dir_contract(lora_run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "recipe.yaml", "metrics.json", "manifest.json", "loss.png"):
        assert (lora_run / name).is_file(), name
    m = json.loads((lora_run / "metrics.json").read_text())
    assert m["eval_loss"] > 0 and m["tokens_seen"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0
    man = json.loads((lora_run / "manifest.json").read_text())
    assert man["task"]["name"] == "weather" and man["quantization"] == "none"
    assert man["render_mode"] == "slmtune-hermes" and man["data"]["train"]["records"] == 16
    assert len(man["data"]["train"]["sha256"]) == 64 and man["versions"]["trl"]
    assert load_recipe(lora_run / "recipe.yaml").name == "tiny-weather"  # the resolved recipe reloads
    assert (lora_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_changed_adapters_not_base(lora_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert_lora_trained(lora_run / "adapter")
    original = load_file(Path(tiny_model) / "model.safetensors")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_run / "adapter")
    base_sd = peft_model.get_base_model().state_dict()
    checked = 0
    for key, before in original.items():
        peft_key = key.replace(".weight", ".base_layer.weight")
        after = base_sd.get(peft_key, base_sd.get(key))
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        checked += 1
    assert checked == len(original)


def pin_precision(recipe: Path, precision: str, extra: str = "") -> None:
    """Pin the compute precision and the weights' dtype to one path, whatever this CPU would pick on `auto`."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    text = recipe.read_text().replace("scheduler: constant,", f"scheduler: constant, precision: {precision},{extra}")
    recipe.write_text(text.replace("model: {base:", f"model: {{dtype: {dtype}, base:"))


# Both precision paths on every machine: an AVX512-BF16 CPU picks bf16 on `auto`, an AVX2-only one fp32, so each
# kind of CI would otherwise test one path only. bf16 on an AVX2-only CPU is emulated: slow, correct, tiny here.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_trains_in_both_precisions(tiny_model, tmp_path, precision):
    recipe = make_recipe(tmp_path, tiny_model)
    pin_precision(recipe, precision)
    run_cli("train", recipe)
    ls = losses(tmp_path / "run")
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.05, ls
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["precision"] == {"requested": precision, "used": precision, "reason": "set by train.precision",
                              "weights_dtype": {"fp32": "float32", "bf16": "bfloat16"}[precision]}
    assert_lora_trained(tmp_path / "run" / "adapter")


def test_auto_precision_follows_the_cpu_flags_and_says_why(lora_run):
    """The shared run uses `precision: auto`: bf16 exactly when the CPU computes it in hardware."""
    m = json.loads((lora_run / "metrics.json").read_text())["precision"]
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    fast = bool(flags & {"avx512_bf16", "amx_bf16"}) and not torch.cuda.is_available()
    assert m["requested"] == "auto" and m["used"] == ("bf16" if fast else "fp32")
    assert ("CPU has" if fast else "CPU lacks") in m["reason"], m


# QLoRA with an evaluation every 2 steps and at the end: eval-mode, no-grad forwards of the 4-bit model, which on an
# AVX512-BF16 CPU is where bitsandbytes would repack the weights (see models.keep_4bit_off_cpu_repacking).
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_4bit_trains_on_cpu_with_mid_run_eval(tiny_model, tmp_path, precision):
    recipe = make_recipe(tmp_path, tiny_model, quant="4bit")
    pin_precision(recipe, precision, extra=" eval_steps: 2,")
    run_cli("train", recipe)
    run = tmp_path / "run"
    ls = losses(run)
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.05, ls  # still learning after the evals in between
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval_loss"] is not None and m["precision"]["used"] == precision
    assert json.loads((run / "manifest.json").read_text())["quantization"] == "4bit"
    assert_lora_trained(run / "adapter")


def test_4bit_layers_kept_off_cpu_repacking_and_tiny_widths_repackable(tiny_model, tmp_path):
    """On any CPU: slmtune disarms bitsandbytes' AVX512-BF16 repack while training, eval-mode forwards then equal
    train-mode ones, and the tiny model's widths are ones the repack takes (a 32-wide layer is not: its repack
    raises, on every CPU, since the repack itself is plain torch)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    from slmtune.models import cpu_repackable, keep_4bit_off_cpu_repacking, load_model, resolve_base
    from slmtune.synthetic.tiny import build_tiny_model

    model = load_model(resolve_base(str(tiny_model)), "4bit", torch.float32)
    keep_4bit_off_cpu_repacking(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    model.train()
    train_logits = model(ids).logits.detach()
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert torch.equal(train_logits, eval_logits)
    for m in layers:
        assert cpu_repackable(m), (m.in_features, m.out_features)
        packed, state = _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
        back, _ = _convert_weight_packed_for_cpu_inverse(packed, state)
        assert torch.equal(back, m.weight.data)

    narrow = load_model(resolve_base(str(build_tiny_model(tmp_path / "narrow", hidden=32, intermediate=64))), "4bit",
                        torch.float32)
    q = next(m for m in narrow.modules() if isinstance(m, Linear4bit))
    assert not cpu_repackable(q)
    with pytest.raises(RuntimeError, match="invalid for input"):
        _convert_weight_packed_for_cpu(q.weight.data.clone(), copy.deepcopy(q.weight.quant_state))


def test_merge_verifies_and_reloads(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    run_cli("merge", lora_run, "-o", out)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < report["logit_tolerance"]
    assert report["greedy_identical"] and report["reload_greedy_identical"] and report["prompts_checked"] == 3
    assert (out / "model.safetensors").is_file() and (out / "slmtune_render.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    # the training rendering as a template: slmtune's Hermes prelude, then the base template it wraps
    assert tok.chat_template.startswith("{#- slmtune-hermes") and tok.chat_template.endswith(CHAT_TEMPLATE)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert not any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in load_file(out / "model.safetensors"))


def test_merge_of_a_non_run_fails_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["merge", str(tmp_path), "-o", str(tmp_path / "m")])
    assert result.exit_code == 1 and "no manifest.json" in result.stderr and not (tmp_path / "m").exists()


def test_dry_run_shows_examples_and_counts_without_training(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model)
    out = run_cli("train", recipe, "--dry-run").output
    assert out.count("train.jsonl:") == 2 and "target tokens" in out and "<tool_call>" in out
    assert "│ train │       16 │" in out
    assert not (tmp_path / "run").exists()


def test_bad_record_names_file_and_line(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model)
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write('{"id": "x", "messages": [{"role": "bot", "content": "hi"}]}\n')
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'train.jsonl'}:17" in result.stderr and "'bot'" in result.stderr


def test_resume_after_kill_9_continues_from_checkpoint(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, save=1, n=24)  # 6 steps/epoch × 3 epochs = 18 steps
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slmtune.cli", "train", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file(), "the run never wrote its first checkpoint"
    assert not (tmp_path / "run" / "metrics.json").exists(), "killed before finishing"

    refused = CliRunner().invoke(app, ["train", str(recipe)])
    assert refused.exit_code == 1 and "--resume" in refused.stderr

    run_cli("train", recipe, "--resume")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["resumed_from_step"] >= 1 and m["global_step"] == 18
    assert m["steps_this_run"] == 18 - m["resumed_from_step"], m


def test_resume_without_checkpoint_is_an_error(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["train", str(make_recipe(tmp_path, tiny_model)), "--resume"])
    assert result.exit_code == 1 and "no checkpoint" in result.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_holds_under_0_6_of_lora_tensor_memory(tmp_path, precision):
    """`train.track_tensor_memory` on the CPU: QLoRA's peak tensor bytes (the GPU-allocator view) stay under 0.6×
    LoRA's on a model whose linear weights dominate (~26M parameters), with gradient checkpointing — in both
    precisions, pinned (`auto` would test fp32 on an AVX2-only CPU and bf16 on an AVX512-BF16 one)."""
    from slmtune.synthetic.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "wide", hidden=768, intermediate=2048, layers=4)
    peaks = {}
    for quant in ("none", "4bit"):
        recipe = make_recipe(tmp_path / quant, model, quant=quant, n=4)
        text = recipe.read_text().replace("batch_size: 4,", "batch_size: 1, max_steps: 2, "
                                          "gradient_checkpointing: true, track_tensor_memory: true,")
        recipe.write_text(text)
        pin_precision(recipe, precision)
        run_cli("train", recipe)
        metrics = json.loads((tmp_path / quant / "run" / "metrics.json").read_text())
        assert metrics["precision"]["used"] == precision
        peaks[quant] = metrics["peak_tensor_memory_mb"]
    width = {"fp32": 4, "bf16": 2}[precision]  # bytes per weight of the unquantized model's linear layers
    weights_mb = width * (4 * (2 * 768 * 768 + 2 * 768 * 384 + 3 * 768 * 2048)) / 2**20
    assert peaks["none"] > weights_mb, peaks  # the weights are counted (not hidden in mmap-ed pages)
    assert peaks["4bit"] < 0.6 * peaks["none"], peaks


def short_recipe(folder: Path, model: Path, blocks: str = "", lora: str = "", n: int = 4) -> Path:
    """A 2-step run (batch 2) on `n` records; `blocks` appends YAML sections, `lora` adds `lora:` keys."""
    recipe = make_recipe(folder, model, n=n)
    text = recipe.read_text().replace("batch_size: 4,", "batch_size: 2, max_steps: 2,")
    recipe.write_text(text.replace("dropout: 0.0}", f"dropout: 0.0, {lora}}}" if lora else "dropout: 0.0}") + blocks)
    return recipe


def as_full_fine_tune(recipe: Path) -> None:
    """`short_recipe`'s LoRA run made a full fine-tune (`method: full`, no `lora:` section)."""
    recipe.write_text(recipe.read_text().replace("lora: {r: 8, alpha: 16, dropout: 0.0}\n", "method: full\n"))


def test_tensorboard_by_default_holds_the_train_loss(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("train", short_recipe(tmp_path, tiny_model))
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run / "checkpoints" / "runs").exists(), "not transformers' default folder"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx(losses(run), rel=1e-6)


TRAINER_BLOCK = """\
trainer:
  optim: adamw_torch
  weight_decay: 0.1
  max_grad_norm: 0.5
  adam_beta2: 0.95
  lr_scheduler_kwargs: {num_cycles: 0.25}
  dataloader_num_workers: 0
  attn_implementation: eager
logging: {report_to: [], project: slmtune-tests}
"""


def test_trainer_block_reaches_training_arguments_and_trains(tiny_model, tmp_path):
    from slmtune.train.dataset import prepare
    from slmtune.train.trainer import _build_trainer

    path = short_recipe(tmp_path, tiny_model, TRAINER_BLOCK)
    path.write_text(path.read_text().replace("scheduler: constant", "scheduler: cosine"))
    recipe = load_recipe(path)
    trainer, _ = _build_trainer(recipe, prepare(recipe), tmp_path / "run" / "checkpoints")
    a = trainer.args
    assert (a.optim, a.weight_decay, a.max_grad_norm, a.adam_beta2) == ("adamw_torch", 0.1, 0.5, 0.95)
    assert a.lr_scheduler_kwargs == {"num_cycles": 0.25} and a.learning_rate == 2.0e-2
    assert a.report_to == [] and a.run_name == "tiny-weather" and a.project == "slmtune-tests"
    assert trainer.model.config._attn_implementation == "eager"
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} >= {0.1} and all(g["betas"] == (0.9, 0.95) for g in groups)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and all(h["grad_norm"] >= 0 and h["loss"] > 0 for h in logged)


@pytest.mark.parametrize("blocks, expected", [
    ("trainer: {wieght_decay: 0.1}\n", ["`trainer.wieght_decay`", "Did you mean `trainer.weight_decay`?"]),
    ("trainer: {weight_decay: lots}\n", ["`trainer.weight_decay`", "'lots'"]),
    ("trainer: {learning_rate: 0.1}\n", ["recipe.yaml:8", "`trainer.learning_rate`", "`train.lr`"]),
    ("logging: {report_to: [tensorbord]}\n", ["`logging.report_to`", "'tensorbord'", "'tensorboard'"]),
], ids=["unknown-key", "wrong-type", "owned-key", "unknown-tracker"])
def test_bad_trainer_or_logging_block_is_one_line(tiny_model, tmp_path, blocks, expected):
    result = CliRunner().invoke(app, ["train", str(short_recipe(tmp_path, tiny_model, blocks)), "--dry-run"])
    err = result.stderr.strip()
    assert result.exit_code == 1 and len(err.splitlines()) == 1 and "Traceback" not in result.output + err, err
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_bad_trainer_value_fails_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    import importlib.util

    import slmtune.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["train", str(short_recipe(tmp_path, tiny_model, "trainer: {optim: adamw_x}\n"))])
    assert result.exit_code == 1 and "`trainer:` (optim)" in result.stderr and "adamw_x" in result.stderr
    if importlib.util.find_spec("wandb") is None:
        result = CliRunner().invoke(app, ["train", str(short_recipe(tmp_path / "w", tiny_model,
                                                                    "logging: {report_to: [wandb]}\n"))])
        assert result.exit_code == 1 and "wandb is not installed" in result.stderr


def test_logging_project_fills_unset_tracker_variables(tiny_model, tmp_path, monkeypatch):
    import transformers.integrations

    from slmtune.train import options

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations",
                        lambda: ["tensorboard", "wandb", "mlflow"])
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "set-by-the-user")
    recipe = load_recipe(short_recipe(tmp_path, tiny_model, "logging: {report_to: [wandb, mlflow], project: p1, "
                                                            "run_name: r1}\n"))
    assert options.tracking_args(recipe) == {"report_to": ["wandb", "mlflow"], "run_name": "r1", "project": "p1"}
    assert os.environ["WANDB_PROJECT"] == "p1" and os.environ["MLFLOW_EXPERIMENT_NAME"] == "set-by-the-user"
    off = load_recipe(short_recipe(tmp_path / "off", tiny_model, "logging: {report_to: none}\n"))
    assert options.tracking_args(off)["report_to"] == [] and options.tracking_args(off)["run_name"] == "tiny-weather"


def test_dora_rslora_adapter_reloads_and_merges(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_cli("train", short_recipe(tmp_path, tiny_model, lora="use_dora: true, use_rslora: true"))
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert any("lora_magnitude_vector" in k for k in load_file(adapter / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    assert model.peft_config["default"].use_dora
    run_cli("merge", tmp_path / "run", "-o", tmp_path / "merged")
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < report["logit_tolerance"] and report["greedy_identical"]
    assert report["reload_greedy_identical"]


def test_all_assistant_trains_on_every_turn(tiny_model, tmp_path):
    """Three-turn records: `data.train_on: all_assistant` puts more tokens under the loss and trains."""
    recipe = short_recipe(tmp_path, tiny_model, lora="")
    recs = weather_records(4, seed=0)
    for rec in recs:
        system, user, call = rec["messages"]
        rec["messages"] = [system, {"role": "user", "content": "Hi!"},
                           {"role": "assistant", "content": "Hello, which city?"}, user, call]
    write_jsonl(tmp_path / "train.jsonl", recs)
    counts = {}
    for mode in ("last", "all_assistant"):
        run_cli("train", recipe, "--set", f"data.train_on={mode}", "--set", f"output.dir={tmp_path / mode}")
        m = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert m["global_step"] == 2 and m["final_train_loss"] > 0
        counts[mode] = m["target_tokens_per_epoch"]
    hello = len(build_tokenizer()("Hello, which city?<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert counts["all_assistant"] == counts["last"] + 4 * hello


def test_max_length_auto_fits_the_longest_record_and_leaves_out_what_is_over_the_cap(tmp_path):
    """`data.max_length: auto` (the default): no example is truncated; the window is the longest kept record rounded
    up to 64; a record longer than the CPU cap (2,048) is left out and listed."""
    from slmtune.io import write_jsonl
    from slmtune.recipe import load_recipe
    from slmtune.synthetic.tiny import build_tokenizer, weather_records
    from slmtune.train.dataset import prepare

    tok = tmp_path / "tok"
    build_tokenizer().save_pretrained(tok)
    (tok / "config.json").write_text('{"model_type": "llama"}')
    recs = weather_records(6, seed=2)
    long = {**recs[0], "id": "long", "messages": [{"role": "user", "content": "weather " * 3000},
                                                 *recs[0]["messages"][1:]]}
    write_jsonl(tmp_path / "train.jsonl", [*recs, long])
    (tmp_path / "r.yaml").write_text(f"name: t\nmodel: {{base: {tok}}}\ndata: {{train: train.jsonl}}\n"
                                     f"output: {{dir: {tmp_path / 'run'}}}\n")
    prep = prepare(load_recipe(tmp_path / "r.yaml"))
    lengths = [len(e.enc.input_ids) for e in prep.train]
    assert len(prep.train) == 6 and not any(e.enc.truncated for e in prep.train)
    assert prep.max_length % 64 == 0 and max(lengths) <= prep.max_length < max(lengths) + 64
    assert prep.left_out == (f"{tmp_path / 'train.jsonl'}:7",)


@pytest.mark.parametrize("packing", [False, True])
def test_records_and_packed_modes_train_with_packed_attention(tiny_model, tmp_path, packing):
    """Without shared prefixes: the default (`records`: batch_size records per optimizer step, run in forwards of
    at most max_length tokens) and `data.packing: true` (BFD bins) both train through packed attention; records
    mode takes n / batch_size steps per epoch, as TRL's padded batches would."""
    recipe = make_recipe(tmp_path, tiny_model)
    text = recipe.read_text().replace("max_length: 512, packing: true", f"packing: {str(packing).lower()}, "
                                      "prefix_sharing: off")
    recipe.write_text(text)
    # records of 359-397 tokens: two fit an 800-token forward, three do not
    run_cli("train", recipe, "--set", "train.epochs=1", "--set", "data.max_length=800")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["batching"]["mode"] == ("packing" if packing else "records")
    assert m["batching"]["attention"] == "packed (per sequence)"
    if not packing:
        assert m["global_step"] == 16 // 4 and m["max_length"] == 800
        assert m["batching"]["forwards"] == 16 // 2, m["batching"]  # each step's 4 records in 2 forwards
    assert_lora_trained(tmp_path / "run" / "adapter")


def test_full_fine_tune_trains_every_weight_and_evals_merges_exports(tiny_model, tmp_path):
    """`method: full`: model/ instead of adapter/, every weight moved, loss fell; eval, merge and export take it."""
    recipe = make_recipe(tmp_path, tiny_model)
    recipe.write_text(recipe.read_text().replace("lr: 2.0e-2", "lr: 1.0e-3") + "method: full\n")
    pin_precision(recipe, "fp32")  # bf16: test_full_fine_tune_trains_in_bf16
    run = tmp_path / "run"
    assert "model: " in run_cli("train", recipe).output
    assert not (run / "adapter").exists() and (run / "model" / "config.json").is_file()
    trained, base = load_file(run / "model" / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    moved = [k for k in base if k in trained and not torch.equal(base[k], trained[k])]
    assert len(moved) == len(base), sorted(set(base) - set(moved))
    assert losses(run)[-1] < losses(run)[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == "full" and manifest["lora"] is None
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_flops"] > 0

    out = tmp_path / "eval"
    run_cli("eval", "--model", run, "--data", tmp_path / "eval.jsonl", "-o", out)
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "tuned", "base"}
    preds = [json.loads(x) for x in (out / "predictions.jsonl").open()]
    assert any(p["outputs"]["tuned"] != p["outputs"]["base"] for p in preds), "the base row is the untuned model"

    merged = tmp_path / "merged"
    run_cli("merge", run, "-o", merged)
    merge = json.loads((merged / "merge_report.json").read_text())
    assert merge["max_abs_logit_diff"] == 0.0 and merge["reload_greedy_identical"]
    saved = load_file(merged / "model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "exports"), "--adapter-only"])
    assert result.exit_code != 0 and "no adapter to export" in result.output + (result.stderr or "")


@pytest.mark.parametrize("dtype, weights, prefix", [("auto", "float32", "auto"), ("auto", "float32", "off"),
                                                    ("bfloat16", "bfloat16", "auto")])
def test_full_fine_tune_trains_in_bf16(tiny_model, tmp_path, dtype, weights, prefix):
    """The other precision path of `method: full` (what `auto` picks on an AVX512-BF16 CPU): bf16 compute over fp32
    master weights with `model.dtype: auto` (a bf16 weight would round most small updates away), bf16 weights when
    the recipe asks for them. With prefix sharing off the packed rows go through train/attention.py's per-sequence
    attention, where autocast leaves q/k in fp32 (RoPE) and v in bf16 (BFCL's records take that path)."""
    recipe = make_recipe(tmp_path, tiny_model)
    text = recipe.read_text().replace("lr: 2.0e-2", "lr: 1.0e-3") + "method: full\n"
    text = text.replace("packing: true", f"packing: true, prefix_sharing: {prefix}")
    recipe.write_text(text.replace("scheduler: constant,", "scheduler: constant, precision: bf16,")
                      .replace("model: {base:", f"model: {{dtype: {dtype}, base:"))
    run_cli("train", recipe)
    ls = losses(tmp_path / "run")
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.05, ls
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["precision"]["used"] == "bf16" and m["precision"]["weights_dtype"] == weights
    assert (m["batching"]["attention"] == "packed (per sequence)") == (prefix == "off"), m["batching"]
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {str(t.dtype).removeprefix("torch.") for t in saved.values()} == {weights}
    assert not (tmp_path / "run" / "adapter").exists()


def test_full_fine_tune_refuses_a_quantized_base(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, quant="4bit")
    recipe.write_text(recipe.read_text() + "method: full\n")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code != 0 and "method: full" in (result.stderr or result.output)
    assert "Traceback" not in result.output


def test_a_recipe_naming_only_model_data_and_output_resolves_auto_and_writes_it(tiny_model, tmp_path):
    """`method`, `train.epochs` and `train.lr` default to `auto`: on the tiny model (far below 0.5 B parameters) and
    12 records that is a full fine-tune for 2 epochs at 1e-4, trained as such and written to the run's recipe."""
    write_jsonl(tmp_path / "train.jsonl", weather_records(12, seed=0))
    (tmp_path / "r.yaml").write_text(f"name: t\nmodel: {{base: {tiny_model}}}\ndata: {{train: train.jsonl}}\n"
                                     f"output: {{dir: {tmp_path / 'run'}}}\n")
    run_cli("train", tmp_path / "r.yaml")
    used = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert (used.method, used.train.epochs, used.train.lr) == ("full", 2.0, 1.0e-4)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["global_step"] == 6 and m["epochs"] == pytest.approx(2.0)  # 12 records / batch 4 × 2 epochs
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradients_are_zeroed_in_place_between_steps_not_reallocated(tiny_model, tmp_path, method):
    """keep_gradients: after each optimizer step the Trainer's zero_grad leaves every trained weight's gradient
    allocated (the same buffer, zeroed), so the next backward pass does not allocate them again."""
    from transformers import TrainerCallback

    from slmtune.train.dataset import prepare
    from slmtune.train.trainer import _build_trainer

    path = short_recipe(tmp_path, tiny_model)
    if method == "full":
        as_full_fine_tune(path)
    recipe = load_recipe(path)
    trainer, _ = _build_trainer(recipe, prepare(recipe), tmp_path / "run" / "checkpoints")
    assert hasattr(trainer.model, "peft_config") == (method == "lora")
    # a full fine-tune on the CPU keeps Adam's moments in 8 bits; LoRA keeps transformers' default optimizer
    assert (trainer.args.optim == "adamw_bnb_8bit") == (method == "full")
    seen = []

    class Grads(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
            assert grads and all(g is not None and not g.any() for g in grads)
            seen.append([g.data_ptr() for g in grads])

    trainer.add_callback(Grads())
    trainer.train()
    assert len(seen) == 2 and seen[0] == seen[1]


def test_trainer_block_optim_overrides_the_full_fine_tunes_8bit_adam(tiny_model, tmp_path):
    from slmtune.train.dataset import prepare
    from slmtune.train.trainer import _build_trainer

    path = short_recipe(tmp_path, tiny_model, "trainer: {optim: adamw_torch_fused}\n")
    as_full_fine_tune(path)
    recipe = load_recipe(path)
    trainer, _ = _build_trainer(recipe, prepare(recipe), tmp_path / "run" / "checkpoints")
    assert trainer.args.optim == "adamw_torch_fused"
