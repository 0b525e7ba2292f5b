"""Recipes and overrides are plain YAML (launcher/config_yaml.py) and overrides merge into sections (issue 27):
every row is one ``moetron: config error:`` line, exit code 2, no traceback."""
from __future__ import annotations

import pytest

from launcher import config_yaml
from launcher.config import load_config
from tests.launcher.test_bad_inputs import run_pretrain  # noqa: F401 (fixture)

_BOMB_LEVELS = ["&a [1,1,1,1,1,1,1,1,1,1]"] + [f"&{c} [" + ",".join([f"*{p}"] * 10) + "]"
                                               for p, c in zip("abcde", "bcdef")]
BOMB = "[" + ", ".join(_BOMB_LEVELS) + "]"
"""10^6 values from 60 written ones."""


@pytest.mark.parametrize("override, message", [
    ("logging.run_dir=!!python/object/apply:os.getcwd []", "the tag 'tag:yaml.org,2002:python/object/apply:"
                                                           "os.getcwd' is not allowed (plain YAML only: no tags)"),
    ("logging.run_dir=!!binary aGVsbG8=", "the tag 'tag:yaml.org,2002:binary' is not allowed"),
    ("logging.run_dir=!custom x", "the tag '!custom' is not allowed"),
    (f"logging.run_dir={BOMB}", "aliases expand to more than 100,000 values (an alias bomb?)"),
    ("model={[1]: 2}", "override 'model': a key must be a plain value (a string or number), not a list"),
    ("model={{a: 1}: 2}", "not a mapping"),
    ("logging.tensorboard=yes", "logging.tensorboard: expected true/false, got 'yes'"),
    ("logging.tensorboard=off", "logging.tensorboard: expected true/false, got 'off'"),
    ("train.steps=1e30", "train.steps: expected an integer, got '1e30'"),
    ("train.steps=1.0e+30", "train.steps: expected an integer, got 1e+30"),
    ("train.steps=5.0", "train.steps: expected an integer, got 5.0"),
    ("train.steps=1_000", "train.steps: expected an integer, got '1_000'"),
    ("train.steps=1:30", "train.steps: expected an integer, got '1:30'"),
    ("train.steps=" + "9" * 5000, "train.steps: expected an integer, got '99999"),
    ("model={vocab_size: 64, new_key: 1}", "unknown key 'model.new_key'"),
    ("model..hidden_size=64", "is not a key path"),
], ids=["python tag", "binary tag", "local tag", "alias bomb", "list key", "mapping key", "yes", "off", "1e30",
        "1.0e+30", "5.0", "1_000", "base 60", "5000 digits", "injected key", "empty key part"])
def test_bad_override_is_one_line(run_pretrain, override, message):  # noqa: F811
    line = run_pretrain(override)
    assert line.startswith("moetron: config error: ") and message in line, line
    assert len(line) < 1000, line  # quotes what was given, never a whole huge value (the 5000-digit row)


@pytest.mark.parametrize("content, message", [
    ("logging:\n  run_dir: !!python/object/apply:os.getcwd []\n", "the tag 'tag:yaml.org,2002:python/object/apply:"),
    ("logging:\n  run_dir: !!set {a, b}\n", "the tag 'tag:yaml.org,2002:set' is not allowed"),
    ("logging:\n  run_dir: !!str on\n", "the tag 'tag:yaml.org,2002:str' is not allowed"),
    ("? [1, 2]\n: 3\n", "a key must be a plain value (a string or number), not a list at line 1"),
    ("model:\n  ? {a: 1}\n  : 2\n", "not a mapping at line 2"),
    ("logging:\n  run_dir: " + BOMB + "\n", "aliases expand to more than 100,000 values (an alias bomb?)"),
    ("moe:\n  expert_bias: yes\n", "moe.expert_bias: expected true/false, got 'yes'"),
    ("moe:\n  expert_bias: On\n", "moe.expert_bias: expected true/false, got 'On'"),
    ("train:\n  seed: 1e30\n", "train.seed: expected an integer, got '1e30'"),
    ("train:\n  seed: 2.0\n", "train.seed: expected an integer, got 2.0"),
    ("train:\n  seed: " + "9" * 5000 + "\n", "an integer of 5,000 digits is too long"),
], ids=["python tag", "set tag", "str tag", "list key", "mapping key", "alias bomb", "yes", "On", "1e30", "2.0",
        "5000 digits"])
def test_bad_recipe_yaml_is_one_line(run_pretrain, tmp_path, content, message):  # noqa: F811
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    line = run_pretrain(recipe_path=recipe)
    assert line.startswith("moetron: config error: ") and message in line, line
    assert len(line) < 400, line


def test_a_section_override_merges_into_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  vocab_size: 1024\n  hidden_size: 128\n  rope_scaling: {type: yarn, factor: 4}\n")
    cfg = load_config(recipe, ["model={hidden_size: 64, rope_scaling: {factor: 2}}"])
    assert (cfg.model.vocab_size, cfg.model.hidden_size) == (1024, 64)  # the recipe's vocab_size stays
    assert (cfg.model.rope_scaling.type, cfg.model.rope_scaling.factor) == ("yarn", 2.0)
    assert load_config(recipe, ["model.dense_layers=[0]", "model.dense_layers=[1]"]).model.dense_layers == [1]


def test_yaml_1_2_scalars():
    """YAML 1.2 core booleans and integers; anchors that stay small are fine."""
    assert [config_yaml.load(t) for t in ("on", "yes", "No", "True", "FALSE", "010", "0o17", "0x1f", "+5", "-3")] \
        == ["on", "yes", "No", True, False, 10, 15, 31, 5, -3]
    assert config_yaml.load("2024-01-01") == "2024-01-01"  # no dates
    assert config_yaml.load("a: &x {k: 1}\nb: *x\n") == {"a": {"k": 1}, "b": {"k": 1}}
    assert load_config(None, ["logging.run_dir=on"]).logging.run_dir == "on"
