"""Hostile inputs (issue 17): alias bombs, huge numbers, symbolic links out of the dataset,
outputs that would destroy their input, FIFOs, floods of duplicate boxes, one image in two
splits. Every refusal is a DatasetError (exit 2 from the CLI), quick, and changes nothing
outside the output directory."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

from mgral.cli import main
from mgral.data import coco, formats, labelstudio, voc, voc0712, yolo
from mgral.data.records import Category, Dataset, ImageRecord
from mgral.errors import DatasetError

# -- helpers -------------------------------------------------------------------------------------


def alias_bomb(key: str) -> str:
    """The "billion laughs" in YAML: 9 levels of 9 aliases, 9**9 strings once expanded, ~350 bytes."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
        prev = name
    lines.append(f"{key}: *i")
    return "\n".join(lines) + "\n"


def make_coco(root: Path, make_image, *, annotations=None, images=None, categories=None) -> Path:
    make_image(root / "a.png", 40, 30)
    obj = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]}
        ],
        "categories": categories or [{"id": 7, "name": "cat"}],
    }  # fmt: skip
    (root / "annotations.json").write_text(json.dumps(obj), encoding="utf-8")
    return root


def make_voc(root: Path, make_image, objects: str = "") -> Path:
    make_image(root / "JPEGImages" / "a.jpg", 40, 30)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    obj = (
        objects
        or "<object><name>cat</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>12</xmax><ymax>8</ymax></bndbox></object>"
    )
    (root / "Annotations" / "a.xml").write_text(
        f"<annotation><filename>a.jpg</filename><size><width>40</width><height>30</height></size>{obj}</annotation>"
    )
    return root


def make_yolo(root: Path, make_image, labels: str = "0 0.5 0.5 0.5 0.5\n") -> Path:
    make_image(root / "images" / "train" / "a.png", 40, 20)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train" / "a.txt").write_text(labels)
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mgral: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- 1. YAML alias bombs -------------------------------------------------------------------------------

BOMB_CHILD = """
import sys, time, tracemalloc
from mgral.cli import main
import mgral.config, mgral.data.formats, mgral.loop  # imported before the clock starts
tracemalloc.start()
start = time.perf_counter()
code = main(sys.argv[1:] if len(sys.argv) > 1 else {argv!r})
elapsed = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1]
print(f"RESULT {{code}} {{elapsed:.3f}} {{peak}}")
"""


def _run_bomb(isolated, argv: list[str]):
    proc = isolated(BOMB_CHILD.format(argv=argv), timeout=30)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result, f"the child died: rc {proc.returncode}, stderr {proc.stderr[-2000:]}"
    _, code, elapsed, peak = result[0].split()
    return int(code), float(elapsed), int(peak), proc.stderr


def test_yolo_data_yaml_alias_bomb_is_refused_quickly(tmp_path, make_image, isolated):
    root = make_yolo(tmp_path / "ds", make_image)
    (root / "data.yaml").write_text(alias_bomb("names"))
    assert len((root / "data.yaml").read_bytes()) < 400
    code, elapsed, peak, err = _run_bomb(isolated, ["info", str(root), "--from", "yolo"])
    assert code == 2 and elapsed < 1.0 and peak < 100 << 20, (code, elapsed, peak)
    assert err.startswith(f"mgral: error: {root / 'data.yaml'}: uses YAML aliases that expand to more than")
    assert "expected a plain YOLO data.yaml" in err and err.count("\n") == 1


def test_yolo_names_error_message_is_bounded(tmp_path, make_image):
    root = make_yolo(tmp_path / "ds", make_image)
    # within the alias bound, but still far too much to quote
    (root / "data.yaml").write_text("a: &a [" + ",".join(["[1, 2, 3, 4, 5, 6, 7, 8]"] * 2000) + "]\nnames: *a\n")
    with pytest.raises(DatasetError, match="expected 'names' to be a list of class names") as info:
        yolo.read(root)
    assert len(str(info.value)) < 600


