"""The dataset formats by name, format detection, and conversion between them.

Besides the three file formats, two read-only *layouts* name the published data sets in
their standard folders: ``voc0712`` (a ``VOCdevkit`` with VOC2007 and VOC2012, see
:mod:`mgral.data.voc0712`) and ``coco2017`` (train2017 + val2017, see
:mod:`mgral.data.coco2017`). Their splits carry the layout's own names (``2007-trainval``,
``train2017``, ...), listed in :data:`LAYOUT_SPLITS`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mgral._io import atomic_directory
from mgral.data import coco, coco2017, voc, voc0712, yolo
from mgral.data._files import FOLLOW_LINKS_HINT, RootGuard
from mgral.data._layout import OutputExistsError
from mgral.data.records import Dataset, check_writable, describe_image
from mgral.errors import ConfigError, DatasetError
from mgral.registry import Registry


@dataclass(frozen=True)
class Format:
    """One dataset format: its reader, writer (None: a read-only layout) and sniffer (see :mod:`mgral.data.coco`)."""

    name: str
    read: Callable[..., Dataset]
    write: Callable[..., None] | None
    sniff: Callable[[Path], str | None]
    summary: str


FORMATS: Registry[Format] = Registry("format")


def _register(module: ModuleType, summary: str) -> None:
    name = module.__name__.rsplit(".", 1)[-1]
    FORMATS.add(name, Format(name, module.read, getattr(module, "write", None), module.sniff, summary), summary)


_register(coco, "COCO detection JSON (a .json file, or a directory with one); keeps split, iscrowd, difficult")
_register(voc, "Pascal VOC XML (Annotations/ + JPEGImages/, or LabelImg XML beside images); keeps difficult")
_register(yolo, "YOLO txt labels (Ultralytics images/ + labels/, CVAT YOLO 1.1, Roboflow; labels only too); no flags")
_register(voc0712, "layout (read-only): VOCdevkit/VOC2007 + VOC2012; splits 2007-trainval, 2012-trainval, 2007-test")
_register(coco2017, "layout (read-only): COCO annotations/instances_*2017.json; splits train2017, val2017")

LAYOUT_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "voc0712": (tuple(voc0712.SPLITS), voc0712.POOL_SPLITS, voc0712.TEST_SPLIT),
    "coco2017": (coco2017.SPLITS, coco2017.POOL_SPLITS, coco2017.TEST_SPLIT),
}
"""Layout name -> (its split names, the AL papers' pool splits, their test split)."""

# The flag is --from, except in import-labels (which reads Label Studio exports too), where it is --format.
_HINT = (
    "name the format: --from coco|voc|yolo|voc0712|coco2017 (mgral import-labels: --format coco|voc|yolo|label-studio)"
)


def writable_format(name: str) -> Format:
    """The format ``name``, which must have a writer.

    Raises:
        ConfigError: an unknown name, or a read-only layout.
    """
    fmt = FORMATS.get(name)
    if fmt.write is None:
        writable = ", ".join(e.name for e in FORMATS.entries() if e.obj.write is not None)
        raise ConfigError(f"{name} is a read-only layout (the published data set's folders); write to {writable}")
    return fmt


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name of the format of ``path``: a ``.json`` file is COCO; a directory is asked
    of every format's ``sniff`` and exactly one must match.

    Raises:
        DatasetError: ``path`` is missing, or no format or several formats match.
    """
    path = Path(path)
    hint = _HINT
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise DatasetError(
            f"{path}: cannot tell the format of a {path.suffix or 'suffix-less'} file; expected a .json file "
            f"or a directory; {hint}"
        )
    found = [(entry.name, reason) for entry in FORMATS.entries() if (reason := entry.obj.sniff(path)) is not None]
    if len(found) == 1:
        return found[0][0]
    if not found:
        raise DatasetError(
            f"{path}: found no dataset: expected a COCO .json file, VOC Annotations/ or XML files, YOLO "
            "images/ and labels/ (or obj_train_data/, train/labels/), a VOCdevkit with VOC2007/ and VOC2012/, or "
            f"COCO's annotations/instances_*2017.json; {hint}"
        )
    what = " and ".join(f"{name.upper()} ({reason})" for name, reason in found)
    raise DatasetError(f"{path}: found {what}; {hint}")


def read_dataset(path: str | os.PathLike[str], format: str | None = None, **opts: object) -> Dataset:
    """Read ``path`` in ``format`` (detected when ``None``); ``opts`` go to the reader
    (``image_root``, ``check_files``, ``clip_boxes``, ``follow_links``).

    Raises:
        ConfigError: an unknown format name.
        DatasetError: anything the reader refuses.
    """
    name = format if format is not None else detect_format(path)
    return FORMATS.get(name).read(path, **opts)


def _check_apart(out: Path, inputs: list[tuple[str, Path, bool]]) -> None:
    """Refuse an output directory that is, contains, or (for a directory the reader scans) lies
    inside one of the ``inputs`` ((what, path, may the output not lie inside it)); paths are
    compared resolved, so links and ``..`` do not hide it."""
    real_out = Path(os.path.realpath(out))
    for what, path, scanned in inputs:
        real = Path(os.path.realpath(path))
        if real == real_out or real.is_relative_to(real_out):
            raise DatasetError(
                f"{out}: the output directory contains the input ({what} {str(path)!r}); writing it would replace "
                "the input: choose an --out outside the input"
            )
        if scanned and real_out.is_relative_to(real):
            raise DatasetError(
                f"{out}: the output directory lies inside the input ({what} {str(path)!r}); reading the input "
                "again would read the output too: choose an --out outside the input"
            )


def write_dataset(
    dataset: Dataset,
    out: str | os.PathLike[str],
    format: str,
    *,
    overwrite: bool = False,
    copy_images: bool = True,
    follow_links: bool = False,
    flat_names: bool = False,
) -> Path:
    """Write ``dataset`` as a ``format`` directory at ``out``, all or nothing.

    The directory is built beside ``out`` and moved into place only when complete; it holds
    a ``.mgral-output`` marker, and ``overwrite`` replaces only a directory that holds one
    (see :func:`mgral._io.atomic_directory`). ``out`` may not be or contain the dataset's
    image root. With ``copy_images`` an image that a symbolic link leads out of the image
    root is refused unless ``follow_links``. ``flat_names`` (COCO only) names each image by
    its base name (:func:`mgral.data.coco.to_coco_dict`); VOC and YOLO always write flat names.

    Raises:
        ConfigError: an unknown format name, a read-only layout, or ``flat_names`` for VOC or YOLO.
        DatasetError: ``out`` is a file, is not empty (without ``overwrite``, or not written by
            mgral), holds the image root, or the writer refuses the dataset (e.g. a missing image,
            or with ``flat_names`` two images sharing a base name).
    """
    fmt = writable_format(format)
    write_opts = _write_opts(fmt, flat_names)
    out = Path(out)
    _check_apart(out, [("image root", dataset.root, False)])
    check_writable(dataset)
    if copy_images and not follow_links:
        guard = RootGuard(dataset.root)
        for rec in dataset:
            if not guard.inside(dataset.root / rec.file_name):
                raise DatasetError(
                    f"{describe_image(rec.id, rec.file_name)}: the image file {str(dataset.root / rec.file_name)!r} "
                    "is a symbolic link (or lies below one) that leads to "
                    f"{guard.resolve(dataset.root / rec.file_name)!r}, "
                    f"outside the dataset root {str(dataset.root)!r}; not copying it into the output (copy the file "
                    f"into the dataset, or {FOLLOW_LINKS_HINT})"
                )
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_directory(out, overwrite=overwrite, what=f"a {fmt.name} dataset"))
        except FileExistsError as err:
            raise OutputExistsError(str(err)) from err
        fmt.write(dataset, tmp, copy_images=copy_images, **write_opts)
    return out


def _write_opts(fmt: Format, flat_names: bool) -> dict[str, bool]:
    if not flat_names:
        return {}
    if fmt.name != "coco":
        raise ConfigError(f"flat names (--flat-names) are for COCO: {fmt.name} always names its images flat")
    return {"flat_names": True}


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    from_: str | None = None,
    overwrite: bool = False,
    copy_images: bool = True,
    flat_names: bool = False,
    **read_opts: object,
) -> Dataset:
    """Read ``src`` (format ``from_``, detected when ``None``) and write it to ``dst`` as ``to``.

    The whole source is validated before anything is written. ``dst`` may not be, contain or
    lie inside ``src`` (nor contain the image root). ``flat_names``: see :func:`write_dataset`.
    Returns the dataset read.

    Raises:
        ConfigError: an unknown format name, a read-only target layout, or ``flat_names`` for
            VOC or YOLO.
        DatasetError: as :func:`read_dataset` and :func:`write_dataset`.
    """
    _write_opts(writable_format(to), flat_names)  # a target that cannot be written fails before the source is read
    src, dst = Path(src), Path(dst)
    inputs = [("source", src, src.is_dir())]
    if read_opts.get("image_root") is not None:
        inputs.append(("image root", Path(read_opts["image_root"]), True))  # type: ignore[arg-type]
    _check_apart(dst, inputs)
    dataset = read_dataset(src, from_, **read_opts)
    write_dataset(
        dataset,
        dst,
        to,
        overwrite=overwrite,
        copy_images=copy_images,
        follow_links=bool(read_opts.get("follow_links", False)),
        flat_names=flat_names,
    )
    return dataset
