"""Attention for padding-free packed batches without a dense mask: each packed sequence attends causally to itself.

TRL's padding-free packing lays a batch's sequences end to end in one row (`position_ids` restart at 0 for each,
`cu_seq_lens_q` holds their boundaries). FlashAttention reads those boundaries; every other kernel gets a dense
block-diagonal `[tokens × tokens]` mask from transformers, and on the CPU (or without flash-attn on a GPU) SDPA
then takes its math path: it materialises the `[heads × tokens × tokens]` attention weights of every layer and keeps
them for the backward pass. For one batch of four 2,048-token bins on SmolLM2 (9 heads) that is 2 GB per layer and
tens of GB per step; it also computes attention between sequences that the mask then throws away.

`packed_sdpa` runs `scaled_dot_product_attention(is_causal=True)` once per packed sequence instead: no mask, so SDPA
uses its fused (flash) kernel on the CPU and on CUDA, memory linear in the tokens, and attention work
Σ len² instead of (Σ len)². It is registered with transformers' `AttentionInterface` as `slmtune_packed`, with
FlashAttention's mask rule (no mask unless there is padding); `use_packed_attention(model)` switches a model to it
for training and `restore` switches back before saving. Rows without boundaries (padding, generation with a KV
cache) fall back to transformers' own SDPA path with a mask built from the 2-D padding mask.
"""

from __future__ import annotations

from functools import cache

NAME = "slmtune_packed"
_registered = False


