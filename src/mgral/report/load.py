"""Read AL curves back from run directories (layout: :mod:`mgral.runs`)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mgral.data.records import Dataset
from mgral.errors import MgralError, RunError
from mgral.runs import (
    CONFIG_FILE,
    CYCLES_FILE,
    REFERENCE_LABEL,
    CycleDir,
    MgralDir,
    RunDir,
    SeriesDir,
    read_cycle_records,
    reward_trend,
)

METRIC_NAMES = {"coco": "mAP@[.5:.95]", "voc07": "VOC07 AP@0.5", "voc12": "VOC12 AP@0.5"}
"""What a record's ``mAP`` is, by the run's ``evaluation.style`` (config.yaml; absent: ``coco``)."""

X_KEYS = ("num_labeled", "num_boxes_labeled", "labeling_cost")
Y_KEYS = ("mAP", "mAP50")

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Series:
    """One (run, strategy label, seed) series: the per-cycle columns of its ``cycles.jsonl``.

    Every array has one entry per finished cycle (index = cycle, 0 = the initial model).
    ``num_labeled`` counts images, ``num_boxes_labeled`` boxes, ``labeling_cost`` is in the
    oracle's cost units, ``mAP`` is test mAP@[.5:.95] and ``mAP50`` test mAP@.5 (both 0..1).
    ``seconds`` maps a phase (``train``, ``evaluate``, ``predict``, ``select``, ...) to wall
    seconds per cycle. A value a record lacks is NaN.
    """

    label: str
    strategy_name: str
    seed: int
    run_dir: Path
    num_labeled: np.ndarray
    num_boxes_labeled: np.ndarray
    labeling_cost: np.ndarray
    mAP: np.ndarray
    mAP50: np.ndarray
    seconds: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.mAP)

    def column(self, key: str) -> np.ndarray:
        """The array named ``key`` (one of :data:`X_KEYS` or :data:`Y_KEYS`).

        Raises:
            ValueError: another key.
        """
        if key not in X_KEYS + Y_KEYS:
            raise ValueError(f"unknown column {key!r}; valid: {', '.join(X_KEYS + Y_KEYS)}")
        return getattr(self, key)


def _number(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _series(run_dir: Path, sdir: SeriesDir) -> Series | None:
    label, seed, path = sdir.label, sdir.seed, sdir.records
    records = read_cycle_records(path)
    if not records:
        return None  # the series has started but finished no cycle yet
    cycles = [r["cycle"] for r in records]
    if cycles != list(range(len(records))):
        raise RunError(
            f"{path}: cycles are {cycles}, expected 0..{len(records) - 1} without gaps; the file is "
            "incomplete or was edited by hand, so its curve cannot be drawn"
        )
    phases = sorted({p for r in records for p in (r.get("seconds") or {})})
    columns = {k: np.array([_number(r, k) for r in records]) for k in X_KEYS + Y_KEYS}
    seconds = {p: np.array([_number(r.get("seconds") or {}, p) for r in records]) for p in phases}
    name = records[0].get("strategy_name") or label
    return Series(label=label, strategy_name=str(name), seed=seed, run_dir=run_dir, seconds=seconds, **columns)


def _run_dirs(run_dirs: Sequence[str | Path]) -> list[Path]:
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise RunError("no run directory given; pass at least one RUN directory")
    seen: dict[Path, Path] = {}
    for p in paths:
        if not p.is_dir():
            raise RunError(f"{p} is not a directory; expected a run directory (RUN/<label>/seed-<s>/{CYCLES_FILE})")
        if p.resolve() in seen:
            raise RunError(f"{p} is given twice (as {seen[p.resolve()]} and {p}); its series would count twice")
        seen[p.resolve()] = p
    return paths


def load_series(run_dirs: Sequence[str | Path]) -> list[Series]:
    """Every series with at least one finished cycle, sorted by (label, seed, run).

    Series of one label from several runs are all returned; each counts as one sample
    when they are pooled. The full-data reference is not a series (:func:`load_reference`).

    Raises:
        RunError: a path that is not a run directory or holds no finished cycle; a
            ``cycles.jsonl`` that is corrupt or whose cycles are not 0..n-1 contiguous.
    """
    found: list[Series] = []
    for run_dir in _run_dirs(run_dirs):
        started = [s for s in RunDir(run_dir).list_series() if s.label != REFERENCE_LABEL]
        if not started:
            raise RunError(
                f"{run_dir} is not a run directory: expected <strategy label>/seed-<s>/{CYCLES_FILE} "
                "under it (as mgral run writes), found no such series"
            )
        series = [s for sdir in started if (s := _series(run_dir, sdir)) is not None]
        if not series:
            raise RunError(f"{run_dir}: no series has finished a cycle yet ({len(started)} started); nothing to report")
        found.extend(series)
    return sorted(found, key=lambda s: (s.label, s.seed, str(s.run_dir)))


def load_reference(run_dirs: Sequence[str | Path]) -> dict[int, dict[str, Any]] | None:
    """The full-data reference records by seed, or None if no run has one.

    Each ``RUN/reference/seed-<s>/cycles.jsonl`` holds one record; where several runs hold
    a reference for one seed, the first run's (in ``run_dirs`` order) is used.

    Raises:
        RunError: a path that is not a directory, or a corrupt reference file.
    """
    references: dict[int, dict[str, Any]] = {}
    for run_dir in _run_dirs(run_dirs):
        for sdir in [s for s in RunDir(run_dir).list_series() if s.label == REFERENCE_LABEL]:
            records = read_cycle_records(sdir.records)
            if not records:
                continue
            if sdir.seed in references:
                log.warning("%s: a second full-data reference for seed %d; using the first run's", run_dir, sdir.seed)
                continue
            references[sdir.seed] = records[-1]
    return references or None


def reference_map(reference: dict[int, dict[str, Any]] | None, metric: str = "mAP") -> float | None:
    """The full-data ``metric`` averaged over the reference seeds (None without a reference)."""
    if not reference:
        return None
    values = [_number(r, metric) for r in reference.values()]
    return float(np.mean(values)) if not all(math.isnan(v) for v in values) else None


def metric_name(run_dirs: Sequence[str | Path]) -> str:
    """What the runs' ``mAP`` is (:data:`METRIC_NAMES`), from their recorded ``evaluation.style``;
    a run without a readable config counts as ``coco`` (the only style before the option).

    Raises:
        RunError: runs scored with different metrics (their curves cannot share an axis).
    """
    styles: dict[str, Path] = {}
    for run_dir in map(Path, run_dirs):
        try:
            evaluation = RunDir(run_dir).config().get("evaluation")
        except RunError:
            evaluation = None
        style = evaluation.get("style", "coco") if isinstance(evaluation, dict) else "coco"
        styles.setdefault(str(style), run_dir)
    if len(styles) > 1:
        shown = ", ".join(f"{d} ({s})" for s, d in styles.items())
        raise RunError(f"the runs score their models with different metrics: {shown}; report them separately")
    style = next(iter(styles), "coco")
    return METRIC_NAMES.get(style, style)


def planned(run_dirs: Sequence[str | Path]) -> tuple[int | None, int | None]:
    """What these runs plan, from their recorded configs: (the most cycles a series will
    have, ``cycles + 1``; the seeds of each strategy, counted over the runs). None where no
    run's config says (e.g. a run directory written by hand)."""
    cycles, seeds = [], []
    for run_dir in map(Path, run_dirs):
        try:
            config = RunDir(run_dir).config()
        except RunError:
            continue
        c, s = config.get("cycles"), config.get("seeds")
        if isinstance(c, int) and not isinstance(c, bool):
            cycles.append(c + 1)
        if isinstance(s, list):
            seeds.append(len(s))
    return (max(cycles) if cycles else None), (sum(seeds) if seeds else None)


