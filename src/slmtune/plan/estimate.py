"""Training memory for LoRA / QLoRA: weights, adapter + optimizer state, activations and logits.

Every figure is bytes; `Estimate.lines` shows the arithmetic for the recipe header. The terms:

- weights:      bf16 = 2 B/param, fp32 = 4 B (CPU runs), 8-bit = 1 B, 4-bit NF4 with double quantization
                = 4.127 bits = 0.516 B/param (4 bits + a 1/64 fp8 absmax + 1/16384 fp32 second-level constant).
                bitsandbytes quantizes only the Linear layers inside the blocks: embeddings (and an untied head)
                stay bf16.
- LoRA:         r·(in+out) params per adapted Linear (all-linear: q, k, v, o, gate, up, down), kept in fp32 by
                PEFT; with its gradient and AdamW's two moments that is 4+4+8 = 16 B per LoRA param.
- activations:  what autograd keeps per token per layer (elements, × 2 B in bf16 / 4 B in fp32):
                attention 5h + 3q + 2kv (block input, norm out, 3 dropout copies feeding the q/k/v adapters, q,
                k, v, attention out, its dropout copy; q = heads·head_dim, kv = kv_heads·head_dim; SDPA keeps no
                s×s attention matrix) and MLP 4h + 5I (input, norm out, 2 dropout copies, gate, up, act(gate),
                gate·up, its dropout copy). With gradient checkpointing only each block's input (h) is kept,
                plus one block's full set while it is recomputed.
- logits:       tokens × vocab × (2 + 4 + 4) B: bf16 logits, their fp32 upcast for the loss, the fp32 gradient
                (fp32 runs: 4 + 4 + 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3
NF4_BYTES_PER_PARAM = 4.127 / 8
WEIGHT_BYTES = {"none": 2.0, "8bit": 1.0, "4bit": NF4_BYTES_PER_PARAM}
QUANT_NAMES = {"none": "bf16", "8bit": "int8", "4bit": "nf4"}
LORA_BYTES_PER_PARAM = 16  # fp32 weight 4 + fp32 grad 4 + AdamW exp_avg 4 + exp_avg_sq 4
FULL_STATE_BYTES_PER_PARAM = 12  # full fine-tune, beyond the weights: fp32 grad 4 + exp_avg 4 + exp_avg_sq 4


@dataclass(frozen=True)
class Arch:
    """The figures of a decoder that the estimate needs (from the model's config.json)."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def block_params(self) -> int:
        return max(0, self.params - self.embedding_params)


@dataclass(frozen=True)
class Setup:
    """How the model is trained: quantization, dtype, LoRA rank, micro-batch and sequence length."""

    quantization: str = "none"  # none | 8bit | 4bit
    fp32: bool = False  # CPU runs keep fp32 weights and activations
    lora_r: int = 16
    batch_size: int = 1
    max_length: int = 512
    grad_ckpt: bool = False
    full: bool = False  # full fine-tuning: every weight gets a gradient and Adam states (no LoRA)


@dataclass(frozen=True)
class Estimate:
    weights: float
    lora: float
    activations: float
    logits: float
    lines: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.logits


def weight_bytes(params: float, quantization: str = "none", fp32: bool = False) -> float:
    """Bytes of `params` weights stored at a precision (4bit ≈ 0.516 B/param: 1e9 params ≈ 0.52 GB)."""
    if fp32 and quantization == "none":
        return params * 4.0
    return params * WEIGHT_BYTES[quantization]


def lora_params(arch: Arch, r: int) -> int:
    """LoRA parameters for all-linear targets: r·(in + out) summed over q, k, v, o, gate, up, down per block."""
    q, kv, h, i = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.hidden, arch.intermediate
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_layer * arch.layers


def activation_elems_per_token_layer(arch: Arch) -> int:
    """Elements autograd keeps per token per block without checkpointing (see the module docstring)."""
    q, kv, h, i = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.hidden, arch.intermediate
    return (5 * h + 3 * q + 2 * kv) + (4 * h + 5 * i)


def estimate(arch: Arch, s: Setup) -> Estimate:
    """Peak training memory of `arch` under setup `s`, with the arithmetic as text lines."""
    act_b = 4 if s.fp32 else 2
    tokens = s.batch_size * s.max_length
    master = s.fp32 or s.full  # a full fine-tune keeps fp32 master weights (bf16 autocast computes)
    emb_b = 4 if master else 2
    w = weight_bytes(arch.block_params, s.quantization, master) + arch.embedding_params * emb_b
    n_lora = lora_params(arch, s.lora_r)
    # the trainable state: the adapters' (weights, grads, Adam), or a full fine-tune's grad + Adam for every weight
    lora = arch.params * FULL_STATE_BYTES_PER_PARAM if s.full else n_lora * LORA_BYTES_PER_PARAM
    per_layer = activation_elems_per_token_layer(arch)
    if s.grad_ckpt:
        acts = tokens * act_b * (arch.hidden * arch.layers + per_layer)
        act_txt = f"{tokens} tok × {act_b} B × (h·{arch.layers} layers + one block {per_layer:,})"
    else:
        acts = tokens * act_b * per_layer * arch.layers
        act_txt = f"{tokens} tok × {act_b} B × {per_layer:,} elems × {arch.layers} layers"
    logit_b = act_b + 8
    logits = tokens * arch.vocab * logit_b
    wq = "fp32 4 B" if master and s.quantization == "none" else \
        f"{QUANT_NAMES[s.quantization]} {WEIGHT_BYTES[s.quantization]:.3g} B"
    lines = [
        f"weights      {arch.block_params / 1e6:,.0f}M block params × {wq} + "
        f"{arch.embedding_params / 1e6:,.0f}M embedding × {emb_b} B = {fmt_gib(w)}",
        f"optimizer    {arch.params / 1e6:,.0f}M params (full fine-tune) × 12 B (fp32 grad+2 Adam) = "
        f"{fmt_gib(lora)}" if s.full else
        f"lora         {n_lora / 1e6:,.1f}M params (r={s.lora_r}, all-linear) × 16 B (fp32 w+grad+2 Adam) = "
        f"{fmt_gib(lora)}",
        f"activations  {act_txt} = {fmt_gib(acts)}",
        f"logits       {tokens} tok × {arch.vocab:,} vocab × {logit_b} B = {fmt_gib(logits)}",
    ]
    est = Estimate(w, lora, acts, logits, lines)
    est.lines.append(f"total        {fmt_gib(est.total)}")
    return est


def fmt_gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"
