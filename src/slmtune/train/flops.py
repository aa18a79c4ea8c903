"""Model FLOPs utilisation: how close a training run gets to what the device can do.

Peak: measured, not looked up — a square matmul in the training dtype (`peak_flops`), the best of a few runs.
Work: LoRA leaves the base frozen, so per token that passes through a linear layer of `n` weights it costs
2n FLOPs forward + 2n backward (gradients w.r.t. the inputs, to reach earlier adapters); the adapters' own
weight gradients are ~r/d of that and ignored. Full fine-tuning (`method: full`) adds the weight gradients:
6n. Attention scores are ignored too (4·L·d·ctx per token: ~5% for SmolLM2 at 300 tokens). The LM head is
counted only where logits are computed.

    SmolLM2-135M: 30 layers × (4·576² + 3·576·1536 + … ) ≈ 106M linear weights → 4 × 106M ≈ 0.42 GFLOP/token
"""

from __future__ import annotations

import time


def linear_weights(model) -> tuple[int, int]:
    """(weights in the transformer's linear layers, weights in the LM head)."""
    import torch

    head = model.get_output_embeddings()
    head_n = head.weight.numel() if head is not None else 0
    total = 0
    for module in model.modules():
        if module is head:
            continue
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            n = module.in_features * module.out_features if hasattr(module, "in_features") else w.numel()
            total += n
    return total, head_n


def training_flops(n_linear: int, n_head: int, token_passes: int, logit_positions: int, full: bool = False) -> float:
    per = 6.0 if full else 4.0
    return per * n_linear * token_passes + per * n_head * logit_positions


def peak_flops(dtype, device: str = "cpu", size: int = 1024, repeats: int = 6) -> float:
    """Best-of-`repeats` FLOP/s of a `size`² matmul in `dtype` on `device` (~0.1–1 s on a CPU)."""
    import torch

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best
