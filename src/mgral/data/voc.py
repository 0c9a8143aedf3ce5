"""Pascal VOC XML: read, validate, write.

Two layouts are read:

* devkit: ``Annotations/<id>.xml``, images in ``JPEGImages/``, splits from
  ``ImageSets/Main/{train,val,test}.txt`` or an alias of the name (``valid.txt``, ... see
  :func:`~mgral.data.records.canonical_split`; images in none of them get split ``None``;
  ``trainval.txt`` is not used). Image id = the XML stem.
* LabelImg: each XML beside its image anywhere below the root (as in
  ``pinochle-cards/images/{train,test}/``); split = the parent folder's name when it is
  ``train``/``val``/``test`` or an alias of one (``valid``, ...). Image id = see :func:`path_ids`.

A ``VOCdevkit`` folder holding several years (``VOC2007/``, ``VOC2012/``) is the ``voc0712``
layout (:mod:`mgral.data.voc0712`, which reuses this module's reader per annotation file);
this reader refuses it with that hint.

VOC corners are 1-based inclusive integers: ``xmin..xmax`` maps to ``[xmin - 1, xmax]``
(see :mod:`mgral.data.records`); writing rounds back to integers. VOC stores only class
names: category ids are ``1..K`` in the order of a names file at the root (``labels.txt``,
``classes.txt`` or ``voc.names``, one name a line), else in sorted name order. ``difficult``
is kept; ``iscrowd`` cannot be stored and is dropped on write.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np

from mgral._untrusted import short_repr
from mgral.data._files import RootGuard, read_regular_file
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
    check_image_size,
    check_images_exist,
    describe_image,
    safe_relative_path,
    split_conflict,
)
from mgral.errors import DatasetError

NAMES_FILES = ("labels.txt", "classes.txt", "voc.names")
_CORNERS = ("xmin", "ymin", "xmax", "ymax")


# -- reading ---------------------------------------------------------------------------------


class ImageFinder:
    """Finds image files below ``root``, falling back to case-insensitive matches
    (Pinochle mixes ``.JPG`` and ``.jpg``) and to ``<stem>.<any image suffix>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[str, dict[str, str]] = {}

    def _listing(self, rel_dir: str) -> dict[str, str]:
        if rel_dir not in self._listings:
            try:
                with os.scandir(self.root / rel_dir) as it:
                    self._listings[rel_dir] = {e.name.lower(): e.name for e in it if e.is_file()}
            except OSError:
                self._listings[rel_dir] = {}
        return self._listings[rel_dir]

    def find(self, rel_dir: str, filename: str | None, stem: str) -> str | None:
        """The image's path relative to ``root``, or None."""
        if filename is not None:
            rel = PurePosixPath(rel_dir, filename)
            if (self.root / rel).is_file():
                return str(rel)
            hit = self._listing(str(rel.parent)).get(rel.name.lower())
            if hit is not None:
                return str(rel.parent / hit)
        listing = self._listing(rel_dir)
        for suffix in IMAGE_SUFFIXES:
            hit = listing.get(f"{stem}{suffix}".lower())
            if hit is not None:
                return str(PurePosixPath(rel_dir, hit))
        return None


def _parse_xml(file: Path, source: str, guard: RootGuard | None = None) -> ET.Element:
    if guard is not None:
        guard.check(file)
    try:
        root = SafeET.fromstring(read_regular_file(file, expected="a Pascal VOC <annotation> XML file"))
    except SafeET.ParseError as err:
        raise DatasetError(f"{source}: malformed XML ({err}); expected a Pascal VOC <annotation> file") from err
    except defusedxml.DefusedXmlException as err:
        raise DatasetError(
            f"{source}: refused unsafe XML ({type(err).__name__}: entities, DTDs and external references are not "
            "allowed in VOC annotations)"
        ) from err
    except (LookupError, ValueError) as err:  # expat: an unknown or multi-byte encoding declaration
        raise DatasetError(f"{source}: unreadable XML ({err}); expected a UTF-8 Pascal VOC <annotation> file") from err
    except OSError as err:
        raise DatasetError(f"{source}: cannot read the XML file: {err.strerror or err}") from err
    if root.tag != "annotation":
        raise DatasetError(f"{source}: expected the root element <annotation>, got <{root.tag}>")
    return root


