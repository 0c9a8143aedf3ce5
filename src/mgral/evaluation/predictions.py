"""Prediction files in the COCO results format (cocoapi ``loadRes``; Lin et al. 2014).

A results file is a JSON list ``[{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}, ...]`` with boxes in absolute pixels (top-left corner, width, height). A COCO
dataset dict whose ``annotations`` carry a ``score`` is read the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mgral._io import atomic_write_json
from mgral.data._layout import read_json
from mgral.data.records import Dataset, Detections, ImageId, finite_number
from mgral.errors import DatasetError

_FIELDS = ("image_id", "category_id", "bbox", "score")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _image_id(value: object, gt: Dataset, *, where: str, int_ids: bool) -> ImageId:
    if int_ids:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(
                f"{where}: expected 'image_id' to be an integer image id of the ground truth, got {value!r}"
            )
    elif not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DatasetError(f"{where}: expected 'image_id' to be an image id of the ground truth, got {value!r}")
    if value not in gt:
        raise DatasetError(
            f"{where}: image_id {value!r} is not an image of the ground truth ({len(gt)} images); "
            "expected the ground truth's own image ids"
        )
    return value


def _entries(obj: Any, *, source: str) -> tuple[list[Any], str]:
    if isinstance(obj, list):
        return obj, "entry"
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        return obj["annotations"], "annotations"
    got = type(obj).__name__ if not isinstance(obj, dict) else f"an object with keys {sorted(obj)[:8]}"
    raise DatasetError(
        f"{source}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...] or a COCO "
        f"dataset whose 'annotations' carry scores, got {got}"
    )


MATCH = ("id", "stem", "auto")
CATEGORIES = ("id", "index0", "index1")


def _stem_key(file_name: str) -> ImageId:
    """What Ultralytics writes as the ``image_id`` of a file: its stem, as an int when numeric."""
    stem = PurePosixPath(file_name).stem
    return int(stem) if stem.isdecimal() and stem.isascii() else stem


def _id_lookup(entries: list[Any], gt: Dataset, match: str, source: str) -> dict[Any, ImageId] | None:
    """For ``match="stem"`` (or ``"auto"`` when some id is not a ground-truth id): results
    image id -> ground-truth id by file stem; None to take the ids as they are."""
    if match not in MATCH:
        raise ValueError(f"match must be one of {MATCH}, got {match!r}")
    if match == "id":
        return None
    if match == "auto":
        ids = {e.get("image_id") for e in entries if isinstance(e, dict)}
        if all(isinstance(i, (int, str)) and not isinstance(i, bool) and i in gt for i in ids):
            return None
    lookup: dict[Any, ImageId] = {}
    for rec in gt:
        key = _stem_key(rec.file_name)
        if key in lookup:
            raise DatasetError(
                f"{source}: matching predictions to images by file stem, but {gt[lookup[key]].file_name!r} and "
                f"{rec.file_name!r} share the stem {key!r}; write the dataset's own image ids into the results instead"
            )
        lookup[key] = rec.id
    return lookup


def read_predictions(
    path: str | os.PathLike[str], gt: Dataset, *, match: str = "id", categories: str = "id"
) -> dict[ImageId, Detections]:
    """Read COCO-format detections of ``gt``'s images.

    Image ids must be ``gt``'s own ids (integers for COCO ground truth; strings are accepted
    for datasets with string ids such as VOC file stems); ``category_id`` one of ``gt``'s
    category ids. Boxes become float32 xyxy ``[x, y, x + w, y + h]``.

    The results files of other frameworks load unchanged: Detectron2's ``COCOEvaluator``
    and MMDetection's ``CocoMetric`` write the dataset's image and category ids (the
    defaults); Ultralytics' ``val(save_json=True)`` writes each image's file stem as its id
    (``match="stem"``, or ``"auto"``: by id when every id is one of ``gt``'s, else by stem)
    and, on a dataset that is not COCO, the class index + 1 as ``category_id``
    (``categories="index1"``: the position in ``gt.categories`` counted from 1, the YOLO
    reader's own category ids; ``"index0"`` counts from 0, as Ultralytics 8.0 wrote).

    Returns:
        image id -> detections, for the images that have any.

    Raises:
        DatasetError: naming the file, the entry index, the image and what was expected:
            unreadable or malformed JSON, wrong top-level shape, a missing field, an
            unknown image or category id, a bbox that is not 4 finite numbers or has a
            negative width or height, a score that is not a finite number; two images of
            ``gt`` with one file stem when matching by stem.
        ValueError: an unknown ``match`` or ``categories``.
    """
    if categories not in CATEGORIES:
        raise ValueError(f"categories must be one of {CATEGORIES}, got {categories!r}")
    source = str(path)
    obj = read_json(Path(path), expected="a COCO results list")
    entries, label = _entries(obj, source=source)
    by_stem = _id_lookup(entries, gt, match, source)
    int_ids = by_stem is None and all(isinstance(i, int) and not isinstance(i, bool) for i in gt.images)
    positions = {n + (categories == "index1"): c.id for n, c in enumerate(gt.categories)}
    cat_ids = {c.id for c in gt.categories} if categories == "id" else set(positions)
    rows: dict[ImageId, list[tuple[float, float, float, float, float, int]]] = {}
    for n, entry in enumerate(entries):
        where = f"{source}: {label} {n}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object with {', '.join(_FIELDS)}, got {entry!r:.80}")
        missing = [f for f in _FIELDS if f not in entry]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}; expected {', '.join(_FIELDS)}")
        if by_stem is None:
            image_id = _image_id(entry["image_id"], gt, where=where, int_ids=int_ids)
        elif isinstance(entry["image_id"], (int, str)) and entry["image_id"] in by_stem:
            image_id = by_stem[entry["image_id"]]
        else:
            raise DatasetError(
                f"{where}: image_id {entry['image_id']!r:.60} is neither an image id nor the file stem of an image "
                f"of the ground truth ({len(gt)} images)"
            )
        where = f"{where} (image {image_id!r})"
        category_id = entry["category_id"]
        if isinstance(category_id, bool) or not isinstance(category_id, int) or category_id not in cat_ids:
            shown = ", ".join(map(str, sorted(cat_ids)[:20])) + (", ..." if len(cat_ids) > 20 else "")
            kind = {
                "id": "a ground-truth category id",
                "index0": "a class index from 0",
                "index1": "a class index from 1",
            }[categories]
            raise DatasetError(f"{where}: category_id {category_id!r:.40} is not {kind} [{shown}]")
        if categories != "id":
            category_id = positions[category_id]
        bbox = entry["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DatasetError(f"{where}: expected 'bbox' to be [x, y, width, height] (4 numbers), got {bbox!r:.80}")
        if not all(finite_number(v) for v in bbox):
            raise DatasetError(f"{where}: bbox {bbox!r:.80} has a non-finite value; expected finite pixel coordinates")
        x, y, w, h = (float(v) for v in bbox)
        if max(abs(x), abs(y), abs(x + w), abs(y + h)) > _FLOAT32_MAX:  # would become inf as float32
            raise DatasetError(f"{where}: bbox {bbox!r:.80} lies beyond float32's range; expected pixel coordinates")
        if w < 0 or h < 0:
            raise DatasetError(
                f"{where}: bbox {bbox!r:.80} has a negative width or height; expected [x, y, width, height] with "
                "width, height >= 0 (is it x1, y1, x2, y2?)"
            )
        score = entry["score"]
        if not finite_number(score):
            raise DatasetError(f"{where}: expected 'score' to be a finite number, got {score!r:.40}")
        rows.setdefault(image_id, []).append((x, y, x + w, y + h, float(score), category_id))
    out: dict[ImageId, Detections] = {}
    for image_id, r in rows.items():
        arr = np.array([t[:5] for t in r], dtype=np.float64)
        out[image_id] = Detections(
            boxes=arr[:, :4].astype(np.float32),
            scores=arr[:, 4].astype(np.float32),
            labels=np.array([t[5] for t in r], dtype=np.int64),
        )
    return out


def write_predictions(path: str | os.PathLike[str], preds: Mapping[ImageId, Detections]) -> None:
    """Write ``preds`` as a COCO results list (atomically).

    Boxes are written as ``[x1, y1, x2 - x1, y2 - y1]`` from the float32 corners, so
    :func:`read_predictions` gives back the same float32 boxes and scores.
    """
    results = []
    for image_id, det in preds.items():
        b = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).tolist()
        key = image_id.item() if isinstance(image_id, np.generic) else image_id
        for box, score, label in zip(
            xywh, np.asarray(det.scores, dtype=np.float64).tolist(), np.asarray(det.labels).tolist(), strict=True
        ):
            results.append({"image_id": key, "category_id": int(label), "bbox": box, "score": score})
    atomic_write_json(path, results)
