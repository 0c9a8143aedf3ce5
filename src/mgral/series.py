"""One series of a run, cycle by cycle: the engine both loops drive.

A :class:`Series` is one (strategy label, seed) of a run: its ledger, where its labels come
from, and its directory. A cycle ``c`` is four steps, each skipped when a resumed run finds
it done:

1. :meth:`Series.train` the detector of cycle ``c`` on ``ledger.labeled(c)`` (or reuse the
   model and evaluation already in the cycle directory) and evaluate it on the test split;
2. :meth:`Series.select` the next batch (reused from ``selection.json`` when already made;
   at random when nothing is labeled yet: a cold start);
3. :meth:`Series.request` it: the ledger holds the request, saved, *before* anyone is asked;
4. once answered (:meth:`Series.resolve`), :meth:`Series.finish` appends the cycle's record.

The simulated loop (:mod:`mgral.loop`) runs the four steps at once, its oracle answering at
step 3. The human loop (:mod:`mgral.human`) stops after step 3 (``mgral query`` writes the
labeling package) and resumes at step 4 when people's labels are imported.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mgral._io import atomic_write_json
from mgral.config import ExperimentConfig
from mgral.data.records import Dataset, ImageId, Target
from mgral.errors import CheckpointError, RunError
from mgral.pool import Ledger
from mgral.runs import CycleDir, RunDir, SeriesDir, append_cycle_record, read_cycle_records, remove_stale_temp_files

NO_RESULT: dict[str, Any] = {"mAP": None, "mAP50": None, "per_class": {}}
"""The test result of a cycle without one (no labeled test split, or no model yet)."""


@dataclass
class Experiment:
    """What every series of a run shares. ``share_cycle0``: the strategies of a seed start
    from one cycle-0 model, trained once (simulated runs: they share the initial set)."""

    config: ExperimentConfig
    run: RunDir
    dataset: Dataset
    pool: list[ImageId]
    test: list[ImageId]
    log: Callable[[str], None] = print
    progress: bool = True
    share_cycle0: bool = True
    display: Any = None
    """The run display (:class:`mgral.progress.RunProgress`) where this process shows one."""
    tracker: Any = None
    """The experiment tracker (:class:`mgral.tracking.Tracker`) when ``tracking`` is set."""
    _started: int = 0

    def series_started(self, label: str, seed: int, cycles: int) -> None:
        """A series (re)starts: the next of the run display's N."""
        self._started += 1
        if self.display is not None:
            self.display.series_started(label, seed, self._started, cycles=cycles)

    def phase(self, name: str) -> None:
        """The cycle in progress enters phase ``name`` (see :data:`mgral.progress.PHASES`)."""
        if self.display is not None:
            self.display.phase(name)

    def recorded(self, record: Mapping[str, Any]) -> None:
        """A cycle's record was appended: show it, and log it to the tracker. A tracking store
        that refuses is reported and the run goes on: the next sync logs what this one missed."""
        from mgral.errors import TrackingError

        if self.display is not None:
            self.display.cycle_done(record)
        if self.tracker is not None:
            try:
                self.tracker.sync()
            except TrackingError as err:
                self.log(f"warning: {err}; the run goes on, and the next sync logs what this one could not")

    def detector(self, seed: int, cycle: int, *, reference: bool = False):
        """A fresh detector for ``cycle`` of a series (``reference``: the full-data run,
        trained with ``reference_train`` on top of ``detector.train``)."""
        from mgral.detectors import detector_class
        from mgral.detectors.training import derive_seed

        spec = self.config.detector
        return detector_class(spec.kind).from_config(
            spec,
            self.dataset.categories,
            seed=derive_seed(seed, cycle, 11),
            train={"progress": self.progress, **train_settings(self.config, reference=reference)},
        )

    def load_detector(self, path: Path, *, device: str | None = None):
        """The detector saved at ``path`` (on the configured device unless ``device``)."""
        from mgral.detectors import detector_class

        spec = self.config.detector
        return detector_class(spec.kind).load(path, device=device or spec.device)


def train_settings(config: ExperimentConfig, *, reference: bool = False) -> dict[str, Any]:
    """The training overrides of a series' detector (``reference``: of the full-data run,
    ``reference_train`` on top of ``detector.train``)."""
    train = dict(config.detector.train)
    if reference and config.reference_train:
        extra = config.reference_train
        for a, b in (("epochs", "iterations"), ("iterations", "epochs")):
            if a in extra:
                train.pop(b, None)  # the reference's length replaces the series' one
        train.update(extra)
    return train


