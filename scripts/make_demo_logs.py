"""How the bundled demo logs in `src/slmtune/examples/` were made (run once; the files are committed).

    python scripts/make_demo_logs.py

One synthetic agent (`slmtune.synthetic.logs`), logged in three formats (OpenAI proxy, messages, Anthropic), with
planted PII and secrets and ~5% realistic defects (truncated, errored, broken tool calls). Its traffic is
uneven, as real agents' is:

- `agent_logs/support-*.jsonl`     330 calls: weather tool calls, ticket extraction, sentiment labels (~110 each);
- `agent_logs/threads-*.jsonl`      70 calls: thread summaries;
- `agent_logs/backoffice-*.jsonl`   90 calls spread over six rarer errands (~15 each: below `--min-size 20`,
                                    so the LLM keeps them);
- `agent_logs_round2/support-*.jsonl` 40 more weather calls: the next round's new logs, one errand changed.

With the demo's `--max-tasks 3`, the three big errands are trained; summaries and the long tail stay with
the LLM and are listed as such.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from slmtune.synthetic.logs import write_logs

OUT = Path(__file__).resolve().parent.parent / "src" / "slmtune" / "examples"
BATCHES = [  # (folder, file prefix, calls, seed, errands)
    ("agent_logs", "support", 330, 101, ["tool_calling-get_weather", "extraction-ticket", "classification-sentiment"]),
    ("agent_logs", "threads", 70, 102, ["summarization-thread"]),
    ("agent_logs", "backoffice", 90, 103, ["tool_calling-search_orders", "tool_calling-create_ticket",
                                           "extraction-contact", "classification-intent", "coding-sql",
                                           "generation-reply"]),
    ("agent_logs_round2", "support", 40, 201, ["tool_calling-get_weather"]),
]


def main() -> None:
    for folder in {b[0] for b in BATCHES}:
        shutil.rmtree(OUT / folder, ignore_errors=True)
    for folder, prefix, n, seed, errands in BATCHES:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_logs(tmp, n, seed=seed, errands=errands, noise=0.05)
            (OUT / folder).mkdir(parents=True, exist_ok=True)
            for fmt, path in paths.items():
                if fmt != "labels":  # ground-truth errands stay out of the logs an agent would have
                    shutil.copyfile(path, OUT / folder / f"{prefix}-{fmt}.jsonl")
    for folder in sorted({b[0] for b in BATCHES}):
        files = sorted((OUT / folder).glob("*.jsonl"))
        print(f"{folder}: {sum(len(f.read_text().splitlines()) for f in files)} calls in {len(files)} files")


if __name__ == "__main__":
    main()
