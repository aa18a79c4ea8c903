"""Benchmark `slmtune serve`'s embedded engine: N concurrent clients, dynamic batching on vs off, same run.

    python scripts/bench_serve.py                         # SmolLM2-135M, 1 / 4 / 16 clients, 16 new tokens
    python scripts/bench_serve.py --clients 1,8 --per-client 3 --max-tokens 48 --threads 1

Serves the base model `smollm2-135m` (via `slmtune.models.resolve_base`; no export needed) through
`slmtune.serve.engine.EmbeddedEngine` as a tool-calling checkpoint, with the weather errand's prompts
(`slmtune.synthetic.tiny.weather_records`: system turn + tool specs + question, ~250 prompt tokens). Each
client sends `--per-client` requests one after another (a closed loop: N clients keep N requests in flight);
`--clients 1` sends `--single` requests. Every request generates exactly `--max-tokens` tokens or stops
earlier at end of turn, identically in both modes (greedy).

Modes, on one loaded model: *batching on* (`--batch-window-ms`, default 10, up to 16 requests per batch, as
`slmtune serve` runs by default) and *batching off* (one request per generate call), both decoding free (serve
decodes tool calls under the offered tools' grammar by default; this measures batching alone). Prints one JSON line per
(mode, clients): requests, wall seconds, requests/s, p50/p95 latency, mean batch size; then the throughput
ratio on / off per client count. Writes runs/bench/bench_serve.json. Timings are noisy on a shared machine.
"""

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slmtune.serve.engine import EmbeddedEngine
from slmtune.serve.jobs import Checkpoint, Params
from slmtune.synthetic.tiny import weather_records


def requests_for(n: int, seed: int) -> list[dict]:
    """Prompt records (the weather question, no answer) as `slmtune serve` builds them from a request."""
    return [{"messages": [*r["messages"][:-1], {"role": "assistant", "content": ""}], "tools": r["tools"]}
            for r in weather_records(n, seed=seed)]


def run_level(engine: EmbeddedEngine, ckpt: Checkpoint, clients: int, per_client: int, params: Params,
              seed: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; latency per request, wall for all."""
    todo = requests_for(clients * per_client, seed)
    latencies, batches, tokens = [], [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        for rec in todo[k::clients]:  # bounded: per_client requests each
            t0 = time.perf_counter()
            out = engine.submit(ckpt, rec, params).result(timeout=1800)
            with lock:
                latencies.append(time.perf_counter() - t0)
                batches.append(out.batch_size)
                tokens.append(out.completion_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3), "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(q[18], 2), "mean_batch": round(statistics.mean(batches), 2),
            "tokens_per_s": round(sum(tokens) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="base model spec (resolve_base) or checkpoint folder")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--per-client", type=int, default=1, help="requests each client sends (clients > 1)")
    ap.add_argument("--single", type=int, default=2, help="requests the lone client sends (clients = 1)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=10.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="runs/bench/bench_serve.json")
    args = ap.parse_args()
    import torch

    from slmtune.models import resolve_base

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model if (Path(args.model) / "config.json").is_file() else resolve_base(args.model).path
    ckpt = Checkpoint(name=Path(path).name, task="weather", category="tool_calling", schema=None, path=str(path),
                      format="merged", base_path=None)
    params = Params(max_tokens=args.max_tokens, timeout_s=3600)
    engine = EmbeddedEngine(max_loaded=1, batch_window_s=args.batch_window_ms / 1000, max_batch=args.max_batch)
    t0 = time.perf_counter()
    engine.submit(ckpt, requests_for(1, 99)[0], Params(max_tokens=4, timeout_s=3600)).result()  # load + warm up
    print(json.dumps({"model": path, "load_and_warmup_s": round(time.perf_counter() - t0, 1),
                      "torch_threads": torch.get_num_threads(), "max_tokens": args.max_tokens}), flush=True)
    rows = []
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            per = args.single if clients == 1 else args.per_client
            for mode, window, max_batch in (("on", args.batch_window_ms / 1000, args.max_batch), ("off", 0.0, 1)):
                engine.batch_window_s, engine.max_batch = window, max_batch
                row = {"batching": mode, **run_level(engine, ckpt, clients, per, params, seed=clients)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        engine.close()
    ratios = {}
    for clients in sorted({r["clients"] for r in rows}):
        on, off = (next(r for r in rows if r["clients"] == clients and r["batching"] == m) for m in ("on", "off"))
        ratios[clients] = round(on["requests_per_s"] / off["requests_per_s"], 2)
    print(json.dumps({"throughput_ratio_on_over_off": ratios}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
