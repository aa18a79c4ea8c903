"""Per-row decoding controls for one batched `generate` call: what one call can't apply to all its rows alike.
A row's own `max_tokens` (the batch runs to the largest; a row past its own limit is made to emit end-of-turn),
its deadline (a request that timed out stops generating), its cancellation (the client went away), the
llguidance grammar of constrained rows, and — only in an engine built with `sample` — sampling at the row's
temperature; otherwise decoding is greedy whatever the request says, as eval scored the model."""

from __future__ import annotations

import time

from slmtune.serve.grammar import ll_tokenizer
from slmtune.serve.jobs import Job
from slmtune.serve.model_cache import Loaded


def processor_factory(lm: Loaded, jobs: list[Job], grammars: list, sample: bool):
    """`slmtune.infer.generate.generate`'s per-batch logits-processor factory for these rows."""
    ll = ll_tokenizer(lm) if any(grammars) else None
    temps = [j.params.temperature if sample else 0.0 for j in jobs]
    limits = [(j.params.max_tokens, j.deadline, j.cancelled) for j in jobs]

    def factory(idx: list[int], prompt_len: int):
        procs = []
        if ll is not None:
            from slmtune.infer.constrain import make_processor

            procs.append(make_processor(ll, [grammars[i] for i in idx], prompt_len, lm.stops))
        if any(temps[i] > 0 for i in idx):
            procs.append(_sampler([temps[i] for i in idx]))
        procs.append(_row_limits([limits[i] for i in idx], prompt_len, lm.stops[0]))
        return _chain(procs)

    return factory


def _chain(procs: list):
    from transformers import LogitsProcessor

    class Chain(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for p in procs:
                scores = p(input_ids, scores)
            return scores

    return Chain()


def _row_limits(limits: list[tuple], prompt_len: int, stop: int):
    """Rows past their own max_tokens or their deadline, or cancelled, may only emit the end-of-turn token."""
    from transformers import LogitsProcessor

    class RowLimits(LogitsProcessor):
        def __call__(self, input_ids, scores):
            n = input_ids.shape[1] - prompt_len
            now = time.monotonic()
            for i, (max_tokens, deadline, cancelled) in enumerate(limits):
                if n >= max_tokens or now > deadline or cancelled.is_set():
                    scores[i] = float("-inf")
                    scores[i, stop] = 0.0
            return scores

    return RowLimits()


def _sampler(temps: list[float]):
    """Rows with temperature > 0 draw their next token from softmax(logits / T) (among what the grammar
    allows); the drawn token is then the only one left, so greedy decoding takes it."""
    import torch
    from transformers import LogitsProcessor

    class Sample(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for i, t in enumerate(temps):
                if t > 0:
                    probs = torch.softmax(scores[i].float() / t, dim=-1)
                    pick = int(torch.multinomial(probs, 1))
                    scores[i] = float("-inf")
                    scores[i, pick] = 0.0
            return scores

    return Sample()
