"""Batched greedy generation of the target turn, exactly as training rendered the prompt.

Prompts come from `slmtune.render.prompt_text` and are tokenized with `add_special_tokens=False` (as
`render.encode` does), left-padded, and decoded greedily until the end-of-turn token. Prompts are sorted by
length before batching so a batch pads little; results come back in the input order.

A batch holds at most `batch_size` rows and at most `max_batch_tokens` cache slots (rows × (widest prompt +
max_new_tokens)). On the CPU a decode step re-reads the weights once per batch, which batching shares, but it
also copies and attends over every row's cache, padding included: 16 BFCL prompts padded to 1,918 tokens ran at
9.5 generated tokens/s, slower than one at a time (11), while 4 short ones ran at 21.7. The bound keeps long
prompts in small batches and lets short ones share a step.

All prompts of a task usually open with the same system turn and tool specs: that common token prefix is
prefilled once, and each batch starts from a copy of its KV cache. Rows are then laid out as
`prefix, padding, own suffix` (the attention mask hides the padding; positions come from the mask), which
gives the same greedy tokens as prefilling every prompt whole.

Every generated token's log-probability is kept (`Generation.token_logprobs`), read from the distribution the
token was picked from: the scores after every logits processor, so under a grammar they are renormalized over
the tokens it allows and a token the grammar forces has log-probability 0. It costs one log-softmax over the
vocabulary per step: 0.05 ms for one row and 0.44 ms for 16 at SmolLM2's 49k vocabulary, against 56.5 ms for
one SmolLM2-135M decode step of one row in the same run (`scripts/bench_confidence.py --cost`, 2-core
AVX512-BF16 CPU): about 0.1 %. `slmtune.infer.confidence` turns them into an answer's confidence.

Timing: a batch's wall time is every one of its records' latency (they wait together); throughput is the
generated tokens of all batches over their summed wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from slmtune.ui import Progress, ticker

# Tokens that close an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Phi).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
BUDGET_FACTOR, BUDGET_MARGIN, BUDGET_CAP = 1.5, 16, 1024
# Shorter shared prefixes are not worth a cache copy per batch. A task's records usually share the system turn
# and the tool specs (~170 of ~200 prompt tokens for the weather errand), which are then prefilled once.
MIN_SHARED_PREFIX = 16
MAX_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class Generation:
    text: str  # decoded new tokens before the end-of-turn token
    n_tokens: int  # generated tokens, end-of-turn included
    finished: bool  # stopped on end of turn (False: ran out of max_new_tokens)
    latency_s: float  # wall time of the batch this record was generated in
    batch: int  # which batch (records of one batch share its wall time)
    token_logprobs: tuple[float, ...] = ()  # per generated token (end-of-turn included), see module docstring


def stop_ids(tokenizer, model=None, generation_config=None) -> list[int]:
    """The eos of tokenizer and generation config (the model's, unless one is given), plus any end-of-turn token
    the vocabulary has."""
    ids: list[int] = []
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN:
        if t in vocab and vocab[t] not in ids and t in (tokenizer.chat_template or ""):
            ids.append(vocab[t])
    return ids


def token_budget(tokenizer, target_texts: list[str]) -> int:
    """max_new_tokens: 1.5 × the longest teacher target + 16, capped at 1024
    (a 40-token tool call gets 76; a 900-token summary gets the cap)."""
    longest = max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in target_texts), default=0)
    return min(int(BUDGET_FACTOR * longest) + BUDGET_MARGIN, BUDGET_CAP)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             processor_factory: Callable | None = None, progress: Progress | None = None,
             share_prefix: bool = True, max_batch_tokens: int | None = MAX_BATCH_TOKENS,
             prefix_cache: PrefixCache | None = None) -> list[Generation]:
    """Greedy completions of `prompts` in batches of at most `batch_size` rows (1 = one at a time) and at most
    `max_batch_tokens` cache slots (None: no bound; a prompt longer than the bound gets a batch of its own).

    `processor_factory(indices, prompt_len)` may return a logits processor for one batch (constrained decoding).
    `prefix_cache` keeps the shared prefix's KV cache from one call to the next (serving: see `PrefixCache`).
    """
    import torch

    if not prompts:
        return []
    tick = ticker(progress)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = common_prefix(ids) if share_prefix else []
    prefix = prefix if len(prefix) >= MIN_SHARED_PREFIX else []
    order = sorted(range(len(prompts)), key=lambda i: (-len(ids[i]), i))
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[Generation | None] = [None] * len(prompts)
    model.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        if prefix and prefix_cache is not None:
            cache = prefix_cache.prefill(model, prefix)
        elif prefix:
            cache = model(torch.tensor([prefix], device=model.device), use_cache=True).past_key_values
        else:
            cache = None
        shared_s = time.perf_counter() - t0  # charged to the first batch, so wall times add up to the truth
        batches = token_batches([len(ids[i]) for i in order], max_new_tokens, batch_size, max_batch_tokens)
        done = 0
        for b, (start, stop) in enumerate(batches):
            idx = order[start:stop]
            input_ids, mask = (t.to(model.device) for t in _pad(prefix, [ids[i][len(prefix):] for i in idx], pad))
            recorder = _logprob_recorder()
            procs = [processor_factory(idx, input_ids.shape[1])] if processor_factory else []
            t0 = time.perf_counter()
            gen = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=_copy(cache, len(idx)),
                                 generation_config=_config(max_new_tokens, stops, pad),
                                 logits_processor=_processors([*procs, recorder]))
            dt = time.perf_counter() - t0 + (shared_s if b == 0 else 0.0)
            new = gen[:, input_ids.shape[1]:]
            logprobs = recorder.finish(new).tolist()
            for row, lps, i in zip(new.tolist(), logprobs, idx, strict=True):
                out[i] = generation(tokenizer, row, stops, dt, b, lps)
            done += len(idx)
            tick("generating", done, len(order))
    return out  # type: ignore[return-value]


class PrefixCache:
    """The KV cache of the last shared prefix one model prefilled, kept from one `generate` call to the next.

    A served route's requests open with the same system turn and tool list, but a batch of one request has no
    other prompt to share it with: each call would prefill its whole prompt. Kept here, the next call's prefix
    reuses the longest part it has in common with the last one (the cache cropped to it) and prefills only the
    rest — one request at a time, that is the conversation's tail. Owned by one loaded model (adapters each have
    their own: the cache depends on the weights) and used by one thread; up to `max_tokens` are kept. Models
    whose cache layers are not plain full-attention ones (sliding windows) prefill every call whole."""

    def __init__(self, max_tokens: int = 8192):
        self.max_tokens = max_tokens
        self.ids: list[int] = []
        self.cache = None
        self.reused = self.prefilled = 0  # tokens taken from the kept cache / computed, over all calls

    def prefill(self, model, prefix: list[int]):
        """A KV cache holding `prefix` (generate copies it per batch; this one is kept for the next call)."""
        import torch

        # taken out while it changes: a forward that fails midway leaves nothing half-extended behind
        kept, cache, self.ids, self.cache = self.ids, self.cache, [], None
        n = common_length(kept, prefix) if cache is not None else 0
        if n < MIN_SHARED_PREFIX:
            cache, n = None, 0
        elif len(kept) > n:
            cache.crop(n - len(kept))  # drop what `prefix` does not share (a negative count: tokens removed)
        if len(prefix) > n:
            cache = model(torch.tensor([prefix[n:]], device=model.device), past_key_values=cache,
                          use_cache=True).past_key_values
        self.reused, self.prefilled = self.reused + n, self.prefilled + len(prefix) - n
        plain = all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))
        if plain and len(prefix) <= self.max_tokens:
            self.ids, self.cache = list(prefix), cache
        return cache


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def token_batches(lengths: list[int], max_new_tokens: int, batch_size: int,
                  max_batch_tokens: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges over prompts sorted longest first: each batch as many rows as fit both bounds."""
    out, start = [], 0
    while start < len(lengths):
        width = lengths[start] + max_new_tokens  # the first row is the batch's widest
        rows = batch_size if max_batch_tokens is None else max(1, min(batch_size, max_batch_tokens // width))
        stop = min(start + rows, len(lengths))
        out.append((start, stop))
        start = stop
    return out


def wall_time(gens: list[Generation]) -> float:
    """Total generation time: each batch's wall time once."""
    return sum({g.batch: g.latency_s for g in gens}.values())


def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The token prefix all sequences share, leaving every sequence at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((k for k in range(n) if s[k] != first[k]), n)
    return first[:max(n, 0)]


def _copy(cache, rows: int):
    """A batch's own copy of the shared-prefix cache (generate appends to it in place)."""
    if cache is None:
        return None
    import copy

    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(rows)
    return c


def _pad(prefix: list[int], suffixes: list[list[int]], pad: int):
    """Rows `prefix + padding + suffix` and their attention mask (left padding when there is no prefix)."""
    import torch

    width = max(len(s) for s in suffixes)
    input_ids = torch.tensor([prefix + [pad] * (width - len(s)) + s for s in suffixes], dtype=torch.long)
    mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(s)) + [1] * len(s) for s in suffixes],
                        dtype=torch.long)
    return input_ids, mask


