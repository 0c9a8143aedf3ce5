"""The dataset formats by name, format detection, and conversion between them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mgral._io import atomic_directory
from mgral.data import coco, voc, yolo
from mgral.data.records import Dataset
from mgral.errors import DatasetError
from mgral.registry import Registry


@dataclass(frozen=True)
class Format:
    """One dataset format: its reader, writer and sniffer (see :mod:`mgral.data.coco`)."""

    name: str
    read: Callable[..., Dataset]
    write: Callable[..., None]
    sniff: Callable[[Path], str | None]
    summary: str


FORMATS: Registry[Format] = Registry("format")


def _register(module: ModuleType, summary: str) -> None:
    name = module.__name__.rsplit(".", 1)[-1]
    FORMATS.add(name, Format(name, module.read, module.write, module.sniff, summary), summary)


_register(coco, "COCO detection JSON (a .json file, or a directory with one); keeps split, iscrowd, difficult")
_register(voc, "Pascal VOC XML (Annotations/ + JPEGImages/, or LabelImg XML beside images); keeps difficult")
_register(yolo, "YOLO txt labels (images/ + labels/ + data.yaml, Ultralytics layout); no flags")


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name of the format of ``path``: a ``.json`` file is COCO; a directory is asked
    of every format's ``sniff`` and exactly one must match.

    Raises:
        DatasetError: ``path`` is missing, or no format or several formats match.
    """
    path = Path(path)
    hint = "pass --from coco|voc|yolo"
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
            f"{path}: found no dataset: expected a COCO .json file, VOC Annotations/ or XML files, or YOLO "
            f"images/ and labels/; {hint}"
        )
    what = " and ".join(f"{name.upper()} ({reason})" for name, reason in found)
    raise DatasetError(f"{path}: found {what}; {hint}")


def read_dataset(path: str | os.PathLike[str], format: str | None = None, **opts: object) -> Dataset:
    """Read ``path`` in ``format`` (detected when ``None``); ``opts`` go to the reader
    (``image_root``, ``check_files``, ``clip_boxes``).

    Raises:
        ConfigError: an unknown format name.
        DatasetError: anything the reader refuses.
    """
    name = format if format is not None else detect_format(path)
    return FORMATS.get(name).read(path, **opts)


def write_dataset(
    dataset: Dataset,
    out: str | os.PathLike[str],
    format: str,
    *,
    overwrite: bool = False,
    copy_images: bool = True,
) -> Path:
    """Write ``dataset`` as a ``format`` directory at ``out``, all or nothing.

    The directory is built beside ``out`` and moved into place only when complete.

    Raises:
        ConfigError: an unknown format name.
        DatasetError: ``out`` exists and is not empty (without ``overwrite``), or the writer
            refuses the dataset (e.g. a missing image).
    """
    fmt = FORMATS.get(format)
    out = Path(out)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            fmt.write(dataset, tmp, copy_images=copy_images)
    except FileExistsError as err:
        raise DatasetError(f"{err}; choose an empty directory or pass --overwrite / overwrite=True") from err
    return out


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    from_: str | None = None,
    overwrite: bool = False,
    copy_images: bool = True,
    **read_opts: object,
) -> Dataset:
    """Read ``src`` (format ``from_``, detected when ``None``) and write it to ``dst`` as ``to``.

    The whole source is validated before anything is written. Returns the dataset read.

    Raises:
        ConfigError: an unknown format name.
        DatasetError: as :func:`read_dataset` and :func:`write_dataset`.
    """
    FORMATS.get(to)  # an unknown target format fails before the source is read
    dataset = read_dataset(src, from_, **read_opts)
    write_dataset(dataset, dst, to, overwrite=overwrite, copy_images=copy_images)
    return dataset
