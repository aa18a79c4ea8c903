"""scripts/gpu_check.sh: its CPU parts for real (--dry-run: the demo logs trained with LoRA and QLoRA on the tiny
model, adapters exported, vLLM's commands printed, the held-out calls replayed through the embedded engine over
HTTP), and a clear refusal without a CUDA device."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_trains_exports_prints_vllm_and_replays(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, text=True,
                         capture_output=True, timeout=1500, env=os.environ | {"GPU_CHECK_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "vllm serve " in out and "--enable-lora" in out and "--tool-call-parser hermes" in out
    assert "--engine vllm --engine-url" in out and "dry run: vLLM not started" in out
    for method in ("lora", "qlora"):
        router = json.loads((tmp_path / method / "router.json").read_text())
        assert router["routes"], method
        for r in router["routes"]:
            assert (Path(r["checkpoint"]) / "adapter_config.json").is_file()
    report = json.loads((tmp_path / "replay-embedded.json").read_text())
    assert report["engine"] == "embedded" and report["calls"]
    routes = {r["task"] for r in json.loads((tmp_path / "lora" / "router.json").read_text())["routes"]}
    assert {c["route"] for c in report["calls"]} <= routes | {"llm", "error"}
    assert "embedded  calls" in out


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a CUDA machine: the check would run for real")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, text=True, capture_output=True,
                         timeout=60, env=os.environ | {"GPU_CHECK_DIR": str(tmp_path)})
    assert run.returncode == 2 and "no CUDA device here" in run.stderr and "--dry-run" in run.stderr
