"""Scrubber backends beside the built-in regexes: `slmtune curate --scrubber regex|presidio`.

`presidio` finds names, street addresses and dates of birth, which regexes alone miss.

A presidio-analyzer `AnalyzerEngine` on slmtune's own pattern recognizers — a name after a cue ("my name is",
"Name:", a sign-off at a line end), a street address (house number + street type, town, UK postcode, US state +
ZIP, or after "I live at"), a date of birth after its cue — plus the PERSON findings of a spaCy NER model when
one is installed (`en_core_web_sm`/`md`/`lg`); nothing is ever downloaded. Its findings are added to the regex
scrubber's (`slmtune.data.scrub`), which always runs.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

from slmtune.data.scrub import CACHE_MAX_ENTRIES, CACHE_MIN_CHARS, CUE_GAP, DATE, DOB_CUE, Backend, Span
from slmtune.errors import SlmtuneError


def get_backend(name: str) -> Backend | None:
    """None for the built-in regex scrubber (always on); a callable adding a model-based detector's spans."""
    if name == "regex":
        return None
    if name == "presidio":
        return presidio_backend()
    raise SlmtuneError(f"unknown scrubber {name!r}.", "Use regex or presidio.")

# spaCy pipelines with an English NER, best first; the first one installed adds PERSON from its NER. None is
# ever downloaded: without one, the presidio scrubber runs on patterns alone.
# (en_core_web_trf is left out: it needs torch, and a transformer per text is too slow for logs.)
NER_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm")
_PRESIDIO_TYPES = {"PERSON": "PERSON", "STREET_ADDRESS": "ADDRESS", "DATE_OF_BIRTH": "DOB"}


def presidio_backend() -> Backend:
    """A presidio-analyzer AnalyzerEngine on slmtune's name, address and date-of-birth recognizers."""
    import importlib.util

    if importlib.util.find_spec("presidio_analyzer") is None:
        raise SlmtuneError("the presidio scrubber needs presidio-analyzer.",
                           "`pip install 'slmtune[presidio]'`, or use --scrubber regex.")
    with _hidden("torch", "transformers"):
        engine, ner = _analyzer()
    entities = list(_PRESIDIO_TYPES)
    cache: dict[str, list[Span]] = {}  # agents repeat long texts, as for cached_spans

    def presidio(text: str) -> list[Span]:
        if not ner and not _presidio_may_match(text):
            return []  # no cue, title, street word or postcode: no pattern below can match
        spans = cache.get(text)
        if spans is None:
            found = engine.analyze(text=text, language="en", entities=entities, score_threshold=0.5)
            spans = _merged([(r.start, r.end, _PRESIDIO_TYPES[r.entity_type]) for r in found])
            if len(text) >= CACHE_MIN_CHARS:
                if len(cache) >= CACHE_MAX_ENTRIES:
                    cache.clear()
                cache[text] = spans
        return spans
    return presidio


