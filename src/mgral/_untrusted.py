"""Reading what a user hands over: regular files only, YAML with bounded aliases, and
bounded quotes of what came.

:func:`read_regular_file` refuses a FIFO, a device or a directory before reading (a FIFO
would block the reader forever, ``/dev/zero`` never end). :func:`load_yaml` parses with
``yaml.safe_load`` (no Python objects) and refuses a document
whose aliases expand it beyond :data:`MAX_ALIAS_EXPANSION` values: parsing a "billion
laughs" document is instant (each ``*alias`` is the same Python object again), but anything
that walks the result (a ``repr`` in an error message, a JSON dump, a validation) would
visit its 10**9 values. :func:`short_repr` quotes a value in a message without walking more
of it than the quote shows.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

import yaml

from mgral.errors import MgralError

MAX_ALIAS_EXPANSION = 100_000
"""Values that aliases may add to a document (a config or a data.yaml uses a handful)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def read_regular_file(path: str | os.PathLike[str], *, expected: str, error: type[MgralError]) -> bytes:
    """The bytes of ``path``, which must be a regular file (checked on the descriptor, opened
    without blocking, so that a FIFO cannot hang the reader).

    Raises:
        error: ``path`` is a FIFO, device, socket or directory (naming it and ``expected``).
        OSError: the file cannot be opened or read (the caller words that message).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(
                f"{path}: not a regular file ({_kind(mode)}); expected {expected} (a pipe or device would block or "
                "never end: copy the content into a file)"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)


def load_yaml(text: str, *, source: str, expected: str, error: type[MgralError]) -> Any:
    """Parse ``text`` (the content of ``source``) with ``yaml.safe_load``.

    Raises:
        error: malformed YAML, absurd nesting or numbers, or aliases that expand the document
            by more than :data:`MAX_ALIAS_EXPANSION` values or refer to themselves; the message
            names ``source`` and says what was ``expected``.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{source}: malformed YAML ({err}); expected {expected}") from err
    except RecursionError as err:
        raise error(f"{source}: YAML nested too deeply to read; expected {expected}") from err
    except ValueError as err:  # e.g. an integer beyond Python's digit limit
        raise error(f"{source}: unreadable YAML ({short_repr(str(err), 120)}); expected {expected}") from err
    sizes = _sizes(data)
    if sizes is None:
        raise error(
            f"{source}: a YAML alias refers to itself (an anchor used inside its own value); expected {expected} "
            "without recursive aliases"
        )
    expanded, written = sizes
    if expanded - written > MAX_ALIAS_EXPANSION:
        raise error(
            f"{source}: uses YAML aliases that expand to more than {MAX_ALIAS_EXPANSION:,} values "
            f"({written:,} written, {expanded:,} once expanded); expected {expected} (write the values out, and "
            "use '*alias' only for small repeated sections)"
        )
    return data


def _entries(node: list | dict | set) -> Iterator[Any]:
    return iter(node.values()) if isinstance(node, dict) else iter(node)


def _sizes(data: Any) -> tuple[int, int] | None:
    """(values once aliases are expanded, values as written), or None if a container holds itself.

    A container counts 1, plus 1 per mapping key, plus its entries; a shared container (an
    alias) is counted once per use in the first number and once in the second. Iterative,
    with the size of each container memoized by identity: the cost is that of the document
    as written.
    """
    containers = (list, dict, set)
    if not isinstance(data, containers):
        return 1, 1
    memo: dict[int, int] = {}
    on_path: set[int] = set()
    written = 0
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            size = 1 + (len(node) if isinstance(node, dict) else 0)
            for child in _entries(node):
                size += memo[id(child)] if isinstance(child, containers) else 1
            memo[key] = size
            on_path.discard(key)
            continue
        if key in memo:
            continue
        on_path.add(key)
        written += 1 + (len(node) if isinstance(node, dict) else 0)
        stack.append((node, True))
        for child in _entries(node):
            if isinstance(child, containers):
                if id(child) in on_path:
                    return None
                if id(child) not in memo:
                    stack.append((child, False))
            else:
                written += 1
    return memo[id(data)], written


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` marks a cut), built only as far as
    shown: a huge or alias-expanded structure, a long string or a 10**400 costs no more than
    a small one. Containers that hold themselves show as ``[...]``."""
    out: list[str] = []
    length = 0
    for token in _tokens(value, frozenset(), limit):
        out.append(token)
        length += len(token)
        if length > limit:
            return "".join(out)[:limit] + "..."
    return "".join(out)


def _tokens(value: object, seen: frozenset[int], limit: int) -> Iterator[str]:
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if id(value) in seen:
            yield "[...]"
            return
        seen = seen | {id(value)}
        brackets = {list: "[]", tuple: "()", dict: "{}"}.get(type(value), "{}")
        yield brackets[0]
        for n, item in enumerate(value.items() if isinstance(value, dict) else value):
            if n:
                yield ", "
            if isinstance(value, dict):
                yield from _tokens(item[0], seen, limit)
                yield ": "
                yield from _tokens(item[1], seen, limit)
            else:
                yield from _tokens(item, seen, limit)
        if isinstance(value, tuple) and len(value) == 1:
            yield ","
        yield brackets[1]
    elif isinstance(value, str):
        yield repr(value[: limit + 1])[: limit + 2]
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        yield f"<an integer of {value.bit_length() * 0.30103:.0f} digits>"
    else:
        yield repr(value)[: limit + 1]
