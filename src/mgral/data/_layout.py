"""File-layout helpers shared by the folder formats (VOC, YOLO) and the COCO writer:
image ids from paths, flat output names, names files, copying images."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from mgral.data._files import RootGuard, read_regular_file
from mgral.data.records import Dataset, ImageId
from mgral.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class OutputExistsError(DatasetError, FileExistsError):
    """An output directory that cannot be written: a file, a non-empty directory without
    ``overwrite``, or one mgral did not write (a FileExistsError too, for older callers)."""


def path_ids(rel_paths: Sequence[str]) -> list[str]:
    """Image ids for files given as POSIX paths relative to the dataset root.

    The file stem where no other file has the same stem, else the relative path without
    its suffix (``images/train/a`` and ``images/test/a``), so ids are stable and readable.
    """
    stems = [PurePosixPath(p).stem for p in rel_paths]
    counts = Counter(stems)
    return [
        s if counts[s] == 1 else str(PurePosixPath(p).with_suffix("")) for s, p in zip(stems, rel_paths, strict=True)
    ]


def output_names(dataset: Dataset) -> dict[ImageId, str]:
    """Unique flat file names (no suffix) for writing each image into one folder."""
    taken: set[str] = set()
    names = {}
    for rec, base in zip(dataset, path_ids([r.file_name for r in dataset]), strict=True):
        name = base.replace("/", "_")
        candidate, n = name, 1
        while candidate in taken:  # only when flattening made two names equal
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        names[rec.id] = candidate
    return names


def read_text(path: Path, *, what: str, guard: RootGuard | None = None) -> str:
    """A small UTF-8 text file's content, or DatasetError naming it (also for a FIFO, a device,
    or, with ``guard``, a symbolic link out of the dataset root)."""
    if guard is not None:
        guard.check(path)
    try:
        return read_regular_file(path, expected=what).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected {what}") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read {what}: {err.strerror or err}") from err


def read_names_file(
    root: Path, candidates: Sequence[str], *, guard: RootGuard | None = None
) -> tuple[list[str], Path] | None:
    """Class names from the first of ``candidates`` present in ``root``, one per line."""
    for name in candidates:
        path = root / name
        if os.path.lexists(path):
            names = [line.strip() for line in read_text(path, what="class names, one a line", guard=guard).splitlines()]
            names = [n for n in names if n]
            dupes = sorted(n for n, k in Counter(names).items() if k > 1)
            if dupes:
                raise DatasetError(f"{path}: class names {dupes} appear more than once; expected each name once")
            return names, path
    return None


def write_names_file(path: Path, names: Sequence[str]) -> None:
    for name in names:
        if len(name.splitlines()) != 1 or name != name.strip() or name.startswith("\ufeff"):
            raise DatasetError(
                f"category name {name!r} has line breaks, surrounding spaces or a leading byte-order mark; "
                f"{path.name} cannot store it (rename the category)"
            )
    try:
        "".join(names).encode("utf-8")
    except UnicodeEncodeError as err:
        raise DatasetError(
            f"a category name holds {err.object[err.start : err.end]!r}, which is not valid Unicode text "
            f"({err.reason}); {path.name} cannot store it (rename the category)"
        ) from err
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def link_or_copy(src: Path, dst: Path, *, what: str) -> None:
    """Place ``src`` at ``dst``: a hard link when possible (fast, no extra space), else a copy.
    A symbolic link is resolved first: the output holds the file, never a link that would
    dangle (a relative link) or lead out of it.

    Raises:
        DatasetError: ``src`` does not exist (``what`` names the image in the message).
    """
    if not src.is_file():
        raise DatasetError(f"{what}: image file {str(src)!r} does not exist; cannot copy it to the output")
    src = Path(os.path.realpath(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):  # two records of one file (COCO keeps its names)
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def read_json(path: Path, *, expected: str, guard: RootGuard | None = None) -> object:
    """Parse a JSON file; any failure is a DatasetError naming the file and ``expected``
    (e.g. "a COCO JSON object"), with the line and column of a syntax error. A FIFO or device
    is refused before it is read; so is, with ``guard``, a symbolic link out of the dataset root."""
    source = str(path)
    if guard is not None:
        guard.check(path)
    try:
        data = read_regular_file(path, expected=expected)
    except OSError as err:
        raise DatasetError(f"{source}: cannot read the file: {err.strerror or err}; expected {expected}") from err
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{source}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg} (expected {expected})"
        ) from err
    except UnicodeDecodeError as err:
        raise DatasetError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start}); expected {expected}") from err
    except (ValueError, RecursionError) as err:  # e.g. an integer beyond Python's digit limit, absurd nesting
        raise DatasetError(f"{source}: unreadable JSON ({err}); expected {expected}") from err
