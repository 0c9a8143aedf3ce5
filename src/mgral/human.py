"""The human in the loop: people label the chosen images in their own tool.

A run whose config has ``oracle.kind: human`` advances one query round at a time, by two
commands (each takes the run's lock, so they never interleave):

``mgral query`` (:func:`query`)
    Trains the model of the current cycle on the images labeled so far (reused when already
    trained: a cycle's labeled set is final once the cycle before it is answered), evaluates
    it on the test split when that split has labels, selects ``budget`` images with the
    configured strategy, records the request in the ledger and saves it, and only then
    writes the labeling package ``RUN/<label>/seed-<s>/cycle-<c>/labeling/`` (all or
    nothing): ``images.txt`` (absolute image paths), ``predictions_coco.json`` (COCO with
    the model's boxes and scores as pre-annotations), ``label_studio_tasks.json`` and
    ``label_studio_config.xml`` (:mod:`mgral.data.labelstudio`). While a request is pending,
    ``query`` selects nothing: it re-writes the package for the images still pending.
    The first run of ``query --config CONFIG`` creates the run.

``mgral import-labels`` (:func:`import_labels`)
    Reads the annotated images (COCO JSON, VOC or YOLO directory, Label Studio JSON export),
    matches them to the dataset's images (Label Studio: ``data.mgral_id``; otherwise by file
    path, then by file name), validates everything before changing anything, stores the
    labels (``RUN/<label>/seed-<s>/labels.json``, COCO, written atomically) *then* resolves
    the ledger and saves it. When no image of the request is pending any more, the cycle's
    record is appended to ``cycles.jsonl`` (what ``mgral report`` reads; ``mAP`` is null
    where the test split has no labels).

Rules:

* **Initial set** (cycle 0): ``initial.ids_file`` (those pool images; labels from the
  dataset file, no boxes there = labeled, no objects) or ``initial.from_dataset: true`` (the
  pool images with at least one box in the dataset file; an image labeled "empty" cannot be
  told from an unlabeled one, so list such images in an ids file). An empty initial set is a
  cold start: the first query picks ``budget`` pool images at random (no model, no
  pre-annotations). The dataset file's boxes on other pool images are never used.
* **Labeled / skipped**: an image in the file is labeled, with its boxes, none meaning "no
  objects" (a COCO image without annotations, an empty Label Studio result, a VOC XML
  without objects, a YOLO image without a label file). Skipped: a Label Studio task whose
  annotations are all cancelled (*Skip*), or, with ``skip_missing`` / ``--skip-missing``,
  every pending image the file does not label. A skipped image is never asked again.
* **Partial imports** are allowed: pending images the file does not label stay pending;
  ``query`` re-writes the package for them; the cycle finishes when none is left.
* **Refused** (nothing changes): labels for an image that was not asked for (never
  requested, in the test split, or not in the dataset), a category whose name is not one
  of the dataset's, an image twice in the file, a box outside its image (unless
  ``clip_boxes``), an image size that differs from the dataset's, labels that differ from
  the ones already imported for an image, a label for an image skipped before.
* **Idempotent**: images already imported with the same labels (or skipped again) are
  counted and ignored, so importing a file twice, or an export that also holds earlier
  rounds, changes nothing the second time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from mgral._io import atomic_directory, atomic_write_json, atomic_write_text
from mgral.config import ExperimentConfig, config_from_dict, config_to_dict
from mgral.data import labelstudio
from mgral.data.records import Dataset, Detections, ImageId, ImageRecord, Target, describe_image
from mgral.errors import ConfigError, DatasetError, RunError
from mgral.loop import (
    Experiment,
    check_detector,
    cycle_record,
    initial_ids,
    prepare_dataset,
    select_batch,
    train_and_evaluate,
)
from mgral.pool import Ledger
from mgral.runs import (
    CONFIG_FILE,
    CycleDir,
    RunDir,
    SeriesDir,
    append_cycle_record,
    read_cycle_records,
    remove_stale_temp_files,
)

IMPORT_FORMATS = ("coco", "voc", "yolo", "label-studio")
DEFAULT_MIN_SCORE = 0.5

_NO_RESULT: dict[str, Any] = {"mAP": None, "mAP50": None, "per_class": {}}
_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio renames uploaded files "<8 hex>-<name>"


@dataclass
class QueryResult:
    """What :func:`query` did: ``image_ids`` asked for cycle ``cycle + 1`` (in ``package``);
    ``new`` False when they were asked before and the package was only re-written;
    ``exhausted`` when no pool image is left to ask for (then ``image_ids`` is empty)."""

    cycle: int
    image_ids: list[ImageId]
    package: Path | None
    new: bool
    exhausted: bool = False
    result: dict[str, Any] = field(default_factory=lambda: dict(_NO_RESULT))


@dataclass
class ImportResult:
    """What :func:`import_labels` did for the request of cycle ``cycle + 1``."""

    cycle: int
    labeled: list[ImageId]
    skipped: list[ImageId]
    num_boxes: int
    already: int
    """Images of the file imported (or skipped) before: ignored."""
    unlabeled: int
    """Label Studio tasks without any annotation: ignored (their images stay pending)."""
    pending: list[ImageId]
    finished: bool
    """True when this import completed the request and the cycle's record was appended."""


# -- the series of a human run -------------------------------------------------------------


@dataclass
class _Series:
    exp: Experiment
    label: str
    strategy: Any
    seed: int
    sdir: SeriesDir
    ledger: Ledger
    store: dict[ImageId, tuple[int, Target]]

    def labels(self, ids: Sequence[ImageId]) -> dict[ImageId, Target]:
        """The labels of labeled images: the dataset file's for the initial set, the imported ones after."""
        out = {}
        for i in ids:
            if self.ledger.labeled_in[i] == 0:
                out[i] = self.exp.dataset[i].target
            elif i in self.store:
                out[i] = self.store[i][1]
            else:
                raise RunError(
                    f"{self.sdir.ledger}: image {i!r} is labeled in cycle {self.ledger.labeled_in[i]}, but its labels "
                    f"are missing from {self.sdir.labels}; restore that file, or import the labels of that "
                    "round again (mgral import-labels)"
                )
        return out

    def cycle_dir(self, cycle: int) -> CycleDir:
        return self.sdir.cycle(cycle).mkdir()


def _open_run(run: RunDir, config: ExperimentConfig | None) -> ExperimentConfig:
    """Create the run from ``config`` or open it (checking ``config`` against the recorded one)."""
    if config is not None:
        resolved = config_to_dict(config)
        if run.config_file.exists():
            run.open(resolved)
        else:
            _check_human(config, str(run.path))
            run.create(resolved)
    else:
        config = config_from_dict(run.config(), source=str(run.config_file))
    _check_human(config, str(run.path))
    return config


def _check_human(config: ExperimentConfig, where: str) -> None:
    if config.oracle.kind != "human":
        raise ConfigError(
            f"{where}: oracle.kind is {config.oracle.kind!r}; query and import-labels are for runs labeled by people "
            "(oracle.kind: human). A simulated experiment runs with mgral run CONFIG --out RUN"
        )


def _require_run(path: Path, config: ExperimentConfig | None) -> None:
    if config is None and not (path / CONFIG_FILE).is_file():
        raise RunError(
            f"{path} holds no run (no {CONFIG_FILE}); create it with mgral query --config CONFIG --run {path} "
            "(a config with oracle.kind: human)"
        )


def _pick(config: ExperimentConfig, strategy: str | None, seed: int | None) -> tuple[Any, int]:
    specs = {s.label: s for s in config.strategies}
    if strategy is None:
        if len(specs) > 1:
            raise ConfigError(f"the run has the strategies {', '.join(specs)}; pass --strategy LABEL to choose one")
        strategy = next(iter(specs))
    elif strategy not in specs:
        raise ConfigError(f"--strategy {strategy!r} is not a strategy of the run; its labels: {', '.join(specs)}")
    if seed is None:
        if len(config.seeds) > 1:
            raise ConfigError(f"the run has the seeds {config.seeds}; pass --seed S to choose one")
        seed = config.seeds[0]
    elif seed not in config.seeds:
        raise ConfigError(f"--seed {seed} is not a seed of the run; its seeds: {config.seeds}")
    return specs[strategy], seed


def human_initial_ids(config: ExperimentConfig, dataset: Dataset, pool: list[ImageId]) -> list[ImageId]:
    """The initial labeled set of a human run: the ids file's images, or the pool images
    carrying boxes in the dataset file (``initial.from_dataset``)."""
    if config.initial.ids_file is not None:
        return initial_ids(config, dataset, pool, 0)
    return [i for i in pool if len(dataset[i].target)]


@dataclass
class _Prepared:
    """A series of a run, checked and read, before anything is written."""

    label: str
    seed: int
    strategy: Any
    exp: Experiment


def _prepare(
    run: RunDir,
    config: ExperimentConfig,
    strategy: str | None,
    seed: int | None,
    *,
    log: Callable[[str], None],
    progress: bool,
) -> _Prepared:
    """Pick the series, build its strategy and read the dataset (writes nothing)."""
    from mgral.detectors.models import PRESETS
    from mgral.strategies import build_strategy

    spec, seed = _pick(config, strategy, seed)
    PRESETS.get(config.detector.preset)
    built = build_strategy(spec.name, **spec.params)
    if "oracle" in built.requires:
        raise ConfigError(
            f"strategy {spec.label!r} ({spec.name}) reads the true labels of the pool, a research ablation; it "
            "cannot choose images for people to label: use another strategy"
        )
    dataset = prepare_dataset(config, run)
    pool = dataset.image_ids(config.dataset.pool_splits)
    if not pool:
        raise ConfigError(f"the pool splits {config.dataset.pool_splits} hold no image; nothing to label")
    test = dataset.image_ids(config.dataset.test_split)
    if not dataset.num_boxes(test):
        test = []  # no labeled test split: the models are not evaluated (mAP null in the records)
    return _Prepared(spec.label, seed, built, Experiment(config, run, dataset, pool, test, log, progress))


