"""Packed attention: each sequence of a padding-free packed row attends to itself only, with no dense mask."""

import torch

from slmtune.train.attention import NAME, packed_sdpa, restore, use_packed_attention


def _model(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").train()


def test_packed_row_equals_its_sequences_run_alone_values_and_gradients(tiny_model):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model(tiny_model)
    lens = [7, 13, 5]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in lens]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": s, "labels": s} for s in seqs])
    assert "cu_seq_lens_q" in packed and packed["input_ids"].shape == (1, sum(lens))

    alone = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs])
    alone.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    before = use_packed_attention(model)
    assert before == "sdpa" and model.config._attn_implementation == NAME
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    got = model(**inputs, use_cache=False).logits[0]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-4, rtol=1e-4, msg=n)
    # position_ids alone (no cu_seq_lens) give the same boundaries
    torch.testing.assert_close(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                     use_cache=False).logits[0], alone, atol=1e-5, rtol=1e-5)
    restore(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_padded_batches_and_cached_generation_fall_back_to_masked_sdpa(tiny_model):
    model = _model(tiny_model).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ref = model(input_ids=ids, attention_mask=mask).logits
    ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    use_packed_attention(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[mask.bool()], ref[mask.bool()],
                               atol=1e-5, rtol=1e-5)
    assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                          pad_token_id=0).tolist() == ref_gen.tolist()


def test_a_kernel_call_with_no_boundaries_is_one_causal_sequence():
    q = torch.randn(1, 2, 6, 8)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)

    class M:
        training, num_key_value_groups = False, 1

    out, _ = packed_sdpa(M(), q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)
