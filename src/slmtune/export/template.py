"""The chat template an export carries: `slmtune.render`'s format, written in Jinja, so any server prompts the
model exactly as training did.

When the base template handles tools natively (`Renderer.mode == "native"`) it is kept as is. Otherwise
(``slmtune-hermes``: SmolLM2's ChatML and most small models ignore `tools`) `export_template` returns a prelude
followed by the original template text. The prelude rebuilds `messages` the way `render.chat_messages` does —
tool specs appended to the system turn inside `<tools></tools>` (`TOOLS_PREAMBLE`, a system turn added when there
is none), each assistant tool call as a ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` block
after any text, each `tool` message as a user turn ``<tool_response>\\n...\\n</tool_response>`` — then rebinds
`messages` to that list and `tools` to none (with `data.tool_docs: compact`, the training tokenizer's template
marked so, each tool is its signature line — `slmtune_sig`, as `render.tool_signature` writes it), and the
original template (its ``{% generation %}`` markers
included) renders them. So transformers' ``apply_chat_template(messages, tools=tools,
add_generation_prompt=True)`` on the export gives `render.prompt_text` byte for byte, and with the target turn
the prompt + target of `render.render_pair`. vLLM renders with the same transformers Jinja environment
(`tojson` = ``json.dumps(x, ensure_ascii=False)``), so `vllm serve --tool-call-parser hermes` does too.

**Tool-call arguments.** Training decodes `arguments` and re-dumps them with `json.dumps` default separators.
Objects (dicts — what vLLM and transformers' tool-use docs pass) go through `tojson`: the same call, the same
bytes. OpenAI-style JSON *strings* cannot be parsed in Jinja, so the prelude re-serialises them with a small
JSON scanner (`slmtune_json`): whitespace dropped, ``", "`` and ``": "`` separators, ``\\uXXXX`` escapes decoded
(surrogate pairs joined; quotes, backslashes and control characters escaped as `json.dumps` escapes them),
``\\/`` → ``/``, numbers re-spelled through Python's int/float (``1.50`` → ``1.5``, ``1E2`` → ``100.0``). That
equals ``json.dumps(json.loads(s), ensure_ascii=False)`` for valid JSON without duplicate keys, compact or
spaced alike. A string the scanner sees as broken (unbalanced brackets, an open string, a bare word such as
``Oslo``) is quoted as a JSON string, as training quotes arguments `json.loads` rejects; malformed JSON that still
balances (``{"a" 1}``) and duplicate keys are where the two can differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmtune.render import TOOLS_PREAMBLE, Renderer

_MARK = "\x00"
_HEAD, _TAIL = TOOLS_PREAMBLE.format(tools=_MARK).split(_MARK)

# Every tag strips the whitespace around it, so the prelude itself renders nothing. It ends with a plain `%}`
# and one newline (eaten by trim_blocks) so the original template is lexed exactly as when it stood alone.
_PRELUDE = """\
{#- slmtune-hermes: tools in the system turn, <tool_call> JSON blocks, tool results as <tool_response> user turns
    (see slmtune.render); the base template below renders the rebuilt messages. -#}
{%- macro slmtune_char(c) -%}
  {%- if c == 34 -%}{{ '\\\\"' }}
  {%- elif c == 92 -%}{{ '\\\\\\\\' }}
  {%- elif c == 10 -%}{{ '\\\\n' }}
  {%- elif c == 13 -%}{{ '\\\\r' }}
  {%- elif c == 9 -%}{{ '\\\\t' }}
  {%- elif c == 8 -%}{{ '\\\\b' }}
  {%- elif c == 12 -%}{{ '\\\\f' }}
  {%- elif c < 32 -%}{{ '\\\\u%04x' | format(c) }}
  {%- else -%}{{ '%c' | format(c) }}
  {%- endif -%}
{%- endmacro -%}
{%- macro slmtune_scalar(t) -%}
  {%- if t in ('true', 'false', 'null', 'NaN', 'Infinity', '-Infinity') -%}{{ t }}
  {%- elif (t[1:] if t[0] == '-' else t).isdigit() -%}{{ t | int | tojson }}
  {%- elif t[0] in '-0123456789' and t | float(none) is not none -%}{{ t | float | tojson }}
  {%- endif -%}
{%- endmacro -%}
{%- macro slmtune_json(s) -%}
  {%- set st = namespace(out='', tok='', instr=false, skip=0, depth=0, ok=true) -%}
  {%- for ch in s ~ ' ' -%}
    {%- set i = loop.index0 -%}
    {%- if st.skip > 0 -%}
      {%- set st.skip = st.skip - 1 -%}
    {%- elif st.instr and ch == '\\\\' -%}
      {%- set e = s[i + 1:i + 2] -%}
      {%- if e == 'u' -%}
        {%- set code = s[i + 2:i + 6] | int(-1, 16) if s[i + 2:i + 6] | length == 4 else -1 -%}
        {%- set low = s[i + 8:i + 12] | int(-1, 16) if s[i + 6:i + 8] == '\\\\u' else -1 -%}
        {%- if 55296 <= code < 56320 and 56320 <= low < 57344 -%}
          {%- set st.out = st.out ~ slmtune_char(65536 + (code - 55296) * 1024 + (low - 56320)) -%}
          {%- set st.skip = 11 -%}
        {%- elif code >= 0 -%}
          {%- set st.out = st.out ~ slmtune_char(code) -%}
          {%- set st.skip = 5 -%}
        {%- else -%}
          {%- set st.ok = false -%}
        {%- endif -%}
      {%- else -%}
        {%- set st.out = st.out ~ ('/' if e == '/' else ch ~ e) -%}
        {%- set st.skip = 1 -%}
      {%- endif -%}
    {%- elif st.instr -%}
      {%- set st.out = st.out ~ ch -%}
      {%- set st.instr = ch != '"' -%}
    {%- elif ch in ' \\t\\n\\r,:{}[]"' -%}
      {%- if st.tok -%}
        {%- set v = slmtune_scalar(st.tok) -%}
        {%- set st.ok = st.ok and v != '' -%}
        {%- set st.out = st.out ~ v -%}
        {%- set st.tok = '' -%}
      {%- endif -%}
      {%- if ch == ',' or ch == ':' -%}
        {%- set st.out = st.out ~ ch ~ ' ' -%}
      {%- elif ch not in ' \\t\\n\\r' -%}
        {%- set st.out = st.out ~ ch -%}
        {%- set st.instr = ch == '"' -%}
        {%- set st.depth = st.depth + (1 if ch in '{[' else -1 if ch in '}]' else 0) -%}
        {%- set st.ok = st.ok and st.depth >= 0 -%}
      {%- endif -%}
    {%- else -%}
      {%- set st.tok = st.tok ~ ch -%}
    {%- endif -%}
  {%- endfor -%}
  {%- if st.ok and not st.instr and st.depth == 0 and st.out -%}{{ st.out }}{%- else -%}{{ s | tojson }}{%- endif -%}
{%- endmacro -%}
{%- macro slmtune_type(s) -%}
  {%- if s is not mapping -%}{{ 'any' }}
  {%- else -%}
    {%- if s['enum'] is defined and s['enum'] is iterable and s['enum'] is not string and s['enum'] is not mapping -%}
      {{- s['enum'] | map('tojson') | join('|') -}}
    {%- elif s['type'] == 'array' -%}{{ 'array<' ~ slmtune_type(s['items']) ~ '>' }}
    {%- elif s['type'] == 'object' and s['properties'] is mapping -%}{{ '{' ~ slmtune_fields(s) ~ '}' }}
    {%- elif s['type'] is string -%}{{ s['type'] }}
    {%- elif s['type'] is defined and s['type'] is iterable and s['type'] is not mapping -%}{{ s['type'] | join('|') }}
    {%- else -%}{{ 'any' }}
    {%- endif -%}
    {%- if s['default'] is defined -%}{{ ' = ' ~ (s['default'] | tojson) }}{%- endif -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro slmtune_fields(s) -%}
  {%- set req = s['required'] if s['required'] is defined and s['required'] is iterable and s['required'] is not string
      and s['required'] is not mapping else [] -%}
  {%- set props = s['properties'] if s['properties'] is mapping else {} -%}
  {%- for k, v in props.items() -%}
    {{- k ~ ('' if k in req else '?') ~ ': ' ~ slmtune_type(v) ~ (', ' if not loop.last else '') -}}
  {%- endfor -%}
{%- endmacro -%}
{%- macro slmtune_sig(t) -%}
  {%- set fn = t['function'] if t['function'] is defined and t['function'] else t -%}
  {{- (fn['name'] if fn['name'] is defined else '') ~ '(' ~ slmtune_fields(fn['parameters'] if fn['parameters'] is
      mapping else {}) ~ ')' -}}
{%- endmacro -%}
{%- macro slmtune_call(c) -%}
  {%- set fn = c['function'] if c['function'] is defined else c -%}
  {%- set a = fn['arguments'] -%}
  {{- '<tool_call>\\n{"name": ' ~ (fn['name'] | tojson) ~ ', "arguments": ' -}}
  {%- if a is not defined or a is none -%}{{ '{}' }}
  {%- elif a is string -%}{{ slmtune_json(a) }}
  {%- else -%}{{ a | tojson }}
  {%- endif -%}
  {{- '}\\n</tool_call>' -}}
{%- endmacro -%}
{%- set slmtune = namespace(messages=[]) -%}
{%- for m in messages -%}
  {%- set content = m['content'] or '' -%}
  {%- if m['role'] == 'tool' -%}
    {%- set msg = {'role': 'user', 'content': '<tool_response>\\n' ~ content ~ '\\n</tool_response>'} -%}
  {%- elif m['role'] == 'assistant' and m['tool_calls'] -%}
    {%- set calls = namespace(blocks=[]) -%}
    {%- for c in m['tool_calls'] -%}
      {%- set calls.blocks = calls.blocks + [slmtune_call(c)] -%}
    {%- endfor -%}
    {%- set blocks = calls.blocks | join('\\n') -%}
    {%- set msg = {'role': 'assistant', 'content': content ~ '\\n' ~ blocks if content else blocks} -%}
  {%- else -%}
    {%- set msg = {'role': m['role'], 'content': content} -%}
  {%- endif -%}
  {%- set slmtune.messages = slmtune.messages + [msg] -%}
{%- endfor -%}
{%- if tools -%}
  {%- set lines = namespace(items=[]) -%}
  {%- for t in tools -%}
    {%- set lines.items = lines.items + [SLMTUNE_TOOL_LINE] -%}
  {%- endfor -%}
  {%- set block = SLMTUNE_HEAD ~ (lines.items | join('\\n')) ~ SLMTUNE_TAIL -%}
  {%- if slmtune.messages and slmtune.messages[0]['role'] == 'system' -%}
    {%- set first = {'role': 'system', 'content': slmtune.messages[0]['content'] ~ '\\n\\n' ~ block} -%}
    {%- set slmtune.messages = [first] + slmtune.messages[1:] -%}
  {%- else -%}
    {%- set slmtune.messages = [{'role': 'system', 'content': block}] + slmtune.messages -%}
  {%- endif -%}
{%- endif -%}
{%- set tools = none -%}
{%- set messages = slmtune.messages %}
"""


def export_template(r: Renderer) -> str:
    """The chat template that renders records as `r` rendered them in training (see the module docstring)."""
    original = r.tokenizer.chat_template
    if r.mode == "native":
        return original
    prelude = _PRELUDE.replace("SLMTUNE_HEAD", json.dumps(_HEAD)).replace("SLMTUNE_TAIL", json.dumps(_TAIL))
    # `data.tool_docs`: a signature line per tool (as `render.tool_signature` writes it) or its JSON spec
    prelude = prelude.replace("SLMTUNE_TOOL_LINE", "slmtune_sig(t)" if r.tool_docs == "compact" else "t | tojson")
    return prelude + original


def save_tokenizer(r: Renderer, folder: str | Path) -> None:
    """Save `r`'s tokenizer into `folder` carrying `export_template(r)` (transformers 5 writes it to
    `chat_template.jinja`); the in-memory tokenizer keeps its training template."""
    tok = r.tokenizer
    original = tok.chat_template
    tok.chat_template = export_template(r)
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = original
