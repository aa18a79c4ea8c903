"""Multi-process training: `accelerate launch` with 2 CPU processes (gloo) trains one shared adapter."""

import json
import os
import subprocess
import sys

import yaml
from test_trainer import assert_lora_trained, make_recipe

from slmtune.recipe import load_recipe
from slmtune.train.distributed import accelerate_config


def test_two_cpu_processes_train_one_shared_adapter(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model, n=16)
    with open(recipe, "a") as f:
        f.write("distributed: {strategy: ddp, num_processes: 2}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    # `slmtune train` sees distributed.strategy, writes the accelerate config and relaunches under accelerate.
    proc = subprocess.run([sys.executable, "-m", "slmtune.cli", "train", str(recipe), "--set", "train.max_steps=3",
                           "--set", "data.eval=null"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    config = yaml.safe_load((run / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2 and config["use_cpu"]
    ranks = [json.loads((run / "ranks" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert {r["world_size"] for r in ranks} == {2} and {r["backend"] for r in ranks} == {"gloo"}
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"], "DDP ranks must end with the same adapter"
    assert ranks[0]["global_step"] == 3
    assert_lora_trained(run / "adapter")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["batching"]["mode"] == "packing", "shared-prefix batching is single-process"
    assert proc.stdout.count("adapter:") == 1, "only rank 0 reports"


def test_fsdp_and_deepspeed_configs(tmp_path, tiny_model):
    recipe = load_recipe(make_recipe(tmp_path, tiny_model),
                         ["distributed.strategy=fsdp", "distributed.num_processes=4"])
    fsdp = accelerate_config(recipe, cuda=True)
    assert fsdp["distributed_type"] == "FSDP" and fsdp["num_processes"] == 4 and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    ds = accelerate_config(recipe.model_copy(update={"distributed": recipe.distributed.model_copy(
        update={"strategy": "deepspeed", "zero_stage": 3})}), cuda=True)
    assert ds["distributed_type"] == "DEEPSPEED" and ds["deepspeed_config"]["zero_stage"] == 3
