"""Fake people, PII, secrets and decoy numbers for the synthetic logs (see `synthetic.py`).

Every generator takes a `random.Random` so output is deterministic given the seed. Card numbers pass
Luhn and IBANs pass mod-97, like the real thing; decoys (order ids, dates, prices, versions, SKUs) are
numbers a scrubber must leave alone.

`PLANTED` holds the kinds a support agent's logs carry that issue 12 found leaking (Hugging Face, Stripe
and Google keys, UK phones, dates of birth, passport numbers, names, street addresses), each as it is
written in prose and as a JSON field; `ordinary` gives the values around them that must survive.
"""

from __future__ import annotations

import base64
import random
import string

FIRST = ("Alice Bruno Chloe Daniel Emma Farid Grace Hiro Ines Jonas Keiko Liam Maya Noah Olga Pedro Quinn Rosa "
         "Samir Tara Umar Vera Wei Ximena Yusuf Zoe Marta Lukas Anya Tomas Priya Diego Sofia Mateo Lena "
         "Oscar Nadia Ravi Elena Hugo").split()
LAST = ("Smith Garcia Müller Rossi Tanaka Nguyen Kowalski Dubois Silva Johnson Okafor Haddad Larsen Novak "
        "Schmidt Moreau Fischer Costa Ivanova Patel Kim Chen Brown Lopez Weber Jansen Berg Romano").split()
COMPANIES = ("Acme Corp|Globex|Initech|Umbrella Logistics|Stark Retail|Wayne Foods|Hooli|Vandelay Imports|"
             "Soylent Labs|Pied Piper|Cyberdyne Health|Tyrell Systems|Wonka Candy|Oscorp Energy|"
             "Northwind Traders|Contoso Bank|Fabrikam|Blue Yonder Air").split("|")
DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.uk", "proton.me", "icloud.com", "gmx.de", "orange.fr"]
ALNUM = string.ascii_letters + string.digits


def token(r: random.Random, n: int, alphabet: str = ALNUM) -> str:
    return "".join(r.choices(alphabet, k=n))


def digits(r: random.Random, n: int) -> str:
    return "".join(r.choices(string.digits, k=n))


def person(r: random.Random) -> tuple[str, str]:
    return r.choice(FIRST), r.choice(LAST)


def email(r: random.Random, first: str, last: str, company: str | None = None) -> str:
    local = r.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{r.randrange(10, 99)}", f"{first}_{last}"])
    local = local.lower().replace("ü", "u")
    if company and r.random() < 0.5:
        return f"{local}@{company.lower().replace(' ', '')}.com"
    return f"{local}@{r.choice(DOMAINS)}"


def phone(r: random.Random) -> str:
    return r.choice([
        lambda: f"+1 {r.randrange(201, 989)} 555 {digits(r, 4)}",
        lambda: f"({r.randrange(201, 989)}) 555-{digits(r, 4)}",
        lambda: f"{r.randrange(201, 989)}-555-{digits(r, 4)}",
        lambda: f"+44 20 {digits(r, 4)} {digits(r, 4)}",
        lambda: f"+49 30 {digits(r, 8)}",
        lambda: f"+33 1 {digits(r, 2)} {digits(r, 2)} {digits(r, 2)} {digits(r, 2)}",
        lambda: f"+81-3-{digits(r, 4)}-{digits(r, 4)}",
        lambda: f"+1.{r.randrange(201, 989)}.555.{digits(r, 4)}",
    ])()


def luhn_ok(number: str) -> bool:
    ds = [int(c) for c in number if c.isdigit()][::-1]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(ds))
    return len(ds) >= 12 and total % 10 == 0


def card(r: random.Random) -> str:
    prefix, length = r.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])
    body = prefix + digits(r, length - len(prefix) - 1)
    check = next(str(c) for c in range(10) if luhn_ok(body + str(c)))
    num = body + check
    sep = r.choice([" ", "-", ""])
    groups = [num[0:4], num[4:10], num[10:]] if length == 15 else [num[i:i + 4] for i in range(0, 16, 4)]
    return sep.join(groups)


