"""``mgral query`` and ``mgral import-labels``: the human loop's two commands, each driving
one series (:class:`mgral.series.Series`) of the run under its lock."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgral._io import atomic_write_json
from mgral.config import ExperimentConfig, config_from_dict, config_to_dict
from mgral.data.records import Dataset, ImageId, Target
from mgral.errors import ConfigError, DatasetError, RunError
from mgral.human.answers import IMPORT_FORMATS, detect_format, read_answers
from mgral.human.labels import LabelStore, same_boxes
from mgral.human.package import write_package
from mgral.loop import check_detector, initial_ids, prepare_dataset
from mgral.runs import CONFIG_FILE, RunDir, read_cycle_records, remove_stale_temp_files
from mgral.series import NO_RESULT, Experiment, Series, describe_result
from mgral.tracking import open_tracker

DEFAULT_MIN_SCORE = 0.5


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
    result: dict[str, Any] = field(default_factory=lambda: dict(NO_RESULT))


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


# -- the run and its series --------------------------------------------------------------------


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
    from mgral.strategies import build_strategy

    spec, seed = _pick(config, strategy, seed)
    built = build_strategy(spec.name, **spec.params)
    if "oracle" in built.requires:
        raise ConfigError(
            f"strategy {spec.label!r} ({spec.name}) reads the true labels of the pool, a research ablation; it "
            "cannot choose images for people to label: use another strategy"
        )
    dataset = prepare_dataset(config, run)
    pool = dataset.image_ids(config.dataset.pool_splits)  # not empty: prepare_dataset checked
    test = dataset.image_ids(config.dataset.test_split)
    if not dataset.num_boxes(test):
        test = []  # no labeled test split: the models are not evaluated (mAP null in the records)
    exp = Experiment(config, run, dataset, pool, test, log, progress, share_cycle0=False)
    exp.tracker = open_tracker(config, run.path)
    return _Prepared(spec.label, seed, built, exp)


def _open_series(p: _Prepared) -> Series:
    exp = p.exp
    initial = human_initial_ids(exp.config, exp.dataset, exp.pool)
    series = Series.open(exp, p.label, p.strategy, p.seed, initial, lambda ids: {})
    series.labels_of = LabelStore(series.dir, exp.dataset, series.ledger)
    return series


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
    """Ask for the next images to label (see :mod:`mgral.human`).

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
        check_detector(config, prepared.exp.dataset, [prepared.strategy])
        human_initial_ids(config, prepared.exp.dataset, prepared.exp.pool)
    with run.lock():
        config = _open_run(run, config)
        remove_stale_temp_files(run.path, recursive=True)  # writes a kill cut short; we hold the lock
        s = _open_series(prepared or _prepare(run, config, strategy, seed, log=log, progress=progress))
        if budget is not None:
            s.exp.config = config.model_copy(update={"budget": budget})
        while True:
            cycle = s.finished
            _check_pending(s, cycle)
            selection = _read_selection(s, cycle)
            if selection is None:
                break
            # asked before: request what a crash left unrequested, then wait for or finish the round
            new, pending = s.request(cycle, selection["image_ids"])
            if pending:
                return _package(s, cycle, pending, bool(new), min_score, image_url_prefix)
            if not _finish(s, cycle):  # every asked image is answered: the round is over
                raise RunError(f"{s.dir.records}: cannot record cycle {cycle}; the run directory is inconsistent")
        return _new_round(s, cycle, min_score, image_url_prefix)


def _check_pending(s: Series, cycle: int) -> None:
    stray = sorted({c for c in s.ledger.pending.values() if c != cycle + 1})
    if stray:
        raise RunError(
            f"{s.dir.ledger}: images are pending for cycle {stray[0]}, but the series is at cycle {cycle} (its "
            f"{s.dir.records.name} records {cycle} finished cycles); the run directory was changed by hand: restore it"
        )
    if s.ledger.pending and not (selection := s.dir.cycle(cycle).selection).exists():
        raise RunError(
            f"{s.dir.ledger}: {len(s.ledger.pending)} images are pending but {selection} "
            "is missing; the run directory was changed by hand: restore it"
        )


