"""The command table and a fast, light `--help`."""

import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from slmtune.cli import app

COMMANDS = {"ingest", "curate", "cluster", "plan", "train", "merge", "eval", "export", "models", "flywheel", "serve"}


def test_command_table():
    assert set(get_command(app).commands) == COMMANDS


def test_help_does_not_import_the_training_stack():
    code = ("import sys; from typer.testing import CliRunner; from slmtune.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = {'torch', 'transformers', 'peft', 'trl'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"slmtune {version('slmtune')}"


# (command, option, its choices): --help lists them, shells complete them, anything else is a usage error.
CHOICES = [
    ("ingest", "--format", ["auto", "openai", "messages", "anthropic"]),
    ("curate", "--on-secret", ["redact", "drop"]),
    ("curate", "--scrubber", ["regex", "presidio"]),
    ("cluster", "--embedder", ["tfidf", "minilm"]),
    ("merge", "--dtype", ["auto", "float32", "bfloat16", "float16"]),
    ("serve", "--engine", ["embedded", "llamacpp", "vllm"]),
    ("export", "--gguf", ["f16", "q8_0", "q4_0", "q4_k_m"]),
    ("flywheel", "--gguf", ["f16", "q8_0", "q4_0", "q4_k_m"]),
    ("eval", "--decoding", ["auto", "free", "constrained"]),
]
# Enough for every command's required arguments, so only the option under test is wrong.
ARGS = {"ingest": ["x.jsonl", "-o", "r.jsonl"], "curate": ["r.jsonl", "-o", "c.jsonl"],
        "cluster": ["c.jsonl", "-o", "tasks"], "merge": ["run", "-o", "m"], "serve": ["work"],
        "plan": ["tasks", "-o", "r"], "flywheel": ["logs", "-w", "work"], "export": ["run", "-o", "e"],
        "eval": ["--data", "d.jsonl", "-o", "out"]}


@pytest.mark.parametrize("command, option, choices", CHOICES, ids=[f"{c} {o}" for c, o, _ in CHOICES])
def test_enum_options_list_their_choices_and_refuse_others(command, option, choices):
    runner = CliRunner()
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert res.exit_code == 0
    line = next(x for x in res.output.splitlines() if option in x)
    assert "|".join(choices) in line, line
    res = runner.invoke(app, [command, *ARGS[command], option, "nonsense"])
    assert res.exit_code == 2 and option in res.output and "'nonsense'" in res.output, res.output


def test_enum_choices_match_what_the_stages_accept():
    from slmtune.data.ingest import FORMATS

    assert [c for c, o, _ in CHOICES if o == "--format"] == ["ingest"]
    assert CHOICES[0][2] == ["auto", *FORMATS]
    from slmtune.export.gguf_export import GGUF_TYPES

    assert all(tuple(c) == GGUF_TYPES for _, o, c in CHOICES if o == "--gguf")
    from slmtune.infer.decoding import DECODINGS

    assert [tuple(c) for _, o, c in CHOICES if o == "--decoding"] == [DECODINGS]
    from slmtune.serve.server import ENGINES

    assert [tuple(c) for _, o, c in CHOICES if o == "--engine"] == [ENGINES]


@pytest.mark.parametrize("command", ["plan", "flywheel"])
@pytest.mark.parametrize("bad", ["12tb", "nonsense", "0gb", "24"])
def test_bad_gpu_is_a_usage_error_naming_the_forms(command, bad):
    res = CliRunner().invoke(app, [command, *ARGS[command], "--gpu", bad])
    assert res.exit_code == 2 and "--gpu" in res.output and "Traceback" not in res.output, res.output
    assert "auto, cpu" in " ".join(res.output.split())


def test_gpu_help_lists_the_forms():
    res = CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    line = next(x for x in res.output.splitlines() if "--gpu" in x)
    assert "auto|cpu|NNgb" in line and "12gb" in line


@pytest.mark.parametrize("value, canonical", [("12gb", "12gb"), ("40gb", "40gb"), ("24GB", "24gb"),
                                              ("7.5gb", "7.5gb"), ("cpu", "cpu"), ("CPU", "cpu")])
def test_gpu_sizes_are_normalized(value, canonical):
    from slmtune.device import gpu_spec

    assert gpu_spec(value) == canonical


def test_gpu_auto_reads_cuda_device_0(monkeypatch):
    import types

    from slmtune.device import detect_gpu, gpu_spec

    props = types.SimpleNamespace(total_memory=25_393_692_672)  # what a 24 GB card reports: 23.65 GiB
    cuda = types.SimpleNamespace(is_available=lambda: True, get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert detect_gpu() == "23.6gb" == gpu_spec("auto")
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert gpu_spec("auto") == "cpu"
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed: import fails
    assert gpu_spec("auto") == "cpu"


def test_missing_argument_is_a_usage_error():
    res = CliRunner().invoke(app, ["plan"])
    assert res.exit_code == 2
    res = CliRunner().invoke(app, ["serve"])  # neither WORKDIR nor --router
    assert res.exit_code == 2 and "--router" in res.output


def test_progress_goes_to_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    """A log file gets progress too (rich draws nothing there): a line per stage, no spinner escapes."""
    import subprocess
    import sys

    from slmtune.synthetic.logs import write_logs

    write_logs(tmp_path, 60, seed=1)
    run = [sys.executable, "-m", "slmtune.cli"]
    subprocess.run([*run, "ingest", tmp_path / "logs", "-o", tmp_path / "rec.jsonl"], check=True, capture_output=True)
    subprocess.run([*run, "curate", tmp_path / "rec.jsonl", "-o", tmp_path / "cur.jsonl"], check=True,
                   capture_output=True)
    with open(tmp_path / "cluster.log", "w") as log:
        subprocess.run([*run, "cluster", tmp_path / "cur.jsonl", "-o", tmp_path / "tasks", "--min-size", "8"],
                       check=True, stdout=subprocess.DEVNULL, stderr=log)
    lines = (tmp_path / "cluster.log").read_text().splitlines()
    assert [x for x in lines if x.startswith("cluster: grouping")], lines
    assert all("\x1b" not in x for x in lines)


def test_serve_and_eval_decoding_flags_and_their_old_names():
    """serve takes --decoding like eval; the old --constrained/--no-constrained (serve) and --constrained (eval)
    stay as hidden aliases for one release."""
    from slmtune.cli import Decoding, _serve_decoding
    from slmtune.errors import SlmtuneError
    from slmtune.infer.decoding import DECODINGS

    assert _serve_decoding(Decoding("auto"), None) == "auto" and _serve_decoding(Decoding("free"), None) == "free"
    assert _serve_decoding(Decoding("auto"), True) == "constrained"
    assert _serve_decoding(Decoding("auto"), False) == "free"
    with pytest.raises(SlmtuneError, match="not both"):
        _serve_decoding(Decoding("free"), True)
    for command, new, old in (("serve", "--decoding", "--constrained"), ("eval", "--compare-decodings",
                                                                         "--constrained")):
        shown = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert new in shown and old not in shown, command
    assert set(DECODINGS) == {"auto", "free", "constrained"}


def _field_docstrings(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings, read from the imported class (inspect), whitespace collapsed."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:], strict=False)
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


@pytest.mark.parametrize("command", ["serve", "flywheel", "curate", "eval"])
def test_every_option_default_and_help_equal_its_config_field(command):
    """A setting is declared once, as a config dataclass field with its docstring: the option's help is that
    docstring and its default that field's default. Options that only the CLI has (inputs, outputs, old names)
    are listed; any other must map to a documented field."""
    import dataclasses
    from enum import Enum

    from slmtune.data.curate import CurateConfig
    from slmtune.eval.evaluate import GenSettings
    from slmtune.flywheel.loop import FlywheelConfig
    from slmtune.serve.config import ServeConfig

    config = {"serve": ServeConfig, "flywheel": FlywheelConfig, "curate": CurateConfig, "eval": GenSettings}[command]
    renamed = {"upstream_timeout": "upstream_timeout_s", "slm_timeout": "slm_timeout_s", "engine_url": "engine_urls",
               "set_": "overrides"}
    cli_only = {"serve": {"workdir", "router", "print_vllm_command", "old_constrained"},
                "flywheel": {"logs", "workdir"}, "curate": {"records", "out", "report"},
                # eval: what to score and how to judge it, arguments of `evaluate` beside its GenSettings
                "eval": {"data", "out", "model", "baseline", "predictions", "compare_decodings", "old_compare", "gate",
                         "limit", "target_accuracy"}}[command]
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    docs = _field_docstrings(config)
    checked = 0
    for p in get_command(app).commands[command].params:
        if p.name in cli_only:
            continue
        field = renamed.get(p.name, p.name)
        assert field in fields, f"{command} {p.opts[0]} has no {config.__name__} field"
        default = p.default.value if isinstance(p.default, Enum) else p.default
        want = fields[field]
        assert default == want or (default is None and want == ()), (command, p.opts[0], default, want)
        assert p.help == docs[field], (command, p.opts[0], p.help, docs.get(field))
        checked += 1
    assert checked >= {"serve": 23, "flywheel": 10, "curate": 6, "eval": 4}[command]
