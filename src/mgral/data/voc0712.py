"""The Pascal VOC07+12 layout: one ``VOCdevkit`` folder, the pool and test splits of the AL papers.

Expected below the root (the ``VOCdevkit`` folder the three official archives unpack into)::

    VOC2007/Annotations/<id>.xml   VOC2007/JPEGImages/<id>.jpg   VOC2007/ImageSets/Main/{trainval,test}.txt
    VOC2012/Annotations/<id>.xml   VOC2012/JPEGImages/<id>.jpg   VOC2012/ImageSets/Main/trainval.txt

Splits (:data:`SPLITS`): ``2007-trainval`` (5,011 images), ``2012-trainval`` (11,540) and
``2007-test`` (4,952); the AL protocols pool the two trainval splits (16,551 images) and test
on ``2007-test``. Only the images these files list are read (VOC2012's ``Annotations/`` also
holds action and layout images outside ``Main``). Image id = ``VOC<year>/<file stem>``
(``VOC2007/000005``, ``VOC2012/2008_000008``), unique across the two years; ``file_name`` is
relative to the root. Boxes and ``difficult`` flags are read as :mod:`mgral.data.voc` reads
them (VOC-style AP ignores difficult objects). Categories are the 20 VOC classes in their
standard order (ids 1..20); any other class name is refused.

Read-only (no writer): ``mgral convert VOCdevkit --from voc0712 --to coco`` works, the reverse does not.
"""

from __future__ import annotations

import os
from pathlib import Path

from mgral.data import voc
from mgral.data._files import RootGuard
from mgral.data.records import Category, Dataset, ImageRecord, check_images_exist
from mgral.errors import DatasetError

CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 Pascal VOC classes, in the devkit's order (category ids 1..20)."""

SPLITS = {
    "2007-trainval": ("VOC2007", "trainval"),
    "2012-trainval": ("VOC2012", "trainval"),
    "2007-test": ("VOC2007", "test"),
}
"""Split name -> (year folder, ``ImageSets/Main`` file stem)."""

POOL_SPLITS = ("2007-trainval", "2012-trainval")
TEST_SPLIT = "2007-test"

_ARCHIVES = {
    ("VOC2007", "trainval"): "VOCtrainval_06-Nov-2007.tar",
    ("VOC2007", "test"): "VOCtest_06-Nov-2007.tar",
    ("VOC2012", "trainval"): "VOCtrainval_11-May-2012.tar",
}
_FIX = (
    "expected the VOCdevkit folder that VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar and "
    "VOCtrainval_11-May-2012.tar unpack into (http://host.robots.ox.ac.uk/pascal/VOC/), holding VOC2007/ and VOC2012/"
)


def _check_layout(root: Path) -> None:
    """Every folder and split file the layout needs, or one DatasetError naming what is missing."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory; {_FIX}")
    need: dict[str, list[str]] = {}
    for (year, subset), archive in _ARCHIVES.items():
        if not (root / year).is_dir():
            need.setdefault(f"{year}/", []).append(archive)
            continue
        for rel in (f"{year}/Annotations/", f"{year}/JPEGImages/", f"{year}/ImageSets/Main/{subset}.txt"):
            need.setdefault(rel, []).append(archive)
    missing = [f"{rel} (from {' or '.join(archives)})" for rel, archives in need.items() if not (root / rel).exists()]
    if missing:
        hint = ""
        if (root / "Annotations").is_dir():
            hint = f" ({root.name} is one year's folder: pass its parent, the VOCdevkit folder {root.parent})"
        elif nested := [p.parent.parent.name for p in sorted(root.glob("*/VOC20[01][27]/Annotations")) if p.is_dir()]:
            hint = f" (found a devkit in {nested[0]}/: pass {root / nested[0]} instead)"
        raise DatasetError(f"{root}: the voc0712 layout lacks {', '.join(missing)}{hint}; {_FIX}")


def read(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    clip_boxes: bool = False,
    follow_links: bool = False,
) -> Dataset:
    """Read a ``VOCdevkit`` folder in the VOC07+12 layout into a validated :class:`Dataset`.

    Raises:
        DatasetError: a missing folder or split file (naming it and the archive it comes
            from), a listed image without its XML, an image listed in two splits, a class
            that is not one of the 20 VOC classes, anything :func:`mgral.data.voc.read`
            refuses in an annotation (a symbolic link out of the root: unless ``follow_links``),
            or (``check_files``) a missing image file.
    """
    root = Path(path)
    if image_root is not None:
        raise DatasetError(
            f"{root}: the voc0712 layout reads each year's images from <year>/JPEGImages/; remove image_root"
        )
    _check_layout(root)
    finder = voc.ImageFinder(root)
    guard = RootGuard(root, follow_links=follow_links)
    records: list[ImageRecord] = []
    object_names: list[list[str]] = []
    xml_files: list[Path] = []
    listed: dict[str, str] = {}
    for split, (year, subset) in SPLITS.items():
        list_file = root / year / "ImageSets" / "Main" / f"{subset}.txt"
        for n, stem in voc.split_file_ids(list_file, guard=guard):
            image_id = f"{year}/{stem}"
            if image_id in listed:
                raise DatasetError(
                    f"{list_file}: line {n}: image {stem!r} is also listed in the {listed[image_id]} split; expected "
                    "each image in one split"
                )
            listed[image_id] = split
            xml = root / year / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                raise DatasetError(
                    f"{list_file}: line {n}: image {stem!r} has no {year}/Annotations/{stem}.xml; restore the file "
                    f"(re-extract {_ARCHIVES[(year, subset)]}) or remove the line"
                )
            rec, names = voc.read_record(
                xml,
                image_id=image_id,
                image_dir=f"{year}/JPEGImages",
                finder=finder,
                split=split,
                check_files=check_files,
                clip_boxes=clip_boxes,
                guard=guard,
            )
            for k, name in enumerate(names):
                if name not in CLASSES:
                    raise DatasetError(
                        f"{xml}: object {k} has class {name!r}, which is not one of the 20 VOC classes "
                        f"({', '.join(CLASSES)}); the voc0712 layout is the standard VOC07+12 data set: read other "
                        "classes with format voc, one year's folder at a time"
                    )
            records.append(rec)
            object_names.append(names)
            xml_files.append(xml)
    categories = [Category(i, name) for i, name in enumerate(CLASSES, start=1)]
    voc.set_labels(records, object_names, categories)
    dataset = Dataset(root, categories, records)
    if check_files:
        check_images_exist(dataset, source=str(root), follow_links=follow_links)
    return dataset


def sniff(path: Path) -> str | None:
    """A reason string if ``path`` holds ``VOC2007/`` or ``VOC2012/`` devkits (and no ``Annotations/`` of its own)."""
    path = Path(path)
    if not path.is_dir() or (path / "Annotations").is_dir():
        return None
    years = [y for y in voc.year_dirs(path) if y in ("VOC2007", "VOC2012")]
    return f"contains {' and '.join(y + '/' for y in years)}" if years else None
