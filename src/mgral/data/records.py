"""The one in-memory dataset model every format reads into and writes from.

Conventions (the torchvision detection contract, held in numpy so that the data layer
does not need torch):

* ``boxes``: float32 ``[N, 4]``, ``x1, y1, x2, y2`` in absolute pixels of a continuous
  coordinate frame whose origin is the top-left corner of the top-left pixel. A box that
  covers pixel columns ``a..b`` (0-based, inclusive) has ``x1 = a`` and ``x2 = b + 1``.
  VOC's 1-based inclusive corners ``xmin..xmax`` therefore map to ``[xmin - 1, xmax]``.
* ``labels``: int64 ``[N]``, the dataset's own category ids (not contiguous indices; a
  detector maps them to its class indices).
* ``scores``: float32 ``[N]`` (detections only).
* An image with nothing has ``boxes`` of shape ``[0, 4]``, never ``None``.

Image ids are the dataset's own stable ids: COCO's integer ids, VOC's file stems, YOLO's
file stems. No positional index crosses a public API.
"""

from __future__ import annotations

import math
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mgral._untrusted import short_repr
from mgral.data._files import RootGuard, read_regular_file
from mgral.errors import DatasetError

ImageId = int | str
"""A dataset's own image id: an int (COCO) or a string (VOC / YOLO file stem)."""

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def canonical_split(name: str | None) -> str | None:
    """``train`` / ``val`` / ``test`` for a split name or a common alias of one (``valid``,
    ``validation``, ``training``, ``testing``; any case); None for None or any other name."""
    return SPLIT_ALIASES.get(name.lower()) if isinstance(name, str) else None


MAX_IMAGE_SIDE = 1 << 31
"""The largest width or height a reader accepts, in pixels."""
MAX_BOXES_PER_IMAGE = 10_000
"""Boxes one image may have. Dense real data (retail shelves, crowds) reaches hundreds to a
few thousand per image; more than ten thousand is a runaway export."""
MAX_IDENTICAL_BOXES = 4
"""Copies of one box (same category, identical coordinates) one image may have. Real data has
the odd accidental double (a double-click, a merged export); a flood of them is an exporter bug
and would weigh that box thousands of times in training."""
_ID_RANGE = (-(1 << 63), (1 << 63) - 1)


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty(dtype: type) -> np.ndarray:
    return np.zeros((0,), dtype=dtype)


@dataclass(frozen=True)
class Category:
    """One object class: the dataset's own integer id and its name."""

    id: int
    name: str


@dataclass(eq=False)
class Target:
    """Ground truth of one image.

    Attributes:
        boxes: float32 ``[N, 4]`` xyxy absolute pixels.
        labels: int64 ``[N]`` category ids.
        difficult: bool ``[N]`` (VOC ``difficult``; ignored by VOC-style AP).
        iscrowd: bool ``[N]`` (COCO ``iscrowd``; ignored by COCO-style AP).
    """

    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    difficult: np.ndarray | None = None
    iscrowd: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.labels) != n:
            raise ValueError(f"Target: {n} boxes but {len(self.labels)} labels")
        self.difficult = (
            np.zeros(n, dtype=bool) if self.difficult is None else np.asarray(self.difficult, dtype=bool).reshape(-1)
        )
        self.iscrowd = (
            np.zeros(n, dtype=bool) if self.iscrowd is None else np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        )
        if len(self.difficult) != n or len(self.iscrowd) != n:
            raise ValueError(f"Target: {n} boxes but flags of length {len(self.difficult)}/{len(self.iscrowd)}")

    def __len__(self) -> int:
        return len(self.boxes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Target):
            return NotImplemented
        return (
            np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.labels, other.labels)
            and np.array_equal(self.difficult, other.difficult)
            and np.array_equal(self.iscrowd, other.iscrowd)
        )


