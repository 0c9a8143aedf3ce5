"""Every writer writes what its reader reads back (issue 17).

From random datasets (awkward file and class names, duplicate names, sizes, splits, boxes,
labels, flags), each writer either refuses with a DatasetError, writing nothing, or writes a
directory that its reader reads; and read -> write -> read is then the identity: same ids,
file names, sizes, splits, boxes, labels, category names and the flags the format keeps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mgral.data import voc
from mgral.data.formats import read_dataset, write_dataset
from mgral.data.records import SPLITS, Category, Dataset, ImageRecord, Target
from mgral.errors import DatasetError

WRITERS = ("coco", "voc", "yolo")
FLAGS = {"coco": ("difficult", "iscrowd"), "voc": ("difficult",), "yolo": ()}

# characters that trip line-, word-, XML- or YAML-based formats
AWKWARD = " \t#:'\"-\\é猫\x85\u2028\x0b\x1c\x00\x7f\ufeff"
NAME = st.text(alphabet=st.sampled_from("abcxyz" + AWKWARD), min_size=1, max_size=6)
STEM = st.text(alphabet=st.sampled_from("abcdAB0123._-" + " \t#é猫\x85\\"), min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..") and "/" not in s
)
SUFFIX = st.sampled_from([".png", ".jpg", ".JPG", ".jpeg", ".PNG", "", ".gif"])
FOLDER = st.sampled_from(["", "train/", "sub dir/", "a/b/"])
SPLIT = st.sampled_from([None, *SPLITS, "all"])


@st.composite
def datasets(draw) -> tuple[list[Category], list[dict]]:
    ids = draw(st.lists(st.integers(-3, 9), min_size=1, max_size=4, unique=True))
    categories = [Category(i, draw(NAME)) for i in ids]
    if len({c.name for c in categories}) != len(categories):
        categories = [Category(c.id, f"{c.name}{k}") for k, c in enumerate(categories)]  # Dataset refuses twins
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        w, h = draw(st.integers(4, 24)), draw(st.integers(4, 24))
        boxes = []
        for _ in range(draw(st.integers(0, 3))):
            x1 = draw(st.integers(0, 4 * (w - 1))) / 4
            y1 = draw(st.integers(0, 4 * (h - 1))) / 4
            x2 = draw(st.integers(int(4 * x1) + 1, 4 * w)) / 4
            y2 = draw(st.integers(int(4 * y1) + 1, 4 * h)) / 4
            boxes.append(((x1, y1, x2, y2), draw(st.sampled_from(ids)), draw(st.booleans()), draw(st.booleans())))
        if boxes and draw(st.booleans()):
            boxes += [boxes[0]] * draw(st.integers(1, 5))  # copies of one box: a few are fine, many are not
        specs.append(
            {
                "file": draw(FOLDER) + draw(STEM) + draw(SUFFIX),
                "size": (w, h),
                "split": draw(SPLIT),
                "boxes": boxes,
                "id": draw(st.one_of(st.integers(0, 99), st.text("abc", min_size=1, max_size=3))),
            }
        )
    return categories, specs


def _build(root: Path, categories: list[Category], specs: list[dict]) -> Dataset | None:
    records, sizes = [], {}
    for n, spec in enumerate(specs):
        w, h = sizes.setdefault(spec["file"], spec["size"])  # one file, one size
        path = root / spec["file"]
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (w, h), (n * 40 % 256, 0, 0)).save(path, format="PNG")
        except (OSError, ValueError):  # a name this file system cannot hold (NUL)
            return None
        boxes = [b for b, *_ in spec["boxes"] if b[2] <= w and b[3] <= h]
        kept = [s for s in spec["boxes"] if s[0][2] <= w and s[0][3] <= h]
        target = Target(boxes, [k[1] for k in kept], difficult=[k[2] for k in kept], iscrowd=[k[3] for k in kept])
        records.append(ImageRecord(spec["id"], spec["file"], w, h, spec["split"], target))
    try:
        return Dataset(root, categories, records)
    except DatasetError:  # two records with one id
        return None


def _canon(ds: Dataset, fmt: str) -> dict:
    """What read -> write -> read must keep, keyed by image id."""
    return {
        "categories": [c.name for c in ds.categories],
        "images": {
            r.id: (
                r.file_name if fmt != "yolo" else None,  # YOLO: a split it cannot keep moves its folder
                r.width,
                r.height,
                r.split,
                r.target.boxes.tolist(),
                [ds.category_names[i] for i in r.target.labels.tolist()],
                [getattr(r.target, f).tolist() for f in FLAGS[fmt]],
            )
            for r in ds
        },
        "order": list(ds.images) if fmt != "yolo" else None,
    }


def _assert_faithful(d0: Dataset, d1: Dataset, fmt: str) -> None:
    """The first write keeps what the format can hold: sizes, standard splits, boxes (VOC: to
    whole pixels, YOLO: to 6 decimals of the size), class names, flags."""
    order = sorted(d0.categories, key=lambda c: c.id) if fmt == "voc" else d0.categories  # VOC: id order
    assert [c.name for c in d1.categories] == [c.name for c in order]
    if fmt == "coco":
        pairs = list(zip(d0, d1, strict=True))
    else:
        names = voc.output_names(d0)
        by_stem = {PurePosixPath(r.file_name).stem: r for r in d1}
        pairs = [(r, by_stem[names[r.id]]) for r in d0]
    tol = {"coco": 1e-4, "voc": 1.5, "yolo": 1e-4}[fmt]  # VOC: whole pixels, at least one wide
    for a, b in pairs:
        assert (b.width, b.height) == (a.width, a.height)
        assert b.split == (a.split if a.split in SPLITS else None)
        assert len(b.target) == len(a.target)
        assert np.abs(b.target.boxes - a.target.boxes).max(initial=0) <= tol
        assert [d1.category_names[i] for i in b.target.labels.tolist()] == [
            d0.category_names[i] for i in a.target.labels.tolist()
        ]
        for flag in FLAGS[fmt]:
            assert getattr(b.target, flag).tolist() == getattr(a.target, flag).tolist()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets())
def test_read_write_read_is_identity_for_every_writer(data):
    categories, specs = data
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d0 = _build(tmp / "src", categories, specs)
        if d0 is None:
            event("not a dataset")
            return
        for fmt in WRITERS:
            first = tmp / f"{fmt}-1"
            try:
                write_dataset(d0, first, fmt)
            except DatasetError as err:
                assert not first.exists()  # refused before anything was written
                event(f"{fmt}: refused ({str(err).split(':')[-1].split(';')[0][:40].strip()})")
                continue
            event(f"{fmt}: written and read back")
            d1 = read_dataset(first, fmt)  # whatever a writer writes, its reader reads
            _assert_faithful(d0, d1, fmt)
            write_dataset(d1, tmp / f"{fmt}-2", fmt)
            d2 = read_dataset(tmp / f"{fmt}-2", fmt)
            assert _canon(d2, fmt) == _canon(d1, fmt)


@pytest.mark.parametrize(
    ("fmt", "record", "names", "message"),
    [
        ("voc", ImageRecord(1, "my photo.png", 8, 8, "train"), ["a"], r"image 1 \('my photo\.png'\): .*white space"),
        (
            "coco",
            ImageRecord(1, "a.png", 8, 8, None, Target([[1, 1, 4, 4]], [9])),
            ["a"],
            "box 0 has label 9, which is not a category id",
        ),
        ("yolo", ImageRecord(1, "a.gif", 8, 8, None), ["a"], r"image 1 \('a\.gif'\): .*suffix"),
        ("coco", ImageRecord(1, "a.png", 8, 8, None, Target([[1, 1, 4, 4]] * 5, [1] * 5)), ["a"], "5 identical"),
        ("voc", ImageRecord(1, "a.png", 8, 8, None), ["a\x01"], r"category name 'a\\x01'"),
    ],
)
def test_writers_refuse_what_they_cannot_write_back(tmp_path, fmt, record, names, message):
    Image.new("RGB", (8, 8)).save(tmp_path / record.file_name, format="PNG")
    ds = Dataset(tmp_path, [Category(i + 1, n) for i, n in enumerate(names)], [record])
    with pytest.raises(DatasetError, match=message):
        write_dataset(ds, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_a_float_image_size_of_1e20_is_refused_before_writing(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", format="PNG")
    ds = Dataset(tmp_path, [Category(1, "a")], [ImageRecord(1, "a.png", 1e20, 8)])  # type: ignore[arg-type]
    for fmt in WRITERS:
        with pytest.raises(DatasetError, match=r"image 1 \('a\.png'\): expected 'width' to be a positive integer"):
            write_dataset(ds, tmp_path / fmt, fmt)
