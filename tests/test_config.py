"""The experiment config: the shipped quickstart, unknown keys, --set overrides, rules, round trip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mgral.config import ExperimentConfig, config_from_dict, config_to_dict, dump_config, load_config
from mgral.errors import ConfigError

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

MINIMAL = {
    "name": "t",
    "dataset": {"path": "data/coco"},
    "detector": {"preset": "tiny"},
    "strategies": [{"name": "random"}],
    "initial": {"size": 10},
    "budget": 5,
    "cycles": 2,
    "seeds": [0],
}


def _write(tmp_path, data, name="exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_quickstart_loads():
    config = load_config(QUICKSTART)
    assert config.dataset.path == str(QUICKSTART.parents[1] / "runs" / "digits")
    assert config.dataset.synth_config().images == 600
    assert config.detector.preset == "tiny" and config.detector.train == {"iterations": 120, "warmup_iters": 12}
    assert config.detector.warm_start is True
    assert [s.label for s in config.strategies] == ["random", "entropy", "core_set", "cald", "ppal", "cdal", "mgral"]
    assert config.strategies[1].params == {"aggregation": "max"}
    assert (config.initial.size, config.budget, config.cycles, config.seeds) == (40, 40, 4, [0, 1])
    assert config.executor == "inline"


def test_relative_paths_follow_the_file_and_set_values_follow_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = _write(tmp_path / "conf", {**MINIMAL, "initial": {"ids_file": "../ids.txt"}})
    monkeypatch.chdir(tmp_path)
    config = load_config(path, ["detector.weights=w.pt"])
    assert config.dataset.path == str(tmp_path / "conf" / "data" / "coco")
    assert config.initial.ids_file == str(tmp_path / "ids.txt")
    assert config.detector.weights == str(tmp_path / "w.pt")


@pytest.mark.parametrize(
    ("where", "section", "valid"),
    [
        ((), "the top level", "name, dataset, detector, strategies, initial, budget, budget_boxes, cycles, seeds"),
        (("dataset",), "dataset", "path, format, image_root, pool_splits, test_split, clip_boxes, synth"),
        (("detector",), "detector", "preset, weights, params, train, device"),
        (("strategies", 0), "strategies[0]", "name, params, label"),
        (("initial",), "initial", "size, fraction, ids_file"),
        (("oracle",), "oracle", "kind, box_cost, label_noise, drop_boxes"),
    ],
)
def test_unknown_keys_are_refused_with_the_valid_keys(tmp_path, where, section, valid):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL)) | {"oracle": {}}
    node = data
    for part in where:
        node = node[part]
    node["foo"] = 1
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: unknown key 'foo' in {section}; valid keys: {valid}")


def test_unknown_synth_key_lists_the_synth_parameters(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "dataset": {"path": "d", "synth": {"imgs": 5}}})
    with pytest.raises(ConfigError, match=r"dataset.synth: unknown key 'imgs'; valid keys: images, image_size"):
        load_config(path)


def test_type_and_missing_errors_say_where(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "budget"} | {"cycles": "four"}
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, data))
    lines = str(info.value).splitlines()
    assert any(line.endswith("cycles: Input should be a valid integer, got 'four'") for line in lines)
    assert any(line.endswith("missing key 'budget' in the top level (it is required)") for line in lines)


def test_set_overrides(tmp_path):
    path = _write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "cycles=7",
            "seeds=[0, 1, 2]",
            "detector.train.epochs=3",
            "strategies=[{name: random}, {name: entropy, params: {aggregation: sum}, label: entropy-sum}]",
            "strategies.1.params.aggregation=mean",
            "dataset.synth.images=50",
            "name=my run",
        ],
    )
    assert config.cycles == 7 and config.seeds == [0, 1, 2] and config.name == "my run"
    assert config.detector.train == {"epochs": 3}
    assert [s.label for s in config.strategies] == ["random", "entropy-sum"]
    assert config.strategies[1].params == {"aggregation": "mean"}
    assert config.dataset.synth == {"images": 50}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("detector.epochs=3", "unknown key 'epochs' in detector; valid keys: preset, weights, params, train, device"),
        ("cycle=3", "unknown key 'cycle' in the top level; valid keys: name, dataset"),
        ("cycles.x=3", "cycles is a value, not a section"),
        ("strategies.name=x", "strategies is a list; index it"),
        ("strategies.4.name=x", r"strategies has 1 entries; index 4 is out of range"),
        ("strategies.0.weight=1", r"unknown key 'weight' in strategies\[0\]; valid keys: name, params, label"),
        ("cycles", "expected KEY=VALUE"),
        ("seeds=[0", "cannot parse the value as YAML"),
    ],
)
def test_bad_overrides_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize(
    ("initial", "message"),
    [
        ({}, r"initial: set exactly one of size, fraction, ids_file \(got none\)"),
        ({"size": 5, "fraction": 0.1}, r"\(got size and fraction\)"),
        ({"fraction": 1.0}, r"initial.fraction: Input should be less than 1"),
        ({"size": 0}, r"initial.size: Input should be greater than or equal to 1"),
    ],
)
def test_initial_needs_exactly_one_valid_choice(initial, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**MINIMAL, "initial": initial})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategies": [{"name": "entropy"}, {"name": "entropy"}]}, "label 'entropy' is used by strategies"),
        ({"strategies": [{"name": "a", "label": "x"}, {"name": "b", "label": "x"}]}, "label 'x' is used by"),
        ({"strategies": [{"name": "a", "label": "../up"}]}, "label '../up' cannot name a directory"),
        ({"strategies": []}, "strategies: List should have at least 1 item"),
        ({"seeds": [0, 0]}, "repeat a seed"),
        ({"ray_address": "auto"}, "ray_address is set but executor is 'inline'"),
        ({"dataset": {"path": "d", "test_split": "train"}}, "test_split 'train' is also a pool split"),
        ({"dataset": {"path": "d", "format": "voc", "synth": {}}}, "synth generates a COCO dataset"),
        ({"dataset": {"path": "d", "synth": {"images": 1}}}, "dataset.synth: images must be >= 3"),
        ({"budget": True}, "budget: Input should be a valid integer, got True"),
    ],
)
def test_cross_field_rules(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**MINIMAL, **change})


def test_a_config_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="exp.yaml: the top level: Input should be a valid dictionary"):
        config_from_dict([1], source="exp.yaml")  # type: ignore[arg-type]


def test_entropy_twice_with_distinct_labels_is_fine():
    strategies = [{"name": "entropy", "label": "entropy-max"}, {"name": "entropy", "label": "entropy-sum"}]
    assert len(config_from_dict({**MINIMAL, "strategies": strategies}).strategies) == 2


def test_resolved_config_round_trips_through_dump_and_load(tmp_path):
    config = load_config(QUICKSTART, ["seeds=[3]"])
    resolved = config_to_dict(config)
    dump_config(config, tmp_path / "sub" / "config.yaml")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    os.replace(tmp_path / "sub" / "config.yaml", other_dir / "config.yaml")  # absolute paths: location-free
    again = load_config(other_dir / "config.yaml")
    assert config_to_dict(again) == resolved
    assert again == config
    assert isinstance(again, ExperimentConfig)


def test_reference_label_is_reserved():
    import pytest

    from mgral.config import StrategySpec

    with pytest.raises(ValueError, match="reserved for the full-data reference"):
        StrategySpec(name="random", label="reference")


def test_gpus_are_for_ray_series_and_not_part_of_what_a_run_computes(tmp_path):
    from mgral.config import EXECUTION_KEYS, config_from_dict

    base = {
        "name": "x",
        "dataset": {"path": str(tmp_path)},
        "detector": {"preset": "tiny"},
        "strategies": [{"name": "random"}],
        "initial": {"size": 2},
        "budget": 1,
        "cycles": 1,
        "seeds": [0],
    }
    assert config_from_dict({**base, "executor": "ray", "gpus": 1}).gpus == 1
    with pytest.raises(ConfigError, match="gpus is set but executor is 'process'; only Ray places series on GPUs"):
        config_from_dict({**base, "executor": "process", "gpus": 1})
    assert "gpus" in EXECUTION_KEYS
