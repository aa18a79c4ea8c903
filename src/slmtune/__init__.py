"""slmtune: turn an AI agent's own LLM traffic into small, specialized language models."""

from slmtune.errors import SlmtuneError

__version__ = "0.1.0"
__all__ = ["SlmtuneError", "__version__"]
