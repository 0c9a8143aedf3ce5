"""Hostile input to runs (issue 17): broken checkpoints, mistyped configs, signals, stale
temporary files. Every refusal exits 2 with one line naming the file and the fix; a crash,
a kill or a broken file never loses labels nor leaves a run that cannot go on.

The runs train the tiny detector for a few iterations on 96-pixel digits scenes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mgral.cli import main
from mgral.config import config_from_dict
from mgral.data.synth import SynthConfig, generate
from mgral.loop import run_experiment
from mgral.pool import Ledger
from mgral.runs import RunLock, read_cycle_records


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, as the process executor's workers use: results then agree to the
    last bit between inline, parallel and resumed runs (and 2 shared cores are not oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "digits"
    generate(out, SynthConfig(images=40, seed=0, image_size=96, max_digit_size=32))
    return out


def _cfg(digits: Path, **changes) -> dict:
    cfg = {
        "name": "hostile",
        "dataset": {"path": str(digits)},
        "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 2, "batch_size": 4}},
        "strategies": [{"name": "random"}, {"name": "entropy"}],
        "initial": {"size": 6},
        "budget": 4,
        "cycles": 1,
        "seeds": [0],
        "threads": 1,
    }
    cfg.update(changes)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _results(run: Path) -> dict:
    """What a run computed (no timings): each series' records and ledger."""
    keys = ("cycle", "num_labeled", "num_boxes_labeled", "selected", "scores", "mAP", "mAP50", "per_class")
    return {
        f"{records.parent.parent.name}/{records.parent.name}": {
            "records": [{k: r[k] for k in keys} for r in read_cycle_records(records)],
            "ledger": Ledger.load(records.parent / "ledger.json").to_dict(),
        }
        for records in sorted(run.glob("*/seed-*/cycles.jsonl"))
    }


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mgral: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory) -> tuple[dict, Path, dict]:
    """A finished run (inline, one torch thread) and what it computed."""
    cfg = _cfg(digits)
    run = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(config_from_dict(cfg), run, log=lambda _: None)
    return cfg, run, _results(run)


# -- 1. broken checkpoints ---------------------------------------------------------------


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(4096))
    else:  # a real torch checkpoint without one of mgral's keys
        state = torch.load(path, weights_only=True)
        del state[how.removeprefix("no-")]
        torch.save(state, path)


