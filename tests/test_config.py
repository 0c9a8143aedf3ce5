"""The experiment config: the shipped quickstart, unknown keys, --set overrides, rules, round trip."""

from __future__ import annotations

import os
import re
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


def test_quickstart_and_the_full_comparison_load():
    config = load_config(QUICKSTART)
    assert config.dataset.path == str(QUICKSTART.parents[1] / "runs" / "digits")
    assert config.dataset.synth_config().images == 600
    assert config.detector.preset == "tiny" and config.detector.train == {"iterations": 90, "warmup_iters": 9}
    assert config.detector.warm_start is True
    assert [s.label for s in config.strategies] == ["random", "entropy", "mgral"]
    assert config.strategies[1].params == {"aggregation": "max"}
    assert (config.initial.size, config.budget, config.cycles, config.seeds) == (40, 40, 3, [0])
    assert config.executor == "inline"
    full = load_config(QUICKSTART.with_name("comparison.yaml"))
    assert [s.label for s in full.strategies] == ["random", "entropy", "core_set", "cald", "ppal", "cdal", "mgral"]
    assert (full.cycles, full.seeds, full.dataset.path) == (4, [0, 1], config.dataset.path)
    # the comparison trains longer per cycle than the 10-minute demo; the rest of the detector is the same
    assert full.detector.train == {"iterations": 120, "warmup_iters": 12}
    assert full.detector.model_dump(exclude={"train"}) == config.detector.model_dump(exclude={"train"})


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
        (("dataset",), "dataset", "path, format, image_root, pool_splits, test_split, clip_boxes, follow_links, synth"),
        (("detector",), "detector", "kind, preset, weights, params, train, device"),
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
        (
            "detector.epochs=3",
            "unknown key 'epochs' in detector; valid keys: kind, preset, weights, params, train, device",
        ),
        ("cycle=3", "unknown key 'cycle' in the top level; valid keys: name, dataset"),
        ("cycles.x=3", "cycles is a value, not a section"),
        ("strategies.name=x", "strategies is a list; index it"),
        ("strategies.²=x", "strategies is a list; index it"),  # a unicode digit int() refuses
        ("strategies.4.name=x", r"strategies has 1 entries; index 4 is out of range"),
        ("strategies.0.weight=1", r"unknown key 'weight' in strategies\[0\]; valid keys: name, params, label"),
        ("cycles", "expected KEY=VALUE"),
        ("seeds=[0", r"--set .seeds=\[0.: malformed YAML"),
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


def _small(tmp_path: Path) -> dict:
    """A small valid config (its dataset is never read)."""
    return {
        "name": "x",
        "dataset": {"path": str(tmp_path)},
        "detector": {"preset": "tiny"},
        "strategies": [{"name": "random"}],
        "initial": {"size": 2},
        "budget": 1,
        "cycles": 1,
        "seeds": [0],
    }


def test_gpus_are_for_ray_series_and_not_part_of_what_a_run_computes(tmp_path):
    from mgral.config import EXECUTION_KEYS, config_from_dict

    base = _small(tmp_path)
    assert config_from_dict({**base, "executor": "ray", "gpus": 1}).gpus == 1
    with pytest.raises(ConfigError, match="gpus is set but executor is 'process'; only Ray places series on GPUs"):
        config_from_dict({**base, "executor": "process", "gpus": 1})
    assert "gpus" in EXECUTION_KEYS


