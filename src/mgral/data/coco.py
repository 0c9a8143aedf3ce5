"""COCO detection JSON: read, validate, write.

Layout written by :func:`write`: ``annotations.json`` at the top of the output
directory, images at their ``file_name`` relative to it (the layout of ``../shared/data``).
Boxes are COCO ``[x, y, width, height]`` in the same continuous pixel frame as
:mod:`mgral.data.records`, so ``[x, y, w, h] <-> [x, y, x + w, y + h]`` is exact.

Besides the standard fields this reads and writes each image's ``split`` (``"train"``,
``"val"``, ``"test"``, or an alias such as ``"valid"``, see
:func:`~mgral.data.records.canonical_split`; any other string, such as the ``"all"`` of some
exports, reads as unassigned) and each annotation's ``difficult`` flag, as ``../shared/data``
does; other fields (segmentation, area, info, licenses) are ignored on read.

A directory of split folders (Roboflow's COCO export: ``train/``, ``valid/``, ``test/``, each
with ``_annotations.coco.json`` and its images) reads as one dataset: see :func:`read`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mgral._io import atomic_write_json
from mgral._untrusted import short_repr
from mgral.data._files import RootGuard
from mgral.data._layout import link_or_copy, path_ids, read_json
from mgral.data.records import (
    MAX_BOXES_PER_IMAGE,
    SPLITS,
    Category,
    Dataset,
    ImageRecord,
    Target,
    canonical_split,
    check_box,
    check_box_count,
    check_identical_boxes,
    check_image_size,
    check_images_exist,
    check_int_id,
    describe_image,
    finite_number,
    safe_relative_path,
    split_conflict,
)
from mgral.errors import DatasetError

ANNOTATIONS_FILE = "annotations.json"
ROBOFLOW_FILE = "_annotations.coco.json"
_SNIFF_BYTES = 1 << 20


# -- writing ---------------------------------------------------------------------------------


def _coordinate(v: np.floating) -> float:
    # str() of a float32 is its shortest round-trip decimal: 0.1, not 0.10000000149011612.
    return float(str(np.float32(v)))


def flat_name_clash(dataset: Dataset) -> str | None:
    """Why the images cannot be named by their base names alone (two images share one, named
    in the message), or None when they can."""
    seen: dict[str, ImageRecord] = {}
    for rec in dataset:
        other = seen.setdefault(PurePosixPath(rec.file_name).name, rec)
        if other is not rec:
            return (
                f"{describe_image(other.id, other.file_name)} and {describe_image(rec.id, rec.file_name)} share the "
                f"base name {PurePosixPath(rec.file_name).name!r}"
            )
    return None


def _file_names(dataset: Dataset, flat_names: bool) -> list[str]:
    if flat_names and (clash := flat_name_clash(dataset)) is not None:
        raise DatasetError(f"cannot write flat file names: {clash}; rename one of the images, or keep the folders")
    return [PurePosixPath(r.file_name).name if flat_names else r.file_name for r in dataset]


def to_coco_dict(dataset: Dataset, *, flat_names: bool = False) -> dict[str, Any]:
    """The dataset as a COCO detection dict (``images``, ``annotations``, ``categories``).

    Integer image ids are kept when every id is an int; otherwise images get ids
    ``1..N`` in dataset order. Annotation ids are ``1..M``. ``split`` is written only for
    images that have one; ``segmentation`` (``[]``: a box has no mask), ``area`` (the box's),
    ``iscrowd`` and ``difficult`` are written for every annotation (CVAT's COCO importer
    requires ``segmentation`` and ``iscrowd``). With ``flat_names`` each ``file_name`` is the
    image's base name (``images/train/00012.png`` -> ``00012.png``), as CVAT names the images
    uploaded to a task.

    Raises:
        DatasetError: ``flat_names`` and two images share a base name (both are named).
    """
    keep_ids = all(isinstance(r.id, int) and not isinstance(r.id, bool) for r in dataset)
    images, annotations = [], []
    for n, (rec, file_name) in enumerate(zip(dataset, _file_names(dataset, flat_names), strict=True), start=1):
        image_id = rec.id if keep_ids else n
        entry: dict[str, Any] = {"id": image_id, "file_name": file_name, "width": rec.width, "height": rec.height}
        if rec.split is not None:
            entry["split"] = rec.split
        images.append(entry)
        t = rec.target
        for box, label, crowd, difficult in zip(t.boxes, t.labels, t.iscrowd, t.difficult, strict=True):
            x1, y1, x2, y2 = (_coordinate(v) for v in box)
            w, h = _coordinate(box[2] - box[0]), _coordinate(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, w, h],
                    "segmentation": [],
                    "area": w * h,
                    "iscrowd": int(crowd),
                    "difficult": int(difficult),
                }
            )
    categories = [{"id": c.id, "name": c.name} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_json(dataset: Dataset, path: str | os.PathLike[str]) -> None:
    """Write the dataset's COCO JSON to ``path`` atomically (no images are copied).

    ``file_name`` values stay relative to ``dataset.root``: read the file back with
    ``image_root=dataset.root`` unless ``path`` lies in that directory.
    """
    atomic_write_json(path, to_coco_dict(dataset))


def write(dataset: Dataset, out_dir: Path, *, copy_images: bool = True, flat_names: bool = False) -> None:
    """Write ``annotations.json`` into the existing empty ``out_dir``, and the images
    at their ``file_name`` below it when ``copy_images``. With ``flat_names`` the images lie
    flat in ``out_dir`` under their base names (see :func:`to_coco_dict`).

    Raises:
        DatasetError: a source image is missing; ``flat_names`` and two images share a base name.
    """
    out_dir = Path(out_dir)
    obj = to_coco_dict(dataset, flat_names=flat_names)
    if copy_images:
        for rec, entry in zip(dataset, obj["images"], strict=True):
            link_or_copy(
                dataset.root / rec.file_name, out_dir / entry["file_name"], what=describe_image(rec.id, rec.file_name)
            )
    atomic_write_json(out_dir / ANNOTATIONS_FILE, obj)


# -- reading ---------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(obj: dict, key: str, *, source: str, where: str) -> Any:
    if key not in obj:
        raise DatasetError(f"{source}: {where}: missing required field {key!r} (present: {sorted(map(str, obj))})")
    return obj[key]


def _list_field(obj: dict, key: str, *, source: str) -> list:
    value = _require(obj, key, source=source, where="top level")
    if not isinstance(value, list):
        raise DatasetError(f"{source}: expected {key!r} to be a list, got {type(value).__name__}")
    return value


def _entry(value: object, *, source: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise DatasetError(f"{source}: {where}: expected an object, got {type(value).__name__} {short_repr(value)}")
    return value


def _read_categories(obj: dict, *, source: str) -> list[Category]:
    categories, seen, names = [], set(), {}
    for i, raw in enumerate(_list_field(obj, "categories", source=source)):
        where = f"categories[{i}]"
        c = _entry(raw, source=source, where=where)
        cid, name = _require(c, "id", source=source, where=where), _require(c, "name", source=source, where=where)
        check_int_id(cid, source=source, where=where)
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{source}: {where}: expected 'name' to be a non-empty string, got {short_repr(name)}")
        if cid in seen:
            raise DatasetError(f"{source}: {where}: duplicate category id {cid}; category ids must be unique")
        if name in names:
            raise DatasetError(
                f"{source}: {where}: category name {short_repr(name, 60)} is also categories[{names[name]}]; expected "
                "each name once (merge the two categories, or rename one)"
            )
        seen.add(cid)
        names[name] = i
        categories.append(Category(cid, name))
    return categories


def _read_images(obj: dict, *, source: str) -> list[ImageRecord]:
    records: dict[int, ImageRecord] = {}
    by_file: dict[str, ImageRecord] = {}
    for i, raw in enumerate(_list_field(obj, "images", source=source)):
        where = f"images[{i}]"
        img = _entry(raw, source=source, where=where)
        image_id = check_int_id(_require(img, "id", source=source, where=where), source=source, where=where)
        raw_name = _require(img, "file_name", source=source, where=where)
        where = f"{where}, {describe_image(image_id, raw_name if isinstance(raw_name, str) else None)}"
        file_name = safe_relative_path(raw_name, source=source, where=where)
        width = _require(img, "width", source=source, where=where)
        height = _require(img, "height", source=source, where=where)
        width, height = check_image_size(width, height, source=source, where=where)
        split = img.get("split")
        if split is not None and not isinstance(split, str):
            raise DatasetError(
                f"{source}: {where}: expected 'split' to be a string or absent, got {short_repr(split, 40)}"
            )
        if image_id in records:
            raise DatasetError(
                f"{source}: {where}: duplicate image id {image_id} (also {records[image_id].file_name!r}); "
                "image ids must be unique"
            )
        rec = records[image_id] = ImageRecord(image_id, file_name, width, height, canonical_split(split))
        other = by_file.setdefault(file_name, rec)
        if other.split != rec.split:
            raise split_conflict(source, where, file_name, f"image {other.id}", other.split, rec.split)
    return list(records.values())


def _flag(ann: dict, key: str, *, source: str, where: str) -> bool:
    v = ann.get(key, 0)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise DatasetError(f"{source}: {where}: expected {key!r} to be 0 or 1, got {short_repr(v, 40)}")


def _read_annotations(
    obj: dict, records: list[ImageRecord], categories: list[Category], *, source: str, clip: bool
) -> None:
    by_id = {r.id: r for r in records}
    category_ids = {c.id for c in categories}
    rows: dict[int, list[tuple[tuple[float, ...], int, bool, bool]]] = {r.id: [] for r in records}
    for i, raw in enumerate(_list_field(obj, "annotations", source=source)):
        where = f"annotations[{i}]"
        ann = _entry(raw, source=source, where=where)
        image_id = _require(ann, "image_id", source=source, where=where)
        if not _is_int(image_id) or image_id not in by_id:
            raise DatasetError(
                f"{source}: {where}: 'image_id' {short_repr(image_id, 40)} is not the id of any image in 'images' "
                "(each annotation must refer to a listed image)"
            )
        rec = by_id[image_id]
        where = f"{where} of {describe_image(rec.id, rec.file_name)}"
        category_id = _require(ann, "category_id", source=source, where=where)
        if not _is_int(category_id) or category_id not in category_ids:
            raise DatasetError(
                f"{source}: {where}: 'category_id' {short_repr(category_id, 40)} is not one of the category ids "
                f"{short_repr(sorted(category_ids), 200)} (add it to 'categories' or fix the annotation)"
            )
        bbox = _require(ann, "bbox", source=source, where=where)
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(finite_number(v) for v in bbox):
            raise DatasetError(
                f"{source}: {where}: expected 'bbox' to be a list of 4 finite numbers [x, y, width, height], "
                f"got {short_repr(bbox, 120)}"
            )
        x, y, w, h = (float(v) for v in bbox)
        index = len(rows[image_id])
        if index >= MAX_BOXES_PER_IMAGE:
            row = rows[image_id]
            check_box_count(
                index + 1,
                source=source,
                where=f"annotations[{i}]: {describe_image(rec.id, rec.file_name)}",
                boxes=[r[0] for r in row],
                labels=[r[1] for r in row],
            )
        for name, size in (("width", w), ("height", h)):
            if size <= 0:
                raise DatasetError(
                    f"{source}: {where}: box {index} bbox {short_repr(bbox, 120)} has {name} {size:g} <= 0; expected "
                    "[x, y, width, height] with positive width and height (is the bbox stored as x1, y1, x2, y2?)"
                )
        box = check_box(
            (x, y, x + w, y + h),
            width=rec.width,
            height=rec.height,
            source=source,
            where=where,
            index=index,
            clip=clip,
            convention="x, y, x + w, y + h from COCO [x, y, w, h]",
        )
        crowd = _flag(ann, "iscrowd", source=source, where=where)
        difficult = _flag(ann, "difficult", source=source, where=where)
        rows[image_id].append((box, category_id, difficult, crowd))
    for rec in records:
        boxes, labels, difficult, crowd = zip(*rows[rec.id], strict=True) if rows[rec.id] else ((), (), (), ())
        check_identical_boxes(boxes, labels, source=source, where=describe_image(rec.id, rec.file_name))
        rec.target = Target(np.array(boxes, dtype=np.float32).reshape(-1, 4), labels, difficult, crowd)


def from_coco_dict(
    obj: object,
    *,
    source: str,
    image_root: str | os.PathLike[str],
    check_files: bool = True,
    clip_boxes: bool = False,
    follow_links: bool = False,
) -> Dataset:
    """Validate a parsed COCO dict and build a :class:`Dataset` rooted at ``image_root``.

    ``source`` names the file in messages. Every image, category and annotation is
    checked before the dataset is returned.

    Raises:
        DatasetError: a missing or mistyped field, duplicate or unknown id (or category name),
            invalid box, more than :data:`~mgral.data.records.MAX_BOXES_PER_IMAGE` boxes or
            :data:`~mgral.data.records.MAX_IDENTICAL_BOXES` copies of one box in an image, one
            image file in two splits, or (``check_files``) a missing image file or one that a
            symbolic link leads out of ``image_root`` (unless ``follow_links``).
    """
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{source}: expected a JSON object with 'images', 'annotations' and 'categories', got "
            f"{type(obj).__name__} (a COCO results list is a prediction file, not a dataset)"
        )
    categories = _read_categories(obj, source=source)
    records = _read_images(obj, source=source)
    _read_annotations(obj, records, categories, source=source, clip=clip_boxes)
    dataset = Dataset(image_root, categories, records)
    if check_files:
        check_images_exist(dataset, source=source, follow_links=follow_links)
    return dataset


def _json_files(path: Path) -> list[Path]:
    """The COCO .json files at the top of the directory ``path``: ``annotations.json`` where it
    stands beside other .json files."""
    candidates = sorted(path.glob("*.json"))
    if len(candidates) > 1 and os.path.lexists(path / ANNOTATIONS_FILE):
        return [path / ANNOTATIONS_FILE]
    return candidates


def split_folders(path: Path) -> list[tuple[str, Path]]:
    """``(split, its .json file)`` of each split folder of the directory ``path``, train first:
    a subfolder named as a split or an alias of one (``train``, ``valid``, ``test``, ... see
    :func:`~mgral.data.records.canonical_split`) holding :data:`ROBOFLOW_FILE` or exactly one
    .json file (Roboflow's COCO export); folders without a .json file are left out.

    Raises:
        DatasetError: a split folder with several .json files and no :data:`ROBOFLOW_FILE`.
    """
    found = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and canonical_split(p.name)):
        candidates = sorted(folder.glob("*.json"))
        if os.path.lexists(folder / ROBOFLOW_FILE):
            candidates = [folder / ROBOFLOW_FILE]
        if len(candidates) > 1:
            raise DatasetError(
                f"{folder}: expected one COCO .json file in the split folder, found "
                f"{', '.join(c.name for c in candidates)} (keep one, or name it {ROBOFLOW_FILE})"
            )
        found += [(canonical_split(folder.name), candidates[0])] if candidates else []
    return sorted(found, key=lambda sf: SPLITS.index(sf[0]))


def _merge_split_folders(
    path: Path, files: list[tuple[str, Path]], *, clip_boxes: bool, check_files: bool, follow_links: bool
) -> Dataset:
    """One dataset of a directory of split folders (see :func:`read`), rooted at ``path``."""
    guard = RootGuard(path, follow_links=follow_links)
    parts = []
    for split, file in files:
        obj = read_json(file, expected="a COCO JSON object", guard=guard)
        part = from_coco_dict(obj, source=str(file), image_root=file.parent, check_files=False, clip_boxes=clip_boxes)
        _check_same_categories(part, file, parts[0][1] if parts else None, files[0][1])
        parts.append((split, part, file, obj))
    first = parts[0][1]
    dropped = _supercategory_entry(first.categories, parts[0][3]["categories"], [p[1] for p in parts])
    records = []
    for split, part, file, _ in parts:
        folder = file.parent.relative_to(path).as_posix()
        records += [replace(r, file_name=f"{folder}/{r.file_name}", split=split) for r in part]
    ids = path_ids([r.file_name for r in records])
    dataset = Dataset(
        path,
        [c for c in first.categories if c.id != dropped],
        (replace(r, id=image_id) for r, image_id in zip(records, ids, strict=True)),
    )
    if check_files:
        check_images_exist(dataset, source=str(path), follow_links=follow_links)
    return dataset


def _check_same_categories(part: Dataset, file: Path, first: Dataset | None, first_file: Path) -> None:
    if first is None:
        return
    mine, theirs = part.category_names, first.category_names
    for cid in [*mine, *(c for c in theirs if c not in mine)]:
        if mine.get(cid) != theirs.get(cid):
            here = f"categories[{list(mine).index(cid)}], id {cid} {mine[cid]!r}" if cid in mine else f"no id {cid}"
            there = repr(theirs[cid]) if cid in theirs else "no such id"
            raise DatasetError(
                f"{file}: {here}; {first_file} has {there} for id {cid}: expected the split files of one export to "
                "have the same categories (export every split from one dataset version)"
            )


def _supercategory_entry(categories: list[Category], raw: list[dict], parts: list[Dataset]) -> int | None:
    """The id of the category that Roboflow adds first: it has no boxes and is the
    ``supercategory`` of every other category (``{"id": 0, "name": "cards", "supercategory":
    "none"}``); None if there is none."""
    used = {int(label) for part in parts for rec in part for label in rec.target.labels}
    supers = {c["id"]: c.get("supercategory") for c in raw}
    for c in categories:
        others = [o for o in categories if o.id != c.id]
        if c.id not in used and others and all(supers[o.id] == c.name for o in others):
            return c.id
    return None


def read(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    clip_boxes: bool = False,
    follow_links: bool = False,
) -> Dataset:
    """Read a COCO JSON file (or a directory holding one) into a validated :class:`Dataset`.

    ``image_root`` defaults to the JSON file's directory; ``file_name`` values are relative
    to it. With ``clip_boxes`` boxes sticking out of their image are clipped, not refused.
    A symbolic link that leads out of the directory given (the JSON file in it) or out of the
    image root (an image) is refused unless ``follow_links``.

    A directory without a .json file at its top may hold split folders instead, as Roboflow's
    COCO export does: ``train/``, ``valid/``, ``test/`` (or any alias of a split name), each with
    ``_annotations.coco.json`` (or one .json file) and its images beside it. They read as one
    dataset rooted at the directory: each folder's images are in its split (``valid`` is
    ``val``; a ``split`` field in the file is overridden), their ``file_name`` is relative to
    the folder, and image ids are the file stems (as YOLO's and VOC's: each Roboflow file counts
    its ids from 0). The files must have the same categories. A category with no boxes that is
    the ``supercategory`` of every other one (the first entry of Roboflow's files, e.g.
    ``{"id": 0, "name": "cards", "supercategory": "none"}``) is left out.

    Raises:
        DatasetError: unreadable or malformed JSON (or a FIFO, a device), or anything
            :func:`from_coco_dict` refuses; split folders whose categories differ, or given
            with an ``image_root``.
    """
    path = Path(path)
    file = path
    if path.is_dir():
        found = _json_files(path)
        folders = [] if found else split_folders(path)
        if folders:
            if image_root is not None:
                raise DatasetError(
                    f"{path}: holds split folders ({', '.join(f.parent.name for _, f in folders)}), whose images lie "
                    "beside their .json file; image_root does not apply to them: leave it out"
                )
            return _merge_split_folders(
                path, folders, clip_boxes=clip_boxes, check_files=check_files, follow_links=follow_links
            )
        if len(found) != 1:
            raise DatasetError(
                f"{path}: expected exactly one COCO .json file in the directory (or split folders train/, valid/, "
                f"test/ each holding one, as Roboflow exports), found {', '.join(c.name for c in found) or 'none'} "
                "(pass the .json file itself)"
            )
        file = found[0]
    source = str(file)
    guard = RootGuard(path, follow_links=follow_links) if path.is_dir() else None
    obj = read_json(file, expected="a COCO JSON object", guard=guard)
    root = Path(image_root) if image_root is not None else file.parent
    return from_coco_dict(
        obj, source=source, image_root=root, check_files=check_files, clip_boxes=clip_boxes, follow_links=follow_links
    )


def _looks_coco(file: Path) -> bool:
    if not file.is_file():  # a FIFO would block the open
        return False
    try:
        with file.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return False
    return b'"images"' in head or b'"annotations"' in head


def sniff(path: Path) -> str | None:
    """A reason string if ``path`` is a .json file, a directory with a COCO .json file at its top,
    or a directory of split folders each with one (see :func:`read`)."""
    path = Path(path)
    if path.is_file():
        return f"{path.name} is a .json file" if path.suffix.lower() == ".json" else None
    if not path.is_dir():
        return None
    for candidate in sorted(path.glob("*.json")):
        if _looks_coco(candidate):
            return f"contains {candidate.name}"
    try:
        folders = split_folders(path)
    except DatasetError:
        return None
    looks = [f.relative_to(path).as_posix() for _, f in folders if _looks_coco(f)]
    return f"contains {', '.join(looks)}" if looks else None
