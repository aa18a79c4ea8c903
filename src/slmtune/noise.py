"""Third-party log lines slmtune knows do not apply, dropped by name and text; every other warning stays.

* bitsandbytes (on an AVX512-BF16 CPU, at import): "Failed to load CPU gemm_4bit_forward from kernels-community
  ... Set trust_remote_code=True ...". It tries to download a kernel from the Hugging Face Hub, which slmtune never
  does at run time (offline by design); bitsandbytes then uses its own CPU 4-bit path, which is what slmtune
  tests and measures. The advice to trust remote code is advice a user must not follow. It was printed by every
  train and eval, 4-bit layers or not.
* kernels (the same attempt): "Skipping publisher trust check for 'kernels-community/...' because Hugging Face
  Hub is in offline mode."
"""

from __future__ import annotations

import logging

KNOWN = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/",),
}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Install the filters (idempotent; loggers are looked up by name, so nothing is imported)."""
    for name, prefixes in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
