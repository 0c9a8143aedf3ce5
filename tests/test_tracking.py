"""Experiment tracking (mgral.tracking) against a real local MLflow store: what a sync logs,
that nothing is logged twice (a repeated sync, a kill between a log and its state write,
two syncs at once), that a resumed run continues its MLflow runs, the CLI and the report."""

import glob
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mgral.cli import main
from mgral.config import config_from_dict, config_to_dict, load_config
from mgral.errors import ConfigError
from mgral.loop import run_experiment
from mgral.runs import RunDir, read_cycle_records
from mgral.tracking import Tracker, open_tracker

mlflow = pytest.importorskip("mlflow", reason="pip install 'mgral[mlflow]' (the test extra has it)")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow's usage reports; off under pytest anyway
# MLflow's own SQL under SQLAlchemy 2.1 (its store's mappers), not mgral's
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

MGRAL_MICRO = {"estimator": "finetune", "combinations": 2, "steps": 1, "surrogate_batch": 2, "updates": 4}
MGRAL_MICRO |= {"hidden": 8, "chunk": 4}
TINY = {
    "name": "tiny",
    "dataset": {"path": "digits", "synth": {"images": 30, "seed": 0, "image_size": 96, "max_digit_size": 32}},
    "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 1, "batch_size": 2}},
    "strategies": [{"name": "random"}, {"name": "mgral", "params": MGRAL_MICRO}],
    "initial": {"size": 6},
    "budget": 4,
    "cycles": 2,
    "seeds": [0],
    "full_data_reference": True,
    "threads": 1,
}


def _config(tmp: Path, **changes) -> dict:
    return {**json.loads(json.dumps(TINY)), "dataset": {**TINY["dataset"], "path": str(tmp / "digits")}, **changes}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run: random and MGRAL (2 cycles each) and the full-data reference."""
    tmp = tmp_path_factory.mktemp("tracking")
    run_experiment(config_from_dict(_config(tmp)), tmp / "run", log=lambda _: None, progress=False)
    return tmp / "run"


def _records(run: Path) -> dict[str, list[dict]]:
    return {f"{s.label} seed {s.seed}": read_cycle_records(s.records) for s in RunDir(run).list_series()}


def _store(uri: str) -> dict:
    """Every MLflow run of the store, by run name: status, tags, params, and each metric's
    history as (step, value) pairs in order."""
    client = mlflow.tracking.MlflowClient(uri)
    out = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            history = {
                key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=_order)]
                for key in run.data.metrics
            }
            out[run.info.run_name] = {
                "id": run.info.run_id,
                "status": run.info.status,
                "tags": run.data.tags,
                "params": run.data.params,
                "metrics": history,
                "experiment": experiment.name,
            }
    return out


def _order(m):
    return (m.step, m.timestamp)


def _local(run: Path) -> str:
    return f"sqlite:///{(run / '_tracking' / 'mlflow.db').resolve()}"


def _check_series(store: dict, records: dict[str, list[dict]]) -> None:
    """Each series' child run holds one point per cycle record, at step = labeled images."""
    parent = store[next(name for name, r in store.items() if "mlflow.parentRunId" not in r["tags"])]
    assert set(store) == {*records, parent["tags"]["mgral.run_dir"].rsplit("/", 1)[-1]}
    for name, recs in records.items():
        child = store[name]
        assert child["tags"]["mlflow.parentRunId"] == parent["id"]
        assert child["status"] == "FINISHED"
        for key in ("mAP", "mAP50", "cycle", "num_boxes_labeled", "labeling_cost"):
            assert child["metrics"][key] == [(r["num_labeled"], r[key]) for r in recs], (name, key)
        assert child["metrics"]["seconds/train"] == [(r["num_labeled"], r["seconds"]["train"]) for r in recs]
        for cls in recs[0]["per_class"]:
            expected = [(r["num_labeled"], r["per_class"][cls]) for r in recs if r["per_class"][cls] is not None]
            assert child["metrics"].get(f"AP/{cls}", []) == expected


