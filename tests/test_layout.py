"""The house's shape: stage subpackages whose imports point down the pipeline, without cycles, and data stages that
never load the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slmtune"
# Down the pipeline: a module may import its own package, the shared top-level modules, and stages before it.
# synthetic (demo logs, the tiny model) sits beside the pipeline: it reads ingest's ids; only the CLI, tests and
# scripts use it.
ORDER = ["data", "tasks", "plan", "train", "infer", "eval", "rl", "export", "serve", "flywheel"]
TOP = "top"  # errors, io, ui, device, plots, records, recipe, render, models


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in [*ORDER, "synthetic"]:
        return parts[1]
    return "cli" if parts[1:] == ["cli"] else TOP


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if a == b or b == TOP or a == "cli":
        return True
    if a == "synthetic":
        return b == "data"
    if a == TOP or b in ("synthetic", "cli"):
        return False
    return ORDER.index(b) < ORDER.index(a)


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every slmtune module `path` imports, at the top, inside functions, or under TYPE_CHECKING."""
    known = {module_name(p) for p in SRC.rglob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("slmtune")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slmtune") and node.level == 0:
            for a in node.names:  # `from slmtune.train import prefix` imports a module, not a name
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in SRC.rglob("*.py")}


def test_imports_point_down_the_pipeline():
    wrong = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps if not allowed(a, b))
    assert wrong == []


def test_no_import_cycles_type_only_ones_included():
    g = {m: {d for d in deps if not d.endswith("__init__")} for m, deps in graph().items()}
    # A package face (`slmtune.train`) imports its own modules; edges into a face count as edges into those.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if nxt.rsplit(".", 1)[0] == node or node.rsplit(".", 1)[0] == nxt:
                continue  # a face and its own module
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("package", ["slmtune.data", "slmtune.tasks", "slmtune.plan", "slmtune.cli"])
def test_data_stages_do_not_import_the_training_stack(package):
    code = (f"import sys, {package}; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_stage_face_names_its_entry_points():
    import importlib

    for pkg in [*ORDER, "synthetic"]:
        face = importlib.import_module(f"slmtune.{pkg}")
        assert face.__all__ and all(callable(getattr(face, n)) or n.isupper() for n in face.__all__), pkg


def test_serving_code_stands_on_infer_not_eval():
    """Generation, grammars and decoding live in `infer`, which eval and serve share: serve never imports eval."""
    g = graph()
    serving = {m: deps for m, deps in g.items() if m.startswith("slmtune.serve")}
    assert serving and not any(d.startswith("slmtune.eval") for deps in serving.values() for d in deps)
    assert any(d.startswith("slmtune.infer") for deps in serving.values() for d in deps)