def run_title(run_dirs: Sequence[str | Path]) -> str:
    """A short name for plots: each run's experiment name and dataset, else its directory name."""
    names = []
    for run_dir in map(Path, run_dirs):
        try:
            config = RunDir(run_dir).config()
        except RunError:
            names.append(run_dir.name)  # a title is cosmetic: a run without a readable config still reports
            continue
        dataset = config.get("dataset")
        path = dataset.get("path") if isinstance(dataset, dict) else None
        name = str(config.get("name") or run_dir.name)
        names.append(f"{name} ({Path(path).name})" if path else name)
    return ", ".join(dict.fromkeys(names))


# -- MGRAL diagnostics --------------------------------------------------------------------

AGENT_COLUMNS = ("update", "reward_mean", "reward_max", "baseline", "entropy")
MGRAL_STAGES = ("features", "table", "reward_model", "agent", "selection")


@dataclass(frozen=True, eq=False)
class TableRow:
    """One row of MGRAL's ``table.csv``: a candidate combination of images and what adding
    them did to the model (``dmAP``: change of mAP; ``mAP`` after; ``ap``: AP per category
    name). The control row (``combination`` = ``control``) has ``control`` True and no ids."""

    cycle: int | None
    combination: list[Any]
    control: bool
    dmAP: float
    mAP: float
    ap: dict[str, float]