def _load(
    run: RunDir,
    config: ExperimentConfig,
    strategy: str | None,
    seed: int | None,
    *,
    log: Callable[[str], None],
    progress: bool,
    prepared: _Prepared | None = None,
) -> _Series:
    p = prepared or _prepare(run, config, strategy, seed, log=log, progress=progress)
    spec_label, seed, built, exp = p.label, p.seed, p.strategy, p.exp
    dataset, pool = exp.dataset, exp.pool
    sdir = run.series(spec_label, seed).mkdir()
    if sdir.ledger.exists():
        ledger = Ledger.load(sdir.ledger)
        if list(ledger.pool) != pool:
            raise RunError(
                f"{sdir.ledger}: the pool of the run ({len(ledger.pool)} images) is not the pool of the dataset "
                f"now ({len(pool)} images); the dataset file changed since the run started: restore it, or start "
                "a new run"
            )
    else:
        ledger = Ledger.create(pool, human_initial_ids(config, dataset, pool))
        ledger.save(sdir.ledger)
    store = read_labels(sdir.labels, dataset)
    return _Series(exp, spec_label, built, seed, sdir, ledger, store)


# -- the labels imported so far --------------------------------------------------------------


def read_labels(path: str | os.PathLike[str], dataset: Dataset) -> dict[ImageId, tuple[int, Target]]:
    """The labels file of a series (:attr:`mgral.runs.SeriesDir.labels`): image id -> (cycle, target).

    Raises:
        RunError: a corrupt file, or an image that is not in the dataset.
    """
    from mgral.data._layout import read_json
    from mgral.data.coco import from_coco_dict

    path = Path(path)
    if not path.exists():
        return {}
    hint = "the file is corrupt or was edited by hand; restore it"
    try:
        obj = read_json(path, expected="the labels imported so far (COCO)")
        labeled = from_coco_dict(obj, source=str(path), image_root=dataset.root, check_files=False)
        entries = {e["id"]: (e["mgral_id"], e["mgral_cycle"]) for e in obj["images"]}  # type: ignore[index]
    except (DatasetError, KeyError, TypeError) as err:
        raise RunError(f"{path}: cannot read the imported labels ({err}); {hint}") from err
    store = {}
    for rec in labeled:
        image_id, cycle = entries[rec.id]
        if image_id not in dataset or isinstance(cycle, bool) or not isinstance(cycle, int):
            raise RunError(f"{path}: image {image_id!r} (cycle {cycle!r}) is not an image of the dataset; {hint}")
        store[image_id] = (cycle, rec.target)
    return store


def write_labels(path: str | os.PathLike[str], dataset: Dataset, store: Mapping[ImageId, tuple[int, Target]]) -> None:
    """Write the labels file atomically: a COCO file whose images keep their dataset id in
    ``mgral_id`` (COCO ids are ``1..N``) and their cycle in ``mgral_cycle``."""
    from mgral.data.coco import to_coco_dict

    ids = sorted(store, key=lambda i: (store[i][0], str(type(i)), i))
    records = [
        ImageRecord(n, dataset[i].file_name, dataset[i].width, dataset[i].height, target=store[i][1])
        for n, i in enumerate(ids, start=1)
    ]
    obj = to_coco_dict(Dataset(dataset.root, dataset.categories, records))
    for entry, i in zip(obj["images"], ids, strict=True):
        entry["mgral_id"], entry["mgral_cycle"] = i, store[i][0]
    atomic_write_json(path, obj)


def _same(a: Target, b: Target) -> bool:
    if len(a) != len(b):
        return False

    def rows(t: Target) -> np.ndarray:
        r = np.concatenate([t.labels[:, None].astype(np.float64), t.boxes.astype(np.float64)], axis=1)
        return r[np.lexsort(r.T[::-1])]

    return bool(np.allclose(rows(a), rows(b), atol=0.05))


# -- query -----------------------------------------------------------------------------------


