"""Token lengths of records as a model will see them in training — without torch, for `slmtune plan`.

`plan` is a data stage (it runs beside ingest, curate and cluster, which never import torch), and transformers'
`AutoTokenizer` imports torch. So this module reads a checkpoint's `tokenizer.json` with `tokenizers` and renders
its chat template with transformers' own jinja renderer (`transformers.utils.chat_template_utils`, torch-free),
behind the two methods `slmtune.render` calls. The lengths therefore come from the one renderer training uses:
the same tools block, the same tool-call JSON, the same closing tokens.

Where the model's tokenizer is not on this machine (a hub model never downloaded), `tokenizer_for` returns None
and `plan` falls back to an estimate it labels as such.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.io import iter_jsonl


@dataclass(frozen=True)
class TemplateTokenizer:
    """A `tokenizers.Tokenizer` plus its chat template: the slice of a transformers tokenizer `render` uses."""

    backend: Any  # tokenizers.Tokenizer
    chat_template: str
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as templates see them

    @property
    def eos_token(self) -> str | None:
        return self.special.get("eos_token")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            tools: list | None = None, **_: Any) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **self.special)
        return rendered[0]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


def load_template_tokenizer(folder: Path) -> TemplateTokenizer | None:
    """The tokenizer of a Hugging Face checkpoint folder, or None when it has no `tokenizer.json`/template."""
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        return None
    config = _json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, str):
        return None
    special = {k: _token_text(v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v is not None}
    return TemplateTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), template, special)


@functools.lru_cache(maxsize=8)  # plan measures every task with the same few tokenizers: load each once
def tokenizer_for(base: str) -> TemplateTokenizer | None:
    """The tokenizer `model.base` trains with: a local folder, the bundled GGUF's converted checkpoint, or a hub
    model already in the local Hugging Face cache; None when it is nowhere on this machine."""
    folder = _tokenizer_folder(base)
    return load_template_tokenizer(folder) if folder else None


def _tokenizer_folder(base: str) -> Path | None:
    from slmtune.models import BUILTIN, converted_dir

    if base in BUILTIN:
        target = converted_dir(base)
        if not (target / "tokenizer.json").is_file():
            if BUILTIN[base].missing():
                return None  # not installed here: lengths are estimated (train says what to install)
            _convert_builtin(base)
        return target
    if Path(base).is_dir():
        return Path(base)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(base, "tokenizer.json")
    return Path(hit).parent if isinstance(hit, str) else None


def _convert_builtin(base: str) -> None:
    """Dequantize the bundled GGUF once (what `slmtune train` does first anyway) in a child process, so this
    process stays free of torch."""
    code = f"from slmtune.models import resolve_base; resolve_base({base!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines() or ["(no output)"]
        raise SlmtuneError(f"model.base {base!r}: could not prepare its tokenizer: {lines[-1]}")


@dataclass(frozen=True)
class RecordLength:
    line: int
    prompt: int
    target: int

    @property
    def total(self) -> int:
        return self.prompt + self.target


def record_lengths(tokenizer: TemplateTokenizer, path: Path, tool_docs: str = "full") -> list[RecordLength]:
    """Prompt and target tokens of every record in `path`, rendered exactly as `slmtune train` renders them with
    `data.tool_docs: <tool_docs>`."""
    from slmtune.render import make_renderer, render_pair

    r = make_renderer(tokenizer, tool_docs)
    out = []
    for lineno, rec in iter_jsonl(path):
        head, tail = render_pair(r, rec)
        out.append(RecordLength(lineno, len(tokenizer(head)["input_ids"]), len(tokenizer(tail)["input_ids"])))
    return out


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else str(value)
