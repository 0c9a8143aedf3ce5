import json
import os

import pytest

from mgral._io import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["state.json"]


def test_failed_write_keeps_old_content(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    class Boom:  # json.dumps fails half-way through serialising
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": Boom()})
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_directory_commits_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_refuses_non_empty_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_directory(out):
        pass
    assert (out / "old.txt").exists()
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_files_are_world_readable(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