def query(
    run_dir: str | os.PathLike[str],
    config: ExperimentConfig | None = None,
    *,
    budget: int | None = None,
    strategy: str | None = None,
    seed: int | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    image_url_prefix: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> QueryResult:
    """Ask for the next images to label (see the module docstring).

    Args:
        run_dir: the run; created from ``config`` if it holds none yet.
        config: the config (``oracle.kind: human``); needed to create the run, else checked
            against the recorded one when given.
        budget: images to ask for (default ``config.budget``).
        strategy, seed: the series (needed when the config has several strategies / seeds).
        min_score: detections scoring lower are left out of the pre-annotations.
        image_url_prefix: Label Studio's ``data.image`` is this prefix followed by the image's
            path relative to the dataset's image root (e.g. ``/data/local-files/?d=``);
            default: the absolute path.

    Raises:
        ConfigError: not a human config, an ambiguous series, a bad budget, a strategy that
            reads the true labels.
        RunError: the run is locked, corrupt, or was started with another config.
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"--budget must be a positive number of images, got {budget!r}")
    run = RunDir(run_dir)
    _require_run(run.path, config)
    prepared = None
    if config is not None and not run.config_file.exists():
        # A new run: everything a typo breaks is checked before the lock creates the
        # directory, so a refused config leaves no run behind that the corrected one clashes with.
        _check_human(config, str(run.path))
        prepared = _prepare(run, config, strategy, seed, log=log, progress=progress)
        check_detector(config, prepared.exp.dataset)
        human_initial_ids(config, prepared.exp.dataset, prepared.exp.pool)
    with run.lock():
        config = _open_run(run, config)
        remove_stale_temp_files(run.path, recursive=True)  # writes a kill cut short; we hold the lock
        s = _load(run, config, strategy, seed, log=log, progress=progress, prepared=prepared)
        if budget is not None:
            s.exp.config = config.model_copy(update={"budget": budget})
        while True:
            cycle = len(read_cycle_records(s.sdir.records))
            _check_pending(s, cycle)
            selection = _read_selection(s.cycle_dir(cycle))
            if selection is None:
                break
            # asked before: request what a crash left unrequested, then wait for or finish the round
            fresh = _request(s, cycle, selection["image_ids"])
            pending = [i for i in selection["image_ids"] if s.ledger.pending.get(i) == cycle + 1]
            if pending:
                return _package(s, cycle, pending, fresh, min_score, image_url_prefix)
            if not _finish(s, cycle):  # every asked image is answered: the round is over
                raise RunError(f"{s.sdir.records}: cannot record cycle {cycle}; the run directory is inconsistent")
        return _new_round(s, cycle, min_score, image_url_prefix)


def _check_pending(s: _Series, cycle: int) -> None:
    stray = sorted({c for c in s.ledger.pending.values() if c != cycle + 1})
    if stray:
        raise RunError(
            f"{s.sdir.ledger}: images are pending for cycle {stray[0]}, but the series is at cycle {cycle} (its "
            f"{s.sdir.records.name} records {cycle} finished cycles); the run directory was changed by hand: restore it"
        )
    if s.ledger.pending and not (selection := s.cycle_dir(cycle).selection).exists():
        raise RunError(
            f"{s.sdir.ledger}: {len(s.ledger.pending)} images are pending but {selection} "
            "is missing; the run directory was changed by hand: restore it"
        )


def _read_selection(cdir: CycleDir) -> dict[str, Any] | None:
    return json.loads(cdir.selection.read_text(encoding="utf-8")) if cdir.selection.exists() else None


def _request(s: _Series, cycle: int, ids: list[ImageId]) -> bool:
    """Request the selected ids not asked yet and save the ledger (before anything is written
    for people). True if anything was requested."""
    ledger = s.ledger
    asked = ledger.labeled_in.keys() | ledger.skipped.keys() | ledger.pending.keys()
    new = [i for i in ids if i not in asked]
    if new:
        ledger.request(new, cycle + 1)
        ledger.save(s.sdir.ledger)
    return bool(new)


def _train(s: _Series, cycle: int, seconds: dict[str, float]) -> tuple[Any, dict[str, Any], Dataset]:
    """The model of ``cycle`` (trained now or reused) and its test result; no model when nothing is labeled."""
    labeled = s.ledger.labeled(cycle)
    view = _view(s, labeled)
    if not labeled:
        return None, dict(_NO_RESULT), view
    init = None
    if s.exp.config.detector.warm_start and cycle > 0 and s.ledger.labeled(cycle - 1):
        init = s.cycle_dir(cycle - 1).model
    detector, result = train_and_evaluate(s.exp, s.seed, cycle, s.cycle_dir(cycle), view, labeled, seconds, init)
    return detector, result, view


def _view(s: _Series, labeled: list[ImageId]) -> Dataset:
    from mgral.loop import visible_dataset

    return visible_dataset(s.exp.dataset, s.labels(labeled))


def _describe_result(result: Mapping[str, Any]) -> str:
    if result["mAP"] is None:
        return "not evaluated: the test split has no labels"
    return f"test mAP {result['mAP']:.4f}, mAP50 {result['mAP50']:.4f}"


def _new_round(s: _Series, cycle: int, min_score: float, image_url_prefix: str | None) -> QueryResult:
    ledger, log = s.ledger, s.exp.log
    records = read_cycle_records(s.sdir.records)
    if not ledger.unlabeled() and records and not records[-1]["selected"]:
        log(
            f"{s.label} seed {s.seed}: nothing left to label ({ledger.summary()}); the model of cycle {cycle - 1} "
            "is the final one"
        )
        last = {k: records[-1].get(k) for k in _NO_RESULT}
        return QueryResult(cycle - 1, [], None, False, exhausted=True, result=last)
    seconds: dict[str, float] = {}
    labeled = ledger.labeled(cycle)
    detector, result, view = _train(s, cycle, seconds)
    if detector is not None:
        log(
            f"{s.label} seed {s.seed} cycle {cycle}: model trained on {len(labeled)} images "
            f"({_describe_result(result)})"
        )
    if not ledger.unlabeled():
        record = cycle_record(
            s.exp.config, s.label, s.strategy, s.seed, cycle, labeled, s.labels(labeled), result, [], [], seconds
        )
        append_cycle_record(s.sdir.records, record)
        log(f"{s.label} seed {s.seed}: nothing left to label ({ledger.summary()}); this model is the final one")
        return QueryResult(cycle, [], None, False, exhausted=True, result=result)
    cdir = s.cycle_dir(cycle)
    if detector is None:
        ids = _cold_start(s, cycle, cdir)
        log(f"{s.label} seed {s.seed} cycle {cycle}: no labeled image yet: {len(ids)} images picked at random")
    else:
        ids, _ = select_batch(s.exp, s.strategy, s.seed, cycle, cdir, ledger, view, detector, seconds)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(cdir.query, {"requested_at": now, "seconds": {k: round(v, 3) for k, v in seconds.items()}})
    _request(s, cycle, ids)  # saved before the package exists: a crash leaves a request, never a lost one
    return _package(s, cycle, ids, True, min_score, image_url_prefix, detector=detector, result=result)


def _cold_start(s: _Series, cycle: int, cdir: CycleDir) -> list[ImageId]:
    pool = s.ledger.unlabeled()
    rng = np.random.default_rng([s.seed, cycle, 5])
    n = min(s.exp.config.budget, len(pool))
    ids = [pool[k] for k in sorted(rng.choice(len(pool), size=n, replace=False))]
    info = {"cold_start": "no labeled image yet: picked at random"}
    atomic_write_json(cdir.selection, {"image_ids": ids, "scores": [0.0] * n, "info": info}, indent=1)
    return ids


def _package(
    s: _Series,
    cycle: int,
    ids: list[ImageId],
    fresh: bool,
    min_score: float,
    image_url_prefix: str | None,
    *,
    detector: Any = None,
    result: Mapping[str, Any] | None = None,
) -> QueryResult:
    """Write the labeling package of the pending ``ids`` (after the ledger holds the request)."""
    cdir = s.cycle_dir(cycle)
    if detector is None and s.ledger.labeled(cycle) and cdir.model.exists():
        from mgral.detectors.torchvision_detector import TorchvisionDetector

        detector = TorchvisionDetector.load(cdir.model, device=s.exp.config.detector.device)
    if result is None:
        done = cdir.evaluation
        result = json.loads(done.read_text(encoding="utf-8"))["result"] if done.exists() else dict(_NO_RESULT)
    preds = None
    if detector is not None:
        preds = detector.predict(s.exp.dataset, ids, embeddings=False, progress=s.exp.progress)
    path = write_package(
        cdir.labeling,
        s.exp.dataset,
        ids,
        preds,
        min_score=min_score,
        model_version=f"mgral {s.label} seed-{s.seed} cycle-{cycle}",
        image_url_prefix=image_url_prefix,
        run_dir=s.exp.run.path,
        series=(s.label, s.seed),
    )
    log = s.exp.log
    if fresh:
        log(f"asked for {len(ids)} images to label (their labels make cycle {cycle + 1}); the labeling package: {path}")
    else:
        log(
            f"{len(ids)} images asked for cycle {cycle + 1} are still waiting for their labels, so no new images were "
            f"selected; their labeling package was written again: {path}"
        )
    log("  images.txt (the files), predictions_coco.json (pre-annotations, COCO), label_studio_tasks.json")
    log(f"when they are labeled: mgral import-labels --run {s.exp.run.path} FILE")
    return QueryResult(cycle, list(ids), path, fresh, result=dict(result))


def write_package(
    out: Path,
    dataset: Dataset,
    ids: Sequence[ImageId],
    predictions: Mapping[ImageId, Detections] | None,
    *,
    min_score: float,
    model_version: str,
    image_url_prefix: str | None = None,
    run_dir: Path | None = None,
    series: tuple[str, int] | None = None,
) -> Path:
    """Write the labeling package of ``ids`` into ``out``, replacing it whole (never half-written)."""
    from mgral.data.coco import to_coco_dict

    records, scores = [], []
    for i in ids:
        rec = dataset[i]
        det = predictions.get(i) if predictions is not None else None
        target = Target()
        if det is not None:
            boxes = det.boxes.copy()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, rec.width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, rec.height)
            keep = (det.scores >= min_score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            target = Target(boxes[keep], det.labels[keep])
            scores += det.scores[keep].tolist()
        records.append(ImageRecord(rec.id, rec.file_name, rec.width, rec.height, target=target))
    coco = to_coco_dict(Dataset(dataset.root, dataset.categories, records))
    for ann, score in zip(coco["annotations"], scores, strict=True):
        ann["score"] = round(score, 4)
    for entry, i in zip(coco["images"], ids, strict=True):
        entry["mgral_id"] = i  # the dataset's id (COCO ids are renumbered when the dataset's are not ints)

    def image_ref(rec: ImageRecord) -> str:
        if image_url_prefix is not None:
            return image_url_prefix + rec.file_name
        return os.path.abspath(dataset.root / rec.file_name)

    tasks = labelstudio.to_tasks(
        dataset, ids, predictions, image_ref=image_ref, model_version=model_version, min_score=min_score
    )
    paths = "".join(os.path.abspath(dataset.image_path(i)) + "\n" for i in ids)
    where = f"--run {run_dir} " if run_dir is not None else ""
    if series is not None:
        where += f"--strategy {series[0]} --seed {series[1]} "
    readme = (
        f"{len(ids)} images to label ({model_version}).\n\n"
        "images.txt               the image files, one absolute path a line\n"
        f"predictions_coco.json    the model's boxes scoring >= {min_score:g}, as pre-annotations (COCO: CVAT, ...)\n"
        "label_studio_tasks.json  the same as Label Studio tasks, for a project whose labeling config is\n"
        "                         label_studio_config.xml (keep data.mgral_id: it finds the image again)\n\n"
        "Label every image (an image with nothing in it: no boxes), export, then:\n"
        f"    mgral import-labels {where}FILE [--format coco|voc|yolo|label-studio]\n"
        "An image you cannot label: Skip it in Label Studio, or leave it out of the file and add --skip-missing.\n"
    )
    with atomic_directory(out, overwrite=True, owned=True, what="a labeling package") as tmp:
        atomic_write_text(tmp / "images.txt", paths)
        atomic_write_json(tmp / "predictions_coco.json", coco, indent=1)
        atomic_write_json(tmp / "label_studio_tasks.json", tasks, indent=1)
        atomic_write_text(tmp / "label_studio_config.xml", labelstudio.labeling_config(dataset.categories))
        atomic_write_text(tmp / "README.txt", readme)
    return out


# -- import ----------------------------------------------------------------------------------


@dataclass
class _Answer:
    image_id: ImageId
    target: Target | None  # None: skipped
    where: str  # the entry in the file and the dataset image it is, for messages


class _Matcher:
    """Finds the dataset image an annotation file's image reference means."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.by_rel: dict[str, ImageId] = {}
        self.by_abs: dict[str, ImageId] = {}
        self.by_base: dict[str, list[ImageId]] = {}
        for rec in dataset:
            rel = rec.file_name.replace("\\", "/")
            self.by_rel[rel] = rec.id
            self.by_abs[os.path.abspath(dataset.root / rec.file_name)] = rec.id
            self.by_base.setdefault(rel.rsplit("/", 1)[-1], []).append(rec.id)

    def find(self, ref: str, *, where: str) -> ImageId | None:
        path = _clean_ref(ref)
        if not path:
            return None
        if path in self.by_abs:
            return self.by_abs[path]
        parts = [p for p in path.split("/") if p not in ("", ".")]
        for k in range(len(parts)):  # the longest tail of the path that is a dataset file name
            tail = "/".join(parts[k:])
            if tail in self.by_rel:
                return self.by_rel[tail]
        if not parts:
            return None
        for base in dict.fromkeys((parts[-1], _LS_UPLOAD_PREFIX.sub("", parts[-1]))):
            found = self.by_base.get(base, [])
            if len(found) > 1:
                shown = ", ".join(describe_image(i, self.dataset[i].file_name) for i in found[:4])
                raise DatasetError(
                    f"{where}: the file name {base!r} is ambiguous: it is {shown}; expected the image's path "
                    "relative to the dataset's image root (or keep data.mgral_id in Label Studio tasks)"
                )
            if found:
                return found[0]
        return None


def _clean_ref(ref: str) -> str:
    ref = ref.strip()
    if "?d=" in ref:  # Label Studio local files: /data/local-files/?d=<path>
        ref = ref.split("?d=", 1)[1]
    elif "://" in ref:
        ref = urlparse(ref).path
    ref = unquote(ref).replace("\\", "/")
    return os.path.normpath(ref) if ref.startswith("/") else ref


def _detect_format(path: Path) -> str:
    from mgral.data._layout import read_json
    from mgral.data.formats import detect_format

    if path.is_file() and path.suffix.lower() == ".json":
        return (
            "label-studio" if isinstance(read_json(path, expected="a COCO or Label Studio JSON file"), list) else "coco"
        )
    return detect_format(path)


def _read_answers(path: Path, fmt: str, dataset: Dataset, *, clip: bool) -> tuple[list[_Answer], int]:
    """The file's images as dataset ids with their targets (None: skipped), and the number of
    Label Studio tasks without annotation. Everything is validated; nothing is changed."""
    matcher = _Matcher(dataset)
    source = str(path)
    answers: list[_Answer] = []
    unlabeled = 0
    if fmt == "label-studio":
        for task in labelstudio.read_export(path):
            entry = f"{source}: {task.describe()}"
            image_id = task.mgral_id if task.mgral_id in dataset else matcher.find(task.image, where=entry)
            if image_id is None:
                raise DatasetError(
                    f"{entry}: matches no image of the dataset (data.mgral_id {task.mgral_id!r}, data.image "
                    f"{task.image!r}); expected tasks made from a labeling package (label_studio_tasks.json), or "
                    "images named by their path relative to the dataset's image root"
                )
            rec = dataset[image_id]
            where = f"{task.describe()} = {describe_image(rec.id, rec.file_name)}"
            if task.status == "unlabeled":
                unlabeled += 1
                continue
            target = None
            if task.status == "labeled":
                target = labelstudio.task_target(
                    task,
                    width=rec.width,
                    height=rec.height,
                    categories=dataset.categories,
                    source=source,
                    where=where,
                    clip=clip,
                )
            answers.append(_Answer(image_id, target, f"{source}: {where}"))
    else:
        from mgral.data.formats import read_dataset

        result = read_dataset(path, fmt, check_files=False, clip_boxes=clip)
        names = result.category_names
        ours = {c.name: c.id for c in dataset.categories}
        for rec in result:
            entry = f"{source}: {describe_image(rec.id, rec.file_name)}"
            image_id = matcher.find(rec.file_name, where=entry)
            if image_id is None:
                raise DatasetError(
                    f"{entry}: matches no image of the dataset; expected the file name of an image the query asked "
                    "for (see images.txt of the labeling package), as a path relative to the dataset's image root "
                    "or a file name"
                )
            known = dataset[image_id]
            where = f"{entry} = {describe_image(known.id, known.file_name)}"
            if (rec.width, rec.height) != (known.width, known.height):
                raise DatasetError(
                    f"{where}: the file says the image is {rec.width}x{rec.height}, the dataset {known.width}x"
                    f"{known.height}; expected the boxes of the dataset's image file (not a resized copy)"
                )
            labels = []
            for k, label in enumerate(rec.target.labels.tolist()):
                name = names.get(label)
                if name not in ours:
                    raise DatasetError(
                        f"{where}: box {k}: category {name!r} (id {label}) is not a category of the dataset; expected "
                        f"one of {sorted(ours)} (rename the label in your tool, or remove the box)"
                    )
                labels.append(ours[name])
            t = rec.target
            answers.append(_Answer(image_id, Target(t.boxes, labels, t.difficult, t.iscrowd), where))
    seen: dict[ImageId, str] = {}
    for a in answers:
        if a.image_id in seen:
            raise DatasetError(
                f"{a.where}: the image is in the file twice (also {seen[a.image_id]}); expected each image once: "
                "remove one of them"
            )
        seen[a.image_id] = a.where
    return answers, unlabeled


def import_labels(
    run_dir: str | os.PathLike[str],
    file: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    strategy: str | None = None,
    seed: int | None = None,
    skip_missing: bool = False,
    clip_boxes: bool = False,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Import the labels people made for the pending request (see the module docstring).

    Args:
        file: a COCO JSON file, a VOC or YOLO directory, or a Label Studio JSON export.
        fmt: ``coco``, ``voc``, ``yolo`` or ``label-studio`` (default: detected; a JSON list
            is a Label Studio export, a JSON object COCO).
        skip_missing: mark every pending image the file does not label as skipped.
        clip_boxes: clip boxes that stick out of their image instead of refusing them.

    Raises:
        DatasetError: a malformed file or a refused label (nothing is changed).
        RunError / ConfigError: no human run there, or a locked or corrupt one.
    """
    if fmt is not None and fmt not in IMPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    run = RunDir(run_dir)
    _require_run(run.path, None)
    path = Path(file)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory; expected the annotated images to import")
    with run.lock():
        config = _open_run(run, None)
        remove_stale_temp_files(run.path, recursive=True)  # writes a kill cut short; we hold the lock
        s = _load(run, config, strategy, seed, log=log, progress=False)
        cycle = len(read_cycle_records(s.sdir.records))
        _check_pending(s, cycle)
        answers, unlabeled = _read_answers(path, fmt or _detect_format(path), s.exp.dataset, clip=clip_boxes)
        ledger, dataset = s.ledger, s.exp.dataset
        new_labels: dict[ImageId, Target] = {}
        repaired: dict[ImageId, Target] = {}
        new_skipped: list[ImageId] = []
        already = 0
        for a in answers:
            i = a.image_id
            if i in ledger.pending:
                if a.target is None:
                    new_skipped.append(i)
                else:
                    new_labels[i] = a.target
            elif i in ledger.labeled_in:
                c = ledger.labeled_in[i]
                if a.target is None:
                    raise DatasetError(
                        f"{a.where}: skipped in the file, but its labels were imported for cycle {c}; an imported "
                        "image stays labeled: remove it from the file"
                    )
                stored = dataset[i].target if c == 0 else s.store.get(i, (c, None))[1]
                if stored is None:
                    repaired[i] = a.target  # the ledger has it, the labels file lost it: take it again
                elif not _same(stored, a.target):
                    what = "it is in the initial labeled set" if c == 0 else f"its labels were imported for cycle {c}"
                    raise DatasetError(
                        f"{a.where}: the file's {len(a.target)} boxes differ from its labels ({len(stored)} boxes): "
                        f"{what}, and labels are final once a model was trained on them; remove the image from the "
                        "file (or export only the images of the current round)"
                    )
                else:
                    already += 1
            elif i in ledger.skipped:
                if a.target is not None:
                    raise DatasetError(
                        f"{a.where}: it was skipped in cycle {ledger.skipped[i]}, and skipped images are not asked "
                        "again; remove it from the file"
                    )
                already += 1
            else:
                raise DatasetError(f"{a.where}: {_why_not_asked(s, i)}; remove it from the file")
        answered = {a.image_id for a in answers}
        if skip_missing:
            new_skipped += [i for i in ledger.pool if i in ledger.pending and i not in answered]
        if new_labels or repaired:
            store = dict(s.store)
            store.update({i: (ledger.labeled_in[i], t) for i, t in repaired.items()})
            store.update({i: (cycle + 1, t) for i, t in new_labels.items()})
            write_labels(s.sdir.labels, dataset, store)  # the labels are on disk before the ledger says so
            s.store = store
        if new_labels or new_skipped:
            ledger.resolve(list(new_labels), new_skipped, cycle + 1)
            ledger.save(s.sdir.ledger)
        num_boxes = sum(len(t) for t in new_labels.values())
        pending = [i for i in ledger.pool if i in ledger.pending]
        if new_labels or new_skipped:
            log(
                f"imported labels for {len(new_labels)} images ({num_boxes} boxes) and {len(new_skipped)} skipped, for "
                f"cycle {cycle + 1} of {s.label} seed {s.seed}; {len(pending)} still pending"
                + (f" ({already} images of the file were imported before: ignored)" if already else "")
            )
        else:
            log(f"nothing new imported: {already} images of {path} were imported (or skipped) before")
        if unlabeled:
            log(f"{unlabeled} tasks have no annotation yet: their images stay pending")
        finished = not pending and _finish(s, cycle)  # also completes a record a crash left unwritten
        if finished:
            log(f"cycle {cycle} is finished; next: mgral query --run {run.path}")
        elif pending:
            log(f"waiting for {len(pending)} images; mgral query --run {run.path} writes their labeling package again")
        return ImportResult(cycle, list(new_labels), new_skipped, num_boxes, already, unlabeled, pending, finished)


def _why_not_asked(s: _Series, i: ImageId) -> str:
    config = s.exp.config
    if i not in s.ledger.pool:
        split = s.exp.dataset[i].split
        return (
            f"it is not in the pool (split {split!r}; the pool is {config.dataset.pool_splits}), so no query asked for "
            "it; labels are imported only for the images a query asked for"
        )
    return (
        "no query asked for it (it is unlabeled, not pending); labels are imported only for the images a query "
        "asked for (images.txt of the labeling package)"
    )


def _finish(s: _Series, cycle: int) -> bool:
    """Append the record of ``cycle`` once its request is fully answered (True if appended now)."""
    records = read_cycle_records(s.sdir.records)
    cdir = s.cycle_dir(cycle)
    selection = _read_selection(cdir)
    if len(records) != cycle or selection is None:
        return False
    if any(s.ledger.pending.get(i) == cycle + 1 for i in selection["image_ids"]):
        return False
    ledger = s.ledger
    labeled = ledger.labeled(cycle)
    done = cdir.evaluation
    result, seconds = dict(_NO_RESULT), {}
    if done.exists():
        cached = json.loads(done.read_text(encoding="utf-8"))
        result, seconds = cached["result"], dict(cached["seconds"])
    asked = cdir.query
    if asked.exists():
        info = json.loads(asked.read_text(encoding="utf-8"))
        seconds.update(info["seconds"])
        requested = dt.datetime.fromisoformat(info["requested_at"])
        seconds["label"] = (dt.datetime.now(dt.UTC) - requested).total_seconds()
    ids, scores = selection["image_ids"], selection["scores"]
    record = cycle_record(
        s.exp.config, s.label, s.strategy, s.seed, cycle, labeled, s.labels(labeled), result, ids, scores, seconds
    )
    record["skipped"] = [i for i in ids if ledger.skipped.get(i) == cycle + 1]
    append_cycle_record(s.sdir.records, record)
    if cycle and (previous := s.sdir.cycle(cycle - 1).model).exists():
        previous.unlink()  # keep the latest models only, as mgral run does
    s.exp.log(
        f"{s.label} seed {s.seed} cycle {cycle}: {record['num_labeled']} images, {record['num_boxes_labeled']} boxes "
        f"({_describe_result(result)}); {len(ids) - len(record['skipped'])} labeled and {len(record['skipped'])} "
        f"skipped for cycle {cycle + 1}"
    )
    return True
