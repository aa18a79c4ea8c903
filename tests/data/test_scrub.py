"""Scrubbing issue 12's kinds: HF/Stripe/Google keys, UK phones, dates of birth and passport numbers (regex),
names and street addresses (presidio, pattern-only, for real), in the system prompt, the user turn, tool-call
arguments and tool results; ordinary values survive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.data.backends import get_backend
from slmtune.data.ingest import to_record
from slmtune.data.scrub import scrub_record, scrub_text
from slmtune.io import read_jsonl, write_jsonl
from slmtune.records import record_problems
from slmtune.synthetic.logs import generate_logs_placed
from slmtune.synthetic.pii import PLACES, PLANTED

REGEX_KINDS = ("hf_token", "stripe_key", "google_key", "uk_phone", "dob", "passport", "email")
PRESIDIO_KINDS = ("person", "address")


def place_text(rec: dict, place: str) -> str:
    system, user, call, tool, _ = rec["messages"]
    return {"system": system["content"], "user": user["content"], "tool_result": tool["content"],
            "tool_args": call["tool_calls"][0]["function"]["arguments"]}[place]


def all_text(rec: dict) -> str:
    """Every message's text with JSON decoded, so an escaped value (\\u00fc, \\n) is seen as written."""
    parts = [place_text(rec, p) for p in PLACES] + [rec["messages"][-1]["content"]]
    return "\n".join(parts + [json.dumps(json.loads(place_text(rec, p)), ensure_ascii=False).replace("\\n", "\n")
                              for p in ("tool_args", "tool_result")])


def leaked(truth: dict, text: str) -> bool:
    value = truth["value"]
    forms = {value, value.replace(" ", "")}
    if truth["kind"] == "person":
        forms.add(value.split()[-1])
    if truth["kind"] == "address":
        forms.add(value.split(",")[0])
    return any(f in text for f in forms)


@pytest.fixture(scope="module")
def placed():
    # 144 logs: every kind in every place 4 times; half the JSON cases hold the value under its own key.
    return [(to_record(log)[0], truth) for log, truth in generate_logs_placed(144, seed=5)]


@pytest.fixture(scope="module")
def presidio():
    return get_backend("presidio")


@pytest.mark.parametrize("place", PLACES)
def test_regex_catches_every_new_kind_in_every_place(placed, place):
    assert set(REGEX_KINDS) | set(PRESIDIO_KINDS) == set(PLANTED)
    cases = [(rec, t) for rec, t in placed if t["place"] == place and t["kind"] in REGEX_KINDS]
    assert {t["kind"] for _, t in cases} == set(REGEX_KINDS)
    for rec, truth in cases:
        out, counts = scrub_record(rec)
        assert not leaked(truth, all_text(out)), truth
        assert f"<{truth['type']}_1>" in place_text(out, place), (truth, place_text(out, place))
        assert counts[truth["type"]] >= 1 and record_problems(out) == []  # tool arguments are still JSON


@pytest.mark.parametrize("place", PLACES)
def test_presidio_catches_names_and_addresses_in_every_place(placed, presidio, place):
    cases = [(rec, t) for rec, t in placed if t["place"] == place]
    for rec, truth in cases:
        out, _ = scrub_record(rec, presidio)
        assert not leaked(truth, all_text(out)), truth
        if truth["kind"] in PRESIDIO_KINDS:
            assert f"<{truth['type']}_1>" in place_text(out, place), (truth, place_text(out, place))


@pytest.mark.parametrize("scrubber", ["regex", "presidio"])
def test_ordinary_values_survive(placed, scrubber):
    backend = get_backend(scrubber)
    for rec, truth in placed:
        text = all_text(scrub_record(rec, backend)[0])
        for value in truth["ordinary"]:
            assert value in text, (scrubber, value)


def test_issue_examples_and_one_placeholder_per_phone_across_places():
    rec = {"id": "x", "messages": [
        {"role": "system", "content": "Escalations: 020 7946 0018. Stripe: sk_live_4eC39HqLyjWDarjtT1zdp7dc"},
        {"role": "user", "content": "Call me on +44 20 7946 0018 or 07700 900123. My HF token is "
                                    "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567, maps key "
                                    "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "crm", "arguments": json.dumps({"phone": "(020) 7946 0018", "dob": "02/04/1990",
                                                    "passport_no": "533380006"})}}]},
        {"role": "tool", "tool_call_id": "c", "content": json.dumps({"restricted": "rk_live_51H8abcdEFGHijkl",
                                                                      "note": "Date of birth: 2 April 1990"})},
        {"role": "assistant", "content": "Updated."}]}
    out, counts = scrub_record(rec)
    system, user, call, tool, _ = out["messages"]
    assert system["content"] == "Escalations: <PHONE_1>. Stripe: <API_KEY_1>"
    assert user["content"] == "Call me on <PHONE_1> or <PHONE_2>. My HF token is <API_KEY_2>, maps key <API_KEY_3>"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {
        "phone": "<PHONE_1>", "dob": "<DOB_1>", "passport_no": "<PASSPORT_1>"}
    assert json.loads(tool["content"]) == {"restricted": "<API_KEY_4>", "note": "Date of birth: <DOB_2>"}
    assert counts == Counter({"API_KEY": 4, "PHONE": 2, "DOB": 2, "PASSPORT": 1})