def test_yolo_recursive_alias_is_refused(tmp_path, make_image):
    root = make_yolo(tmp_path / "ds", make_image)
    (root / "data.yaml").write_text("names: &a [x, *a]\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: .*refers to itself"):
        yolo.read(root)


def test_plain_aliases_still_read(tmp_path, make_image):
    root = make_yolo(tmp_path / "ds", make_image)
    (root / "data.yaml").write_text("base: &n [cat, dog]\nnames: *n\n")
    assert [c.name for c in yolo.read(root).categories] == ["cat", "dog"]


# -- 2. huge JSON integers -------------------------------------------------------------------------------

HUGE = 10**400


def _ls_export(tmp_path, **value) -> Path:
    region = {"type": "rectanglelabels", "original_width": 200, "original_height": 100}
    region["value"] = {"x": 10, "y": 10, "width": 20, "height": 40, "rotation": 0, "rectanglelabels": ["cat"]}
    for key, v in value.items():
        (region if key.startswith("original") else region["value"])[key] = v
    task = {"id": 3, "data": {"image": "/d/a.png", "mgral_id": 7}, "annotations": [{"id": 5, "result": [region]}]}
    path = tmp_path / "export.json"
    path.write_text(json.dumps([task]))
    return path


@pytest.mark.parametrize("field", ["x", "y", "width", "height", "rotation", "original_width", "original_height"])
@pytest.mark.parametrize("sign", [1, -1])
def test_label_studio_huge_integers(tmp_path, field, sign):
    path = _ls_export(tmp_path, **{field: sign * HUGE})
    with pytest.raises(DatasetError) as info:
        tasks = labelstudio.read_export(path)
        labelstudio.task_target(
            tasks[0], width=200, height=100, categories=[Category(1, "cat")], source=str(path), where="task 3"
        )
    msg = str(info.value)
    assert msg.startswith(f"{path}: task 3 (image '/d/a.png'), annotation 5, result 0: ") and field in msg
    assert len(msg) < 600


COCO_NUMERIC_FIELDS = [
    ("images", "id"),
    ("images", "width"),
    ("images", "height"),
    ("annotations", "image_id"),
    ("annotations", "category_id"),
    ("annotations", "iscrowd"),
    ("annotations", "difficult"),
    ("annotations", "id"),
    ("categories", "id"),
] + [("bbox", k) for k in range(4)]


@pytest.mark.parametrize(("where", "key"), COCO_NUMERIC_FIELDS)
@pytest.mark.parametrize(
    "value", [HUGE, -HUGE, 2**63, -(2**63) - 1, 1e308], ids=["1e400", "-1e400", "2^63", "-2^63-1", "1e308"]
)
def test_coco_huge_numbers_in_every_field(tmp_path, make_image, where, key, value):
    obj = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]}],
        "categories": [{"id": 7, "name": "cat"}],
    }
    if where == "bbox":
        obj["annotations"][0]["bbox"][key] = value
    else:
        obj[where][0][key] = value
        if (where, key) == ("images", "id"):
            obj["annotations"][0]["image_id"] = value
        if (where, key) == ("categories", "id"):
            obj["annotations"][0]["category_id"] = value
    make_image(tmp_path / "a.png", 40, 30)
    (tmp_path / "ann.json").write_text(json.dumps(obj))
    try:
        ds = coco.read(tmp_path / "ann.json")
    except DatasetError as err:
        assert len(str(err)) < 600
        return
    # accepted: then it must also survive the writers
    for name in ("coco", "voc", "yolo"):
        formats.write_dataset(ds, tmp_path / name, name)


@pytest.mark.parametrize(
    "text",
    [f"names: {{{HUGE}: cat}}\n", f"names: {{{2**63}: cat}}\n", "names: {-1: cat}\n"],
    ids=["1e400", "2^63", "-1"],
)
def test_yolo_huge_class_index_in_data_yaml(tmp_path, make_image, text):
    root = make_yolo(tmp_path / "ds", make_image, labels="")
    (root / "data.yaml").write_text(text)
    with pytest.raises(DatasetError, match=r"data\.yaml: expected 'names'") as info:
        yolo.read(root)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize(
    "label", [f"{HUGE} 0.5 0.5 0.5 0.5", f"0 {HUGE} 0.5 0.5 0.5", "0 0.5 0.5 1e400 0.5"], ids=["class", "cx", "w"]
)
def test_yolo_huge_numbers_in_labels(tmp_path, make_image, label):
    root = make_yolo(tmp_path / "ds", make_image, labels=label + "\n")
    with pytest.raises(DatasetError, match=r"a\.txt: image 'a'") as info:
        yolo.read(root)
    assert len(str(info.value)) < 800


@pytest.mark.parametrize("size", [str(HUGE), "1e20", "1e400", "3e9"], ids=["1e400-digits", "1e20", "1e400", "3e9"])
def test_voc_absurd_image_sizes(tmp_path, make_image, size):
    root = make_voc(tmp_path / "ds", make_image)
    text = (root / "Annotations" / "a.xml").read_text().replace("<width>40</width>", f"<width>{size}</width>")
    (root / "Annotations" / "a.xml").write_text(text)
    with pytest.raises(DatasetError, match=r"a\.xml: image 'a' \('a\.jpg'\): expected (<size/width>|'width') to be a"):
        voc.read(root)


@pytest.mark.parametrize("size", [1e20, 3e9, 2.0**31 + 1])
def test_coco_float_image_size_is_bounded(tmp_path, make_image, size):
    root = make_coco(tmp_path, make_image, images=[{"id": 1, "file_name": "a.png", "width": size, "height": 30}])
    with pytest.raises(DatasetError, match=r"images\[0\], image 1 \('a\.png'\): expected 'width' to be a positive"):
        coco.read(root)


# -- 3. symbolic links out of the dataset ----------------------------------------------------------------


@pytest.fixture
def outside(tmp_path, make_image) -> Path:
    """A real 40x30 image outside every dataset root of these tests."""
    return make_image(tmp_path / "outside" / "secret.png", 40, 30)


