"""The pool ledger: which image ids are labeled and in which cycle, which are awaited, which were skipped.

Conventions:

* One id space: the dataset's own image ids (``int`` or ``str``, see
  :mod:`mgral.data.records`). Numpy integers and ``str`` subclasses are accepted and stored
  as plain ``int`` / ``str``; ``bool`` is refused.
* Cycles number the models of a series. Cycle 0 trains on the initial labeled set. The
  images a strategy picks after cycle ``c - 1`` are requested *for* cycle ``c`` and, once
  answered, recorded with cycle ``c``: ``labeled_in[i] == c`` means "first trained on in
  cycle ``c``", so ``labeled(c)`` is exactly the training set of cycle ``c``.
* Each pool id is in at most one of ``labeled_in`` (id -> cycle), ``pending`` (id -> the
  cycle its label was requested for) and ``skipped`` (id -> the cycle the annotator skipped
  it in; a skipped image is never asked again). An id in none of them is unlabeled.
* Query, persist, update: :meth:`Ledger.request` then :meth:`Ledger.save` *before* waiting
  on the oracle; :meth:`Ledger.resolve` accepts answers only for requested ids.

File format (``ledger.json``, written atomically)::

    {"version": 1,
     "pool":    [id, ...],            pool order
     "labeled": [[id, cycle], ...],
     "pending": [[id, cycle], ...],
     "skipped": [[id, cycle], ...]}

Lists of pairs rather than objects, because JSON object keys are strings and ``17`` must
come back as the int ``17``.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgral._io import atomic_write_json
from mgral.errors import PoolError

if TYPE_CHECKING:  # the alias only; mgral.data pulls in numpy
    from mgral.data.records import ImageId

VERSION = 1
_SECTIONS = ("labeled", "pending", "skipped")
_MIN_CYCLE = {"labeled": 0, "pending": 1, "skipped": 1}


def _norm_id(value: object) -> ImageId:
    """A plain ``int`` or ``str`` image id, or ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a bool, not an image id")
    if isinstance(value, str):
        return str(value)
    try:
        return operator.index(value)  # type: ignore[arg-type]  # int, numpy integer
    except TypeError:
        raise ValueError(f"{value!r} ({type(value).__name__}) is not an image id; expected an int or a str") from None


def _check_cycle(cycle: object, low: int, what: str) -> int:
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < low:
        raise PoolError(f"{what}: cycle must be an integer >= {low}, got {cycle!r}")
    return cycle


