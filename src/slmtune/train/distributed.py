"""Multi-device training through the engines users already trust: accelerate (DDP, FSDP) and DeepSpeed.

`slmtune train` is plain single-process code that also runs unchanged under `accelerate launch` (the HF Trainer
picks up the process group: NCCL on GPUs, gloo on CPUs; only rank 0 writes the run files; every rank records
its adapter hash in `ranks/`). A recipe with `distributed.strategy` set makes `slmtune train` write
`OUTPUT_DIR/accelerate_config.yaml` and relaunch itself as

    accelerate launch --config_file OUTPUT_DIR/accelerate_config.yaml -m slmtune.cli train RECIPE [--set ...]

**FSDP + QLoRA** (several GPUs, a model too large for one): `model.quantization: 4bit`, `distributed.strategy:
fsdp`, bf16 weights. The 4-bit weights are then stored in the compute dtype (`bnb_4bit_quant_storage`) so FSDP
can shard them like any other tensor, `fsdp_use_orig_params: false`, and `fsdp_cpu_ram_efficient_loading` with
`fsdp_sync_module_states` so only rank 0 reads the checkpoint (as in the peft/accelerate FSDP-QLoRA guides).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from slmtune.device import cuda
from slmtune.errors import SlmtuneError
from slmtune.io import atomic_open
from slmtune.recipe import Recipe


def launched() -> bool:
    """True inside a process started by accelerate/torchrun (it sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def accelerate_config(recipe: Recipe, cuda: bool) -> dict:
    d = recipe.distributed
    mixed = "no" if not cuda else ("bf16" if recipe.train.precision in ("auto", "bf16") else "fp16")
    config: dict = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0,
                    "num_processes": d.num_processes, "mixed_precision": mixed, "use_cpu": not cuda,
                    "main_training_function": "main", "rdzv_backend": "static", "same_network": True}
    if d.strategy == "ddp":
        config["distributed_type"] = "MULTI_GPU"  # torchrun-style launcher; gloo when there is no GPU
    elif d.strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_offload_params": d.cpu_offload,
            "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True}
    else:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": d.zero_stage, "gradient_accumulation_steps": recipe.train.grad_accum,
            "offload_optimizer_device": "cpu" if d.cpu_offload else "none",
            "offload_param_device": "cpu" if d.cpu_offload and d.zero_stage == 3 else "none",
            "zero3_init_flag": d.zero_stage == 3}
    return config


def relaunch(recipe: Recipe, recipe_path: Path, overrides: list[str], resume: bool) -> int:
    """Write the accelerate config for `recipe.distributed` and rerun this command under `accelerate launch`."""
    if recipe.distributed.strategy == "deepspeed" and not _has("deepspeed"):
        raise SlmtuneError("distributed.strategy: deepspeed needs DeepSpeed: `pip install deepspeed`.")
    path = recipe.output.dir / "accelerate_config.yaml"
    with atomic_open(path) as f:
        yaml.safe_dump(accelerate_config(recipe, cuda()), f, sort_keys=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
           "-m", "slmtune.cli", "train", str(recipe_path)]
    for item in overrides:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    return subprocess.call(cmd)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