def visible_dataset(dataset: Dataset, labels: Mapping[ImageId, Target]) -> Dataset:
    """The dataset as the learner may see it: revealed labels on labeled images, no boxes
    on any other (so no strategy can read a pool label, by construction)."""
    return Dataset(dataset.root, dataset.categories, (replace(r, target=labels.get(r.id, Target())) for r in dataset))


@dataclass
class Series:
    """One (strategy, seed) series (``strategy=None``: the full-data reference).

    ``labels_of(ids)`` gives the labels of labeled images: the simulated oracle's, or the
    ones people imported (:class:`mgral.human.LabelStore`)."""

    exp: Experiment
    label: str
    strategy: Any
    seed: int
    labels_of: Callable[[Sequence[ImageId]], dict[ImageId, Target]]
    dir: SeriesDir
    ledger: Ledger

    @classmethod
    def open(
        cls,
        exp: Experiment,
        label: str,
        strategy: Any,
        seed: int,
        initial: Sequence[ImageId],
        labels_of: Callable[[Sequence[ImageId]], dict[ImageId, Target]],
    ) -> Series:
        """The series' ledger, read from its directory or created with ``initial`` labeled.

        Raises:
            RunError: the ledger's pool is not the dataset's pool any more.
        """
        sdir = exp.run.series(label, seed).mkdir()
        remove_stale_temp_files(sdir.path)  # e.g. a ledger write cut short by a kill; only this series writes here
        if sdir.ledger.exists():
            ledger = Ledger.load(sdir.ledger)
            if list(ledger.pool) != exp.pool:
                raise RunError(
                    f"{sdir.ledger}: the pool of the run ({len(ledger.pool)} images) is not the pool of the dataset "
                    f"now ({len(exp.pool)} images); the dataset file changed since the run started: restore it, or "
                    "start a new run"
                )
        else:
            ledger = Ledger.create(exp.pool, initial)
            ledger.save(sdir.ledger)
        return cls(exp, label, strategy, seed, labels_of, sdir, ledger)

    @property
    def finished(self) -> int:
        """The number of finished cycles (= the cycle to run next)."""
        return len(read_cycle_records(self.dir.records))

    def cycle_dir(self, cycle: int) -> CycleDir:
        return self.dir.cycle(cycle).mkdir()

    def model_dir(self, cycle: int) -> CycleDir:
        """Where the model of ``cycle`` lives: cycle 0 of a strategy is its seed's shared one
        when the run shares it (same seed, same initial set: one model, trained once)."""
        if cycle == 0 and self.strategy is not None and self.exp.share_cycle0:
            return self.exp.run.shared_cycle0(self.seed)
        return self.cycle_dir(cycle)

    def view(self, labeled: Sequence[ImageId]) -> Dataset:
        return visible_dataset(self.exp.dataset, self.labels_of(labeled))

    def train(self, cycle: int, seconds: dict[str, float]) -> tuple[Any, dict[str, Any], Dataset]:
        """The detector of ``cycle`` (trained now, or reused), its test result and the
        learner's view of the dataset; no detector when nothing is labeled (a cold start)."""
        labeled = self.ledger.labeled(cycle)
        view = self.view(labeled)
        if not labeled:
            return None, dict(NO_RESULT), view
        init = None
        if self.exp.config.detector.warm_start and cycle > 0 and self.ledger.labeled(cycle - 1):
            init = self.model_dir(cycle - 1).model
        detector, result = train_and_evaluate(
            self.exp, self.seed, cycle, self.model_dir(cycle), view, labeled, seconds, init, self.strategy is None
        )
        return detector, result, view

    def select(
        self, cycle: int, detector: Any, view: Dataset, seconds: dict[str, float]
    ) -> tuple[list[ImageId], list[float]]:
        """The batch chosen after ``cycle`` (reused when already chosen); at random, without a
        detector, in a cold start."""
        cdir = self.cycle_dir(cycle)
        if detector is None and not cdir.selection.exists():
            pool = self.ledger.unlabeled()
            from mgral.strategies import selection_rng

            rng = selection_rng(self.seed, cycle)
            n = min(self.exp.config.budget, len(pool))
            ids = [pool[k] for k in sorted(rng.choice(len(pool), size=n, replace=False))]
            info = {"cold_start": "no labeled image yet: picked at random"}
            atomic_write_json(cdir.selection, {"image_ids": ids, "scores": [0.0] * n, "info": info}, indent=1)
        shared = cycle == 0 and self.model_dir(0) != cdir
        exp, ledger = self.exp, self.ledger
        return select_batch(exp, self.strategy, self.seed, cycle, cdir, ledger, view, detector, seconds, shared)

    def request(self, cycle: int, ids: Sequence[ImageId]) -> tuple[list[ImageId], list[ImageId]]:
        """Request the ids not asked yet for cycle ``cycle + 1`` and save the ledger (before
        anyone is asked); return those ids, and the ids of ``ids`` still pending."""
        ledger = self.ledger
        asked = ledger.labeled_in.keys() | ledger.skipped.keys() | ledger.pending.keys()  # or answered
        new = [i for i in ids if i not in asked]
        if new:
            ledger.request(new, cycle + 1)
            ledger.save(self.dir.ledger)
        return new, [i for i in ids if ledger.pending.get(i) == cycle + 1]

    def resolve(self, cycle: int, labeled: Sequence[ImageId], skipped: Sequence[ImageId]) -> None:
        """Record the answers to the request of cycle ``cycle + 1`` and save the ledger."""
        self.ledger.resolve(list(labeled), list(skipped), cycle + 1)
        self.ledger.save(self.dir.ledger)

    def finish(
        self,
        cycle: int,
        result: Mapping[str, Any],
        selected: Sequence[ImageId],
        scores: Sequence[float],
        seconds: Mapping[str, float],
        **extra: Any,
    ) -> dict[str, Any]:
        """Append the record of ``cycle`` (``extra``: more fields) and drop the previous
        cycle's model (only the latest is kept: earlier ones are reproducible)."""
        labeled = self.ledger.labeled(cycle)
        labels = self.labels_of(labeled)
        num_boxes = sum(len(labels[i]) for i in labeled)
        record = {
            "strategy": self.label,
            "strategy_name": getattr(self.strategy, "name", "full-data"),
            "seed": self.seed,
            "cycle": cycle,
            "num_labeled": len(labeled),
            "num_boxes_labeled": num_boxes,
            "labeling_cost": len(labeled) + self.exp.config.oracle.box_cost * num_boxes,
            "mAP": result["mAP"],
            "mAP50": result["mAP50"],
            "per_class": result["per_class"],
            "selected": list(selected),
            "scores": list(scores),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **extra,
        }
        append_cycle_record(self.dir.records, record)
        if cycle and (previous := self.dir.cycle(cycle - 1).model).exists():
            previous.unlink()
        self.exp.recorded(record)
        return record


