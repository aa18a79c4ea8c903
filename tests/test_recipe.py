"""Recipes: every shipped YAML loads; bad recipes fail with one line naming the key (and line), no traceback."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmtune.cli import app
from slmtune.errors import SlmtuneError
from slmtune.recipe import Recipe, load_recipe, resolve_auto

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


MINIMAL = "name: t\nmodel: {base: some/model}\ndata: {train: train.jsonl}\noutput: {dir: out}\n"


@pytest.mark.parametrize("extra, records, params, expected", [
    ("", 95, 135_000_000, ("full", 2.0, 1.0e-4)),  # a small model, a few hundred records
    ("", 5000, 135_000_000, ("full", 1.0, 1.0e-4)),  # many records: one pass
    ("", 95, 1_500_000_000, ("lora", 2.0, 2.0e-4)),  # 0.5 B and up: LoRA
    ("model: {base: some/model, quantization: 4bit}\n", 95, 135_000_000, ("lora", 2.0, 2.0e-4)),  # QLoRA
    ("lora: {r: 8}\n", 95, 135_000_000, ("lora", 2.0, 2.0e-4)),  # a lora: section asks for LoRA
    ("method: full\ntrain: {epochs: 3, lr: 5.0e-5}\n", 95, 1_500_000_000, ("full", 3.0, 5.0e-5)),  # kept
])
def test_auto_method_epochs_and_lr_resolve_from_model_and_data_size(tmp_path, extra, records, params, expected):
    text = MINIMAL.replace("model: {base: some/model}\n", "") if extra.startswith("model") else MINIMAL
    r = load_recipe(_write(tmp_path, text + extra))
    if not extra:
        assert (r.method, r.train.epochs, r.train.lr) == ("auto", "auto", "auto")
    got = resolve_auto(r, records, params)
    assert (got.method, got.train.epochs, got.train.lr) == expected


@pytest.mark.parametrize("extra, longest, cap, expected", [
    ("", 300, 2048, 320),  # up to a multiple of 64
    ("", 40, 2048, 128),  # at least 128
    ("", 2040, 2000, 2000),  # at most the cap
    ("data: {train: train.jsonl, max_length: 512}\n", 300, 2048, 512),  # a number is kept
    ("", None, None, "auto"),  # not measured: left for the trainer
])
def test_auto_max_length_resolves_from_the_longest_record(tmp_path, extra, longest, cap, expected):
    text = MINIMAL.replace("data: {train: train.jsonl}\n", "") if extra else MINIMAL
    r = resolve_auto(load_recipe(_write(tmp_path, text + extra)), 95, 135_000_000, longest, cap)
    assert r.data.max_length == expected


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


@pytest.mark.parametrize("replace, expected", [
    (("max_length: 64", "max_lenght: 64"), "r.yaml:5: `data.max_lenght`: unknown key; did you mean `max_length`?"),
    (("name: t\n", "nmae: t\n"), "`nmae`: unknown key; did you mean `name`?"),
    (("output: {dir: out}", "output: {dir: out, zzz: 1}"), "`output.zzz`: unknown key; valid keys: dir"),
], ids=["section-key", "top-level-key", "no-close-match"])
def test_unknown_key_suggests_the_closest_valid_one(tmp_path, replace, expected):
    with pytest.raises(SlmtuneError) as e:
        load_recipe(_write(tmp_path, GOOD.replace(*replace)))
    assert expected in str(e.value), str(e.value)


def test_unknown_key_suggestion_knows_aliases(tmp_path):
    with pytest.raises(SlmtuneError, match=r"`task.shema`: unknown key; did you mean `schema`\?"):
        load_recipe(_write(tmp_path, GOOD + "task: {name: t, shema: {}}\n"))


def test_all_problems_reported_at_once(tmp_path):
    bad = GOOD.replace("max_length: 64", "max_length: -1").replace("lr: 1.0e-3", "lr: 0\n  sead: 1")
    with pytest.raises(SlmtuneError) as e:
        load_recipe(_write(tmp_path, bad))
    msg = str(e.value)
    assert "data.max_length" in msg and "train.lr" in msg and "train.sead" in msg


def test_bad_override_names_the_flag(tmp_path):
    with pytest.raises(SlmtuneError, match="key.path=value"):
        load_recipe(_write(tmp_path, GOOD), ["train.lr"])


def test_new_sections_default_and_round_trip(tmp_path):
    """`logging:`, `trainer:`, `lora.use_dora/use_rslora`, `data.train_on`: defaults, and the resolved dump reloads."""
    from slmtune.recipe import dump_recipe_yaml

    r = load_recipe(_write(tmp_path, GOOD))
    assert r.logging.report_to is None and r.logging.run_name is None and r.trainer.model_extra == {}
    assert (r.lora.use_dora, r.lora.use_rslora, r.data.train_on) == (False, False, "last")
    extra = ("trainer: {optim: adamw_torch, weight_decay: 0.1, attn_implementation: sdpa}\n"
             "logging: {report_to: none, project: p}\nlora: {use_dora: true}\n")
    r = load_recipe(_write(tmp_path, GOOD + extra), ["data.train_on=all_assistant"])
    assert r.logging.report_to == [] and r.trainer.model_extra == {"optim": "adamw_torch", "weight_decay": 0.1}
    assert r.trainer.attn_implementation == "sdpa" and r.lora.use_dora and r.data.train_on == "all_assistant"
    (tmp_path / "resolved.yaml").write_text(dump_recipe_yaml(r))
    assert load_recipe(tmp_path / "resolved.yaml") == r
    assert load_recipe(_write(tmp_path, GOOD + "logging: {report_to: wandb}\n")).logging.report_to == ["wandb"]


def test_trainer_keys_slmtune_sets_point_to_their_recipe_key(tmp_path):
    text = GOOD + "trainer:\n  weight_decay: 0.1\n  learning_rate: 0.1\n  per_device_train_batch_size: 2\n"
    text += "  use_cpu: true\n"
    with pytest.raises(SlmtuneError) as e:
        load_recipe(_write(tmp_path, text))
    msg = str(e.value)
    assert "r.yaml:11: `trainer.learning_rate`: Value error, slmtune sets it from `train.lr`" in msg, msg
    assert "r.yaml:12: `trainer.per_device_train_batch_size`" in msg and "`train.batch_size`" in msg
    assert "`trainer.use_cpu`" in msg and "weight_decay" not in msg
    with pytest.raises(SlmtuneError, match="data.train_on"):
        load_recipe(_write(tmp_path, GOOD), ["data.train_on=everything"])
