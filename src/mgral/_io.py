"""Atomic writes: a reader never sees a half-written file or directory.

Every state file mgral writes goes through here: the content is written to a temporary
sibling, flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX
within one file system).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgral.errors import DiskFullError

# ENOSPC: the file system is full; EDQUOT: the user's quota on it is.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _mount_point(path: Path) -> Path:
    """The mount point of the file system ``path`` (or its nearest existing parent) is on."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    device = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == device:
        p = p.parent
    return p


def disk_full(path: str | os.PathLike[str], err: OSError) -> DiskFullError:
    """The error to raise when writing ``path`` failed with ``err`` (ENOSPC or EDQUOT)."""
    try:
        device = f"the file system mounted at {_mount_point(Path(path))}"
    except OSError:
        device = "its file system"
    what = "no space" if err.errno == errno.ENOSPC else "no quota"
    return DiskFullError(
        f"{what} left on device ({device}) while writing {path}, which was left as it was before. "
        "Free some space (or write elsewhere) and run the same command again (with --resume for a run)"
    )


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _NO_SPACE


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a full file system can refuse the directory or the inode
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and state are ordinary files
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


OUTPUT_MARKER = ".mgral-output"
"""The file :func:`atomic_directory` puts in every directory it makes (one line of JSON)."""


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str], *, overwrite: bool = False, owned: bool = False, what: str = "output"
) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place on success.

    Yields the temporary directory to fill. If the block raises, the temporary directory is
    removed and ``path`` is untouched. On success the directory gets :data:`OUTPUT_MARKER`, a
    line of JSON saying that mgral wrote it (and ``what``). An existing non-empty ``path`` is
    refused unless ``overwrite`` is set and it holds that marker: ``overwrite`` only ever
    replaces a directory mgral wrote, never one that may hold anything else. ``owned``: the
    caller owns ``path`` whatever it holds (it lies inside a run directory whose lock the caller
    holds, and may predate the marker), so ``overwrite`` needs no marker. The old one is moved
    aside and deleted only after the new one is in place.

    Raises:
        FileExistsError: ``path`` is a file (or anything but a directory); or it is a non-empty
            directory and ``overwrite`` is False, or it lacks the marker. The message says which,
            and what to do.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        kind = "is a file, not a directory" if path.is_file() else "exists and is not a directory"
        raise FileExistsError(
            f"{path} {kind}; choose a directory for the output (a new or empty one, or one mgral wrote before)"
        )
    if path.is_dir() and any(path.iterdir()):
        if not owned and not (path / OUTPUT_MARKER).is_file():
            raise FileExistsError(
                f"{path} exists and is not empty, and was not written by mgral (no {OUTPUT_MARKER}); remove it "
                "yourself or choose another --out"
            )
        if not overwrite:
            raise FileExistsError(
                f"{path} exists and is not empty; choose an empty directory or pass --overwrite / overwrite=True"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path, err) from err
        raise
    try:
        yield tmp
        from mgral import __version__

        marker = {"written_by": "mgral", "version": __version__, "what": what}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):  # whichever file inside it was being written, nothing was moved into place
            raise disk_full(path, err) from err
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / "content")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
