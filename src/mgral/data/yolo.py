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
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from PIL import Image

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
    check_box,
    describe_image,
)
from mgral.errors import DatasetError

YAML_FILES = ("data.yaml", "data.yml", "dataset.yaml")
NAMES_FILES = ("classes.txt", "obj.names")
# Normalized values may stick out of [0, 1] by this much (rounding in exporters).
_TOLERANCE = 1e-3


def _class_names(root: Path) -> tuple[dict[int, str], str]:
    """Class index -> name, and the file it came from."""
    for name in YAML_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(read_text(path, what="a YOLO data.yaml"))
        except yaml.YAMLError as err:
            raise DatasetError(f"{path}: malformed YAML ({err}); expected a YOLO data.yaml with 'names'") from err
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a YAML mapping with 'names', got {type(data).__name__}")
        names = data.get("names")
        if names is None:  # a data.yaml without names: the names may be in classes.txt
            continue
        if isinstance(names, list):
            names = dict(enumerate(names))
        if not isinstance(names, dict) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, str) and v.strip()
            for k, v in names.items()
        ):
            raise DatasetError(
                f"{path}: expected 'names' to be a list of class names or a {{index: name}} mapping, got {names!r:.120}"
            )
        return {k: names[k] for k in sorted(names)}, str(path)
    found = read_names_file(root, NAMES_FILES)
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
    boxes, labels = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        here = f"{where}: line {n} (box {len(boxes)})"
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
                f"{source}: {here}: class index {cls} is out of range; expected 0..{max(classes, default=-1)} "
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
) -> Dataset:
    """Read a YOLO dataset directory into a validated :class:`Dataset`.

    Labels are read from ``path/labels``; images are listed from ``image_root/images``
    (``image_root`` defaults to ``path``). Images are always opened for their size, so
    ``check_files`` has no effect. Image ids follow :func:`mgral.data.voc.path_ids`.

    Raises:
        DatasetError: no ``images/`` folder, no class names, an unreadable image, a label
            file without an image, a malformed line, a class index out of range, or a box
            outside its image (unless ``clip_boxes``).
    """
    root = Path(path)
    image_dir_root = Path(image_root) if image_root is not None else root
    images_dir, labels_dir = image_dir_root / "images", root / "labels"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: expected a YOLO dataset directory with images/ and labels/, found no {images_dir}")
    classes, names_source = _class_names(root)
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
    for rel, image_id in zip(image_files, path_ids([f"images/{f}" for f in image_files]), strict=True):
        file_name = f"images/{rel}"
        where = describe_image(image_id, file_name)
        width, height = _image_size(image_dir_root / file_name, where=where)
        label_file = labels_dir / PurePosixPath(rel).with_suffix(".txt")
        target = Target()
        if label_file.is_file():
            text = read_text(label_file, what="YOLO label lines 'class cx cy w h'")
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
        split = top if top in SPLITS and len(PurePosixPath(rel).parts) > 1 else None
        records.append(ImageRecord(image_id, file_name, width, height, split, target))
    if not records:
        raise DatasetError(f"{images_dir}: no image files found (expected {', '.join(IMAGE_SUFFIXES)})")
    categories = [Category(i + 1, name) for i, name in classes.items()]
    return Dataset(image_dir_root, categories, records)


def write(dataset: Dataset, out_dir: Path, *, copy_images: bool = True) -> None:
    """Write an Ultralytics layout into the existing empty ``out_dir``.

    ``images/<split>/<name><suffix>`` (when ``copy_images``), ``labels/<split>/<name>.txt``
    (flat ``images/`` and ``labels/`` for split ``None``; an empty label file for an image
    without boxes), ``data.yaml`` and ``classes.txt``. Class index = the category's position
    in ``dataset.categories``. ``<name>`` is the file stem, made unique with its folder when
    two images share a stem. Without ``copy_images`` the result cannot be read back: the
    reader needs the images for their sizes.

    Raises:
        DatasetError: a source image is missing, or a category name cannot be stored.
    """
    out_dir = Path(out_dir)
    index = {c.id: i for i, c in enumerate(dataset.categories)}
    names = [c.name for c in dataset.categories]
    write_names_file(out_dir / "classes.txt", names)
    for rec, base in zip(dataset, output_names(dataset).values(), strict=True):
        folder = PurePosixPath(rec.split) if rec.split else PurePosixPath()
        if copy_images:
            dst = out_dir / "images" / folder / (base + PurePosixPath(rec.file_name).suffix)
            link_or_copy(dataset.root / rec.file_name, dst, what=describe_image(rec.id, rec.file_name))
        lines = []
        for (x1, y1, x2, y2), label in zip(rec.target.boxes.tolist(), rec.target.labels.tolist(), strict=True):
            if label not in index:
                raise DatasetError(
                    f"{describe_image(rec.id, rec.file_name)}: label {label} is not a category id ({sorted(index)})"
                )
            cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
            w, h = (x2 - x1) / rec.width, (y2 - y1) / rec.height
            lines.append(f"{index[label]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
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
    (out_dir / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def sniff(path: Path) -> str | None:
    """A reason string if ``path`` is a directory with ``images/`` and ``labels/``."""
    path = Path(path)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "contains images/ and labels/"
    return None