def _number(elem: ET.Element, path: str, *, source: str, where: str) -> float:
    text = elem.findtext(path)
    if text is None:
        raise DatasetError(f"{source}: {where}: missing required element <{path}>")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{source}: {where}: expected <{path}> to be a finite number, got {text.strip()!r:.40}")
    return value


def _class_name(name: object) -> str:
    return f"class {short_repr(name, 60)}"


def _read_xml(
    file: Path, *, source: str, image_id: str, clip: bool, guard: RootGuard | None = None
) -> tuple[str | None, int, int, list]:
    """(filename, width, height, [(box, name, difficult), ...]) of one annotation file."""
    root = _parse_xml(file, source, guard)
    filename = (root.findtext("filename") or "").strip() or None
    where = describe_image(image_id, filename)
    if filename is not None:
        filename = safe_relative_path(filename, source=source, where=where)
    width, height = check_image_size(
        _number(root, "size/width", source=source, where=where),
        _number(root, "size/height", source=source, where=where),
        source=source,
        where=where,
    )
    objects = []
    for k, obj in enumerate(root.iter("object")):
        check_box_count(
            k + 1,
            source=source,
            where=where,
            boxes=[box for box, _, _ in objects],
            labels=[name for _, name, _ in objects],
            label_name=_class_name,
        )
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{source}: {where}: object {k} has no <name>; expected the class name")
        here = f"{where}: object {k}"
        xmin, ymin, xmax, ymax = (_number(obj, f"bndbox/{c}", source=source, where=here) for c in _CORNERS)
        for lo, hi, axis in ((xmin, xmax, "x"), (ymin, ymax, "y")):
            if hi < lo:
                raise DatasetError(
                    f"{source}: {where}: box {k} has {axis}max {hi:g} < {axis}min {lo:g}; expected "
                    f"{axis}min <= {axis}max (1-based inclusive pixel corners)"
                )
        box = check_box(
            (xmin - 1, ymin - 1, xmax, ymax),
            width=width,
            height=height,
            source=source,
            where=where,
            index=k,
            clip=clip,
            convention="xmin - 1, ymin - 1, xmax, ymax from VOC 1-based corners",
        )
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DatasetError(f"{source}: {here}: expected <difficult> to be 0 or 1, got {short_repr(difficult, 40)}")
        objects.append((box, name, difficult == "1"))
    check_identical_boxes(
        [box for box, _, _ in objects],
        [name for _, name, _ in objects],
        source=source,
        where=where,
        label_name=_class_name,
    )
    return filename, width, height, objects


def split_file_ids(path: Path, *, guard: RootGuard | None = None) -> list[tuple[int, str]]:
    """(line number, image id) of each non-blank line of an ``ImageSets/Main/<split>.txt`` file
    (the id is the line's first word: the per-class files add a ``1``/``-1`` flag after it)."""
    lines = read_text(path, what="image ids, one a line", guard=guard).splitlines()
    return [(n, line.split()[0]) for n, line in enumerate(lines, start=1) if line.strip()]


def _devkit_splits(root: Path, ids: set[str], guard: RootGuard) -> dict[str, str]:
    splits: dict[str, str] = {}
    listed_in: dict[str, str] = {}
    files = [(canonical_split(p.stem), p) for p in (root / "ImageSets" / "Main").glob("*.txt")]
    for split, path in sorted(((s, p) for s, p in files if s), key=lambda sp: (SPLITS.index(sp[0]), sp[1].name)):
        for n, image_id in split_file_ids(path, guard=guard):
            if image_id not in ids:
                raise DatasetError(
                    f"{path}: line {n}: image {image_id!r} has no Annotations/{image_id}.xml "
                    "(remove the line or add the annotation)"
                )
            if splits.setdefault(image_id, split) != split:
                raise DatasetError(
                    f"{path}: line {n}: image {image_id!r} is also in {listed_in[image_id]}; "
                    "expected each image in one split"
                )
            listed_in.setdefault(image_id, path.name)
    return splits


