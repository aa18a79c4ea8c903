"""The decoding policy eval and serve share: `auto | free | constrained`, and what it means for a task."""

from __future__ import annotations

from slmtune.errors import SlmtuneError
from slmtune.infer import constrain
from slmtune.infer.calls import CLASSIFICATION, EXTRACTION, TOOL_CALLING

DECODINGS = ("auto", "free", "constrained")


def decoding_for(requested: str, category: str) -> str:
    """How model rows are decoded: `auto` = under the grammar for tool-calling tasks when llguidance is
    installed (as serving does), else free; a task without a grammar (text tasks) is always decoded free."""
    if requested not in DECODINGS:
        raise SlmtuneError(f"decoding {requested!r} is not one of {', '.join(DECODINGS)}.")
    if requested == "auto":
        return "constrained" if category == TOOL_CALLING and constrain.available() else "free"
    if requested == "constrained":
        if category not in (TOOL_CALLING, EXTRACTION, CLASSIFICATION):
            return "free"
        constrain.require()
    return requested