def test_jobs_say_where_a_strategys_own_jobs_run_and_are_not_part_of_what_a_run_computes(tmp_path):
    """MGRAL's surrogate fine-tunes are placed by the experiment's ``jobs`` section (not by
    strategy parameters): checked like the series' placement, handed to the strategy as a
    JobPlacement, and free to change on resume."""
    from mgral.config import EXECUTION_KEYS, config_from_dict
    from mgral.executors import JobPlacement

    base = _small(tmp_path)
    assert config_from_dict(base).jobs.placement() == JobPlacement()
    jobs = {"executor": "ray", "ray_address": "auto", "workers": 8, "threads": 2, "device": "cuda:1", "gpus": 0.5}
    assert config_from_dict({**base, "jobs": jobs}).jobs.placement() == JobPlacement(**jobs)
    for bad, message in [
        ({"device": "tpu"}, "jobs: device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"gpus": 1}, "jobs: gpus is set but executor is 'inline'; only Ray places jobs on GPUs"),
        ({"ray_address": "auto", "executor": "process"}, "jobs: ray_address is set but executor is 'process'"),
        ({"executor": "slurm"}, "jobs.executor"),
        ({"job_threads": 2}, "unknown key 'job_threads' in jobs; valid keys: executor, workers"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict({**base, "jobs": bad})
    assert "jobs" in EXECUTION_KEYS
    # a job gets the cores shared among the workers unless threads says otherwise
    assert JobPlacement(threads=3).job_threads(8) == 3 and JobPlacement().job_threads(8) == 8
    assert JobPlacement(executor="process", workers=os.cpu_count()).job_threads(8) == 1


# -- hostile config files (issue 17) -------------------------------------------------------------


def _alias_bomb(key: str) -> str:
    """The "billion laughs": 9 levels of 9 aliases, 9**9 strings once expanded, ~350 bytes."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return "\n".join([*lines, f"{key}: *i"]) + "\n"


def _in_child(code: str, timeout: float = 30):
    """Run ``code`` in a child process under a time and address-space limit (a runaway fails
    the test instead of taking the machine); returns its last line starting with RESULT."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, preexec_fn=limit
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"the child died: rc {proc.returncode}: {proc.stderr[-2000:]}"
    return lines[-1].split(maxsplit=3)[1:], proc.stderr


_TIMED = """
import time, tracemalloc
from mgral.cli import main
import mgral.config, mgral.loop  # imported before the clock starts
tracemalloc.start()
start = time.perf_counter()
{body}
print("RESULT", round(time.perf_counter() - start, 3), tracemalloc.get_traced_memory()[1], repr(result))
"""


def test_alias_bomb_config_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb("name"))
    assert len(path.read_bytes()) < 400
    body = f"result = main(['run', {str(path)!r}, '--out', {str(tmp_path / 'run')!r}])"
    (elapsed, peak, result), err = _in_child(_TIMED.format(body=body))
    assert result == "2" and float(elapsed) < 1.0 and int(peak) < 100 << 20, (result, elapsed, peak)
    assert err.startswith(f"mgral: error: {path}: uses YAML aliases that expand to more than 100,000 values")
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_quoted_input_is_bounded_however_big_it_is(tmp_path):
    # 9**9 strings in 10 shared lists: what a bomb parses to, handed to the validation directly
    body = """
from mgral.config import config_from_dict
from mgral.errors import ConfigError
x = ["x"] * 9
for _ in range(8):
    x = [x] * 9
try:
    config_from_dict({"name": x})
except ConfigError as err:
    result = str(err)
"""
    (elapsed, peak, result), _ = _in_child(_TIMED.format(body=body))
    assert float(elapsed) < 1.0 and int(peak) < 100 << 20, (elapsed, peak)
    line = next(line for line in eval(result).splitlines() if ": name: " in line)
    assert line.startswith("config: name: Input should be a valid string, got [[[[") and len(line) < 200


def test_config_file_that_is_a_fifo_is_refused(tmp_path):
    import signal

    fifo = tmp_path / "exp.yaml"
    os.mkfifo(fifo)

    def expired(signum, frame):
        raise TimeoutError("load_config still blocked on the FIFO after 10 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    try:
        with pytest.raises(ConfigError, match=r"exp\.yaml: not a regular file \(a FIFO\)"):
            load_config(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_recursive_alias_in_a_config_is_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "strategies: &s [{name: random, params: {x: *s}}]\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: a YAML alias refers to itself"):
        load_config(path)


@pytest.mark.parametrize("dataset", ["bccd", "pinochle"])
def test_a_config_recorded_by_an_earlier_version_resolves_to_itself(dataset):
    # run.open compares the resolved config with the recorded one: a key added since (at its
    # default) must not make the published runs, or any user's older run, refuse to resume
    recorded = yaml.safe_load(
        (Path(__file__).parents[1] / "benchmarks" / "results" / "al" / dataset / "records" / "config.yaml").read_text()
    )
    assert config_to_dict(config_from_dict(recorded)) == recorded