def _categories(
    root: Path, records: list[ImageRecord], object_names: list[list[str]], xml_files: list[Path], guard: RootGuard
) -> list[Category]:
    """Ids ``1..K`` in names-file order (sorted names without one); every object's class must be listed."""
    found = read_names_file(root, NAMES_FILES, guard=guard)
    if found is None:
        return [Category(i, n) for i, n in enumerate(sorted({n for names in object_names for n in names}), start=1)]
    listed, names_file = found
    known = set(listed)
    for rec, names, file in zip(records, object_names, xml_files, strict=True):
        for k, name in enumerate(names):
            if name not in known:
                raise DatasetError(
                    f"{file}: {describe_image(rec.id, rec.file_name)}: object {k} has class {name!r}, which is not "
                    f"in {names_file} {listed}; add it there"
                )
    return [Category(i, n) for i, n in enumerate(listed, start=1)]


def read_record(
    file: Path,
    *,
    image_id: str,
    image_dir: str,
    finder: ImageFinder,
    split: str | None,
    check_files: bool,
    clip_boxes: bool,
    guard: RootGuard | None = None,
) -> tuple[ImageRecord, list[str]]:
    """One annotation file as an :class:`ImageRecord` (labels still 0: see :func:`set_labels`)
    and its objects' class names. ``image_dir`` is where the image is looked up, relative to
    ``finder.root``; ``guard`` (if given) refuses an annotation file that a symbolic link
    leads out of the dataset root.

    Raises:
        DatasetError: as :func:`read`, naming ``file``.
    """
    filename, width, height, objects = _read_xml(
        file, source=str(file), image_id=image_id, clip=clip_boxes, guard=guard
    )
    file_name = finder.find(image_dir, filename, file.stem)
    if file_name is None:
        file_name = str(PurePosixPath(image_dir, filename or f"{file.stem}.jpg"))
        if check_files:
            raise DatasetError(
                f"{file}: {describe_image(image_id, filename)}: no image file {file_name!r} (nor "
                f"{file.stem}.<jpg|png|...>) under {str(finder.root)!r}; pass the right image root or "
                "check_files=False / --no-check-files"
            )
    boxes = np.array([box for box, _, _ in objects], dtype=np.float32).reshape(-1, 4)
    target = Target(boxes, np.zeros(len(boxes)), difficult=[d for *_, d in objects])
    return ImageRecord(image_id, file_name, width, height, split, target), [name for _, name, _ in objects]


def set_labels(records: list[ImageRecord], object_names: list[list[str]], categories: list[Category]) -> None:
    """Set each record's labels from its objects' class names (every name must be a category's)."""
    category_ids = {c.name: c.id for c in categories}
    for rec, names in zip(records, object_names, strict=True):
        rec.target.labels = np.array([category_ids[n] for n in names], dtype=np.int64)


def year_dirs(root: Path) -> list[str]:
    """The ``VOC<year>`` devkits directly below ``root`` (a ``VOCdevkit`` folder), sorted."""
    try:
        return sorted(p.name for p in root.iterdir() if p.name.startswith("VOC") and (p / "Annotations").is_dir())
    except OSError:
        return []


