"""Benchmark `slmtune serve`'s CPU engines side by side, over HTTP: embedded (transformers) vs llamacpp (the export's
GGUF through llama.cpp), one tool-calling route of a flywheel workdir, 1 / 4 / 16 concurrent clients.

    scripts/demo.sh                                    # a workdir whose exports carry a GGUF (llama.cpp installed)
    python scripts/bench_serve.py --workdir runs/demo  # → runs/bench/bench_serve.json + bench_serve.png
    python scripts/bench_serve.py --workdir W --engines llamacpp --clients 1,4 --requests 8

For each engine in turn (never both at once: 2 cores), `slmtune serve WORKDIR --engine E` starts on 127.0.0.1 with
no upstream, and the route's held-out calls (its eval set past the records the flywheel calibrated on, as
`scripts/demo_serve.py` replays them; the prompt as logged, its tools offered, the grammar on as serve's default)
are sent with httpx:

* **sequential** (1 client): every call once; latency p50/p95, and each call's verdict (answered by the SLM, or
  the fallback reason: `low_confidence`, `invalid_output`, …) and answer, compared between the engines;
* **concurrent** (N clients, a closed loop: each sends `--requests` calls one after another): requests/s and
  p50/p95 latency under load.

Memory: the server's resident set before the export loads and after (its peak too), so what one loaded export
costs. Prints one JSON line per (engine, clients), then the llamacpp / embedded ratios (p50 speed-up at 1 client,
throughput at each level) and the verdict agreement. Timings are noisy on a shared machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_serve import free_port, gather_calls, pct, request_of, start, stop, wait_ready  # noqa: E402

from slmtune.io import write_json  # noqa: E402
from slmtune.serve.config import load_router  # noqa: E402


def rss_mb(pid: int) -> dict:
    """The process's resident set now and its peak, MB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[f].split()[0]) / 1024, 1) for k, f in (("rss_mb", "VmRSS"), ("peak_mb", "VmHWM"))}


def call(client: httpx.Client, body: dict) -> dict:
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    dt = time.perf_counter() - t0
    answer = None
    if r.status_code == 200:
        answer = r.json()["choices"][0]["message"]
        answer = {k: answer.get(k) for k in ("content", "tool_calls") if answer.get(k)}
    return {"latency_s": dt, "status": r.status_code, "route": r.headers.get("x-slmtune-route"),
            "fallback": r.headers.get("x-slmtune-fallback"), "answer": answer}


def verdict(row: dict) -> str:
    return "slm" if row["route"] not in (None, "llm") and row["status"] == 200 else (row["fallback"] or "error")


