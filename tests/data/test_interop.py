"""Our exports read by the tools people load them into, and those tools' exports read by us.

Each test runs the tool's own reading code where it installs here: CVAT's dataset framework
``datumaro`` (COCO 1.0 and YOLO 1.1 import/export), Ultralytics' ``check_det_dataset`` and
``YOLODataset``, and ``label-studio-sdk``'s ``LabelInterface``. They are test-only
dependencies (``requirements-interop.txt``, installed by ``.ci/run``); a test skips when its
tool is missing. Never a runtime dependency (Ultralytics is AGPL).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from mgral.data import coco, yolo
from mgral.data.formats import detect_format
from mgral.data.labelstudio import labeling_config, to_tasks
from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target

INSTALL = "pip install --no-deps -r requirements-interop.txt"
CATEGORIES = [Category(3, "dog"), Category(9, "cat"), Category(5, "bird")]


@pytest.fixture
def dataset(tmp_path, make_image) -> Dataset:
    """Four images in split folders (train/val/test), one negative, boxes of every category."""
    specs = [
        (1, "images/train/a.png", 64, 48, "train", Target([[0, 0, 64, 48], [10.5, 4.25, 30.75, 20.5]], [3, 9])),
        (2, "images/train/b.png", 50, 40, "train", Target([[1, 2, 11, 12]], [5])),
        (3, "images/val/c.png", 32, 32, "val", Target([[3, 3, 9, 9], [0, 10, 32, 32]], [9, 3])),
        (4, "images/test/d.png", 40, 30, "test", Target()),
    ]
    for k, (_, rel, w, h, _, _) in enumerate(specs):
        make_image(tmp_path / "src" / rel, w, h, seed=k)
    images = [ImageRecord(i, rel, w, h, split, t) for i, rel, w, h, split, t in specs]
    return Dataset(tmp_path / "src", CATEGORIES, images)


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


# -- CVAT (datumaro) ---------------------------------------------------------------------------


def _datumaro():
    pytest.importorskip("datumaro", reason=INSTALL)
    from datumaro.components.annotation import AnnotationType, Bbox
    from datumaro.components.dataset import Dataset as DmDataset

    return DmDataset, Bbox, AnnotationType


def test_cvat_reads_our_coco_with_flat_names(dataset, tmp_path, caplog):
    """CVAT's COCO 1.0 import (datumaro ``coco_instances``): every annotation field it requires
    is there (its parser only warns on a missing ``segmentation`` where CVAT's fork fails), the
    boxes are ours, and the item names are the images' base names, as a task of uploaded files
    names its frames."""
    DmDataset, Bbox, AnnotationType = _datumaro()
    out = tmp_path / "coco"
    out.mkdir()
    coco.write(dataset, out, flat_names=True)
    # CVAT imports the uploaded file as is; PyPI datumaro wants it in an annotations/ folder
    upload = tmp_path / "upload" / "annotations" / "instances_default.json"
    upload.parent.mkdir(parents=True)
    upload.write_bytes((out / coco.ANNOTATIONS_FILE).read_bytes())
    (upload.parents[1] / "images").symlink_to(out)  # its images/<subset>/ folder: ours, flat
    with caplog.at_level(logging.WARNING):
        dm = DmDataset.import_from(str(upload), "coco_instances")
    assert not [r for r in caplog.records if "segmentation" in r.getMessage() or "iscrowd" in r.getMessage()]
    names = [c.name for c in dm.categories()[AnnotationType.label]]
    got = {
        item.id: sorted((names[a.label], *np.round(a.get_bbox(), 3)) for a in item.annotations if isinstance(a, Bbox))
        for item in dm
    }
    want = {
        _stem(rec.file_name): sorted(
            (dataset.category_names[int(label)], *np.round([x1, y1, x2 - x1, y2 - y1], 3))
            for (x1, y1, x2, y2), label in zip(rec.target.boxes.tolist(), rec.target.labels, strict=True)
        )
        for rec in dataset
    }
    assert got == want
    assert all(os.path.isfile(item.media.path) for item in dm), "the flat file names find the images"


def _dm_dataset(tmp_path, val_subset="valid"):
    """A datumaro dataset with images on disk and boxes, as CVAT would export it."""
    from PIL import Image as PILImage

    DmDataset, Bbox, AnnotationType = _datumaro()
    from datumaro.components.annotation import LabelCategories
    from datumaro.components.dataset_base import DatasetItem
    from datumaro.components.media import Image

    items = []
    for name, subset, (w, h), boxes in (
        ("frame_000", "train", (60, 40), [(5, 6, 20, 10, 0), (30, 2, 10, 30, 1)]),
        ("frame_001", "train", (60, 40), []),
        ("frame_002", val_subset, (32, 48), [(0, 0, 32, 48, 1)]),
    ):
        path = tmp_path / "cvat-src" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
        annotations = [Bbox(x, y, bw, bh, label=label) for x, y, bw, bh, label in boxes]
        items.append(DatasetItem(name, subset=subset, media=Image.from_file(path=str(path)), annotations=annotations))
    return DmDataset.from_iterable(
        items, categories={AnnotationType.label: LabelCategories.from_iterable(["car", "person"])}
    )


def _want():
    return {
        "frame_000": [("car", 5, 6, 25, 16), ("person", 30, 2, 40, 32)],
        "frame_001": [],
        "frame_002": [("person", 0, 0, 32, 48)],
    }


def _boxes(ds: Dataset) -> dict:
    names = ds.category_names
    return {
        _stem(rec.file_name): sorted(
            (names[int(label)], *np.round(box, 2).tolist())
            for box, label in zip(rec.target.boxes, rec.target.labels, strict=True)
        )
        for rec in ds
    }


@pytest.mark.parametrize("fmt", ["coco_instances", "yolo", "yolo_ultralytics"])
def test_we_read_what_cvat_exports(tmp_path, fmt):
    """The import direction: datumaro (CVAT's exporter) writes COCO 1.0, YOLO 1.1 and Ultralytics
    YOLO with images; our readers read the same boxes, and the splits (``valid`` -> ``val``)."""
    dm = _dm_dataset(tmp_path, "val" if fmt == "yolo_ultralytics" else "valid")  # that exporter allows only val
    out = tmp_path / fmt
    dm.export(str(out), fmt, save_media=True)
    if fmt == "coco_instances":
        ds = coco.read(out / "annotations" / "instances_train.json", image_root=out / "images" / "train")
    else:
        assert detect_format(out) == "yolo"
        ds = yolo.read(out)
        assert {_stem(r.file_name): r.split for r in ds} == {
            "frame_000": "train",
            "frame_001": "train",
            "frame_002": "val",
        }
    want = _want()
    assert _boxes(ds) == {k: want[k] for k in _boxes(ds)}


def test_we_read_a_labels_only_cvat_yolo_export(tmp_path):
    """CVAT's YOLO 1.1 export without images: the images are found below --image-root."""
    dm = _dm_dataset(tmp_path)
    out = tmp_path / "yolo-labels"
    dm.export(str(out), "yolo", save_media=False)
    assert not list(out.rglob("*.png"))
    with pytest.raises(Exception, match=r"no image for this label file: the export holds no images"):
        yolo.read(out)
    ds = yolo.read(out, image_root=tmp_path / "cvat-src")
    assert _boxes(ds) == _want()


# -- Ultralytics --------------------------------------------------------------------------------


@pytest.fixture
def ultralytics(tmp_path_factory, monkeypatch):
    """Ultralytics, imported without leaking into the other tests of the process: on import it
    replaces PIL's Image.open and torch.save process-wide, which the teardown puts back."""
    import PIL.Image
    import torch

    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-config")))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setattr(PIL.Image, "open", PIL.Image.open)
    monkeypatch.setattr(torch, "save", torch.save)
    return pytest.importorskip("ultralytics", reason=INSTALL)


@pytest.mark.parametrize("splits", ["all", "pool-and-test"])
def test_ultralytics_reads_our_yolo_from_another_directory(dataset, tmp_path, monkeypatch, ultralytics, splits):
    """Ultralytics' own check_det_dataset and YOLODataset read our export from another working
    directory: train/val resolve below the export, the training images are the train (and
    unassigned) ones, and every label is ours."""
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    if splits == "pool-and-test":  # the active-learning shape: an unassigned pool and a test split
        for rec in dataset:
            rec.split = "test" if rec.split == "test" else None
    out = tmp_path / "yolo"
    out.mkdir()
    yolo.write(dataset, out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = check_det_dataset(str(out / "data.yaml"), autodownload=False)
    assert data["names"] == {0: "dog", 1: "cat", 2: "bird"}
    train = YOLODataset(img_path=data["train"], data=data, task="detect", augment=False, imgsz=64)
    want = {_stem(r.file_name) for r in dataset if r.split in ("train", None)}
    assert {_stem(label["im_file"]) for label in train.labels} == want
    index = {c.id: k for k, c in enumerate(dataset.categories)}
    for label in train.labels:
        rec = next(r for r in dataset if _stem(r.file_name) == _stem(label["im_file"]))
        h, w = label["shape"]
        assert (w, h) == (rec.width, rec.height)
        cx, cy, bw, bh = np.asarray(label["bboxes"], np.float64).reshape(-1, 4).T
        boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        np.testing.assert_allclose(boxes, rec.target.boxes, atol=1e-3)
        assert label["cls"].reshape(-1).tolist() == [index[int(v)] for v in rec.target.labels]
    val = YOLODataset(img_path=data["val"], data=data, task="detect", augment=False, imgsz=64)
    assert len(val.labels) >= 1


# -- Label Studio -------------------------------------------------------------------------------


def test_label_studio_accepts_our_tasks(dataset):
    """label-studio-sdk's LabelInterface (built from our labeling config) validates every
    prediction of our tasks; region ids are unique across the tasks; data has the image."""
    pytest.importorskip("label_studio_sdk", reason=INSTALL)
    from label_studio_sdk.label_interface import LabelInterface

    dets = {
        1: Detections(boxes=[[0, 0, 64, 48]] * 3 + [[10, 4, 30, 20]], scores=[0.9, 0.8, 0.7, 0.6], labels=[3, 9, 5, 9]),
        3: Detections(boxes=[[3, 3, 9, 9]], scores=[0.95], labels=[9]),
    }
    tasks = to_tasks(
        dataset, [3, 1, 2], dets, image_ref=lambda r: "/data/local-files/?d=" + r.file_name, model_version="m"
    )
    interface = LabelInterface(labeling_config(dataset.categories))
    for task in tasks:
        assert task["data"]["image"].startswith("/data/local-files/?d=images/")
        for prediction in task.get("predictions", []):
            assert interface.validate_prediction(prediction, return_errors=True) == []
    ids = [r["id"] for t in tasks for p in t.get("predictions", []) for r in p["result"]]
    assert len(ids) == len(set(ids)) == 3  # the three labels on one box became one region
    assert [t["data"]["mgral_rank"] for t in tasks] == ["000001", "000002", "000003"]
    json.dumps(tasks)