BROKEN = {
    "empty": "not a torch checkpoint (0 bytes",
    "truncated": "could not be loaded",
    "random": "not a torch checkpoint (4096 bytes",
    "no-categories": "is missing key 'categories'; expected a checkpoint written by mgral train",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_predict_with_a_broken_checkpoint_exits_2_naming_it(finished, digits, tmp_path, capsys, how):
    _, run, _ = finished
    model = tmp_path / "model.pt"
    shutil.copy(run / "entropy" / "seed-0" / "cycle-1" / "model.pt", model)
    _break(model, how)
    args = ["predict", str(digits), "--checkpoint", str(model), "--out", str(tmp_path / "p.json"), "--device", "cpu"]
    assert main(args) == 2
    _one_error_line(capsys, str(model), BROKEN[how])
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("how", ["empty", "truncated", "no-optimizer"])
def test_train_resume_from_a_broken_last_checkpoint_exits_2_naming_it(digits, tmp_path, capsys, how):
    out = tmp_path / "train"
    args = ["train", str(digits), "--detector", "tiny", "--param", "pretrained=false", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--iterations", "1", "--batch-size", "4"]) == 0
    capsys.readouterr()
    # last.pt is removed once model.pt is written: make one as a killed training leaves it
    from mgral.detectors.torchvision_detector import TorchvisionDetector
    from mgral.detectors.training import save_state

    det = TorchvisionDetector.load(out / "model.pt", device="cpu")
    state = {"model": det.model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 0, "iteration": 1}
    save_state(out / "last.pt", {**state, **det._meta()})
    _break(out / "last.pt", how)
    assert main([*args, "--out", str(out), "--iterations", "2", "--batch-size", "4", "--resume"]) == 2
    expected = BROKEN.get(how, "is missing key 'optimizer'")
    _one_error_line(capsys, str(out / "last.pt"), expected)


@pytest.mark.parametrize(
    "broken",
    ["entropy/seed-0/cycle-1/model.pt", "_shared/seed-0/cycle-0/model.pt", "random/seed-0/cycle-1/last.pt"],
    ids=["latest-model", "shared-cycle-0-model", "epoch-checkpoint"],
)
def test_resume_retrains_a_cycle_whose_model_file_is_unreadable(finished, digits, tmp_path, capsys, broken):
    """As a kill (or a disk fault) leaves it: the cycle's model is written, its record is not;
    the model file is unreadable. ``mgral run --resume`` trains that cycle again (deterministic on
    CPU for a seed), so the run ends exactly as the uninterrupted one."""
    cfg, done, expected = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    label, seed, cycle = broken.split("/")[:3]
    # un-finish the cycle (every series' cycle 0 for the shared model)
    for records in run.glob(f"{'*' if label == '_shared' else label}/{seed}/cycles.jsonl"):
        kept = records.read_text().splitlines(keepends=True)[: int(cycle.removeprefix("cycle-"))]
        records.write_text("".join(kept))
    path = run / broken
    if path.name == "last.pt":  # a training killed after an epoch: its checkpoint, then cut short
        shutil.copy(path.parent / "model.pt", path)
        (path.parent / "model.pt").unlink()
        (path.parent / "evaluation.json").unlink()
    _break(path, "empty" if path.name == "model.pt" else "truncated")
    assert main(["run", str(_write(tmp_path / "c.yaml", cfg)), "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "training cycle" in out
    assert _results(run) == expected


# -- 2. a mistyped config leaves no run behind --------------------------------------------

TYPOS = {
    "strategy": ({"strategies": [{"name": "ranodm"}]}, "ranodm"),
    "strategy-param": ({"strategies": [{"name": "random", "params": {"sed": 1}}]}, "sed"),
    "preset": ({"detector": {"preset": "tinny"}}, "tinny"),
    "detector-param": ({"detector": {"preset": "tiny", "params": {"pretrianed": False}}}, "pretrianed"),
    "train-key": ({"detector": {"preset": "tiny", "train": {"iterations": 1, "epochz": 1}}}, "epochz"),
    "reference-train-key": ({"full_data_reference": True, "reference_train": {"iteratons": 1}}, "iteratons"),
    "device": ({"detector": {"preset": "tiny", "device": "cdua"}}, "cdua"),
    "dataset": ({"dataset": {"path": "/nonexistent/digits"}}, "/nonexistent/digits"),
    "initial-size": ({"initial": {"size": 1000}}, "initial size 1000 is larger than the pool"),
}


def _corrected(digits: Path) -> dict:
    """Quick to run: one cycle-0 model trained for one iteration."""
    return _cfg(
        digits,
        strategies=[{"name": "random"}],
        cycles=0,
        detector={"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 1, "batch_size": 4}},
    )


def _typo(digits: Path, case: str) -> dict:
    change, _ = TYPOS[case]
    cfg = _corrected(digits)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _no_run(run: Path) -> None:
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())


@pytest.mark.parametrize("case", list(TYPOS))
def test_a_mistyped_run_config_writes_nothing_and_the_corrected_one_then_runs(digits, tmp_path, capsys, case):
    run = tmp_path / "run"
    assert main(["run", str(_write(tmp_path / "typo.yaml", _typo(digits, case))), "--out", str(run)]) == 2
    _one_error_line(capsys, TYPOS[case][1])
    _no_run(run)
    assert main(["run", str(_write(tmp_path / "fixed.yaml", _corrected(digits))), "--out", str(run)]) == 0
    assert "run finished" in capsys.readouterr().out


HUMAN_TYPOS = ["strategy", "preset", "detector-param", "train-key", "device", "dataset", "ids-file"]


@pytest.mark.parametrize("case", HUMAN_TYPOS)
def test_a_mistyped_human_config_makes_no_run_and_the_corrected_one_then_queries(digits, tmp_path, capsys, case):
    ids = tmp_path / "initial.txt"
    ids.write_text("".join(f"{i}\n" for i in range(1, 7)))
    corrected = {**_corrected(digits), "oracle": {"kind": "human"}, "initial": {"ids_file": str(ids)}}
    if case == "ids-file":
        bad, message = {**corrected, "initial": {"ids_file": str(tmp_path / "inital.txt")}}, "inital.txt"
    else:
        bad, message = (
            {**_typo(digits, case), "oracle": {"kind": "human"}, "initial": {"ids_file": str(ids)}},
            TYPOS[case][1],
        )
    run = tmp_path / "run"
    assert main(["query", "--config", str(_write(tmp_path / "typo.yaml", bad)), "--run", str(run)]) == 2
    _one_error_line(capsys, message)
    _no_run(run)
    assert main(["query", "--config", str(_write(tmp_path / "fixed.yaml", corrected)), "--run", str(run)]) == 0
    assert "asked for 4 images" in capsys.readouterr().out


# -- 3. a signal stops the workers, releases the lock, and the run resumes -----------------


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc: every process's parent)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        children = {c for c, parent in parents.items() if parent == p}
        todo += children - found
        found |= children
    return found


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(
    ("signum", "executor"),
    [
        # whole runs in subprocesses with two workers (30-65 s each on 2 cores): make test-slow, run by .ci/run
        pytest.param(signal.SIGTERM, "process", marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, "process", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, "ray", marks=pytest.mark.slow),  # Ray's processes are the local instance's
    ],
    ids=["TERM-process", "INT-process", "TERM-ray"],
)
def test_a_signal_stops_the_workers_releases_the_lock_and_resume_ends_as_uninterrupted(
    finished, tmp_path, signum, executor
):
    cfg, _, expected = finished
    run = tmp_path / "run"
    command, env, proc, workers = _start_two_workers(cfg, executor, tmp_path / "c.yaml", run)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    err = proc.stderr.read().decode()
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == f"mgral: stopped by {name}; resume with --resume", err
    assert "Traceback" not in err, err
    _assert_gone(workers, within=10, what="worker processes survived the run")
    with RunLock(run):  # released: a resume may take it
        pass
    assert len(read_cycle_records(run / "entropy" / "seed-0" / "cycles.jsonl")) < 2, "the run finished first"
    resumed = subprocess.run([*command, "--resume"], capture_output=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert _results(run) == expected


@pytest.mark.slow  # a whole run in a subprocess with two workers: make test-slow, run by .ci/run
def test_a_killed_run_takes_its_workers_with_it(finished, tmp_path):
    """SIGKILL leaves the run nothing to clean up with: the kernel ends its workers
    (PR_SET_PDEATHSIG), so no orphan goes on writing into the run."""
    cfg, _, _ = finished
    _, _, proc, workers = _start_two_workers(cfg, "process", tmp_path / "c.yaml", tmp_path / "run")
    proc.kill()
    proc.wait(timeout=30)
    _assert_gone(workers, within=20, what="worker processes outlived their killed run")


def _start_two_workers(cfg: dict, executor: str, config: Path, run: Path):
    """``mgral run`` in a child process with two workers, returned once the series have
    started (phase 2) and both workers train: (command, env, process, worker pids)."""
    _write(config, {**cfg, "executor": executor, "workers": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mgral", "run", str(config), "--out", str(run)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while not list(run.glob("*/seed-0/ledger.json")) or len(workers) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the series did not start"
        workers |= _descendants(proc.pid)
        time.sleep(0.05)
    return command, env, proc, workers | _descendants(proc.pid)


def _assert_gone(pids: set[int], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within  # orphans alive now would run on; give the dying a moment
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], what


# -- 4. stale temporary files of interrupted writes --------------------------------------

STALE = [".ledger.json.a1b2_c3d.tmp", ".config.yaml.zzzzzzzz.tmp", ".model.pt.0123abcd.tmp"]
KEPT = [".ledger.json.tmp", "ledger.json.a1b2c3d4.tmp", ".ledger.json.A1B2C3D4.tmp", "notes.tmp", ".x.abcd.tmp"]


def test_resume_removes_stale_temporary_files_and_nothing_else(finished, tmp_path):
    cfg, done, expected = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    sdir = run / "entropy" / "seed-0"
    planted = [sdir / STALE[0], run / STALE[1], sdir / "cycle-1" / STALE[2]]
    kept = [sdir / name for name in KEPT] + [run / "_shared" / "seed-0" / KEPT[0]]
    for path in planted + kept:
        path.write_bytes(b"half a write")
    (sdir / ".dir.abcdefgh.tmp").mkdir()  # a directory: not a stale file
    before = sorted(p for p in run.rglob("*") if p not in planted)
    run_experiment(config_from_dict(cfg), run, resume=True, log=lambda _: None)
    assert not [p for p in planted if p.exists()]
    assert sorted(run.rglob("*")) == before
    assert _results(run) == expected


def test_a_series_removes_the_stale_temporary_files_of_its_ledger_on_open(finished, tmp_path):
    """In a worker too (the series directory is its own): a ledger write cut short by a kill."""
    from mgral.loop import open_experiment, run_series
    from mgral.runs import RunDir
    from mgral.strategies import build_strategy

    cfg, done, _ = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    sdir = run / "random" / "seed-0"
    (sdir / STALE[0]).write_bytes(b"{")
    (sdir / KEPT[1]).write_bytes(b"{")
    exp = open_experiment(config_from_dict(cfg), RunDir(run), log=lambda _: None, progress=False)
    run_series(exp, "random", build_strategy("random"), 0, [])
    assert not (sdir / STALE[0]).exists() and (sdir / KEPT[1]).exists()
    assert json.loads((sdir / "ledger.json").read_text())["version"] == 1


def _sleep_in_a_nested_pool(out: str, _shared) -> None:
    """A job that starts its own process pool (as MGRAL's surrogate jobs do) whose job sleeps."""
    from mgral.executors import make_executor

    with make_executor("process", workers=1) as inner:
        list(inner.map(_record_pid_and_sleep, [out]))


def _record_pid_and_sleep(out: str, _shared) -> None:
    Path(out).write_text(str(os.getpid()))
    time.sleep(120)


def test_stopping_a_process_pool_ends_the_pools_its_jobs_started(tmp_path):
    from mgral.executors import make_executor

    pid_file = tmp_path / "inner.pid"
    with make_executor("process", workers=1) as outer:
        jobs = outer.map(_sleep_in_a_nested_pool, [str(pid_file)])
        with pytest.raises(TimeoutError):  # what a signal does to the parent: an exception in the wait
            with _alarm_after(lambda: pid_file.exists()):
                next(jobs)
        jobs.close()
        inner = int(pid_file.read_text())
        deadline = time.monotonic() + 15
        while _alive(inner) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(inner), "the job's own worker survived"


class _alarm_after:
    """Raise TimeoutError in the main thread once ``ready()`` holds (polled by SIGALRM)."""

    def __init__(self, ready) -> None:
        self.ready = ready

    def _tick(self, signum, frame) -> None:
        if self.ready():
            raise TimeoutError
        signal.setitimer(signal.ITIMER_REAL, 0.1)

    def __enter__(self):
        self.previous = signal.signal(signal.SIGALRM, self._tick)
        signal.setitimer(signal.ITIMER_REAL, 0.1)

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


def test_a_ray_map_its_caller_leaves_cancels_its_tasks_and_shuts_the_local_ray_down(tmp_path):
    """The caller stopped between two results (a signal in the loop body leaves the map suspended)."""
    import ray
    from ray import cloudpickle

    from mgral.executors import make_executor

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # Ray's workers cannot import a test module
    pid_file = tmp_path / "task.pid"
    try:
        with pytest.raises(KeyboardInterrupt), make_executor("ray", workers=2) as ex:
            jobs = ex.map(_record_pid_and_sleep_or_return, ["quick", str(pid_file)])
            assert next(jobs) == (0, "quick")
            deadline = time.monotonic() + 60
            while not pid_file.exists():
                assert time.monotonic() < deadline
                time.sleep(0.1)
            raise KeyboardInterrupt
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert not ray.is_initialized()
    task = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while _alive(task) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(task), "the Ray task survived"


def _record_pid_and_sleep_or_return(out: str, _shared) -> str:
    if out == "quick":
        return out
    _record_pid_and_sleep(out, _shared)
    return out
