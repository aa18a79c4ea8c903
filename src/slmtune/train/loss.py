"""The training loss slmtune computes for every batch: cross-entropy on target tokens, logits only where needed.

Plain SFT losses (transformers', TRL's) run the LM head over every position and then mask most of it away. On a
small model that head is a large share of the work and, worse, of the memory: SmolLM2's is 576 × 49,152, so each
position's logits are 196 kB in fp32 and a loss pass keeps several such tensors per position (TRL's CPU path of
its fused head holds ~8 buffers of positions × 32,768 — about 1.1 GB for one 1,047-token example, more than the
model's weights and its checkpointed activations together). Here the head runs only at positions whose next
token carries a label (`logits_to_keep` with explicit indices), typically a few percent of the sequence in agent
traffic, so logits cost almost nothing — for padded, padding-free packed and shared-prefix batches alike:

    padded / packed:  model(input_ids, attention_mask | position_ids …, logits_to_keep=target positions)
    shared prefix:    the prefix runs once with a KV cache, broadcast to the batch (see slmtune.train.prefix)

Even at target positions the logits are never held whole: the backbone's hidden states at those positions go
through `chunked_head_ce`, which computes the LM head, the cross-entropy and its gradient with respect to the hidden
states chunk by chunk in the forward pass (the head is frozen under LoRA, so that gradient is all backward needs)
and keeps only the `[targets × hidden]` gradient — peak extra memory one chunk of `CHUNK_LOGITS` logits, whatever
the number of targets (a 900-token summary target in a batch of 4 would otherwise hold 4 × 900 × 49,152 fp32
logits = 700 MB, twice over through log-softmax and its gradient). On CUDA, Liger Kernel's fused linear
cross-entropy does the same in Triton when installed. Models whose head is trained, biased, soft-capped or scaled
(`final_logit_softcapping`, `logit_scale`) take the plain path: the model's own head at target positions.

The result equals the full-logits loss (tested, with gradients); it is normalised like TRL's (sum over target
tokens / `num_items_in_batch` when the Trainer passes it, else the batch's own count).
"""

from __future__ import annotations

SKIP = ("labels", "prefix_ids")
CHUNK_LOGITS = 1 << 24  # logits per chunk (64 MB in fp32): 341 target rows of a 49,152-token vocabulary


def target_loss(model, inputs: dict, num_items_in_batch=None):
    """Mean cross-entropy over the target tokens of one batch (a `prefix_ids` entry: shared-prefix batch)."""
    import torch
    import torch.nn.functional as F

    ids, labels = inputs["input_ids"], inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k not in SKIP}
    prefix = inputs.get("prefix_ids")
    if prefix is not None and prefix.shape[1] > 0:
        batch, p = ids.shape[0], prefix.shape[1]
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch)  # a differentiable copy: gradients reach the prefix once per example
        kwargs |= {"past_key_values": cache, "use_cache": True,
                   "position_ids": torch.arange(p, p + ids.shape[1], device=ids.device).expand(batch, -1)}
    else:
        kwargs["use_cache"] = False
    # Position j predicts token j+1: keep only positions whose next token is a target.
    next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    keep = (next_labels != -100).any(dim=0).nonzero().flatten()
    target = next_labels[:, keep]
    head = fusable_head(model)
    if head is None:
        logits = model(**kwargs, logits_to_keep=keep).logits.float()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                reduction="sum")
    else:
        backbone, weight = head
        hidden = backbone(**kwargs).last_hidden_state[:, keep]
        valid = target.reshape(-1) != -100
        total = chunked_head_ce(hidden.reshape(-1, hidden.shape[-1])[valid], weight, target.reshape(-1)[valid])
    n = (target != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(n, device=total.device).clamp(min=1)


def fusable_head(model):
    """(backbone, frozen LM-head weight) when the loss may bypass the model's head, else None (see module doc)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    config = getattr(base, "config", None)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if head is None or backbone is None or backbone is base or type(head).__name__ != "Linear":
        return None
    if getattr(head, "bias", None) is not None or head.weight.requires_grad:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return backbone, head.weight


def chunked_head_ce(hidden, weight, target):
    """Σ cross-entropy(hidden @ weightᵀ, target) over rows, one chunk of logits at a time (gradient to `hidden`
    only; the head is frozen). Liger Kernel's fused kernel on CUDA when installed."""
    if hidden.is_cuda and _liger_flce() is not None:
        return _liger_flce()(weight, hidden, target)
    return _ChunkedHeadCE.apply(hidden, weight, target, max(1, CHUNK_LOGITS // weight.shape[0]))


def _liger_flce():
    global _LIGER
    if _LIGER is False:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            _LIGER = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        except ImportError:
            _LIGER = None
    return _LIGER


_LIGER = False


def _ce_function():
    import torch

    class ChunkedHeadCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, target, rows):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for s in range(0, hidden.shape[0], rows):
                logits = (hidden[s:s + rows] @ weight.T).float()
                t = target[s:s + rows]
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
                if grad is not None:  # d(lse - logit_t)/d logits = softmax - onehot, then through the head
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    grad[s:s + rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return (grad * g.to(grad.dtype) if grad is not None else None), None, None, None

    return ChunkedHeadCE


class _Lazy:
    """`_ChunkedHeadCE.apply` without importing torch at module import."""

    fn = None

    def apply(self, *args):
        if _Lazy.fn is None:
            _Lazy.fn = _ce_function()
        return _Lazy.fn.apply(*args)


_ChunkedHeadCE = _Lazy()