def test_a_sync_logs_the_config_and_every_cycle_and_a_second_sync_nothing(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    records = _records(run)
    assert Tracker(run).sync() == sum(len(r) for r in records.values()) == 2 * 3 + 1
    store = _store(_local(run))
    _check_series(store, records)
    parent = store["run"]
    assert parent["status"] == "FINISHED" and parent["experiment"] == "tiny"
    assert parent["params"]["cycles"] == "2" and parent["params"]["seeds"] == "[0]"
    assert parent["params"]["strategies.mgral.params.combinations"] == "2"
    assert parent["params"]["detector.train.iterations"] == "1"
    assert not {"executor", "threads", "workers", "tracking"} & set(parent["params"]), "where it ran is no param"
    child = store["mgral seed 0"]
    assert child["params"]["strategy.name"] == "mgral" and child["params"]["seed"] == "0"
    assert child["params"]["strategy.params.updates"] == "4" and "strategies.random.name" not in child["params"]
    assert store["reference seed 0"]["params"]["strategy.name"] == "full-data"
    # MGRAL's diagnostics: from each selection's info, at the step of the cycle that selected
    info = json.loads((run / "mgral" / "seed-0" / "cycle-1" / "selection.json").read_text())["info"]
    steps = [r["num_labeled"] for r in records["mgral seed 0"]]
    assert child["metrics"]["selection/table_rows"][1] == (steps[1], info["table_rows"])
    assert [s for s, _ in child["metrics"]["selection/diversity/mean_pairwise_distance"]] == steps[:2]
    assert "selection/seconds/table" in child["metrics"] and "selection/table_rows" not in store["random seed 0"]

    assert pickle.loads(pickle.dumps(Tracker(run))).sync() == 0  # as a process or Ray worker gets it
    assert _store(_local(run)) == store

    # a kill between logging and writing the state: the next sync logs the series' records again,
    # at their recorded times, and the store keeps each point once (and the run's params, the same)
    state_file = run / "_tracking" / "state.json"
    state = json.loads(state_file.read_text())
    state["stores"]["local"]["series"]["random/seed-0"]["cycle"] = 0
    state["stores"]["local"]["run"]["params"] = False
    state_file.write_text(json.dumps(state))
    assert Tracker(run).sync() == 2
    assert _store(_local(run)) == store


def test_two_syncs_at_once_make_one_run_each_then_the_report_is_logged(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cmd = [sys.executable, "-m", "mgral", "track", str(run)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    logged = sorted(int(out.split(": ")[1].split()[0]) for out, _ in outs)
    assert logged == [0, 7], outs  # whichever came second found everything logged
    store = _store(_local(run))
    _check_series(store, _records(run))

    assert main(["report", str(run)]) == 0
    client = mlflow.tracking.MlflowClient(_local(run))
    files = {a.path for a in client.list_artifacts(store["run"]["id"], "report")}
    assert {"report/results.md", "report/report.html", "report/results.csv"} <= files


def test_a_resumed_run_continues_the_same_mlflow_runs(tmp_path):
    """Stopped after its first series' second cycle, synced, then resumed with tracking
    switched on (an execution setting): the run logs its cycles as they finish, in the same
    MLflow runs, each cycle once."""
    cfg = _config(tmp_path, strategies=[{"name": "random"}], seeds=[0, 1])
    run = tmp_path / "run"

    def stop(line: str) -> None:
        if line.startswith("random seed 0 cycle 1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config_from_dict(cfg), run, log=stop, progress=False)
    assert Tracker(run).sync() == 3  # the reference of seed 0, random seed 0's cycles 0 and 1
    before = _store(_local(run))
    assert before["run"]["status"] == before["random seed 0"]["status"] == "RUNNING"

    tracked = config_from_dict({**cfg, "tracking": "mlflow"})
    run_experiment(tracked, run, resume=True, log=lambda _: None, progress=False)
    assert open_tracker(tracked, run).sync() == 0, "the run logged each of its 5 new cycles as it finished"
    after = _store(_local(run))
    assert {name: r["id"] for name, r in before.items()} == {name: after[name]["id"] for name in before}
    assert set(after) == {"run", "reference seed 0", "reference seed 1", "random seed 0", "random seed 1"}
    _check_series(after, _records(run))
    assert after["run"]["status"] == "FINISHED"


def test_missing_mlflow_is_a_config_error_with_the_install_command(tmp_path, monkeypatch, capsys):
    cfg = config_from_dict(_config(tmp_path, tracking={"kind": "mlflow"}))
    RunDir(tmp_path / "run").create(config_to_dict(cfg))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(ConfigError, match=r"needs mlflow, which is not installed .*pip install 'mgral\[mlflow\]'"):
        open_tracker(cfg, tmp_path / "run")
    assert main(["track", str(tmp_path / "run")]) == 2
    assert "pip install 'mgral[mlflow]'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny alone: no SQLite store
    with pytest.raises(ConfigError, match=r"needs sqlalchemy, .*pip install 'mgral\[mlflow\]'"):
        Tracker(tmp_path / "run")
    Tracker(tmp_path / "run", uri="http://127.0.0.1:5000")  # a server needs no SQL libraries here


def test_tracking_config_is_off_by_default_and_an_execution_setting(tmp_path):
    assert config_from_dict(_config(tmp_path)).tracking is None
    assert config_from_dict(_config(tmp_path, tracking="mlflow")).tracking.kind == "mlflow"
    on = config_from_dict(_config(tmp_path, tracking={"uri": "http://127.0.0.1:5000", "experiment": "e"}))
    assert (on.tracking.kind, on.tracking.uri, on.tracking.experiment) == ("mlflow", "http://127.0.0.1:5000", "e")
    assert config_to_dict(on)["tracking"] == {"kind": "mlflow", "uri": "http://127.0.0.1:5000", "experiment": "e"}
    with pytest.raises(ConfigError, match=r"tracking\.kind: Input should be 'mlflow'"):
        config_from_dict(_config(tmp_path, tracking="wandb"))
    with pytest.raises(ConfigError, match=r"unknown key 'url' in tracking; valid keys: kind, uri, experiment"):
        config_from_dict(_config(tmp_path, tracking={"url": "x"}))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    assert load_config(path, ["tracking.uri=sqlite:///x.db"]).tracking.uri == "sqlite:///x.db"
    # configs written before tracking existed resolve as before (no tracking key), so their runs resume
    root = Path(__file__).resolve().parents[1]
    for published in glob.glob(str(root / "configs" / "*.yaml")) + glob.glob(str(root / "benchmarks/**/*.yaml")):
        assert "tracking" not in config_to_dict(load_config(published)), published


def test_a_corrupt_state_file_is_refused_before_the_store_is_touched(tmp_path, capsys):
    run = tmp_path / "run"
    RunDir(run).create(config_to_dict(config_from_dict(_config(tmp_path))))
    (run / "_tracking").mkdir()
    (run / "_tracking" / "state.json").write_text("{")
    assert main(["track", str(run)]) == 2
    err = capsys.readouterr().err
    assert "state.json: cannot read the tracking state" in err and "delete it to log the whole run again" in err
    assert not (run / "_tracking" / "mlflow.db").exists()
