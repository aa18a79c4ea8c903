"""Recipes: every shipped YAML loads; bad recipes fail with one line naming the key (and line), no traceback."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.errors import SlmtuneError
from slmtune.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GOOD = """\
name: t
model: {base: some/model}
data:
  train: train.jsonl
  max_length: 64
train:
  lr: 1.0e-3
output: {dir: out}
"""


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.train.is_file()
    assert path.read_text().startswith("#"), "recipes open with a header comment"


def test_shipped_recipes_exist():
    assert len(RECIPES) >= 2


def _write(tmp_path, text):
    (tmp_path / "train.jsonl").write_text("{}\n")
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_relative_data_resolves_against_recipe_folder(tmp_path, monkeypatch):
    p = _write(tmp_path, GOOD)
    monkeypatch.chdir(ROOT)
    r = load_recipe(p)
    assert r.data.train == (tmp_path / "train.jsonl").resolve()
    assert r.output.dir == (ROOT / "out").resolve()


def test_overrides_are_parsed_as_yaml(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD), ["train.lr=5e-4", "data.packing=false", "lora.target_modules=[q_proj]"])
    assert r.train.lr == 5e-4 and r.data.packing is False and r.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("  lr: 1.0e-3", "  lr: 1.0e-3\n  lerning_rate: 1"),
         ["r.yaml:8", "train.lerning_rate", "unknown key"]),
        (GOOD.replace("max_length: 64", "max_length: lots"), ["r.yaml:5", "data.max_length", "'lots'"]),
        (GOOD.replace("train.jsonl", "missing.jsonl"), ["data.train", "missing.jsonl", "not found"]),
        (GOOD.replace("name: t\n", ""), ["`name`", "Field required"]),
    ],
    ids=["misspelled-key", "wrong-type", "missing-data-file", "missing-key"],
)
def test_bad_recipe_cli_one_line_error(tmp_path, text, expected):
    p = _write(tmp_path, text)
    result = CliRunner().invoke(app, ["train", str(p), "--dry-run"])
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert "Traceback" not in result.output + err
    assert len(err.splitlines()) == 1, err
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_all_problems_reported_at_once(tmp_path):
    bad = GOOD.replace("max_length: 64", "max_length: -1").replace("lr: 1.0e-3", "lr: 0\n  sead: 1")
    with pytest.raises(SlmtuneError) as e:
        load_recipe(_write(tmp_path, bad))
    msg = str(e.value)
    assert "data.max_length" in msg and "train.lr" in msg and "train.sead" in msg


def test_bad_override_names_the_flag(tmp_path):
    with pytest.raises(SlmtuneError, match="key.path=value"):
        load_recipe(_write(tmp_path, GOOD), ["train.lr"])
