"""Config loading: defaults, shipped files, overrides and one-line errors for bad input."""
import dataclasses
import tomllib
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, config_from_dict, describe_settings, load_config

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(path.name for path in (PROJECT / "configs").glob("*.toml")))
def test_shipped_configs_load_apply_every_value_and_round_trip(name):
    path = PROJECT / "configs" / name
    config = load_config(path)
    assert config.source.endswith(name)
    saved = config.to_dict()
    # What a stage saves beside its outputs holds every section that compares, and reads back as this config.
    assert set(saved) == {field.name for field in dataclasses.fields(Config) if field.compare}
    assert config_from_dict(saved) == config
    for section, values in tomllib.loads(path.read_text()).items():
        for key, value in values.items():
            assert saved[section][key] == value, f"{name}: [{section}] {key}"


@pytest.mark.parametrize("raw, fragment", [
    ({"features": {"batchsize": 4}}, "unknown key [features] batchsize; known keys: backbones"),
    ({"featurez": {}}, "unknown section [featurez]"),
    ({"features": {"batch_size": 0}}, "[features] batch_size = 0 is too small; it must be >= 1"),
    ({"finetune": {"epochs": -1}}, "[finetune] epochs = -1 is too small"),
    ({"finetune": {"optimizer": "adam"}}, "choose one of: sgd, adamw"),
    ({"runtime": {"precision": "int8"}}, "choose one of: auto, bf16, fp16, fp32"),
    ({"heads": {"kinds": ["svm"]}}, "'svm' is not valid; choose one of: softmax, logistic"),
    ({"heads": {"fit_on": "all"}}, "choose one of: train, train+val"),
    ({"features": {"batch_size": "big"}}, "[features] batch_size must be an integer"),
    ({"features": {"batch_size": True}}, "[features] batch_size must be an integer"),
    ({"runtime": {"channels_last": 1}}, "must be true or false"),
    ({"features": {"backbones": "resnet18"}}, "[features] backbones must be a list"),
    ({"features": {"backbones": ["resnet18", "resnet18"]}}, "lists a name twice"),
    ({"data": {"expected_split_sizes": [1, 2]}}, "three positive integers"),
    ({"heads": {"logistic_cs": [0.0]}}, "logistic_cs values must be > 0"),
    ({"weights": {"resnet18": 3}}, "[weights] resnet18 must be a file path string"),
])
def test_bad_values_give_one_line_errors(raw, fragment):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_overrides_and_shortcuts_apply(tmp_path):
    config = load_config(PROJECT / "configs" / "default.toml",
                         ["finetune.epochs=3", "heads.fit_on=train+val", 'features.backbones=["resnet18"]',
                          "report.title=plain words"], data_dir=str(tmp_path), device="cpu")
    assert config.finetune.epochs == 3
    assert config.heads.fit_on == "train+val"
    assert config.features.backbones == ["resnet18"]
    assert config.report.title == "plain words"
    assert config.data.root == str(tmp_path)
    assert config.data.download is False        # a folder the user brings is never downloaded into
    assert config.runtime.device == "cpu"


def test_floats_accept_integers_and_lists_are_copied():
    config = config_from_dict({"heads": {"softmax_lr": 1, "logistic_cs": [1, 2]}})
    assert config.heads.softmax_lr == 1.0 and isinstance(config.heads.softmax_lr, float)
    assert config.heads.logistic_cs == [1.0, 2.0]
    assert Config().features.backbones is not Config().features.backbones


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[features\nbatch_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["epochs=3"])


def test_every_setting_is_documented():
    rows = describe_settings()
    assert len(rows) > 40
    assert all(doc.strip() for _, _, _, doc in rows)


def test_readme_documents_every_setting():
    readme = (PROJECT / "README.md").read_text()
    missing = [f"[{section}] {key}" for section, key, _, _ in describe_settings()
               if f"| `{section}` | `{key}` |" not in readme]
    assert not missing, f"README settings table lacks {missing}; regenerate it with python -m stages.config --docs"
