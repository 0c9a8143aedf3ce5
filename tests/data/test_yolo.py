"""YOLO txt reader and writer."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from mgral.data import voc, yolo
from mgral.data.records import Category, Dataset, ImageRecord, Target
from mgral.errors import DatasetError


@pytest.fixture
def yolo_dir(tmp_path, make_image):
    """images/train/a.png (40x20) with classes.txt [cat, dog]; returns a function that writes its label file."""
    make_image(tmp_path / "images" / "train" / "a.png", 40, 20)
    (tmp_path / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")

    def put(text: str, rel: str = "train/a.txt"):
        path = tmp_path / "labels" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return tmp_path

    return put


def test_minimal(yolo_dir):
    ds = yolo.read(yolo_dir("1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.5 0.5\n"))
    rec = ds["a"]
    assert (rec.file_name, rec.width, rec.height, rec.split) == ("images/train/a.png", 40, 20, "train")
    assert rec.target.boxes.tolist() == [[10, 5, 30, 15], [0, 0, 20, 10]]
    assert rec.target.labels.tolist() == [2, 1]
    assert [(c.id, c.name) for c in ds.categories] == [(1, "cat"), (2, "dog")]


def test_round_trip(small_dataset, tmp_path):
    out = tmp_path / "yolo"
    out.mkdir()
    yolo.write(small_dataset, out)
    config = yaml.safe_load((out / "data.yaml").read_text())
    splits = {"train": "images/train", "val": "images/val", "test": "images/test"}
    # no 'path': Ultralytics resolves against the yaml's folder; the unassigned image is listed (not images/,
    # which Ultralytics would read recursively, test split included)
    assert config == {**splits, "train": ["images/train", "unassigned.txt"], "names": ["dog", "cat", "bird"]}
    assert (out / "unassigned.txt").read_text() == "./images/z.png\n"
    assert (out / "labels" / "train" / "neg.txt").read_text() == ""
    assert (out / "images" / "z.png").is_file()  # split None: flat
    back = yolo.read(out)
    assert [c.name for c in back.categories] == [c.name for c in small_dataset.categories]
    src_names, names, written = small_dataset.category_names, back.category_names, voc.output_names(small_dataset)
    for rec in small_dataset:
        got = back[written[rec.id]]
        assert got.split == rec.split and (got.width, got.height) == (rec.width, rec.height)
        assert np.abs(got.target.boxes - rec.target.boxes).max(initial=0) < 1e-3
        assert [names[i] for i in got.target.labels] == [src_names[i] for i in rec.target.labels]


def test_names_from_data_yaml_dict_and_list(yolo_dir):
    root = yolo_dir("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("names: {0: person, 1: car, 2: bus}\n", encoding="utf-8")
    assert [c.name for c in yolo.read(root).categories] == ["person", "car", "bus"]
    (root / "data.yaml").write_text("nc: 2\nnames: [a, b]\n", encoding="utf-8")
    assert yolo.read(root)["a"].target.labels.tolist() == [2]
    (root / "data.yaml").write_text("nc: 2\n", encoding="utf-8")  # no names: classes.txt is used
    assert [c.name for c in yolo.read(root).categories] == ["cat", "dog"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("names: [a, b\n", r"data\.yaml: malformed YAML"),
        ("- a\n", r"data\.yaml: expected a YAML mapping with 'names', got list"),
        ("names: 3\n", r"data\.yaml: expected 'names' to be a list of class names or a \{index: name\} mapping"),
        ("names: {a: b}\n", r"expected 'names' to be a list"),
    ],
)
def test_bad_data_yaml(yolo_dir, text, match):
    root = yolo_dir("")
    (root / "data.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=match):
        yolo.read(root)


def test_no_class_names(yolo_dir):
    root = yolo_dir("")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"no class names found; expected data\.yaml"):
        yolo.read(root)


def test_negative_image_without_label_file(yolo_dir, make_image):
    root = yolo_dir("0 0.5 0.5 0.1 0.1\n")
    make_image(root / "images" / "train" / "b.png", 8, 8)
    assert len(yolo.read(root)["b"].target) == 0


def test_flat_layout_and_duplicate_stems(tmp_path, make_image):
    make_image(tmp_path / "images" / "a.png", 8, 8)
    make_image(tmp_path / "images" / "sub" / "a.jpg", 8, 8)
    (tmp_path / "labels").mkdir()
    (tmp_path / "obj.names").write_text("x\n", encoding="utf-8")
    ds = yolo.read(tmp_path)
    assert {r.id: r.split for r in ds} == {"images/a": None, "images/sub/a": None}


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("2 0.5 0.5 0.1 0.1", r"class index 2 is out of range; expected 0\.\.1 \(2 class names in .*classes\.txt\)"),
        ("-1 0.5 0.5 0.1 0.1", r"class index -1 is out of range"),
        ("0 0.5 0.5 0.1", r"expected 5 fields 'class cx cy w h', got 4 \('0 0.5 0.5 0.1'\)"),
        ("0 0.5 0.5 0.1 0.1 0.2 0.2", r"got 7"),
        ("0 0.5 abc 0.1 0.1", r"expected an integer class and 4 numbers, got '0 0.5 abc 0.1 0.1'"),
        ("0.0 0.5 0.5 0.1 0.1", r"expected an integer class"),
        ("0 0.5 0.5 nan 0.1", r"w = nan is outside \[0, 1\]"),
        ("0 20 10 4 4", r"cx = 20 is outside \[0, 1\].*40x20.*in pixels"),
        ("0 0.5 0.5 0 0.1", r"w = 0 is outside"),
        ("0 0.5 -0.1 0.1 0.1", r"cy = -0.1 is outside"),
        ("0 0.5 0.5 0.1 1.5", r"h = 1.5 is outside"),
        ("0 0.95 0.5 0.5 0.5", r"line 2: box 1 = \(28, 5, 48, 15\) lies outside the 40x20 image"),
    ],
)
def test_bad_label_lines(yolo_dir, line, match):
    root = yolo_dir(f"0 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(DatasetError, match=r"labels/train/a\.txt: image 'a' \('images/train/a.png'\)") as info:
        yolo.read(root)
    assert info.match(match)
    if "box" not in match:
        assert info.match(r"line 2 \(box 1\)")


def test_clip_boxes(yolo_dir):
    ds = yolo.read(yolo_dir("0 0.95 0.5 0.5 0.5\n"), clip_boxes=True)
    assert ds["a"].target.boxes.tolist() == [[28, 5, 40, 15]]


def test_tolerance_on_normalized_values(yolo_dir):
    ds = yolo.read(yolo_dir("0 0.5 0.5 1.0005 1.0\n"))
    np.testing.assert_allclose(ds["a"].target.boxes, [[0, 0, 40, 20]], atol=0.02)


def test_label_file_without_image(yolo_dir):
    yolo_dir("cat\ndog\n", rel="train/classes.txt")  # LabelImg puts one here: not a label file
    root = yolo_dir("0 0.5 0.5 0.1 0.1\n", rel="val/ghost.txt")
    with pytest.raises(DatasetError, match=r"labels/val/ghost\.txt: label file without an image; .*images/val/ghost"):
        yolo.read(root)


def test_unreadable_image(yolo_dir):
    root = yolo_dir("")
    (root / "images" / "train" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"broken\.jpg: image 'broken' \('images/train/broken.jpg'\): cannot read"):
        yolo.read(root)


def test_no_images_dir(tmp_path):
    with pytest.raises(DatasetError, match=r"expected a YOLO dataset directory with images/ and labels/ \(Ultra"):
        yolo.read(tmp_path)


def test_sniff(yolo_dir, tmp_path):
    assert yolo.sniff(yolo_dir("")) == "contains images/ and labels/"
    assert yolo.sniff(tmp_path / "labels") is None
    cvat = tmp_path / "cvat"
    (cvat / "obj_train_data").mkdir(parents=True)
    assert yolo.sniff(cvat) is None  # no obj.names
    (cvat / "obj.names").write_text("cat\n", encoding="utf-8")
    assert yolo.sniff(cvat) == "contains obj_train_data (CVAT YOLO 1.1)"
    roboflow = tmp_path / "roboflow"
    (roboflow / "valid" / "labels").mkdir(parents=True)
    (roboflow / "data.yaml").write_text("names: [cat]\n", encoding="utf-8")
    assert yolo.sniff(roboflow) == "contains valid/labels (Roboflow YOLO)"


@pytest.mark.parametrize("present", [{"train", "val", "test"}, {None}, {"train", "test"}, {None, "test"}])
def test_data_yaml_from_any_working_directory(tmp_path, make_image, monkeypatch, present):
    """The written data.yaml resolves as Ultralytics' check_det_dataset resolves it (a missing
    'path' is the yaml's folder): from another working directory every listed folder or list
    file exists, train and val are there, and the training images are exactly the train and
    unassigned ones."""
    images = []
    for k, split in enumerate(sorted(present, key=str)):
        make_image(tmp_path / "src" / f"{k}.png", 8, 8)
        images.append(ImageRecord(k, f"{k}.png", 8, 8, split, Target([[1, 1, 5, 5]], [1])))
    out = tmp_path / "out"
    out.mkdir()
    yolo.write(Dataset(tmp_path / "src", [Category(1, "a")], images), out)
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((out / "data.yaml").read_text())
    assert "path" not in config and {"train", "val"} <= set(config)
    for key in ("train", "val", "test"):
        for entry in [config[key]] if isinstance(config.get(key), str) else config.get(key, []):
            assert (out / entry).exists(), (key, entry)
    listed = set()
    for entry in [config["train"]] if isinstance(config["train"], str) else config["train"]:
        path = out / entry
        if path.is_dir():
            listed |= {p.name for p in path.rglob("*.png")}
        else:
            listed |= {line.rsplit("/", 1)[-1] for line in path.read_text().splitlines()}
    assert listed == {f"{r.id}.png" for r in images if r.split in ("train", None)}
    assert ("val repeats train" in (out / "data.yaml").read_text()) == ("val" not in present)


def _ultralytics_export(root, make_image, *, with_images=True):
    """labels/{train,valid}/ with a data.yaml, images beside (or, labels-only, under root/../src)."""
    image_root = root if with_images else root.parent / "src"
    make_image(image_root / "images" / "train" / "a.png", 40, 20)
    make_image(image_root / "images" / "valid" / "b.jpg", 20, 20)
    for rel, text in (("train/a.txt", "0 0.5 0.5 0.5 0.5\n"), ("valid/b.txt", "1 0.25 0.25 0.5 0.5\n")):
        (root / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels" / rel).write_text(text, encoding="utf-8")
    (root / "data.yaml").write_text("train: images/train\nval: images/valid\nnames: {0: cat, 1: dog}\n")
    return image_root


def test_valid_folder_is_the_val_split(tmp_path, make_image):
    _ultralytics_export(tmp_path, make_image)
    assert {r.id: r.split for r in yolo.read(tmp_path)} == {"a": "train", "b": "val"}


def test_labels_only_export(tmp_path, make_image):
    """labels/ without images/: each label's image is found below image_root."""
    export = tmp_path / "export"
    image_root = _ultralytics_export(export, make_image, with_images=False)
    make_image(image_root / "images" / "test" / "a.png", 8, 8)  # another 'a': the path tail train/a decides
    make_image(image_root / "unlabeled.png", 8, 8)  # no label file: not in a labels-only export
    assert yolo.sniff(export) == "contains labels/ (Ultralytics, labels only)"
    with pytest.raises(
        DatasetError,
        match=r"labels/train/a\.txt: no image for this label file: the export holds no "
        r"images \(labels only\).*pass the folder that holds the images as the image root \(--image-root",
    ):
        yolo.read(export)
    ds = yolo.read(export, image_root=image_root)
    assert ds.root == image_root
    assert {r.id: (r.file_name, r.split, r.width) for r in ds} == {
        "a": ("images/train/a.png", "train", 40),
        "b": ("images/valid/b.jpg", "val", 20),
    }
    assert ds["a"].target.boxes.tolist() == [[10, 5, 30, 15]]
    (export / "labels" / "c.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    make_image(image_root / "x" / "c.png", 8, 8)
    make_image(image_root / "y" / "c.png", 8, 8)
    with pytest.raises(DatasetError, match=r"labels/c\.txt: the images 'x/c.png', 'y/c.png' below .* all fit"):
        yolo.read(export, image_root=image_root)


def test_cvat_yolo_1_1(tmp_path, make_image):
    """CVAT's YOLO 1.1: obj.names, obj.data, train.txt and obj_<subset>_data/ with images and labels side by side."""
    (tmp_path / "obj.names").write_text("cat\ndog\n")
    (tmp_path / "obj.data").write_text(
        "classes = 2\ntrain = data/train.txt\nnames = data/obj.names\nbackup = backup/\n"
    )
    (tmp_path / "train.txt").write_text("data/obj_train_data/a.png\ndata/obj_train_data/neg.png\n")
    make_image(tmp_path / "obj_train_data" / "a.png", 40, 20)
    make_image(tmp_path / "obj_train_data" / "neg.png", 8, 8)
    make_image(tmp_path / "obj_Validation_data" / "b.png", 8, 8)
    (tmp_path / "obj_train_data" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "obj_train_data" / "neg.txt").write_text("")
    ds = yolo.read(tmp_path)
    assert {r.id: (r.file_name, r.split) for r in ds} == {
        "a": ("obj_train_data/a.png", "train"),
        "neg": ("obj_train_data/neg.png", "train"),
        "b": ("obj_Validation_data/b.png", "val"),
    }
    assert ds["a"].target.labels.tolist() == [2] and ds["a"].target.boxes.tolist() == [[10, 5, 30, 15]]


def test_roboflow_layout(tmp_path, make_image):
    """Roboflow's YOLO export: <split>/images and <split>/labels, data.yaml with train: ../train/images."""
    (tmp_path / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\nnc: 2\nnames: ['cat', 'dog']\n"
    )
    for split, name in (("train", "a"), ("valid", "b"), ("test", "c")):
        make_image(tmp_path / split / "images" / f"{name}.jpg", 20, 10)
        (tmp_path / split / "labels").mkdir()
        (tmp_path / split / "labels" / f"{name}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    ds = yolo.read(tmp_path)
    assert {r.id: (r.file_name, r.split) for r in ds} == {
        "a": ("train/images/a.jpg", "train"),
        "b": ("valid/images/b.jpg", "val"),
        "c": ("test/images/c.jpg", "test"),
    }
    (tmp_path / "valid" / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    with pytest.raises(
        DatasetError,
        match=r"valid/labels/ghost\.txt: label file without an image; expected an image "
        r"valid/images/ghost\.<jpg",
    ):
        yolo.read(tmp_path)
