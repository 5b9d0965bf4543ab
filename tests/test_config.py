"""Recipes and overrides: typed by the schema; bad input is one line on stderr and exit code 2."""

import pytest
from click.testing import CliRunner

from lowmem.cli import main
from lowmem.config import load_config
from lowmem.errors import ConfigError

RECIPE = """
model: {path: lowmem:micro-llama}
data: {path: lowmem:pydoc}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_overrides_are_typed_by_the_schema(recipe):
    cfg = load_config(recipe, ["update.lr=1e-5", "update.clip_grad_norm=null", "train.batch_size=8",
                               "data.packing=true", "train.max_steps=3.0", "update.rule=sgd"])
    assert cfg.update.lr == 1e-5 and isinstance(cfg.update.lr, float)
    assert cfg.update.clip_grad_norm is None
    assert cfg.train.batch_size == 8 and cfg.train.max_steps == 3
    assert cfg.data.packing is True and cfg.update.rule == "sgd"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "update: {lr: 1e-5}\n")  # PyYAML reads this as the string '1e-5'
    assert load_config(path).update.lr == 1e-5


@pytest.mark.parametrize("override,message", [
    ("update.lrr=1", "unknown key 'update.lrr' (did you mean 'update.lr'?)"),
    ("resume=never", "unknown key 'resume' (did you mean 'checkpoint.resume'?)"),
    ("update.rule=adamww", "update.rule 'adamww' is not known (did you mean 'adamw'?)"),
    ("train.batch_size=abc", "train.batch_size must be an integer, got 'abc'"),
    ("model.dtype=fp16", "model.dtype 'fp16' is not one of float32, bfloat16, float16"),
    ("update.lr=-1", "update.lr must be positive"),
    ("data.val_fraction=2", "data.val_fraction must be between"),
    ("train.lr_schedule=cosin", "(did you mean 'cosine'?)"),
    ("nonsense", "must look like section.key=value"),
    ("checkpoint.resume=/no/such/dir", "checkpoint.resume '/no/such/dir' is not auto, never"),
    ("tokens.keep_ratio=0", "tokens.keep_ratio must be in (0, 1]"),
    ("tokens.refresh_every=0", "tokens.refresh_every must be >= 1"),
    ("tokens.predictor=true", "tokens.predictor predicts which blocks to keep, but tokens.eliminate is false"),
])
def test_bad_values_exit_2_with_one_line(recipe, override, message):
    result = CliRunner().invoke(main, ["train", str(recipe), override])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_missing_recipe_and_invalid_yaml(tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "neither a file nor a shipped recipe" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_required_fields(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {path: x}\n")
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(path)


def test_shipped_recipes_all_load():
    from lowmem.cli import shipped_recipes

    recipes = shipped_recipes()
    assert "tiny-llama-pydoc" in recipes
    for path in recipes.values():
        load_config(path)
