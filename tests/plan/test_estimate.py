"""The LoRA / QLoRA memory estimator against known figures, and the planner against every budget."""

import pytest

from slmtune.plan.catalog import CATALOG, lookup
from slmtune.plan.estimate import GiB, Setup, estimate, lora_params, weight_bytes
from slmtune.plan.planner import GPUS, budget_bytes, choose, fit_model

REQUIRED = ["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "llama3.2-1b",
            "llama3.2-3b", "gemma3-270m", "gemma3-1b", "phi4-mini", "nemotron-nano-9b-v2"]


def test_weight_bytes_known_figures():
    assert 0.5e9 <= weight_bytes(1e9, "4bit") <= 0.7e9  # NF4 + double quant: 4.127 bits/param
    assert weight_bytes(1e9, "8bit") == 1e9
    assert weight_bytes(1e9, "none") == 2e9  # bf16
    assert weight_bytes(1e9, "none", fp32=True) == 4e9


def test_llama_3_2_1b_figures():
    spec = CATALOG["llama3.2-1b"]
    # PEFT reports 11,272,192 trainable parameters for r=16 on all linear layers of Llama-3.2-1B.
    assert lora_params(spec.arch, 16) == 11_272_192
    est = estimate(spec.arch, Setup("none", batch_size=1, max_length=512))
    assert est.weights == pytest.approx(2.47e9, rel=0.01)  # 1.236B params × 2 B
    q = estimate(spec.arch, Setup("4bit", batch_size=1, max_length=512))
    # 4-bit blocks (0.97B × 0.516 B ≈ 0.50 GB) + the bf16 tied embedding (128256 × 2048 × 2 B ≈ 0.53 GB)
    assert q.weights == pytest.approx(1.03e9, rel=0.03)


def test_activations_scale_and_checkpointing_saves():
    arch = CATALOG["qwen3-1.7b"].arch
    one = estimate(arch, Setup(batch_size=1, max_length=512))
    assert estimate(arch, Setup(batch_size=4, max_length=512)).activations == pytest.approx(4 * one.activations)
    assert estimate(arch, Setup(batch_size=1, max_length=1024)).activations == pytest.approx(2 * one.activations)
    ck = estimate(arch, Setup(batch_size=1, max_length=512, grad_ckpt=True))
    assert ck.activations < one.activations / 5
    assert ck.logits == one.logits and ck.weights == one.weights


def test_catalog_has_the_models_and_consistent_figures():
    assert set(REQUIRED) <= set(CATALOG)
    for key, spec in CATALOG.items():
        a = spec.arch
        assert spec.context >= 8192 and spec.licence and spec.hf_id
        if key == "nemotron-nano-9b-v2":
            continue  # hybrid Mamba: its shapes do not follow the attention+MLP count below
        shapes = a.layers * (2 * a.hidden * a.heads * a.head_dim + 2 * a.hidden * a.kv_heads * a.head_dim
                             + 3 * a.hidden * a.intermediate) + a.embedding_params
        assert shapes == pytest.approx(a.params, rel=0.03), key  # catches a mistyped layer count or width
    assert lookup("smollm2-135m").base == "smollm2-135m"
    assert lookup("Qwen/Qwen3-4B").key == "qwen3-4b"


@pytest.mark.parametrize("gpu", list(GPUS))
def test_every_model_on_every_gpu_is_within_budget_or_refused(gpu):
    budget = budget_bytes(gpu)
    fitted = 0
    for spec in CATALOG.values():
        for max_length in (256, 1024, 4096):
            fit = fit_model(spec, max_length, gpu)
            if fit is None:
                smallest = Setup("none" if gpu == "cpu" or spec.gguf else "4bit", gpu == "cpu", 16, 1,
                                 min(max_length, spec.context), True)
                assert estimate(spec.arch, smallest).total > budget
                continue
            fitted += 1
            assert fit.est.total <= budget, (spec.key, gpu, max_length)
            assert fit.est.total == pytest.approx(estimate(spec.arch, fit.setup).total)
    assert fitted > 0
    for category in ("tool_calling", "extraction", "classification", "summarization", "coding", "generation"):
        fit = choose(category, 1024, gpu, None)
        assert fit.est.total <= budget
        if gpu == "cpu":
            assert fit.spec.key == "smollm2-135m" and fit.setup.fp32


def test_budgets_and_big_models():
    assert budget_bytes("24gb") == pytest.approx(24 * GiB * 0.9 - 0.5 * GiB)
    assert fit_model(CATALOG["nemotron-nano-9b-v2"], 1024, "8gb") is None  # 9B does not train in 8 GB
    fit = fit_model(CATALOG["nemotron-nano-9b-v2"], 1024, "48gb")
    assert fit is not None and fit.setup.quantization == "none"
    fit = fit_model(CATALOG["qwen3-4b"], 1024, "8gb")
    assert fit is not None and fit.setup.quantization == "4bit"  # QLoRA is what makes 4B fit 8 GB