def read(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    clip_boxes: bool = False,
    follow_links: bool = False,
) -> Dataset:
    """Read a VOC dataset directory (devkit or LabelImg layout) into a validated :class:`Dataset`.

    ``image_root`` (default ``path``) is where the images are looked up, in the same
    layout (``JPEGImages/...`` or beside where the XML files are). A dataset file or image
    that a symbolic link leads out of its root is refused unless ``follow_links``.

    Raises:
        DatasetError: no XML files, malformed or unsafe XML, a FIFO or device where a file is
            expected, a missing or invalid field or box, too many boxes or copies of one box in
            an image, a class missing from the names file or listed twice, a bad split file, one
            image file in two splits, a link out of the root, or (``check_files``) an image
            file that cannot be found.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: expected a VOC dataset directory (Annotations/ or XML files beside images)")
    devkit = (root / "Annotations").is_dir()
    years = [] if devkit else year_dirs(root)
    if years:
        raise DatasetError(
            f"{root}: a VOCdevkit folder with {', '.join(y + '/' for y in years)} rather than one VOC dataset; read "
            f"it with format voc0712 (VOC2007 trainval + test and VOC2012 trainval), or point the path at one of "
            f"{', '.join(years)}"
        )
    xml_files = sorted((root / "Annotations").glob("*.xml") if devkit else root.rglob("*.xml"))
    if not xml_files:
        raise DatasetError(
            f"{root}: no VOC .xml annotation files found (expected Annotations/*.xml or *.xml beside images)"
        )
    rel_xml = [f.relative_to(root).as_posix() for f in xml_files]
    ids = [f.stem for f in xml_files] if devkit else path_ids(rel_xml)
    guard = RootGuard(root, follow_links=follow_links)
    splits = _devkit_splits(root, set(ids), guard) if devkit else {}
    finder = ImageFinder(Path(image_root) if image_root is not None else root)

    records, object_names = [], []
    for file, rel, image_id in zip(xml_files, rel_xml, ids, strict=True):
        rel_dir = "JPEGImages" if devkit else str(PurePosixPath(rel).parent)
        parent = PurePosixPath(rel).parent.name
        split = splits.get(image_id) if devkit else canonical_split(parent)
        rec, names = read_record(
            file,
            image_id=image_id,
            image_dir=rel_dir,
            finder=finder,
            split=split,
            check_files=check_files,
            clip_boxes=clip_boxes,
            guard=guard,
        )
        records.append(rec)
        object_names.append(names)

    check_one_split_per_file(records, xml_files)
    categories = _categories(root, records, object_names, xml_files, guard)
    set_labels(records, object_names, categories)
    dataset = Dataset(finder.root, categories, records)
    if check_files:
        check_images_exist(dataset, source=str(root), follow_links=follow_links)
    return dataset


def check_one_split_per_file(records: list[ImageRecord], xml_files: list[Path]) -> None:
    """Refuse two annotation files whose image is one file, in different splits."""
    first: dict[str, ImageRecord] = {}
    for rec, file in zip(records, xml_files, strict=True):
        other = first.setdefault(rec.file_name, rec)
        if other.split != rec.split:
            where = describe_image(rec.id, rec.file_name)
            raise split_conflict(str(file), where, rec.file_name, f"image {other.id!r}", other.split, rec.split)


# -- writing ---------------------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: object) -> ET.Element:
    elem = ET.SubElement(parent, tag)
    elem.text = str(text)
    return elem


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""A character XML 1.0 cannot hold (control characters, lone surrogates, U+FFFE/U+FFFF)."""


def _check_writable(dataset: Dataset, bases: list[str]) -> None:
    """What VOC cannot store, refused before anything is written (beyond
    :func:`mgral.data.records.check_writable`)."""
    if not len(dataset):
        raise DatasetError("cannot write a VOC dataset without images: the reader needs at least one Annotations/*.xml")
    for c in dataset.categories:
        if _NOT_XML.search(c.name):
            raise DatasetError(
                f"category name {c.name!r} has a character XML cannot hold ({_NOT_XML.search(c.name).group()!r}); "  # type: ignore[union-attr]
                "rename the category to write VOC"
            )
    for rec, base in zip(dataset, bases, strict=True):
        where = describe_image(rec.id, rec.file_name)
        name = base + PurePosixPath(rec.file_name).suffix
        bad = _NOT_XML.search(name)
        if bad:
            raise DatasetError(
                f"{where}: its VOC file name {name!r} has a character XML cannot hold ({bad.group()!r}); rename the "
                "image file to write VOC"
            )
        if name != name.strip():
            raise DatasetError(
                f"{where}: its VOC file name {name!r} starts or ends with white space, which <filename> does not "
                "keep; rename the image file to write VOC"
            )
        if rec.split in SPLITS and base.split() != [base]:
            raise DatasetError(
                f"{where}: its VOC name {base!r} has white space, which ImageSets/Main/{rec.split}.txt cannot hold "
                "(its lines are split at white space); rename the image file (e.g. spaces to '_') to write VOC"
            )