def test_coco_image_link_out_of_the_root_is_refused(tmp_path, make_image, outside, capsys):
    root = make_coco(tmp_path / "ds", make_image)
    (root / "a.png").unlink()
    (root / "a.png").symlink_to(outside)
    with pytest.raises(DatasetError, match=r"image 1 \('a\.png'\): .*symbolic link .*outside the dataset root"):
        coco.read(root)
    assert main(["convert", str(root), "--to", "yolo", "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert "--follow-links" in err and str(outside) in err
    assert not (tmp_path / "out").exists()
    # the explicit opt-in reads and copies it
    assert coco.read(root, follow_links=True)[1].width == 40
    assert main(["convert", str(root), "--to", "yolo", "--out", str(tmp_path / "out"), "--follow-links"]) == 0


def test_links_inside_the_root_are_fine(tmp_path, make_image):
    root = make_coco(tmp_path / "ds", make_image)
    (root / "real").mkdir()
    os.replace(root / "a.png", root / "real" / "a.png")
    (root / "a.png").symlink_to(Path("real") / "a.png")
    assert coco.read(root)[1].width == 40
    formats.write_dataset(coco.read(root), tmp_path / "out", "voc")
    assert voc.read(tmp_path / "out")["a"].width == 40


def test_coco_json_link_out_of_the_directory_is_refused(tmp_path, make_image):
    src = make_coco(tmp_path / "elsewhere", make_image)
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").symlink_to(src / "a.png")
    (root / "annotations.json").symlink_to(src / "annotations.json")
    with pytest.raises(DatasetError, match=r"annotations\.json: .*symbolic link .*outside the dataset root"):
        coco.read(root)


def test_voc_links_out_of_the_root_are_refused(tmp_path, make_image, outside):
    root = make_voc(tmp_path / "ds", make_image)
    (root / "JPEGImages" / "a.jpg").unlink()
    (root / "JPEGImages" / "a.jpg").symlink_to(outside)
    with pytest.raises(DatasetError, match=r"a\.jpg.*symbolic link .*outside the dataset root"):
        voc.read(root)
    assert voc.read(root, follow_links=True)["a"].width == 40


def test_voc_annotation_and_names_links_are_refused(tmp_path, make_image):
    root = make_voc(tmp_path / "ds", make_image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    xml = root / "Annotations" / "a.xml"
    (elsewhere / "a.xml").write_bytes(xml.read_bytes())
    xml.unlink()
    xml.symlink_to(elsewhere / "a.xml")
    with pytest.raises(DatasetError, match=r"a\.xml: .*symbolic link .*outside the dataset root"):
        voc.read(root)
    xml.unlink()
    xml.write_bytes((elsewhere / "a.xml").read_bytes())
    (elsewhere / "labels.txt").write_text("cat\n")
    (root / "labels.txt").symlink_to(elsewhere / "labels.txt")
    with pytest.raises(DatasetError, match=r"labels\.txt: .*symbolic link .*outside the dataset root"):
        voc.read(root)
    assert [c.name for c in voc.read(root, follow_links=True).categories] == ["cat"]


def test_directory_link_out_of_the_root_is_refused(tmp_path, make_image):
    real = tmp_path / "big-disk" / "JPEGImages"
    make_image(real / "a.jpg", 40, 30)
    root = tmp_path / "ds"
    (root / "Annotations").mkdir(parents=True)
    make_voc(tmp_path / "tmp", make_image)
    os.replace(tmp_path / "tmp" / "Annotations" / "a.xml", root / "Annotations" / "a.xml")
    (root / "JPEGImages").symlink_to(real, target_is_directory=True)
    with pytest.raises(DatasetError, match="outside the dataset root"):
        voc.read(root)
    assert voc.read(root, follow_links=True)["a"].width == 40


def test_yolo_links_out_of_the_root_are_refused(tmp_path, make_image, outside):
    root = make_yolo(tmp_path / "ds", make_image)
    (root / "images" / "train" / "b.png").symlink_to(outside)
    with pytest.raises(DatasetError, match=r"b\.png.*symbolic link .*outside the dataset root"):
        yolo.read(root)
    (root / "images" / "train" / "b.png").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "labels" / "train" / "a.txt").unlink()
    (root / "labels" / "train" / "a.txt").symlink_to(elsewhere / "a.txt")
    with pytest.raises(DatasetError, match=r"a\.txt: .*symbolic link .*outside the dataset root"):
        yolo.read(root)
    (root / "labels" / "train" / "a.txt").unlink()
    (elsewhere / "data.yaml").write_text("names: [cat]\n")
    (root / "data.yaml").symlink_to(elsewhere / "data.yaml")
    with pytest.raises(DatasetError, match=r"data\.yaml: .*symbolic link .*outside the dataset root"):
        yolo.read(root)


def test_write_refuses_a_dataset_whose_image_links_out(tmp_path, make_image, outside):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").symlink_to(outside)
    ds = Dataset(root, [Category(1, "cat")], [ImageRecord(1, "a.png", 40, 30)])
    with pytest.raises(DatasetError, match="outside the dataset root"):
        formats.write_dataset(ds, tmp_path / "out", "coco")
    assert not (tmp_path / "out").exists()


# -- 5. an output that would destroy its input --------------------------------------------------------


def test_convert_into_the_parent_of_the_source_deletes_nothing(tmp_path, make_image, capsys):
    parent = tmp_path / "ds"
    src = make_coco(parent / "src", make_image)
    (parent / "sibling").mkdir()
    (parent / "sibling" / "keep.txt").write_text("precious")
    before = sorted(str(p) for p in parent.rglob("*"))
    assert main(["convert", str(src), "--from", "coco", "--to", "yolo", "--out", str(parent), "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert "contains the input" in err
    assert sorted(str(p) for p in parent.rglob("*")) == before
    assert (parent / "sibling" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("where", ["same", "inside"])
def test_convert_onto_or_into_the_source_is_refused(tmp_path, make_image, capsys, where):
    src = make_coco(tmp_path / "src", make_image)
    out = src if where == "same" else src / "converted"
    assert main(["convert", str(src), "--to", "voc", "--out", str(out), "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert ("contains the input" if where == "same" else "inside the input") in err
    assert sorted(p.name for p in src.iterdir()) == ["a.png", "annotations.json"]


def test_convert_refuses_an_output_holding_the_image_root(tmp_path, make_image, capsys):
    images = tmp_path / "store" / "images"
    make_image(images / "a.png", 40, 30)
    ann = tmp_path / "ann" / "a.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                               "annotations": [], "categories": [{"id": 1, "name": "a"}]}))  # fmt: skip
    argv = ["convert", str(ann), "--to", "coco", "--out", str(tmp_path / "store"), "--overwrite"]
    assert main([*argv, "--image-root", str(images)]) == 2
    assert "contains the input" in one_line_error(capsys)
    assert (images / "a.png").is_file()


def test_overwrite_only_replaces_what_mgral_wrote(tmp_path, make_image, capsys):
    src = make_coco(tmp_path / "src", make_image)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["convert", str(src), "--to", "voc", "--out", str(mine), "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert "was not written by mgral (no .mgral-output)" in err and "remove it yourself or choose another --out" in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    # an output mgral wrote carries the marker and may be replaced
    out = tmp_path / "out"
    assert main(["convert", str(src), "--to", "voc", "--out", str(out)]) == 0
    marker = json.loads((out / ".mgral-output").read_text())
    assert marker["written_by"] == "mgral"
    assert main(["convert", str(src), "--to", "yolo", "--out", str(out), "--overwrite"]) == 0
    assert (out / "data.yaml").is_file() and (out / ".mgral-output").is_file()
    # and readers read mgral's outputs, marker and all
    for name in ("coco", "voc", "yolo"):
        formats.write_dataset(coco.read(src), tmp_path / f"w-{name}", name)
        assert formats.detect_format(tmp_path / f"w-{name}") == name
        assert len(formats.read_dataset(tmp_path / f"w-{name}")) == 1


def test_output_that_is_a_file_is_named_as_such(tmp_path, make_image, capsys):
    src = make_coco(tmp_path / "src", make_image)
    target = tmp_path / "out.txt"
    target.write_text("x")
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(src), "--to", "voc", "--out", str(target), *extra]) == 2
        err = one_line_error(capsys)
        assert "is a file, not a directory" in err and "--overwrite" not in err
    assert main(["synth", "--out", str(target), "--images", "3"]) == 2
    assert "is a file, not a directory" in one_line_error(capsys)
    assert target.read_text() == "x"


def test_synth_into_a_non_empty_directory_exits_2(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["synth", "--out", str(out), "--images", "3"]) == 2
    assert "not empty" in one_line_error(capsys)
    assert main(["synth", "--out", str(out), "--images", "3", "--overwrite"]) == 2
    assert "was not written by mgral" in one_line_error(capsys)
    assert (out / "keep.txt").read_text() == "x"


# -- 6. FIFOs where a file is expected ---------------------------------------------------------------


def _fifo(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def test_fifo_as_coco_json(tmp_path, deadline, capsys):
    fifo = _fifo(tmp_path / "ann.json")
    with pytest.raises(DatasetError, match=r"ann\.json: not a regular file \(a FIFO\)"):
        coco.read(fifo)
    with pytest.raises(DatasetError, match="not a regular file"):
        coco.read(tmp_path)  # the directory's only .json
    assert main(["info", str(fifo), "--from", "coco"]) == 2
    assert "not a regular file" in one_line_error(capsys)


def test_fifo_as_label_studio_export(tmp_path, deadline):
    fifo = _fifo(tmp_path / "export.json")
    with pytest.raises(DatasetError, match=r"export\.json: not a regular file"):
        labelstudio.read_export(fifo)


@pytest.mark.parametrize("rel", ["Annotations/a.xml", "labels.txt", "ImageSets/Main/train.txt"])
def test_fifo_in_voc(tmp_path, make_image, deadline, rel):
    root = make_voc(tmp_path / "ds", make_image)
    _fifo(root / rel)
    with pytest.raises(DatasetError, match=rf"{Path(rel).name}: not a regular file"):
        voc.read(root)


@pytest.mark.parametrize("rel", ["labels/train/a.txt", "data.yaml", "classes.txt"])
def test_fifo_in_yolo(tmp_path, make_image, deadline, rel):
    root = make_yolo(tmp_path / "ds", make_image)
    _fifo(root / rel)
    with pytest.raises(DatasetError, match=rf"{Path(rel).name}: not a regular file"):
        yolo.read(root)


def test_fifo_in_voc0712(tmp_path, make_image, deadline):
    for year, subset in (("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "trainval")):
        (tmp_path / year / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (tmp_path / year / "JPEGImages").mkdir(exist_ok=True)
        (tmp_path / year / "Annotations").mkdir(exist_ok=True)
        (tmp_path / year / "ImageSets" / "Main" / f"{subset}.txt").write_text("")
    _fifo(tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt")
    with pytest.raises(DatasetError, match=r"test\.txt: not a regular file"):
        voc0712.read(tmp_path)


def test_fifo_as_id_list(tmp_path, deadline):
    from mgral.data.records import read_id_list

    fifo = _fifo(tmp_path / "ids.txt")
    with pytest.raises(DatasetError, match=r"ids\.txt: not a regular file"):
        read_id_list(fifo, Dataset(tmp_path, [], []))


# -- 7. floods of boxes, one image in two splits ------------------------------------------------------


def test_label_studio_flood_of_identical_boxes_is_refused_quickly(tmp_path):
    value = {"x": 10, "y": 10, "width": 20, "height": 40, "rotation": 0, "rectanglelabels": ["cat"]}
    region = {"type": "rectanglelabels", "original_width": 200, "original_height": 100, "value": value}
    task = {
        "id": 3,
        "data": {"image": "/d/a.png", "mgral_id": 7},
        "annotations": [{"id": 5, "result": [region] * 60000}],
    }
    path = tmp_path / "export.json"
    path.write_text(json.dumps([task]))
    start = time.perf_counter()
    with pytest.raises(DatasetError) as info:
        tasks = labelstudio.read_export(path)
        labelstudio.task_target(
            tasks[0], width=200, height=100, categories=[Category(1, "cat")], source=str(path), where="task 3"
        )
    assert time.perf_counter() - start < 20  # it took 77 s when the export was decoded whole; about 2 s now
    msg = str(info.value)
    assert msg.startswith(f"{path}: task 3 (image '/d/a.png'), annotation 5:") and "60000" in msg
    assert "results 0, 1, 2" in msg and len(msg) < 800


def test_label_studio_few_duplicates_are_fine(tmp_path):
    region = _ls_export(tmp_path)
    task = json.loads(region.read_text())
    task[0]["annotations"][0]["result"] *= 2
    region.write_text(json.dumps(task))
    tasks = labelstudio.read_export(region)
    target = labelstudio.task_target(
        tasks[0], width=200, height=100, categories=[Category(1, "cat")], source="x", where="task 3"
    )
    assert len(target) == 2


def test_coco_duplicate_boxes(tmp_path, make_image):
    ann = {"image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]}
    root = make_coco(tmp_path, make_image, annotations=[ann] * 2)
    assert len(coco.read(root)[1].target) == 2
    root = make_coco(tmp_path, make_image, annotations=[{**ann, "bbox": [1, 1, 2, 2]}] + [ann] * 5)
    with pytest.raises(
        DatasetError, match=r"image 1 \('a\.png'\): boxes 1, 2, 3, 4, 5 are 5 identical boxes of category 7"
    ):
        coco.read(root)


def test_coco_too_many_boxes_in_one_image(tmp_path, make_image):
    anns = [
        {"image_id": 1, "category_id": 7, "bbox": [x % 30, x // 30 % 20, 1 + x % 7, 1 + x % 5]} for x in range(10001)
    ]
    root = make_coco(tmp_path, make_image, annotations=anns)
    with pytest.raises(DatasetError, match=r"image 1 \('a\.png'\) has more than 10000 boxes"):
        coco.read(root)


def test_voc_duplicate_boxes(tmp_path, make_image):
    obj = "<object><name>cat</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>12</xmax><ymax>8</ymax></bndbox></object>"
    assert len(voc.read(make_voc(tmp_path / "ok", make_image, obj * 3))["a"].target) == 3
    with pytest.raises(DatasetError, match=r"a\.xml: image 'a' \('a\.jpg'\): boxes 0, 1, 2, 3, 4, 5 are 6 identical"):
        voc.read(make_voc(tmp_path / "bad", make_image, obj * 6))


def test_yolo_duplicate_boxes(tmp_path, make_image):
    root = make_yolo(tmp_path / "ds", make_image, labels="0 0.5 0.5 0.5 0.5\n" * 6)
    with pytest.raises(
        DatasetError, match=r"a\.txt: image 'a' \('images/train/a\.png'\): boxes 0, 1, 2, 3, 4, 5 are 6"
    ):
        yolo.read(root)


def test_coco_one_file_in_two_splits(tmp_path, make_image):
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30, "split": "train"},
        {"id": 2, "file_name": "./a.png", "width": 40, "height": 30, "split": "test"},
    ]
    root = make_coco(tmp_path, make_image, images=images, annotations=[])
    with pytest.raises(
        DatasetError, match=r"image 2 \('\./a\.png'\): the file 'a\.png' is also image 1, in split train"
    ):
        coco.read(root, check_files=False)


def test_hard_linked_file_in_two_splits(tmp_path, make_image):
    root = make_yolo(tmp_path / "ds", make_image, labels="")
    (root / "images" / "test").mkdir()
    os.link(root / "images" / "train" / "a.png", root / "images" / "test" / "b.png")
    with pytest.raises(
        DatasetError,
        match=r"images/train/a\.png.* is the same file as .*images/test/b\.png.*, in split test; this one is in "
        r"split train",
    ):
        yolo.read(root)


def test_voc_image_listed_in_two_split_files(tmp_path, make_image):
    root = make_voc(tmp_path / "ds", make_image)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    with pytest.raises(DatasetError, match=r"test\.txt: line 1: image 'a' is also in train\.txt"):
        voc.read(root)


def test_duplicate_class_names_are_refused_in_every_format(tmp_path, make_image):
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]
    root = make_coco(tmp_path / "coco", make_image, categories=cats, annotations=[])
    with pytest.raises(DatasetError, match=r"categories\[1\]: category name 'cat' is also categories\[0\]"):
        coco.read(root)
    yroot = make_yolo(tmp_path / "yolo", make_image)
    (yroot / "data.yaml").write_text("names: [cat, dog, cat]\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: class names \['cat'\] appear more than once"):
        yolo.read(yroot)
    vroot = make_voc(tmp_path / "voc", make_image)
    (vroot / "labels.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match=r"labels\.txt: class names \['cat'\] appear more than once"):
        voc.read(vroot)
    with pytest.raises(DatasetError, match="category name 'cat'"):
        Dataset(tmp_path, [Category(1, "cat"), Category(2, "cat")], [])  # what Label Studio labels are matched to


def test_cli_info_refuses_cleanly(tmp_path, make_image, capsys):
    root = make_yolo(tmp_path / "ds", make_image)
    (root / "data.yaml").write_text(textwrap.dedent("names: [cat, cat]\n"))
    assert main(["info", str(root)]) == 2
    assert "appear more than once" in one_line_error(capsys)
