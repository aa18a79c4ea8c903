"""The fused SiLU-gate product: same values and gradients as the MLP run op by op, fewer tensors kept."""

import pytest
import torch

from slmtune.train.fused import SiluMul, fuse_mlps, unfuse_mlps


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_silu_mul_matches_autograd_values_and_gradients(dtype, tol):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 17, 40, generator=g) * 4).to(dtype).requires_grad_()
    up = torch.randn(3, 17, 40, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(3, 17, 40, generator=g).to(dtype)
    ref = torch.nn.functional.silu(gate) * up
    ref_gate, ref_up = torch.autograd.grad(ref, (gate, up), grad)
    got = SiluMul.apply(gate, up)
    got_gate, got_up = torch.autograd.grad(got, (gate, up), grad)
    for a, b in ((got, ref), (got_gate, ref_gate), (got_up, ref_up)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for the backward pass of `fn()`, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _lora_model(tiny_model, dtype=torch.float32, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                            **lora))


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


IDS = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))


def test_fused_lora_model_equals_unfused_and_keeps_less(tiny_model):
    model, ids = _lora_model(tiny_model), IDS

    def step():
        return _loss_and_grads(model, ids)

    ref_loss, ref_grads = step()
    ref_saved = _saved_bytes(lambda: model(input_ids=ids, use_cache=False))
    n_layers = model.config.num_hidden_layers
    assert fuse_mlps(model) == n_layers
    assert fuse_mlps(model) == 0  # already fused: nothing patched twice
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert ref_grads.keys() == grads.keys() and any("gate_proj" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    saved = _saved_bytes(lambda: model(input_ids=ids, use_cache=False))
    one = ids.numel() * model.config.intermediate_size * 4  # one fp32 [tokens × intermediate] tensor
    assert ref_saved - saved >= n_layers * one  # the SiLU output is no longer kept, in every layer

    unfuse_mlps(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    loss, _ = step()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)


def _env_after(code: str, env: dict) -> str:
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_training_processes_ask_torch_for_huge_page_allocations_before_importing_it():
    show = "import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'), {})"
    # importing slmtune.train (what `slmtune train` does) switches it on before torch's first allocation
    assert _env_after("import slmtune.train; import torch; " + show.format(0), {}) == "1 0"
    assert _env_after("import slmtune.train; " + show.format(0), {"THP_MEM_ALLOC_ENABLE": "0"}) == "0 0"  # user's
    # too late once torch is in: left alone, and reported as off
    code = "import torch; from slmtune.device import huge_page_allocations as h; " + show.format("h()")
    assert _env_after(code, {}) == "None False"


@pytest.mark.parametrize("dtype, use_dora, autocast, tol", [
    (torch.float32, False, False, 1e-5),  # the in-place addmm_ path
    (torch.float32, True, False, 1e-5),  # DoRA: peft's own forward
    (torch.bfloat16, False, False, 2e-2),  # fp32 adapters on a bf16 base: the low-rank term in bf16, in place
    (torch.float32, False, True, 2e-2),  # bf16 autocast (`precision: bf16`): the out-of-place addmm path
])
def test_fused_lora_equals_peft_values_and_gradients(tiny_model, dtype, use_dora, autocast, tol):
    from slmtune.train.fused import fuse_lora, unfuse_lora

    model, ids = _lora_model(tiny_model, dtype, use_dora=use_dora), IDS
    if dtype == torch.bfloat16:  # peft keeps fp32 adapters on a bf16 base: the mixed-dtype path
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_B["default"].weight.dtype == torch.float32

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _loss_and_grads(model, ids)

    ref_loss, ref_grads = step()
    n = fuse_lora(model)
    assert n == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down in every layer
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss, atol=tol / 10, rtol=tol / 10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=tol, rtol=tol * 10, msg=name)
        assert grad.dtype == ref_grads[name].dtype, name  # fp32 adapters get fp32 gradients on a bf16 base too
    with model.disable_adapter():  # peft's own path: the base model alone
        base = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert not torch.isclose(base, loss)
    unfuse_lora(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("x_dtype, w_dtype, tol", [
    (torch.float32, torch.float32, 1e-5),  # fp32 throughout
    (torch.bfloat16, torch.bfloat16, 2e-2),  # bf16 weights (LoRA on a bf16 base)
    (torch.bfloat16, torch.float32, 2e-2),  # fp32 master weights under bf16 autocast (a full fine-tune)
])
def test_fused_rmsnorm_matches_llamas_values_and_gradients(x_dtype, w_dtype, tol):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slmtune.train.fused import fuse_norms, unfuse_norms

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(w_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x0 = (torch.randn(2, 7, 64) * 3).to(x_dtype)

    def run():
        x = x0.clone().requires_grad_()
        norm.weight.grad = None
        y = norm(x)
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        assert torch.equal(x.detach(), x0)  # the input is left as it was (fp32: no in-place scaling of it)
        return y, x.grad, norm.weight.grad

    ref = run()
    assert fuse_norms(torch.nn.Sequential(norm)) == 1
    got = run()
    unfuse_norms(norm)
    assert "forward" not in norm.__dict__
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_fusions_survive_train_and_eval_mode_switches(tiny_model):
    """transformers 5 "kernelizes" hub-kernel layers (RMSNorm) on every train()/eval() of a model loaded with hub
    kernels on, resetting their forward: training loads with them off, so the fused forwards stay for the run."""
    from peft import LoraConfig, get_peft_model

    from slmtune.models import BaseRef, load_model
    from slmtune.train.fused import RMSNormFn, fuse_lora, fuse_norms

    model = load_model(BaseRef(path=str(tiny_model), gguf_file=None, name="tiny"))
    n_layers = model.config.num_hidden_layers
    assert fuse_norms(model) == 2 * n_layers + 1 and fuse_mlps(model) == n_layers
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert fuse_lora(model) > 0
    model.eval()
    model.train()  # what the Trainer does at every step
    norm = model.base_model.model.model.layers[0].input_layernorm
    out = norm(torch.randn(1, 3, model.config.hidden_size, requires_grad=True))
    assert type(out.grad_fn).__name__ == f"{RMSNormFn.__name__}Backward"
    mlp = model.base_model.model.model.layers[0].mlp
    assert "forward" in mlp.__dict__
