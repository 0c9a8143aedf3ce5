"""benchmarks/al_benchmark.py: the published-benchmark driver, end to end on a local Ray instance."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("al_benchmark", ROOT / "benchmarks" / "al_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MICRO = {
    "name": "micro",
    "dataset": {"path": "digits", "synth": {"images": 60, "seed": 0, "image_size": 96, "max_digit_size": 32}},
    "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 2, "batch_size": 4}},
    "strategies": [{"name": "random"}, {"name": "entropy"}],
    "initial": {"size": 8},
    "budget": 5,
    "cycles": 1,
    "seeds": [0],
    "full_data_reference": True,
    "reference_train": {"iterations": 3},
}


def test_driver_runs_two_series_on_local_ray_and_publishes(tmp_path, monkeypatch):
    driver = _driver()
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(MICRO))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{driver.MARKERS[0]}\nold\n{driver.MARKERS[1]}\nafter\n")
    args = [str(config), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--readme", str(readme)]
    assert driver.main([*args, "--executor", "ray", "--workers", "2", "--threads", "1"]) == 0

    out = tmp_path / "out" / "micro"
    assert "- Runs: `runs/micro`" in (out / "results.md").read_text()  # relative to where it ran: no local path
    for name in ("results.md", "results.csv", "selections.csv", "curves_images.png", "run.md"):
        assert (out / name).is_file(), name
    with open(out / "results.csv", newline="") as fh:
        rows = {r["label"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"random", "entropy"} and rows["entropy"]["paired_seeds"] == "1"
    with open(out / "selections.csv", newline="") as fh:
        chosen = list(csv.DictReader(fh))
    assert sorted((r["strategy"], r["cycle"]) for r in chosen) == [("entropy", "0")] * 5 + [("random", "0")] * 5
    assert all(r["file_name"].endswith(".png") or r["file_name"].endswith(".jpg") for r in chosen)

    check = json.loads((out / "converged.json").read_text())  # the seed-0 reference, trained twice as long
    assert check["train"]["iterations"] == 3 and check["train_twice"]["iterations"] == 6 and check["seed"] == 0
    for key in ("once", "twice"):
        assert (tmp_path / "runs" / "micro.converged" / key / "seed-0" / "evaluation.json").is_file()
    # the same training on the same machine as the run's reference: the same model
    assert check["mAP"] == check["run_reference_mAP"] == json.loads((out / "run.json").read_text())["reference_map"]
    assert check["converged"] == (check["mAP_twice"] - check["mAP"] < 0.05 * check["mAP"])
    assert "Converged: **" in (out / "run.md").read_text()

    wall = json.loads((tmp_path / "runs" / "micro.wall.json").read_text())
    assert len(wall) == 1 and wall[0]["seconds"] > 0 and wall[0]["executor"] == "ray" and wall[0]["workers"] == 2
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{driver.MARKERS[1]}\nafter\n")
    assert "old" not in text and "### micro" in text and "| entropy | 1 | 2 |" in text
    assert "Full-data reference: test mAP@[.5:.95]" in text
    assert f"-> {check['mAP_twice']:.4f}" in text  # the summary says whether the schedule converged
    assert "Details: [`micro/results.md`](out/micro/results.md)" in text  # led from the README's folder
    assert "](micro/results.md)" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "summary.md").read_text().count("### micro") == 1

    # a second invocation resumes (nothing left to run) and adds its own wall-time entry
    monkeypatch.setattr(driver, "IDLE_SECONDS", wall[0]["seconds"] * 0.9)  # the first one ran; this one won't
    assert driver.main([*args, "--executor", "inline"]) == 0
    assert len(json.loads((tmp_path / "runs" / "micro.wall.json").read_text())) == 2
    run_md = (out / "run.md").read_text()
    assert "2 invocation(s)" in run_md and "and 1 that found the run finished" in run_md
    facts = json.loads((out / "run.json").read_text())
    assert len(facts["invocations"]) == 2 and facts["reference_seeds"] == 1 and 0 <= facts["reference_map"] <= 1


def test_summary_reads_the_published_tables(tmp_path):
    driver = _driver()
    out = tmp_path / "out" / "d"
    out.mkdir(parents=True)
    header = (
        "label,strategy_name,seeds,cycles,max_cycles,in_progress,nauc_mean,nauc_std,nauc_vs_random_mean,nauc_vs_random_std,"
        "wins_vs_random,paired_seeds,labels_to_90pct,labels_to_90pct_seeds,seconds_select\n"
    )
    (out / "results.csv").write_text(
        header
        + "random,random,3,6,6,0,0.25,0.01,,,,,120.0,3,0.0\n"
        + "mgral,mgral,3,4,6,1,0.3,0.02,0.05,0.01,3,3,90.5,2,30.0\n"
        + "entropy,entropy,1,6,6,0,0.28,,0.03,,1,1,,0,1.0\n"  # one seed: no std
    )
    facts = {
        "metric": "mAP@[.5:.95]",
        "reference_map": 0.5,
        "reference_seeds": 3,
        "wall_seconds": 5400.0,
        "invocations": [{"machine": "box A"}, {"machine": "box B"}, {"machine": "box A"}],
    }
    (out / "run.json").write_text(json.dumps(facts))
    text = driver.summary_markdown(tmp_path / "out", ["d", "missing"])
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    # tables published before the intervals: computed from mean, std and seeds (t: 4.303 at 2 df)
    assert lines[1] == (
        "| mgral* | 3 | 4 | 0.3000 ± 0.0200 | +0.0500 ± 0.0100 [+0.0252, +0.0748] (3/3, p 0.25) | 90 (2/3) | 30.0 | — |"
    )
    assert lines[2] == "| entropy | 1 | 6 | 0.2800 | +0.0300 (1/1) | — | 1.0 | — |"
    assert lines[3] == "| random | 3 | 6 | 0.2500 ± 0.0100 | — | 120 | 0.0 | — |"
    rows = (out / "results.csv").read_text().splitlines()
    rows[0] += ",nauc_vs_random_low,nauc_vs_random_high,sign_p_vs_random,select_per_train"
    rows[1] += ",,,,0.0"
    rows[2] += ",-0.01,0.11,0.25,1.5"
    rows[3] += ",,,,0.1"
    (out / "results.csv").write_text("\n".join(rows) + "\n")
    lines = [ln for ln in driver.summary_markdown(tmp_path / "out", ["d"]).splitlines() if ln.startswith("| ")]
    assert lines[1].endswith(
        "| +0.0500 ± 0.0100 [-0.0100, +0.1100] (3/3, p 0.25, not distinguishable) | 90 (2/3) | 30.0 | 1.50 |"
    )
    assert "test mAP@[.5:.95] 0.5000 (mean over 3 seed(s)). Wall time: 1.50 h." in text
    assert text.startswith("Machine: box A; box B.\n")


def test_published_records_restore_a_lost_run_and_only_what_is_missing_runs(tmp_path, monkeypatch, capsys):
    driver = _driver()
    monkeypatch.chdir(tmp_path)
    micro = {**MICRO, "cycles": 2, "executor": "inline"}  # 2 cycles: entropy caches predictions of its own
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro))
    runs, out_root = tmp_path / "runs", tmp_path / "out"
    args = [str(config), "--runs", str(runs), "--out", str(out_root), "--readme", str(tmp_path / "none.md")]
    assert driver.main(args) == 0
    out, records = out_root / "micro", out_root / "micro" / driver.RECORDS

    recorded = yaml.safe_load((records / "config.yaml").read_text())
    assert not Path(recorded["dataset"]["path"]).is_absolute()  # nothing machine-specific is published
    assert sorted(p.relative_to(records).as_posix() for p in records.glob("*/seed-*")) == [
        "entropy/seed-0",
        "random/seed-0",
        "reference/seed-0",
    ]
    assert not list(records.rglob("*.pt")) and not list(records.rglob("*.npz"))  # no models, no caches
    figures = json.loads((records / "entropy" / "seed-0" / "diversity.json").read_text())
    assert sorted(figures) == ["0", "1"]  # cycle 0's batch too (read from the seed's shared cache)
    assert not (records / "random" / "seed-0" / "diversity.json").exists()  # random cached nothing
    published = {name: (out / name).read_text() for name in ("results.md", "results.csv", "selections.csv")}
    assert "| entropy | 2 |" in published["results.md"]  # 2 batches in the diversity table

    # the machine loses RUNS/: the published records bring back every table, unchanged
    shutil.rmtree(runs)
    capsys.readouterr()
    assert driver.main([*args, "--report-only"]) == 0
    assert "3 finished series restored" in capsys.readouterr().out
    assert {name: (out / name).read_text() for name in published} == published
    assert len(json.loads((runs / "micro.wall.json").read_text())) == 1  # the invocation that made them

    # published before entropy had finished: only entropy runs, and lands where it did before
    # (its cycle 0 from a retrained shared model: training is deterministic on one machine)
    shutil.rmtree(runs)
    shutil.rmtree(records / "entropy")
    assert driver.main(args) == 0
    assert "2 finished series restored" in capsys.readouterr().out
    assert not (runs / "micro" / "random" / "seed-0" / "cycle-0").exists()  # restored, not run again
    assert (runs / "micro" / "entropy" / "seed-0" / "cycle-1" / "predictions.npz").is_file()  # run again
    assert (out / "selections.csv").read_text() == published["selections.csv"]
    with open(out / "results.csv", newline="") as fh:
        now = {r["label"]: r for r in csv.DictReader(fh)}
    before = {r["label"]: r for r in csv.DictReader(io.StringIO(published["results.csv"]))}
    timing = ("seconds_", "select_per_train")  # wall seconds differ between runs; the rest must not
    assert {k: {c: v for c, v in r.items() if not c.startswith(timing)} for k, r in now.items()} == {
        k: {c: v for c, v in r.items() if not c.startswith(timing)} for k, r in before.items()
    }
    assert "differs" not in (out / "run.md").read_text()  # every series of seed 0 started from one cycle-0 model

    # records of another experiment are refused, naming what differs
    config.write_text(yaml.safe_dump({**micro, "budget": 6}))
    with pytest.raises(SystemExit, match="budget"):
        driver.main(args)


def test_run_md_flags_a_seed_whose_series_started_from_different_cycle0_models(tmp_path):
    driver = _driver()
    for label, cycle0 in (("random", 0.25), ("entropy", 0.25), ("margin", 0.2), ("reference", 0.6)):
        sdir = tmp_path / label / "seed-3"
        sdir.mkdir(parents=True)
        (sdir / "cycles.jsonl").write_text(json.dumps({"cycle": 0, "mAP": cycle0}) + "\n")
    assert driver.cycle0_maps(tmp_path) == {3: [0.2, 0.25]}


def test_converged_check_doubles_the_length_and_says_whether_it_held():
    driver = _driver()
    assert driver.doubled({"epochs": 10, "min_iterations": 60, "lr": 0.01}) == {
        "epochs": 20,
        "min_iterations": 120,
        "lr": 0.01,
    }
    assert driver.doubled({"iterations": 360, "min_iterations": 0}) == {"iterations": 720, "min_iterations": 0}
    check = {
        "seed": 0,
        "train": {"iterations": 360},
        "train_twice": {"iterations": 720},
        "mAP": 0.5,
        "mAP_twice": 0.53,
        "relative_gain": 0.06,
        "threshold": 0.05,
        "converged": False,
    }
    text = driver.converged_text(check)
    assert "**no**" in text and "360 iterations -> 720 iterations" in text and "0.5000 -> 0.5300 (+6.0%" in text
    assert "not checked" in driver.converged_text(None)


def test_the_chess_config_tests_on_val_and_test():
    from mgral.config import load_config
    from mgral.loop import prepare_dataset

    config = load_config(ROOT / "benchmarks" / "configs" / "chess.yaml")
    if not (Path(config.dataset.path)).exists():
        pytest.skip(f"{config.dataset.path} is not on this machine")
    dataset = prepare_dataset(config)
    pool, test = dataset.image_ids(config.dataset.pool_splits), dataset.image_ids(config.dataset.test_split)
    assert (len(pool), len(test)) == (202, 58 + 29) and len(config.seeds) == 8
