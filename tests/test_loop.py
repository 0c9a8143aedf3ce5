"""The AL loop end to end on CPU: records, ledger, crash safety (real SIGKILL), the lock."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mgral.config import config_from_dict, config_to_dict
from mgral.errors import RunError
from mgral.loop import run_experiment
from mgral.pool import Ledger
from mgral.runs import RunDir, RunLock, read_cycle_records

MICRO = {
    "name": "micro",
    "dataset": {"path": "digits", "synth": {"images": 60, "seed": 0, "image_size": 96, "max_digit_size": 32}},
    "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"epochs": 2, "batch_size": 4}},
    "strategies": [{"name": "random"}, {"name": "entropy"}, {"name": "core_set"}],
    "initial": {"size": 8},
    "budget": 6,
    "cycles": 2,
    "seeds": [0],
}


def _config(tmp: Path, **changes) -> dict:
    cfg = json.loads(json.dumps(MICRO))
    cfg["dataset"]["path"] = str(tmp.parent / "digits")  # one dataset shared by the runs of a test
    cfg.update(changes)
    return cfg


def _series(run: Path) -> dict:
    """Every series' records (cycle, labeled, selected, mAP) and ledger, by ``label/seed-N``."""
    out = {}
    for records in sorted(run.glob("*/seed-*/cycles.jsonl")):
        out[f"{records.parent.parent.name}/{records.parent.name}"] = {
            "records": [
                {k: r[k] for k in ("cycle", "num_labeled", "selected", "mAP")} for r in read_cycle_records(records)
            ],
            "ledger": Ledger.load(records.parent / "ledger.json").to_dict(),
        }
    return out


def test_two_cycle_run_end_to_end(tmp_path):
    cfg = _config(tmp_path / "run", full_data_reference=True)
    run_experiment(config_from_dict(cfg), tmp_path / "run", log=lambda _: None)
    series = {key.split("/")[0]: s for key, s in _series(tmp_path / "run").items()}  # seed 0 only
    assert set(series) == {"random", "entropy", "core_set", "reference"}
    initial = {label: s["ledger"]["labeled"][:8] for label, s in series.items() if label != "reference"}
    assert len({json.dumps(v) for v in initial.values()}) == 1, "every strategy starts from the same initial set"
    for label in ("random", "entropy", "core_set"):
        records = series[label]["records"]
        assert [r["cycle"] for r in records] == [0, 1, 2]
        assert [r["num_labeled"] for r in records] == [8, 14, 20]
        labeled_before = {i for i, c in series[label]["ledger"]["labeled"] if c == 0}
        chosen = records[0]["selected"] + records[1]["selected"]
        assert len(set(chosen)) == 12 and not set(chosen) & labeled_before
        assert records[2]["selected"] == []
        full = read_cycle_records(tmp_path / "run" / label / "seed-0" / "cycles.jsonl")[1]
        assert {"strategy", "seed", "num_boxes_labeled", "mAP50", "per_class", "seconds"} <= set(full)
        assert set(full["seconds"]) >= {"train", "evaluate", "predict", "select"}
    # strategies that need predictions got them cached, random computed none
    # (cycle 0's model is every strategy's: its predictions are made once, for all of them)
    assert (tmp_path / "run" / "_shared" / "seed-0" / "cycle-0" / "predictions.npz").is_file()
    assert (tmp_path / "run" / "entropy" / "seed-0" / "cycle-1" / "predictions.npz").is_file()
    assert not list((tmp_path / "run" / "random").glob("seed-0/cycle-*/predictions.npz"))
    # only the latest model is kept
    assert sorted(p.parent.name for p in (tmp_path / "run" / "random").glob("seed-0/cycle-*/model.pt")) == ["cycle-2"]
    reference = series["reference"]["records"]
    assert len(reference) == 1 and reference[0]["num_labeled"] == 42


def test_a_second_run_on_a_locked_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunLock(run), pytest.raises(RunError, match="is in use by process"):
        run_experiment(config_from_dict(_config(run)), run, log=lambda _: None)


