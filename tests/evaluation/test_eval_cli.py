"""``mgral evaluate`` scored against the right images: ``--split``, and a loud warning when
the predictions cover only part of the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgral.cli import main
from mgral.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_cli") / "digits"
    generate(out, SynthConfig(images=40, seed=1, image_size=96, max_digit_size=32))
    return out


def _perfect(digits: Path, tmp_path: Path, split: str | None) -> Path:
    obj = json.loads((digits / "annotations.json").read_text())
    ids = {im["id"] for im in obj["images"] if split is None or im["split"] == split}
    preds = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in obj["annotations"]
        if a["image_id"] in ids
    ]
    path = tmp_path / f"perfect-{split}.json"
    path.write_text(json.dumps(preds))
    return path


def test_predictions_of_one_split_warn_without_split_and_score_right_with_it(digits, tmp_path, capsys):
    pred = _perfect(digits, tmp_path, "test")
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--json"]) == 0
    captured = capsys.readouterr()
    unscoped = json.loads(captured.out)
    assert unscoped["mAP"] < 0.5  # every train/val image's boxes count as missed
    assert captured.err.startswith(f"mgral: warning: {pred}: predictions cover only ")
    assert "pass --split test" in captured.err

    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--json", "--split", "test"]) == 0
    captured = capsys.readouterr()
    scoped = json.loads(captured.out)
    assert scoped["mAP"] == pytest.approx(1.0) and captured.err == ""
    assert scoped["num_images"] == scoped["images_with_predictions"] < unscoped["num_images"]


def test_split_leaves_out_predictions_of_other_splits_and_says_so(digits, tmp_path, capsys):
    pred = _perfect(digits, tmp_path, None)
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--json", "--split", "val,test"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["mAP"] == pytest.approx(1.0)
    assert "predicted images are outside split val,test" in captured.err and "they are left out" in captured.err
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred)]) == 0
    assert "warning" not in capsys.readouterr().err  # predictions for every image: nothing to say


def test_unknown_split_exits_2_listing_the_splits(digits, tmp_path, capsys):
    pred = _perfect(digits, tmp_path, "test")
    assert main(["evaluate", "--gt", str(digits), "--pred", str(pred), "--split", "tset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgral: error: --split tset: the ground truth has no image in that split")
    assert "test" in err and "train" in err


def test_ultralytics_results_score_by_file_stem(digits, tmp_path, capsys):
    # Ultralytics' save_json names images by file stem (an int when numeric), not by id: the
    # ground truth here numbers its images from 1001 while the files are 00001.png, ...
    obj = json.loads((digits / "annotations.json").read_text())
    for im in obj["images"]:
        im["id"] += 1000
    for a in obj["annotations"]:
        a["image_id"] += 1000
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(obj))
    stem = {im["id"]: int(Path(im["file_name"]).stem) for im in obj["images"]}
    preds = [
        {"image_id": stem[a["image_id"]], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in obj["annotations"]
    ]
    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps(preds))
    argv = ["evaluate", "--gt", str(gt), "--image-root", str(digits), "--pred", str(pred)]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == pytest.approx(1.0)
    assert main([*argv, "--match", "id"]) == 2
    assert "is not an image of the ground truth" in capsys.readouterr().err
