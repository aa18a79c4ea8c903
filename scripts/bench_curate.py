"""Benchmark `slmtune ingest` + `slmtune curate` on synthetic agent logs with planted PII.

Generates N logs (mixed openai / messages / anthropic formats, realistic sizes, ~2% defective), runs the
two stages through the real CLI in child processes, and reports records/s and peak RSS of each stage
(from `wait4`, so it is the stage's own high-water mark), and the scrubber's recall on the planted values:
a value counts as leaked if its raw, whitespace-free or (for numbers) digits-only form is anywhere in
the curated output or its rejected file; and how many decoy numbers (order ids, prices, versions...)
survive. CPU seconds are reported too: on a shared machine they show the cost that wall time hides.

Issue 12's set (`synthetic.generate_logs_placed`): support-agent logs with one value each of nine kinds (HF,
Stripe and Google keys, UK phones, dates of birth, passport numbers, names, street addresses, e-mails) in
turn in the system prompt, the user turn, tool-call arguments and tool results, printed (stderr) as a
kinds x places table of leaked/planted per scrubber, with the ordinary sentences (order ids, non-birth dates,
prices, plain phrases) it changed. A name also leaks when its surname survives, an address when its
street line or its postcode/ZIP does.

    python scripts/bench_curate.py                 # 100,000 logs, regex scrubber
    python scripts/bench_curate.py --n 20000 --json bench.json
    python scripts/bench_curate.py --n 2000 --scrubber both    # regex and presidio side by side
    python scripts/bench_curate.py --n 20000 --curate-args="--workers 1"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from slmtune.data.ingest import Rejected, to_record
from slmtune.io import dumps, iter_jsonl
from slmtune.synthetic.logs import FORMATS, generate_logs_placed, generate_logs_planted
from slmtune.synthetic.pii import PLACES, PLANTED

NUMERIC = ("PHONE", "CARD", "IBAN", "SSN")
SCRUBBERS = {"regex": ["regex"], "presidio": ["presidio"], "both": ["regex", "presidio"]}
# The decoy sentences of synthetic_pii.decoy: numbers a scrubber must leave alone.
DECOYS = re.compile(r"Order #\d{8}|INV-2026-\d{5}|SKU-\d{4}-[A-Z]+|version \d+\.\d+\.\d+|\$[\d,]+\.\d\d|"
                    r"2026-0\d-\d\d\.|\d\d:\d\d on 03/\d\d/2026|CUS-\d{6}")


def generate(workdir: Path, n: int, seed: int, noise: float) -> tuple[dict[str, list], int]:
    """Write the logs; return {record id: planted [(type, value)]} for the items ingest will keep."""
    planted: dict[str, list] = {}
    size = 0
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    files = {f: open(workdir / "logs" / f"{f}.jsonl", "w", encoding="utf-8") for f in FORMATS}
    try:
        for log, _, pii in generate_logs_planted(n, seed=seed, noise=noise):
            line = dumps(log) + "\n"
            size += len(line.encode())
            fmt = "messages" if "messages" in log else ("anthropic" if "content" in log.get("response", {})
                                                        or "system" in log["request"] else "openai")
            files[fmt].write(line)
            try:
                planted.setdefault(to_record(log)[0]["id"], []).extend(pii)
            except Rejected:
                pass
    finally:
        for f in files.values():
            f.close()
    return planted, size


def generate_placed(workdir: Path, n: int, seed: int) -> dict[str, dict]:
    """Write issue 12's logs to workdir/placed.jsonl; return {record id: truth} (see generate_logs_placed)."""
    truths = {}
    with open(workdir / "placed.jsonl", "w", encoding="utf-8") as f:
        for log, truth in generate_logs_placed(n, seed=seed):
            f.write(dumps(log) + "\n")
            truths[to_record(log)[0]["id"]] = truth
    return truths


