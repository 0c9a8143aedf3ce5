import json
import os

import pytest

from mgral._io import OUTPUT_MARKER, atomic_directory, atomic_write_json, atomic_write_text


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
    with atomic_directory(out) as tmp:
        (tmp / "old.txt").write_text("old")
    with (
        pytest.raises(
            FileExistsError, match="out exists and is not empty; choose an empty directory or pass --overwrite"
        ),
        atomic_directory(out),
    ):
        pass
    assert (out / "old.txt").exists()
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_marks_what_it_wrote(tmp_path):
    with atomic_directory(tmp_path / "out", what="a test") as tmp:
        (tmp / "a.txt").write_text("x")
    lines = (tmp_path / "out" / OUTPUT_MARKER).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["written_by"] == "mgral"
    assert json.loads(lines[0])["what"] == "a test"


@pytest.mark.parametrize("overwrite", [False, True])
def test_atomic_directory_never_replaces_a_directory_mgral_did_not_write(tmp_path, overwrite):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    with pytest.raises(
        FileExistsError,
        match=r"thesis exists and is not empty, and was not written by mgral \(no \.mgral-output\); remove it "
        r"yourself or choose another --out",
    ):
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / "x").write_text("x")
    assert os.listdir(out) == ["chapter1.tex"] and sorted(os.listdir(tmp_path)) == ["thesis"]
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    with atomic_directory(tmp_path / "empty", overwrite=overwrite) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "empty" / "x").is_file()


def test_an_owned_directory_is_replaced_without_a_marker(tmp_path):
    # a labeling package inside a run directory, written before there were markers
    out = tmp_path / "labeling"
    out.mkdir()
    (out / "images.txt").write_text("old")
    with atomic_directory(out, overwrite=True, owned=True) as tmp:
        (tmp / "images.txt").write_text("new")
    assert (out / "images.txt").read_text() == "new" and (out / OUTPUT_MARKER).is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_atomic_directory_names_a_file_in_the_way(tmp_path, overwrite):
    (tmp_path / "out").write_text("data")
    with pytest.raises(FileExistsError, match=r"out is a file, not a directory") as info:
        with atomic_directory(tmp_path / "out", overwrite=overwrite):
            pass
    assert "overwrite" not in str(info.value)
    assert (tmp_path / "out").read_text() == "data"


def test_atomic_files_are_world_readable(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
