"""Figures people would rather look at than JSON: matplotlib without a display, PNGs written atomically."""

from __future__ import annotations

from pathlib import Path

from slmtune.io import atomic_open


def pyplot():
    """`matplotlib.pyplot` on the Agg backend: no display needed (CI, servers, SSH sessions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, **savefig) -> None:
    """Write `fig` to `path` as PNG (temp file + rename: a crash leaves no half image) and close it. No
    "Software" stamp, so the same figure gives the same bytes."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None}, **savefig)
    pyplot().close(fig)