@dataclass(eq=False)
class Detections:
    """A detector's output for one image (scores higher = more confident).

    Attributes:
        boxes: float32 ``[N, 4]`` xyxy absolute pixels.
        scores: float32 ``[N]``.
        labels: int64 ``[N]`` category ids.
        probs: float32 ``[N, K + 1]`` or None: each kept box's full class distribution;
            column 0 is background and column ``k`` the ``k``-th category of the dataset
            (``dataset.categories`` order). Rows sum to 1. None where the detector has none.
        embedding: float32 ``[D]`` or None: one pooled feature vector of the image.
        num_candidates: boxes before non-maximum suppression, or None.
    """

    boxes: np.ndarray = field(default_factory=_empty_boxes)
    scores: np.ndarray = field(default_factory=lambda: _empty(np.float32))
    labels: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    probs: np.ndarray | None = None
    embedding: np.ndarray | None = None
    num_candidates: int | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(f"Detections: {n} boxes, {len(self.scores)} scores, {len(self.labels)} labels")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.ndim != 2 or len(self.probs) != n:
                raise ValueError(f"Detections: {n} boxes but probs of shape {self.probs.shape}")
        if self.embedding is not None:
            self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class ImageRecord:
    """One image: its stable id, where its file is, its size, its split and its ground truth.

    ``file_name`` is a POSIX path relative to the dataset's image root.
    ``split`` is ``"train"``, ``"val"``, ``"test"`` or ``None`` (unassigned); the read-only layouts
    of the published data sets use their own names (``2007-trainval``, ``train2017``, ...).
    """

    id: ImageId
    file_name: str
    width: int
    height: int
    split: str | None = None
    target: Target = field(default_factory=Target)


class Dataset:
    """Images, categories and ground truth, ordered as read.

    Attributes:
        root: directory that ``ImageRecord.file_name`` is relative to.
        categories: the classes, in the dataset's order.
        images: image id -> record, in the dataset's order.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        categories: Iterable[Category],
        images: Iterable[ImageRecord],
    ) -> None:
        self.root = Path(root)
        self.categories = list(categories)
        self.images: dict[ImageId, ImageRecord] = {}
        for rec in images:
            if rec.id in self.images:
                raise DatasetError(
                    f"duplicate image id {rec.id!r} ({rec.file_name!r} and "
                    f"{self.images[rec.id].file_name!r}); image ids must be unique"
                )
            self.images[rec.id] = rec
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"duplicate category ids in {ids}; category ids must be unique")
        by_name: dict[str, int] = {}
        for c in self.categories:
            if by_name.setdefault(c.name, c.id) != c.id:
                raise DatasetError(
                    f"category name {short_repr(c.name, 60)} is used by categories {by_name[c.name]} and {c.id}; "
                    "category names must be unique (labels are matched to categories by name)"
                )

    # -- lookup -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.images.values())

    def __getitem__(self, image_id: ImageId) -> ImageRecord:
        try:
            return self.images[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in this dataset") from None

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.images

    @property
    def category_names(self) -> dict[int, str]:
        return {c.id: c.name for c in self.categories}

    def image_ids(self, split: str | Iterable[str] | None = None) -> list[ImageId]:
        """Ids of the images in ``split`` (one name or several), or all ids when ``None``."""
        if split is None:
            return list(self.images)
        wanted = {split} if isinstance(split, str) else set(split)
        return [i for i, r in self.images.items() if r.split in wanted]

    def image_path(self, image_id: ImageId) -> Path:
        return self.root / self[image_id].file_name

    def num_boxes(self, image_ids: Iterable[ImageId] | None = None) -> int:
        ids = self.images if image_ids is None else image_ids
        return sum(len(self[i].target) for i in ids)

    def subset(self, image_ids: Iterable[ImageId]) -> Dataset:
        """A dataset of the given images (same root and categories), in the given order."""
        return Dataset(self.root, self.categories, (self[i] for i in image_ids))

    def with_root(self, root: str | os.PathLike[str]) -> Dataset:
        return Dataset(root, self.categories, (replace(r) for r in self))

    def summary(self) -> str:
        splits: dict[str | None, int] = {}
        for r in self:
            splits[r.split] = splits.get(r.split, 0) + 1
        parts = ", ".join(f"{k or 'unassigned'} {v}" for k, v in sorted(splits.items(), key=lambda kv: str(kv[0])))
        return f"{len(self)} images ({parts}), {len(self.categories)} categories, {self.num_boxes()} boxes"


# -- validation helpers shared by every reader -------------------------------------------


def describe_image(image_id: ImageId, file_name: str | None) -> str:
    """``image 17 ('a.jpg')``: how messages name an image."""
    return f"image {image_id!r} ({file_name!r})" if file_name else f"image {image_id!r}"


def safe_relative_path(file_name: object, *, source: str, where: str) -> str:
    """Check that ``file_name`` is a relative path that stays inside the image root.

    Returns the normalized POSIX path. Backslashes are treated as separators (Windows
    exports). Absolute paths, drive letters and ``..`` components are refused: a dataset
    file must not make mgral read or write outside the directory it was given.

    Raises:
        DatasetError: naming ``source`` (the file) and ``where`` (the image).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise DatasetError(
            f"{source}: {where}: expected 'file_name' to be a non-empty relative path, got {file_name!r}"
        )
    if "\x00" in file_name:
        raise DatasetError(f"{source}: {where}: file_name {file_name!r} contains a NUL byte")
    p = file_name.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):
        raise DatasetError(
            f"{source}: {where}: file_name {file_name!r} is an absolute path; expected a path relative to "
            "the image root (pass the image root separately and make file names relative to it)"
        )
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise DatasetError(
            f"{source}: {where}: file_name {file_name!r} escapes the image root; expected a path inside it "
            "(remove '..' components)"
        )
    return norm


