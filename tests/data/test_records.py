import numpy as np
import pytest

from mgral.data.records import (
    Category,
    Dataset,
    Detections,
    ImageRecord,
    Target,
    check_box,
    check_image_size,
    safe_relative_path,
)
from mgral.errors import DatasetError


def test_empty_target_and_detections_have_torchvision_shapes():
    t, d = Target(), Detections()
    assert t.boxes.shape == (0, 4) and t.boxes.dtype == np.float32
    assert t.labels.shape == (0,) and t.labels.dtype == np.int64
    assert t.difficult.dtype == bool and t.iscrowd.shape == (0,)
    assert d.boxes.shape == (0, 4) and d.scores.dtype == np.float32 and d.labels.dtype == np.int64


def test_target_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        Target(boxes=[[0, 0, 1, 1], [1, 1, 2, 2]], labels=[1])


def test_dataset_rejects_duplicate_image_ids_naming_both_files():
    recs = [ImageRecord(7, "a.jpg", 10, 10), ImageRecord(7, "b.jpg", 10, 10)]
    with pytest.raises(DatasetError, match=r"duplicate image id 7 \('b.jpg' and 'a.jpg'\)"):
        Dataset(".", [Category(1, "x")], recs)


def test_dataset_split_subset_and_lookup():
    recs = [
        ImageRecord(1, "a.jpg", 10, 10, "train", Target([[0, 0, 5, 5]], [1])),
        ImageRecord("b", "b.jpg", 10, 10, "test"),
        ImageRecord(3, "c.jpg", 10, 10, "val", Target([[0, 0, 5, 5], [1, 1, 3, 3]], [1, 1])),
    ]
    ds = Dataset("/root", [Category(1, "x")], recs)
    assert ds.image_ids("train") == [1]
    assert ds.image_ids(["train", "val"]) == [1, 3]
    assert ds.num_boxes() == 3
    sub = ds.subset([3, "b"])
    assert list(sub.images) == [3, "b"] and sub.num_boxes() == 2
    assert str(ds.image_path("b")) == "/root/b.jpg"
    with pytest.raises(KeyError, match="image id 99 is not in this dataset"):
        ds[99]


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("../x.jpg", "escapes the image root"),
        ("a/../../x.jpg", "escapes"),
        ("/etc/passwd", "absolute path"),
        ("C:\\x.jpg", "absolute path"),
        ("", "non-empty relative path"),
        (5, "non-empty relative path"),
    ],
)
def test_safe_relative_path_refuses_escapes(name, fragment):
    with pytest.raises(DatasetError, match=fragment) as err:
        safe_relative_path(name, source="ann.json", where="image 3 ('x')")
    assert str(err.value).startswith("ann.json: image 3 ('x'): ")


def test_safe_relative_path_normalizes_windows_separators():
    assert safe_relative_path("imgs\\a\\b.jpg", source="s", where="w") == "imgs/a/b.jpg"
    assert safe_relative_path("imgs/./b.jpg", source="s", where="w") == "imgs/b.jpg"


def test_check_box_messages_name_file_image_and_index():
    kw = dict(width=100, height=50, source="ann.json", where="image 17 ('a.jpg')", index=3)
    with pytest.raises(DatasetError, match=r"ann.json: image 17 \('a.jpg'\): box 3 has x2 <= x1 \(12 <= 40\)"):
        check_box([40, 0, 12, 10], **kw)
    with pytest.raises(DatasetError, match=r"box 3 = \(0, 0, 130, 10\) lies outside the 100x50 image.*--clip-boxes"):
        check_box([0, 0, 130, 10], **kw)
    with pytest.raises(DatasetError, match="non-finite"):
        check_box([0, 0, float("nan"), 10], **kw)
    assert check_box([-5, 0, 130, 10], clip=True, **kw) == (0.0, 0.0, 100.0, 10.0)
    assert check_box([-0.5, 0, 100.5, 50], **kw) == (0.0, 0.0, 100.0, 50.0)  # within rounding tolerance


@pytest.mark.parametrize("w, h", [(0, 10), (-3, 10), (10, 2.5), (True, 10), ("10", 10), (float("inf"), 3)])
def test_check_image_size_refuses_bad_sizes(w, h):
    with pytest.raises(DatasetError, match="expected '(width|height)' to be a positive integer"):
        check_image_size(w, h, source="s", where="image 1")
