"""COCO results files: round trip, and one test per refused input checking its message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evalkit import Workload, make_workload

from mgral.data.records import Category, Dataset, ImageRecord
from mgral.errors import DatasetError
from mgral.evaluation import evaluate, read_predictions, write_predictions


@pytest.mark.parametrize("str_ids", [False, True])
def test_write_then_read_gives_back_the_same_detections(tmp_path: Path, str_ids: bool) -> None:
    gt, preds = make_workload(1, Workload(str_ids=str_ids))
    path = tmp_path / "preds.json"
    write_predictions(path, preds)
    back = read_predictions(path, gt)
    assert set(back) == {i for i, d in preds.items() if len(d)}
    for image_id, det in back.items():
        np.testing.assert_array_equal(det.boxes, preds[image_id].boxes)
        np.testing.assert_array_equal(det.scores, preds[image_id].scores)
        np.testing.assert_array_equal(det.labels, preds[image_id].labels)
    assert evaluate(gt, back).to_dict() == evaluate(gt, preds).to_dict()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_reads_a_dataset_dict_whose_annotations_carry_scores(tmp_path: Path) -> None:
    gt = _gt()
    obj = {"images": [], "categories": [], "annotations": [_entry()]}
    det = read_predictions(_write(tmp_path, obj), gt)[5]
    np.testing.assert_array_equal(det.boxes, np.array([[1, 2, 11, 22]], dtype=np.float32))
    assert det.scores.tolist() == [pytest.approx(0.5)] and det.labels.tolist() == [3]


def _gt(ids: tuple = (5, 6)) -> Dataset:
    return Dataset("/x", [Category(3, "a"), Category(4, "b")], [ImageRecord(i, f"{i}.jpg", 50, 50) for i in ids])


def _entry(**overrides: object) -> dict:
    entry = {"image_id": 5, "category_id": 3, "bbox": [1, 2, 10, 20], "score": 0.5}
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


def _write(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")
    return path


def _refused(tmp_path: Path, obj: object, gt: Dataset | None = None) -> str:
    path = _write(tmp_path, obj)
    with pytest.raises(DatasetError) as info:
        read_predictions(path, gt or _gt())
    message = str(info.value)
    assert str(path) in message
    return message


def test_malformed_json(tmp_path: Path) -> None:
    message = _refused(tmp_path, '[{"image_id": 5,')
    assert "malformed JSON" in message and "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.json: cannot read the file: .*expected a COCO results list"):
        read_predictions(tmp_path / "nope.json", _gt())


def test_wrong_top_level_shape(tmp_path: Path) -> None:
    assert "expected a COCO results list" in _refused(tmp_path, {"predictions": []})
    assert "got int" in _refused(tmp_path, 3)


def test_entry_not_an_object(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(), [5, 3]])
    assert "entry 1" in message and "expected an object" in message and "[5, 3]" in message


def test_missing_fields(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(score=_DROP, bbox=_DROP)])
    assert "entry 0" in message and "missing field(s) bbox, score" in message
    message = _refused(tmp_path, {"annotations": [_entry(), _entry(score=_DROP)]})
    assert "annotations 1" in message and "missing field(s) score" in message


def test_unknown_image_id(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(), _entry(image_id=99)])
    assert "entry 1" in message and "image_id 99 is not an image of the ground truth" in message


def test_image_id_of_the_wrong_type(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(image_id="5")])
    assert "expected 'image_id' to be an integer image id" in message and "'5'" in message


def test_string_ids_are_accepted_for_string_id_datasets(tmp_path: Path) -> None:
    gt = _gt(("a", "b"))
    preds = read_predictions(_write(tmp_path, [_entry(image_id="b")]), gt)
    assert list(preds) == ["b"]
    assert "image_id 'c' is not an image" in _refused(tmp_path, [_entry(image_id="c")], gt)


def test_unknown_category_id(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(category_id=7)])
    assert "entry 0 (image 5)" in message and "category_id 7 is not a ground-truth category id [3, 4]" in message


def test_bbox_not_four_numbers(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(bbox=[1, 2, 3])])
    assert "entry 0 (image 5)" in message and "expected 'bbox' to be [x, y, width, height]" in message
    assert "[1, 2, 3]" in message
    assert "expected 'bbox'" in _refused(tmp_path, [_entry(bbox=[1, 2, "3", 4])])


def test_non_finite_bbox(tmp_path: Path) -> None:
    message = _refused(tmp_path, '[{"image_id": 5, "category_id": 3, "bbox": [1, NaN, 3, 4], "score": 0.5}]')
    assert "entry 0 (image 5)" in message and "non-finite" in message


def test_negative_size_bbox(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(), _entry(image_id=6, bbox=[10, 10, -2, 5])])
    assert "entry 1 (image 6)" in message and "negative width or height" in message and "x1, y1, x2, y2" in message


def test_score_not_a_number(tmp_path: Path) -> None:
    message = _refused(tmp_path, [_entry(score="high")])
    assert "entry 0 (image 5)" in message and "expected 'score' to be a finite number, got 'high'" in message
    assert "got True" in _refused(tmp_path, [_entry(score=True)])
    assert "got inf" in _refused(
        tmp_path, '[{"image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "score": Infinity}]'
    )


def test_huge_integers_are_refused_not_overflowed(tmp_path: Path) -> None:
    # A 400-digit integer is valid JSON but no float: it must be refused by name, not
    # escape as OverflowError (a traceback) from float() or math.isfinite().
    huge = "1" + "0" * 400
    message = _refused(tmp_path, f'[{{"image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "score": {huge}}}]')
    assert "entry 0 (image 5)" in message and "'score'" in message and "finite number" in message
    assert len(message) < 400  # the number is shown cut, not in full
    message = _refused(tmp_path, f'[{{"image_id": 5, "category_id": 3, "bbox": [1, {huge}, 3, 4], "score": 0.5}}]')
    assert "entry 0 (image 5)" in message and "bbox" in message and "non-finite" in message
    assert len(message) < 400
    message = _refused(tmp_path, [_entry(bbox=[1e300, 2, 3, 4])])
    assert "entry 0 (image 5)" in message and "float32" in message


def test_class_indices_map_to_the_ground_truth_categories(tmp_path: Path) -> None:
    # Ultralytics on a dataset that is not COCO writes the class index + 1 (Ultralytics 8.0: + 0)
    gt = _gt()
    for categories, index in (("index1", 2), ("index0", 1)):
        preds = read_predictions(_write(tmp_path, [_entry(category_id=index)]), gt, categories=categories)
        assert preds[5].labels.tolist() == [4]  # the second category, whose id is 4
    assert read_predictions(_write(tmp_path, [_entry(category_id=3)]), gt)[5].labels.tolist() == [3]  # ids as is
    path = _write(tmp_path, [_entry(category_id=0)])
    with pytest.raises(DatasetError, match=r"category_id 0 is not a class index from 1 \[1, 2\]"):
        read_predictions(path, gt, categories="index1")
