"""Label Studio: the tasks mgral hands over (with the model's boxes as pre-annotations) and
the export it reads back.

Tasks written by :func:`to_tasks`, for a project whose labeling config is
:func:`labeling_config` (an ``Image`` named ``image`` and ``RectangleLabels`` named
``label`` with one ``Label`` per category name)::

    [{"data": {"image": "/abs/images/00017.png", "mgral_id": 17, "mgral_file": "images/00017.png",
               "mgral_rank": "000001"},
      "predictions": [{"model_version": "mgral entropy seed-0 cycle-2", "score": 0.83,
                       "result": [{"id": "9f86d081e5_0", "type": "rectanglelabels", "from_name": "label",
                                   "to_name": "image", "original_width": 640, "original_height": 480,
                                   "image_rotation": 0, "score": 0.91,
                                   "value": {"x": 10.5, "y": 20.0, "width": 5.0, "height": 8.25,
                                             "rotation": 0, "rectanglelabels": ["cat"]}}]}]}]

``x``, ``y`` (top-left corner), ``width`` and ``height`` are percent (0..100) of the image's
``original_width`` / ``original_height``. ``data.mgral_id`` is the dataset's image id: Label
Studio keeps task data in its exports, so the labels find their image again whatever URL
``data.image`` had to be for Label Studio to show it. ``data.mgral_rank`` is the selection's
order (``"000001"`` = label first): sort the Data Manager by it.

The export read by :func:`read_export` is Label Studio's "JSON" export: a list of tasks with
``data`` and ``annotations`` (each with ``result``, a list of regions, and ``was_cancelled``).
A task is:

* **labeled**: it has an annotation that is not cancelled. The one used is the one marked
  ``ground_truth``, else the latest (highest ``id``). Its ``rectanglelabels`` regions are
  the boxes; an empty ``result`` means "labeled: nothing in this image".
* **skipped**: every annotation is cancelled (what Label Studio's *Skip* button records).
* **unlabeled**: no annotation at all (only predictions, or nothing yet).

Result entries of per-image types (``choices``, ``textarea``, ``rating``, ...) are ignored;
other region types (polygons, keypoints, brushes, ...), rotated rectangles and regions with
several labels are refused: an axis-aligned box has one class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from mgral._untrusted import short_repr
from mgral.data._layout import read_text
from mgral.data.records import (
    MAX_IMAGE_SIDE,
    Category,
    Dataset,
    Detections,
    ImageId,
    ImageRecord,
    Target,
    check_box,
    check_box_count,
    check_identical_boxes,
    finite_number,
)
from mgral.errors import DatasetError

FROM_NAME = "label"
TO_NAME = "image"
_IGNORED_TYPES = frozenset({"choices", "textarea", "rating", "number", "datetime", "taxonomy", "pairwise", "ranker"})
_STATUSES = ("labeled", "skipped", "unlabeled")


# -- writing ---------------------------------------------------------------------------------


def labeling_config(categories: Iterable[Category], *, from_name: str = FROM_NAME, to_name: str = TO_NAME) -> str:
    """The labeling config (XML) of a project the tasks of :func:`to_tasks` fit."""
    labels = "\n".join(f"    <Label value={quoteattr(c.name)}/>" for c in categories)
    return (
        "<View>\n"
        f'  <Image name={quoteattr(to_name)} value="$image"/>\n'
        f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n"
        f"{labels}\n"
        "  </RectangleLabels>\n"
        "</View>\n"
    )


def _percent(v: float, size: int) -> float:
    return round(float(v) / size * 100.0, 4)


AGNOSTIC_NMS_IOU = 0.7
"""Pre-annotation boxes overlapping a higher-scoring one by more than this IoU, whatever their
class, are dropped (see :func:`to_tasks`)."""


def _region_id(image_id: ImageId, index: int) -> str:
    """A result id unique across tasks and the same each time the package is written: a digest
    of the image id, then the detection's index."""
    return f"{hashlib.blake2s(repr(image_id).encode(), digest_size=5).hexdigest()}_{index}"