def describe_result(result: Mapping[str, Any]) -> str:
    if result["mAP"] is None:
        return "not evaluated: the test split has no labels"
    return f"mAP {result['mAP']:.4f}, mAP50 {result['mAP50']:.4f}"


def train_and_evaluate(
    exp: Experiment,
    seed: int,
    cycle: int,
    wdir: CycleDir,
    view: Dataset,
    labeled: list[ImageId],
    seconds: dict[str, float],
    init: Path | None = None,
    reference: bool = False,
) -> tuple[Any, dict]:
    """Train (resuming from the detector's epoch checkpoint in ``wdir``) and evaluate, or
    reuse both from ``wdir``.

    ``init``: a model file to start from (warm start) instead of the preset's initialisation;
    ``reference``: the full-data run (``reference_train`` applies). A saved model or epoch
    checkpoint that cannot be read is trained again: training is deterministic for a seed."""
    done, model_file = wdir.evaluation, wdir.model
    if done.exists() and model_file.exists():
        cached = json.loads(done.read_text(encoding="utf-8"))
        try:
            detector = exp.load_detector(model_file)
        except CheckpointError as err:  # broken after it was written (a disk fault, a copy cut short)
            exp.log(f"{err}; training cycle {cycle} again")
            done.unlink()
        else:
            seconds.update(cached["seconds"])  # the cost of that training, for the timing tables
            return detector, cached["result"]
    wdir.mkdir()
    exp.phase("train")
    t0 = time.perf_counter()
    start = _warm_start(exp, init) if init is not None else None
    detector = exp.detector(seed, cycle, reference=reference)
    if start is not None:
        detector.start_from(start)
    try:
        detector.fit(view, labeled, checkpoint_dir=wdir.path, resume=True)
    except CheckpointError as err:
        if not wdir.last.exists():
            raise
        exp.log(f"{err}; training cycle {cycle} from the start")  # as above
        wdir.last.unlink()
        detector = exp.detector(seed, cycle, reference=reference)
        if start is not None:
            detector.start_from(start)
        detector.fit(view, labeled, checkpoint_dir=wdir.path, resume=True)
    detector.save(model_file)
    wdir.last.unlink(missing_ok=True)
    seconds["train"] = time.perf_counter() - t0
    exp.phase("evaluate")
    t0 = time.perf_counter()
    result: dict[str, Any] = dict(NO_RESULT)
    if exp.test:
        metrics = detector.evaluate(exp.dataset, exp.test, style=exp.config.evaluation.style)
        result = {
            "mAP": _finite(metrics.mAP),
            "mAP50": _finite(metrics.mAP50),
            "per_class": {k: _finite(v) for k, v in metrics.per_class.items()},
        }
    seconds["evaluate"] = time.perf_counter() - t0
    atomic_write_json(done, {"result": result, "seconds": {k: seconds[k] for k in ("train", "evaluate")}})
    return detector, result