def iban(r: random.Random) -> str:
    country, bban = r.choice([("DE", lambda: digits(r, 18)), ("FR", lambda: digits(r, 10) + token(r, 11,
                              string.ascii_uppercase + string.digits) + digits(r, 2)),
                              ("GB", lambda: token(r, 4, string.ascii_uppercase) + digits(r, 14)),
                              ("NL", lambda: token(r, 4, string.ascii_uppercase) + digits(r, 10))])
    b = bban()
    numeric = "".join(str(int(c, 36)) for c in b + country + "00")
    raw = f"{country}{98 - int(numeric) % 97:02d}{b}"
    return " ".join(raw[i:i + 4] for i in range(0, len(raw), 4)) if r.random() < 0.6 else raw


def ssn(r: random.Random) -> str:
    return f"{r.choice([r.randrange(1, 666), r.randrange(667, 900)]):03d}-{r.randrange(1, 100):02d}-" \
           f"{r.randrange(1, 10000):04d}"


def ip(r: random.Random) -> str:
    if r.random() < 0.15:
        return "2001:db8:" + ":".join(f"{r.getrandbits(16):x}" for _ in range(6))
    return ".".join(str(x) for x in (r.choice([10, 172, 192, 54, 34, 81]), r.randrange(256), r.randrange(256),
                                     r.randrange(1, 255)))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def jwt(r: random.Random) -> str:
    head = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(f'{{"sub":"{r.randrange(10**6)}","iat":{1700000000 + r.randrange(10**7)}}}'.encode())
    return f"{head}.{body}.{token(r, 43, ALNUM + '-_')}"


def pem(r: random.Random) -> str:
    lines = [token(r, 64, ALNUM + "+/") for _ in range(r.randrange(4, 8))]
    return "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----"


# Each secret kind: (pii_type a scrubber should report, sentence template, value factory).
SECRETS = {
    "openai_key": ("API_KEY", "Our integration uses the key {v} for the nightly job.",
                   lambda r: r.choice(["sk-proj-", "sk-"]) + token(r, 48)),
    "aws_key": ("API_KEY", "The deploy script fails with AWS_ACCESS_KEY_ID={v} set.",
                lambda r: "AKIA" + token(r, 16, string.ascii_uppercase + "234567")),
    "github": ("API_KEY", "CI stopped working after I rotated the token {v} yesterday.",
               lambda r: "ghp_" + token(r, 36)),
    "slack": ("API_KEY", "The Slack bot token is {v}, the bot posts nothing.",
              lambda r: f"xoxb-{digits(r, 11)}-{digits(r, 12)}-{token(r, 24)}"),
    "jwt": ("JWT", "Requests with Authorization: Bearer {v} return 401.", jwt),
    "password": ("SECRET", "I can log in with password={v} on the old portal but not the new one.",
                 lambda r: token(r, 6) + r.choice("!#%&") + digits(r, 3)),
    "bearer": ("SECRET", "curl -H 'Authorization: Bearer {v}' https://api.example.com/v2/orders gives 403",
               lambda r: token(r, 32)),
    "url_creds": ("URL_CREDENTIALS", "The app cannot reach postgres://{v}@db.internal:5432/prod since Monday.",
                  lambda r: f"admin:{token(r, 12)}"),
    "pem": ("PRIVATE_KEY", "Here is the key the server rejects:\n{v}\n", pem),
    "card": ("CARD", "The card on file is {v}.", card),
    "iban": ("IBAN", "Please refund to my account IBAN {v}.", iban),
    "ssn": ("SSN", "For the tax form my SSN is {v}.", ssn),
    "ip": ("IP", "The requests come from {v} and get blocked.", ip),
    "phone": ("PHONE", "You can call me on {v} after 5pm.", phone),
    "email": ("EMAIL", "Send the confirmation to {v} please.", None),
}


def secret_sentence(r: random.Random, kinds: tuple[str, ...] | None = None) -> tuple[str, tuple[str, str]]:
    """One sentence carrying one planted secret, and its (pii_type, value)."""
    kind = r.choice(kinds or tuple(SECRETS))
    pii_type, template, make = SECRETS[kind]
    value = make(r) if make else email(r, *person(r))
    return template.format(v=value), (pii_type, value)