@dataclass(frozen=True, eq=False)
class MgralCycle:
    """MGRAL's diagnostics of one (run, label, seed, cycle), from ``cycle-<c>/mgral/``.

    Any file may be absent (an older run, a cycle in progress) or unreadable: its fields
    are then empty (None, ``{}``, ``[]``) and ``problems`` says why, one line a file.
    ``loo_spearman``: the reward model's leave-one-out Spearman correlation on the table
    (how well it ranks combinations). ``seconds``: wall seconds per MGRAL stage.
    ``mean_pairwise_distance``, ``class_histogram``: the diversity of the chosen batch.
    ``agent``: the columns of ``agent_rewards.csv`` (:data:`AGENT_COLUMNS`), one entry per
    agent update; ``reward_first``, ``reward_last``: the ends of its :func:`reward_trend` (the
    mean reward of the first and of the last 10 updates). ``table``: the rows of ``table.csv``;
    ``categories`` its AP columns.
    """

    label: str
    seed: int
    cycle: int
    run_dir: Path
    path: Path
    loo_spearman: float | None = None
    table_rows: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    mean_pairwise_distance: float | None = None
    class_histogram: dict[str, int] = field(default_factory=dict)
    reward_first: float | None = None
    reward_last: float | None = None
    agent: dict[str, np.ndarray] = field(default_factory=dict)
    table: list[TableRow] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _optional(value: Any) -> float | None:
    number = _number({"v": value}, "v")
    return None if math.isnan(number) else number