def _start(cfg_path: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mgral", "--no-progress", "run", str(cfg_path), "--out", str(run), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    cfg_path = tmp / "micro.yaml"
    cfg = _config(tmp / "x", strategies=[{"name": "entropy"}, {"name": "core_set"}], cycles=1)
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = _start(cfg_path, tmp / "run")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    return cfg_path, _series(tmp / "run")


@pytest.mark.slow  # the crash-safety runs (subprocesses, real kills): make test-slow, run by .ci/run
@pytest.mark.parametrize(
    "trigger",
    ["entropy/seed-0/cycle-1/last.pt", "core_set/seed-0/cycle-0/selection.json"],
    ids=["mid-training", "after-selection"],
)
def test_sigkill_mid_cycle_then_resume_selects_exactly_the_same_images(uninterrupted, trigger, tmp_path):
    cfg_path, expected = uninterrupted
    run = tmp_path / "run"
    proc = _start(cfg_path, run)
    deadline = time.monotonic() + 600
    while not (run / trigger).exists():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _series(run)
    assert len(killed.get("core_set/seed-0", {}).get("records", [])) < 2, "the kill came after the run finished"
    resumed = _start(cfg_path, run, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]
    assert _series(run) == expected


@pytest.fixture(scope="module")
def inline_two_seeds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inline")
    # one torch thread, as the parallel workers use: float sums then agree to the last bit
    # one query round (cycles 0 and 1) is enough to compare executors, at a third less cost
    cfg = _config(tmp / "run", seeds=[0, 1], cycles=1, full_data_reference=True, reference_train={"iterations": 3})
    cfg["threads"] = 1
    run_experiment(config_from_dict(cfg), tmp / "run", log=lambda _: None)
    return cfg, _series(tmp / "run")


# The process executor's results are also checked by the failed-series test below, and the Ray
# executor's by test_al_benchmark's driver test (in the default suite).
@pytest.mark.slow
@pytest.mark.parametrize("executor", ["process", "ray"])
def test_parallel_series_give_exactly_the_inline_results(inline_two_seeds, tmp_path, executor):
    cfg, expected = inline_two_seeds
    logs: list[str] = []
    parallel = {**cfg, "executor": executor, "workers": 2, "threads": 1}
    run_experiment(config_from_dict(parallel), tmp_path / "run", log=logs.append)
    assert _series(tmp_path / "run") == expected  # same selections, same mAP, same ledgers
    assert sum("shared cycle 0: done" in line for line in logs) == 2
    assert sum(line.endswith(": done") for line in logs) == 2 + 2 * 4  # 3 strategies + reference, 2 seeds
    # resuming a finished run with another executor is allowed (where it runs is not what it computes)
    run_experiment(config_from_dict({**cfg, "executor": "inline"}), tmp_path / "run", resume=True, log=logs.append)
    assert _series(tmp_path / "run") == expected


def test_references_are_planned_before_the_series_and_finished_tasks_are_not(inline_two_seeds, tmp_path):
    from mgral.loop import open_experiment, plan_tasks

    cfg, _ = inline_two_seeds
    config = config_from_dict({**cfg, "executor": "process"})
    fresh = open_experiment(config, RunDir(tmp_path / "run"), lambda _: None, False)
    first, series = plan_tasks(fresh)
    assert first == [("cycle-0", "", 0), ("cycle-0", "", 1)]
    labels = [s.label for s in config.strategies]
    assert series == [("series", "reference", 0), ("series", "reference", 1)] + [
        ("series", label, seed) for seed in (0, 1) for label in labels
    ]
    finished = Path(cfg["dataset"]["path"]).parent / "run"  # the fixture's run, beside its dataset
    assert plan_tasks(open_experiment(config, RunDir(finished), lambda _: None, False)) == ([], [])


def test_reference_seeds_trains_the_reference_for_the_first_seeds_only(inline_two_seeds, tmp_path):
    from mgral.loop import open_experiment, plan_tasks
    from mgral.planning import estimate_workload
    from mgral.tracking import _planned

    cfg, _ = inline_two_seeds
    one = config_from_dict({**cfg, "executor": "process", "reference_seeds": 1})
    assert one.reference_seed_list == [0] and config_from_dict(cfg).reference_seed_list == [0, 1]
    _, series = plan_tasks(open_experiment(one, RunDir(tmp_path / "run"), lambda _: None, False))
    assert [t for t in series if t[1] == "reference"] == [("series", "reference", 0)]
    both = estimate_workload(config_from_dict(cfg), 40, 10)
    assert estimate_workload(one, 40, 10).parts["reference"][0] == both.parts["reference"][0] / 2
    assert estimate_workload(one, 40, 10).series == both.series - 1
    assert [k for k in _planned(config_to_dict(one)) if k.startswith("reference")] == ["reference/seed-0"]
    assert "reference_seeds" not in config_to_dict(config_from_dict(cfg))  # old runs' configs still resume
    for bad, message in (
        ({"reference_seeds": 3}, "reference_seeds is 3 but there are 2 seeds"),
        ({"reference_seeds": 1, "full_data_reference": False, "reference_train": {}}, "reference_seeds is set but"),
    ):
        with pytest.raises(Exception, match=message):
            config_from_dict({**cfg, **bad})


def test_the_loop_hands_the_jobs_section_to_the_strategy(tmp_path):
    """MGRAL's surrogate fine-tunes run where the experiment's ``jobs`` says: a GPU asked for
    there (on a machine without one) reaches the jobs and is refused, naming the setting."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal of a process that sees no GPU")
    micro = {"estimator": "finetune", "combinations": 1, "steps": 1, "surrogate_batch": 2, "updates": 2}
    cfg = _config(tmp_path / "run", strategies=[{"name": "mgral", "params": micro}], cycles=1)
    cfg["jobs"] = {"device": "cuda"}
    with pytest.raises(Exception, match=r"surrogate device 'cuda' requested .*jobs.gpus"):
        run_experiment(config_from_dict(cfg), tmp_path / "run", log=lambda _: None)


def test_the_costliest_strategies_are_planned_first_then_seed_by_seed(inline_two_seeds, tmp_path):
    """MGRAL's fine-tune series (surrogate fine-tunes) start first, so a parallel run does not
    end with one of them running alone; the cost is the configured instance's (MGRAL's
    default is cheap); equally cheap series keep the seed-by-seed, config order."""
    from mgral.loop import open_experiment, plan_tasks

    cfg, _ = inline_two_seeds
    specs = [{"name": n} for n in ["random", "cald", "entropy"]]
    specs += [
        {"name": "mgral", "params": {"estimator": "finetune"}},
        {"name": "cdal"},
        {"name": "mgral", "label": "prior"},
    ]
    config = config_from_dict({**cfg, "executor": "process", "strategies": specs})
    _, series = plan_tasks(open_experiment(config, RunDir(tmp_path / "run"), lambda _: None, False))
    assert [(label, seed) for _, label, seed in series] == [
        ("reference", 0), ("reference", 1),
        ("mgral", 0), ("mgral", 1), ("cald", 0), ("cald", 1),
        ("cdal", 0), ("prior", 0), ("cdal", 1), ("prior", 1),
        ("random", 0), ("entropy", 0), ("random", 1), ("entropy", 1),
    ]  # fmt: skip


@pytest.mark.slow  # a process pool of two series at a time: make test-slow, run by .ci/run
def test_a_failed_series_does_not_stop_the_others_and_resume_retries_it(inline_two_seeds, tmp_path):
    cfg, expected = inline_two_seeds
    run = tmp_path / "run"
    # two of the fixture's strategies and no reference: their series are the fixture's (a series
    # depends on its strategy, seed and the shared cycle 0 only), at half the cost
    two = [s for s in cfg["strategies"] if s["name"] in ("random", "entropy")]
    expected = {k: v for k, v in expected.items() if k.split("/")[0] in ("random", "entropy")}
    parallel = {k: v for k, v in cfg.items() if k != "reference_train"}
    parallel.update(strategies=two, full_data_reference=False, executor="process", workers=2, threads=1)
    RunDir(run).create(config_to_dict(config_from_dict(parallel)))
    broken = run / "entropy" / "seed-1" / "ledger.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    logs: list[str] = []
    with pytest.raises(RunError, match=r"1 task\(s\) failed: entropy seed 1 .*--resume"):
        run_experiment(config_from_dict(parallel), run, resume=True, log=logs.append)
    assert any("entropy seed 1: FAILED" in line and "ledger.json" in line for line in logs)
    assert sum("shared cycle 0: done" in line for line in logs) == 2
    # the other series ran in the workers and computed exactly what the inline run did
    done = _series(run)
    assert len(expected) == 4 and done == {k: v for k, v in expected.items() if k != "entropy/seed-1"}
    broken.unlink()
    # the resume runs the failed series, here inline: where a run runs is not what it computes
    run_experiment(config_from_dict({**parallel, "executor": "inline"}), run, resume=True, log=logs.append)
    assert _series(run) == expected


def test_resume_still_refuses_a_different_computation(inline_two_seeds, tmp_path):
    cfg, _ = inline_two_seeds
    run_experiment(config_from_dict({**cfg, "seeds": [0], "cycles": 0}), tmp_path / "run", log=lambda _: None)
    with pytest.raises(RunError, match="budget: 6 \\(recorded\\) vs 7"):
        run_experiment(
            config_from_dict({**cfg, "seeds": [0], "cycles": 0, "budget": 7, "executor": "process"}),
            tmp_path / "run",
            resume=True,
            log=lambda _: None,
        )


def test_reference_train_sets_only_the_reference_runs_training(tmp_path):
    from mgral.loop import open_experiment

    cfg = config_from_dict(_config(tmp_path / "run", full_data_reference=True, reference_train={"iterations": 50}))
    exp = open_experiment(cfg, RunDir(tmp_path / "run"))
    assert exp.detector(0, 0, reference=True).train_overrides["iterations"] == 50
    assert "epochs" not in exp.detector(0, 0, reference=True).train_overrides  # the length is replaced
    assert exp.detector(0, 0).train_overrides["epochs"] == 2
    assert "iterations" not in exp.detector(0, 0).train_overrides
    with pytest.raises(Exception, match="reference_train is set but full_data_reference is false"):
        config_from_dict(_config(tmp_path / "run", reference_train={"iterations": 50}))


@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_begins_each_cycle_from_the_previous_model(tmp_path, warm):
    import torch

    from mgral.detectors.torchvision_detector import TorchvisionDetector

    cfg = _config(tmp_path / "run", cycles=1, strategies=[{"name": "random"}])
    cfg["detector"] = {**cfg["detector"], "warm_start": warm, "train": {"iterations": 1, "lr": 1e-12}}
    run_experiment(config_from_dict(cfg), tmp_path / "run", log=lambda _: None)
    first = TorchvisionDetector.load(tmp_path / "run" / "_shared" / "seed-0" / "cycle-0" / "model.pt").model
    second = TorchvisionDetector.load(tmp_path / "run" / "random" / "seed-0" / "cycle-1" / "model.pt").model
    a, b = first.state_dict(), second.state_dict()
    weights = [k for k in a if k.endswith("weight") and a[k].dtype == torch.float32 and a[k].dim() == 4]
    same = all(torch.allclose(a[k], b[k], atol=1e-6) for k in weights)
    assert same == warm  # lr ~0: warm-started conv weights stay the previous cycle's; fresh ones differ


def test_mgral_two_cycle_run_end_to_end(tmp_path):
    """MGRAL through the loop with micro settings: diagnostics per cycle, the second cycle's
    reward model keeps the first cycle's rows, its agent starts from the first's."""
    micro = {"estimator": "finetune", "combinations": 3, "steps": 2, "surrogate_batch": 2, "updates": 8}
    micro |= {"hidden": 16, "chunk": 8}
    cfg = _config(tmp_path / "run", strategies=[{"name": "mgral", "params": micro}])
    run_experiment(config_from_dict(cfg), tmp_path / "run", log=lambda _: None)
    series = _series(tmp_path / "run")["mgral/seed-0"]
    assert [r["num_labeled"] for r in series["records"]] == [8, 14, 20]
    base = tmp_path / "run" / "mgral" / "seed-0"
    for cycle in (0, 1):
        out = base / f"cycle-{cycle}" / "mgral"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["table_rows"] == 3 and (out / "agent_rewards.csv").is_file() and (out / "table.csv").is_file()
        assert summary["history_rows"] == 3 * cycle  # earlier cycles' rows kept
        assert (out / "agent.pt").is_file()  # the next cycle warm-starts from it
        selection = json.loads((base / f"cycle-{cycle}" / "selection.json").read_text())
        assert selection["info"]["seconds"] == summary["seconds"]
    assert not (base / "cycle-2" / "mgral").exists()  # the last cycle selects nothing
