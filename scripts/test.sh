#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
# bench: bfcl-eval's data, AST checker and multi-turn applications (tests/scripts/test_bench_agent.py runs them);
# llamacpp: the llama.cpp engine's tests (they skip, saying why, where it cannot build)
. "$ROOT/scripts/setup_env.sh" test,bench,llamacpp
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check .  # lint first: rules and exceptions in pyproject.toml [tool.ruff]
python -m pytest -q -p no:cacheprovider "$@"
