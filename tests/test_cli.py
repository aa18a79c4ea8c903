"""The command table and a fast, light `--help`."""

import subprocess
import sys

from typer.main import get_command

from slmtune.cli import app

COMMANDS = {"ingest", "curate", "cluster", "plan", "train", "merge", "eval", "export", "models", "flywheel", "serve"}


def test_command_table():
    assert set(get_command(app).commands) == COMMANDS


def test_help_does_not_import_the_training_stack():
    code = ("import sys; from typer.testing import CliRunner; from slmtune.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = {'torch', 'transformers', 'peft', 'trl'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
