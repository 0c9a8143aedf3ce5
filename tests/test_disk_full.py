"""A full disk: every command refuses with one line naming the device and the file, loses
nothing, and the same command afterwards (``--resume`` for a run) gives the result of a run
that never ran out of space.

The end-to-end cases write onto a real, small tmpfs (mounted for the test; they skip where
this process may not mount one). The atomic writer is also checked with ENOSPC from
``/dev/full``, which needs no privileges.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from mgral import _io
from mgral.cli import main
from mgral.data.synth import SynthConfig, generate
from mgral.errors import DiskFullError
from mgral.runs import read_cycle_records

MiB = 1 << 20


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disk_full") / "digits"
    generate(out, SynthConfig(images=60, seed=0, image_size=96, max_digit_size=32))
    return out


class Tmpfs:
    """A tmpfs of a given size at ``path``; :meth:`resize` changes it in place."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the /dev/full test still runs")

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Tmpfs] = []

    def make(size: int) -> Tmpfs:
        fs = Tmpfs(tmp_path / f"fs{len(mounted)}", size)
        mounted.append(fs)
        return fs

    yield make
    for fs in mounted:
        fs.unmount()


def _one_line_disk_full(err: str, where: Path) -> None:
    assert "Traceback" not in err
    progress = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # the bars' lines, stderr being no terminal here
    lines = [line for line in err.strip().splitlines() if not progress.match(line)]
    assert len(lines) == 1 and lines[0].startswith("mgral: error: no space left on device"), err
    assert f"the file system mounted at {where}" in lines[0] and "run the same command again" in lines[0]


def test_atomic_write_on_a_full_device_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_dev_full(**kwargs):
        fd, name = real_mkstemp(**kwargs)  # the real temporary file, written through /dev/full
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(_io.tempfile, "mkstemp", mkstemp_on_dev_full)
    with pytest.raises(DiskFullError, match=rf"no space left on device .* while writing {target}"):
        _io.atomic_write_json(target, {"new": 1})
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left


def _run_config(tmp: Path, digits: Path) -> Path:
    cfg = {
        "name": "disk-full",
        "dataset": {"path": str(digits)},
        "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"epochs": 2, "batch_size": 4}},
        "strategies": [{"name": "random"}],
        "initial": {"size": 8},
        "budget": 6,
        "cycles": 2,
        "seeds": [0],
        "threads": 1,
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("cycle", "num_labeled", "selected", "mAP", "mAP50")}
        for r in read_cycle_records(run / "random" / "seed-0" / "cycles.jsonl")
    ]


def test_run_out_of_space_mid_run_then_resume_is_identical(tmp_path, digits, tmpfs, capsys):
    config = _run_config(tmp_path, digits)
    assert main(["run", str(config), "--out", str(tmp_path / "whole")]) == 0
    # A tiny model is 8.7 MB and a training checkpoint (model + optimizer) about twice that,
    # written beside the previous one: 60 MiB hold cycles 0 and 1, not cycle 2's checkpoint.
    fs = tmpfs(60 * MiB)
    run = fs.path / "run"
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run)]) == 2
    _one_line_disk_full(capsys.readouterr().err, fs.path)
    assert 0 < len(_records(run)) < 3  # it stopped part-way, keeping the cycles it finished
    fs.resize(128 * MiB)
    assert main(["run", str(config), "--out", str(run), "--resume"]) == 0
    assert _records(run) == _records(tmp_path / "whole")


def test_convert_out_of_space_leaves_nothing(tmp_path, digits, tmpfs, capsys):
    fs = tmpfs(256 * 1024)  # the 60 digits images alone are larger
    out = fs.path / "yolo"
    assert main(["convert", str(digits), "--from", "coco", "--to", "yolo", "--out", str(out)]) == 2
    _one_line_disk_full(capsys.readouterr().err, fs.path)
    assert list(fs.path.iterdir()) == []  # no partial output, no temporary directory
    fs.resize(64 * MiB)
    assert main(["convert", str(digits), "--from", "coco", "--to", "yolo", "--out", str(out)]) == 0


def _human_config(tmp: Path, digits: Path) -> Path:
    ids = tmp / "initial.txt"
    ids.write_text("".join(f"{i}\n" for i in range(1, 9)))
    cfg = {
        "name": "human",
        "dataset": {"path": str(digits)},
        "detector": {"preset": "tiny", "params": {"pretrained": False}, "train": {"iterations": 1, "batch_size": 4}},
        "strategies": [{"name": "random"}],
        "initial": {"ids_file": str(ids)},
        "budget": 6,
        "cycles": 1,
        "seeds": [0],
        "oracle": {"kind": "human"},
    }
    path = tmp / "human.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _answer(run: Path, digits: Path, out: Path) -> Path:
    """A COCO file with the true boxes of the images the pending request asks for."""
    package = json.loads(next(run.glob("random/seed-0/cycle-*/labeling/predictions_coco.json")).read_text())
    asked = {im["mgral_id"] for im in package["images"]}
    truth = json.loads((digits / "annotations.json").read_text())
    images = [im for im in package["images"] if im["mgral_id"] in asked]
    by_id = {im["mgral_id"]: im["id"] for im in images}  # the package's COCO ids of the dataset's images
    annotations = [
        {**a, "image_id": by_id[a["image_id"]], "id": n}
        for n, a in enumerate(truth["annotations"])
        if a["image_id"] in asked
    ]
    out.write_text(json.dumps({"images": images, "categories": truth["categories"], "annotations": annotations}))
    return out


def test_import_labels_out_of_space_changes_nothing(tmp_path, digits, tmpfs, capsys):
    fs = tmpfs(64 * MiB)
    run = fs.path / "run"
    assert main(["query", "--config", str(_human_config(tmp_path, digits)), "--run", str(run)]) == 0
    answer = _answer(run, digits, tmp_path / "answer.json")
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.suffix != ".pt"}
    free = os.statvfs(fs.path).f_bavail * os.statvfs(fs.path).f_frsize
    filler = fs.path / "filler"
    with open(filler, "wb") as fh:  # leave a few KiB: less than the labels the import writes
        fh.write(b"\0" * (free - 4096))
    capsys.readouterr()
    assert main(["import-labels", "--run", str(run), str(answer)]) == 2
    _one_line_disk_full(capsys.readouterr().err, fs.path)
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.suffix != ".pt"}
    assert after == before  # nothing half-imported
    filler.unlink()
    assert main(["import-labels", "--run", str(run), str(answer)]) == 0
    assert "imported labels for 6 images" in capsys.readouterr().out