# ----------------------------------------------------------------------------- issue 12: kinds in four places
STREETS = "High Baker Station Church Mill Elm Oak Maple Victoria King Queen Park Green Bridge Manor Cedar".split()
STREET_TYPES = "Street Road Avenue Lane Drive Close Way Court Crescent St Rd Ave".split()
UK_TOWNS = {"London": "SW1A", "Leeds": "LS1", "Manchester": "M1", "Bristol": "BS1", "Glasgow": "G2", "York": "YO1"}
US_TOWNS = {"Springfield": "IL", "Portland": "OR", "Austin": "TX", "Denver": "CO", "Madison": "WI", "Salem": "MA"}
MONTHS = ("January February March April May June July August September October November December").split()


def hf_token(r: random.Random) -> str:
    return "hf_" + token(r, 34, string.ascii_letters)


def stripe_key(r: random.Random) -> str:
    return r.choice(["sk_live_", "rk_live_", "pk_live_", "sk_test_"]) + token(r, r.choice([24, 34, 99]))


def google_key(r: random.Random) -> str:
    return "AIza" + token(r, 35, ALNUM + "-_")


def uk_phone(r: random.Random) -> str:
    """Numbers from Ofcom's ranges for drama (020 7946 0xxx, 07700 900xxx, ...), in the ways people write them."""
    n = digits(r, 3)
    return r.choice([f"020 7946 0{n}", f"07700 900{n}", f"+44 20 7946 0{n}", f"+44 7700 900{n}", f"0161 496 0{n}",
                     f"(0113) 496 0{n}", f"01632 960{n}", f"0117 496 0{n}", f"07700900{n}"])


def birth_date(r: random.Random) -> str:
    y, m, d = r.randrange(1940, 2006), r.randrange(1, 13), r.randrange(1, 29)
    th = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
    return r.choice([f"{d:02d}/{m:02d}/{y}", f"{y}-{m:02d}-{d:02d}", f"{d} {MONTHS[m - 1]} {y}", f"{d:02d}.{m:02d}.{y}",
                     f"{MONTHS[m - 1]} {d}, {y}", f"{d}{th} of {MONTHS[m - 1]} {y}", f"{m}/{d}/{y}"])


def passport(r: random.Random) -> str:
    up = string.ascii_uppercase
    return r.choice([lambda: digits(r, 9), lambda: token(r, 1, up) + digits(r, 8),
                     lambda: "C" + digits(r, 2) + token(r, 1, "FGHJKLMNPRTVWXYZ") + digits(r, 2) + token(r, 1, up)
                     + digits(r, 2),  # German: C01X00T47
                     lambda: digits(r, 2) + token(r, 2, up) + digits(r, 5)])()


def full_name(r: random.Random) -> str:
    first, last = person(r)
    return f"{first} {last}" if r.random() < 0.8 else f"{first} {r.choice(FIRST)} {last}"


def street_address(r: random.Random) -> str:
    street = f"{r.randrange(1, 300)}{r.choice(['', '', '', 'A', 'B'])} {r.choice(STREETS)} {r.choice(STREET_TYPES)}"
    if r.random() < 0.5:
        town = r.choice(list(UK_TOWNS))
        return f"{street}, {town} {UK_TOWNS[town]} {r.randrange(1, 10)}{token(r, 2, 'ABDEFGHJLNPQRSTUWXYZ')}"
    if r.random() < 0.6:
        town = r.choice(list(US_TOWNS))
        return f"{street}, {town}, {US_TOWNS[town]} {digits(r, 5)}"
    return street


