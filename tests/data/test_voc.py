"""Pascal VOC XML reader and writer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mgral.data import coco, voc
from mgral.data.records import Category, Dataset, ImageRecord, Target
from mgral.errors import DatasetError


def xml(objects: str = "", *, filename: str | None = "a.jpg", width: object = 40, height: object = 30) -> str:
    name = f"<filename>{filename}</filename>" if filename is not None else ""
    return f"<annotation>{name}<size><width>{width}</width><height>{height}</height></size>{objects}</annotation>"


def obj(name: str = "cat", box: tuple = (3, 4, 12, 8), difficult: object = 0) -> str:
    corners = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{corners}</bndbox></object>"


@pytest.fixture
def devkit(tmp_path, make_image):
    """A devkit layout with the 40x30 image JPEGImages/a.jpg; returns a function that writes Annotations/a.xml."""
    make_image(tmp_path / "JPEGImages" / "a.jpg", 40, 30)
    (tmp_path / "Annotations").mkdir()

    def put(text: str, stem: str = "a"):
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(text, encoding="utf-8")
        return tmp_path

    return put


def test_devkit_minimal(devkit):
    ds = voc.read(devkit(xml(obj() + obj("dog", (1, 1, 40, 30), difficult=1))))
    rec = ds["a"]
    assert rec.file_name == "JPEGImages/a.jpg" and (rec.width, rec.height, rec.split) == (40, 30, None)
    assert rec.target.boxes.tolist() == [[2, 3, 12, 8], [0, 0, 40, 30]]
    assert [c.name for c in ds.categories] == ["cat", "dog"] and rec.target.labels.tolist() == [1, 2]
    assert rec.target.difficult.tolist() == [False, True]


def test_round_trip(small_dataset, tmp_path):
    out = tmp_path / "voc"
    out.mkdir()
    voc.write(small_dataset, out)
    back = voc.read(out)
    assert [c.name for c in back.categories] == [c.name for c in sorted(small_dataset.categories, key=lambda c: c.id)]
    names = back.category_names
    by_file = {rec.file_name: rec for rec in back}
    assert set(by_file) == {
        "JPEGImages/neg.png", "JPEGImages/val_x.JPG", "JPEGImages/train_x.png", "JPEGImages/y.png", "JPEGImages/z.png"
    }  # fmt: skip
    src_names, written = small_dataset.category_names, voc.output_names(small_dataset)
    for rec in small_dataset:
        got = back[written[rec.id]]
        assert got.split == rec.split and (got.width, got.height) == (rec.width, rec.height)
        assert np.abs(got.target.boxes - rec.target.boxes).max(initial=0) <= 1
        assert [names[i] for i in got.target.labels] == [src_names[i] for i in rec.target.labels]
        assert got.target.difficult.tolist() == rec.target.difficult.tolist()
    assert os.path.samefile(out / "JPEGImages" / "y.png", small_dataset.root / "test" / "y.png")


def test_writer_rounding_convention(tmp_path):
    target = Target([[9.6, 0.2, 20.4, 10], [-0.4, 5, 0.4, 6]], [1, 1])
    ds = Dataset(tmp_path, [Category(1, "a")], [ImageRecord(1, "a.png", 30, 10, None, target)])
    out = tmp_path / "out"
    out.mkdir()
    voc.write(ds, out, copy_images=False)
    back = voc.read(out, check_files=False)
    # xmin = round(x1) + 1, xmax = round(x2), clamped so that xmax >= xmin
    assert back["a"].target.boxes.tolist() == [[10, 0, 20, 10], [0, 5, 1, 6]]


def test_names_file_order_and_unknown_class(devkit):
    root = devkit(xml(obj("dog") + obj("cat")))
    (root / "labels.txt").write_text("dog\ncat\nbird\n", encoding="utf-8")
    ds = voc.read(root)
    assert [(c.id, c.name) for c in ds.categories] == [(1, "dog"), (2, "cat"), (3, "bird")]
    (root / "labels.txt").write_text("dog\n", encoding="utf-8")
    where = r"a\.xml: image 'a' \('JPEGImages/a.jpg'\)"
    with pytest.raises(DatasetError, match=where + r": object 1 has class 'cat', which is not in .*labels\.txt"):
        voc.read(root)


def test_devkit_splits(devkit, make_image):
    root = devkit(xml(obj()))
    make_image(root / "JPEGImages" / "b.jpg", 40, 30)
    devkit(xml(obj(), filename="b.jpg"), stem="b")
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "val.txt").write_text("a\n", encoding="utf-8")
    (main / "trainval.txt").write_text("a\nb\n", encoding="utf-8")
    ds = voc.read(root)
    assert (ds["a"].split, ds["b"].split) == ("val", None)
    (main / "train.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"val\.txt: line 1: image 'a' is also in train\.txt"):
        voc.read(root)
    (main / "train.txt").write_text("\nzz 1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"train\.txt: line 2: image 'zz' has no Annotations/zz\.xml"):
        voc.read(root)


def test_labelimg_layout_ids_splits_and_case_insensitive_extension(tmp_path, make_image):
    make_image(tmp_path / "images" / "train" / "p.JPG", 20, 10)
    make_image(tmp_path / "images" / "test" / "p.png", 20, 10)
    make_image(tmp_path / "images" / "test" / "q.jpg", 20, 10)
    p_xml = xml(obj(box=(1, 1, 5, 5)), filename="p.jpg", width=20, height=10)  # the file is p.JPG
    (tmp_path / "images" / "train" / "p.xml").write_text(p_xml)
    (tmp_path / "images" / "test" / "p.xml").write_text(xml(filename=None, width=20, height=10))
    (tmp_path / "images" / "test" / "q.xml").write_text(xml(filename="q.jpg", width=20, height=10))
    ds = voc.read(tmp_path)
    assert {r.id: (r.file_name, r.split) for r in ds} == {
        "images/train/p": ("images/train/p.JPG", "train"),
        "images/test/p": ("images/test/p.png", "test"),
        "q": ("images/test/q.jpg", "test"),
    }
    assert voc.sniff(tmp_path).startswith("contains VOC XML beside images")


def test_path_ids_and_output_names(tmp_path):
    assert voc.path_ids(["a/x.jpg", "b/x.png", "c/y.jpg"]) == ["a/x", "b/x", "y"]
    recs = [ImageRecord(i, f, 4, 4) for i, f in enumerate(["a/b_x.jpg", "a_b/x.jpg", "a/b/x.jpg"])]
    names = voc.output_names(Dataset(tmp_path, [], recs))
    assert len(set(names.values())) == 3 and names[0] == "b_x"


def test_write_missing_image(small_dataset, tmp_path):
    (small_dataset.root / "misc" / "z.png").unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=r"image 13 \('misc/z.png'\).*does not exist"):
        voc.write(small_dataset, out)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<annotation><size>", r"a\.xml: malformed XML"),
        ("", r"a\.xml: malformed XML"),
        ("<voc/>", r"a\.xml: expected the root element <annotation>, got <voc>"),
        ('<?xml version="1.0" encoding="x-no"?><annotation/>', r"a\.xml: unreadable XML \(unknown encoding: x-no\)"),
        ('<?xml version="1.0" encoding="utf-32"?><annotation/>', r"a\.xml: unreadable XML \(multi-byte encodings"),
        (xml(width=None), r"a\.xml: image 'a' \('a.jpg'\): expected <size/width> to be a finite number, got 'None'"),
        ("<annotation><filename>a.jpg</filename></annotation>", r"missing required element <size/width>"),
        (xml(width=0), r"image 'a' \('a.jpg'\): expected 'width' to be a positive integer, got 0"),
        (xml(height=-3), r"expected 'height' to be a positive integer, got -3"),
        (xml(obj(box=(12, 4, 3, 8))), r"image 'a' \('a.jpg'\): box 0 has xmax 3 < xmin 12"),
        (xml(obj() + obj(box=(1, 9, 5, 2))), r"box 1 has ymax 2 < ymin 9"),
        (xml(obj(box=(1, 1, 5, "x"))), r"object 0: expected <bndbox/ymax> to be a finite number, got 'x'"),
        (xml(obj(box=(1, 1, 5, "nan"))), r"object 0: expected <bndbox/ymax> to be a finite number, got 'nan'"),
        (xml(obj(box=(1, 1, 60, 5))), r"image 'a' \('a.jpg'\): box 0 = \(0, 0, 60, 5\) lies outside the 40x30 image"),
        (xml(obj(name=" ")), r"object 0 has no <name>"),
        (xml(obj(difficult="yes")), r"object 0: expected <difficult> to be 0 or 1, got 'yes'"),
        (xml(filename="../x.jpg"), r"image 'a' \('../x.jpg'\): file_name '../x.jpg' escapes the image root"),
        (xml(filename="/etc/passwd"), r"'/etc/passwd' is an absolute path"),
        (xml(filename="C:\\x.jpg"), r"is an absolute path"),
    ],
)
def test_bad_xml(devkit, text, match):
    with pytest.raises(DatasetError, match=match):
        voc.read(devkit(text), check_files=False)


def test_clip_boxes(devkit):
    ds = voc.read(devkit(xml(obj(box=(30, 1, 60, 5)))), clip_boxes=True)
    assert ds["a"].target.boxes.tolist() == [[29, 0, 40, 5]]


def test_entity_bomb_refused(devkit):
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        "<annotation><filename>&lol3;</filename></annotation>"
    )
    with pytest.raises(DatasetError, match=r"a\.xml: refused unsafe XML \(EntitiesForbidden"):
        voc.read(devkit(bomb))


def test_external_entity_refused(devkit):
    xxe = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>'
    with pytest.raises(DatasetError, match=r"a\.xml: refused unsafe XML"):
        voc.read(devkit(xxe))


def test_missing_image_file(devkit):
    root = devkit(xml(obj(), filename="b.jpg"), stem="b")
    with pytest.raises(DatasetError, match=r"b\.xml: image 'b' \('b.jpg'\): no image file 'JPEGImages/b.jpg'"):
        voc.read(root)
    assert voc.read(root, check_files=False)["b"].file_name == "JPEGImages/b.jpg"


def test_no_xml_files(tmp_path):
    with pytest.raises(DatasetError, match=r"no VOC \.xml annotation files found"):
        voc.read(tmp_path)


def test_shared_bccd_xml_equals_coco_json(shared_data):
    _assert_same(voc.read(shared_data / "bccd"), coco.read(shared_data / "bccd" / "annotations_coco.json"))


def test_shared_pinochle_xml_equals_coco_json(shared_data):
    root = shared_data / "pinochle-cards"
    _assert_same(voc.read(root), coco.read(root / "annotations_coco.json"))


def test_shared_voc_sample_xml_equals_coco_json(shared_data):
    root = shared_data / "detection-metrics-fixtures" / "voc-sample-100"
    from_xml = voc.read(root)
    assert [c.name for c in from_xml.categories][:3] == ["aeroplane", "bicycle", "bird"]  # voc.names order
    _assert_same(from_xml, coco.read(root / "annotations_coco.json"))


def _assert_same(from_xml: Dataset, from_json: Dataset) -> None:
    """Same images (by stem), sizes, splits, boxes (exactly), labels (by name), difficult flags."""
    assert len(from_xml) == len(from_json)
    xml_names, json_names = from_xml.category_names, from_json.category_names
    by_stem = {os.path.splitext(os.path.basename(r.file_name))[0]: r for r in from_json}
    for rec in from_xml:
        other = by_stem[rec.id]
        assert rec.file_name == other.file_name
        assert (rec.width, rec.height) == (other.width, other.height)
        assert rec.split == other.split or other.split is None
        np.testing.assert_array_equal(rec.target.boxes, other.target.boxes)
        assert [xml_names[i] for i in rec.target.labels] == [json_names[i] for i in other.target.labels]
        np.testing.assert_array_equal(rec.target.difficult, other.target.difficult)


def test_category_name_that_labels_txt_cannot_store(tmp_path):
    ds = Dataset(tmp_path, [Category(1, "a\nb")], [ImageRecord(1, "a.png", 4, 4)])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=r"category name 'a\\nb' has line breaks"):
        voc.write(ds, out, copy_images=False)
