"""PII and secret scrubbing: detectors, typed placeholders consistent within a record, pluggable backends.

`scrub_record(rec)` replaces every detected value in every message's content (system prompts and tool
results included), *inside* tool-call arguments, which stay valid JSON, and in `meta` tags (not in
provenance such as source, line, timestamp, model, usage), with a typed placeholder:
`<EMAIL_1>`, `<PHONE_2>`, ... The same value gets the same placeholder everywhere in the record (matched
on a normalized form: e-mail lower-cased, numbers by their digits), so a tool call's arguments still refer
to what the conversation said. A JSON value's key is its cue: `{"dob": "1990-04-02"}` is read as
`dob: 1990-04-02`, so the date is a date of birth.

Types (PLACEHOLDER_TYPES): EMAIL, PHONE (international, North American and UK forms), CARD (Luhn-checked),
IBAN (mod-97-checked), SSN, IP (v4 and v6), API_KEY (OpenAI, AWS, GitHub, Slack, Hugging Face, Stripe,
Google, `key=`/`token=` values), JWT, SECRET (`password=` and `Bearer` values), PRIVATE_KEY (PEM blocks),
URL_CREDENTIALS (`user:pass@` in URLs), DOB (a date after "date of birth", "DOB", "born on"), PASSPORT
(after "passport number/no"). SECRET_TYPES are the ones `curate --on-secret drop` drops a record for.
Order ids, dates, prices, versions and SKUs survive.

A backend is a callable `text -> [(start, end, TYPE), ...]`; `regex` (default, no model download) and
`presidio` (`presidio-analyzer`; its findings are added to the regex ones): PERSON after a name cue ("my
name is", "Name:", "regards,"), ADDRESS (house number + street + Street/Rd/Ave..., UK postcodes, US state +
ZIP) and DOB, from patterns, plus PERSON from a spaCy NER model when one is installed. It downloads nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

Span = tuple[int, int, str]
Backend = Callable[[str], list[Span]]
PLACEHOLDER_TYPES = ("PRIVATE_KEY", "URL_CREDENTIALS", "JWT", "API_KEY", "SECRET", "DOB", "PASSPORT", "EMAIL",
                     "IBAN", "CARD", "SSN", "PHONE", "IP", "PERSON", "ADDRESS")
SECRET_TYPES = frozenset({"PRIVATE_KEY", "URL_CREDENTIALS", "JWT", "API_KEY", "SECRET"})
_PLACEHOLDER = re.compile(r"<[A-Z_]+_\d+>")
_TYPED_PLACEHOLDER = re.compile(rf"<(?:{'|'.join(PLACEHOLDER_TYPES)})_\d+>")

# A date as people write one: 02/04/1990, 1990-04-02, 2nd April 1990, April 2, 1990 (case-blind patterns).
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
          r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
DATE = (rf"(?:\d{{1,2}}[./-]\d{{1,2}}[./-](?:\d{{4}}|\d\d)|\d{{4}}[./-]\d{{1,2}}[./-]\d{{1,2}}|"
        rf"\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
        r"(?![\d/.-]\d)")
# What may stand between a cue and its value: `DOB: `, `passport number is `, `"date_of_birth": "`.
CUE_GAP = r"[\"']?\s*(?:[:=#-]\s*)?(?:(?:is|was|of|on|reads)\s*[:=]?\s*)?(?:the\s+)?[\"']?"
DOB_CUE = r"(?:date[\s_-]*of[\s_-]*birth|birth[\s_-]*date|birthday|\bd\.?o\.?b\b\.?|\bborn(?:\s+on)?)"

# (type, pattern, validator, gate). Earlier detectors win overlaps, so specific secrets come before the
# broad number patterns. Patterns with a group replace only the group (the secret after `password=`);
# values never end in '.', which is the sentence's full stop far more often than the secret's.
# Gates keep it fast: Python's `re` scans ~30 ns/char for a pattern that starts with \b or a lookbehind,
# so a pattern only runs when a cheap substring test says it can match; the number patterns only run
# inside "numeric runs" (digits with separators), which most text — system prompts above all — lacks.
_NUM = "num"
_DETECTORS: list[tuple[str, re.Pattern, str | None, Any]] = [
    ("PRIVATE_KEY", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
     None, ("PRIVATE KEY",)),
    ("URL_CREDENTIALS", re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,15}://([^\s:/@\"'<>]+:[^\s@/\"'<>]+)@"), None,
     ("://",)),
    ("JWT", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), None, ("eyJ",)),
    ("API_KEY", re.compile(r"\bsk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}"), None, ("sk-",)),
    ("API_KEY", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), None, ("AKIA", "ASIA")),
    ("API_KEY", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b"), None,
     ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    ("API_KEY", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), None, ("xox",)),
    ("API_KEY", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), None, ("hf_",)),  # Hugging Face: hf_ + 34 letters
    ("API_KEY", re.compile(r"\b(?:(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{24,})"), None,
     ("_live_", "_test_", "whsec_")),  # Stripe secret, restricted, publishable and webhook keys
    ("API_KEY", re.compile(r"\bAIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])"), None, ("AIza",)),  # Google API key
    ("API_KEY", re.compile(r"(?i)\b(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|client[_-]?secret|"
                           r"secret[_-]?key|aws_secret_access_key|token)[\"']?\s*[:=]\s*[\"']?"
                           r"([^\s\"',;<>]{7,}[^\s\"',;<>.])"),
     None, ("key", "token", "secret")),
    ("SECRET", re.compile(r"(?i)\b(?:password|passwd|pwd)[\"']?\s*[:=]\s*[\"']?([^\s\"',;<>]{2,}[^\s\"',;<>.])"), None,
     ("pass", "pwd")),
    ("SECRET", re.compile(r"(?i)\bBearer\s+([A-Za-z0-9._~+/-]{7,}[A-Za-z0-9_~+/-]=*)"), None, ("bearer",)),
    # Dates and document numbers are PII only after their cue: "born on 2 April 1990", not "shipped on ...".
    ("DOB", re.compile(rf"(?i){DOB_CUE}{CUE_GAP}({DATE})"), None, ("birth", "dob", "born", "d.o.b")),
    ("PASSPORT", re.compile(rf"(?i)\bpassport(?:[\s_-]*(?:number|num|no\b\.?|nr\b\.?|#|id))?{CUE_GAP}"
                            r"((?-i:[A-Z0-9]{6,10}))(?![\w-])"), "passport", ("passport",)),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None, ("@",)),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), "iban", _NUM),
    ("CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), "card", _NUM),
    ("SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"), None, _NUM),
    ("PHONE", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\d])"), "phone", _NUM),
    ("PHONE", re.compile(r"(?<![\w.-])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w-])"), None, _NUM),
    # UK national form: a trunk 0 and 9-10 digits, grouped by area or mobile code (020 7946 0018,
    # 07700 900123, 0161 496 0000, (01632) 960001); +44 forms are caught by the international pattern above.
    ("PHONE", re.compile(r"(?<![\w.+/-])(?:\(0\d{2,4}\)|0\d{2,4})(?:[ -]?\d{3,6}){1,2}(?![\w-])"), "uk_phone", _NUM),
    ("IP", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                      r"(?![\d]|\.\d)"), None, _NUM),
    ("IP", re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), "ipv6",
     re.compile(r":[0-9A-Fa-f]{0,4}:")),
]
# Every number detector matches only these characters, starting with a digit, '(' or '+' and ending
# with a digit, so each of its matches lies inside one of these runs.
_NUMERIC_RUN = re.compile(r"[\d(+][\d .()/+-]{5,}\d")


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def luhn_ok(number: str) -> bool:
    ds = [int(c) for c in _digits(number)][::-1]
    return 13 <= len(ds) <= 19 and sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
                                       for i, d in enumerate(ds)) % 10 == 0


def iban_ok(s: str) -> bool:
    raw = s.replace(" ", "")
    if not 15 <= len(raw) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in raw[4:] + raw[:4])) % 97 == 1


def _ipv6_ok(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return s.count(":") >= 4 or "::" in s and any(c.isalpha() for c in s)


def _uk_phone_ok(s: str) -> bool:
    d = _digits(s)
    return len(d) in (10, 11) and d[1] in "123789"  # 01/02/03 geographic, 07 mobile, 08/09 non-geographic


_VALIDATORS = {"card": luhn_ok, "iban": iban_ok, "phone": lambda s: 8 <= len(_digits(s)) <= 15, "ipv6": _ipv6_ok,
               "uk_phone": _uk_phone_ok, "passport": lambda s: sum(c.isdigit() for c in s) >= 2}
_TABLE = [(kind, p, 1 if p.groups else 0, check, gate, bool(p.flags & re.IGNORECASE))
          for kind, p, check, gate in _DETECTORS]


# Every detector needs one of these triggers, or one of the words in the lower-cased text. One check of a
# short text (an agent tag, a label, a JSON answer, a one-line question) costs ~2 us; the two dozen gated
# detectors below cost ~10-40 us. The words as substrings cost ~35% less than a case-blind alternation.
_ANY_TRIGGER = re.compile(r"@|://|:[0-9A-Fa-f]{0,4}:|[\d(+][\d .()/+-]{5,}\d|eyJ|BEGIN|AKIA|ASIA|sk-|gh[pousr]_|"
                          r"github_pat_|xox|hf_|_live_|_test_|whsec_|AIza")
_TRIGGER_WORDS = ("bearer", "key", "token", "secret", "pass", "pwd", "birth", "dob", "born", "d.o.b")


def _may_match(text: str) -> bool:
    if _ANY_TRIGGER.search(text):
        return True
    lower = text.lower()
    return any(w in lower for w in _TRIGGER_WORDS)


def regex_spans(text: str) -> list[Span]:
    """Non-overlapping (start, end, TYPE) spans, earlier detectors first."""
    if len(text) < 400 and not _may_match(text):
        return []
    spans: list[Span] = []
    lower = runs = None
    for kind, pattern, group, check, gate, case_blind in _TABLE:
        if gate == _NUM:
            if runs is None:
                runs = [m.span() for m in _NUMERIC_RUN.finditer(text)]
            if not runs:
                continue
            if kind == "IBAN":  # letters, so it cannot be searched within the runs; but it contains one
                found = pattern.finditer(text)
            else:
                # endpos + 2 lets the trailing lookaheads see past the run, as they would in the full text.
                found = [m for a, b in runs for m in pattern.finditer(text, a, b + 2)]
        elif isinstance(gate, tuple):
            if case_blind and lower is None:
                lower = text.lower()
            hay = lower if case_blind else text
            for g in gate:
                if g in hay:
                    break
            else:
                continue
            found = pattern.finditer(text)
        elif gate.search(text):
            found = pattern.finditer(text)
        else:
            continue
        for m in found:
            start, end = m.span(group)
            if check and not _VALIDATORS[check](m.group(group)):
                continue
            if not any(s < end and start < e for s, e, _ in spans):
                spans.append((start, end, kind))
    return spans


# Agent logs repeat long texts (the same system prompt and tool results in thousands of calls), so the
# spans of long texts are memoised. Bounded: at 20,000 entries of ~1-2 kB the cache is cleared (<40 MB).
_SPAN_CACHE: dict[str, list[Span]] = {}
CACHE_MIN_CHARS, CACHE_MAX_ENTRIES = 256, 20_000


def cached_spans(text: str) -> list[Span]:
    if len(text) < CACHE_MIN_CHARS:
        return regex_spans(text)
    spans = _SPAN_CACHE.get(text)
    if spans is None:
        if len(_SPAN_CACHE) >= CACHE_MAX_ENTRIES:
            _SPAN_CACHE.clear()
        spans = _SPAN_CACHE[text] = regex_spans(text)
    return spans


def scrub_text(text: str, table: dict, counts: Counter, backend: Backend | None = None,
               field: str | None = None) -> str:
    """`text` with every detected value replaced by its record-wide placeholder (kept in `table`).

    `field` is the JSON key the text is the value of: a cue for the detectors that need one.
    """
    spans = _field_spans(text, field, backend) if field and _FIELD_CUE.search(field) else _spans(text, backend)
    if not spans:
        return text
    out, pos = [], 0
    for start, end, kind in sorted(spans):
        out += [text[pos:start], _placeholder(text[start:end], kind, table, counts)]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _spans(text: str, backend: Backend | None) -> list[Span]:
    spans = list(cached_spans(text)) if text else []
    if backend is not None and text:
        spans += [s for s in backend(text) if not any(a < s[1] and s[0] < b for a, b, _ in spans)]
    return spans


# Keys that say what their value is: {"date_of_birth": ...}, {"passport_no": ...}, {"full_name": ...}.
_FIELD_CUE = re.compile(r"(?i)birth|dob|passport|name|addr|street|pass|pwd|secret|token|key")


def _field_spans(text: str, field: str, backend: Backend | None) -> list[Span]:
    """Spans of a JSON value read as `key: value`, the way its cue would be written in prose."""
    head = f"{field}: "
    n = len(head)
    return [(s - n, e - n, kind) for s, e, kind in _spans(head + text, backend) if s >= n]


def _placeholder(value: str, kind: str, table: dict, counts: Counter) -> str:
    if _PLACEHOLDER.fullmatch(value):
        return value
    key = (kind, _normal(value, kind))
    if key not in table:
        counts[kind] += 1
        n = sum(1 for k in table if k[0] == kind) + 1
        table[key] = f"<{kind}_{n}>"
    return table[key]


def _normal(value: str, kind: str) -> str:
    if kind in ("PHONE", "CARD", "SSN"):
        d = _digits(value)
        # +1 415 555 0134 and (415) 555-0134 are the same phone: compare the last 10 digits.
        return d[-10:] if kind == "PHONE" else d
    return value.replace(" ", "").lower() if kind in ("EMAIL", "IBAN") else value


def scrub_record(rec: dict, backend: Backend | None = None) -> tuple[dict, Counter]:
    """(scrubbed copy of `rec`, placeholders created per TYPE). Tool-call arguments stay valid JSON."""
    table: dict = {}
    counts: Counter = Counter()
    messages = []
    for m in rec["messages"]:
        m = dict(m)
        if isinstance(m.get("content"), str):
            scrub = _scrub_json_text if m.get("role") == "tool" else scrub_text
            m["content"] = scrub(m["content"], table, counts, backend)
        if m.get("tool_calls"):
            m["tool_calls"] = [_scrub_call(c, table, counts, backend) for c in m["tool_calls"]]
        messages.append(m)
    out = rec | {"messages": messages}
    if isinstance(rec.get("meta"), dict):
        # Gateways log the end user (`user`, `metadata.customer_email`, ...) beside the call: scrub those
        # too, keeping provenance fields as they are.
        out["meta"] = {k: v if k in _PROVENANCE else _walk(v, table, counts, backend, k)
                       for k, v in rec["meta"].items()}
    return out, counts


_PROVENANCE = frozenset({"source", "line", "format", "timestamp", "model", "usage", "latency_ms", "finish_reason"})


def _scrub_call(call: dict, table: dict, counts: Counter, backend: Backend | None) -> dict:
    fn = call.get("function") or {}
    if not isinstance(fn.get("arguments"), str):
        return call
    return call | {"function": fn | {"arguments": _scrub_json_text(fn["arguments"], table, counts, backend)}}


def _scrub_json_text(text: str, table: dict, counts: Counter, backend: Backend | None) -> str:
    """JSON text: scrub each string value and re-encode (keeps it valid JSON); other text: as plain text."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return scrub_text(text, table, counts, backend)
    if not isinstance(obj, (dict, list)):
        return scrub_text(text, table, counts, backend)
    new = _walk(obj, table, counts, backend)
    return text if new == obj else json.dumps(new, ensure_ascii=False)


def _walk(obj: Any, table: dict, counts: Counter, backend: Backend | None, field: str | None = None) -> Any:
    if isinstance(obj, str):
        return scrub_text(obj, table, counts, backend, field)
    if isinstance(obj, list):
        return [_walk(v, table, counts, backend, field) for v in obj]
    if isinstance(obj, dict):
        return {k: _walk(v, table, counts, backend, k) for k, v in obj.items()}
    return obj


def invented_placeholders(answer: Any, prompt: Any) -> list[str]:
    """The scrub placeholders (`<SECRET_1>`, `<EMAIL_2>`, ...) in `answer` that `prompt` does not hold, sorted.

    A model trained on scrubbed logs learns that a password or an address is written `<SECRET_1>`; asked with the
    real value in the prompt, it may still answer the placeholder: a well-formed answer that names a value it
    does not have. Serving defers such an answer and eval does not count it as answered (`placeholder`). Both
    arguments may be any JSON value (an assistant message, the prompt's messages); a placeholder the prompt itself
    holds may be copied."""
    found = set(_TYPED_PLACEHOLDER.findall(_as_text(answer)))
    return sorted(found - set(_TYPED_PLACEHOLDER.findall(_as_text(prompt)))) if found else []


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
