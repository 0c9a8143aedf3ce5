"""YOLO txt labels (Ultralytics / darknet layout): read, validate, write.

Layout: images under ``images/`` (``images/{train,val,test}/`` give splits, a flat
``images/`` gives split ``None``), one ``labels/<same relative path>.txt`` per image with
lines ``class cx cy w h`` normalized to ``[0, 1]`` by the image's width and height. An
image without a label file is a negative image; a label file without an image is an
error. Class names come from ``data.yaml`` ``names`` (a list, or an ``{index: name}``
dict) or ``classes.txt`` / ``obj.names``; class index ``i`` is category id ``i + 1``. Other
``data.yaml`` keys (``path``, ``train``, ...) are not followed: the layout above is read.

Image sizes are read from each image's header with PIL (EXIF orientation is not applied).
YOLO cannot store ``difficult`` or ``iscrowd``: they are dropped on write and False on read.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from PIL import Image

from mgral._untrusted import load_yaml, short_repr
from mgral.data._files import RootGuard
from mgral.data._layout import (
    IMAGE_SUFFIXES,
    link_or_copy,
    output_names,
    path_ids,
    read_names_file,
    read_text,
    write_names_file,
)
from mgral.data.records import (
    SPLITS,
    Category,
    Dataset,
    ImageRecord,
    Target,
    canonical_split,
    check_box,
    check_box_count,
    check_identical_boxes,
    describe_image,
)
from mgral.errors import DatasetError

YAML_FILES = ("data.yaml", "data.yml", "dataset.yaml")
NAMES_FILES = ("classes.txt", "obj.names")
# Normalized values may stick out of [0, 1] by this much (rounding in exporters).
_TOLERANCE = 1e-3
_MAX_CLASS_INDEX = (1 << 31) - 2  # category id = index + 1 stays an int32


def _class_names(root: Path, guard: RootGuard) -> tuple[dict[int, str], str]:
    """Class index -> name, and the file it came from."""
    for name in YAML_FILES:
        path = root / name
        if not os.path.lexists(path):
            continue
        expected = "a plain YOLO data.yaml with 'names'"
        data = load_yaml(
            read_text(path, what=expected, guard=guard), source=str(path), expected=expected, error=DatasetError
        )
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a YAML mapping with 'names', got {type(data).__name__}")
        names = data.get("names")
        if names is None:  # a data.yaml without names: the names may be in classes.txt
            continue
        if isinstance(names, list):
            names = dict(enumerate(names))
        if not isinstance(names, dict) or not all(
            isinstance(k, int)
            and not isinstance(k, bool)
            and 0 <= k <= _MAX_CLASS_INDEX
            and isinstance(v, str)
            and v.strip()
            for k, v in names.items()
        ):
            raise DatasetError(
                f"{path}: expected 'names' to be a list of class names or a {{index: name}} mapping (indices "
                f"0..{_MAX_CLASS_INDEX}), got {short_repr(names, 120)}"
            )
        dupes = sorted(n for n, k in Counter(names.values()).items() if k > 1)
        if dupes:
            raise DatasetError(
                f"{path}: class names {short_repr(dupes, 120)} appear more than once; expected each name once"
            )
        return {k: names[k] for k in sorted(names)}, str(path)
    found = read_names_file(root, NAMES_FILES, guard=guard)
    if found is None:
        raise DatasetError(
            f"{root}: no class names found; expected data.yaml with 'names', classes.txt or obj.names at the root"
        )
    return dict(enumerate(found[0])), str(found[1])


def _image_size(path: Path, *, where: str) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: {where}: cannot read the image size ({err}); expected a readable image") from err


def _read_labels(
    text: str,
    *,
    source: str,
    where: str,
    width: int,
    height: int,
    classes: dict[int, str],
    names_source: str,
    clip: bool,
) -> Target:
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []

    def class_name(label: object) -> str:
        return f"class {label - 1} ({short_repr(classes[label - 1], 60)})"  # type: ignore[operator]

    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        here = f"{where}: line {n} (box {len(boxes)})"
        check_box_count(len(boxes) + 1, source=source, where=where, boxes=boxes, labels=labels, label_name=class_name)
        if len(fields) != 5:
            raise DatasetError(
                f"{source}: {here}: expected 5 fields 'class cx cy w h', got {len(fields)} ({line.strip()!r:.80}); "
                "segmentation polygons are not supported"
            )
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError as err:
            raise DatasetError(
                f"{source}: {here}: expected an integer class and 4 numbers, got {line.strip()!r:.80}"
            ) from err
        if cls not in classes:
            raise DatasetError(
                f"{source}: {here}: class index {short_repr(cls, 40)} is out of range; expected "
                f"0..{max(classes, default=-1)} "
                f"({len(classes)} class names in {names_source})"
            )
        for name, v, lo in (("cx", cx, -_TOLERANCE), ("cy", cy, -_TOLERANCE), ("w", w, 0.0), ("h", h, 0.0)):
            if not math.isfinite(v) or v < lo or v > 1 + _TOLERANCE or (lo == 0.0 and v == 0.0):
                raise DatasetError(
                    f"{source}: {here}: {name} = {v:g} is outside [0, 1]; expected coordinates normalized by "
                    f"the image size {width}x{height} (are they in pixels?)"
                )
        boxes.append(
            check_box(
                ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height),
                width=width,
                height=height,
                source=source,
                where=f"{where}: line {n}",
                index=len(boxes),
                clip=clip,
                convention="x1 y1 x2 y2 from YOLO cx cy w h",
            )
        )
        labels.append(cls + 1)
    check_identical_boxes(boxes, labels, source=source, where=where, label_name=class_name)
    return Target(np.array(boxes, dtype=np.float32).reshape(-1, 4), labels)


def _files(directory: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Files below ``directory`` with one of ``suffixes`` (any case), as sorted POSIX relative paths."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.suffix.lower() in suffixes and p.is_file()
    )


def read(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    clip_boxes: bool = False,
    follow_links: bool = False,
) -> Dataset:
    """Read a YOLO dataset directory into a validated :class:`Dataset`.

    Labels are read from ``path/labels``; images are listed from ``image_root/images``
    (``image_root`` defaults to ``path``). Images are always opened for their size, so
    ``check_files`` has no effect. Image ids follow :func:`mgral.data.voc.path_ids`. A file
    that a symbolic link leads out of ``path`` (labels, names) or ``image_root`` (images) is
    refused unless ``follow_links``.

    Raises:
        DatasetError: no ``images/`` folder, no class names (or a name twice), an unreadable
            image, a label file without an image, a FIFO or device where a file is expected, a
            malformed line, a class index out of range, a box outside its image (unless
            ``clip_boxes``), too many boxes or copies of one box in an image, one image file in
            two splits, or a link out of the root.
    """
    root = Path(path)
    image_dir_root = Path(image_root) if image_root is not None else root
    images_dir, labels_dir = image_dir_root / "images", root / "labels"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: expected a YOLO dataset directory with images/ and labels/, found no {images_dir}")
    guard = RootGuard(root, follow_links=follow_links)
    image_guard = RootGuard(image_dir_root, follow_links=follow_links)
    classes, names_source = _class_names(root, guard)
    image_files = _files(images_dir, IMAGE_SUFFIXES)
    by_label = {str(PurePosixPath(f).with_suffix(".txt")): f for f in image_files}
    if len(by_label) != len(image_files):
        raise DatasetError(f"{images_dir}: two images share a stem in one folder; their labels would be the same file")
    for label in _files(labels_dir, (".txt",)) if labels_dir.is_dir() else []:
        # LabelImg's YOLO mode saves its classes.txt among the labels: not a label file
        if label not in by_label and PurePosixPath(label).name != "classes.txt":
            raise DatasetError(
                f"{labels_dir / label}: label file without an image; expected an image "
                f"images/{PurePosixPath(label).with_suffix('.<jpg|png|...>')} (remove the label file or add the image)"
            )

    records = []
    files: dict[tuple[int, int], ImageRecord] = {}
    for rel, image_id in zip(image_files, path_ids([f"images/{f}" for f in image_files]), strict=True):
        file_name = f"images/{rel}"
        where = describe_image(image_id, file_name)
        image_guard.check(image_dir_root / file_name, source=str(images_dir), where=where)
        width, height = _image_size(image_dir_root / file_name, where=where)
        label_file = labels_dir / PurePosixPath(rel).with_suffix(".txt")
        target = Target()
        if os.path.lexists(label_file):
            text = read_text(label_file, what="YOLO label lines 'class cx cy w h'", guard=guard)
            target = _read_labels(
                text,
                source=str(label_file),
                where=where,
                width=width,
                height=height,
                classes=classes,
                names_source=names_source,
                clip=clip_boxes,
            )
        top = PurePosixPath(rel).parts[0]
        split = canonical_split(top) if len(PurePosixPath(rel).parts) > 1 else None
        rec = ImageRecord(image_id, file_name, width, height, split, target)
        st = os.stat(image_dir_root / file_name)
        other = files.setdefault((st.st_dev, st.st_ino), rec)
        if other.split != split:
            raise DatasetError(
                f"{image_dir_root / file_name}: {where} is the same file as "
                f"{describe_image(other.id, other.file_name)} "
                f"({str(image_dir_root / other.file_name)!r}), in split {other.split or 'unassigned'}; this one is in "
                f"split {split or 'unassigned'}: expected each image file in one split (a hard or symbolic link "
                "between the split folders?)"
            )
        records.append(rec)
    if not records:
        raise DatasetError(f"{images_dir}: no image files found (expected {', '.join(IMAGE_SUFFIXES)})")
    categories = [Category(i + 1, name) for i, name in classes.items()]
    return Dataset(image_dir_root, categories, records)


def _read_back(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """The float32 boxes the reader makes of ``cx cy w h`` rows (as :func:`_read_labels` and
    :func:`mgral.data.records.check_box` compute them)."""
    cx, cy, w, h = values.T
    boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    return np.minimum(np.maximum(boxes, 0.0), [width, height, width, height]).astype(np.float32)


def _fields(rec: ImageRecord) -> list[list[str]]:
    """Each box as the four strings ``cx cy w h``: 6 decimals where they read back as the same
    float32 box, else as many more as it takes (so that read -> write -> read keeps every box)."""
    boxes = rec.target.boxes.astype(np.float64)
    x1, y1, x2, y2 = boxes.T
    w_, h_ = rec.width, rec.height
    values = np.stack([(x1 + x2) / 2 / w_, (y1 + y2) / 2 / h_, (x2 - x1) / w_, (y2 - y1) / h_], 1)
    fields: list[list[str]] = [[] for _ in range(len(boxes))]
    todo = np.arange(len(boxes))
    for digits in (6, 8, 10, 12):
        if not len(todo):
            break
        text = [[f"{v:.{digits}f}" for v in row] for row in values[todo].tolist()]
        same = (_read_back(np.array(text, dtype=np.float64).reshape(-1, 4), w_, h_) == rec.target.boxes[todo]).all(1)
        for k, ok in zip(todo.tolist(), same.tolist(), strict=True):
            if ok:
                fields[k] = text.pop(0)
            else:
                text.pop(0)
        todo = todo[~same]
    for k in todo.tolist():
        fields[k] = [repr(v) for v in values[k].tolist()]  # float64's shortest exact decimal
    return fields


def _check_writable(dataset: Dataset) -> None:
    """What YOLO cannot store, refused before anything is written (beyond
    :func:`mgral.data.records.check_writable`)."""
    if not len(dataset):
        raise DatasetError("cannot write a YOLO dataset without images: the reader needs at least one in images/")
    for rec in dataset:
        suffix = PurePosixPath(rec.file_name).suffix
        if suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(
                f"{describe_image(rec.id, rec.file_name)}: the YOLO reader lists images by suffix "
                f"({', '.join(IMAGE_SUFFIXES)}), not {suffix or 'no suffix'!r}; convert or rename the image to "
                "write YOLO"
            )


def write(dataset: Dataset, out_dir: Path, *, copy_images: bool = True) -> None:
    """Write an Ultralytics layout into the existing empty ``out_dir``.

    ``images/<split>/<name><suffix>`` (when ``copy_images``), ``labels/<split>/<name>.txt``
    (flat ``images/`` and ``labels/`` for split ``None``; an empty label file for an image
    without boxes), ``data.yaml`` and ``classes.txt``. Coordinates have 6 decimals, or more
    where 6 would not read back as the same box. Class index = the category's position
    in ``dataset.categories``. ``<name>`` is the file stem, made unique with its folder when
    two images share a stem. Without ``copy_images`` the result cannot be read back: the
    reader needs the images for their sizes.

    Raises:
        DatasetError: a source image is missing, an image suffix the reader does not list, a
            category name that cannot be stored, or no images.
    """
    out_dir = Path(out_dir)
    index = {c.id: i for i, c in enumerate(dataset.categories)}
    names = [c.name for c in dataset.categories]
    _check_writable(dataset)
    write_names_file(out_dir / "classes.txt", names)
    for rec, base in zip(dataset, output_names(dataset).values(), strict=True):
        folder = PurePosixPath(rec.split) if rec.split else PurePosixPath()
        if copy_images:
            dst = out_dir / "images" / folder / (base + PurePosixPath(rec.file_name).suffix)
            link_or_copy(dataset.root / rec.file_name, dst, what=describe_image(rec.id, rec.file_name))
        for label in rec.target.labels.tolist():
            if label not in index:
                raise DatasetError(
                    f"{describe_image(rec.id, rec.file_name)}: label {label} is not a category id ({sorted(index)})"
                )
        lines = [
            f"{index[label]} {' '.join(fields)}\n"
            for label, fields in zip(rec.target.labels.tolist(), _fields(rec), strict=True)
        ]
        label_file = out_dir / "labels" / folder / f"{base}.txt"
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text("".join(lines), encoding="utf-8")
    present = {r.split for r in dataset}
    config: dict[str, object] = {"path": "."}
    for split in SPLITS:
        if split in present:
            config[split] = f"images/{split}"
    if None in present:
        config.setdefault("train", "images")
    config["names"] = names
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text)["names"] != names:  # PyYAML mangles a few characters (NEL) when it writes them raw
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=False)
    (out_dir / "data.yaml").write_text(text, encoding="utf-8")


def sniff(path: Path) -> str | None:
    """A reason string if ``path`` is a directory with ``images/`` and ``labels/``."""
    path = Path(path)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "contains images/ and labels/"
    return None
