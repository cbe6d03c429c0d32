"""The config tree: the original recipe as defaults, presets, `--set` casting and its errors, validation, JSON."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.errors import UserError
from configs.loading import (PRESET_DIR, config_from_dict, config_to_json, load_config, parse_overrides,
                             preset_names)
from configs.schema import DuetConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_original_recipe():
    cfg = DuetConfig()
    t, m = cfg.train, cfg.model
    assert (t.learning_rate, t.warmup_epochs, t.epochs, t.batch_size, t.num_workers) == (2e-4, 2, 15, 64, 8)
    assert (t.contrastive_weight, t.recon_weight, t.diffusion_weight) == (1.0, 0.5, 0.1)
    assert t.diffusion_timesteps == 1000
    assert (m.embed_dim, m.freeze_bert) == (512, False)
    # Loading with no preset and no overrides gives exactly the defaults.
    assert load_config(None, None) == cfg


def preset_values(name: str) -> dict[str, object]:
    tree = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {}
    return {f"{section}.{key}": value for section, values in tree.items() for key, value in values.items()}


def test_presets_load_their_values():
    assert {"coco", "embedded", "tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = dataclasses.asdict(load_config(name))
        for key, value in preset_values(name).items():
            section, field = key.split(".")
            assert cfg[section][field] == value, f"{name}.yaml: {key} did not load"


def test_presets_list_only_what_they_change():
    defaults = dataclasses.asdict(DuetConfig())
    unchanged = [f"{name}.yaml {key}={value!r}" for name in preset_names()
                 for key, value in preset_values(name).items()
                 if defaults[key.split(".")[0]][key.split(".")[1]] == value]
    assert not unchanged, f"presets repeat default values: {unchanged}"


def test_set_overrides_are_cast_to_the_field_type():
    cfg = load_config("tiny", ["train.epochs=3", "train.learning_rate=1e-3", "model.freeze_bert=true",
                               "train.compile=0", "model.encoder_widths=[4, 8,12]", "train.max_steps=2.0",
                               "train.sample_prompts=a red circle, a blue square", "data.root=/x=y"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.learning_rate == 1e-3 and type(cfg.train.learning_rate) is float
    assert cfg.model.freeze_bert is True and cfg.train.compile is False
    assert cfg.model.encoder_widths == [4, 8, 12]
    assert cfg.train.max_steps == 2 and type(cfg.train.max_steps) is int
    assert cfg.train.sample_prompts == ["a red circle", "a blue square"]
    assert cfg.data.root == "/x=y"  # only the first '=' splits key and value
    # the preset's other values survive the overrides
    assert cfg.model.embed_dim == load_config("tiny").model.embed_dim


@pytest.mark.parametrize("pair, words", [
    ("train.epochs=2.5", ["train.epochs", "int"]),
    ("train.learning_rate=fast", ["train.learning_rate", "float"]),
    ("model.freeze_bert=maybe", ["model.freeze_bert", "true or false"]),
    ("train.batch_size=true", ["train.batch_size", "int"]),
    ("model.encoder_widths=[4,x]", ["model.encoder_widths"]),
    ("train.epochs", ["section.key=value"]),
])
def test_bad_override_value_is_one_line_user_error(pair, words):
    with pytest.raises(UserError) as err:
        load_config("tiny", [pair])
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_yaml_bool_is_not_a_number():
    with pytest.raises(UserError, match="train.batch_size.*number"):
        load_config("tiny", {"train.batch_size": True})


@pytest.mark.parametrize("key, closest", [("train.lerning_rate", "train.learning_rate"),
                                          ("model.embed_dimm", "model.embed_dim"),
                                          ("train.batchsize", "train.batch_size"),
                                          ("modle.embed_dim", "model.embed_dim")])
def test_unknown_key_names_the_closest_key(key, closest):
    with pytest.raises(UserError, match=f"unknown config key '{key}'; did you mean '{closest}'"):
        load_config("tiny", {key: "1"})


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  learnin_rate: 0.1\n")
    with pytest.raises(UserError, match="train.learning_rate"):
        load_config(str(path))
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))


@pytest.mark.parametrize("image_size", [18, 20, 4])
def test_image_size_the_latent_downsample_cannot_take(image_size):
    # tiny: latent_downsample 4, so the size must be a multiple of 8 (an even latent side).
    with pytest.raises(UserError, match="model.image_size"):
        load_config("tiny", {"model.image_size": image_size})


def test_sizes_that_fit_load():
    assert load_config("tiny", {"model.image_size": 24}).model.image_size == 24
    assert load_config("tiny", {"model.image_size": 32, "model.latent_downsample": 8}).model.latent_downsample == 8
    with pytest.raises(UserError, match="power of two"):
        load_config("tiny", {"model.latent_downsample": 6})


def test_config_json_round_trip():
    cfg = load_config("tiny", ["model.freeze_bert=true", "model.encoder_widths=[4,8]", "train.learning_rate=3e-5",
                               "train.sample_prompts=a,b", "data.root=/somewhere"])
    text = config_to_json(cfg)
    again = config_from_dict(json.loads(text))
    assert again == cfg and config_to_json(again) == text
    tree = json.loads(text)
    tree["model"]["embed_dimm"] = 3
    with pytest.raises(UserError, match="model.embed_dimm"):
        config_from_dict(tree)


def test_parse_overrides_keeps_order_and_last_wins():
    assert parse_overrides(["a.b=1", "a.b=2"]) == {"a.b": "2"}
    assert parse_overrides(None) == {}


@pytest.mark.slow
def test_cli_unknown_key_is_one_line_and_exit_2():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", "--set", "train.lerning_rate=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "train.lerning_rate" in lines[0] and "train.learning_rate" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
