"""What every reader does before it opens a dataset file: refuse what is not a regular file
(a FIFO would block forever, a device never end) and what a symbolic link leads to outside
the dataset root (the same rule as for ``..`` in file names, see
:func:`mgral.data.records.safe_relative_path`), unless the caller follows links on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

from mgral._untrusted import read_regular_file as _read_regular_file
from mgral.errors import DatasetError

FOLLOW_LINKS_HINT = "pass --follow-links (a config: dataset.follow_links: true) to read links that lead out of it"


def read_regular_file(path: str | os.PathLike[str], *, expected: str) -> bytes:
    """:func:`mgral._untrusted.read_regular_file` with DatasetError: the bytes of a regular
    file; a FIFO, device or directory is refused before it is read."""
    return _read_regular_file(path, expected=expected, error=DatasetError)


class RootGuard:
    """Checks that dataset files stay inside ``root`` once symbolic links are resolved.

    Directories are resolved once and cached, so checking N files in a few folders costs
    about one ``lstat`` each. With ``follow_links`` every check passes.
    """

    def __init__(self, root: str | os.PathLike[str], *, follow_links: bool = False) -> None:
        self.root = Path(root)
        self.follow_links = follow_links
        self._real_root = os.path.realpath(root)
        self._dirs: dict[str, str] = {}

    def resolve(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        parent, name = os.path.split(path)
        real_parent = self._dirs.get(parent)
        if real_parent is None:
            real_parent = self._dirs[parent] = os.path.realpath(parent or ".")
        if name in ("", ".", "..") or os.path.islink(path):
            return os.path.realpath(path)
        return os.path.join(real_parent, name)

    def inside(self, path: str | os.PathLike[str]) -> bool:
        real, root = self.resolve(path), self._real_root
        return real == root or real.startswith(root if root.endswith(os.sep) else root + os.sep)

    def check(self, path: str | os.PathLike[str], *, source: str | None = None, where: str | None = None) -> None:
        """Refuse ``path`` if it leads out of the root (``source``/``where`` prefix the message;
        default: the path itself).

        Raises:
            DatasetError: naming the file, where it leads, the root and the opt-in.
        """
        if self.follow_links or self.inside(path):
            return
        prefix = f"{source}: {where}: the file {os.fspath(path)!r}" if where else f"{source or os.fspath(path)}:"
        raise DatasetError(
            f"{prefix} is a symbolic link (or lies below one) that leads to {self.resolve(path)!r}, outside the "
            f"dataset root {str(self.root)!r}; expected the dataset's files inside it (copy the file into the "
            f"dataset, or {FOLLOW_LINKS_HINT})"
        )
