"""slmtune's loss (logits only at target positions) equals the full-logits loss on padded and packed batches."""

import torch

from slmtune.render import encode, make_renderer
from slmtune.synthetic.tiny import build_tokenizer, weather_records
from slmtune.train.loss import target_loss


def _model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False))
    return model.train()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check(model, ours, reference):
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    g_ours, g_ref = _grads(model, ours), _grads(model, reference)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_ours[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_and_packed_batches_match_full_logits_loss(tiny_model):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model(tiny_model)
    encs = [encode(make_renderer(build_tokenizer()), rec, 4096) for rec in weather_records(4, seed=3)]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encs]
    n_targets = sum(sum(x != -100 for x in e.labels[1:]) for e in encs)

    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    reference = model(**padded, use_cache=False).loss  # transformers: full logits, shifted, masked mean
    _check(model, target_loss(model, padded), reference)

    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    ours = target_loss(model, packed)
    # the packed sequence's examples must not see each other: equal to the examples run one by one
    per_example = sum(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]),
                            use_cache=False).loss * sum(x != -100 for x in r["labels"][1:]) for r in rows)
    _check(model, ours, per_example / n_targets)


def test_num_items_in_batch_sets_the_denominator(tiny_model):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model(tiny_model)
    encs = [encode(make_renderer(build_tokenizer()), rec, 4096) for rec in weather_records(2, seed=4)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": e.input_ids, "labels": e.labels}
                                                           for e in encs])
    own = target_loss(model, batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(target_loss(model, batch, num_items_in_batch=2 * n), own / 2)


def test_head_runs_in_chunks_and_never_holds_all_target_logits(tiny_model, monkeypatch):
    """The LoRA model takes the chunked head path; chunks of 3 rows give the full-logits loss and gradients, and
    autograd keeps no tensor as wide as the vocabulary (only the head weight itself)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from slmtune.train import loss as loss_mod

    model = _model(tiny_model)
    assert loss_mod.fusable_head(model) is not None
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 3 * vocab)
    encs = [encode(make_renderer(build_tokenizer()), rec, 4096) for rec in weather_records(3, seed=5)]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encs]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ours = target_loss(model, packed)
    n_targets = sum(sum(x != -100 for x in r["labels"][1:]) for r in rows)
    assert n_targets > 3  # several chunks
    assert not [s for s in saved if vocab in s and s != tuple(model.get_output_embeddings().weight.shape)]
    per_example = sum(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]),
                            use_cache=False).loss * sum(x != -100 for x in r["labels"][1:]) for r in rows)
    _check(model, ours, per_example / n_targets)


def test_trained_or_capped_heads_take_the_plain_path(tiny_model):
    from slmtune.train.loss import fusable_head

    model = _model(tiny_model)
    model.get_output_embeddings().weight.requires_grad_(True)
    assert fusable_head(model) is None
    model.get_output_embeddings().weight.requires_grad_(False)
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert fusable_head(model) is None