def _annotation_xml(rec: ImageRecord, image_name: str, names: dict[int, str]) -> bytes:
    root = ET.Element("annotation")
    _sub(root, "folder", "JPEGImages")
    _sub(root, "filename", image_name)
    size = ET.SubElement(root, "size")
    for tag, value in (("width", rec.width), ("height", rec.height), ("depth", 3)):
        _sub(size, tag, value)
    _sub(root, "segmented", 0)
    t = rec.target
    written = []
    for box, label, difficult in zip(t.boxes.tolist(), t.labels.tolist(), t.difficult.tolist(), strict=True):
        if label not in names:
            raise DatasetError(
                f"{describe_image(rec.id, rec.file_name)}: label {label} is not a category id ({sorted(names)})"
            )
        obj = ET.SubElement(root, "object")
        _sub(obj, "name", names[label])
        _sub(obj, "pose", "Unspecified")
        _sub(obj, "truncated", 0)
        _sub(obj, "difficult", int(difficult))
        xmin = min(max(round(box[0]) + 1, 1), rec.width)
        ymin = min(max(round(box[1]) + 1, 1), rec.height)
        xmax = max(min(max(round(box[2]), 1), rec.width), xmin)
        ymax = max(min(max(round(box[3]), 1), rec.height), ymin)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(_CORNERS, (xmin, ymin, xmax, ymax), strict=True):
            _sub(bndbox, tag, value)
        written.append((xmin - 1, ymin - 1, xmax, ymax))
    # boxes that differ by less than a pixel are one box once rounded
    check_identical_boxes(
        written,
        t.labels.tolist(),
        source="cannot write VOC",
        where=f"{describe_image(rec.id, rec.file_name)}, rounded to whole pixels",
        label_name=lambda label: _class_name(names[label]),  # type: ignore[index]
    )
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def write(dataset: Dataset, out_dir: Path, *, copy_images: bool = True) -> None:
    """Write a VOC devkit layout into the existing empty ``out_dir``.

    ``Annotations/<name>.xml``, ``JPEGImages/<name><suffix>`` (when ``copy_images``),
    ``ImageSets/Main/<split>.txt`` for the splits present and ``labels.txt`` (category
    names in id order). ``<name>`` is the image's file stem, made unique with its folder
    when two images share a stem. Boxes are rounded to integer corners; ``iscrowd`` is lost.

    Raises:
        DatasetError: a source image is missing, a category or file name VOC cannot store (line
            breaks, characters XML cannot hold, white space in a name listed in a split file), no
            images, or boxes that rounding makes too many copies of one box.
    """
    out_dir = Path(out_dir)
    names = dict(sorted(dataset.category_names.items()))
    bases = list(output_names(dataset).values())
    _check_writable(dataset, bases)
    (out_dir / "Annotations").mkdir()
    write_names_file(out_dir / "labels.txt", list(names.values()))
    splits: dict[str, list[str]] = {}
    for rec, base in zip(dataset, bases, strict=True):
        image_name = base + PurePosixPath(rec.file_name).suffix
        if copy_images:
            what = describe_image(rec.id, rec.file_name)
            link_or_copy(dataset.root / rec.file_name, out_dir / "JPEGImages" / image_name, what=what)
        (out_dir / "Annotations" / f"{base}.xml").write_bytes(_annotation_xml(rec, image_name, names))
        if rec.split is not None:
            splits.setdefault(rec.split, []).append(base)
    if splits:
        (out_dir / "ImageSets" / "Main").mkdir(parents=True)
    for split, ids in splits.items():
        (out_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def sniff(path: Path) -> str | None:
    """A reason string if ``path`` is a directory with ``Annotations/`` or VOC XML files."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "Annotations").is_dir():
        return "contains Annotations/"
    if year_dirs(path):
        return None  # a VOCdevkit of several years: the voc0712 layout's
    for xml in path.rglob("*.xml"):
        if not xml.is_file():  # a FIFO would block the open
            continue
        try:
            with xml.open("rb") as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if b"<annotation" in head:
            return f"contains VOC XML beside images ({xml.relative_to(path).as_posix()})"
    return None
