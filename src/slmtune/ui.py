"""What library code hands a front end: progress callbacks and numbers formatted for people.

Library functions never print; long ones take a `progress` callback (`Progress`: stage, done, total — total 0 when
unknown) that the CLI turns into a rich progress bar and tests leave out.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def ticker(progress: Progress | None) -> Progress:
    """`progress`, or a callback that does nothing."""
    return progress or (lambda *_: None)


def fmt(v) -> str:
    """A metric for a table: 3 decimals for floats, an en dash for a missing value."""
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def human_size(n: int) -> str:
    """Bytes as people read them (binary units): 1.2 GB, 540.0 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
