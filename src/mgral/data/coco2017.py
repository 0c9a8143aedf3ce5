"""The COCO 2017 layout: the official archives unpacked into one folder.

Expected below the root::

    annotations/instances_train2017.json    train2017/<file_name>    (118,287 images)
    annotations/instances_val2017.json      val2017/<file_name>      (5,000 images)

Splits (:data:`SPLITS`): ``train2017`` (the AL pool) and ``val2017`` (the test set of the AL
papers). Each JSON file is read by :mod:`mgral.data.coco`'s reader with its images under the
folder of the same name; image ids are COCO's own (unique across the two files; a collision is
refused), ``file_name`` is relative to the root (``train2017/000000391895.jpg``), categories are
COCO's 80 with their own ids (the two files must list the same ones). ``iscrowd`` is kept
(COCO-style AP ignores crowd regions). ``image_root`` (optional) is the folder holding
``train2017/`` and ``val2017/`` when the images live apart from the annotations.

One departure from the generic COCO reader: annotations whose box has zero width or height
are dropped, with a warning, instead of refused. ``instances_train2017.json`` has two of them
(images 200365 and 550395, height 0); torchvision's and mmdetection's loaders drop them too.

Read-only (no writer): ``mgral convert COCO_ROOT --from coco2017 --to coco`` works.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from mgral.data import coco
from mgral.data._files import RootGuard
from mgral.data._layout import read_json
from mgral.data.records import Dataset, ImageRecord
from mgral.errors import DatasetError

SPLITS = ("train2017", "val2017")
POOL_SPLITS = ("train2017",)
TEST_SPLIT = "val2017"

_FIX = (
    "expected the folder that annotations_trainval2017.zip, train2017.zip and val2017.zip "
    "(https://cocodataset.org/#download) unpack into, holding annotations/, train2017/ and val2017/"
)


def annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _check_layout(root: Path, images: Path, check_files: bool) -> None:
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory; {_FIX}")
    missing = [f"annotations/instances_{s}.json" for s in SPLITS if not annotation_file(root, s).is_file()]
    if check_files:
        missing += [str(images / s) + "/" for s in SPLITS if not (images / s).is_dir()]
    if missing:
        nested = [p.parent.name for p in root.glob("*/annotations") if p.is_dir()]
        hint = f" (found {nested[0]}/annotations: pass {root / nested[0]} instead)" if nested else ""
        raise DatasetError(f"{root}: the coco2017 layout lacks {', '.join(missing)}{hint}; {_FIX}")


def _drop_degenerate(obj: Any, source: str) -> None:
    """Remove the annotations whose bbox is 4 numbers with a width or height <= 0, warning once."""
    if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
        return  # the reader explains what is wrong
    kept, dropped = [], []
    for ann in obj["annotations"]:
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        flat = (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
            and (bbox[2] <= 0 or bbox[3] <= 0)
        )
        (dropped if flat else kept).append(ann)
    if dropped:
        obj["annotations"] = kept
        shown = ", ".join(f"id {a.get('id')} of image {a.get('image_id')} (bbox {a['bbox']})" for a in dropped[:3])
        warnings.warn(
            f"{source}: dropped {len(dropped)} annotation(s) with zero width or height: {shown}", stacklevel=3
        )


def read(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    clip_boxes: bool = False,
    follow_links: bool = False,
) -> Dataset:
    """Read a COCO 2017 folder (train2017 + val2017) into one validated :class:`Dataset`.

    Raises:
        DatasetError: a missing annotation file or image folder (naming it and the archive
            to unpack), anything :mod:`mgral.data.coco`'s reader refuses in either file, an
            image id in both files, different categories in the two files, a symbolic link
            out of the root (unless ``follow_links``), or (``check_files``) a missing image file.
    """
    root = Path(path)
    images = Path(image_root) if image_root is not None else root
    _check_layout(root, images, check_files)
    parts: list[tuple[str, Path, Dataset]] = []
    guard = RootGuard(root, follow_links=follow_links)
    for split in SPLITS:
        file = annotation_file(root, split)
        obj = read_json(file, expected="a COCO instances JSON object", guard=guard)
        _drop_degenerate(obj, str(file))
        data = coco.from_coco_dict(
            obj,
            source=str(file),
            image_root=images / split,
            check_files=check_files,
            clip_boxes=clip_boxes,
            follow_links=follow_links,
        )
        parts.append((split, file, data))
    (_, train_file, train), (_, val_file, val) = parts
    if train.categories != val.categories:
        raise DatasetError(
            f"{val_file}: its categories differ from those of {train_file} "
            f"({len(val.categories)} vs {len(train.categories)}; first of each: {val.categories[:1]} vs "
            f"{train.categories[:1]}); expected the official files, which share COCO's 80 categories"
        )
    both = sorted(set(train.images) & set(val.images))
    if both:
        raise DatasetError(
            f"image ids {both[:5]} are in both {train_file} and {val_file}; expected the official files, whose "
            "image ids are unique across train2017 and val2017"
        )
    records: list[ImageRecord] = [
        replace(rec, file_name=f"{split}/{rec.file_name}", split=split) for split, _, data in parts for rec in data
    ]
    return Dataset(images, train.categories, records)


def sniff(path: Path) -> str | None:
    """A reason string if ``path`` has ``annotations/instances_{train,val}2017.json``."""
    path = Path(path)
    if not path.is_dir():
        return None
    found = [s for s in SPLITS if annotation_file(path, s).is_file()]
    return f"contains annotations/instances_{found[0]}.json" if found else None