def _cell(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _read_summary(path: Path, values: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    values["loo_spearman"] = _optional(data.get("loo_spearman"))
    rows = data.get("table_rows")
    values["table_rows"] = rows if isinstance(rows, int) and not isinstance(rows, bool) else None
    seconds = data.get("seconds") if isinstance(data.get("seconds"), dict) else {}
    values["seconds"] = {str(k): v for k, raw in seconds.items() if (v := _optional(raw)) is not None}
    diversity = data.get("diversity") if isinstance(data.get("diversity"), dict) else {}
    values["mean_pairwise_distance"] = _optional(diversity.get("mean_pairwise_distance"))
    histogram = diversity.get("class_histogram") if isinstance(diversity.get("class_histogram"), dict) else {}
    values["class_histogram"] = {str(k): int(v) for k, v in histogram.items() if _optional(v) is not None}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_agent(path: Path, values: dict[str, Any]) -> None:
    header, rows = _read_csv(path)
    agent = values["agent"] = {k: np.array([_cell(r.get(k)) for r in rows]) for k in AGENT_COLUMNS if k in header}
    if "reward_mean" in agent:
        _, trend = reward_trend(agent.get("update", np.arange(len(rows))), agent["reward_mean"])
        if len(trend):
            values["reward_first"], values["reward_last"] = float(trend[0]), float(trend[-1])


def _combination(text: str) -> tuple[list[Any], bool]:
    if text.strip() == "control":
        return [], True
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        return [text], False
    return (ids if isinstance(ids, list) else [ids]), False


def _read_table(path: Path, values: dict[str, Any]) -> None:
    header, rows = _read_csv(path)
    names = {k: k[3:-1] for k in header if k.startswith("AP[") and k.endswith("]")}
    table = []
    for r in rows:
        combination, control = _combination(r.get("combination") or "")
        cycle = _cell(r.get("cycle"))
        table.append(
            TableRow(
                cycle=None if math.isnan(cycle) else int(cycle),
                combination=combination,
                control=control,
                dmAP=_cell(r.get("dmAP")),
                mAP=_cell(r.get("mAP")),
                ap={name: _cell(r.get(k)) for k, name in names.items()},
            )
        )
    values["table"], values["categories"] = table, list(names.values())


def _mgral_cycle(run_dir: Path, label: str, seed: int, cycle: int, path: Path) -> MgralCycle | None:
    values: dict[str, Any] = {}
    problems: list[str] = []
    found = False
    for file, reader in zip(MgralDir(path).reported, (_read_summary, _read_agent, _read_table), strict=True):
        if not file.is_file():
            continue
        found = True
        try:
            reader(file, values)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as err:
            # diagnostics are for reading, not for the curves: a bad file is reported, not fatal
            log.warning("%s: cannot read MGRAL diagnostics (%s); left out of the report", file, err)
            problems.append(f"{file.name}: unreadable ({err})")
    if not found:
        return None
    return MgralCycle(label=label, seed=seed, cycle=cycle, run_dir=run_dir, path=path, problems=problems, **values)


def load_mgral_diagnostics(run_dirs: str | Path | Sequence[str | Path]) -> list[MgralCycle]:
    """MGRAL's diagnostics of every cycle that has them, sorted by (label, seed, cycle, run).

    A cycle has them when ``RUN/<label>/seed-<s>/cycle-<c>/mgral/`` holds at least one of
    ``summary.json``, ``agent_rewards.csv`` and ``table.csv``; runs of other strategies
    give ``[]``. Unreadable files do not raise: they are logged and named in
    :attr:`MgralCycle.problems`.
    """
    paths = [Path(run_dirs)] if isinstance(run_dirs, str | os.PathLike) else [Path(p) for p in run_dirs]
    found: list[MgralCycle] = []
    for run_dir in paths:
        for sdir in [s for s in RunDir(run_dir).list_series() if s.label != REFERENCE_LABEL]:
            for cycle, cdir in sdir.cycles().items():
                if (item := _mgral_cycle(run_dir, sdir.label, sdir.seed, cycle, cdir.mgral.path)) is not None:
                    found.append(item)
    return sorted(found, key=lambda d: (d.label, d.seed, d.cycle, str(d.run_dir)))


def predictions_dir(run_dir: Path, sdir: SeriesDir, cycle: int) -> CycleDir:
    """The directory whose ``predictions.npz`` holds the pool predictions of ``cycle``'s model:
    the cycle's own, except for a cycle 0 without one, whose model is the seed's shared one
    (``RUN/_shared/seed-<s>/cycle-0/``, :meth:`~mgral.runs.RunDir.shared_cycle0`), cached there
    once for every strategy of the seed."""
    own = sdir.cycle(cycle)
    return RunDir(run_dir).shared_cycle0(sdir.seed) if cycle == 0 and not own.predictions.is_file() else own


DatasetCache = dict[Path, tuple[Dataset | None, str]]
"""Run directory -> (its dataset or None, why it cannot be read)."""


def run_dataset(run_dir: Path, cache: DatasetCache) -> tuple[Dataset | None, str]:
    """The run's dataset (``config.yaml``'s ``dataset``, with the splits the run recorded in
    ``splits.json``) or None and why it cannot be read; ``cache`` keeps what was read, so a
    report reads each run's dataset once."""
    from mgral.data.formats import read_dataset
    from mgral.data.splits import with_splits

    if run_dir in cache:
        return cache[run_dir]
    try:
        run = RunDir(run_dir)
        ds = run.config().get("dataset")
        if not isinstance(ds, dict) or not ds.get("path"):
            raise MgralError(f"{run_dir / CONFIG_FILE} names no dataset.path")
        # no file checks (a missing image only loses its thumbnail); boxes are not shown, so
        # one sticking out of its image is clipped rather than refused
        dataset = read_dataset(
            ds["path"],
            ds.get("format"),
            image_root=ds.get("image_root"),
            check_files=False,
            clip_boxes=True,
            follow_links=bool(ds.get("follow_links", False)),
        )
        if (recorded := run.recorded_splits()) is not None:
            dataset = with_splits(dataset, recorded["images"], source=str(run.splits_file))
        found: tuple[Dataset | None, str] = (dataset, "")
    except (MgralError, OSError, ValueError, TypeError) as err:
        log.warning("%s: cannot read the run's dataset (%s)", run_dir, err)
        found = (None, f"the run's dataset cannot be read, so there are no thumbnails: {err}")
    cache[run_dir] = found
    return found


def dataset_of(run_dir: Path, cache: DatasetCache | None = None) -> Dataset | None:
    """The run's dataset as its ``config.yaml`` names it, or None (logged) when it cannot be
    read; ``cache`` keeps what was read for the next call."""
    return run_dataset(Path(run_dir), {} if cache is None else cache)[0]