def run_stage(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in MB) of one CLI stage in a child process (and its workers).

    Peak RSS is sampled from /proc (VmHWM of the stage and of each worker, summed): the rusage maxrss of
    a child also counts the parent's pages at fork time, which would charge this script's memory to it.
    """
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "slmtune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for p in [proc.pid, *_children(proc.pid)]:
            peaks[p] = max(peaks.get(p, 0), _hwm_kb(p))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {args[0]} failed:\n{err}")
    print(err.strip(), file=sys.stderr)
    return seconds, usage.ru_utime + usage.ru_stime, sum(peaks.values()) // 1024


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _hwm_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def strings(obj) -> list[str]:
    if isinstance(obj, str):
        try:
            inner = json.loads(obj) if obj[:1] in "{[" else None
        except json.JSONDecodeError:
            inner = None
        return [obj] + (strings(inner) if inner is not None else [])
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def curated_texts(out: Path):
    """(record id, all its message text with JSON strings decoded) for every curated or rejected record."""
    for path in (out, out.with_name(out.stem + ".rejected.jsonl")):
        for _, row in iter_jsonl(path):
            rec = row.get("record", row)
            if "messages" in rec:
                yield rec.get("id"), "\n".join(strings(rec["messages"]))


def recall(out: Path, planted: dict[str, list]) -> tuple[dict, int, int]:
    """Planted values per type that reached curate, and how many leaked into its outputs."""
    total, leaked = Counter(), Counter()
    for rid, text in curated_texts(out):
        for kind, value in planted.get(rid, []):
            total[kind] += 1
            leaked[kind] += leaks(kind, value, text)
    per_type = {k: round(1 - leaked[k] / total[k], 4) for k in sorted(total)}
    return per_type, sum(total.values()), sum(leaked.values())


def leaks(kind: str, value: str, text: str) -> bool:
    """The value, or a part that still identifies (surname, street line, postcode), is in `text`."""
    forms = {value, re.sub(r"\s", "", value)} | ({re.sub(r"\D", "", value)} if kind in NUMERIC else set())
    if kind == "PERSON":
        forms.add(value.split()[-1])
    if kind == "ADDRESS":
        forms.add(value.split(",")[0])
        code = re.search(r"[A-Z]{1,2}\d+ \d[A-Z]{2}$|\d{5}$", value)
        forms |= {code.group()} if code else set()
    return any(f in text for f in forms)


def placed_leaks(out: Path, truths: dict[str, dict]) -> tuple[dict, dict]:
    """({kind: {place: [planted, leaked]}}, {"ordinary_in", "ordinary_changed"}) over curate's outputs."""
    matrix = {k: {p: [0, 0] for p in PLACES} for k in PLANTED}
    ordinary = Counter()
    for rid, text in curated_texts(out):
        t = truths.get(rid)
        if t is None:
            continue
        cell = matrix[t["kind"]][t["place"]]
        cell[0] += 1
        cell[1] += leaks(t["type"], t["value"], text)
        ordinary["ordinary_in"] += len(t["ordinary"])
        ordinary["ordinary_changed"] += sum(v not in text for v in t["ordinary"])
    return matrix, dict(ordinary)


def table(name: str, matrix: dict, ordinary: dict, records_per_s: int) -> str:
    """Markdown: leaked/planted per kind and place, and the ordinary sentences changed."""
    lines = [f"scrubber {name}: leaked/planted, {records_per_s:,} records/s on the main set; ordinary sentences "
             f"changed {ordinary.get('ordinary_changed', 0)}/{ordinary.get('ordinary_in', 0)}",
             "| kind | " + " | ".join(PLACES) + " | total |", "|---" * (len(PLACES) + 2) + "|"]
    for kind, row in matrix.items():
        cells = [f"{leaked}/{n}" for n, leaked in row.values()]
        total = [sum(c[i] for c in row.values()) for i in (0, 1)]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {total[1]}/{total[0]} |")
    return "\n".join(lines)


def decoys(paths: list[Path]) -> int:
    n = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            n += sum(len(DECOYS.findall(line)) for line in f)
    return n