# kind: (placeholder TYPE, prose with a cue, JSON key, value factory). Prose goes into system prompts, user
# turns, tool-call arguments and tool results; half of the JSON cases carry the value under its key instead.
PLANTED = {
    "hf_token": ("API_KEY", ["Our Hugging Face token {v} stopped working.", "Pull the model with {v} please."],
                 "hf_token", hf_token),
    "stripe_key": ("API_KEY", ["Payments fail since we set the Stripe key {v}.", "Stripe says {v} is revoked."],
                   "stripe_key", stripe_key),
    "google_key": ("API_KEY", ["The Maps widget uses {v} and shows an error.", "Google rejects {v} since Monday."],
                   "maps_api_key", google_key),
    "uk_phone": ("PHONE", ["You can reach me on {v} after 5pm.", "Call me back on {v}, thanks."], "phone", uk_phone),
    "dob": ("DOB", ["My date of birth is {v}.", "For the check: DOB {v}.", "I was born on {v}."],
            "date_of_birth", birth_date),
    "passport": ("PASSPORT", ["My passport number is {v}.", "Passport no. {v}, expiring next year."],
                 "passport_number", passport),
    "person": ("PERSON", ["Hi, my name is {v} and I need help.", "This is {v}, calling about my order.",
                          "Thanks,\n{v}", "Name: {v}"], "full_name", full_name),
    "address": ("ADDRESS", ["I live at {v}, so please ship there.", "Please deliver to {v} instead.",
                            "My address is {v}."], "shipping_address", street_address),
    "email": ("EMAIL", ["Send the confirmation to {v} please."], "email", lambda r: email(r, *person(r))),
}
PLACES = ("system", "user", "tool_args", "tool_result")


def planted(r: random.Random, kind: str) -> tuple[str, str, str, str]:
    """(pii_type, value, sentence carrying it, JSON key for it) for one value of `kind`."""
    pii_type, templates, key, make = PLANTED[kind]
    value = make(r)
    return pii_type, value, r.choice(templates).format(v=value), key


def ordinary(r: random.Random) -> str:
    """A sentence of things that are not PII (order ids, non-birth dates, prices, versions, plain phrases with
    a name cue's words), which a scrubber must leave exactly as it is."""
    return r.choice([
        lambda: f"Order #{digits(r, 8)} was placed on 2026-0{r.randrange(1, 10)}-{r.randrange(10, 29)}.",
        lambda: f"It was delivered on {r.randrange(1, 29)} {r.choice(MONTHS)} 2026.",
        lambda: f"It cost £{r.randrange(10, 900)}.{r.randrange(10, 100)} with VAT.",
        lambda: f"We are on version {r.randrange(1, 9)}.{r.randrange(30)}.{r.randrange(20)} of the app.",
        lambda: f"Ticket {digits(r, 5)} was opened at {r.randrange(10, 23)}:{r.randrange(10, 59)} on "
                f"{r.randrange(10, 28)}/03/2026.",
        lambda: "This is urgent, I am on the Pro plan.",
        lambda: f"Our team in {r.choice(list(UK_TOWNS))} uses the Router X2.",
    ])()


def decoy(r: random.Random) -> str:
    """A sentence full of numbers that are not PII and must survive scrubbing."""
    return r.choice([
        lambda: f"Order #{digits(r, 8)} was placed on 2026-0{r.randrange(1, 10)}-{r.randrange(10, 29)}.",
        lambda: f"It cost ${r.randrange(10, 2000):,}.{r.randrange(100):02d} including tax.",
        lambda: f"We are on version {r.randrange(1, 9)}.{r.randrange(30)}.{r.randrange(20)} of the app.",
        lambda: f"The item is SKU-{digits(r, 4)}-{r.choice(['XS', 'M', 'XL', 'BLK'])}, qty {r.randrange(1, 12)}.",
        lambda: f"Invoice INV-2026-{digits(r, 5)} is still open.",
        lambda: f"It happened at {r.randrange(10, 23)}:{r.randrange(10, 59)} on 03/{r.randrange(10, 28)}/2026.",
    ])()


def perturb(r: random.Random, text: str) -> str:
    """A light paraphrase that leaves every fact (names, e-mails, numbers) intact: a near-duplicate."""
    return r.choice([
        lambda: text + r.choice([" Thanks!", " thx", " Thank you.", " Please help."]),
        lambda: r.choice(["Hi, ", "Hello! ", "Hey - "]) + text,
        lambda: text.replace(" ", "  ", 1),
        lambda: text.rstrip(".!?") + r.choice(["!", "?", "..."]),
    ])()