def finite_number(v: object) -> bool:
    """Whether ``v`` is an int or float (not a bool) with a finite value. A 400-digit integer
    is valid JSON, but ``float()`` and ``math.isfinite()`` raise OverflowError on it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def find_id(key: object, dataset: Dataset) -> ImageId | None:
    """The dataset's id that ``key`` names: the id as written, then its text, then that text as
    an integer (``"17"`` finds COCO id 17; ``2007_000027`` a VOC id); None if none does."""
    if isinstance(key, (int, str)) and not isinstance(key, bool) and key in dataset:
        return key
    text = str(key)
    if text in dataset:
        return text
    digits = text.removeprefix("-")
    # isdecimal, not isdigit ('²' is a digit int() refuses); 20 digits bound an int64 id
    if digits.isascii() and digits.isdecimal() and len(digits) <= 20 and int(text) in dataset:
        return int(text)
    return None


def check_image_size(width: object, height: object, *, source: str, where: str) -> tuple[int, int]:
    """Validate an image's width and height (positive integers of at most :data:`MAX_IMAGE_SIDE`,
    given as ints or integer-valued floats) and return them as ints."""
    for name, v in (("width", width), ("height", height)):
        bad = DatasetError(
            f"{source}: {where}: expected '{name}' to be a positive integer, got {short_repr(v, 40)} (an image side "
            f"is at most {MAX_IMAGE_SIDE} pixels)"
        )
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise bad
        if isinstance(v, (int, np.integer)):
            if v <= 0 or v > MAX_IMAGE_SIDE:  # compared as ints: a huge JSON int must not overflow a float
                raise bad
        elif not math.isfinite(v) or v <= 0 or v > MAX_IMAGE_SIDE or v != int(v):
            raise bad
    return int(width), int(height)  # type: ignore[arg-type]


def check_int_id(value: object, *, source: str, where: str, key: str = "id") -> int:
    """An integer id (image or category) that fits in 64 bits (numpy label arrays, JSON consumers).

    Raises:
        DatasetError: a bool, a non-integer or an integer out of range, naming ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{source}: {where}: expected {key!r} to be an integer, got {short_repr(value, 40)}")
    if not _ID_RANGE[0] <= value <= _ID_RANGE[1]:
        raise DatasetError(
            f"{source}: {where}: {key!r} {short_repr(value, 40)} is out of range; expected an integer id between "
            f"{_ID_RANGE[0]} and {_ID_RANGE[1]} (64 bits)"
        )
    return value


def check_box_count(
    count: int,
    *,
    source: str,
    where: str,
    boxes: Sequence[Sequence[float]] | None = None,
    labels: Sequence[object] = (),
    **identical: Any,
) -> None:
    """Refuse an image with more than :data:`MAX_BOXES_PER_IMAGE` boxes (call it as boxes are
    collected, so that a flood is refused before it is built). Given the ``boxes`` and
    ``labels`` read so far, a flood of copies of one box is named as such first (see
    :func:`check_identical_boxes`, which gets ``identical``)."""
    if count > MAX_BOXES_PER_IMAGE:
        if boxes is not None:
            check_identical_boxes(boxes, labels, source=source, where=where, partial=True, **identical)
        raise DatasetError(
            f"{source}: {where} has more than {MAX_BOXES_PER_IMAGE} boxes; expected at most {MAX_BOXES_PER_IMAGE} "
            "per image (the most crowded real data sets have a few thousand): check the exporter that wrote the file"
        )