def _config(max_new_tokens: int, stops: list[int], pad: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops,
                            pad_token_id=pad, temperature=None, top_p=None, top_k=None)


def _processors(procs: list):
    from transformers import LogitsProcessorList

    return LogitsProcessorList(procs)


def _logprob_recorder():
    """A logits processor, last in the list, that keeps each row's log-probability of the token picked at every
    step: at step t it sees the token step t-1 picked (the last column of `input_ids`), and `finish` reads the
    last step's pick from the output."""
    import torch
    from transformers import LogitsProcessor

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.prev, self.steps = None, []

        def __call__(self, input_ids, scores):
            if self.prev is not None:
                self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
            self.prev = torch.log_softmax(scores.float(), dim=-1)
            return scores

        def finish(self, new_tokens):
            """(rows, new tokens) log-probabilities; past a row's end-of-turn the values mean nothing."""
            if self.prev is not None and len(self.steps) < new_tokens.shape[1]:
                self.steps.append(self.prev.gather(1, new_tokens[:, len(self.steps)].unsqueeze(1)).squeeze(1))
            self.prev = None
            if not self.steps:
                return torch.zeros(new_tokens.shape[0], 0)
            return torch.stack(self.steps, dim=1).cpu()

    return Recorder()


def completion_text(tokenizer, row: list[int], stops: list[int]) -> str:
    """Generated tokens → the answer's text: everything before the first end-of-turn token, special tokens kept
    (a template's `<tool_call>` may be one)."""
    end = next((k for k, t in enumerate(row) if t in stops), None)
    return tokenizer.decode(row if end is None else row[:end], skip_special_tokens=False)


def generation(tokenizer, row: list[int], stops: list[int], dt: float, batch: int,
               logprobs: list[float] = ()) -> Generation:
    """The `Generation` of one row of generated tokens (cut at its first end-of-turn token)."""
    end = next((k for k, t in enumerate(row) if t in stops), None)
    text = completion_text(tokenizer, row, stops)
    n = len(row) if end is None else end + 1
    return Generation(text=text, n_tokens=n, finished=end is not None, latency_s=round(dt, 4), batch=batch,
                      token_logprobs=tuple(min(0.0, round(x, 6)) for x in logprobs[:n]))
