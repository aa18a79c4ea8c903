"""The eval report files (`report.json`, `report.md`, `report.png`, `predictions.jsonl`) and the gate.

A gate file (JSON or YAML) maps a metric to a threshold: a bare number is a minimum, `{"min": x}` /
`{"max": y}` are explicit (`s_per_record: {max: 2.0}`). Metric names are those of `slmtune.eval.metrics` plus the
perf keys; prefix `constrained.` to check the constrained row. The gate checks the report's primary row; a
metric the task does not measure fails the gate (a gate that cannot be checked must not pass).
"""

from __future__ import annotations

from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.eval.metrics import METRICS
from slmtune.io import atomic_open, write_json, write_jsonl
from slmtune.ui import fmt

PERF_KEYS = ("s_per_record", "tokens_per_s", "wall_s", "generated_tokens", "unfinished")
KNOWN = {m for ms in METRICS.values() for m in ms} | set(PERF_KEYS)
ROW_ORDER = ("base", "tuned", "predictions", "teacher")


# ----------------------------------------------------------------------------- gate
def read_gate(path: Path) -> dict[str, tuple[str, float]]:
    """{metric: (op, threshold)} with op "min" or "max"; every problem reported at once."""
    import yaml

    if not path.is_file():
        raise SlmtuneError(f"--gate {path}: no such file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SlmtuneError(f"--gate {path}: not JSON/YAML ({e}).") from None
    if not isinstance(raw, dict) or not raw:
        raise SlmtuneError(f"--gate {path}: expected a mapping of metric → threshold, got {type(raw).__name__}.",
                           "Example: {\"parse_rate\": 0.95, \"s_per_record\": {\"max\": 2.0}}")
    out, problems = {}, []
    for key, v in raw.items():
        name = str(key).removeprefix("constrained.")
        spec = v if isinstance(v, dict) else {"min": v}
        ops = [(op, t) for op, t in spec.items() if op in ("min", "max") and isinstance(t, (int, float))]
        if name not in KNOWN:
            problems.append(f"unknown metric {key!r} (known: {', '.join(sorted(KNOWN))})")
        elif len(ops) != 1 or len(spec) != 1:
            problems.append(f"{key}: expected a number or {{min: x}} / {{max: y}}, got {v!r}")
        else:
            out[str(key)] = (ops[0][0], float(ops[0][1]))
    if problems:
        raise SlmtuneError(f"--gate {path}: " + "; ".join(problems) + ".")
    return out


def metric_value(row: dict, name: str) -> float | None:
    if name in PERF_KEYS:
        return (row.get("perf") or {}).get(name)
    return ((row.get("metrics") or {}).get(name) or {}).get("value")


def check_gate(report: dict, thresholds: dict[str, tuple[str, float]]) -> dict:
    failures = []
    for key, (op, t) in thresholds.items():
        constrained = key.startswith("constrained.")
        rows = report.get("constrained", {}) if constrained else report["models"]
        row = rows.get(report["primary"]) or {}
        value = metric_value(row, key.removeprefix("constrained."))
        ok = value is not None and (value >= t if op == "min" else value <= t)
        if not ok:
            failures.append({"metric": key, "value": value, "op": op, "threshold": t})
    return {"passed": not failures, "thresholds": {k: {op: t} for k, (op, t) in thresholds.items()},
            "failures": failures}


# ----------------------------------------------------------------------------- files
def columns(report: dict) -> list[tuple[str, dict]]:
    """(column title, row) in display order: base, tuned, tuned (constrained), predictions, teacher."""
    cols = []
    for name in ROW_ORDER:
        if name in report["models"]:
            cols.append((name, report["models"][name]))
        if name in report.get("constrained", {}):
            cols.append((f"{name} (constrained)", report["constrained"][name]))
    return cols


def _decoding_text(report: dict) -> str:
    d = report.get("decoding")
    if not d:
        return ""
    how = "under the task's grammar (llguidance)" if d["used"] == "constrained" else "free"
    return f" Model rows decoded {how} (`--decoding {d['requested']}`)."


def markdown(report: dict) -> str:
    t, cols = report["task"], columns(report)
    lines = [f"# Eval: {t['name']} ({t['category']}), {report['n']} records", "",
             f"Schema from {t['schema_source']} (hash {t['schema_hash'] or '–'}). Reference: the teacher's "
             f"logged outputs. Primary row: `{report['primary']}`.{_decoding_text(report)}", "",
             "| metric | " + " | ".join(c for c, _ in cols) + " | count |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for m in METRICS[t["category"]]:
        count = report["models"]["teacher"]["metrics"][m]["count"]
        lines.append(f"| {m} | " + " | ".join(fmt(metric_value(r, m)) for _, r in cols) + f" | {count} |")
    for k in PERF_KEYS:
        lines.append(f"| {k} | " + " | ".join(fmt(metric_value(r, k)) for _, r in cols) + " | |")
    gate = report.get("gate")
    if gate is not None:
        lines += ["", f"**Gate: {'passed' if gate['passed'] else 'FAILED'}**"]
        lines += [f"- {f['metric']} = {fmt(f['value'])}, needs {f['op']} {f['threshold']}" for f in gate["failures"]]
    return "\n".join(lines + failure_lines(report) + selective_lines(report)) + "\n"


def _selective_rows(report: dict) -> list[tuple[str, dict]]:
    return [(name, row["selective"]) for name, row in columns(report) if row.get("selective")]


def selective_lines(report: dict) -> list[str]:
    """Rows with confidences: AUROC and, when calibrated, the threshold and what it answers (selective.png)."""
    rows = _selective_rows(report)
    if not rows:
        return []
    lines = ["", "## Answering only when confident", "",
             "AUROC: how well the confidence separates answers that agree with the teacher from those that don't "
             "(0.5 = not at all). Calibrated: the lowest threshold whose answered records agree at the target "
             "with a 90 % lower bound.", "",
             "| row | AUROC | target | threshold | coverage | accuracy | lower bound |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, sel in rows:
        if "target" not in sel:
            lines.append(f"| {name} | {fmt(sel['auroc'])} | – | – | – | – | – |")
            continue
        lines.append(f"| {name} | {fmt(sel['auroc'])} | {sel['target']:g} | {fmt(sel['threshold'])} | "
                     f"{sel['coverage']:.0%} ({sel['answered']}/{sel['n']}) | {fmt(sel['accuracy'])} | "
                     f"{fmt(sel['lower_bound'])} |")
    lines += [f"- {name}: {sel['reason']}" for name, sel in rows if sel.get("reason")]
    return lines


def plot_selective(report: dict, path: Path) -> None:
    """Accuracy of the answered records vs the share answered, one line per row with confidences."""
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, sel in _selective_rows(report):
        pts = sel["curve"]
        if not pts:  # no answer serving would hand the agent (e.g. text answers to a tool-calling task)
            ax.plot([], [], label=f"{name} (AUROC {fmt(sel['auroc'])}): nothing to answer")
            continue
        ax.step([0.0] + [p["coverage"] for p in pts], [pts[0]["accuracy"]] + [p["accuracy"] for p in pts],
                where="pre", label=f"{name} (AUROC {fmt(sel['auroc'])})")
        if sel.get("threshold") is not None:
            ax.plot([sel["coverage"]], [sel["accuracy"]], "o", color="black")
            ax.axhline(sel["target"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("coverage (share of records answered)")
    ax.set_ylabel("accuracy of the answered (key metric)")
    ax.set_title(f"{report['task']['name']}: answering only when confident, n={report['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_png(fig, path)


def failure_lines(report: dict) -> list[str]:
    """The primary row's failure kinds (tool_calling tasks): kind, count, share of records, one example."""
    f = (report["models"].get(report["primary"]) or {}).get("failures")
    if f is None:
        return []
    lines = ["", f"## Failures of `{report['primary']}`: {f['failed']} of {f['n']} records", ""]
    if not f["kinds"]:
        return [*lines, "None: every record makes the teacher's calls."]
    lines += ["| kind | count | share | example |", "|---|---:|---:|---|"]
    for kind, k in f["kinds"].items():
        ex = k["examples"][0]
        example = f"{_code(ex['id'])}: {_cell(ex['detail'])} — got {_code(ex['got'])}; expected {_code(ex['expected'])}"
        lines.append(f"| {kind} | {k['count']} | {k['count'] / max(f['n'], 1):.0%} | {example} |")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _code(text: str) -> str:
    return "`" + _cell(text).replace("`", "'") + "`"


def plot(report: dict, path: Path) -> None:
    from slmtune.plots import pyplot, save_png

    plt = pyplot()

    metrics = [m for m in METRICS[report["task"]["category"]]
               if report["models"]["teacher"]["metrics"][m]["count"] > 0]
    cols = columns(report)
    width = 0.8 / max(len(cols), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) + 2), 3.8), dpi=100)
    for k, (name, row) in enumerate(cols):
        vals = [metric_value(row, m) or 0.0 for m in metrics]
        ax.bar([i + (k - (len(cols) - 1) / 2) * width for i in range(len(metrics))], vals, width, label=name)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (1 = as the teacher)")
    ax.set_title(f"{report['task']['name']} ({report['task']['category']}), n={report['n']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_png(fig, path)


def write_all(out_dir: Path, report: dict, prediction_lines: list[dict]) -> None:
    write_jsonl(out_dir / "predictions.jsonl", prediction_lines)
    write_json(out_dir / "report.json", report)
    with atomic_open(out_dir / "report.md") as f:
        f.write(markdown(report))
    plot(report, out_dir / "report.png")
    if _selective_rows(report):
        plot_selective(report, out_dir / "selective.png")
