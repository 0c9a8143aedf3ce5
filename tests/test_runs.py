"""The run directory: config recording, cycle records (torn lines, duplicates) and the lock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from mgral.errors import RunError
from mgral.runs import RunDir, RunLock, append_cycle_record, read_cycle_records

CONFIG = {"name": "t", "cycles": 4, "detector": {"preset": "tiny", "train": {"epochs": 12}}, "seeds": (0, 1)}


# -- config.yaml and layout ---------------------------------------------------------------


def test_create_then_open_with_the_same_config(tmp_path):
    run = RunDir(tmp_path / "run").create(CONFIG)
    assert (run.path / "config.yaml").is_file()
    assert run.config()["seeds"] == [0, 1]
    assert RunDir(run.path).open(CONFIG).config() == run.config()  # a tuple equals its YAML list
    with pytest.raises(RunError, match="already holds a run .* resume it"):
        RunDir(run.path).create(CONFIG)


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    run = RunDir(tmp_path / "run").create(CONFIG)
    changed = {**CONFIG, "cycles": 6, "detector": {"preset": "tiny", "train": {"epochs": 3}}, "budget": 5}
    with pytest.raises(RunError) as info:
        run.open(changed)
    message = str(info.value)
    assert "cannot resume with a different config" in message
    assert "budget: (absent) (recorded) vs 5 (given)" in message
    assert "cycles: 4 (recorded) vs 6 (given)" in message
    assert "detector.train.epochs: 12 (recorded) vs 3 (given)" in message
    assert "name:" not in message  # only the keys that differ


def test_open_and_create_refusals(tmp_path):
    with pytest.raises(RunError, match="is not a run directory"):
        RunDir(tmp_path).open()
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(RunError, match="exists and is not empty"):
        RunDir(tmp_path).create(CONFIG)


def test_series_and_cycle_dirs(tmp_path):
    run = RunDir(tmp_path).create(CONFIG)
    cdir = run.series("entropy-max", 1).cycle(3).mkdir()
    assert cdir.path == tmp_path / "entropy-max" / "seed-1" / "cycle-3"
    assert (tmp_path / "entropy-max" / "seed-1" / "cycle-3").is_dir()
    assert cdir.model == cdir.path / "model.pt" and cdir.mgral.table == cdir.path / "mgral" / "table.csv"
    assert cdir.series.records == tmp_path / "entropy-max" / "seed-1" / "cycles.jsonl"
    assert run.shared_cycle0(1).predictions == tmp_path / "_shared" / "seed-1" / "cycle-0" / "predictions.npz"
    run.series("random", 0).mkdir()
    (tmp_path / "random" / "seed-0" / "cycle-x").mkdir()  # not a cycle directory
    assert [(s.label, s.seed) for s in run.list_series()] == [("entropy-max", 1), ("random", 0)]
    assert list(run.series("entropy-max", 1).cycles()) == [3] and run.series("random", 0).cycles() == {}
    for label in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(RunError, match="cannot name a directory"):
            run.series(label, 0)
    with pytest.raises(RunError, match="seed must be a non-negative integer"):
        run.series("random", -1)
    with pytest.raises(RunError, match="cycle must be a non-negative integer"):
        run.series("random", 0).cycle(-1)


# -- cycle records ------------------------------------------------------------------------


def test_append_and_read_records(tmp_path):
    path = tmp_path / "s" / "cycles.jsonl"
    assert read_cycle_records(path) == []
    append_cycle_record(path, {"cycle": 0, "map": 0.1, "ids": [1, "a"]})
    append_cycle_record(path, {"cycle": 1, "map": 0.2})
    assert read_cycle_records(path) == [{"cycle": 0, "map": 0.1, "ids": [1, "a"]}, {"cycle": 1, "map": 0.2}]
    assert path.read_text().count("\n") == 2


def test_torn_last_line_is_dropped_on_read_and_truncated_on_append(tmp_path, caplog):
    path = tmp_path / "cycles.jsonl"
    append_cycle_record(path, {"cycle": 0, "map": 0.1})
    with open(path, "a") as fh:
        fh.write('{"cycle": 1, "map": 0.')  # a crash mid-append
    assert read_cycle_records(path) == [{"cycle": 0, "map": 0.1}]
    assert "torn last line" in caplog.text
    append_cycle_record(path, {"cycle": 1, "map": 0.25})
    assert path.read_text() == '{"cycle": 0, "map": 0.1}\n{"cycle": 1, "map": 0.25}\n'


def test_duplicate_cycle_rule(tmp_path):
    path = tmp_path / "cycles.jsonl"
    append_cycle_record(path, {"cycle": 0, "map": 0.1})
    append_cycle_record(path, {"cycle": 1, "map": 0.2})
    append_cycle_record(path, {"cycle": 1, "map": 0.2})  # replayed after a crash: no-op
    append_cycle_record(path, {"map": 0.1, "cycle": 0})
    assert len(read_cycle_records(path)) == 2
    with pytest.raises(RunError, match="cannot append cycle 1: a different record"):
        append_cycle_record(path, {"cycle": 1, "map": 0.3})
    with pytest.raises(RunError, match="cannot append cycle 0: a different record"):
        append_cycle_record(path, {"cycle": 0, "map": 0.3})
    append_cycle_record(path, {"cycle": 3})  # gaps are allowed; order is not
    with pytest.raises(RunError, match="cannot append cycle 2: cycle 3 is already recorded"):
        append_cycle_record(path, {"cycle": 2})
    with pytest.raises(RunError, match="needs an integer 'cycle', got None"):
        append_cycle_record(path, {"map": 1.0})


def test_corrupt_complete_lines_are_refused(tmp_path):
    path = tmp_path / "cycles.jsonl"
    path.write_text('{"cycle": 0}\nnot json\n{"cycle": 2}\n')
    with pytest.raises(RunError, match="line 2 is not valid JSON"):
        read_cycle_records(path)
    path.write_text('{"cycle": 1}\n{"cycle": 0}\n')
    with pytest.raises(RunError, match="line 2: cycle 0 after cycle 1"):
        read_cycle_records(path)
    path.write_text('{"cycle": 1}\n[1, 2]\n')
    with pytest.raises(RunError, match="line 2: expected an object with an integer 'cycle'"):
        read_cycle_records(path)


# -- the lock -----------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from mgral.runs import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _hold_lock(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    proc = _hold_lock(tmp_path)
    try:
        with pytest.raises(
            RunError, match=rf"run directory {tmp_path} is in use by process {proc.pid} on .* \(started"
        ):
            with RunLock(tmp_path):
                pass
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_sigkilled_holder_leaves_no_blocking_lock(tmp_path):
    proc = _hold_lock(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert (tmp_path / "run.lock").exists()  # the stale file is still there ...
    with RunLock(tmp_path) as lock:  # ... and does not block
        assert json.loads(lock.path.read_text())["pid"] != proc.pid


def test_lock_is_exclusive_within_one_process_and_released_on_exit(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        with pytest.raises(RunError, match="is in use by process"):
            with RunLock(tmp_path):
                pass
    with run.lock():
        run.create(CONFIG)  # the lock file does not count as content