def packed_sdpa(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers attention-function signature: q/k/v `[batch, heads, tokens, dim]` → (`[batch, tokens, heads,
    dim]`, None)."""
    import torch
    import torch.nn.functional as F

    bounds = _boundaries(query, key, attention_mask, kwargs)
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, _dense(attention_mask, query, key), scaling=scaling,
                                      dropout=dropout, **kwargs)
    # Under autocast with fp32 master weights (a full fine-tune in bf16) q and k leave RoPE in fp32 while v leaves
    # its projection in bf16: the fused kernels want one dtype, the one autocast computes in.
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # grouped-query attention: SDPA reads each k/v head for its group of q heads (no repeated copies kept)
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    p = dropout if module.training else 0.0
    spans = zip(bounds[:-1], bounds[1:], strict=True)
    if p == 0.0 and query.device.type == "cpu" and torch.is_grad_enabled():
        parts = [_flash_cpu().apply(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scaling) for s, e in spans]
    else:
        parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                                dropout_p=p, scale=scaling, **gqa) for s, e in spans]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


@cache
def _flash_cpu():
    """Causal attention on the CPU for training: the flash kernel forward (on k/v repeated per query head under
    grouped-query attention, keeping only the unrepeated k/v for backward) and, in bf16, `causal_backward_bf16`.

    The CPU kernel's backward is ~20 % slower with `enable_gqa` than on repeated heads (35 vs 28 ms per SmolLM2 layer
    at 673 tokens); repeating inside the function gets that speed without keeping the repeated copies (47 MB more
    per 1,024-token record across 30 layers). In fp32 the kernel's own backward runs."""
    import torch

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    class FlashCpu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale):
            group = q.shape[1] // k.shape[1]
            out, lse = flash(q, *_per_query_head(k, v, group), 0.0, True, scale=scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.scale, ctx.group = scale, group
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            scale = ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5
            if q.dtype == torch.bfloat16 and q.shape[0] == 1:
                dq, dk, dv = causal_backward_bf16(grad, q, k, v, out, lse, scale)
                return dq, dk, dv, None
            g = ctx.group
            dq, dk, dv = flash_bwd(grad.contiguous(), q, *_per_query_head(k, v, g), out, lse, 0.0, True,
                                   scale=ctx.scale)
            if g > 1:
                b, h, t, d = dk.shape
                dk, dv = dk.view(b, h // g, g, t, d).sum(2), dv.view(b, h // g, g, t, d).sum(2)
            return dq, dk, dv, None

    return FlashCpu


def _per_query_head(k, v, group: int):
    """k and v repeated for each of the `group` query heads that share them (as they are when group is 1)."""
    return (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


BLOCK = 128  # query rows per step of causal_backward_bf16 (per query head): 64 and 256 measured slower at 300–948


def causal_backward_bf16(grad, q, k, v, out, lse, scale: float):
    """Gradients of causal attention `softmax(scale·q·kᵀ + causal mask)·v` in bf16 from the forward's `out` and
    `lse` (its fp32 log-sum-exp per query row), by blocks of query rows, every product one batched bf16 matmul.

    Why: the CPU flash kernel's bf16 backward runs its small-block gemms at ~17 % of the matmul peak (7.8 ms for one
    SmolLM2 layer at 600 tokens, 6.5× its forward): 27 % of a LoRA step on an AVX512-BF16 CPU. Here each block of
    128 rows (× the query heads sharing a k/v head, so grouped-query attention needs no repeated k/v) takes five
    batched matmuls and two elementwise passes over the block's probabilities: 1.2–1.5× faster at 300–948 tokens
    (an ad-hoc microbenchmark; the bench_train figures are in README).

    Precision: a bf16 matmul returns bf16, so the log-probabilities `scale·q·k − lse` cannot be formed in fp32 as
    the kernel does. They come out of one matmul instead, the subtraction done inside its fp32 accumulation (each
    row's −lse/scale, split into three bf16 parts, is three extra columns of q against columns of ones in k), so
    each is rounded once, relative to its own size: the largest probabilities (log-probability near 0) keep nearly
    fp32 accuracy, a probability p gets a relative error of ~|ln p|·2⁻⁹. `dP − Δ` (Δ = rowsum(dO·O)) is formed the
    same way. Gradient error against fp64 (random q, k, v; tests/train/test_bins.py bounds it at 1 %): 0.6–0.7 % of
    the gradient's norm, the kernel's 0.25–0.55 %; the held-out loss of a bench_train run is unchanged (see README)."""
    import torch

    _, h, n, d = q.shape
    kv = k.shape[1]
    g = h // kv
    bf = torch.bfloat16
    e = d + 4  # + 3 columns for the fp32 bias parts, + 1 zero column (an even inner size for the bf16 kernels)
    delta = (grad[0].float() * out[0].float()).sum(-1)  # [h, n]
    qe = q.new_zeros(kv, g, n, e)
    qe[..., :d] = q[0].unflatten(0, (kv, g))
    qe[..., d:d + 3] = _bf16_parts(-lse[0] / scale).unflatten(0, (kv, g))
    ge = q.new_zeros(kv, g, n, e)
    ge[..., :d] = grad[0].unflatten(0, (kv, g))
    ge[..., d:d + 3] = _bf16_parts(-delta).unflatten(0, (kv, g))
    ke, ve = k.new_zeros(kv, n, e), v.new_zeros(kv, n, e)
    ke[..., :d], ve[..., :d] = k[0], v[0]
    ke[..., d:d + 3] = ve[..., d:d + 3] = 1
    dq = torch.empty(kv, g, n, d, dtype=bf)
    dk = torch.zeros(kv, n, d, dtype=torch.float32)
    dv = torch.zeros(kv, n, d, dtype=torch.float32)
    zero = torch.zeros((), dtype=bf)
    for s in range(0, n, BLOCK):
        t = min(s + BLOCK, n)
        rows = g * (t - s)
        p = torch.baddbmm(zero, qe[:, :, s:t].reshape(kv, rows, e), ke[:, :t].transpose(1, 2), beta=0, alpha=scale)
        p.exp_()  # probabilities, [kv, g·rows, t]
        p.view(kv, g, t - s, t)[..., s:].masked_fill_(torch.ones(t - s, t - s, dtype=torch.bool).triu_(1), 0)
        ds = torch.bmm(ge[:, :, s:t].reshape(kv, rows, e), ve[:, :t].transpose(1, 2)).mul_(p)  # P·(dP − Δ)
        dv[:, :t] += torch.bmm(p.transpose(1, 2), ge[:, :, s:t, :d].reshape(kv, rows, d))
        dk[:, :t] += torch.bmm(ds.transpose(1, 2), qe[:, :, s:t, :d].reshape(kv, rows, d))
        dq[:, :, s:t] = torch.bmm(ds, k[0, :, :t]).view(kv, g, t - s, d)
    dq = dq.view(1, h, n, d).mul_(scale)
    return dq, dk.mul_(scale).to(bf)[None], dv.to(bf)[None]


def _bf16_parts(x):
    """fp32 `x` as three bf16 tensors (stacked last) whose fp32 sum is `x` to ~2⁻²⁴ relative."""
    import torch

    hi = x.to(torch.bfloat16)
    rest = x - hi.float()
    mid = rest.to(torch.bfloat16)
    return torch.stack([hi, mid, (rest - mid.float()).to(torch.bfloat16)], -1)


def _boundaries(query, key, attention_mask, kwargs) -> list[int] | None:
    """Start offsets of the packed sequences (+ the end), or None when this is not a one-row, mask-free batch."""
    n = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != n or attention_mask is not None:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        b = [int(x) for x in cu.tolist()]
        return b if b[0] == 0 and b[-1] == n else None
    pos = kwargs.get("position_ids")
    if pos is None:
        return [0, n]
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    return [*(starts if starts and starts[0] == 0 else [0, *starts]), n]


def _dense(attention_mask, query, key):
    """A 2-D padding mask (FlashAttention's mask rule) as the 4-D boolean causal mask SDPA takes."""
    import torch

    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    q, k = query.shape[2], key.shape[2]
    causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    _registered = True


def use_packed_attention(model) -> str:
    """Switch `model` (and its sub-configs) to `packed_sdpa`; returns the implementation it had."""
    register()
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return before


def restore(model, implementation: str) -> None:
    model.set_attn_implementation(implementation)