def check_identical_boxes(
    boxes: Sequence[Sequence[float]],
    labels: Sequence[object],
    *,
    source: str,
    where: str,
    items: str = "boxes",
    indices: Sequence[int] | None = None,
    label_name: Callable[[object], str] = lambda label: f"category {label}",
    partial: bool = False,
) -> None:
    """Refuse an image holding more than :data:`MAX_IDENTICAL_BOXES` copies of one box (same
    label, identical coordinates), naming their indices (positions, or ``indices`` where the
    file counts otherwise; ``items`` says what they count: "boxes", "results", ...) and how
    many there are (``partial``: the boxes read so far, so "at least" that many).

    Raises:
        DatasetError: naming the file, the image, the indices, the count and the box.
    """
    if len(boxes) <= MAX_IDENTICAL_BOXES:
        return
    copies: dict[tuple, list[int]] = {}
    for n, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        key = (label, *(float(np.float32(v)) for v in box))
        copies.setdefault(key, []).append(n if indices is None else indices[n])
    for (label, x1, y1, x2, y2), found in copies.items():
        if len(found) > MAX_IDENTICAL_BOXES:
            shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
            raise DatasetError(
                f"{source}: {where}: {items} {shown} are {'at least ' if partial else ''}{len(found)} identical "
                f"boxes of {label_name(label)} at ({x1:g}, {y1:g}, {x2:g}, {y2:g}); expected at most "
                f"{MAX_IDENTICAL_BOXES} copies of one box in an image (remove the repeated boxes; an exporter that "
                "duplicates them?)"
            )


def split_conflict(source: str, where: str, file: str, other: str, other_split: object, split: object) -> DatasetError:
    """The refusal of one image file in two splits (``other`` names the first record of it)."""
    return DatasetError(
        f"{source}: {where}: the file {file!r} is also {other}, in split {other_split or 'unassigned'}; this one is "
        f"in split {split or 'unassigned'}: expected each image file in one split (a test image in the training "
        "pool leaks it; remove one of the two entries)"
    )


