"""Field docstrings of the config dataclasses, read from their source: one declaration per option.

A setting is written once, as a config dataclass field with its docstring (litgpt's `args.py` style); the CLI's
`--help` for that option is the docstring, read here with `ast` from the module's file, without importing it —
so `slmtune --help` stays fast although `ServeConfig` lives beside the whole serving stack. tests/test_cli.py
checks every option's help and default against its field."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@functools.cache
def field_docs(module: str, cls: str) -> dict[str, str]:
    """{field: its docstring, whitespace collapsed} for dataclass `cls` in `module` (a path under slmtune/, e.g.
    "serve/config.py"). A field without a docstring is missing from the map."""
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
    body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = {}
    for field, doc in zip(body, body[1:], strict=False):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            out[field.target.id] = " ".join(doc.value.value.split())
    return out
