"""Inference, shared by eval and serve: batched greedy generation (`generate`), grammars for constrained
decoding (`constrain`), the decoding policy (`decoding`: auto | free | constrained) and reading answers back
(`calls`: tool calls, JSON, labels, the offered tools). JSON-Schema checking is `slmtune.schema_check`, one floor
lower, since curate (a data stage) and render use it too."""

from __future__ import annotations

from slmtune.infer.calls import decode_calls, label_of, parse_json_text, tool_specs
from slmtune.infer.decoding import DECODINGS, decoding_for
from slmtune.infer.generate import generate, stop_ids

__all__ = ["DECODINGS", "decode_calls", "decoding_for", "generate", "label_of", "parse_json_text", "stop_ids",
           "tool_specs"]
