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

The result equals the full-logits loss (tested, with gradients); it is normalised like TRL's (sum over target
tokens / `num_items_in_batch` when the Trainer passes it, else the batch's own count).
"""

from __future__ import annotations

SKIP = ("labels", "prefix_ids")


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
    logits = model(**kwargs, logits_to_keep=keep).logits.float()
    target = next_labels[:, keep]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    n = (target != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(n, device=total.device).clamp(min=1)
