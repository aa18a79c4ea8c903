"""The engine `slmtune serve` answers routed requests with by default: the exported checkpoints in this process
(`EmbeddedEngine`; `slmtune.serve.llamacpp.LlamaCppEngine` and `slmtune.serve.vllm.VllmEngine` are the others).
It takes a canonical record (the request's messages and tools) and returns a `Completion` of the model's raw text;
`slmtune.serve.server` parses and guards it. Three parts, one module each:

- `batcher`: one worker thread, dynamic batches per checkpoint (`batch_window_s`, `max_batch`);
- `model_cache`: an LRU of `max_loaded` exports, adapters on one base sharing its weights;
- `grammar`: the llguidance grammar of a constrained request, and `rows`: the per-row logits processors
  (own max_tokens, deadline, cancellation, grammar, sampling).

A batch is generated with `slmtune.infer.generate.generate` — the eval's left-padded greedy decoding with the
shared-prefix cache, on the prompt `slmtune.render.prompt_text` builds, so serving sees byte for byte what
training and eval saw. Each loaded export also keeps the last prefix's KV cache from one batch to the next
(`generate.PrefixCache`): a route's requests share the system turn and tool list, so a batch of one request
prefills only what it does not share with the one before.

Each request is judged alone before its batch runs: a prompt that, with its `max_tokens`, would not fit the
model's context fails with `PromptTooLong` (serve sends it upstream as `too_long`), and a grammar that can't be
built from the request's tools fails with `GrammarFailed` (`schema_invalid`) — only that request, never the
requests batched with it.
"""

from __future__ import annotations

import concurrent.futures
import time

from slmtune.errors import SlmtuneError
from slmtune.serve.batcher import Batcher
from slmtune.serve.grammar import checked_grammar
from slmtune.serve.jobs import DEFAULT_PARAMS, Checkpoint, Completion, Job, Params, PromptTooLong, await_job
from slmtune.serve.model_cache import Loaded, ModelCache
from slmtune.serve.rows import processor_factory


class EmbeddedEngine:
    """Exported checkpoints generating in this process, with dynamic batching (see module docstring)."""

    def __init__(self, max_loaded: int = 2, batch_window_s: float = 0.01, max_batch: int = 16,
                 sample: bool = False, dtype: str = "auto", on_batch=None, prefix_cache: bool = True):
        if max_loaded < 1 or max_batch < 1 or batch_window_s < 0:
            raise SlmtuneError(f"max_loaded and max_batch must be >= 1 and the batch window >= 0, got "
                               f"{max_loaded}, {max_batch}, {batch_window_s}.")
        self.sample, self.on_batch = sample, on_batch
        self.models = ModelCache(max_loaded, dtype, prefix_cache)  # prefix_cache off: every batch prefills whole
        self.batcher = Batcher(self._generate, batch_window_s, max_batch)

    def submit(self, ckpt: Checkpoint, record: dict, params: Params = DEFAULT_PARAMS) -> concurrent.futures.Future:
        """Queue one request; the future resolves to a `Completion` (or the error that stopped it)."""
        return self._submit(ckpt, record, params).future

    def _submit(self, ckpt: Checkpoint, record: dict, params: Params) -> Job:
        return self.batcher.enqueue(ckpt, record, params)

    async def complete(self, ckpt: Checkpoint, record: dict, params: Params = DEFAULT_PARAMS) -> Completion:
        """The request's completion (`jobs.await_job`: cancelling the caller stops its row)."""
        return await await_job(self._submit(ckpt, record, params))

    def loaded(self) -> dict:
        """What is in memory: exports (LRU order, oldest first) and shared bases with their adapters."""
        return self.models.loaded()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------------------ one batch (on the batcher's thread)
    def _generate(self, jobs: list[Job]) -> None:
        try:
            lm = self.models.get(jobs[0].ckpt)
        except Exception as e:  # noqa: BLE001 - a checkpoint that fails to load fails its requests, not the server
            for j in jobs:
                j.future.set_exception(e)
            return
        prepared, ok = [], []
        for j in jobs:  # each request judged alone: what fails here fails that request only
            try:
                prepared.append(self._prepare(lm, j))
            except Exception as e:  # noqa: BLE001 - a template that refuses the messages, a prompt too long, ...
                j.future.set_exception(e)
                continue
            ok.append(j)
        if not ok:
            return
        prompts, n_prompts, grammars = (list(x) for x in zip(*prepared, strict=True))
        try:
            results = self._batch(lm, ok, prompts, n_prompts, grammars)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the batch's requests fall back to the LLM
            for j in ok:
                j.future.set_exception(e)
            return
        for j, c in zip(ok, results, strict=True):
            j.future.set_result(c)
        if self.on_batch:
            self.on_batch(jobs[0].ckpt.name, len(ok))

    def _prepare(self, lm: Loaded, job: Job) -> tuple[str, int, str | None]:
        """The request's prompt, its token count (known to fit the context) and its checked grammar."""
        from slmtune.render import prompt_text

        prompt = prompt_text(lm.renderer, job.record)
        n = len(prompt_ids(lm.tokenizer, prompt, _context_of(lm.model), job))
        return prompt, n, checked_grammar(lm, job) if job.params.constrained else None

    def _batch(self, lm: Loaded, jobs: list[Job], prompts: list[str], n_prompts: list[int],
               grammars: list) -> list[Completion]:
        from slmtune.infer.confidence import confidence
        from slmtune.infer.generate import generate

        limits = [j.params.max_tokens for j in jobs]
        factory = processor_factory(lm, jobs, grammars, self.sample)
        t0 = time.perf_counter()
        # +1: a row stopped at its own limit still emits the end-of-turn token.
        gens = generate(lm.model, lm.tokenizer, prompts, max(limits) + 1, batch_size=len(jobs),
                        processor_factory=factory, max_batch_tokens=None,  # the batcher already chose the batch
                        prefix_cache=lm.prefix)
        dt = time.perf_counter() - t0
        out = []
        for j, n_prompt, g, limit in zip(jobs, n_prompts, gens, limits, strict=True):
            cut = not g.finished or g.n_tokens > limit
            # a sampled token was forced after the draw: its probability says nothing about the model's certainty
            sampled = self.sample and j.params.temperature > 0
            conf = None if sampled else confidence(g.token_logprobs)
            out.append(Completion(g.text, n_prompt, min(g.n_tokens, limit), not cut, len(jobs), round(dt, 4), conf))
        return out


_LONGEST: dict[int, int] = {}  # id(tokenizer) -> characters in its longest token


def prompt_ids(tokenizer, prompt: str, context: int | None, job: Job) -> list[int]:
    """The prompt's token ids; `PromptTooLong` when they and the job's max_tokens do not fit `context` (None: no
    limit). No token covers more characters than the vocabulary's longest, so a prompt over context × that is
    refused without tokenizing megabytes on the one worker thread. Both CPU engines judge prompts with it."""
    ids, n = None, None
    if context is not None:
        longest = _LONGEST.get(id(tokenizer))
        if longest is None:
            longest = _LONGEST[id(tokenizer)] = max(map(len, tokenizer.get_vocab()), default=1)
        if len(prompt) > context * longest:
            n = len(prompt) // longest  # a lower bound, already past the context
    if n is None:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(ids)
    if context is not None and (ids is None or n + job.params.max_tokens > context):
        raise PromptTooLong(f"the prompt (at least {n:,} tokens) and max_tokens ({job.params.max_tokens}) "
                            f"do not fit {job.ckpt.name}'s {context:,}-token context.")
    return ids


def _context_of(model) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None