def _warm_start(exp: Experiment, init: Path) -> Any:
    """The previous cycle's detector, which a warm-started cycle starts from."""
    if not init.exists():
        raise RunError(
            f"warm start: the previous cycle's model {str(init)!r} is missing; it is kept until the next "
            "cycle finishes, so it was deleted by hand: re-run without detector.warm_start or restore it"
        )
    try:
        return exp.load_detector(init, device="cpu")
    except CheckpointError as err:
        raise RunError(
            f"warm start: the previous cycle's model is unreadable ({err}); this cycle starts from it, so "
            "restore the file, or start a new run without detector.warm_start"
        ) from err


def select_batch(
    exp: Experiment,
    strategy: Any,
    seed: int,
    cycle: int,
    cdir: CycleDir,
    ledger: Ledger,
    view: Dataset,
    detector: Any,
    seconds: dict[str, float],
    shared: bool = False,
) -> tuple[list, list]:
    """The selection of ``cycle`` (reused from ``cdir.selection`` when already made).

    ``shared``: ``detector`` is the seed's shared cycle-0 model, so its pool predictions are
    cached beside it, once for every strategy of the seed."""
    from mgral.strategies import SelectionContext, selection_rng

    path = cdir.selection
    if path.exists():  # made before a crash: never recomputed (JSON keeps int and str ids apart)
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["image_ids"], saved["scores"]
    pool, labeled = ledger.unlabeled(), ledger.labeled(cycle)
    context = SelectionContext(
        dataset=view,
        pool_ids=pool,
        labeled_ids=labeled,
        rng=selection_rng(seed, cycle),
        cycle=cycle,
        work_dir=cdir.path,
        progress=exp.progress,
        jobs=exp.config.jobs.placement(),
    )
    exp.phase("predict")
    t0 = time.perf_counter()
    if strategy.requires & {"predictions", "embeddings"}:
        if shared:  # one model for every strategy of the seed: predict once, for all of them
            cache, wanted = exp.run.shared_cycle0(seed).predictions, exp.pool
        else:
            cache, wanted = cdir.predictions, pool + (labeled if "embeddings" in strategy.requires else [])
        preds = cached_predictions(exp, detector, view, cache, wanted)
        if "predictions" in strategy.requires:
            context.predictions = {i: preds[i] for i in pool}
        if "embeddings" in strategy.requires:
            context.embeddings = {i: preds[i].embedding for i in wanted}
    if "detector" in strategy.requires:
        context.detector = detector
    if "oracle" in strategy.requires:  # research-only reward sources: the true labels of every image
        context.oracle_dataset = exp.dataset
    seconds["predict"] = time.perf_counter() - t0

    exp.phase("select")
    t0 = time.perf_counter()
    selection = strategy.select(context, exp.config.budget)
    ids, scores = list(selection.image_ids), [float(s) for s in selection.scores]
    if exp.config.budget_boxes is not None:
        ids, scores = _cap_boxes(exp.dataset, ids, scores, exp.config.budget_boxes)
    seconds["select"] = time.perf_counter() - t0
    atomic_write_json(path, {"image_ids": ids, "scores": scores, "info": selection.info}, indent=1)
    return ids, scores


def cached_predictions(exp: Experiment, detector: Any, view: Dataset, cache: Path, wanted: list[ImageId]) -> dict:
    """The detector's predictions on ``wanted``, read from ``cache`` when it holds them all,
    else computed and saved there (atomically: a series running beside may read it)."""
    from mgral.detectors.cache import load_predictions, save_predictions

    preds = load_predictions(cache) if cache.exists() else {}
    if set(wanted) - set(preds):
        preds = detector.predict(view, wanted, progress=exp.progress)
        save_predictions(cache, preds)
    return preds


def _cap_boxes(dataset: Dataset, ids: list, scores: list, budget_boxes: int) -> tuple[list, list]:
    """Keep the selection's leading images while their boxes fit ``budget_boxes`` (at least
    one image). Simulation only: it counts the true boxes, known here before labeling."""
    total, n = 0, 0
    for i in ids:
        total += len(dataset[i].target)
        if n and total > budget_boxes:
            break
        n += 1
    return ids[:n], scores[:n]


def _finite(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
