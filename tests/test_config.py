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
            if isinstance(value, dict) and section != "weights":  # a sub-table such as [heads.softmax]
                for table_key, table_value in value.items():
                    assert saved[section][key][table_key] == table_value, f"{name}: [{section}.{key}] {table_key}"
            else:
                assert saved[section][key] == value, f"{name}: [{section}] {key}"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"features": {"batchsize": 4}}, "unknown key [features] batchsize; known keys: backbones"),
        ({"featurez": {}}, "unknown section [featurez]"),
        ({"features": {"batch_size": 0}}, "[features] batch_size = 0 is too small; it must be >= 1"),
        ({"finetune": {"epochs": -1}}, "[finetune] epochs = -1 is too small"),
        ({"finetune": {"optimizer": "adam"}}, "choose one of: sgd, adamw"),
        ({"runtime": {"precision": "int8"}}, "choose one of: auto, bf16, fp16, fp32"),
        ({"heads": {"kinds": ["svm"]}}, "'svm' is not valid; choose one of: softmax, logistic, knn"),
        ({"heads": {"fit_on": "all"}}, "choose one of: train, train+val"),
        ({"features": {"batch_size": "big"}}, "[features] batch_size must be an integer"),
        ({"features": {"batch_size": True}}, "[features] batch_size must be an integer"),
        ({"runtime": {"channels_last": 1}}, "must be true or false"),
        ({"features": {"backbones": "resnet18"}}, "[features] backbones must be a list"),
        ({"features": {"backbones": ["resnet18", "resnet18"]}}, "lists a name twice"),
        ({"data": {"expected_split_sizes": [1, 2]}}, "three positive integers"),
        ({"heads": {"logistic": {"cs": [0.0]}}}, "[heads.logistic] cs values must be > 0"),
        ({"heads": {"softmax": {"weight_decays": []}}}, "[heads.softmax] weight_decays must list at least one value"),
        ({"heads": {"softmax": {"weight_decays": [0.0, 100.0]}}}, "[heads.softmax] lr x weight decay must be below 1"),
        ({"heads": {"knn": {"temperatures": [0.07, 0.0]}}}, "[heads.knn] temperatures values must be > 0"),
        ({"heads": {"knn": {"ks": [0]}}}, "[heads.knn] ks = 0 is too small; it must be >= 1"),
        ({"heads": {"knn": {"k": 5}}}, "unknown key [heads.knn] k; known keys: ks, temperatures"),
        ({"heads": {"svm": {}}}, "unknown key [heads] svm; known keys: kinds, fit_on"),
        ({"heads": {"softmax": 3}}, "[heads.softmax] must be a table of settings"),
        ({"weights": {"resnet18": 3}}, "[weights] resnet18 must be a file path string"),
    ],
)
def test_bad_values_give_one_line_errors(raw, fragment):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_overrides_and_shortcuts_apply(tmp_path):
    config = load_config(
        PROJECT / "configs" / "default.toml",
        ["finetune.epochs=3", "heads.fit_on=train+val", 'features.backbones=["resnet18"]', "report.title=plain words"],
        data_dir=str(tmp_path),
        device="cpu",
    )
    assert config.finetune.epochs == 3
    assert config.heads.fit_on == "train+val"
    assert config.features.backbones == ["resnet18"]
    assert config.report.title == "plain words"
    assert config.data.root == str(tmp_path)
    assert config.data.download is False  # a folder the user brings is never downloaded into
    assert config.runtime.device == "cpu"


@pytest.mark.parametrize(
    "key, new",
    [
        ("softmax_lr", "[heads.softmax] lr"),
        ("logistic_cs", "[heads.logistic] cs"),
        ("softmax_epochs", "[heads.softmax] epochs"),
    ],
)
def test_flat_head_keys_name_their_new_table(key, new):
    """The keys that moved into [heads.<kind>] tables are refused, in files and overrides, with where they went."""
    table, moved = new[1:].split("] ")
    expected = f"[heads] {key} is now {new} (override: {table}.{moved}=...)"
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"heads": {key: 1}})
    assert str(caught.value) == expected
    with pytest.raises(ConfigError) as caught:
        load_config(PROJECT / "configs" / "tiny.toml", [f"heads.{key}=1"])
    assert str(caught.value) == expected


def test_head_tables_override_one_key_and_keep_the_rest():
    config = load_config(PROJECT / "configs" / "tiny.toml", ["heads.softmax.lr=0.5", "heads.knn.ks=[3]"])
    softmax = config.heads.table("softmax")
    assert softmax.lr == 0.5 and softmax.epochs == 30  # the file's other [heads.softmax] keys stay
    assert config.heads.table("knn").ks == [3]
    assert config.section("heads")["softmax"]["lr"] == 0.5  # saved as the TOML file writes it
    with pytest.raises(ConfigError, match="is not a table"):
        load_config(PROJECT / "configs" / "default.toml", ["heads.fit_on.x=1"])


def test_floats_accept_integers_and_lists_are_copied():
    config = config_from_dict({"heads": {"softmax": {"lr": 1, "weight_decays": [0, 0.5]}, "logistic": {"cs": [1, 2]}}})
    assert config.heads.table("softmax").lr == 1.0 and isinstance(config.heads.table("softmax").lr, float)
    assert config.heads.table("softmax").weight_decays == [0.0, 0.5]
    assert config.heads.table("logistic").cs == [1.0, 2.0]
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


SETTINGS_START = "<!-- settings table: generated by `python -m stages.config --docs` -->"
SETTINGS_END = "<!-- end settings table -->"


def test_configuration_doc_is_the_generated_table(capsys):
    from pipeline.cli import print_settings

    assert print_settings(["--docs"]) == 0
    generated = capsys.readouterr().out.strip()
    text = (PROJECT / "docs" / "configuration.md").read_text()
    assert text.count(SETTINGS_START) == 1 and text.count(SETTINGS_END) == 1, "settings table markers are missing"
    table = text.split(SETTINGS_START)[1].split(SETTINGS_END)[0].strip()
    missing = [
        f"[{section}] {key}" for section, key, _, _ in describe_settings() if f"| `{section}` | `{key}` |" not in table
    ]
    fix = "replace the table between its markers with the output of python -m stages.config --docs"
    assert not missing, f"docs/configuration.md lacks {missing}; {fix}"
    assert table == generated, f"docs/configuration.md's settings table is stale; {fix}"
