"""The run directory: where one experiment keeps its config, its state and its results.

Layout (:class:`RunDir`, :class:`SeriesDir`, :class:`CycleDir`, :class:`MgralDir` name every path)::

    RUN/
      config.yaml                 the resolved config the run was started with; resuming
                                  with a different one is refused, naming the differing keys
      splits.json                 the splits the run gave the images the dataset left without
                                  one (mgral.data.splits), if it gave any; absent in older runs
      run.lock                    flock()ed while a process works in RUN (holder's pid inside)
      <label>/seed-<s>/           one series per (strategy label, seed); ``reference``: the full-data run
          ledger.json             the pool ledger (mgral.pool)
          cycles.jsonl            one JSON object per finished cycle, keyed by "cycle"
          labels.json             a human run: the labels imported so far (mgral.human)
          cycle-<c>/              per-cycle artifacts: model.pt, selection.json, predictions.npz, ...
      _shared/seed-<s>/cycle-0/   the seed's cycle-0 model, shared by its strategies (mgral.loop)
      _tracking/                  what experiment tracking keeps (mgral.tracking): which records
                                  were logged to which MLflow runs, the default local store

Every state file is written atomically (:mod:`mgral._io`), except ``cycles.jsonl``, which
is appended to durably (write, flush, fsync). A crash mid-append leaves a torn last line
(no trailing newline): readers drop it, and the next append truncates it first.

Cycle records are keyed by their ``"cycle"``: each append must carry a cycle greater than
every recorded one. Appending a record identical to the one already recorded for its cycle
is a no-op (replaying after a crash is safe); a *different* record for a recorded cycle is
refused. A cycle is done exactly when its record is in ``cycles.jsonl``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import yaml

from mgral._io import atomic_write_json, atomic_write_text, fsync_dir
from mgral._untrusted import load_yaml, read_regular_file
from mgral.errors import RunError

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"
LOCK_FILE = "run.lock"
CYCLES_FILE = "cycles.jsonl"
REFERENCE_LABEL = "reference"  # the label of the full-data reference series
SHARED_DIR = "_shared"  # each seed's shared cycle 0; labels start with a letter or digit, so no series is named so
TRACKING_DIR = "_tracking"  # mgral.tracking's state and default MLflow store (a label cannot name it either)

LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
"""What a strategy label must look like: it names a directory."""

log = logging.getLogger(__name__)


def _entry(name: str) -> Any:
    """A file or directory of a layout directory: the property ``self.path / name``."""
    return property(lambda self: self.path / name, doc=f"``{name}``")


class RunDir:
    """A run directory (see the module docstring). Take :meth:`lock` before changing it."""

    config_file = _entry(CONFIG_FILE)
    tracking = _entry(TRACKING_DIR)
    splits_file = _entry(SPLITS_FILE)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._splits: dict[str, Any] | None = None

    def stage_splits(self, setting: Mapping[str, Any], assigned: Mapping[Any, str]) -> None:
        """Have :meth:`create` record the splits given to the images without one (image id ->
        split) and the ``setting`` that gave them (see :meth:`recorded_splits`)."""
        self._splits = {"setting": dict(setting), "images": [[i, s] for i, s in assigned.items()]}

    def create(self, config: Mapping[str, Any]) -> RunDir:
        """Start a new run: write ``splits.json`` when splits are staged (:meth:`stage_splits`),
        then ``config.yaml`` (its presence makes the run). ``config`` is the resolved config dict.

        Raises:
            RunError: ``RUN`` already holds a run or other files.
        """
        if self.config_file.exists():
            raise RunError(
                f"{self.path} already holds a run (it has {CONFIG_FILE}); resume it "
                "(--resume) or choose a new run directory"
            )
        if self.path.exists() and any(p.name not in (LOCK_FILE, SPLITS_FILE) for p in self.path.iterdir()):
            raise RunError(f"{self.path} exists and is not empty; choose a new run directory")
        if self._splits is not None:
            atomic_write_json(self.splits_file, self._splits, indent=1)
        else:
            self.splits_file.unlink(missing_ok=True)  # a creation cut short before config.yaml
        atomic_write_text(self.config_file, yaml.safe_dump(_plain(config), sort_keys=False))
        return self

    def recorded_splits(self) -> dict[str, Any] | None:
        """What ``splits.json`` records, or None where the run assigned no split (and in runs
        older than the file): ``{"setting": {"val", "test", "seed"}, "images": [[image id,
        split], ...]}``.

        Raises:
            RunError: an unreadable or malformed file.
        """
        path = self.splits_file
        try:
            data = json.loads(read_regular_file(path, expected="the run's split assignment", error=RunError))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RunError(f"{path}: cannot read the run's split assignment ({err}); restore the file") from err
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], (int, str)) and e[1] in ("train", "val", "test")
            for e in images
        ):
            raise RunError(
                f'{path}: expected {{"setting": {{...}}, "images": [[image id, "train" | "val" | "test"], '
                "...]}; the file was changed by hand: restore it"
            )
        return data

    def open(self, config: Mapping[str, Any] | None = None, *, ignore: tuple[str, ...] = ()) -> RunDir:
        """Open an existing run to resume it; if ``config`` is given it must equal the recorded one
        (top-level keys in ``ignore``, such as where the run executes, may differ).

        Raises:
            RunError: no run there, an unreadable ``config.yaml``, or a different config
                (naming each differing key with both values).
        """
        recorded = self.config()
        if config is None:
            return self
        given, old = flatten(_plain(config)), flatten(recorded)
        keys = {k for k in set(given) | set(old) if k.split(".", 1)[0] not in ignore}
        diffs = [k for k in sorted(keys) if given.get(k, _MISSING) != old.get(k, _MISSING)]
        if diffs:
            shown = "; ".join(
                f"{k}: {_show(old.get(k, _MISSING))} (recorded) vs {_show(given.get(k, _MISSING))} (given)"
                for k in diffs[:10]
            )
            more = f" and {len(diffs) - 10} more" if len(diffs) > 10 else ""
            raise RunError(
                f"{self.path}: cannot resume with a different config: {shown}{more}. Resume with the "
                f"recorded config ({self.config_file}) or start a new run directory"
            )
        return self

    def config(self) -> dict[str, Any]:
        """The config recorded in ``config.yaml``.

        Raises:
            RunError: missing or unreadable file.
        """
        path = self.config_file
        try:
            text = read_regular_file(path, expected="the run's recorded config", error=RunError).decode("utf-8")
        except FileNotFoundError as err:
            raise RunError(f"{self.path} is not a run directory (no {CONFIG_FILE}); start a run there first") from err
        except (OSError, UnicodeDecodeError) as err:
            raise RunError(f"{path}: cannot read the recorded config ({err})") from err
        data = load_yaml(text, source=str(path), expected="the run's recorded config", error=RunError)
        if not isinstance(data, dict):
            raise RunError(f"{path}: expected a mapping, got {type(data).__name__}")
        return data

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def series(self, label: str, seed: int) -> SeriesDir:
        """``RUN/<label>/seed-<seed>`` (not created). Raises RunError: a label that is not a safe
        directory name, or a negative seed."""
        if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
            raise RunError(
                f"strategy label {label!r} cannot name a directory; use letters, digits, '.', '_', "
                "'+' and '-', starting with a letter or digit"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RunError(f"seed must be a non-negative integer, got {seed!r}")
        return SeriesDir(self.path / label / f"seed-{seed}")

    def shared_cycle0(self, seed: int) -> CycleDir:
        """``RUN/_shared/seed-<seed>/cycle-0``: the seed's cycle-0 model (every strategy's) and its pool predictions."""
        return CycleDir(self.path / SHARED_DIR / f"seed-{seed}" / "cycle-0")

    def list_series(self) -> list[SeriesDir]:
        """The series present in the run directory, sorted by (label, seed)."""
        found = [SeriesDir(d) for d in self.path.glob("*/seed-*") if d.is_dir() and d.name[5:].isdigit()]
        return sorted((s for s in found if LABEL_PATTERN.fullmatch(s.label)), key=lambda s: (s.label, s.seed))


@dataclass(frozen=True)
class _Dir:
    path: Path

    def mkdir(self) -> Any:  # creates it and its parents if missing; returns self
        self.path.mkdir(parents=True, exist_ok=True)
        return self


class SeriesDir(_Dir):
    """``RUN/<label>/seed-<s>/``: one series (:meth:`RunDir.series`)."""

    label = property(lambda self: self.path.parent.name)
    seed = property(lambda self: int(self.path.name.removeprefix("seed-")))
    ledger = _entry("ledger.json")
    records = _entry(CYCLES_FILE)
    labels = _entry("labels.json")  # a human run: every label imported so far (COCO)
    diversity = _entry("diversity.json")  # published records: the batches' figures (mgral.report.diversity)

    def cycle(self, cycle: int) -> CycleDir:
        """``<series>/cycle-<cycle>`` (not created)."""
        if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 0:
            raise RunError(f"cycle must be a non-negative integer, got {cycle!r}")
        return CycleDir(self.path / f"cycle-{cycle}")

    def cycles(self) -> dict[int, CycleDir]:
        """The cycle directories present, by cycle (ascending)."""
        found = {int(d.name[6:]): CycleDir(d) for d in self.path.glob("cycle-*") if d.name[6:].isdigit() and d.is_dir()}
        return dict(sorted(found.items()))


class CycleDir(_Dir):
    """``<series>/cycle-<c>/``: what one cycle of a series wrote (:meth:`SeriesDir.cycle`)."""

    model = _entry("model.pt")  # the trained detector (kept for the latest cycle only)
    last = _entry("last.pt")  # the epoch checkpoint of a training in progress (the detector writes it)
    evaluation = _entry("evaluation.json")  # the test result and the seconds training took
    selection = _entry("selection.json")  # the chosen images, written before the oracle is asked
    predictions = _entry("predictions.npz")  # the pool predictions the strategy read (mgral.detectors.cache)
    query = _entry("query.json")  # a human run: when the images were asked for
    labeling = _entry("labeling")  # a human run: the labeling package

    mgral = property(lambda self: MgralDir(self.path / "mgral"))  # what MGRAL wrote in the cycle
    series = property(lambda self: SeriesDir(self.path.parent))  # the series holding the cycle


class MgralDir(_Dir):
    """``cycle-<c>/mgral/``: what the MGRAL strategy writes in a cycle (:mod:`mgral.strategies.mgral.strategy`)."""

    summary = _entry("summary.json")  # read by mgral report, as are agent_rewards and table
    agent_rewards = _entry("agent_rewards.csv")
    table = _entry("table.csv")
    table_json = _entry("table.json")
    table_rows = _entry("table_rows.npz")  # read back by the series' later cycles
    agent = _entry("agent.pt")  # the agent's weights: the next cycle's warm start
    candidates = _entry("candidates.npz")
    reward_model = _entry("reward_model.json")
    features = _entry("features.npz")
    jobs = _entry("jobs")  # one <name>.json per surrogate fine-tune

    reported = property(lambda self: (self.summary, self.agent_rewards, self.table))  # what mgral report reads


_MISSING = object()


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as YAML would give it back (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(config))


def flatten(d: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with ``sep`` (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``);
    an empty mapping and every other value (lists too) are kept as leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, sep, key + sep))
        else:
            out[key] = v
    return out


def _show(v: object) -> str:
    return "(absent)" if v is _MISSING else json.dumps(v)


# -- cycle records ------------------------------------------------------------------------


def _parse_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records and the byte length of the complete lines (a torn tail excluded)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes; an append was interrupted)", path, len(data) - end)
    records: list[dict[str, Any]] = []
    for n, line in enumerate(data[:end].splitlines(), start=1):
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(
                f"{path}: line {n} is not valid JSON ({err}); the file is corrupt or was edited by "
                "hand; fix or remove that line"
            ) from err
        cycle = record.get("cycle") if isinstance(record, dict) else None
        if isinstance(cycle, bool) or not isinstance(cycle, int):
            raise RunError(f"{path}: line {n}: expected an object with an integer 'cycle', got {line[:80]!r}")
        if records and cycle <= records[-1]["cycle"]:
            raise RunError(
                f"{path}: line {n}: cycle {cycle} after cycle {records[-1]['cycle']}; records must go forward in cycles"
            )
        records.append(record)
    return records, end


def read_cycle_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``cycles.jsonl`` in order (``[]`` if the file does not exist).

    A torn last line is dropped (with a logged warning); the file is not changed.

    Raises:
        RunError: a complete line that is not a JSON object with an integer ``"cycle"``,
            or cycles that do not increase.
    """
    return _parse_records(Path(path))[0]


