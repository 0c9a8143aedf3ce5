"""Format registry, detection, all-or-nothing writing, and round trips COCO -> VOC -> YOLO -> COCO."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import numpy as np
import pytest

from mgral.data import coco, formats, voc
from mgral.data.formats import FORMATS, convert, detect_format, read_dataset, write_dataset
from mgral.data.records import Dataset
from mgral.errors import ConfigError, DatasetError


def test_registry():
    assert FORMATS.names() == ["coco", "coco2017", "voc", "voc0712", "yolo"]  # the layouts: tests/test_planning.py
    fmt = FORMATS.get("voc")
    assert isinstance(fmt, formats.Format) and fmt.read is voc.read and fmt.name == "voc" and fmt.summary
    with pytest.raises(ConfigError, match="unknown format 'xml'; valid formats: coco, coco2017, voc, voc0712, yolo"):
        FORMATS.get("xml")


def test_detect_format_bccd_is_ambiguous(shared_data):
    found = r"bccd: found COCO \(contains annotations_coco\.json\) and VOC \(contains Annotations/\);"
    with pytest.raises(DatasetError, match=found + r".*--from coco\|voc\|yolo"):
        detect_format(shared_data / "bccd")
    assert detect_format(shared_data / "bccd" / "annotations_coco.json") == "coco"


def test_detect_format_local(small_dataset, tmp_path):
    write_dataset(small_dataset, tmp_path / "y", "yolo")
    assert detect_format(tmp_path / "y") == "yolo"
    write_dataset(small_dataset, tmp_path / "v", "voc")
    assert detect_format(tmp_path / "v") == "voc"
    write_dataset(small_dataset, tmp_path / "c", "coco")
    assert detect_format(tmp_path / "c") == "coco"
    assert detect_format(tmp_path / "c" / coco.ANNOTATIONS_FILE) == "coco"
    (tmp_path / "empty").mkdir()
    hint = r"name the format: --from coco\|voc\|yolo.*import-labels: --format coco"
    with pytest.raises(DatasetError, match=r"empty: found no dataset.*" + hint):
        detect_format(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"nowhere: no such file or directory"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"data\.yaml: cannot tell the format of a \.yaml file"):
        detect_format(tmp_path / "y" / "data.yaml")


def test_read_dataset_detects_and_passes_options(small_dataset, tmp_path):
    write_dataset(small_dataset, tmp_path / "c", "coco", copy_images=False)
    with pytest.raises(DatasetError, match="do not exist"):
        read_dataset(tmp_path / "c")
    assert len(read_dataset(tmp_path / "c", check_files=False)) == 5
    assert len(read_dataset(tmp_path / "c", "coco", image_root=small_dataset.root)) == 5
    with pytest.raises(ConfigError):
        read_dataset(tmp_path / "c", "tfrecord")


def test_write_dataset_refuses_non_empty_and_overwrites(small_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for overwrite in (False, True):  # a directory mgral did not write is never replaced
        with pytest.raises(DatasetError, match=r"out exists and is not empty, and was not written by mgral"):
            write_dataset(small_dataset, out, "voc", overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    write_dataset(small_dataset, out, "yolo")
    with pytest.raises(
        DatasetError, match=r"out exists and is not empty; choose an empty directory or pass --overwrite"
    ):
        write_dataset(small_dataset, out, "voc")
    assert write_dataset(small_dataset, out, "voc", overwrite=True) == out
    assert not (out / "data.yaml").exists() and (out / "labels.txt").is_file()


def test_write_dataset_is_all_or_nothing(small_dataset, tmp_path):
    (small_dataset.root / "misc" / "z.png").unlink()  # the 4th of 5 images: the writer fails midway
    for name in ("coco", "voc", "yolo"):
        with pytest.raises(DatasetError, match=r"image 13 \('misc/z.png'\)"):
            write_dataset(small_dataset, tmp_path / "out" / name, name)
    assert list((tmp_path / "out").iterdir()) == []


def test_convert_validates_before_writing(tmp_path, coco_dict, write_json, make_image):
    make_image(tmp_path / "a.png", 40, 30)
    obj = coco_dict()
    obj["annotations"].append({"image_id": 1, "category_id": 7, "bbox": [0, 0, 100, 5]})
    src = write_json(tmp_path / "ann.json", obj)
    with pytest.raises(DatasetError, match="lies outside"):
        convert(src, tmp_path / "out", to="voc")
    assert not (tmp_path / "out").exists()
    ds = convert(src, tmp_path / "out", to="voc", clip_boxes=True)
    assert ds.num_boxes() == 2 and voc.read(tmp_path / "out").num_boxes() == 2
    with pytest.raises(ConfigError):
        convert(src, tmp_path / "out2", to="nope")


def _chain(src, tmp_path, **read_opts) -> tuple[Dataset, Dataset]:
    """COCO -> VOC -> YOLO -> COCO; returns the VOC stage and the final COCO dataset."""
    convert(src, tmp_path / "voc", to="voc", from_="coco", **read_opts)
    convert(tmp_path / "voc", tmp_path / "yolo", to="yolo", from_="voc")
    convert(tmp_path / "yolo", tmp_path / "back", to="coco", from_="yolo")
    return read_dataset(tmp_path / "voc", "voc"), read_dataset(tmp_path / "back")


def _assert_kept(orig: Dataset, back: Dataset, *, flags: bool, category_order: list[str]) -> None:
    """Every image (by written stem), category (by name, in order), box (within 1 px), split; flags if asked."""
    assert [c.name for c in back.categories] == category_order
    keys = voc.output_names(orig)
    by_stem = {PurePosixPath(r.file_name).stem: r for r in back}
    assert sorted(by_stem) == sorted(keys.values())
    orig_names, back_names = orig.category_names, back.category_names
    for rec in orig:
        got = by_stem[keys[rec.id]]
        assert (got.width, got.height, got.split) == (rec.width, rec.height, rec.split)
        assert len(got.target) == len(rec.target)
        assert np.abs(got.target.boxes - rec.target.boxes).max(initial=0) <= 1.0
        assert [back_names[i] for i in got.target.labels] == [orig_names[i] for i in rec.target.labels]
        if flags:
            assert got.target.difficult.tolist() == rec.target.difficult.tolist()


def test_round_trip_synthetic(small_dataset, tmp_path):
    src = tmp_path / "coco"
    write_dataset(small_dataset, src, "coco")
    id_order = [c.name for c in sorted(small_dataset.categories, key=lambda c: c.id)]  # VOC keeps id order
    voc_stage, back = _chain(src, tmp_path)
    _assert_kept(small_dataset, voc_stage, flags=True, category_order=id_order)
    _assert_kept(small_dataset, back, flags=False, category_order=id_order)
    assert os.path.samefile(small_dataset.root / "test" / "y.png", tmp_path / "back" / "images" / "test" / "y.png")


@pytest.mark.parametrize("name", ["bccd", "pinochle-cards"])
def test_round_trip_shared(shared_data, tmp_path, name):
    src = shared_data / name / "annotations_coco.json"
    orig = coco.read(src)
    voc_stage, back = _chain(src, tmp_path)
    order = [c.name for c in orig.categories]
    _assert_kept(orig, voc_stage, flags=True, category_order=order)
    _assert_kept(orig, back, flags=False, category_order=order)
    # boxes built from integer VOC corners survive every format exactly (up to float32 rounding in YOLO)
    back_by_stem = {PurePosixPath(r.file_name).stem: r for r in back}
    worst = max(
        np.abs(back_by_stem[PurePosixPath(r.file_name).stem].target.boxes - r.target.boxes).max(initial=0) for r in orig
    )
    assert worst < 0.01
