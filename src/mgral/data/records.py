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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mgral.errors import DatasetError

ImageId = int | str
"""A dataset's own image id: an int (COCO) or a string (VOC / YOLO file stem)."""

SPLITS = ("train", "val", "test")


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


def check_image_size(width: object, height: object, *, source: str, where: str) -> tuple[int, int]:
    """Validate an image's width and height (positive integers) and return them as ints."""
    for name, v in (("width", width), ("height", height)):
        bad = DatasetError(f"{source}: {where}: expected '{name}' to be a positive integer, got {v!r:.40}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise bad
        if isinstance(v, (int, np.integer)):
            if v <= 0 or v > 1 << 31:  # compared as ints: a huge JSON int must not overflow a float
                raise bad
        elif not math.isfinite(v) or v <= 0 or v != int(v):
            raise bad
    return int(width), int(height)  # type: ignore[arg-type]


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


def check_images_exist(dataset: Dataset, *, source: str) -> None:
    """Refuse a dataset whose image files are missing, naming the first few."""
    missing = [r for r in dataset if not (dataset.root / r.file_name).is_file()]
    if missing:
        shown = "; ".join(f"{describe_image(r.id, r.file_name)} -> {dataset.root / r.file_name}" for r in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"{source}: {len(missing)} image file(s) do not exist: {shown}{more}. Expected the files under "
            f"the image root {str(dataset.root)!r} (pass the right image root, or check_files=False / "
            "--no-check-files to read annotations only)"
        )


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
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{source}: cannot read the id list ({err})") from err
    ids: list[ImageId] = []
    seen: set[ImageId] = set()
    for n, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        image_id: ImageId | None = text if text in dataset else None
        if image_id is None and text.lstrip("-").isdigit() and int(text) in dataset:
            image_id = int(text)
        if image_id is None:
            raise DatasetError(
                f"{source}: line {n}: {text!r} is not an image id of the dataset (ids look like "
                f"{list(dataset.images)[:3]!r}); one id per line"
            )
        if image_id in seen:
            raise DatasetError(f"{source}: line {n}: image id {text!r} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids
