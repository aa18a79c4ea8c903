"""The embedded engine's grammars: a request decoded under `constrained` gets the llguidance grammar of its
route's task — for tool calling the tools this request offers (narrowed to the one `tool_choice` names, a text
answer allowed or not), otherwise the task's output schema — compiled once per request before its batch runs, so
a schema llguidance refuses fails that request only (`GrammarFailed`: the guard's `schema_invalid`)."""

from __future__ import annotations

from slmtune.errors import SlmtuneError
from slmtune.serve.jobs import GRAMMAR_CAPS, GrammarFailed, Job
from slmtune.serve.model_cache import Loaded


def request_grammar(job: Job) -> str | None:
    """The grammar the request's answer must follow (None: the task has none)."""
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


def checked_grammar(lm: Loaded, job: Job) -> str | None:
    """`request_grammar`, compiled against the loaded model's tokenizer to prove llguidance takes it."""
    return compiled(ll_tokenizer(lm), job)[0]


def compiled(ll_tok, job: Job) -> tuple[str | None, object]:
    """The request's grammar and an llguidance matcher of it ((None, None): the task has none); a grammar that
    can't be built or compiled fails the request alone (`GrammarFailed`)."""
    from slmtune.infer import constrain

    try:
        grammar = request_grammar(job)
        if grammar is None:
            return None, None
        matcher = constrain.matcher(ll_tok, grammar)
    except Exception as e:  # noqa: BLE001 - a tool schema llguidance or `tighten` can't read
        why = e.message if isinstance(e, SlmtuneError) else f"{type(e).__name__}: {str(e)[:200]}"
        raise GrammarFailed(f"the request's tools could not become a grammar ({why[:300]})") from None
    return grammar, matcher


def ll_tokenizer(lm: Loaded):
    """llguidance's view of the loaded model's tokenizer (cached by `constrain.ll_tokenizer`)."""
    from slmtune.infer import constrain

    constrain.require()
    return constrain.ll_tokenizer(lm.tokenizer, lm.model.get_output_embeddings().weight.shape[0], lm.stops)