def pre_annotations(
    det: Detections, width: int, height: int, *, min_score: float, nms_iou: float = AGNOSTIC_NMS_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """The detections offered as pre-annotations: ``(boxes, index)``, the boxes clipped to the
    ``width`` x ``height`` image (float32 ``[N, 4]`` xyxy, all N) and the indices kept, best
    score first: scoring ``>= min_score``, not empty once clipped, and not overlapping a
    higher-scoring box of any class by IoU > ``nms_iou`` (class-agnostic non-maximum
    suppression, torchvision ``nms``; see :func:`to_tasks`)."""
    import torch
    from torchvision.ops import nms

    boxes = det.boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    (index,) = np.nonzero((det.scores >= min_score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if len(index):
        index = index[nms(torch.from_numpy(boxes[index]), torch.from_numpy(det.scores[index]), nms_iou).numpy()]
    return boxes, index


def to_tasks(
    dataset: Dataset,
    image_ids: Sequence[ImageId],
    predictions: Mapping[ImageId, Detections] | None = None,
    *,
    image_ref: Callable[[ImageRecord], str],
    model_version: str,
    min_score: float = 0.0,
    nms_iou: float = AGNOSTIC_NMS_IOU,
    from_name: str = FROM_NAME,
    to_name: str = TO_NAME,
) -> list[dict[str, Any]]:
    """One Label Studio task per image, in the order of ``image_ids`` (the selection's: the
    first is the one to label first), with the detections scoring ``>= min_score`` as a
    prediction (none where ``predictions`` is None or lacks the image).

    ``image_ref(record)`` gives ``data.image``: what Label Studio loads the image from (a
    URL, or a path its local-files storage serves). ``data.mgral_rank`` is the image's place
    in ``image_ids``, zero-padded to 6 digits (``"000001"`` = label first): Label Studio's Data
    Manager sorts data fields as text unless the column is typed Number, and the padding sorts
    right either way. Boxes are clipped to the
    image, then suppressed class-agnostically (torchvision ``nms`` over all classes at IoU
    ``nms_iou``): of boxes overlapping by more, the top-scoring one stays with its label, so an
    object is not offered once per class. 0.7 drops the near-copies a detector emits for one
    object under several labels (per-class heads regress one proposal to almost the same box)
    and keeps objects of different classes that overlap less: in ground truth, 8 of COCO's 830
    boxes in ``shared/data/detection-metrics-fixtures/coco-eval-golden`` overlap a box of
    another class by IoU > 0.7 (21 by > 0.5), and none of BCCD's, chess-pieces' or
    pinochle-cards' 8,427 boxes by > 0.5. ``nms_iou=1.0`` turns suppression off.
    Result ids are ``<digest of the image id>_<detection index>``: unique across tasks and
    the same each time the tasks are written.
    """
    names = dataset.category_names
    tasks = []
    for rank, image_id in enumerate(image_ids, start=1):
        rec = dataset[image_id]
        data = {"image": image_ref(rec), "mgral_id": image_id, "mgral_file": rec.file_name, "mgral_rank": f"{rank:06d}"}
        task: dict[str, Any] = {"data": data}
        det = predictions.get(image_id) if predictions is not None else None
        if det is not None:
            boxes, index = pre_annotations(det, rec.width, rec.height, min_score=min_score, nms_iou=nms_iou)
            result = []
            for k in index.tolist():
                x1, y1, x2, y2 = (float(v) for v in boxes[k])
                result.append(
                    {
                        "id": _region_id(image_id, k),
                        "type": "rectanglelabels",
                        "from_name": from_name,
                        "to_name": to_name,
                        "original_width": rec.width,
                        "original_height": rec.height,
                        "image_rotation": 0,
                        "score": round(float(det.scores[k]), 4),
                        "value": {
                            "x": _percent(x1, rec.width),
                            "y": _percent(y1, rec.height),
                            "width": _percent(x2 - x1, rec.width),
                            "height": _percent(y2 - y1, rec.height),
                            "rotation": 0,
                            "rectanglelabels": [names.get(int(det.labels[k]), str(int(det.labels[k])))],
                        },
                    }
                )
            score = round(float(det.scores[index].mean()), 4) if len(index) else 0.0
            task["predictions"] = [{"model_version": model_version, "score": score, "result": result}]
        tasks.append(task)
    return tasks


# -- reading ---------------------------------------------------------------------------------


@dataclass
class Region:
    """One ``rectanglelabels`` region of an annotation, as exported (percent of the image)."""

    index: int
    """Position in the annotation's ``result`` list (what messages call ``result N``)."""
    x: float
    y: float
    width: float
    height: float
    label: str
    original_width: int | None = None
    original_height: int | None = None


@dataclass
class Task:
    """One exported task: which image, and whether it was labeled, skipped or not yet labeled."""

    position: int
    """Index of the task in the export list."""
    task_id: Any
    image: str
    mgral_id: ImageId | None
    status: str
    """``"labeled"``, ``"skipped"`` or ``"unlabeled"`` (see the module docstring)."""
    annotation_id: Any = None
    regions: list[Region] = field(default_factory=list)

    def describe(self) -> str:
        """``task 12 (image '/data/00017.png')``: how messages name a task."""
        name = f"task {short_repr(self.task_id, 40)}" if self.task_id is not None else f"task [{self.position}]"
        return f"{name} (image {short_repr(self.image, 160)})" if self.image else name


def _image_of(data: dict) -> str:
    for key in ("image", "img", "url"):
        if isinstance(data.get(key), str):
            return data[key]
    strings = [v for k, v in data.items() if isinstance(v, str) and not k.startswith("mgral_")]
    return strings[0] if len(strings) == 1 else ""


def _region(raw: object, n: int, *, where: str) -> Region | None:
    here = f"{where}, result {n}"
    if not isinstance(raw, dict):
        raise DatasetError(f"{here}: expected an object, got {type(raw).__name__} {short_repr(raw)}")
    kind = raw.get("type")
    if kind in _IGNORED_TYPES:
        return None
    if kind != "rectanglelabels":
        raise DatasetError(
            f"{here}: region type {short_repr(kind, 40)}; only boxes are read (type 'rectanglelabels', from a "
            "RectangleLabels "
            "control): label with rectangles, or delete that region"
        )
    value = raw.get("value")
    if not isinstance(value, dict):
        raise DatasetError(f"{here}: expected 'value' to be an object with x, y, width, height, rectanglelabels")
    coords = {k: value.get(k) for k in ("x", "y", "width", "height")}
    bad = [k for k, v in coords.items() if not finite_number(v)]
    if bad:
        raise DatasetError(
            f"{here}: expected value.{bad[0]} to be a finite number (percent of the image), got "
            f"{short_repr(coords[bad[0]], 40)}"
        )
    rotation = value.get("rotation", 0)
    if not finite_number(rotation) or abs(rotation) > 1e-6:
        raise DatasetError(
            f"{here}: the rectangle is rotated by {short_repr(rotation, 40)} degrees (value.rotation); expected an "
            "axis-aligned box (rotation 0): redraw it without rotating"
        )
    labels = value.get("rectanglelabels")
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise DatasetError(
            f"{here}: expected value.rectanglelabels to hold exactly one class name, got {short_repr(labels)}; give "
            "each box one label"
        )
    sizes = []
    for key in ("original_width", "original_height"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_IMAGE_SIDE):
            raise DatasetError(
                f"{here}: expected {key} to be a positive integer (at most {MAX_IMAGE_SIDE}), got {short_repr(v, 40)}"
            )
        sizes.append(v)
    return Region(n, *(float(coords[k]) for k in ("x", "y", "width", "height")), labels[0], *sizes)


def _task(raw: object, position: int, *, source: str) -> Task:
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise DatasetError(
            f"{source}: task [{position}]: expected an object with 'data' (and 'annotations'), got {short_repr(raw)}; "
            "export the project as Label Studio JSON (not JSON-MIN or CSV)"
        )
    data = raw["data"]
    mgral_id = data.get("mgral_id")
    if isinstance(mgral_id, bool) or not isinstance(mgral_id, (int, str, type(None))):
        raise DatasetError(
            f"{source}: task [{position}]: data.mgral_id must be an image id, got {short_repr(mgral_id, 40)}"
        )
    task = Task(position, raw.get("id"), _image_of(data), mgral_id, "unlabeled")
    where = f"{source}: {task.describe()}"
    annotations = raw.get("annotations", [])
    if not isinstance(annotations, list):
        raise DatasetError(f"{where}: expected 'annotations' to be a list, got {type(annotations).__name__}")
    kept = []
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: annotations[{k}]: expected an object, got {short_repr(ann)}")
        if not ann.get("was_cancelled", False):
            kept.append((k, ann))
    if not annotations:
        return task
    if not kept:
        task.status = "skipped"
        return task
    truth = [(k, a) for k, a in kept if a.get("ground_truth")]
    k, ann = max(truth or kept, key=lambda ka: (_order(ka[1]), ka[0]))  # ground truth first, then the latest
    task.status, task.annotation_id = "labeled", ann.get("id", k)
    where = f"{where}, annotation {short_repr(task.annotation_id, 40)}"
    result = ann.get("result", [])
    if not isinstance(result, list):
        raise DatasetError(f"{where}: expected 'result' to be a list of regions, got {type(result).__name__}")
    here = f"{task.describe()}, annotation {short_repr(task.annotation_id, 40)}"
    task.regions = [r for n, raw_region in enumerate(result) if (r := _region(raw_region, n, where=where)) is not None]
    check_identical_boxes(
        [(r.x, r.y, r.x + r.width, r.y + r.height) for r in task.regions],
        [r.label for r in task.regions],
        source=source,
        where=here,
        items="results",
        indices=[r.index for r in task.regions],
        label_name=lambda label: f"class {short_repr(label, 60)}",
    )
    check_box_count(len(task.regions), source=source, where=here)
    return task


def _order(ann: dict) -> tuple:
    i = ann.get("id")
    return (0, i) if isinstance(i, int) and not isinstance(i, bool) else (-1, 0)


def parse_export(obj: object, *, source: str) -> list[Task]:
    """Validate a parsed Label Studio JSON export (see the module docstring).

    Raises:
        DatasetError: not a list of tasks, or a malformed task, annotation or region,
            naming ``source``, the task (id and image) and the result index.
    """
    if isinstance(obj, dict) and isinstance(obj.get("tasks"), list):
        obj = obj["tasks"]
    if not isinstance(obj, list):
        raise DatasetError(
            f"{source}: expected a Label Studio JSON export (a list of tasks), got {type(obj).__name__}"
            + (" (this looks like COCO: pass --format coco)" if isinstance(obj, dict) and "images" in obj else "")
        )
    return [_task(raw, n, source=source) for n, raw in enumerate(obj)]


_EXPECTED = "a Label Studio JSON export"


def read_export(path: str | os.PathLike[str]) -> list[Task]:
    """Read a Label Studio JSON export file (see :func:`parse_export`).

    An export is a list of tasks, decoded and checked one task at a time: a task that holds a
    flood of boxes is refused once that task is read, without building the rest of the file
    (a 325 MB export of 60,000 copies of one box per task took 11 s and 2 GB decoded whole).
    Memory is the file's text plus one task. The ``{"tasks": [...]}`` form is decoded whole.
    """
    source = str(path)
    text = read_text(Path(path), what=_EXPECTED)
    start = _skip_space(text, 0)
    if not text.startswith("[", start):  # not a list: decoded whole, and parse_export says what it is
        obj, end = _decode(text, start, source)
        if text[end:].strip(" \t\n\r"):
            raise _malformed(source, text, _skip_space(text, end), "extra data after the export")
        return parse_export(obj, source=source)
    tasks, pos = [], _skip_space(text, start + 1)
    while not text.startswith("]", pos):
        if tasks:
            if not text.startswith(",", pos):
                raise _malformed(source, text, pos, "expected ',' or ']' after a task")
            pos = _skip_space(text, pos + 1)
        raw, pos = _decode(text, pos, source)
        tasks.append(_task(raw, len(tasks), source=source))
        pos = _skip_space(text, pos)
    if text[pos + 1 :].strip(" \t\n\r"):
        raise _malformed(source, text, _skip_space(text, pos + 1), "extra data after the list of tasks")
    return tasks


def _decode(text: str, pos: int, source: str) -> tuple[Any, int]:
    """One JSON value of ``text`` from ``pos``: (value, the position after it)."""
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as err:
        raise _malformed(source, text, err.pos, err.msg) from err
    except (ValueError, RecursionError) as err:  # an integer beyond Python's digit limit, absurd nesting
        raise DatasetError(f"{source}: unreadable JSON ({short_repr(str(err), 120)}); expected {_EXPECTED}") from err


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _malformed(source: str, text: str, pos: int, msg: str) -> DatasetError:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return DatasetError(f"{source}: malformed JSON at line {line} column {column}: {msg} (expected {_EXPECTED})")


def task_target(
    task: Task,
    *,
    width: int,
    height: int,
    categories: Iterable[Category],
    source: str,
    where: str,
    clip: bool = False,
) -> Target:
    """The boxes of a labeled task in pixels of a ``width`` x ``height`` image, validated.

    ``source`` names the file and ``where`` the task and its image in messages
    (``FILE: task 3 (image '...') = image 17 ('a.png'), result 2: box 1 ...``).

    Raises:
        DatasetError: a region sized for another image, a class name not among
            ``categories``, or a box outside the image (unless ``clip``), naming the result index.
    """
    by_name = {c.name: c.id for c in categories}
    boxes, labels = [], []
    for r in task.regions:
        here = f"{source}: {where}, result {r.index}"
        if (r.original_width, r.original_height) != (None, None) and (r.original_width, r.original_height) != (
            width,
            height,
        ):
            raise DatasetError(
                f"{here}: the box was drawn on a {r.original_width}x{r.original_height} image, but the image is "
                f"{width}x{height}; expected the task to show the dataset's image file (not a resized copy)"
            )
        if r.label not in by_name:
            raise DatasetError(
                f"{here}: class {short_repr(r.label, 60)} is not a category of the dataset; expected one of "
                f"{short_repr(sorted(by_name), 200)} "
                "(rename the label in the labeling config, or relabel the box)"
            )
        box = (r.x * width / 100, r.y * height / 100, (r.x + r.width) * width / 100, (r.y + r.height) * height / 100)
        boxes.append(
            check_box(
                box,
                width=width,
                height=height,
                source=source,
                where=f"{where}, result {r.index}",
                index=len(boxes),
                clip=clip,
                convention="x1 y1 x2 y2 from Label Studio percent x, y, width, height",
            )
        )
        labels.append(by_name[r.label])
    return Target(boxes, labels)


__all__ = [
    "Region",
    "Task",
    "labeling_config",
    "parse_export",
    "pre_annotations",
    "read_export",
    "task_target",
    "to_tasks",
]