def level(url: str, bodies: list[dict], clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` calls in turn (a closed loop)."""
    todo = [bodies[k % len(bodies)] for k in range(clients * per_client)]
    rows: list[dict] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            for body in todo[k::clients]:  # bounded: per_client calls each
                rows.append(call(c, body))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = [r["latency_s"] for r in rows]
    return {"clients": clients, "requests": len(rows), "wall_s": round(wall, 2),
            "requests_per_s": round(len(rows) / wall, 3), "p50_s": round(statistics.median(lat), 3),
            "p95_s": round(pct(lat, 0.95), 3), "slm_answered": sum(verdict(r) == "slm" for r in rows)}


def run_engine(engine: str, args, bodies: list[dict], out_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = out_dir / f"serve-{engine}.log"
    cmd = [sys.executable, "-m", "slmtune.cli", "serve", str(args.workdir), "--engine", engine, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(args.max_batch), "--slm-timeout", "600",
           "--log-dir", str(out_dir / f"served-{engine}")]
    proc = start(cmd, log, env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        wait_ready(url + "/healthz", proc, log, 300)
        idle = rss_mb(proc.pid)
        t0 = time.perf_counter()
        with httpx.Client(base_url=url, timeout=600) as c:
            call(c, bodies[0])  # loads the export
        loaded = rss_mb(proc.pid)
        out = {"engine": engine, "load_and_first_s": round(time.perf_counter() - t0, 2), "idle_rss_mb": idle["rss_mb"],
               "loaded_rss_mb": loaded["rss_mb"], "export_mb": round(loaded["rss_mb"] - idle["rss_mb"], 1)}
        with httpx.Client(base_url=url, timeout=600) as c:
            seq = [call(c, b) for b in bodies]
        lat = [r["latency_s"] for r in seq]
        out["sequential"] = {"calls": len(seq), "p50_s": round(statistics.median(lat), 3),
                             "p95_s": round(pct(lat, 0.95), 3), "mean_s": round(statistics.mean(lat), 3),
                             "verdicts": [verdict(r) for r in seq], "answers": [r["answer"] for r in seq]}
        print(json.dumps({"engine": engine, "clients": 1, **{k: v for k, v in out["sequential"].items()
                                                              if k not in ("verdicts", "answers")}}), flush=True)
        out["levels"] = []
        for clients in args.clients:
            row = level(url, bodies, clients, args.requests)
            out["levels"].append(row)
            print(json.dumps({"engine": engine, **row}), flush=True)
        out["peak_rss_mb"] = rss_mb(proc.pid)["peak_mb"]
        return out
    finally:
        stop(proc)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, r in results.items():
        xs = [x["clients"] for x in r["levels"]]
        a.plot(xs, [x["p50_s"] for x in r["levels"]], "o-", label=f"{engine} p50")
        a.plot(xs, [x["p95_s"] for x in r["levels"]], "o--", label=f"{engine} p95")
        b.plot(xs, [x["requests_per_s"] for x in r["levels"]], "o-", label=engine)
    for ax, title in ((a, "latency per call (s)"), (b, "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("slmtune serve over HTTP: one tool-calling route, held-out calls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="a flywheel workdir (router.json)")
    ap.add_argument("--task", help="the route to load (default: the first tool-calling route)")
    ap.add_argument("--engines", default="embedded,llamacpp")
    ap.add_argument("--clients", default="4,16", help="concurrent levels after the sequential pass")
    ap.add_argument("--calls", type=int, default=12, help="held-out calls (the sequential pass sends each once)")
    ap.add_argument("--requests", type=int, default=3, help="calls each concurrent client sends")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_serve.json"))
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c]
    router = load_router(args.workdir / "router.json")
    routes = [r for r in router["routes"] if (r["task"] == args.task if args.task else r["category"] == "tool_calling")]
    if not routes:
        sys.exit(f"{args.workdir}/router.json: no {'route ' + args.task if args.task else 'tool-calling route'}.")
    task = routes[0]["task"]
    calls = [c for c in gather_calls(args.workdir, router, args.calls) if c["task"] == task]
    if not calls:
        sys.exit(f"{task}: no held-out calls to send.")
    bodies = [request_of(c["record"]) for c in calls]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cpu = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16"
    print(json.dumps({"task": task, "calls": len(bodies), "cpu": cpu, "cores": len(os.sched_getaffinity(0))}),
          flush=True)
    results = {e: run_engine(e, args, bodies, args.out.parent) for e in args.engines.split(",")}
    summary: dict = {"task": task, "calls": len(bodies), "cpu": cpu}
    if {"embedded", "llamacpp"} <= results.keys():
        emb, lcp = results["embedded"], results["llamacpp"]
        same = [a == b for a, b in zip(emb["sequential"]["verdicts"], lcp["sequential"]["verdicts"], strict=True)]
        same_answer = [a == b for a, b in zip(emb["sequential"]["answers"], lcp["sequential"]["answers"], strict=True)]
        summary |= {
            "p50_speedup_1_client": round(emb["sequential"]["p50_s"] / lcp["sequential"]["p50_s"], 2),
            "throughput_ratio": {e["clients"]: round(l_["requests_per_s"] / e["requests_per_s"], 2)
                                 for e, l_ in zip(emb["levels"], lcp["levels"], strict=True)},
            "verdicts_identical": f"{sum(same)}/{len(same)}", "answers_identical": f"{sum(same_answer)}/{len(same)}"}
    print(json.dumps(summary), flush=True)
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "engines": results})
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
