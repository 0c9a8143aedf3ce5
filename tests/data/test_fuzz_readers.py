"""Fuzzing the readers: whatever the input, the only exception out of a reader is DatasetError.

Each test lets a reader either return a dataset or raise DatasetError; any other exception
propagates and fails the test (hypothesis then shrinks it to a minimal input). Besides raw
bytes and arbitrary values, the structured tests start from a valid dataset and apply a
few random mutations, so that most examples get past the first check and reach the deep
ones (boxes, ids, flags).
"""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mgral.data import coco, voc, yolo
from mgral.data.records import Dataset
from mgral.errors import DatasetError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def accepts_or_refuses(read, *args, **kwargs) -> None:
    try:
        result = read(*args, **kwargs)
    except DatasetError:
        return
    assert isinstance(result, Dataset)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A VOC devkit, a YOLO directory (with a real 16x8 image) and a JSON path, rewritten per example."""
    voc_root = tmp_path_factory.mktemp("voc")
    (voc_root / "Annotations").mkdir()
    yolo_root = tmp_path_factory.mktemp("yolo")
    (yolo_root / "images").mkdir()
    (yolo_root / "labels").mkdir()
    Image.new("RGB", (16, 8)).save(yolo_root / "images" / "a.png")
    (yolo_root / "classes.txt").write_text("a\nb\n", encoding="utf-8")
    return {"voc": voc_root, "yolo": yolo_root, "json": tmp_path_factory.mktemp("json") / "ann.json"}


# -- random bytes -------------------------------------------------------------------------------

JSONISH = st.sampled_from([b"{", b"}", b"[", b"]", b'"images"', b'"bbox"', b":", b",", b"1", b"-1e999", b"null", b'"'])
XMLISH = st.sampled_from(
    [b"<annotation>", b"</annotation>", b"<object>", b"</object>", b"<size><width>4</width><height>4</height></size>",
     b"<name>a</name>", b"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax><ymax>9</ymax></bndbox>", b"<!DOCTYPE a [",
     b'<!ENTITY e "x">', b"&e;", b"]>", b"<filename>a.jpg</filename>", b"\xff"]
)  # fmt: skip
YOLO_TOKENS = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "0.5", "1.0005", "1e400", "nan", "inf", "x", "0x1", "1_0", "\u0661", "\n"]),
    st.floats(-0.1, 1.1).map(str),
)
YOLO_LINE = st.one_of(
    st.tuples(st.integers(0, 2), *[st.floats(0, 1)] * 4).map(lambda v: " ".join(map(str, v))),
    st.lists(YOLO_TOKENS, min_size=4, max_size=6).map(" ".join),
)
YOLO_TEXT = st.lists(YOLO_LINE, max_size=5).map("\n".join)


def _chunks(pieces: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(st.one_of(pieces, st.binary(max_size=8)), max_size=30).map(b"".join)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _chunks(JSONISH)))
def test_coco_random_bytes(dirs, data):
    dirs["json"].write_bytes(data)
    accepts_or_refuses(coco.read, dirs["json"], check_files=False)


XML_DECLARATIONS = st.sampled_from(
    [b"", b"<?xml version='1.0'?>", b"<?xml version='1.0' encoding='utf-16'?>", b"<?xml version='1.0' encoding='x'?>"]
)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.tuples(XML_DECLARATIONS, _chunks(XMLISH)).map(b"".join)))
def test_voc_random_bytes(dirs, data):
    (dirs["voc"] / "Annotations" / "a.xml").write_bytes(data)
    accepts_or_refuses(voc.read, dirs["voc"], check_files=False)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), YOLO_TEXT.map(str.encode)), clip=st.booleans())
def test_yolo_random_labels(dirs, data, clip):
    (dirs["yolo"] / "labels" / "a.txt").write_bytes(data)
    accepts_or_refuses(yolo.read, dirs["yolo"], clip_boxes=clip)


@settings(FUZZ, max_examples=100)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)))
def test_yolo_random_data_yaml(dirs, data):
    (dirs["yolo"] / "labels" / "a.txt").write_bytes(b"")
    (dirs["yolo"] / "data.yaml").write_bytes(data)
    try:
        accepts_or_refuses(yolo.read, dirs["yolo"])
    finally:
        (dirs["yolo"] / "data.yaml").unlink()


# -- random JSON values and COCO-shaped dicts -------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["a.png", "../x.jpg", "/etc/passwd", "C:\\x.jpg", "train", "all", "", 0, 1, 1.0, -1, 10**30]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)

BOX_NUMBER = st.one_of(st.integers(-1, 12), st.floats(-1, 12))


@st.composite
def valid_coco(draw) -> dict:
    """A well-formed COCO dict whose annotations refer to its own images and categories."""
    size = st.integers(8, 40)
    image = {"file_name": st.sampled_from(["a.png", "b/c.jpg"]), "width": size, "height": size}
    image_ids = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
    images = [
        {"id": i, **draw(st.fixed_dictionaries(image, optional={"split": st.sampled_from(["train", "test", "all"])}))}
        for i in image_ids
    ]
    category_ids = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
    categories = [{"id": i, "name": draw(st.sampled_from(["c", "d"]))} for i in category_ids]
    annotation = {
        "image_id": st.sampled_from(image_ids),
        "category_id": st.sampled_from(category_ids),
        "bbox": st.lists(BOX_NUMBER, min_size=4, max_size=4),
    }
    flags = {"iscrowd": st.integers(0, 1), "difficult": st.integers(0, 1)}
    annotations = draw(st.lists(st.fixed_dictionaries(annotation, optional=flags), max_size=4))
    return {"images": images, "annotations": annotations, "categories": categories}


_DELETE = object()


def _mutate(obj: object, draw) -> object:
    """Replace or delete one randomly chosen value somewhere inside ``obj`` (dicts and lists)."""
    obj = copy.deepcopy(obj)
    slots = []

    def walk(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            slots.append((node, key))
            walk(child)

    walk(obj)
    if not slots:
        return draw(JSON_VALUES)
    node, key = draw(st.sampled_from(slots))
    value = draw(st.one_of(st.just(_DELETE), JSON_VALUES))
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return obj


@FUZZ
@given(obj=JSON_VALUES)
def test_coco_random_json_values(dirs, obj):
    accepts_or_refuses(coco.from_coco_dict, obj, source="fuzz.json", image_root=dirs["voc"], check_files=False)


@settings(FUZZ, max_examples=300)
@given(base=valid_coco(), mutations=st.integers(0, 2), clip=st.booleans(), data=st.data())
def test_coco_shaped_dicts(dirs, base, mutations, clip, data):
    obj = base
    for _ in range(mutations):
        obj = _mutate(obj, data.draw)
    accepts_or_refuses(
        coco.from_coco_dict, obj, source="fuzz.json", image_root=dirs["voc"], check_files=False, clip_boxes=clip
    )
    dirs["json"].write_text(json.dumps(obj), encoding="utf-8")  # the same through the file reader
    accepts_or_refuses(coco.read, dirs["json"], check_files=False, clip_boxes=clip)


# -- random XML element trees -------------------------------------------------------------------

TAGS = st.sampled_from(
    ["annotation", "filename", "size", "width", "height", "object", "name", "difficult", "bndbox",
     "xmin", "ymin", "xmax", "ymax", "folder", "x"]
)  # fmt: skip
TEXTS = st.one_of(
    st.none(),
    st.integers(-3, 50).map(str),
    st.floats(allow_nan=True).map(str),
    st.sampled_from(["", " 7 ", "1e999", "a.jpg", "../a.jpg", "/abs.jpg", "0", "1", "2", "cat", "0x10", "1_0"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=6),
)


def _build(tag: str, text: str | None, children: list[ET.Element]) -> ET.Element:
    elem = ET.Element(tag)
    elem.text = text
    elem.extend(children)
    return elem


XML_TREES = st.recursive(
    st.builds(_build, TAGS, TEXTS, st.just([])),
    lambda inner: st.builds(_build, TAGS, TEXTS, st.lists(inner, max_size=4)),
    max_leaves=25,
)


def _leaf(tag: str, value: object) -> ET.Element:
    return _build(tag, str(value), [])


VOC_OBJECT = st.builds(
    lambda name, difficult, x, y, w, h: _build(
        "object",
        None,
        [
            _leaf("name", name),
            _leaf("difficult", difficult),
            _build("bndbox", None, [_leaf("xmin", x), _leaf("ymin", y), _leaf("xmax", x + w), _leaf("ymax", y + h)]),
        ],
    ),
    st.sampled_from(["cat", "dog"]),
    st.integers(0, 1),
    st.integers(-1, 40),
    st.integers(-1, 40),
    st.integers(-2, 30),
    st.integers(-2, 30),
)
VALID_VOC = st.builds(
    lambda w, h, objects: _build(
        "annotation",
        None,
        [_leaf("filename", "a.jpg"), _build("size", None, [_leaf("width", w), _leaf("height", h)]), *objects],
    ),
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(VOC_OBJECT, max_size=4),
)


def _mutate_tree(root: ET.Element, draw) -> None:
    """Change one random element: new text, removed, or given a random subtree."""
    parents = [(p, c) for p in root.iter() for c in p]
    if not parents:
        return
    parent, child = draw(st.sampled_from(parents))
    action = draw(st.sampled_from(["text", "remove", "add"]))
    if action == "text":
        child.text = draw(TEXTS)
    elif action == "remove":
        parent.remove(child)
    else:
        child.append(draw(XML_TREES))


@settings(FUZZ, max_examples=300)
@given(tree=st.one_of(VALID_VOC, XML_TREES), mutations=st.integers(0, 2), clip=st.booleans(), data=st.data())
def test_voc_random_trees(dirs, tree, mutations, clip, data):
    for _ in range(mutations):
        _mutate_tree(tree, data.draw)
    (dirs["voc"] / "Annotations" / "a.xml").write_bytes(ET.tostring(tree))
    accepts_or_refuses(voc.read, dirs["voc"], check_files=False, clip_boxes=clip)