@pytest.mark.parametrize("text", [
    "Order #48213977 was placed on 2026-03-14 and shipped on 03/15/2026 at 14:30.",
    "It cost $1,249.99 (£980.50); we run version 2.14.3, build 0.5.1, INV-2026-00413, CUS-000123.",
    "I was born in Leeds and the passport office is closed on 12 March 2026.",
    "Ticket 02079 was reopened; reference 0.20794600; call count 1234567 today.",
    "The key question is whether the test_live_ flag and the hf_ prefix are documented.",
    "My date of birth changed? No, but the birthday party is on Saturday.",
])
def test_ordinary_text_is_left_alone(text, presidio):
    assert scrub_text(text, {}, Counter()) == text
    assert scrub_text(text, {}, Counter(), presidio) == text


@pytest.mark.parametrize("text, expected", [
    ("Hi, my name is Ann Smith and I live at 221B Baker Street, London NW1 6XE.",
     "Hi, my name is <PERSON_1> and I live at <ADDRESS_1>."),
    ("This is Jean-Luc O'Brien from Acme; send it to 12 High St., Flat 3, Leeds LS1 4AP",
     "This is <PERSON_1> from Acme; send it to <ADDRESS_1>"),
    ("Best regards,\nMaria Kowalski\nAcme Corp", "Best regards,\n<PERSON_1>\nAcme Corp"),
    ("Please ship to 1600 Pennsylvania Avenue, Washington, DC 20500 by Friday.",
     "Please ship to <ADDRESS_1> by Friday."),
    ("Name: Keiko Tanaka, address: 42 Elm Road, Springfield, IL 62704", "Name: <PERSON_1>, address: <ADDRESS_1>"),
    ("Dear Ms Müller, I was born on 3rd of May 1988.", "Dear <PERSON_1>, I was born on <DOB_1>."),
])
def test_presidio_finds_names_and_addresses_in_sentences(text, expected, presidio):
    assert scrub_text(text, {}, Counter(), presidio) == expected


@pytest.mark.parametrize("text", [
    "I am still waiting. This is urgent. I am on the Pro plan and The Router X2 is down.",
    "Thanks for the quick reply, it works now. Best of luck with the launch!",
    "We moved 3 servers to the new rack on Monday; 2 Park views were cached.",
    "Our team in London uses the Router X2 and reports to Support.",
])
def test_presidio_leaves_ordinary_sentences_alone(text, presidio):
    assert scrub_text(text, {}, Counter(), presidio) == text


def test_curate_cli_with_presidio_end_to_end(tmp_path):
    placed = list(generate_logs_placed(72, seed=9))
    truths = [truth for _, truth in placed]
    write_jsonl(tmp_path / "logs.jsonl", [log for log, _ in placed])
    runner = CliRunner()
    for args in (["ingest", str(tmp_path / "logs.jsonl"), "-o", str(tmp_path / "r.jsonl")],
                 ["curate", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "c.jsonl"), "--report",
                  str(tmp_path / "rep.json"), "--scrubber", "presidio", "--near-dup", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    kept = {rec["id"]: rec for rec in read_jsonl(tmp_path / "c.jsonl")}
    assert len(kept) == 72
    for truth in truths:
        assert not leaked(truth, all_text(kept[truth["id"]])), truth
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["settings"]["scrubber"] == "presidio"
    assert {"PERSON", "ADDRESS", "DOB", "PASSPORT", "PHONE", "API_KEY"} <= set(report["pii_placeholders"])
    assert report["pii_placeholders"]["PERSON"] == sum(t["kind"] == "person" for t in truths)


def test_presidio_scrubber_imports_neither_torch_nor_transformers():
    # spaCy and presidio pull both in when installed (~8 s per curate worker) for NER this scrubber never runs.
    code = ("import sys; from slmtune.data.backends import get_backend; get_backend('presidio'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_installed_spacy_ner_model_adds_its_person_names(tmp_path):
    """A real spaCy package named en_core_web_sm (an entity ruler, no download) on the path: its PERSON
    entities are scrubbed even without a cue; its places are not."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Zelda Quux"},
                                               {"label": "GPE", "pattern": "Paris"}])
    package = tmp_path / "en_core_web_sm"
    package.mkdir()
    nlp.to_disk(package / "model")
    (package / "__init__.py").write_text(
        "from pathlib import Path\nfrom spacy.util import load_model_from_path\n\n\ndef load(**overrides):\n"
        "    return load_model_from_path(Path(__file__).parent / 'model', **overrides)\n")
    (tmp_path / "en_core_web_sm-3.8.0.dist-info").mkdir()
    (tmp_path / "en_core_web_sm-3.8.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: en_core_web_sm\nVersion: 3.8.0\n")
    code = ("from collections import Counter; from slmtune.data.backends import get_backend; "
            "from slmtune.data.scrub import scrub_text; "
            "print(scrub_text('Yesterday Zelda Quux called from Paris; my name is Ann Lee.', {}, Counter(), "
            "get_backend('presidio')))")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "Yesterday <PERSON_1> called from Paris; my name is <PERSON_2>."

