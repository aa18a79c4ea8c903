"""The engines `slmtune serve` answers routed requests with: the exported checkpoints in-process
(`EmbeddedEngine`, the default) or a running vLLM server (`VllmEngine`). Both take a canonical record (the
request's messages and tools) and return a `Completion` of the model's raw text; `slmtune.ship.serve` parses
and guards it.

**Embedded.** Checkpoints are loaded lazily with transformers on first use and kept in an LRU of
`max_loaded` exports. Merged exports are loaded whole; adapter exports on the same base share one copy of the
base weights (one `PeftModel` per base, one named LoRA adapter per export, switched per batch), so ten
adapters on SmolLM2-135M cost its 540 MB of fp32 weights once plus ~20 MB per r=16 all-linear adapter
(4.9M parameters) instead of 5.4 GB. `max_loaded` counts exports, adapters and merged alike.
One worker thread generates, one batch at a time (a 2-core CPU gains nothing from two models generating at
once): it takes the checkpoint of the oldest waiting request, waits until that request is `batch_window_s`
old (or `max_batch` requests for that checkpoint wait), and generates all of them as one batch with
`slmtune.infer.generate.generate` — the eval's left-padded greedy decoding with the shared-prefix cache, on the
prompt `slmtune.render.prompt_text` builds, so serving sees byte for byte what training and eval saw.
Requests that arrive while a batch runs form the next one, so under load batches fill without any waiting.

Each request is judged alone before its batch runs: a prompt that, with its `max_tokens`, would not fit the
model's context fails with `PromptTooLong` (serve sends it upstream as `too_long`), and a grammar that can't be
built from the request's tools fails with `GrammarFailed` (`schema_invalid`) — only that request, never the
requests batched with it.

Per row, a logits processor applies what one `generate` call can't: the row's own `max_tokens` (the batch
runs to the largest; a row past its own limit is made to emit end-of-turn, and reported as finish `length`),
its deadline (a request that timed out stops generating), its cancellation (the client went away: `complete`
was cancelled), the llguidance grammar with `constrained`, and —
only with `sample` — sampling at the row's temperature; otherwise decoding is greedy whatever the request
says, as eval scored the model.

**vLLM.** `VllmEngine` sends the same rendered prompt to vLLM's `/v1/completions` (so vLLM's chat template
can't render differently from training) with greedy settings and the end-of-turn stop ids; `vllm_commands`
prints how to start vLLM for a router's exports.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError

# Caps of the serving grammar (`slmtune.infer.constrain.tighten`): eval derives them from the teacher targets;
# serving has no targets, so free strings get 256 characters, arrays 32 items, and an answer up to 4 calls.
GRAMMAR_CAPS = (256, 32, 4)


class PromptTooLong(SlmtuneError):
    """The prompt and its max_tokens do not fit the model's context."""


class GrammarFailed(SlmtuneError):
    """The request's tools (or the task schema) could not become a grammar."""


@dataclass(frozen=True)
class Checkpoint:
    """One routed export as the engine loads it (from a router.json route and the export's slmtune.json)."""

    name: str  # the export folder's name: the `model` of the answers it gives
    task: str
    category: str
    schema: Any
    path: str
    format: str  # merged | adapter
    base_path: str | None  # adapters: the base model they were trained on
    context: int | None = None  # the model's context in tokens (max_position_embeddings), when its config says


@dataclass(frozen=True)
class Completion:
    text: str  # the model's text before the end-of-turn token
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # stopped on end of turn (False: cut at max_tokens)
    batch_size: int  # requests generated together with this one
    generate_s: float  # wall time of that batch


@dataclass(frozen=True)
class Params:
    """How to answer one request."""

    max_tokens: int = 512
    temperature: float = 0.0  # > 0 samples only in an engine built with sample=True
    constrained: bool = False  # decode under the task's grammar
    max_calls: int = GRAMMAR_CAPS[2]  # most tool calls the grammar allows (1 when parallel_tool_calls is false)
    timeout_s: float = 60.0  # queueing included: a row past it stops generating
    allow_text: bool = True  # constrained tool calling: a text answer is allowed (the guard sends it upstream)
    tool: str | None = None  # constrained tool calling: the one tool the call must name (tool_choice names it)


@dataclass
class _Job:
    ckpt: Checkpoint
    record: dict
    params: Params
    deadline: float  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the caller stopped waiting


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    renderer: Any
    stops: list[int]
    base_key: str | None  # adapters: key of the shared base in `_bases`


class EmbeddedEngine:
    """Exported checkpoints generating in this process, with dynamic batching (see module docstring)."""

    def __init__(self, max_loaded: int = 2, batch_window_s: float = 0.01, max_batch: int = 16,
                 sample: bool = False, dtype: str = "auto", on_batch=None):
        if max_loaded < 1 or max_batch < 1 or batch_window_s < 0:
            raise SlmtuneError(f"max_loaded and max_batch must be >= 1 and the batch window >= 0, got "
                               f"{max_loaded}, {max_batch}, {batch_window_s}.")
        self.max_loaded, self.batch_window_s, self.max_batch = max_loaded, batch_window_s, max_batch
        self.sample, self.dtype, self.on_batch = sample, dtype, on_batch
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._bases: dict[str, Any] = {}  # base path -> PeftModel holding the loaded adapters of that base
        self._pending: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="slmtune-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public
    def submit(self, ckpt: Checkpoint, record: dict, params: Params = Params()) -> concurrent.futures.Future:
        """Queue one request; the future resolves to a `Completion` (or the error that stopped it)."""
        return self._submit(ckpt, record, params).future

    def _submit(self, ckpt: Checkpoint, record: dict, params: Params) -> _Job:
        job = _Job(ckpt, record, params, time.monotonic() + params.timeout_s)
        with self._cond:
            if self._closed:
                raise SlmtuneError("the engine is closed.")
            self._pending.append(job)
            self._cond.notify()
        return job

    async def complete(self, ckpt: Checkpoint, record: dict, params: Params = Params()) -> Completion:
        """The request's completion. Cancelling the caller (a timeout, a client that went away) stops its row:
        a queued request never starts, a running one emits end-of-turn at its next token."""
        import asyncio

        job = self._submit(ckpt, record, params)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled.set()
            job.future.cancel()
            raise

    def loaded(self) -> dict:
        """What is in memory: exports (LRU order, oldest first) and shared bases with their adapters."""
        with self._cond:
            return {"exports": list(self._loaded),
                    "bases": {k: sorted(getattr(m, "peft_config", {})) for k, m in self._bases.items()}}

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ batching
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel()]
            late = [j for j in live if time.monotonic() > j.deadline]  # timed out while waiting its turn
            for j in late:
                j.future.set_exception(TimeoutError("the request timed out before its batch started"))
            live = [j for j in live if j not in late]
            if live:
                self._generate(live)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest waiting request's checkpoint: every request for it, once the oldest is a window old."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._pending[0]
                same = [j for j in self._pending if j.ckpt.name == first.ckpt.name]
                wait = first.arrived + self.batch_window_s - time.monotonic()
                if wait <= 0 or len(same) >= self.max_batch:
                    batch = same[:self.max_batch]
                    taken = {id(j) for j in batch}
                    self._pending = [j for j in self._pending if id(j) not in taken]
                    return batch
                self._cond.wait(wait)

    def _generate(self, jobs: list[_Job]) -> None:
        try:
            lm = self._load(jobs[0].ckpt)
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

    def _prepare(self, lm: _Loaded, job: _Job) -> tuple[str, int, str | None]:
        """The request's prompt, its token count (known to fit the context) and its grammar (compiled once here,
        so a schema llguidance refuses fails this request only)."""
        from slmtune.render import prompt_text

        prompt = prompt_text(lm.renderer, job.record)
        context = _context_of(lm.model)
        n = _prompt_tokens(lm.tokenizer, prompt, context)
        if context is not None and n + job.params.max_tokens > context:
            raise PromptTooLong(f"the prompt (at least {n:,} tokens) and max_tokens ({job.params.max_tokens}) "
                                f"do not fit {job.ckpt.name}'s {context:,}-token context.")
        if not job.params.constrained:
            return prompt, n, None
        try:
            grammar = _grammar(job)
            if grammar is not None:
                from slmtune.infer import constrain

                constrain.compile_grammar(_ll_tokenizer(lm), grammar)
        except Exception as e:  # noqa: BLE001 - a tool schema llguidance or `tighten` can't read
            why = e.message if isinstance(e, SlmtuneError) else f"{type(e).__name__}: {str(e)[:200]}"
            raise GrammarFailed(f"the request's tools could not become a grammar ({why[:300]})") from None
        return prompt, n, grammar

    def _batch(self, lm: _Loaded, jobs: list[_Job], prompts: list[str], n_prompts: list[int],
               grammars: list) -> list[Completion]:
        from slmtune.infer.generate import generate

        if lm.base_key is not None:
            self._bases[lm.base_key].set_adapter(jobs[0].ckpt.name)
        limits = [j.params.max_tokens for j in jobs]
        factory = self._processors(lm, jobs, grammars)
        t0 = time.perf_counter()
        # +1: a row stopped at its own limit still emits the end-of-turn token.
        gens = generate(lm.model, lm.tokenizer, prompts, max(limits) + 1, batch_size=len(jobs),
                        processor_factory=factory, max_batch_tokens=None)  # the batcher already chose the batch
        dt = time.perf_counter() - t0
        out = []
        for n_prompt, g, limit in zip(n_prompts, gens, limits, strict=True):
            cut = not g.finished or g.n_tokens > limit
            out.append(Completion(g.text, n_prompt, min(g.n_tokens, limit), not cut, len(jobs), round(dt, 4)))
        return out

    def _processors(self, lm: _Loaded, jobs: list[_Job], grammars: list):
        """generate's per-batch logits-processor factory: grammar (constrained rows), sampling, row limits."""
        ll = _ll_tokenizer(lm) if any(grammars) else None
        temps = [j.params.temperature if self.sample else 0.0 for j in jobs]
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

    # ------------------------------------------------------------------ loading
    def _load(self, ckpt: Checkpoint) -> _Loaded:
        if ckpt.name in self._loaded:
            self._loaded.move_to_end(ckpt.name)
            return self._loaded[ckpt.name]
        while len(self._loaded) >= self.max_loaded:
            self._unload(next(iter(self._loaded)))
        from transformers import AutoTokenizer

        from slmtune.infer.generate import stop_ids
        from slmtune.render import make_renderer

        tok = AutoTokenizer.from_pretrained(ckpt.path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model, base_key = self._weights(ckpt)
        loaded = _Loaded(model, tok, make_renderer(tok), stop_ids(tok, model), base_key)
        with self._cond:
            self._loaded[ckpt.name] = loaded
        return loaded

    def _weights(self, ckpt: Checkpoint):
        from transformers import AutoModelForCausalLM

        from slmtune.models import pick_dtype

        if ckpt.format != "adapter":
            return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=pick_dtype(self.dtype)).eval(), None
        if not ckpt.base_path:
            raise SlmtuneError(f"{ckpt.path}: an adapter export without `base_model.path` in slmtune.json.")
        from peft import PeftModel

        shared = self._bases.get(ckpt.base_path)
        if shared is None:
            base = AutoModelForCausalLM.from_pretrained(ckpt.base_path, dtype=pick_dtype(self.dtype))
            shared = PeftModel.from_pretrained(base, ckpt.path, adapter_name=ckpt.name).eval()
            with self._cond:
                self._bases[ckpt.base_path] = shared
        else:
            shared.load_adapter(ckpt.path, adapter_name=ckpt.name)
        return shared, ckpt.base_path

    def _unload(self, name: str) -> None:
        with self._cond:
            lm = self._loaded.pop(name)
            if lm.base_key is None:
                return
            shared = self._bases[lm.base_key]
            others = [a for a in shared.peft_config if a != name]
            if not others:
                del self._bases[lm.base_key]  # the last adapter of this base: the base goes too
                return
            shared.set_adapter(others[0])
            shared.delete_adapter(name)


def _grammar(job: _Job) -> str | None:
    from slmtune.infer import constrain
    from slmtune.infer.calls import TOOL_CALLING

    ck = job.ckpt
    # A tool call must name one of the tools this request offers: the grammar is built from them.
    schema = None if ck.category == TOOL_CALLING else ck.schema
    caps = (*GRAMMAR_CAPS[:2], job.params.max_calls)
    tools = job.record.get("tools")
    if job.params.tool is not None:
        tools = [t for t in tools or [] if (t.get("function") or {}).get("name") == job.params.tool]
    return constrain.grammar_for(ck.category, schema, tools, caps, allow_text=job.params.allow_text)


def _ll_tokenizer(lm: _Loaded):
    """llguidance's view of the loaded model's tokenizer (cached by `constrain.ll_tokenizer`)."""
    from slmtune.infer import constrain

    constrain.require()
    return constrain.ll_tokenizer(lm.tokenizer, lm.model.get_output_embeddings().weight.shape[0], lm.stops)


_LONGEST: dict[int, int] = {}  # id(tokenizer) -> characters in its longest token


def _prompt_tokens(tokenizer, prompt: str, context: int | None) -> int:
    """The prompt's token count, or a lower bound past the context: no token covers more characters than the
    vocabulary's longest, so a prompt over context × that is too long without tokenizing megabytes on the one
    worker thread."""
    if context is not None:
        longest = _LONGEST.get(id(tokenizer))
        if longest is None:
            longest = _LONGEST[id(tokenizer)] = max(map(len, tokenizer.get_vocab()), default=1)
        if len(prompt) > context * longest:
            return len(prompt) // longest
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _context_of(model) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


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


# ----------------------------------------------------------------------------- vLLM
class VllmEngine:
    """Routed requests rendered here and completed by a running vLLM OpenAI server (`/v1/completions`)."""

    def __init__(self, urls: dict[str, str], default_url: str | None, timeout_s: float = 60.0):
        self.urls, self.default_url, self.timeout_s = urls, default_url, timeout_s
        self._tokenizers: dict[str, Any] = {}
        self._client = None

    async def complete(self, ckpt: Checkpoint, record: dict, params: Params = Params()) -> Completion:
        """`params.constrained` is not passed on: vLLM's own guided decoding would need its grammar dialect."""
        import httpx

        from slmtune.infer.generate import stop_ids
        from slmtune.render import prompt_text

        url = self.urls.get(ckpt.name, self.default_url)
        if not url:
            raise SlmtuneError(f"no --engine-url for {ckpt.name}.")
        tok, renderer = self._tokenizer(ckpt)
        body = {"model": ckpt.name, "prompt": prompt_text(renderer, record), "max_tokens": params.max_tokens,
                "temperature": params.temperature, "stop_token_ids": stop_ids(tok), "skip_special_tokens": False}
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        t0 = time.perf_counter()
        resp = await self._client.post(url.rstrip("/") + "/completions", json=body)
        resp.raise_for_status()
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(choice.get("text") or "", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                          choice.get("finish_reason") != "length", 1, round(time.perf_counter() - t0, 4))

    def _tokenizer(self, ckpt: Checkpoint):
        if ckpt.name not in self._tokenizers:
            from transformers import AutoTokenizer

            from slmtune.render import make_renderer

            tok = AutoTokenizer.from_pretrained(ckpt.path)
            self._tokenizers[ckpt.name] = (tok, make_renderer(tok))
        return self._tokenizers[ckpt.name]

    def loaded(self) -> dict:
        return {"exports": [], "bases": {}, "vllm": {"urls": self.urls, "default": self.default_url}}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def vllm_commands(checkpoints: list[Checkpoint], first_port: int = 8001) -> list[dict]:
    """How to serve these exports with vLLM: one server per merged export, one per base for its adapters
    (`--lora-modules`). Each item: {"command", "url", "models"}."""
    import shlex

    out, port = [], first_port
    hermes = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    for ck in (c for c in checkpoints if c.format != "adapter"):
        cmd = ["vllm", "serve", ck.path, "--served-model-name", ck.name, "--host", "127.0.0.1", "--port", str(port),
               *hermes]
        out.append({"command": shlex.join(cmd), "url": f"http://127.0.0.1:{port}/v1", "models": [ck.name]})
        port += 1
    by_base: dict[str, list[Checkpoint]] = {}
    for ck in (c for c in checkpoints if c.format == "adapter"):
        by_base.setdefault(ck.base_path or "?", []).append(ck)
    for base, cks in by_base.items():
        r = max(_lora_rank(c.path) for c in cks)
        rank = max(8, 1 << (r - 1).bit_length())  # vLLM takes ranks 8, 16, 32, ...: the next one up
        cmd = ["vllm", "serve", base, "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
               "--max-lora-rank", str(rank), "--max-loras", str(len(cks)), "--lora-modules",
               *(f"{c.name}={c.path}" for c in cks), *hermes]
        out.append({"command": shlex.join(cmd), "url": f"http://127.0.0.1:{port}/v1", "models": [c.name for c in cks]})
        port += 1
    return out


def _lora_rank(adapter_dir: str) -> int:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("r") or 16)
    except (OSError, ValueError):
        return 16
