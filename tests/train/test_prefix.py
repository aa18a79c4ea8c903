"""Shared-prefix batching computes the same loss and gradients as plain batches, with fewer token-passes."""

import pytest
import torch

from slmtune.render import encode, make_renderer
from slmtune.synthetic.tiny import build_tokenizer, weather_records
from slmtune.train import prefix
from slmtune.train.loss import target_loss


@pytest.fixture(scope="module")
def encs():
    r = make_renderer(build_tokenizer())
    return [encode(r, rec, 4096) for rec in weather_records(12, seed=5)]


def test_plan_shares_the_system_and_tools_prefix(encs):
    plan = prefix.plan_batches(encs, batch_size=4)
    assert len(plan.batches) == 3
    assert sum(len(b["suffix_ids"]) for b in plan.batches) == 12
    for b in plan.batches:
        for s, lab in zip(b["suffix_ids"], b["suffix_labels"], strict=False):
            assert lab[0] == -100, "each suffix keeps a prompt token to predict the first target from"
            full = b["prefix_ids"] + s
            assert any(full == e.input_ids for e in encs)
    assert prefix.worth_it(plan) and plan.computed < 0.5 * plan.tokens


def test_batches_are_random_samples_of_one_family():
    """Two system prompts → two families; no batch mixes them, and within a family batches are seeded samples,
    not runs of sorted neighbours (which would make every step's gradient near-duplicate examples)."""
    r = make_renderer(build_tokenizer())
    recs = weather_records(32, seed=7)
    for rec in recs[16:]:
        rec["messages"][0]["content"] = "You answer travellers' questions about the weather, briefly. Use tools."
    encs = [encode(r, rec, 4096) for rec in recs]
    family = {tuple(e.input_ids): i >= 16 for i, e in enumerate(encs)}
    sorted_ids = sorted(e.input_ids for e in encs)
    runs = [sorted_ids[i:i + 4] for i in range(0, 32, 4)]
    plans = [prefix.plan_batches(encs, batch_size=4, seed=s) for s in (0, 1)]
    members = []
    for plan in plans:
        assert len(plan.batches) == 8 and prefix.worth_it(plan)
        sets = []
        for b in plan.batches:
            full = [b["prefix_ids"] + s for s in b["suffix_ids"]]
            assert len({family[tuple(f)] for f in full}) == 1, "a batch mixes two system prompts"
            sets.append(sorted(full))
        assert any(x not in runs for x in sets), "batches are runs of sorted neighbours"
        members.append(sorted(sets))
    assert members[0] != members[1], "the seed does not change batch composition"


def _plain_loss(model, group):
    width = max(len(e.input_ids) for e in group)
    ids = torch.zeros((len(group), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(group):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.input_ids)] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def test_prefix_loss_and_gradients_equal_plain_batch(encs, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False))
    model.train()
    plan = prefix.plan_batches(encs, batch_size=4)
    row = plan.batches[0]
    group = [e for e in encs if any(row["prefix_ids"] + s == e.input_ids for s in row["suffix_ids"])]
    inputs = prefix.collate(pad_id=0)([row])
    shared = target_loss(model, inputs)
    shared.backward()
    g_shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain = _plain_loss(model, group)
    plain.backward()
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_shared[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_all_assistant_prefix_never_takes_a_target_token():
    """`data.train_on: all_assistant` with records sharing their first assistant turn: the batch's common prefix
    stops before the first target token, so every labelled token is computed in a suffix."""
    r = make_renderer(build_tokenizer())
    encs = []
    for rec in weather_records(8, seed=9):
        system, user, call = rec["messages"]
        rec["messages"] = [system, {"role": "user", "content": "Hi!"},
                           {"role": "assistant", "content": "Hello, which city?"}, user, call]
        encs.append(encode(r, rec, 4096, train_on="all_assistant"))
    plan = prefix.plan_batches(encs, batch_size=4)
    first_target = encs[0].n_prompt
    assert all(e.n_prompt == first_target for e in encs)  # "Hi!" + its answer open every record
    for b in plan.batches:  # the shared prefix runs up to the first assistant turn, never into it
        assert len(b["prefix_ids"]) == first_target - 1
        assert all(lab[0] == -100 for lab in b["suffix_labels"])
    labelled = sum(lab != -100 for b in plan.batches for labs in b["suffix_labels"] for lab in labs)
    assert labelled == sum(e.n_target for e in encs) and all(e.n_target > 0 for e in encs)
