"""Batched generation (`slmtune.infer.generate`) and the per-token log-probabilities an answer's confidence is
read from (`slmtune.infer.confidence`), on the tiny offline model, in both precisions."""

import math

import pytest

from slmtune.infer.confidence import CANDIDATES, all_confidences, confidence
from slmtune.synthetic.tiny import weather_records


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are too small to split between threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(tiny_model, dtype: str):
    from slmtune.eval.evaluate import load, resolve_model

    return load(resolve_model(str(tiny_model)), dtype=dtype)


def _prompts(tok) -> list[str]:
    from slmtune.render import make_renderer, prompt_text

    return [prompt_text(make_renderer(tok), r) for r in weather_records(5, seed=3)]


@pytest.mark.slow
def test_batched_generation_matches_one_at_a_time(tiny_model):
    """Same tokens, and the same log-probabilities, one at a time, in batches with the shared-prefix cache, and
    in batches bounded by cache slots (fp32: the tokens must agree exactly)."""
    from slmtune.infer.generate import common_prefix, generate

    model, tok = _load(tiny_model, "float32")
    prompts = _prompts(tok)
    one = generate(model, tok, prompts, 24, batch_size=1, share_prefix=False)
    many = generate(model, tok, prompts, 24, batch_size=3)  # a full and a partial batch, shared-prefix cache
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    bound = 2 * (max(map(len, ids)) + 24)  # two rows of the longest prompt fit, so batches of 2, 2, 1
    bounded = generate(model, tok, prompts, 24, batch_size=16, max_batch_tokens=bound)
    assert common_prefix(ids)  # exercised
    assert len({g.batch for g in bounded}) == math.ceil(len(prompts) / 2)
    assert [g.text for g in one] == [g.text for g in many] == [g.text for g in bounded]
    assert [g.n_tokens for g in one] == [g.n_tokens for g in many] == [g.n_tokens for g in bounded]
    for a, b, c in zip(one, many, bounded, strict=True):
        assert len(a.token_logprobs) == a.n_tokens
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.token_logprobs == pytest.approx(c.token_logprobs, abs=1e-4)
        for kind in CANDIDATES:
            assert confidence(a.token_logprobs, kind) == pytest.approx(confidence(b.token_logprobs, kind), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_logprobs_are_those_of_the_greedy_picks(tiny_model, dtype):
    """Greedy decoding picks the most likely token, so each kept log-probability is at least -log(vocabulary)
    and at most 0, and matches a plain forward pass over prompt + answer; every confidence lies in [0, 1]."""
    import torch

    from slmtune.infer.generate import generate

    model, tok = _load(tiny_model, dtype)
    prompts = _prompts(tok)[:3]
    gens = generate(model, tok, prompts, 12, batch_size=3)
    vocab = model.get_output_embeddings().weight.shape[0]
    for prompt, g in zip(prompts, gens, strict=True):
        assert len(g.token_logprobs) == g.n_tokens > 0
        assert all(-math.log(vocab) - 1e-3 <= x <= 0.0 for x in g.token_logprobs)
        assert all(0.0 <= v <= 1.0 for v in all_confidences(g.token_logprobs).values())
        # the first token's log-probability, recomputed from a forward pass over the prompt alone
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            logits = model(ids).logits[0, -1].float()
        first = torch.log_softmax(logits, -1).max().item()
        assert g.token_logprobs[0] == pytest.approx(first, abs=0.05 if dtype == "bfloat16" else 1e-4)


@pytest.mark.slow
def test_a_token_the_grammar_forces_has_probability_one(tiny_model):
    """Under a label grammar the scores are renormalized over the allowed tokens: once a label is written, the
    end of turn is the only token allowed, so its log-probability is 0 and it never lowers the minimum."""
    from slmtune.infer import constrain
    from slmtune.infer.generate import generate, stop_ids

    model, tok = _load(tiny_model, "float32")
    stops = stop_ids(tok, model)
    ll = constrain.ll_tokenizer(tok, model.get_output_embeddings().weight.shape[0], stops)
    grammar = constrain.grammar_for("classification", {"enum": ["positive", "negative"]}, None, (40, 4, 1))
    prompts = _prompts(tok)[:2]
    gens = generate(model, tok, prompts, 12, batch_size=2, processor_factory=lambda idx, n: constrain.make_processor(
        ll, [grammar] * len(idx), n, stops))
    for g in gens:
        assert g.finished and g.text in ("positive", "negative")
        assert g.token_logprobs[-1] == 0.0  # the forced end of turn
        assert confidence(g.token_logprobs, "min_prob") == pytest.approx(math.exp(min(g.token_logprobs[:-1])))


def test_confidence_candidates_on_known_log_probabilities():
    lps = [math.log(0.9), math.log(0.5), 0.0]
    assert confidence(lps, "min_prob") == pytest.approx(0.5)
    assert confidence(lps, "mean_prob") == pytest.approx((0.9 * 0.5) ** (1 / 3))
    assert confidence(lps, "first_prob") == pytest.approx(0.9)
    assert confidence([]) is None
    with pytest.raises(ValueError, match="one of"):
        confidence(lps, "entropy")


def test_token_batches_bound_rows_by_cache_slots():
    from slmtune.infer.generate import token_batches

    lengths = [900, 800, 300, 200, 100, 100, 50]  # longest first, as generate sorts them
    assert token_batches(lengths, 100, 16, None) == [(0, 7)]
    assert token_batches(lengths, 100, 3, None) == [(0, 3), (3, 6), (6, 7)]
    # 2,000 slots: 2 rows of 1,000, then 5 rows of 400 (the widest row of each batch decides), then the rest
    assert token_batches(lengths, 100, 16, 2000) == [(0, 2), (2, 7)]
    assert token_batches([5000, 10], 100, 16, 2000) == [(0, 1), (1, 2)]  # a prompt over the bound goes alone


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefix_cache_across_calls_gives_the_tokens_of_a_whole_prefill(tiny_model, dtype):
    """Serving's one-request calls with a `PrefixCache`: each call prefills only what it does not share with the
    last one (the kept cache cropped to the common part) and generates what a whole prefill generates; a prompt
    with nothing in common prefills whole."""
    from slmtune.infer.generate import PrefixCache, generate

    model, tok = _load(tiny_model, dtype)
    prompts = _prompts(tok)
    prompts.append("An unrelated prompt that shares nothing with the weather errand's system turn." * 3)
    cache = PrefixCache()
    kept = [generate(model, tok, [p], 24, batch_size=1, prefix_cache=cache)[0] for p in prompts]
    whole = [generate(model, tok, [p], 24, batch_size=1)[0] for p in prompts]
    assert [g.text for g in kept] == [g.text for g in whole]
    for a, b in zip(kept, whole, strict=True):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4 if dtype == "float32" else 0.05)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = sum(next(k for k in range(len(a)) if a[k] != b[k]) for a, b in zip(ids[:4], ids[1:5], strict=True))
    assert cache.reused == shared  # each weather prompt took what it shares with the one before it
    assert cache.prefilled == sum(len(x) - 1 for x in ids) - shared  # (a prompt's last token is fed by generate)


def test_prefix_cache_when_the_new_prefix_holds_the_kept_one(tiny_model):
    """The same prompt twice (nothing to crop), a batch whose common prefix a later single prompt extends, and a
    prompt shorter than the kept prefix: the kept cache is reused, never emptied, and the tokens are those of a
    whole prefill."""
    from slmtune.infer.generate import PrefixCache, generate

    model, tok = _load(tiny_model, "float32")
    prompts = _prompts(tok)
    cache = PrefixCache()
    calls = [[prompts[0]], [prompts[0]], prompts[1:3], [prompts[1]], [prompts[3][:40]]]
    kept, reused = [], []
    for p in calls:
        kept.append(generate(model, tok, p, 24, batch_size=4, prefix_cache=cache))
        reused.append(cache.reused)
    whole = [generate(model, tok, p, 24, batch_size=4) for p in calls]
    assert [[g.text for g in k] for k in kept] == [[g.text for g in w] for w in whole]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert reused[1] - reused[0] == len(ids[0]) - 1  # the repeated prompt took its whole prefix from the cache
    batch_prefix = next(k for k in range(len(ids[1])) if ids[1][k] != ids[2][k])
    assert reused[3] - reused[2] == batch_prefix  # the single prompt extended the batch's kept prefix
