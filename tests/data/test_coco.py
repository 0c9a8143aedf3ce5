"""COCO JSON reader and writer."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from mgral.data import coco
from mgral.data.records import Category, Dataset, ImageRecord, Target
from mgral.errors import DatasetError


@pytest.fixture
def coco_dir(tmp_path, make_image):
    """tmp_path with the 40x30 image 'a.png' that the fixture `coco_dict` refers to."""
    make_image(tmp_path / "a.png", 40, 30)
    return tmp_path


def read_obj(directory, obj, **opts):
    path = directory / "ann.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    return coco.read(path, **opts)


def test_write_json_round_trip_is_exact(small_dataset, tmp_path):
    path = tmp_path / "out" / "ann.json"
    coco.write_json(small_dataset, path)
    back = coco.read(path, image_root=small_dataset.root)
    assert back.categories == small_dataset.categories
    assert list(back.images) == list(small_dataset.images)
    for rec in small_dataset:
        got = back[rec.id]
        assert (got.file_name, got.width, got.height, got.split) == (rec.file_name, rec.width, rec.height, rec.split)
        assert got.target == rec.target


def test_to_coco_dict_fields(small_dataset):
    obj = coco.to_coco_dict(small_dataset)
    assert obj["images"][0] == {"id": 10, "file_name": "train/x.png", "width": 64, "height": 48, "split": "train"}
    assert "split" not in obj["images"][3]
    second = obj["annotations"][1]
    assert second["bbox"] == [10.5, 4.25, 20.25, 16.25]
    assert (second["iscrowd"], second["difficult"], second["category_id"]) == (0, 1, 9)
    # CVAT's COCO importer requires segmentation and iscrowd on every annotation; area is the box's
    assert (second["segmentation"], second["area"]) == ([], 20.25 * 16.25)
    assert all({"segmentation", "area", "iscrowd"} <= set(a) for a in obj["annotations"])
    assert [a["id"] for a in obj["annotations"]] == list(range(1, len(obj["annotations"]) + 1))
    json.dumps(obj)  # plain Python types only


def test_string_ids_become_1_to_n(tmp_path):
    ds = Dataset(tmp_path, [Category(1, "a")], [ImageRecord("b", "b.png", 4, 4), ImageRecord("a", "a.png", 4, 4)])
    obj = coco.to_coco_dict(ds)
    assert [i["id"] for i in obj["images"]] == [1, 2]
    assert [i["file_name"] for i in obj["images"]] == ["b.png", "a.png"]


def test_float32_coordinates_written_short(tmp_path):
    rec = ImageRecord(1, "a.png", 9, 9, None, Target([[0.1, 0.2, 0.3, 1.7]], [1]))
    ds = Dataset(tmp_path, [Category(1, "a")], [rec])
    assert coco.to_coco_dict(ds)["annotations"][0]["bbox"][:2] == [0.1, 0.2]


def test_write_links_images_and_reads_back(small_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    coco.write(small_dataset, out)
    assert (out / coco.ANNOTATIONS_FILE).is_file()
    src, dst = small_dataset.root / "val/x.JPG", out / "val/x.JPG"
    assert dst.is_file() and os.path.samefile(src, dst)
    back = coco.read(out)  # a directory with one .json file
    assert back.root == out and len(back) == len(small_dataset)


def test_flat_names(small_dataset, tmp_path):
    """file_name = the base name (as CVAT names uploaded images); refused when two images share one."""
    obj = coco.to_coco_dict(small_dataset, flat_names=True)
    assert [i["file_name"] for i in obj["images"]] == ["x.png", "x.JPG", "y.png", "z.png", "neg.png"]
    out = tmp_path / "out"
    out.mkdir()
    coco.write(small_dataset, out, flat_names=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["annotations.json", *(i["file_name"] for i in obj["images"])]
    )
    assert [r.target for r in coco.read(out)] == [r.target for r in small_dataset]
    images = [ImageRecord(1, "a/x.png", 4, 4), ImageRecord(2, "b.png", 4, 4), ImageRecord(3, "c/x.png", 4, 4)]
    with pytest.raises(
        DatasetError, match=r"cannot write flat file names: image 1 \('a/x.png'\) and image 3 \('c/x.png'\) share"
    ):
        coco.to_coco_dict(Dataset(tmp_path, [Category(1, "a")], images), flat_names=True)


def test_write_missing_image_names_it(small_dataset, tmp_path):
    (small_dataset.root / "test/y.png").unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=r"image 12 \('test/y.png'\).*does not exist"):
        coco.write(small_dataset, out)


def test_minimal_file_reads(coco_dir, coco_dict):
    ds = read_obj(coco_dir, coco_dict())
    rec = ds[1]
    assert rec.target.boxes.tolist() == [[2, 3, 12, 8]] and rec.target.labels.tolist() == [7]
    assert rec.split is None and ds.root == coco_dir


def test_malformed_json_gives_line_and_column(coco_dir):
    path = coco_dir / "ann.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"ann\.json: malformed JSON at line 2 column 12"):
        coco.read(path)


def test_not_utf8(coco_dir):
    path = coco_dir / "ann.json"
    path.write_bytes(b'{"images": "\xff\xfe"}')
    with pytest.raises(DatasetError, match=r"ann\.json"):
        coco.read(path)


@pytest.mark.parametrize("top", [[], "x", 3, None])
def test_top_level_not_an_object(coco_dir, top):
    with pytest.raises(DatasetError, match=r"ann\.json: expected a JSON object.*got"):
        read_obj(coco_dir, top)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_field(coco_dir, coco_dict, key):
    obj = coco_dict()
    del obj[key]
    with pytest.raises(DatasetError, match=rf"ann\.json: top level: missing required field '{key}'"):
        read_obj(coco_dir, obj)


def test_top_level_field_not_a_list(coco_dir, coco_dict):
    with pytest.raises(DatasetError, match=r"expected 'images' to be a list, got dict"):
        read_obj(coco_dir, coco_dict(images={}))


@pytest.mark.parametrize("key", ["id", "file_name", "width", "height"])
def test_missing_image_field(coco_dir, coco_dict, key):
    obj = coco_dict()
    del obj["images"][0][key]
    with pytest.raises(DatasetError, match=rf"ann\.json: images\[0\].*missing required field '{key}'"):
        read_obj(coco_dir, obj)


@pytest.mark.parametrize("key", ["image_id", "category_id", "bbox"])
def test_missing_annotation_field(coco_dir, coco_dict, key):
    obj = coco_dict()
    del obj["annotations"][0][key]
    with pytest.raises(DatasetError, match=rf"ann\.json: annotations\[0\].*missing required field '{key}'"):
        read_obj(coco_dir, obj)


@pytest.mark.parametrize("bad", [1.0, True, [1], "1", None])
def test_image_id_wrong_type(coco_dir, coco_dict, bad):
    obj = coco_dict()
    obj["images"][0]["id"] = bad
    with pytest.raises(DatasetError, match=rf"images\[0\]: expected 'id' to be an integer, got {re.escape(repr(bad))}"):
        read_obj(coco_dir, obj)


@pytest.mark.parametrize("bad", [1.5, True, "7", [7]])
def test_category_id_wrong_type(coco_dir, coco_dict, bad):
    obj = coco_dict()
    obj["categories"][0]["id"] = bad
    with pytest.raises(DatasetError, match=r"categories\[0\]: expected 'id' to be an integer"):
        read_obj(coco_dir, obj)


@pytest.mark.parametrize(
    "bbox", [[1, 2, 3], [1, 2, 3, "4"], "1 2 3 4", [1, 2, 3, True], [1, 2, 3, None], {"x": 1}, [1, 2, 3, 4, 5]]
)
def test_bbox_wrong_type(coco_dir, coco_dict, bbox):
    obj = coco_dict()
    obj["annotations"][0]["bbox"] = bbox
    with pytest.raises(
        DatasetError, match=r"annotations\[0\] of image 1 \('a.png'\): expected 'bbox' to be a list of 4 finite numbers"
    ):
        read_obj(coco_dir, obj)


def test_bbox_non_finite(coco_dir):
    path = coco_dir / "ann.json"
    path.write_text(
        '{"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],'
        ' "categories": [{"id": 1, "name": "a"}],'
        ' "annotations": [{"image_id": 1, "category_id": 1, "bbox": [NaN, 1, 2, 3]}]}',
        encoding="utf-8",
    )
    with pytest.raises(DatasetError, match=r"4 finite numbers.*nan"):
        coco.read(path)


def test_unknown_category_id(coco_dir, coco_dict):
    obj = coco_dict()
    obj["annotations"][0]["category_id"] = 8
    where = r"annotations\[0\] of image 1 \('a.png'\)"
    with pytest.raises(DatasetError, match=where + r": 'category_id' 8 is not one of the category ids \[7\]"):
        read_obj(coco_dir, obj)


def test_annotation_for_unknown_image(coco_dir, coco_dict):
    obj = coco_dict()
    obj["annotations"][0]["image_id"] = 99
    with pytest.raises(DatasetError, match=r"annotations\[0\]: 'image_id' 99 is not the id of any image"):
        read_obj(coco_dir, obj)


@pytest.mark.parametrize(("bbox", "what"), [([5, 5, -3, 4], "width -3 <= 0"), ([5, 5, 3, 0], "height 0 <= 0")])
def test_negative_or_zero_box_size(coco_dir, coco_dict, bbox, what):
    obj = coco_dict()
    obj["annotations"].append({"image_id": 1, "category_id": 7, "bbox": bbox})
    with pytest.raises(DatasetError, match=rf"annotations\[1\] of image 1 \('a.png'\): box 1 bbox .* has {what}"):
        read_obj(coco_dir, obj)


def test_box_outside_image_and_clip(coco_dir, coco_dict):
    obj = coco_dict()
    obj["annotations"][0]["bbox"] = [30, 20, 20, 5]  # x2 = 50 > width 40
    with pytest.raises(DatasetError, match=r"image 1 \('a.png'\): box 0 = \(30, 20, 50, 25\) lies outside the 40x30"):
        read_obj(coco_dir, obj)
    ds = read_obj(coco_dir, obj, clip_boxes=True)
    assert ds[1].target.boxes.tolist() == [[30, 20, 40, 25]]


def test_box_within_tolerance_kept(coco_dir, coco_dict):
    obj = coco_dict()
    obj["annotations"][0]["bbox"] = [-0.5, 0, 40.5, 30]
    assert read_obj(coco_dir, obj)[1].target.boxes.tolist() == [[0, 0, 40, 30]]


@pytest.mark.parametrize(("key", "value"), [("width", 0), ("height", -30), ("width", 40.5), ("height", "30")])
def test_bad_image_size(coco_dir, coco_dict, key, value):
    obj = coco_dict()
    obj["images"][0][key] = value
    with pytest.raises(DatasetError, match=rf"image 1 \('a.png'\).*expected '{key}' to be a positive integer, got"):
        read_obj(coco_dir, obj)


def test_huge_image_size(coco_dir, coco_dict):
    obj = coco_dict()
    obj["images"][0]["width"] = 10**400
    with pytest.raises(DatasetError, match=r"image 1 \('a.png'\).*expected 'width' to be a positive integer"):
        read_obj(coco_dir, obj)


def test_duplicate_image_ids(coco_dir, coco_dict):
    obj = coco_dict()
    obj["images"].append({"id": 1, "file_name": "b.png", "width": 4, "height": 4})
    with pytest.raises(DatasetError, match=r"images\[1\], image 1 \('b.png'\): duplicate image id 1 \(also 'a.png'\)"):
        read_obj(coco_dir, obj)


def test_duplicate_category_ids(coco_dir, coco_dict):
    obj = coco_dict()
    obj["categories"].append({"id": 7, "name": "dog"})
    with pytest.raises(DatasetError, match=r"categories\[1\]: duplicate category id 7"):
        read_obj(coco_dir, obj)


def test_bad_split_and_flag(coco_dir, coco_dict):
    obj = coco_dict()
    obj["images"][0]["split"] = 3
    with pytest.raises(DatasetError, match=r"image 1 \('a.png'\): expected 'split' to be a string or absent, got 3"):
        read_obj(coco_dir, obj)
    obj["images"][0]["split"] = "all"  # as in voc-sample-100's JSON: not a split mgral knows
    assert read_obj(coco_dir, obj)[1].split is None
    obj = coco_dict()
    obj["annotations"][0]["iscrowd"] = 2
    with pytest.raises(DatasetError, match=r"annotations\[0\] of image 1.*expected 'iscrowd' to be 0 or 1, got 2"):
        read_obj(coco_dir, obj)


def test_missing_image_file(coco_dir, coco_dict):
    obj = coco_dict()
    obj["images"][0]["file_name"] = "nope.png"
    with pytest.raises(DatasetError, match=r"ann\.json: 1 image file\(s\) do not exist: image 1 \('nope.png'\)"):
        read_obj(coco_dir, obj)
    assert len(read_obj(coco_dir, obj, check_files=False)) == 1


@pytest.mark.parametrize("name", ["../x.jpg", "/etc/passwd", "C:\\x.jpg", "a/../../x.jpg", ""])
def test_file_name_escaping_root(coco_dir, coco_dict, name):
    obj = coco_dict()
    obj["images"][0]["file_name"] = name
    with pytest.raises(DatasetError, match=r"ann\.json: images\[0\]"):
        read_obj(coco_dir, obj, check_files=False)


def test_flags_kept(coco_dir, coco_dict):
    obj = coco_dict()
    obj["annotations"][0].update(iscrowd=1, difficult=1)
    t = read_obj(coco_dir, obj)[1].target
    assert t.iscrowd.tolist() == [True] and t.difficult.tolist() == [True]


def test_directory_with_several_json_files(coco_dir, coco_dict):
    for name in ("a.json", "b.json"):
        (coco_dir / name).write_text(json.dumps(coco_dict()), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"found a\.json, b\.json"):
        coco.read(coco_dir)


def test_sniff(coco_dir, coco_dict):
    assert coco.sniff(coco_dir) is None
    (coco_dir / "instances.json").write_text(json.dumps(coco_dict()), encoding="utf-8")
    assert coco.sniff(coco_dir) == "contains instances.json"
    assert coco.sniff(coco_dir / "instances.json") == "instances.json is a .json file"


def test_shared_bccd_counts(shared_data):
    ds = coco.read(shared_data / "bccd" / "annotations_coco.json")
    assert len(ds) == 364 and ds.num_boxes() == 4888
    assert [c.name for c in ds.categories] == ["WBC", "RBC", "Platelets"]
    assert {s: len(ds.image_ids(s)) for s in ("train", "val", "test")} == {"train": 205, "val": 87, "test": 72}
    assert all(np.all(r.target.boxes[:, 2:] <= (r.width, r.height)) for r in ds)


def test_shared_voc_sample_difficult(shared_data):
    ds = coco.read(shared_data / "detection-metrics-fixtures" / "voc-sample-100" / "annotations_coco.json")
    assert sum(int(r.target.difficult.sum()) for r in ds) == 38