def append_cycle_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` (a JSON-able mapping with an integer ``"cycle"``) as one durable line.

    Truncates a torn last line first. Re-appending the recorded record of a cycle is a no-op.

    Raises:
        RunError: no integer ``"cycle"``; or a cycle not after the last recorded one
            (unless the record is identical to the recorded one).
        TypeError: a value JSON cannot encode.
    """
    path = Path(path)
    cycle = record.get("cycle")
    if isinstance(cycle, bool) or not isinstance(cycle, int):
        raise RunError(f"{path}: a cycle record needs an integer 'cycle', got {cycle!r}")
    line = json.dumps(record) + "\n"
    records, end = _parse_records(path)
    if records and cycle <= records[-1]["cycle"]:
        same = [r for r in records if r["cycle"] == cycle]
        if same and same[0] == json.loads(line):
            return
        what = "a different record" if same else f"cycle {records[-1]['cycle']} is already recorded"
        raise RunError(
            f"{path}: cannot append cycle {cycle}: {what}. Records are keyed by cycle and go forward; "
            "a finished cycle is not recorded twice (read_cycle_records() tells which are done)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "ab") as fh:
        if fh.tell() > end:
            fh.truncate(end)
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)


# -- the lock -----------------------------------------------------------------------------


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/run.lock``; use it as a context manager.

    The kernel drops the lock when the holder dies (even by SIGKILL), so a lock file left
    behind never blocks a later run. The file keeps the holder's pid, host and start time
    for the message a refused process gets. It is never deleted: deleting it would let two
    processes hold locks on two different files. (``flock`` on network file systems may not
    exclude processes on other hosts.)

    Raises:
        RunError: on entry, when another process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise RunError(
                f"run directory {self.run_dir} is in use by {_describe_holder(holder)}; wait for it to "
                f"finish or stop it (a lock left by a dead process is released by itself, so {self.path} "
                "needs no removal)"
            ) from err
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # while still held, so no reader sees a departed holder
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} (started {info['started']})"
    except (json.JSONDecodeError, TypeError, KeyError):
        return "another process"  # it holds the lock but has not written its details yet


# -- stale temporary files ---------------------------------------------------------------

STALE_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""The name of a temporary file of :func:`mgral._io.atomic_write_bytes` (``tempfile.mkstemp``
with prefix ``.<name>.`` and suffix ``.tmp``: eight random characters between them)."""


def remove_stale_temp_files(directory: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files that writes cut short by a kill left in ``directory`` (and,
    with ``recursive``, below it); return them. Only regular files named exactly as
    :data:`STALE_TEMP` says are touched.

    Call it only where no other process may be writing: with the run's lock held (a live
    writer's temporary file would be deleted under it).
    """
    removed = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if STALE_TEMP.fullmatch(name) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        if not recursive:
            break
    if removed:
        log.info("removed %d stale temporary file(s) in %s", len(removed), directory)
    return removed


# -- MGRAL's agent_rewards.csv, summarised one way for summary.json and the report ------------

REWARD_WINDOW = 10
"""The agent's reward is reported as a running mean over this many updates (summary.json,
the report's table and its plot)."""


def reward_trend(updates: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The agent's mean reward per update as a running mean over ``w`` updates: ``w`` is
    :data:`REWARD_WINDOW`, or ``n // 2`` (at least 1) when the agent made ``n`` < 2 ×
    :data:`REWARD_WINDOW` updates; NaN rewards are left out. Returns (the update ending each
    full window, the window's mean): the first value is the mean of the first ``w`` updates,
    the last the mean of the last ``w``; both empty without a reward."""
    keep = np.isfinite(rewards)
    updates, rewards = updates[keep], rewards[keep]
    if not len(rewards):
        return updates, rewards
    w = min(REWARD_WINDOW, max(1, len(rewards) // 2))
    return updates[w - 1 :], np.convolve(rewards, np.ones(w) / w, mode="valid")
