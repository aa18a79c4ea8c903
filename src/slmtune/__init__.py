"""slmtune: turn an AI agent's own LLM traffic into small, specialized language models."""

from slmtune.errors import SlmtuneError
from slmtune.noise import quiet_known_noise

quiet_known_noise()  # before any stage imports bitsandbytes: see slmtune.noise for what is dropped and why

__version__ = "0.1.0"
__all__ = ["SlmtuneError", "__version__"]
