"""The embedded engine's models: checkpoints loaded lazily with transformers on first use and kept in an LRU of
`max_loaded` exports. Merged exports are loaded whole; adapter exports on the same base share one copy of the
base weights (one `PeftModel` per base, one named LoRA adapter per export, switched per batch), so ten
adapters on SmolLM2-135M cost its 540 MB of fp32 weights once plus ~20 MB per r=16 all-linear adapter
(4.9M parameters) instead of 5.4 GB. `max_loaded` counts exports, adapters and merged alike."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from slmtune.errors import SlmtuneError
from slmtune.serve.jobs import Checkpoint


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    renderer: Any
    stops: list[int]
    base_key: str | None  # adapters: key of the shared base in `ModelCache.bases`
    prefix: Any = field(default=None)  # its `slmtune.infer.generate.PrefixCache`: the last prompt prefix's KV


class ModelCache:
    """Only the engine's worker thread loads and unloads; `loaded()` may be read from any thread."""

    def __init__(self, max_loaded: int, dtype: str = "auto", prefix_cache: bool = True):
        self.max_loaded, self.dtype, self.prefix_cache = max_loaded, dtype, prefix_cache
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._bases: dict[str, Any] = {}  # base path -> PeftModel holding the loaded adapters of that base
        self._lock = threading.Lock()

    def get(self, ckpt: Checkpoint) -> Loaded:
        """The checkpoint ready to generate (an adapter made the active one of its shared base)."""
        lm = self._load(ckpt)
        if lm.base_key is not None:
            self._bases[lm.base_key].set_adapter(ckpt.name)
        return lm

    def loaded(self) -> dict:
        """What is in memory: exports (LRU order, oldest first) and shared bases with their adapters."""
        with self._lock:
            return {"exports": list(self._loaded),
                    "bases": {k: sorted(getattr(m, "peft_config", {})) for k, m in self._bases.items()}}

    def _load(self, ckpt: Checkpoint) -> Loaded:
        if ckpt.name in self._loaded:
            self._loaded.move_to_end(ckpt.name)
            return self._loaded[ckpt.name]
        while len(self._loaded) >= self.max_loaded:
            self._unload(next(iter(self._loaded)))
        from transformers import AutoTokenizer

        from slmtune.infer.generate import stop_ids
        from slmtune.render import make_renderer

        tok = AutoTokenizer.from_pretrained(ckpt.path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model, base_key = self._weights(ckpt)
        from slmtune.infer.generate import PrefixCache

        loaded = Loaded(model, tok, make_renderer(tok), stop_ids(tok, model), base_key,
                        PrefixCache() if self.prefix_cache else None)
        with self._lock:
            self._loaded[ckpt.name] = loaded
        return loaded

    def _weights(self, ckpt: Checkpoint):
        from transformers import AutoModelForCausalLM

        from slmtune.models import pick_dtype

        if ckpt.format != "adapter":
            return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=pick_dtype(self.dtype)).eval(), None
        if not ckpt.base_path:
            raise SlmtuneError(f"{ckpt.path}: an adapter export without `base_model.path` in slmtune.json.")
        from peft import PeftModel

        shared = self._bases.get(ckpt.base_path)
        if shared is None:
            base = AutoModelForCausalLM.from_pretrained(ckpt.base_path, dtype=pick_dtype(self.dtype))
            shared = PeftModel.from_pretrained(base, ckpt.path, adapter_name=ckpt.name).eval()
            with self._lock:
                self._bases[ckpt.base_path] = shared
        else:
            shared.load_adapter(ckpt.path, adapter_name=ckpt.name)
        return shared, ckpt.base_path

    def _unload(self, name: str) -> None:
        with self._lock:
            lm = self._loaded.pop(name)
            if lm.base_key is None:
                return
            shared = self._bases[lm.base_key]
            others = [a for a in shared.peft_config if a != name]
            if not others:
                del self._bases[lm.base_key]  # the last adapter of this base: the base goes too
                return
            shared.set_adapter(others[0])
            shared.delete_adapter(name)