@contextlib.contextmanager
def _hidden(*modules: str) -> Iterator[None]:
    """Import with `modules` unavailable unless already imported. presidio-analyzer and spaCy (via thinc) import
    torch and transformers when installed, only for transformer NER this scrubber never runs: hiding them
    takes presidio's import from ~10 s to ~2 s, in every curate worker, and keeps curate off the training stack.
    """
    hidden = [m for m in modules if m not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # None in sys.modules: `import torch` raises ImportError
    try:
        yield
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def _analyzer():
    """(AnalyzerEngine, name of the spaCy NER model it uses or None)."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

    nlp, ner = _nlp_engine()
    registry = RecognizerRegistry(recognizers=presidio_recognizers(), supported_languages=["en"])
    if ner:
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer

        registry.add_recognizer(SpacyRecognizer(supported_entities=["PERSON"]))
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"]), ner


def _nlp_engine():
    """(presidio NLP engine, name of its NER model or None): the installed NER model, else one that loads none."""
    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    ner = next((m for m in NER_MODELS if spacy.util.is_package(m)), None)
    if ner:  # installed, so presidio's loader finds it and downloads nothing
        return SpacyNlpEngine(models=[{"lang_code": "en", "model_name": ner}]), ner
    try:
        # No tokenizer at all: the pattern recognizers carry their cues, and spaCy's tokens and lemmas cost
        # ~10x the patterns on a 2 kB support thread.
        from presidio_analyzer.nlp_engine import NoOpNlpEngine
    except ImportError:  # older presidio: a blank English tokenizer, what load() would set minus its download
        engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
        engine.nlp = {"en": spacy.blank("en")}
        return engine, None
    return NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}]), None


def _merged(spans: list[Span]) -> list[Span]:
    """Overlapping findings (an address and the postcode in it) as one span: the union, the longest's type."""
    out: list[Span] = []
    for start, end, kind in sorted(spans, key=lambda s: (s[0], s[0] - s[1])):
        if out and start < out[-1][1]:
            a, b, k = out[-1]
            out[-1] = (a, max(b, end), k if b - a >= end - start else kind)
        else:
            out.append((start, end, kind))
    return out


# Presidio patterns run on the `regex` module: lookbehinds of any width, \p{Lu} for capitals of any script.
_NAME = r"\p{Lu}(?:[\p{Ll}'’]|\p{Lu}(?=\p{Ll}))*\p{Ll}(?:-\p{Lu}\p{Ll}+)?"  # Ann, O'Brien, McKay, Jean-Luc
_PARTICLE = r"(?:van|von|de|da|del|der|di|du|le|la|bin|al|ten)"
FULL_NAME = rf"{_NAME}(?:[ \t]+(?:{_PARTICLE}[ \t]+)?{_NAME}){{0,3}}"
_NOT_NAMES = ("The|A|An|Not|No|Very|Just|Still|So|Here|There|It|This|That|What|Sorry|Happy|Glad|Looking|Writing|"
              "Calling|Trying|Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|January|February|March|"
              "April|May|June|July|August|September|October|November|December|Support|Customer|Team")
# A sign-off ("Thanks,", "Best regards,") is a cue only at the end of its line: "Thanks, Great work" is not.
NAME_CUE = (r"(?i:\bmy[ \t]+name[ \t]+is|\bname[ \t]+is|\bi[ \t]+am|\bi[’']m|\bthis[ \t]+is|\bcalled|name[ \t]*[:=]|"
            r"\bsigned(?:[ \t]+by)?|\bdear|\bfrom:|\b(?:mr|mrs|ms|miss|mx|dr|prof)\b\.?|"
            r"\b(?:thanks|thank[ \t]+you|best|regards|sincerely|cheers|yours|love)[ \t]*[,!.]?[ \t]*\n)")
_STREET_TYPES = ("Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Close|Court|Ct|Crescent|Cres|Place|"
                 "Pl|Square|Sq|Terrace|Way|Gardens|Grove|Hill|Row|Mews|Parade|Walk|Highway|Hwy|Parkway|Pkwy|"
                 "Circle|Cir|Trail|Park|Green|Rise|Wharf|Quay|Plaza")
UK_POSTCODE = r"\b(?:[A-Z]{1,2}\d[A-Z\d]?|GIR)[ \t]*\d[ABD-HJLNP-UW-Z]{2}\b"
_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|"
           "ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY")
US_ZIP = rf"\b(?:{_STATES})[ \t]+\d{{5}}(?:-\d{{4}})?\b"
_HOUSE = r"\b\d{1,5}[A-Za-z]?(?:[-/]\d{1,5})?,?[ \t]+"
_WORD = r"\p{Lu}[\p{L}'’.-]*"
# After the street: a flat, a town (capital then lower case, so "IL" or "NW1" stay for the codes) and a code.
_TAIL = (rf"(?:,?[ \t]+(?:Apt|Apartment|Flat|Suite|Unit)\.?[ \t]*\#?\w+)?(?:,[ \t]*\p{{Lu}}\p{{Ll}}[\p{{L}}'’-]*"
         rf"(?:[ \t]+\p{{Lu}}\p{{Ll}}[\p{{L}}'’-]*){{0,2}})?(?:,?[ \t]+(?:{UK_POSTCODE}|{US_ZIP}))?")
