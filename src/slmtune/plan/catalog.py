"""Candidate small language models, with the architecture figures the memory estimate needs.

Figures are the models' published `config.json` values (layers, hidden size, MLP size, heads, KV heads, head
dim, vocabulary, tied embeddings, context). `tools` says whether the model's chat template renders a `tools`
list; where it does not, the trainer puts the tool specs in the system turn.

Nemotron Nano 9B v2 is a hybrid (27 Mamba-2, 25 MLP and 4 attention layers out of 56); the estimate treats all
56 as attention+MLP blocks, which over-counts its activations — the safe direction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmtune.errors import SlmtuneError
from slmtune.plan.estimate import Arch


@dataclass(frozen=True)
class ModelSpec:
    key: str  # short catalog name: `--base-model qwen3-1.7b`
    hf_id: str
    base: str  # what the recipe's model.base says
    arch: Arch
    context: int
    licence: str
    tools: bool  # chat template renders `tools`
    gguf: bool = False  # base is a GGUF checkpoint: dequantized on load, so no 4bit/8bit

    @property
    def params(self) -> int:
        return self.arch.params


def _spec(key, hf_id, params, layers, hidden, inter, heads, kv, hd, vocab, tied, ctx, licence, tools, base=None,
          gguf=False) -> ModelSpec:
    arch = Arch(params, layers, hidden, inter, heads, kv, hd, vocab, tied)
    return ModelSpec(key, hf_id, base or hf_id, arch, ctx, licence, tools, gguf)


# key, hub id, params, layers, hidden, intermediate, heads, kv heads, head dim, vocab, tied, context, licence, tools
CATALOG: dict[str, ModelSpec] = {s.key: s for s in (
    _spec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008, 30, 576, 1536, 9, 3, 64, 49152,
          True, 8192, "Apache-2.0", False, base="smollm2-135m", gguf=True),
    _spec("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", 361_821_120, 32, 960, 2560, 15, 5, 64, 49152,
          True, 8192, "Apache-2.0", False),
    _spec("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", 1_711_376_384, 24, 2048, 8192, 32, 32, 64, 49152,
          True, 8192, "Apache-2.0", False),
    _spec("gemma3-270m", "google/gemma-3-270m", 268_098_176, 18, 640, 2048, 4, 1, 256, 262144,
          True, 32768, "Gemma", False, base="gemma3-270m", gguf=True),  # offline: the pretrained GGUF (extra gemma)
    _spec("gemma3-270m-it", "google/gemma-3-270m-it", 268_098_176, 18, 640, 2048, 4, 1, 256, 262144,
          True, 32768, "Gemma", False),  # from the hub: the instruction-tuned one
    _spec("gemma3-1b", "google/gemma-3-1b-it", 999_885_952, 26, 1152, 6912, 4, 1, 256, 262144,
          True, 32768, "Gemma", False),
    _spec("qwen3-0.6b", "Qwen/Qwen3-0.6B", 596_049_920, 28, 1024, 3072, 16, 8, 128, 151936,
          True, 32768, "Apache-2.0", True),
    _spec("qwen3-1.7b", "Qwen/Qwen3-1.7B", 1_720_574_976, 28, 2048, 6144, 16, 8, 128, 151936,
          True, 32768, "Apache-2.0", True),
    _spec("qwen3-4b", "Qwen/Qwen3-4B", 4_022_468_096, 36, 2560, 9728, 32, 8, 128, 151936,
          True, 32768, "Apache-2.0", True),
    _spec("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400, 16, 2048, 8192, 32, 8, 64, 128256,
          True, 131072, "Llama 3.2 Community", True),
    _spec("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", 3_212_749_824, 28, 3072, 8192, 24, 8, 128, 128256,
          True, 131072, "Llama 3.2 Community", True),
    _spec("phi4-mini", "microsoft/Phi-4-mini-instruct", 3_836_021_760, 32, 3072, 8192, 24, 8, 128, 200064,
          True, 131072, "MIT", True),
    _spec("nemotron-nano-9b-v2", "nvidia/NVIDIA-Nemotron-Nano-9B-v2", 8_888_227_328, 56, 4480, 15680, 40, 8, 128,
          131072, False, 131072, "NVIDIA Open Model", True),
)}


def lookup(name: str) -> ModelSpec:
    """A catalog model by key or hub id, or a local Hugging Face folder described by its config.json."""
    for spec in CATALOG.values():
        if name.lower() in (spec.key, spec.hf_id.lower(), spec.base.lower()):
            return spec
    path = Path(name)
    if (path / "config.json").is_file():
        return from_config_dir(path)
    keys = ", ".join(CATALOG)
    raise SlmtuneError(f"--base-model {name!r}: not in the catalog and not a folder with a config.json.",
                       f"Use one of: {keys}; or a local model folder.")


def from_config_dir(path: Path) -> ModelSpec:
    """A ModelSpec from a local model's config.json (no transformers import: plain JSON)."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise SlmtuneError(f"{path / 'config.json'}: not valid JSON ({e}).") from None
    cfg = cfg.get("text_config", cfg)
    try:
        h, layers, vocab = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise SlmtuneError(f"{path / 'config.json'}: needs hidden_size, num_hidden_layers and vocab_size.") from None
    heads = int(cfg.get("num_attention_heads") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    inter = int(cfg.get("intermediate_size") or 4 * h)
    tied = bool(cfg.get("tie_word_embeddings", True))
    arch = Arch(0, layers, h, inter, heads, kv, hd, vocab, tied)
    # Parameter count from the shapes: per block q,o (h·q each), k,v (h·kv each), gate/up/down (3·h·I).
    per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter
    params = per_layer * layers + arch.embedding_params
    arch = Arch(params, layers, h, inter, heads, kv, hd, vocab, tied)
    ctx = int(cfg.get("max_position_embeddings") or 2048)
    return ModelSpec(path.name, str(path), str(path.resolve()), arch, ctx, "local", _has_tool_template(path))


def _has_tool_template(path: Path) -> bool:
    tok = path / "tokenizer_config.json"
    text = tok.read_text(encoding="utf-8") if tok.is_file() else ""
    jinja = path / "chat_template.jinja"
    text += jinja.read_text(encoding="utf-8") if jinja.is_file() else ""
    return "tools" in text
