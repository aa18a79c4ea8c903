"""What a run leaves beside its adapter: manifest, metrics, resolved recipe, loss curve; and checkpoint lookup."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from slmtune.device import cuda
from slmtune.errors import SlmtuneError
from slmtune.io import atomic_open, file_fingerprint, now, write_json
from slmtune.recipe import dump_recipe_yaml

if TYPE_CHECKING:
    from slmtune.recipe import Recipe
    from slmtune.train.dataset import Prepared

LIBRARIES = ("slmtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak RSS (ru_maxrss is KiB on Linux)."""
    if cuda():
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 if platform.system() == "Linux" else kib / 2**20, 1)


def rss_anon_mb() -> float | None:
    """Private (anonymous) resident memory now: what the run allocated, without mmap-ed checkpoint pages."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakSampler:
    """Samples `rss_anon_mb` every 20 ms on a daemon thread; `.peak` is the highest seen (CPU runs)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak = rss_anon_mb() or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, rss_anon_mb() or 0.0)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = round(max(self.peak, rss_anon_mb() or 0.0), 1)


class Phase(PeakSampler):
    """A step of a training run (load, train, save): its wall time and its peak anonymous memory (`PeakSampler`)."""

    def __enter__(self) -> Phase:
        self.t0 = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.t0
        return super().__exit__(*exc)


def last_checkpoint(root: Path) -> Path | None:
    """Newest *complete* `checkpoint-N` (a kill -9 mid-save leaves one without trainer_state.json)."""
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def data_fingerprint(path: Path | None) -> dict | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return {"path": str(path), "sha256": file_fingerprint(path), "records": n}


def manifest(recipe: Recipe, prep: Prepared) -> dict:
    return {
        "name": recipe.name,
        "task": recipe.task.model_dump(mode="json", by_alias=True) if recipe.task else None,
        "base_model": {"spec": recipe.model.base, "gguf_file": recipe.model.gguf_file,
                       "name": prep.ref.name, "path": prep.ref.path},
        "quantization": recipe.model.quantization,
        "dtype": recipe.model.dtype,
        "render_mode": prep.renderer.mode,
        "method": recipe.method,
        "lora": recipe.lora.model_dump(mode="json") if recipe.method in ("lora", "grpo") else None,
        "rl": recipe.rl.model_dump(mode="json") if recipe.method == "grpo" else None,
        "data": {"train": data_fingerprint(recipe.data.train), "eval": data_fingerprint(recipe.data.eval)},
        "versions": versions(),
        "created": now(),
    }


def write_run_files(recipe: Recipe, prep: Prepared, metrics: dict) -> None:
    run_dir = recipe.output.dir
    with atomic_open(run_dir / "recipe.yaml") as f:
        f.write(dump_recipe_yaml(recipe, header=f"# Resolved recipe of run {recipe.name!r}, as trained.\n"))
    write_json(run_dir / "manifest.json", manifest(recipe, prep))
    write_json(run_dir / "metrics.json", metrics)
    plot_loss(metrics, run_dir / "loss.png", title=recipe.name)


def plot_loss(metrics: dict, path: Path, title: str) -> None:
    from slmtune.plots import pyplot, save_png

    plt = pyplot()
    steps = [h["step"] for h in metrics["train_loss"]]
    losses = [h["loss"] for h in metrics["train_loss"]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker="o", markersize=3, label="train loss")
    if metrics.get("eval_loss") is not None and steps:
        ax.axhline(metrics["eval_loss"], color="tab:orange", linestyle="--", label="final eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def read_run(run_dir: Path) -> dict:
    """A finished run's manifest; a folder that is not one is a one-line error naming it."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise SlmtuneError(f"{run_dir}: no manifest.json; not a run directory written by `slmtune train`.")
    if not run_weights(run_dir):
        raise SlmtuneError(f"{run_dir}: no adapter/ (nor model/ of a full fine-tune); did the run finish?")
    return json.loads(path.read_text())


def run_weights(run_dir: Path) -> Path | None:
    """What a finished run trained: its `adapter/` (LoRA, QLoRA) or its `model/` (`method: full`); None if neither."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir / "adapter"
    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model"
    return None