STREET_ADDRESS = rf"{_HOUSE}(?:{_WORD}[ \t]+){{1,4}}(?:{_STREET_TYPES})\b\.?{_TAIL}"
ADDRESS_CUE = (r"(?i:\bi[ \t]+live[ \t]+at|\blives[ \t]+at|\bliving[ \t]+at|\bmy[ \t]+address[ \t]+is|"
               r"address[ \t]*[:=]|\bship(?:ping)?[ \t]+(?:it[ \t]+)?to|\bdeliver(?:ed|y)?[ \t]+(?:it[ \t]+)?to|"
               r"\bresid(?:e|ing)[ \t]+at)")
CUED_ADDRESS = (rf"(?:(?:Flat|Apt|Apartment|Unit|Suite)\.?[ \t]*\w+,?[ \t]+)?\d{{1,5}}[A-Za-z]?,?[ \t]+{_WORD}"
                rf"(?:[ \t]+{_WORD}){{0,4}}{_TAIL}")
# The presidio scrubber only analyzes a text holding a cue (a substring of the lower-cased text: ~40 scans
# at ~1 GB/s; a sign-off only with a line break), a title, or a digit before a street word or in a postcode:
# ~1 text in 9 of the synthetic agent logs.
_CUE_WORDS = ("name is", "name:", "name=", "name :", "name =", "i am", "i'm", "i’m", "this is", "called", "signed",
              "dear", "from:", "live at", "lives at", "living at", "address is", "address:", "address=", "address :",
              "address =", "ship to", "shipping to", "ship it to", "deliver to", "delivered to", "delivery to",
              "deliver it to", "reside at", "residing at", "birth", "dob", "born", "d.o.b")
_SIGN_OFFS = ("thank", "best", "regards", "sincerely", "cheers", "yours", "love")
# No leading \b: a pattern that starts with a set of characters is scanned ~10x faster by `re`.
_TITLES = re.compile(r"(?:Mrs?|Ms|Miss|Mx|Dr|Prof)\.?[ \t]+[A-Z]")
_PLACE_TRIGGER = re.compile(rf"\d[ \t]+[A-Z][\w'.-]*[ \t]+(?:[\w'.-]+[ \t]+){{0,3}}(?:{_STREET_TYPES})\b|"
                            r"[A-Z]{1,2}\d[A-Z\d]?[ \t]*\d[A-Z]{2}\b|[A-Z]{2}[ \t]+\d{5}")


def _presidio_may_match(text: str) -> bool:
    lower = text.lower()
    return (any(w in lower for w in _CUE_WORDS) or "\n" in text and any(w in lower for w in _SIGN_OFFS)
            or bool(_TITLES.search(text) or _PLACE_TRIGGER.search(text)))


def presidio_recognizers() -> list:
    """PatternRecognizers for PERSON (after a name cue), STREET_ADDRESS and DATE_OF_BIRTH (after a cue)."""
    from presidio_analyzer import Pattern, PatternRecognizer

    def recognizer(entity: str, *patterns: tuple[str, str, float]) -> PatternRecognizer:
        # Case matters (a name is capitalised), so no IGNORECASE; cues carry their own (?i:...).
        return PatternRecognizer(supported_entity=entity, name=f"slmtune_{entity.lower()}",
                                 patterns=[Pattern(n, p, score) for n, p, score in patterns],
                                 global_regex_flags=0)
    # Each pattern opens with a one-character lookahead: the `regex` module then tries the costly cue
    # lookbehind at ~1 position in 20 instead of all (DATE_OF_BIRTH: ~500 -> ~70 ns per character).
    return [
        recognizer("PERSON", ("cued name", rf"(?=\p{{Lu}})(?<={NAME_CUE}[ \t]*,?\n?[ \t]*)(?!(?:{_NOT_NAMES})\b)"
                                           rf"{FULL_NAME}", 0.7)),
        recognizer("STREET_ADDRESS", ("street", STREET_ADDRESS, 0.65),
                   ("cued address", rf"(?=[\dFAUS])(?<={ADDRESS_CUE}[ \t]*[:,]?[ \t]*){CUED_ADDRESS}", 0.7),
                   ("uk postcode", UK_POSTCODE, 0.55), ("us state zip", US_ZIP, 0.55)),
        recognizer("DATE_OF_BIRTH", ("cued date", rf"(?=[\dJFMASONDjfmasond])(?<=(?i:{DOB_CUE}{CUE_GAP}))(?i:{DATE})",
                                     0.8)),
    ]