class Ledger:
    """Image id -> cycle labeled, plus the pending requests and the skipped ids.

    Build one with :meth:`create` or :meth:`load`. Attributes (read them; change them only
    through :meth:`request` and :meth:`resolve`): ``pool`` (tuple of ids, pool order),
    ``labeled_in``, ``pending``, ``skipped`` (dicts id -> cycle).
    """

    def __init__(self, pool: Iterable[ImageId]) -> None:
        self.pool: tuple[ImageId, ...] = tuple(pool)
        self._in_pool = frozenset(self.pool)
        self.labeled_in: dict[ImageId, int] = {}
        self.pending: dict[ImageId, int] = {}
        self.skipped: dict[ImageId, int] = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, all_pool_ids: Iterable[object], initial_ids: Iterable[object]) -> Ledger:
        """A ledger whose ``initial_ids`` are labeled in cycle 0.

        Raises:
            PoolError: a malformed or repeated pool id, or an initial id not in the pool.
        """
        where = "Ledger.create"
        ledger = cls(_unique_ids(all_pool_ids, where, "pool"))
        for i in _unique_ids(initial_ids, where, "initial ids"):
            if i not in ledger._in_pool:
                raise PoolError(f"{where}: initial image {i!r} is not in the pool; initial ids must be pool ids")
            ledger.labeled_in[i] = 0
        return ledger

    # -- queries ------------------------------------------------------------------------
    def unlabeled(self) -> list[ImageId]:
        """Ids that may be requested: not labeled, pending or skipped; in pool order."""
        busy = (self.labeled_in, self.pending, self.skipped)
        return [i for i in self.pool if not any(i in d for d in busy)]

    def labeled(self, cycle: int | None = None) -> list[ImageId]:
        """The training set of ``cycle`` (ids labeled in cycles ``<= cycle``; all if None), in pool order."""
        return [i for i in self.pool if i in self.labeled_in and (cycle is None or self.labeled_in[i] <= cycle)]

    def added_in(self, cycle: int) -> list[ImageId]:
        """Ids whose labels arrived for ``cycle`` exactly, in pool order."""
        return [i for i in self.pool if self.labeled_in.get(i) == cycle]

    @property
    def last_cycle(self) -> int:
        """The highest cycle recorded anywhere in the ledger (0 for a new one)."""
        return max((*self.labeled_in.values(), *self.pending.values(), *self.skipped.values()), default=0)

    def summary(self) -> str:
        n = len(self.pool)
        lab, pen, skip = len(self.labeled_in), len(self.pending), len(self.skipped)
        return f"{n} pool images: {lab} labeled, {pen} pending, {skip} skipped, {n - lab - pen - skip} unlabeled"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ledger):
            return NotImplemented
        mine = (self.pool, self.labeled_in, self.pending, self.skipped)
        return mine == (other.pool, other.labeled_in, other.pending, other.skipped)

    # -- updates ------------------------------------------------------------------------
    def request(self, ids: Iterable[object], cycle: int) -> None:
        """Mark ``ids`` as asked of the oracle for ``cycle``. Save the ledger before waiting.

        All ids are checked before any is marked, so a refused request changes nothing.

        Raises:
            PoolError: naming the first id that is unknown, repeated, labeled, skipped or
                already pending, or a cycle before one already recorded.
        """
        where = f"request for cycle {cycle!r}"
        _check_cycle(cycle, 1, where)
        if cycle < self.last_cycle:
            raise PoolError(
                f"{where}: the ledger already records cycle {self.last_cycle}; requests go forward in cycles"
            )
        wanted = _unique_ids(ids, where, "requested ids")
        for i in wanted:
            if i not in self._in_pool:
                raise PoolError(f"{where}: image {i!r} is not in the pool; request only ids from Ledger.unlabeled()")
            if i in self.labeled_in:
                raise PoolError(
                    f"{where}: image {i!r} is already labeled (cycle {self.labeled_in[i]}); "
                    "request only ids from Ledger.unlabeled()"
                )
            if i in self.skipped:
                raise PoolError(
                    f"{where}: image {i!r} was skipped by the annotator in cycle {self.skipped[i]}; "
                    "skipped images are not asked again"
                )
            if i in self.pending:
                raise PoolError(
                    f"{where}: image {i!r} is already requested for cycle {self.pending[i]} "
                    "and not yet answered; resolve that request first"
                )
        for i in wanted:
            self.pending[i] = cycle

    def resolve(self, labeled_ids: Iterable[object], skipped_ids: Iterable[object], cycle: int) -> None:
        """Record the oracle's answer for ``cycle``: labels arrived for ``labeled_ids``; the
        annotator skipped ``skipped_ids``. Requested ids left out stay pending (a partial answer).

        Idempotent: an answer already recorded for ``cycle`` is accepted and changes nothing,
        so replaying an answer after a crash is safe. All ids are checked before any change.

        Raises:
            PoolError: naming the first id that was not requested for ``cycle``, was given
                both answers, or already has a different answer.
        """
        where = f"answer for cycle {cycle!r}"
        _check_cycle(cycle, 1, where)
        # dicts, not sets: the answer's order (hence the file's) must not depend on hashing
        answers: dict[str, dict[ImageId, None]] = {"labeled": {}, "skipped": {}}
        for kind, ids in (("labeled", labeled_ids), ("skipped", skipped_ids)):
            for value in ids:
                try:
                    answers[kind][_norm_id(value)] = None
                except ValueError as err:
                    raise PoolError(f"{where}: {kind} ids: {err}") from err
        both = [i for i in answers["labeled"] if i in answers["skipped"]]
        if both:
            raise PoolError(f"{where}: image {both[0]!r} is both labeled and skipped; give one answer")
        todo: list[tuple[str, ImageId]] = []
        for kind, ids in answers.items():
            done = self.labeled_in if kind == "labeled" else self.skipped
            for i in ids:
                if done.get(i) == cycle:
                    continue  # the same answer again
                if self.pending.get(i) == cycle:
                    todo.append((kind, i))
                    continue
                raise PoolError(
                    f"{where}: image {i!r} cannot be marked {kind}: {self._state_of(i)}; "
                    "labels apply only to ids that were asked for (Ledger.request) in that cycle"
                )
        for kind, i in todo:
            del self.pending[i]
            (self.labeled_in if kind == "labeled" else self.skipped)[i] = cycle

    def _state_of(self, i: ImageId) -> str:
        if i not in self._in_pool:
            return "it is not in the pool"
        if i in self.pending:
            return f"it was requested for cycle {self.pending[i]}"
        if i in self.labeled_in:
            return f"it is already labeled (cycle {self.labeled_in[i]})"
        if i in self.skipped:
            return f"it was skipped in cycle {self.skipped[i]}"
        return "it was never requested"

    # -- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "pool": list(self.pool),
            "labeled": [[i, c] for i, c in self.labeled_in.items()],
            "pending": [[i, c] for i, c in self.pending.items()],
            "skipped": [[i, c] for i, c in self.skipped.items()],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to ``path`` atomically (see the module docstring for the format)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ledger:
        """Read a ledger written by :meth:`save`, checking every entry.

        Raises:
            PoolError: naming the file and the bad entry (unreadable file, invalid JSON,
                unknown version or key, malformed or unknown id, bad cycle, an id in two states).
        """
        source = str(path)
        hint = "the file is corrupt or was edited by hand; restore it or start the series again"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise PoolError(f"{source}: cannot read the ledger ({err})") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PoolError(f"{source}: not valid JSON ({err}); {hint}") from err
        keys = ("version", "pool", *_SECTIONS)
        if not isinstance(data, dict) or set(data) != set(keys):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PoolError(f"{source}: expected an object with keys {', '.join(keys)}; got {got}; {hint}")
        if data["version"] != VERSION:
            raise PoolError(
                f"{source}: ledger version {data['version']!r}, expected {VERSION} (written by another mgral version?)"
            )
        if not isinstance(data["pool"], list):
            raise PoolError(f"{source}: 'pool' must be a list of image ids; {hint}")
        try:
            ledger = cls(_unique_ids(data["pool"], source, "pool"))
        except PoolError as err:
            raise PoolError(f"{err}; {hint}") from err
        seen: dict[ImageId, str] = {}
        for section in _SECTIONS:
            entries = data[section]
            if not isinstance(entries, list):
                raise PoolError(f"{source}: '{section}' must be a list of [id, cycle] pairs; {hint}")
            target = getattr(ledger, "labeled_in" if section == "labeled" else section)
            for n, entry in enumerate(entries):
                where = f"{source}: {section} entry {n} ({json.dumps(entry)})"
                if not isinstance(entry, list) or len(entry) != 2:
                    raise PoolError(f"{where}: expected an [id, cycle] pair; {hint}")
                image_id, cycle = entry
                if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
                    raise PoolError(f"{where}: the id must be an int or a str; {hint}")
                if image_id not in ledger._in_pool:
                    raise PoolError(f"{where}: image {image_id!r} is not in the pool; {hint}")
                if image_id in seen:
                    raise PoolError(f"{where}: image {image_id!r} is also in '{seen[image_id]}'; {hint}")
                try:
                    _check_cycle(cycle, _MIN_CYCLE[section], where)
                except PoolError as err:
                    raise PoolError(f"{err}; {hint}") from err
                seen[image_id] = section
                target[image_id] = cycle
        return ledger


def _unique_ids(values: Iterable[object], where: str, what: str) -> list[ImageId]:
    ids: list[ImageId] = []
    seen: set[ImageId] = set()
    for n, value in enumerate(values):
        try:
            i = _norm_id(value)
        except ValueError as err:
            raise PoolError(f"{where}: {what}[{n}]: {err}") from err
        if i in seen:
            raise PoolError(f"{where}: {what}: image {i!r} is listed twice")
        seen.add(i)
        ids.append(i)
    return ids
