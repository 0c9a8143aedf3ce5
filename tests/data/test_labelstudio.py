"""Label Studio tasks (what mgral hands over) and exports (what it reads back)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mgral.data.labelstudio import labeling_config, parse_export, read_export, task_target, to_tasks
from mgral.data.records import Category, Dataset, Detections, ImageRecord
from mgral.errors import DatasetError

CATEGORIES = [Category(1, "cat"), Category(2, 'dog "big"')]


def _dataset(tmp_path) -> Dataset:
    return Dataset(tmp_path, CATEGORIES, [ImageRecord(7, "img/a.png", 200, 100), ImageRecord("b", "img/b.png", 50, 50)])


def _region(x=10.0, y=10.0, w=20.0, h=40.0, label="cat", labels=None, **extra) -> dict:
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": labels or [label]}
    return {"type": "rectanglelabels", "original_width": 200, "original_height": 100, "value": value, **extra}


def _task(*annotations, task_id=1, data=None) -> dict:
    return {"id": task_id, "data": data or {"image": "/data/a.png", "mgral_id": 7}, "annotations": list(annotations)}


def test_tasks_hold_the_detections_above_min_score_in_percent(tmp_path):
    dataset = _dataset(tmp_path)
    dets = Detections(boxes=[[20, 10, 60, 50], [0, 0, 10, 10]], scores=[0.9, 0.2], labels=[1, 2])
    tasks = to_tasks(
        dataset, [7, "b"], {7: dets}, image_ref=lambda r: f"/srv/{r.file_name}", model_version="m1", min_score=0.5
    )
    assert tasks[0]["data"] == {
        "image": "/srv/img/a.png",
        "mgral_id": 7,
        "mgral_file": "img/a.png",
        "mgral_rank": "000001",
    }
    assert tasks[1]["data"]["mgral_rank"] == "000002"  # the selection's order: 1 = label first
    (prediction,) = tasks[0]["predictions"]
    assert prediction["model_version"] == "m1" and prediction["score"] == pytest.approx(0.9)
    (region,) = prediction["result"]
    assert region["type"] == "rectanglelabels" and (region["from_name"], region["to_name"]) == ("label", "image")
    assert (region["original_width"], region["original_height"], region["score"]) == (200, 100, pytest.approx(0.9))
    value = region["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == (10.0, 10.0, 20.0, 40.0)
    assert value["rectanglelabels"] == ["cat"]
    assert "predictions" not in tasks[1], "no detections for that image: no prediction"
    assert json.loads(json.dumps(tasks)) == tasks


def test_class_agnostic_suppression_and_unique_stable_ids(tmp_path):
    """One object offered under several labels (the practitioner's 6 labels on one box) becomes
    one region, the top-scoring label; a box of another class overlapping by IoU <= 0.7 stays;
    result ids are unique across tasks and the same on every write."""
    dataset = _dataset(tmp_path)
    same = [[20, 10, 60, 50]] * 3 + [[21, 10, 60, 50]]
    overlap = [[40, 10, 80, 50]]  # IoU 1/3 with the first box
    dets = {
        7: Detections(boxes=same + overlap, scores=[0.6, 0.9, 0.7, 0.8, 0.5], labels=[1, 2, 1, 1, 1]),
        "b": Detections(boxes=[[1, 1, 20, 20], [30, 30, 40, 40]], scores=[0.9, 0.8], labels=[1, 2]),
    }
    tasks = to_tasks(dataset, [7, "b"], dets, image_ref=str, model_version="m")
    regions = tasks[0]["predictions"][0]["result"]
    assert [(r["value"]["rectanglelabels"], r["score"]) for r in regions] == [(['dog "big"'], 0.9), (["cat"], 0.5)]
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(0.7)
    ids = [r["id"] for t in tasks for r in t["predictions"][0]["result"]]
    assert len(ids) == len(set(ids)) == 4
    again = to_tasks(dataset, [7, "b"], dets, image_ref=str, model_version="m")
    assert [r["id"] for t in again for r in t["predictions"][0]["result"]] == ids
    kept = to_tasks(dataset, [7], dets, image_ref=str, model_version="m", nms_iou=1.0)[0]["predictions"][0]["result"]
    assert len(kept) == 5


def test_labeling_config_lists_every_category(tmp_path):
    root = ET.fromstring(labeling_config(CATEGORIES))
    assert root.find("Image").get("name") == "image" and root.find("Image").get("value") == "$image"
    rect = root.find("RectangleLabels")
    assert (rect.get("name"), rect.get("toName")) == ("label", "image")
    assert [label.get("value") for label in rect.findall("Label")] == ["cat", 'dog "big"']


def test_task_boxes_come_back_in_pixels(tmp_path):
    dataset = _dataset(tmp_path)
    dets = Detections(boxes=[[20.5, 10, 60, 50.25]], scores=[0.9], labels=[2])
    tasks = to_tasks(dataset, [7], {7: dets}, image_ref=str, model_version="m")
    export = [{**tasks[0], "id": 3, "annotations": [{"id": 1, "result": tasks[0]["predictions"][0]["result"]}]}]
    (task,) = parse_export(export, source="x.json")
    target = task_target(task, width=200, height=100, categories=CATEGORIES, source="x.json", where="t")
    assert np.allclose(target.boxes, [[20.5, 10, 60, 50.25]], atol=1e-2) and target.labels.tolist() == [2]


def test_labeled_skipped_and_unlabeled_tasks():
    export = [
        _task({"id": 1, "result": [_region(), {"type": "choices", "value": {"choices": ["ok"]}}]}, task_id=1),
        _task({"id": 1, "result": []}, task_id=2),  # labeled: nothing in the image
        _task({"id": 1, "was_cancelled": True, "result": []}, task_id=3),  # Skip
        _task(task_id=4),  # not labeled yet
        {"id": 5, "data": {"image": "/d/e.png"}, "predictions": [{"result": [_region()]}]},
        _task({"id": 1, "result": [_region()], "ground_truth": True}, {"id": 2, "result": []}, task_id=6),
        _task({"id": 1, "result": [_region()]}, {"id": 2, "result": []}, task_id=7),  # the latest
        _task({"id": 1, "result": [_region()]}, {"id": 2, "was_cancelled": True}, task_id=8),
    ]
    tasks = parse_export(export, source="x.json")
    assert [t.status for t in tasks] == ["labeled", "labeled", "skipped", "unlabeled", "unlabeled"] + ["labeled"] * 3
    assert [len(t.regions) for t in tasks] == [1, 0, 0, 0, 0, 1, 0, 1]
    assert (tasks[0].mgral_id, tasks[4].image, tasks[4].mgral_id) == (7, "/d/e.png", None)
    assert tasks[5].annotation_id == 1 and tasks[6].annotation_id == 2


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ({"images": [], "annotations": []}, r"x.json: expected a Label Studio JSON export .* pass --format coco"),
        ([{"image": "/a.png", "label": []}], r"x.json: task \[0\]: expected an object with 'data'.*not JSON-MIN"),
        (
            [_task({"id": 4, "result": [_region(), {"type": "polygonlabels", "value": {}}]}, task_id=9)],
            r"x.json: task 9 \(image '/data/a.png'\), annotation 4, result 1: region type 'polygonlabels'",
        ),
        (
            [_task({"id": 4, "result": [{**_region(), "value": {**_region()["value"], "rotation": 30}}]})],
            r"annotation 4, result 0: the rectangle is rotated by 30 degrees",
        ),
        (
            [_task({"id": 4, "result": [_region(labels=["cat", "dog"])]})],
            r"result 0: expected value.rectanglelabels to hold exactly one class name",
        ),
        ([_task({"id": 4, "result": [_region(x="1")]})], r"result 0: expected value.x to be a finite number"),
        ([_task({"id": 4, "result": "no"})], r"annotation 4: expected 'result' to be a list"),
    ],
)
def test_malformed_exports_are_refused_naming_task_and_result(export, message):
    with pytest.raises(DatasetError, match=message):
        parse_export(export, source="x.json")


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (_region(label="bird"), r"x.json: task 1 .* = image 7, result 0: class 'bird' is not a category .*\['cat'"),
        (_region(x=95.0), r"x.json: task 1 .* = image 7, result 0: box 0 = \(190, 10, 230, 50\) lies outside the 200x"),
        (
            {**_region(), "original_width": 400},
            r"result 0: the box was drawn on a 400x100 image, but the image is 200x100",
        ),
    ],
)
def test_boxes_are_checked_against_the_dataset(region, message):
    (task,) = parse_export([_task({"id": 1, "result": [region]})], source="x.json")
    where = f"{task.describe()} = image 7"
    with pytest.raises(DatasetError, match=message):
        task_target(task, width=200, height=100, categories=CATEGORIES, source="x.json", where=where)
    if "outside" in message:  # unless clipped
        target = task_target(
            task, width=200, height=100, categories=CATEGORIES, source="x.json", where=where, clip=True
        )
        assert target.boxes.tolist() == [[190, 10, 200, 50]]


def test_read_export_names_the_file_of_malformed_json(tmp_path):
    path = tmp_path / "export.json"
    path.write_text("[{")
    with pytest.raises(DatasetError, match=rf"{path}: malformed JSON at line 1"):
        read_export(path)
    path.write_text(json.dumps([_task({"id": 1, "result": [_region()]})]))
    assert read_export(path)[0].regions[0].label == "cat"


def test_an_export_is_checked_task_by_task(tmp_path):
    # a flood in the first task is refused before the rest of the file is decoded: here the
    # rest is not even JSON, and the refusal is still the flood's
    value = {"x": 10, "y": 10, "width": 20, "height": 40, "rotation": 0, "rectanglelabels": ["cat"]}
    region = {"type": "rectanglelabels", "original_width": 200, "original_height": 100, "value": value}
    task = {"id": 3, "data": {"image": "/d/a.png"}, "annotations": [{"id": 5, "result": [region] * 20}]}
    path = tmp_path / "export.json"
    path.write_text("[\n" + json.dumps(task) + ",\n{not json at all")
    with pytest.raises(
        DatasetError, match=r"task 3 \(image '/d/a.png'\), annotation 5: results 0, 1, .* are 20 identical"
    ):
        read_export(path)
    task["annotations"][0]["result"] = [region]
    path.write_text("[\n" + json.dumps(task) + ",\n{not json at all")
    with pytest.raises(DatasetError, match=r"export\.json: malformed JSON at line 3 column 2: "):
        read_export(path)
    path.write_text("\ufeff [" + json.dumps(task) + " , " + json.dumps({**task, "id": 4}) + "]\n")
    assert [t.task_id for t in read_export(path)] == [3, 4]