def check_box(
    box: Iterable[float],
    *,
    width: int,
    height: int,
    source: str,
    where: str,
    index: int,
    clip: bool = False,
    tolerance: float = 1.0,
    convention: str = "x1 y1 x2 y2",
) -> tuple[float, float, float, float]:
    """Validate one xyxy box against its image and return it (clipped if ``clip``).

    A box must be finite, have ``x2 > x1`` and ``y2 > y1``, and lie inside the image
    within ``tolerance`` pixels (rounding in the formats). With ``clip=True`` a box that
    sticks out is clipped instead of refused (it must still have positive area after).

    Raises:
        DatasetError: naming the file, the image and the box index, with a hint.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DatasetError(
            f"{source}: {where}: box {index} has non-finite coordinates ({convention} = {x1}, {y1}, {x2}, {y2})"
        )
    if x2 <= x1 or y2 <= y1:
        axis = "x2 <= x1" if x2 <= x1 else "y2 <= y1"
        a, b = (x2, x1) if x2 <= x1 else (y2, y1)
        raise DatasetError(
            f"{source}: {where}: box {index} has {axis} ({a:g} <= {b:g}); expected a box with positive width "
            f"and height in {convention} order (check the corner order and whether the format stores sizes)"
        )
    outside = x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance
    if outside:
        if not clip:
            raise DatasetError(
                f"{source}: {where}: box {index} = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
                f"{width}x{height} image; expected 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} "
                "(fix the annotation, or pass --clip-boxes / clip_boxes=True to clip boxes to the image)"
            )
    x1, x2 = min(max(x1, 0.0), float(width)), min(max(x2, 0.0), float(width))
    y1, y2 = min(max(y1, 0.0), float(height)), min(max(y2, 0.0), float(height))
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(
            f"{source}: {where}: box {index} has no area inside the {width}x{height} image after clipping"
        )
    return x1, y1, x2, y2


def check_images_exist(dataset: Dataset, *, source: str, follow_links: bool = False) -> None:
    """Refuse a dataset whose image files are missing (naming the first few), lead out of the
    image root through a symbolic link (unless ``follow_links``), or are one file (a hard or
    symbolic link) in two splits."""
    guard = RootGuard(dataset.root, follow_links=follow_links)
    missing = []
    files: dict[tuple[int, int], ImageRecord] = {}
    for r in dataset:
        path = dataset.root / r.file_name
        try:
            st = os.stat(path)
        except OSError:
            missing.append(r)
            continue
        if not stat.S_ISREG(st.st_mode):
            missing.append(r)
            continue
        guard.check(path, source=source, where=describe_image(r.id, r.file_name))
        other = files.setdefault((st.st_dev, st.st_ino), r)
        if other is not r and other.split != r.split:
            raise DatasetError(
                f"{source}: {describe_image(r.id, r.file_name)}: its file {str(path)!r} is the same file as "
                f"{describe_image(other.id, other.file_name)} ({str(dataset.root / other.file_name)!r}), in split "
                f"{other.split or 'unassigned'}; this one is in split {r.split or 'unassigned'}: expected each image "
                "file in one split (a hard or symbolic link between the split folders?)"
            )
    if missing:
        shown = "; ".join(f"{describe_image(r.id, r.file_name)} -> {dataset.root / r.file_name}" for r in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"{source}: {len(missing)} image file(s) do not exist: {shown}{more}. Expected the files under "
            f"the image root {str(dataset.root)!r} (pass the right image root, or check_files=False / "
            "--no-check-files to read annotations only)"
        )


def check_writable(dataset: Dataset) -> None:
    """Refuse, before anything is written, a dataset that no reader would read back: what the
    readers check (file names, sizes, boxes, category ids and names, one split per file, box
    floods), plus labels that are not category ids. Messages name the image and the fix.

    Raises:
        DatasetError: naming the image (or category) and what is wrong.
    """
    source = "cannot write the dataset"
    for c in dataset.categories:
        check_int_id(c.id, source=source, where=f"category {short_repr(c.name, 60)}")
        if not isinstance(c.name, str) or not c.name.strip():
            raise DatasetError(f"{source}: category {c.id}: expected a non-empty name, got {short_repr(c.name, 60)}")
    category_ids = {c.id for c in dataset.categories}
    by_file: dict[str, ImageRecord] = {}
    for rec in dataset:
        where = describe_image(rec.id, rec.file_name)
        if isinstance(rec.id, int):
            check_int_id(rec.id, source=source, where=where)
        norm = safe_relative_path(rec.file_name, source=source, where=where)
        if norm != rec.file_name:
            raise DatasetError(
                f"{source}: {where}: file_name {rec.file_name!r} would read back as {norm!r} (readers take '\\' as a "
                "separator and normalize the path); rename the file"
            )
        check_image_size(rec.width, rec.height, source=source, where=where)
        t = rec.target
        check_box_count(len(t), source=source, where=where)
        for k, (box, label) in enumerate(zip(t.boxes.tolist(), t.labels.tolist(), strict=True)):
            if label not in category_ids:
                raise DatasetError(
                    f"{source}: {where}: box {k} has label {label}, which is not a category id "
                    f"({short_repr(sorted(category_ids), 120)}); fix the label or add the category"
                )
            check_box(box, width=rec.width, height=rec.height, source=source, where=where, index=k)
        check_identical_boxes(t.boxes.tolist(), t.labels.tolist(), source=source, where=where)
        other = by_file.setdefault(rec.file_name, rec)
        if other.split != rec.split:
            raise split_conflict(source, where, rec.file_name, f"image {other.id!r}", other.split, rec.split)


def targets_by_id(dataset: Dataset) -> Mapping[ImageId, Target]:
    return {r.id: r.target for r in dataset}


def read_id_list(path: str | os.PathLike[str], dataset: Dataset) -> list[ImageId]:
    """Image ids from a text file, one a line (``#`` comments and blank lines ignored).

    A line is matched against the dataset's ids as written, then as an integer, so
    ``17`` finds COCO id 17 and ``2007_000027`` finds that VOC id.

    Raises:
        DatasetError: unreadable file, unknown or repeated id (naming the line).
    """
    source = str(path)
    try:
        lines = read_regular_file(path, expected="image ids, one a line").decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{source}: cannot read the id list ({err})") from err
    ids: list[ImageId] = []
    seen: set[ImageId] = set()
    for n, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        image_id = find_id(text, dataset)
        if image_id is None:
            raise DatasetError(
                f"{source}: line {n}: {short_repr(text, 60)} is not an image id of the dataset (ids look like "
                f"{list(dataset.images)[:3]!r}); one id per line"
            )
        if image_id in seen:
            raise DatasetError(f"{source}: line {n}: image id {short_repr(text, 60)} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids
