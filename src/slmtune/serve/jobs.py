"""What the serving engines take and give: a routed export (`Checkpoint`), how to answer (`Params`), the answer
(`Completion`), a queued request (`Job`) and the two ways one request fails alone (`PromptTooLong`,
`GrammarFailed`); the queue a CPU engine's worker thread takes requests from (`JobQueue`) and awaiting one
(`await_job`)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
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
    threshold: float | None = None  # router.json: answers less confident than this go upstream (low_confidence)


@dataclass(frozen=True)
class Completion:
    text: str  # the model's text before the end-of-turn token
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # stopped on end of turn (False: cut at max_tokens)
    batch_size: int  # requests generated together with this one
    generate_s: float  # wall time of that batch
    confidence: float | None = None  # `slmtune.infer.confidence` of the answer; None: not known (sampled, vLLM)


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


DEFAULT_PARAMS = Params()


@dataclass
class Job:
    """One queued request; `future` resolves to its `Completion` (or the error that stopped it)."""

    ckpt: Checkpoint
    record: dict
    params: Params
    deadline: float  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the caller stopped waiting


class JobQueue:
    """Requests waiting for one worker thread (the embedded engine's `Batcher`, the llama.cpp engine): `enqueue`
    adds a `Job` under the condition the worker waits on; the worker takes jobs from `_pending`."""

    def __init__(self) -> None:
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False

    def enqueue(self, ckpt: Checkpoint, record: dict, params: Params) -> Job:
        job = Job(ckpt, record, params, time.monotonic() + params.timeout_s)
        with self._cond:
            if self._closed:
                raise SlmtuneError("the engine is closed.")
            self._pending.append(job)
            self._cond.notify()
        return job


async def await_job(job: Job) -> Completion:
    """The job's completion. Cancelling the caller (a timeout, a client that went away) cancels the job: a queued
    request never starts, a running one stops at its next token."""
    import asyncio

    try:
        return await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.cancelled.set()
        job.future.cancel()
        raise
