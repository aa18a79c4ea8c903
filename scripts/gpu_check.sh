#!/usr/bin/env bash
# The GPU path, for real: train, export and serve the demo's tasks on one CUDA machine, with a real vLLM behind
# `slmtune serve --engine vllm`, and compare its guard verdicts with the embedded engine's on the same calls.
#
#   scripts/gpu_check.sh             # a CUDA machine, from a bare checkout (installs included; sized for 10 min
#                                    # on one H100): writes runs/gpu_check/ and prints the comparison
#   scripts/gpu_check.sh --dry-run   # any machine (CI runs it): every CPU part on the tiny offline model, 2 steps;
#                                    # vLLM is not installed or started, its commands are printed
#
# 1. set-up: .venv with vLLM (its CUDA torch) and Liger Kernel (fused loss) — the dry run uses the current venv;
# 2. the demo's logs trained twice, LoRA and QLoRA (bf16; Liger's fused linear cross-entropy when installed),
#    each task's adapter exported (--adapter-only: vLLM serves them as LoRA modules on one base);
# 3. `slmtune serve --print-vllm-command`: one vLLM per base, multi-LoRA, --enable-auto-tool-choice
#    --tool-call-parser hermes; started on 127.0.0.1 as printed;
# 4. the held-out calls replayed (scripts/demo_serve.py, the openai client) through `slmtune serve --engine vllm`
#    and through the embedded engine, each in front of the stand-in upstream;
# 5. printed: per engine tokens/s, p50/p95, the share the SLMs answered; then the calls whose verdict differs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT="${GPU_CHECK_DIR:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - START )) s]: $*"; }

if [ "$DRY" = 1 ]; then
  python -c "import slmtune" 2>/dev/null || . "$ROOT/scripts/setup_env.sh" demo
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  BASE="$OUT/tiny-model"
  [ -f "$BASE/config.json" ] || python "$ROOT/scripts/make_tiny_model.py" "$BASE" >/dev/null
  GPU=cpu STEPS=2 LIMIT=4 CALLS=2 BATCH=2
else
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (nvidia-smi). Run scripts/gpu_check.sh --dry-run for the CPU parts." >&2
    exit 2
  fi
  nvidia-smi -L
  # vLLM pins its own CUDA build of torch: installed first, in place of setup_env's CPU pin.
  SLMTUNE_TORCH="vllm liger-kernel" . "$ROOT/scripts/setup_env.sh" demo
  BASE=smollm2-135m GPU=auto STEPS=60 LIMIT=50 CALLS=10 BATCH=8
fi
LOGS="$(python -c 'import slmtune, pathlib; print(pathlib.Path(slmtune.__file__).parent / "examples" / "agent_logs")')"
say "set up (python $(python -c 'import sys; print(sys.version.split()[0])'), torch $(python -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"

# 2. LoRA and QLoRA, bf16, adapters exported; --min-coverage 0: every trained task gets a route to replay
for METHOD in lora qlora; do
  QUANT=none
  if [ "$METHOD" = qlora ]; then QUANT=4bit; fi  # QLoRA: LoRA on the NF4-quantized base (bitsandbytes)
  slmtune flywheel "$LOGS" -w "$OUT/$METHOD" --gpu "$GPU" --base-model "$BASE" --max-tasks 3 --max-steps "$STEPS" \
    --eval-fraction 0.6 --eval-limit "$LIMIT" --target-accuracy 0.9 --min-coverage 0 --adapter-only \
    --set method=lora --set model.quantization="$QUANT" --set train.precision=bf16 \
    --set train.batch_size="$BATCH" > "$OUT/$METHOD.log" 2>&1 || { tail -20 "$OUT/$METHOD.log"; exit 1; }
  say "$METHOD: $(python -c "import json,sys; r=json.load(open(sys.argv[1])); print(len(r['routes']), 'routes:', ', '.join(x['task'] for x in r['routes']))" "$OUT/$METHOD/router.json")"
done
WORK="$OUT/lora"

# 3. the vLLM commands for the LoRA exports
slmtune serve "$WORK" --print-vllm-command | tee "$OUT/vllm_commands.txt"

# 4. replay: the embedded engine, then vLLM
python "$ROOT/scripts/demo_serve.py" --workdir "$WORK" --limit "$CALLS" --engine embedded --slm-timeout 300 \
  --report "$OUT/replay-embedded.json" > "$OUT/replay-embedded.log" 2>&1 || { tail -20 "$OUT/replay-embedded.log"; exit 1; }
say "embedded engine replayed"
REPORTS=("$OUT/replay-embedded.json")
if [ "$DRY" = 1 ]; then
  say "dry run: vLLM not started (commands above)"
else
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
  URLS=()
  while read -r line; do
    case "$line" in
      "vllm serve "*)
        eval "exec $line --enforce-eager --gpu-memory-utilization 0.4" > "$OUT/vllm-${#PIDS[@]}.log" 2>&1 &
        PIDS+=($!) ;;
      "slmtune serve "*)
        read -r -a URLS <<< "$(echo "$line" | grep -o -- '--engine-url [^ ]*' | tr '\n' ' ')" ;;
    esac
  done < "$OUT/vllm_commands.txt"
  for url in $(grep -o 'http://127.0.0.1:[0-9]*/v1' "$OUT/vllm_commands.txt" | sort -u); do
    for _ in $(seq 240); do curl -sf "$url/models" >/dev/null && break; sleep 1; done
    curl -sf "$url/models" >/dev/null || { tail -30 "$OUT"/vllm-*.log; exit 1; }
  done
  say "vLLM up"
  python "$ROOT/scripts/demo_serve.py" --workdir "$WORK" --limit "$CALLS" --engine vllm --slm-timeout 300 \
    --serve-args "${URLS[*]}" --report "$OUT/replay-vllm.json" > "$OUT/replay-vllm.log" 2>&1 \
    || { tail -20 "$OUT/replay-vllm.log"; exit 1; }
  REPORTS+=("$OUT/replay-vllm.json")
fi

# 5. side by side
python - "${REPORTS[@]}" <<'EOF'
import json, sys

reports = {json.load(open(p))["engine"]: json.load(open(p)) for p in sys.argv[1:]}
for engine, r in reports.items():
    slm = [c for c in r["calls"] if c["route"] not in ("llm", "error")]
    tokens = sum(c.get("completion_tokens") or 0 for c in slm)
    seconds = sum(c["latency_ms"] for c in slm) / 1000
    print(f"{engine:9s} calls {len(r['calls'])}, SLM answered {len(slm)}, "
          f"{tokens / seconds if seconds else 0:.1f} tokens/s per call, p50 {r['slm']['p50_ms']} ms, "
          f"p95 {r['slm']['p95_ms']} ms")
if len(reports) == 2:
    a, b = reports.values()
    verdict = lambda c: c["fallback"] or c["route"]  # noqa: E731
    differ = [(x["id"], verdict(x), verdict(y)) for x, y in zip(a["calls"], b["calls"]) if verdict(x) != verdict(y)]
    print(f"guard verdicts identical on {len(a['calls']) - len(differ)}/{len(a['calls'])} calls")
    for row in differ:
        print("  differs:", *row)
EOF
say "done; outputs in $OUT"
