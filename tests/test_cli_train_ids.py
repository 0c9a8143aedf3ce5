"""``mgral train --train-ids`` that names test images: refused, or scored without them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mgral.cli import main
from mgral.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_ids") / "digits"
    generate(out, SynthConfig(images=40, seed=2, image_size=96, max_digit_size=32))
    return out


def _ids(digits: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for im in json.loads((digits / "annotations.json").read_text())["images"]:
        out.setdefault(im["split"], []).append(im["id"])
    return out


def _argv(digits: Path, ids_file: Path, out: Path) -> list[str]:
    argv = ["train", str(digits), "--detector", "tiny", "--iterations", "1", "--batch-size", "2"]
    return argv + ["--param", "pretrained=false", "--device", "cpu", "--train-ids", str(ids_file), "--out", str(out)]


def _train(digits: Path, ids_file: Path, out: Path, *extra: str) -> int:
    return main([*_argv(digits, ids_file, out), *extra])


def test_train_ids_with_test_images_are_refused_before_training(digits, tmp_path, capsys):
    splits = _ids(digits)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(f"{i}\n" for i in splits["train"][:4] + splits["test"][:2]))
    assert _train(digits, ids_file, tmp_path / "model") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mgral: error: {ids_file}: lists 2 image(s) of the test split")
    assert "--allow-test-ids" in err and not (tmp_path / "model").exists()


def test_allow_test_ids_scores_only_the_test_images_not_trained_on(digits, tmp_path, capsys):
    splits = _ids(digits)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(f"{i}\n" for i in splits["train"][:4] + splits["test"][:2]))
    assert _train(digits, ids_file, tmp_path / "model", "--allow-test-ids") == 0
    out = capsys.readouterr().out
    assert "2 test images are trained on" in out
    assert f"test split ({len(splits['test']) - 2} images)" in out
    report = json.loads((tmp_path / "model" / "train.json").read_text())
    assert report["test"]["num_images"] == len(splits["test"]) - 2


@pytest.mark.parametrize("line", ["1" * 5000, "²", "-0x10"])
def test_an_id_line_that_is_no_int_is_refused_in_one_short_line(digits, tmp_path, capsys, line):
    # int() refuses '²' (a unicode digit) and numbers over 4,300 digits with ValueError
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(line + "\n", encoding="utf-8")
    assert _train(digits, ids_file, tmp_path / "model") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mgral: error: {ids_file}: line 1: ") and "is not an image id" in err
    assert len(err) < 300 and err.count("\n") == 1


def test_no_progress_silences_the_bars_and_only_for_that_command(digits, tmp_path, capsys):
    splits = _ids(digits)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(f"{i}\n" for i in splits["train"][:4]))
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train ", re.M)
    assert _train(digits, ids_file, tmp_path / "a") == 0
    assert stamped.search(capsys.readouterr().err)  # off a terminal: the bar's timestamped lines
    assert main(["--no-progress", *_argv(digits, ids_file, tmp_path / "b")]) == 0
    assert not stamped.search(capsys.readouterr().err)
    assert _train(digits, ids_file, tmp_path / "c") == 0  # the switch does not outlive the command
    assert stamped.search(capsys.readouterr().err)
