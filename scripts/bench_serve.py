"""Benchmark `slmtune serve`'s CPU engines side by side, over HTTP: embedded (transformers) vs llamacpp (the export's
GGUF through llama.cpp), one tool-calling route of a flywheel workdir, 1 / 4 / 16 concurrent clients.

    scripts/demo.sh                                    # a workdir whose exports carry a GGUF (llama.cpp installed)
    python scripts/bench_serve.py --workdir runs/demo  # → runs/bench/bench_serve.json + bench_serve.png
    python scripts/bench_serve.py --workdir W --engines llamacpp --clients 4 --requests 8 --prompts shared

For each engine in turn (never both at once: 2 cores), `slmtune serve WORKDIR --engine E` starts on 127.0.0.1 with
no upstream, and the route's held-out calls (its eval set past the records the flywheel calibrated on, as
`scripts/demo_serve.py` replays them; its tools offered, the grammar on as serve's default) are sent with httpx,
as two prompt sets: `logged` (each call as logged: the demo's calls come from many deployments, 43 system turns
in 62 calls, so little of a prompt is shared) and `shared` (every call with the first call's system turn, as one
agent deployment sends them: the system turn and tools are reused from the cache):

* **sequential** (1 client): every call once; latency p50/p95, and each call's verdict (answered by the SLM, or
  the fallback reason: `low_confidence`, `invalid_output`, …) and answer, compared between the engines;
* **concurrent** (N clients, a closed loop: each sends `--requests` calls one after another): requests/s and
  p50/p95 latency under load.

Memory: the server's resident set before the export loads and after (its peak too), so what one loaded export
costs. `--prefix-ab` (on by default): each engine again in this process, its prefix cache on and off, on the
shared prompts one at a time. Prints one JSON line per (engine, prompts, clients), then the llamacpp / embedded
ratios (p50 speed-up at 1 client, throughput at each level) and the verdict agreement. Timings are noisy on a
shared machine: run it alone.
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
    if r.status_code == 200:  # what was said: the text, or each call's name and arguments (call ids are random)
        msg = r.json()["choices"][0]["message"]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]
        answer = {"content": msg.get("content"), "calls": calls}
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


def run_engine(engine: str, args, sets: dict[str, list[dict]], out_dir: Path) -> dict:
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
            call(c, next(iter(sets.values()))[0])  # loads the export
        loaded = rss_mb(proc.pid)
        out = {"engine": engine, "load_and_first_s": round(time.perf_counter() - t0, 2), "idle_rss_mb": idle["rss_mb"],
               "loaded_rss_mb": loaded["rss_mb"], "export_mb": round(loaded["rss_mb"] - idle["rss_mb"], 1)}
        for name, bodies in sets.items():
            with httpx.Client(base_url=url, timeout=600) as c:
                seq = [call(c, b) for b in bodies]
            lat = [r["latency_s"] for r in seq]
            res = {"sequential": {"calls": len(seq), "p50_s": round(statistics.median(lat), 3),
                                  "p95_s": round(pct(lat, 0.95), 3), "mean_s": round(statistics.mean(lat), 3),
                                  "verdicts": [verdict(r) for r in seq], "answers": [r["answer"] for r in seq]}}
            print(json.dumps({"engine": engine, "prompts": name, "clients": 1, **{
                k: v for k, v in res["sequential"].items() if k not in ("verdicts", "answers")}}), flush=True)
            res["levels"] = []
            for clients in args.clients:
                row = level(url, bodies, clients, args.requests)
                res["levels"].append(row)
                print(json.dumps({"engine": engine, "prompts": name, **row}), flush=True)
            out[name] = res
        out["peak_rss_mb"] = rss_mb(proc.pid)["peak_mb"]
        print(json.dumps({k: v for k, v in out.items() if k not in sets}), flush=True)
        return out
    finally:
        stop(proc)


def prefix_ab(workdir: Path, task: str, bodies: list[dict], engines: list[str]) -> dict:
    """Each engine in this process (no HTTP), its prefix cache on then off, the calls one at a time, as serve asks
    (grammar on, up to 512 tokens): p50 latency and how many answers are the same text."""
    from slmtune.serve.config import checkpoints
    from slmtune.serve.engine import EmbeddedEngine
    from slmtune.serve.guard import to_record
    from slmtune.serve.jobs import Params

    ck = checkpoints(load_router(workdir / "router.json"))[task]
    params = Params(max_tokens=512, constrained=True, timeout_s=600)
    out = {}
    for engine in engines:
        runs = {}
        for keep in (True, False):
            if engine == "llamacpp":
                from slmtune.serve.llamacpp import LlamaCppEngine

                e = LlamaCppEngine(max_loaded=1, prefix_cache=keep)
            else:
                e = EmbeddedEngine(max_loaded=1, prefix_cache=keep)
            try:
                e.submit(ck, to_record(bodies[-1]), params).result()  # load, and a prompt in the cache
                lat, texts = [], []
                for b in bodies:
                    t0 = time.perf_counter()
                    texts.append(e.submit(ck, to_record(b), params).result().text)
                    lat.append(time.perf_counter() - t0)
            finally:
                e.close()
            runs[keep] = (statistics.median(lat), texts)
        (on, a), (off, b) = runs[True], runs[False]
        out[engine] = {"p50_on_s": round(on, 3), "p50_off_s": round(off, 3), "speedup": round(off / on, 2),
                       "same_answers": f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"}
        print(json.dumps({"prefix_cache": engine, **out[engine]}), flush=True)
    return out


def plot(results: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.6 * len(names)), squeeze=False)
    for (a, b), name in zip(axes, names, strict=True):
        for engine, r in results.items():
            pts = [{"clients": 1, "p50_s": r[name]["sequential"]["p50_s"], "p95_s": r[name]["sequential"]["p95_s"],
                    "requests_per_s": 1 / r[name]["sequential"]["mean_s"]}, *r[name]["levels"]]
            xs = [x["clients"] for x in pts]
            a.plot(xs, [x["p50_s"] for x in pts], "o-", label=f"{engine} p50")
            a.plot(xs, [x["p95_s"] for x in pts], "o--", label=f"{engine} p95")
            b.plot(xs, [x["requests_per_s"] for x in pts], "o-", label=engine)
        for ax, title in ((a, f"{name} prompts: latency per call (s)"), (b, f"{name} prompts: requests/s")):
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
    ap.add_argument("--prompts", choices=["logged", "shared", "both"], default="both",
                    help="logged: each call as logged (the demo's calls carry many different system turns); "
                         "shared: every call with the first call's system turn (one agent deployment: its prefix is "
                         "reused); both")
    ap.add_argument("--prefix-ab", action=argparse.BooleanOptionalAction, default=True,
                    help="also each engine in this process with its prefix cache on and off (shared prompts)")
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
    logged = [request_of(c["record"]) for c in calls]
    system = next((m for m in logged[0]["messages"] if m["role"] == "system"), None)
    shared = [{**b, "messages": [system, *(m for m in b["messages"] if m["role"] != "system")]} for b in logged]
    sets = {"logged": logged, "shared": shared if system else logged}
    sets = {k: v for k, v in sets.items() if args.prompts in (k, "both")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cpu = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16"
    print(json.dumps({"task": task, "calls": len(logged), "cpu": cpu, "cores": len(os.sched_getaffinity(0))}),
          flush=True)
    results = {e: run_engine(e, args, sets, args.out.parent) for e in args.engines.split(",")}
    summary: dict = {"task": task, "calls": len(logged), "cpu": cpu}
    if args.prefix_ab:
        summary["prefix_cache"] = prefix_ab(args.workdir, task, sets.get("shared", logged), args.engines.split(","))
    if {"embedded", "llamacpp"} <= results.keys():
        emb, lcp = results["embedded"], results["llamacpp"]
        for name in sets:
            e, lc = emb[name], lcp[name]
            pairs = list(zip(e["sequential"]["verdicts"], lc["sequential"]["verdicts"], strict=True))
            answers = list(zip(e["sequential"]["answers"], lc["sequential"]["answers"], strict=True))
            summary[name] = {
                "p50_s": {"embedded": e["sequential"]["p50_s"], "llamacpp": lc["sequential"]["p50_s"]},
                "p50_speedup_1_client": round(e["sequential"]["p50_s"] / lc["sequential"]["p50_s"], 2),
                "throughput_ratio": {x["clients"]: round(y["requests_per_s"] / x["requests_per_s"], 2)
                                     for x, y in zip(e["levels"], lc["levels"], strict=True)},
                "verdicts_identical": f"{sum(a == b for a, b in pairs)}/{len(pairs)}",
                "answers_identical": f"{sum(a == b for a, b in answers)}/{len(answers)}"}
    print(json.dumps(summary), flush=True)
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "engines": results})
    plot(results, list(sets), args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