def _read_selection(s: Series, cycle: int) -> dict[str, Any] | None:
    path = s.dir.cycle(cycle).selection
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _new_round(s: Series, cycle: int, min_score: float, image_url_prefix: str | None) -> QueryResult:
    ledger, log = s.ledger, s.exp.log
    records = read_cycle_records(s.dir.records)
    if not ledger.unlabeled() and records and not records[-1]["selected"]:
        log(
            f"{s.label} seed {s.seed}: nothing left to label ({ledger.summary()}); the model of cycle {cycle - 1} "
            "is the final one"
        )
        last = {k: records[-1].get(k) for k in NO_RESULT}
        return QueryResult(cycle - 1, [], None, False, exhausted=True, result=last)
    seconds: dict[str, float] = {}
    labeled = ledger.labeled(cycle)
    detector, result, view = s.train(cycle, seconds)
    if detector is not None:
        log(f"{s.label} seed {s.seed} cycle {cycle}: model trained on {len(labeled)} images ({_tested(result)})")
    if not ledger.unlabeled():
        s.finish(cycle, result, [], [], seconds)
        log(f"{s.label} seed {s.seed}: nothing left to label ({ledger.summary()}); this model is the final one")
        return QueryResult(cycle, [], None, False, exhausted=True, result=result)
    ids, _ = s.select(cycle, detector, view, seconds)
    if detector is None:
        log(f"{s.label} seed {s.seed} cycle {cycle}: no labeled image yet: {len(ids)} images picked at random")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    seconds_asked = {k: round(v, 3) for k, v in seconds.items()}
    atomic_write_json(s.cycle_dir(cycle).query, {"requested_at": now, "seconds": seconds_asked})
    s.request(cycle, ids)  # saved before the package exists: a crash leaves a request, never a lost one
    return _package(s, cycle, ids, True, min_score, image_url_prefix, detector=detector, result=result)


def _tested(result: Mapping[str, Any]) -> str:
    return describe_result(result) if result["mAP"] is None else "test " + describe_result(result)


def _package(
    s: Series,
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
        detector = s.exp.load_detector(cdir.model)
    if result is None:
        done = cdir.evaluation
        result = json.loads(done.read_text(encoding="utf-8"))["result"] if done.exists() else dict(NO_RESULT)
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


# -- import ----------------------------------------------------------------------------------


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
    """Import the labels people made for the pending request (see :mod:`mgral.human`).

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
        s = _open_series(_prepare(run, config, strategy, seed, log=log, progress=False))
        cycle = s.finished
        _check_pending(s, cycle)
        answers, unlabeled = read_answers(path, fmt or detect_format(path), s.exp.dataset, clip=clip_boxes)
        ledger, dataset, store = s.ledger, s.exp.dataset, s.labels_of
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
                stored = dataset[i].target if c == 0 else store.imported.get(i, (c, None))[1]
                if stored is None:
                    repaired[i] = a.target  # the ledger has it, the labels file lost it: take it again
                elif not same_boxes(stored, a.target):
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
            imported = dict(store.imported)
            imported.update({i: (ledger.labeled_in[i], t) for i, t in repaired.items()})
            imported.update({i: (cycle + 1, t) for i, t in new_labels.items()})
            store.save(imported)  # the labels are on disk before the ledger says so
        if new_labels or new_skipped:
            s.resolve(cycle, list(new_labels), new_skipped)
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


def _why_not_asked(s: Series, i: ImageId) -> str:
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


def _finish(s: Series, cycle: int) -> bool:
    """Append the record of ``cycle`` once its request is fully answered (True if appended now)."""
    selection = _read_selection(s, cycle)
    if s.finished != cycle or selection is None:
        return False
    ids, scores = selection["image_ids"], selection["scores"]
    if any(s.ledger.pending.get(i) == cycle + 1 for i in ids):
        return False
    cdir = s.dir.cycle(cycle)
    result, seconds = dict(NO_RESULT), {}
    if cdir.evaluation.exists():
        cached = json.loads(cdir.evaluation.read_text(encoding="utf-8"))
        result, seconds = cached["result"], dict(cached["seconds"])
    if cdir.query.exists():
        info = json.loads(cdir.query.read_text(encoding="utf-8"))
        seconds.update(info["seconds"])
        requested = dt.datetime.fromisoformat(info["requested_at"])
        seconds["label"] = (dt.datetime.now(dt.UTC) - requested).total_seconds()
    skipped = [i for i in ids if s.ledger.skipped.get(i) == cycle + 1]
    record = s.finish(cycle, result, ids, scores, seconds, skipped=skipped)
    s.exp.log(
        f"{s.label} seed {s.seed} cycle {cycle}: {record['num_labeled']} images, {record['num_boxes_labeled']} boxes "
        f"({_tested(result)}); {len(ids) - len(skipped)} labeled and {len(skipped)} skipped for cycle {cycle + 1}"
    )
    return True