def curate_run(workdir: Path, name: str, planted: dict, truths: dict, extra: list[str]) -> dict:
    """Curate the main set and issue 12's set with one scrubber; its figures."""
    out = workdir / f"curated.{name}.jsonl"
    curate_s, curate_cpu, curate_mb = run_stage(["curate", str(workdir / "records.jsonl"), "-o", str(out),
                                                 "--report", str(workdir / f"report.{name}.json"),
                                                 "--scrubber", name, *extra])
    report = json.loads((workdir / f"report.{name}.json").read_text())
    per_type, n_planted, n_leaked = recall(out, planted)
    placed_out = workdir / f"placed.curated.{name}.jsonl"
    run_stage(["curate", str(workdir / "placed.records.jsonl"), "-o", str(placed_out), "--scrubber", name, *extra])
    matrix, ordinary = placed_leaks(placed_out, truths)
    return {
        "curate_s": round(curate_s, 1), "curate_records_per_s": round(report["records_in"] / curate_s),
        "curate_peak_rss_mb": curate_mb, "curate_cpu_s": round(curate_cpu, 1),
        "curate_records_per_cpu_s": round(report["records_in"] / max(curate_cpu, 1e-9)),
        "kept": report["kept"], "rejected_by_reason": report["rejected_by_reason"],
        "pii_placeholders": report["pii_placeholders"],
        "pii_planted_reaching_curate": n_planted, "pii_leaked": n_leaked,
        "pii_recall": round(1 - n_leaked / max(n_planted, 1), 5), "pii_recall_by_type": per_type,
        "decoy_numbers_surviving": decoys([out, out.with_name(out.stem + ".rejected.jsonl")]),
        "placed": {"leaked_by_kind_place": {k: {p: {"planted": c[0], "leaked": c[1]} for p, c in row.items()}
                                            for k, row in matrix.items()}} | ordinary,
        "_matrix": matrix,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of synthetic logs")
    ap.add_argument("--placed", type=int, default=720, help="issue 12's logs: 720 = 20 per kind and place")
    ap.add_argument("--scrubber", choices=list(SCRUBBERS), default="regex", help="scrubber(s) to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.02, help="fraction of defective logs")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    # One string, split like a shell: argparse would take a bare `--workers` for an option of this script.
    ap.add_argument("--curate-args", type=shlex.split, default=[],
                    help='extra `slmtune curate` options, e.g. --curate-args="--workers 1"')
    a = ap.parse_args()
    tmp = None if a.workdir else tempfile.TemporaryDirectory()
    workdir = a.workdir or Path(tmp.name)
    t = time.perf_counter()
    planted, size = generate(workdir, a.n, a.seed, a.noise)
    truths = generate_placed(workdir, a.placed, a.seed)
    gen_s = time.perf_counter() - t
    load_before = os.getloadavg()[0]
    ingest_s, ingest_cpu, ingest_mb = run_stage(["ingest", str(workdir / "logs"), "-o",
                                                 str(workdir / "records.jsonl")])
    run_stage(["ingest", str(workdir / "placed.jsonl"), "-o", str(workdir / "placed.records.jsonl")])
    runs = {name: curate_run(workdir, name, planted, truths, a.curate_args) for name in SCRUBBERS[a.scrubber]}
    first = next(iter(runs.values()))
    figures = {
        "logs": a.n, "input_mb": round(size / 2**20, 1), "generate_s": round(gen_s, 1),
        "ingest_s": round(ingest_s, 1), "ingest_records_per_s": round(a.n / ingest_s),
        "ingest_peak_rss_mb": ingest_mb,
        "curate_s": first["curate_s"], "curate_records_per_s": first["curate_records_per_s"],
        "curate_peak_rss_mb": first["curate_peak_rss_mb"],
        "end_to_end_records_per_s": round(a.n / (ingest_s + first["curate_s"])),
        # CPU seconds show the cost independent of other load on the machine (the 1-minute load average).
        "ingest_cpu_s": round(ingest_cpu, 1), "curate_cpu_s": first["curate_cpu_s"],
        "records_per_cpu_s": round(a.n / (ingest_cpu + first["curate_cpu_s"])),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cores": os.cpu_count(),
        "decoy_numbers_in": decoys([workdir / "records.jsonl"]),
    } | {k: v for k, v in first.items() if k not in ("placed", "_matrix") and not k.startswith("curate_")}
    figures["scrubbers"] = {name: {k: v for k, v in run.items() if k != "_matrix"} for name, run in runs.items()}
    for name, run in runs.items():
        print(table(name, run["_matrix"], run["placed"], run["curate_records_per_s"]) + "\n", file=sys.stderr)
    print(json.dumps(figures, indent=2))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
