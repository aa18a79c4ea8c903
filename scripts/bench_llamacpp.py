"""The llama.cpp serving engine's settings, measured: why flash attention is off, why each sequence has its own KV
stream, what a cross-stream prefix copy costs, and how llama.cpp's prefill and decode compare with transformers'.

    python scripts/bench_llamacpp.py                  # SmolLM2-135M (the default SLM), its q8_0 GGUF
    python scripts/bench_llamacpp.py --gguf X.gguf    # any GGUF (transformers' rows need --model too)

Writes the base model's q8_0 GGUF with `slmtune export`'s converter into a temp folder (or takes `--gguf`), then
prints one JSON line per measurement, each in its own llama.cpp context, one after another (2 cores):

* `attention`: a 350-token prefill and 40 one-token decode steps, flash attention off and on;
* `kv`: the same with 15 other sequences holding 400 tokens each, on one unified cache and on a stream each;
* `prefix_copy`: a 400-token prompt on one stream, copied whole to another, trimmed to the 300 tokens a second
  prompt shares, and that prompt's 50-token tail fed — against feeding the second prompt whole; logits compared;
* `transformers`: the same prefill and decode in transformers (bf16 where the CPU has fast bf16, and fp32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

N_PROMPT, N_DECODE, N_OTHER = 350, 40, 15


def context(llama_cpp, model, n_seqs: int, cells: int, flash: bool, unified: bool):
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = cells, 512, 512, n_seqs, unified
    p.n_threads = p.n_threads_batch = len(__import__("os").sched_getaffinity(0))
    p.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                         else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    return llama_cpp.llama_init_from_model(model, p)


def feed(llama_cpp, ctx, batch, tokens: list[int], pos0: int, seq: int, n_vocab: int):
    """Decode `tokens` at positions pos0.. of `seq`; the last token's logits (a numpy copy)."""
    import numpy as np

    from slmtune.serve.llamacpp import _put

    for i, t in enumerate(tokens):
        _put(batch, i, t, pos0 + i, seq, logits=i == len(tokens) - 1)
    batch.n_tokens = len(tokens)
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(tokens) - 1), shape=(n_vocab,)).copy()


def prefill_decode(llama_cpp, ctx, batch, n_vocab: int, seq: int = 0) -> dict:
    prompt = list(range(100, 100 + N_PROMPT))
    t0 = time.perf_counter()
    feed(llama_cpp, ctx, batch, prompt, 0, seq, n_vocab)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(N_DECODE):
        feed(llama_cpp, ctx, batch, [500 + k], N_PROMPT + k, seq, n_vocab)
    return {"prefill_s": round(prefill, 3), "decode_ms": round((time.perf_counter() - t0) / N_DECODE * 1000, 2)}


def llama_rows(gguf: Path) -> list[dict]:
    import llama_cpp

    from slmtune.serve.llamacpp import _quiet

    _quiet(llama_cpp)
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    rows = []

    def run(kind: str, n_seqs: int, cells: int, flash: bool, unified: bool, others: int = 0, **extra) -> None:
        ctx = context(llama_cpp, model, n_seqs, cells, flash, unified)
        for s in range(1, others + 1):  # other sequences' cached prompts
            feed(llama_cpp, ctx, batch, list(range(100, 500)), 0, s, n_vocab)
        rows.append({"measure": kind, "flash_attention": flash, "unified_kv": unified, "other_cached": others,
                     **extra, **prefill_decode(llama_cpp, ctx, batch, n_vocab)})
        llama_cpp.llama_free(ctx)
        print(json.dumps(rows[-1]), flush=True)

    for flash in (False, True):
        run("attention", 1, 2048, flash, True)
    for unified in (True, False):
        run("kv", N_OTHER + 1, 512 * (N_OTHER + 1), False, unified, others=N_OTHER)
    # a shared prefix copied across streams: the whole stream, then trimmed
    ctx = context(llama_cpp, model, 4, 4 * 1024, False, False)
    mem = llama_cpp.llama_get_memory(ctx)
    first, second = list(range(100, 500)), list(range(100, 400)) + list(range(600, 650))
    whole_t0 = time.perf_counter()
    ref = feed(llama_cpp, ctx, batch, second, 0, 2, n_vocab)
    whole = time.perf_counter() - whole_t0
    feed(llama_cpp, ctx, batch, first, 0, 1, n_vocab)
    t0 = time.perf_counter()
    llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
    llama_cpp.llama_memory_seq_cp(mem, 1, 0, -1, -1)
    llama_cpp.llama_memory_seq_rm(mem, 0, 300, -1)
    got = feed(llama_cpp, ctx, batch, second[300:], 300, 0, n_vocab)
    rows.append({"measure": "prefix_copy", "copy_trim_tail_s": round(time.perf_counter() - t0, 3),
                 "whole_prompt_s": round(whole, 3), "max_logit_difference": float(abs(got - ref).max())})
    print(json.dumps(rows[-1]), flush=True)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_model_free(model)
    return rows


def torch_rows(model_dir: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from slmtune.device import bf16_fast

    rows = []
    for dtype in ([torch.bfloat16] if bf16_fast() else []) + [torch.float32]:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        ids = torch.arange(100, 100 + N_PROMPT)[None]
        with torch.inference_mode():
            m(ids)  # warm-up
            t0 = time.perf_counter()
            cache = m(ids, use_cache=True).past_key_values
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            for k in range(N_DECODE):
                cache = m(torch.tensor([[500 + k]]), past_key_values=cache, use_cache=True).past_key_values
        rows.append({"measure": "transformers", "dtype": str(dtype).removeprefix("torch."),
                     "prefill_s": round(prefill, 3),
                     "decode_ms": round((time.perf_counter() - t0) / N_DECODE * 1000, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="base model spec (resolve_base) or checkpoint folder")
    ap.add_argument("--gguf", type=Path, help="a GGUF to time instead of the model's q8_0 conversion")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_llamacpp.json"))
    args = ap.parse_args()
    from slmtune.models import resolve_base

    folder = args.model if (Path(args.model) / "config.json").is_file() else resolve_base(args.model).path
    cpu = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16"
    print(json.dumps({"model": str(folder), "cpu": cpu, "prompt_tokens": N_PROMPT, "decode_steps": N_DECODE}),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf
        if gguf is None:
            from slmtune.export.gguf_export import write_gguf

            copy = Path(tmp) / "model"
            shutil.copytree(folder, copy)
            gguf = write_gguf(copy, "q8_0", "bench")
        rows = llama_rows(gguf)
    rows += torch_rows(str(folder))
    from slmtune.io import write_json

    write_json(args.out, {"model": str(folder), "cpu": cpu, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
