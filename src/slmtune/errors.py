"""The one exception library code raises; the CLI turns it into a one-line message and a non-zero exit."""

from __future__ import annotations


class SlmtuneError(Exception):
    """A user-facing error: what is wrong (with the value seen) and, optionally, how to fix it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message
