"""The active-learning cycle as a resumable state machine.

For every seed, every strategy starts from the same initial labeled set. One series
(strategy, seed) runs cycles ``0..config.cycles``; cycle ``c``:

1. train a fresh detector on the images labeled in cycles ``<= c`` (the labels the oracle
   revealed; checkpoint per epoch in the cycle's directory, so a killed training resumes);
2. evaluate it on the test split (a point of the AL curve);
3. unless it is the last cycle: compute what the strategy declares it needs (pool
   predictions, embeddings, the detector) and nothing else, select ``budget`` images,
   write ``selection.json``, request them in the ledger and save it (*before* waiting on
   the oracle), collect the answer, resolve the ledger and save it again;
4. append the cycle record to ``cycles.jsonl``. A cycle is finished exactly when its
   record is there.

Cycle 0 of every strategy of a seed is one model (same seed, same initial set): it is
trained once, in ``RUN/_shared/seed-<s>/cycle-0``, and reused.

Series are independent: with ``executor: process`` or ``ray`` they run in parallel
(``workers`` at once, ``threads`` torch threads each), first every seed's shared cycle 0,
then the full-data references, then every (strategy, seed) series. A series that fails does not
stop the others; the run then fails naming each failed series, and ``--resume`` retries it.
The executor settings are not part of what a run computes: a run started inline may be
resumed on a Ray cluster.

On ``--resume`` each series restarts at its first unfinished cycle. Training is
deterministic for a seed on CPU, predictions are cached per cycle, a selection already
written is reused and never recomputed, and the oracle's answers depend only on (seed,
image id): a killed run continues to exactly the selections of an uninterrupted one. For the
same reason a cycle whose model file (or epoch checkpoint) is unreadable is trained again,
and the temporary files of writes a kill cut short are removed.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mgral._io import atomic_write_json
from mgral.config import EXECUTION_KEYS, ExperimentConfig, config_from_dict, config_to_dict
from mgral.data.records import Dataset, ImageId, Target, read_id_list
from mgral.errors import CheckpointError, ConfigError, MgralError, RunError
from mgral.oracles import SimulatedOracle
from mgral.pool import Ledger
from mgral.runs import REFERENCE_LABEL, RunDir, append_cycle_record, read_cycle_records, remove_stale_temp_files


def prepare_dataset(config: ExperimentConfig, run: RunDir | None = None) -> Dataset:
    """Read the configured dataset (generating the built-in scenes first if asked) and give
    the images without a split one, as ``dataset.split`` says
    (:meth:`~mgral.config.DatasetConfig.split_setting`).

    ``run``: a run that exists keeps the splits it recorded (``RUN/splits.json``; one without
    the file assigned none, as runs did before it existed); a new one records them when it is
    created (:meth:`~mgral.runs.RunDir.stage_splits`).

    Raises:
        ConfigError: the pool splits, or (simulated) the test split, hold no image.
        RunError: the images without a split are not those the run recorded.
    """
    from mgral.data.formats import read_dataset
    from mgral.data.splits import assign_splits, with_splits
    from mgral.data.synth import generate

    ds = config.dataset
    path = Path(ds.path)
    if ds.synth is not None and not path.exists():
        generate(path, ds.synth_config())
    dataset = read_dataset(
        path, ds.format, image_root=ds.image_root, clip_boxes=ds.clip_boxes, follow_links=ds.follow_links
    )
    human = config.oracle.kind == "human"
    if run is not None and run.config_file.exists():
        recorded = run.recorded_splits()
        if recorded is not None:
            dataset = with_splits(dataset, recorded["images"], source=str(run.splits_file))
    elif (setting := ds.split_setting(dataset, human=human)) is not None:
        assigned = assign_splits(dataset, **setting.model_dump())
        dataset = with_splits(dataset, assigned)
        if run is not None:
            run.stage_splits(setting.model_dump(), assigned)
    ds.check_splits(dataset, human=human)
    return dataset


def initial_ids(config: ExperimentConfig, dataset: Dataset, pool: list[ImageId], seed: int) -> list[ImageId]:
    """The initial labeled set of ``seed`` (the same for every strategy): a seeded draw from
    the pool, or the ids file.

    Raises:
        ConfigError: a size larger than the pool, or ids outside the pool.
    """
    init = config.initial
    if init.ids_file is not None:
        ids = read_id_list(init.ids_file, dataset)
        outside = [i for i in ids if i not in set(pool)]
        if outside:
            raise ConfigError(
                f"{init.ids_file}: ids {outside[:5]} are not in the pool splits {config.dataset.pool_splits}"
            )
        return ids
    n = init.size if init.size is not None else max(1, round(init.fraction * len(pool)))
    if n > len(pool):
        raise ConfigError(f"initial size {n} is larger than the pool ({len(pool)} images)")
    rng = np.random.default_rng([seed, 0])
    return [pool[k] for k in sorted(rng.choice(len(pool), size=n, replace=False))]


def visible_dataset(dataset: Dataset, labels: Mapping[ImageId, Target]) -> Dataset:
    """The dataset as the learner may see it: revealed labels on labeled images, no boxes
    on any other (so no strategy can read a pool label, by construction)."""
    return Dataset(dataset.root, dataset.categories, (replace(r, target=labels.get(r.id, Target())) for r in dataset))


@dataclass
class Experiment:
    """What every series of a run shares."""

    config: ExperimentConfig
    run: RunDir
    dataset: Dataset
    pool: list[ImageId]
    test: list[ImageId]
    log: Callable[[str], None] = print
    progress: bool = True

    def detector(self, seed: int, cycle: int, *, reference: bool = False):
        """A fresh detector for ``cycle`` of a series (``reference``: the full-data run,
        trained with ``reference_train`` on top of ``detector.train``)."""
        from mgral.detectors.torchvision_detector import TorchvisionDetector
        from mgral.detectors.training import derive_seed

        det = self.config.detector
        return TorchvisionDetector(
            det.preset,
            self.dataset.categories,
            weights=det.weights,
            device=det.device,
            seed=derive_seed(seed, cycle, 11),
            train={"progress": self.progress, **train_settings(self.config, reference=reference)},
            **det.params,
        )


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


def check_detector(config: ExperimentConfig, dataset: Dataset) -> None:
    """Refuse a detector spec that would fail only when the first model is built or trained:
    an unknown preset, a bad parameter or weights file, an invalid training setting, an
    unknown device. Builds the model once, on the CPU, and trains nothing.

    Raises:
        ConfigError / CheckpointError: naming the setting.
    """
    import torch

    from mgral.detectors.models import PRESETS, build_model
    from mgral.detectors.torchvision_detector import resolve_device
    from mgral.detectors.training import make_config

    det = config.detector
    preset = PRESETS.get(det.preset)
    for reference in (False, True) if config.full_data_reference else (False,):
        make_config(preset.train_defaults, train_settings(config, reference=reference))
    resolve_device(det.device)
    with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
        build_model(det.preset, len(dataset.categories) + 1, weights=det.weights, **det.params)


def seed_oracle(exp: Experiment, seed: int) -> SimulatedOracle:
    """The simulated annotator of ``seed``: its answers depend only on (seed, image id)."""
    o = exp.config.oracle
    return SimulatedOracle(exp.dataset, seed=seed, label_noise=o.label_noise, drop_boxes=o.drop_boxes)


def open_experiment(config: ExperimentConfig, run: RunDir, log=print, progress: bool = True) -> Experiment:
    """Read the dataset and split it into pool and test.

    Raises:
        ConfigError: an empty pool or test split.
    """
    dataset = prepare_dataset(config, run)
    pool = dataset.image_ids(config.dataset.pool_splits)
    test = dataset.image_ids(config.dataset.test_split)
    if not pool or not test:
        raise ConfigError(
            f"the pool splits {config.dataset.pool_splits} hold {len(pool)} images and the test split "
            f"{config.dataset.test_split!r} {len(test)}; both must be non-empty"
        )
    return Experiment(config, run, dataset, pool, test, log, progress)


def run_experiment(
    config: ExperimentConfig, out: str | Path, *, resume: bool = False, log=print, progress: bool = True
) -> Path:
    """Run every (strategy, seed) series of ``config`` into ``out``; with ``resume``,
    continue the run already there (or start one if ``out`` holds none).

    Nothing is written before the whole config is checked (strategies, detector, dataset,
    initial set). An exception on the way (``KeyboardInterrupt``, or :class:`Stopped` under
    :func:`stop_on_signals`, as ``mgral run`` does) ends the worker processes or Ray tasks
    before the run's lock is released.

    Raises:
        RunError: ``out`` in use by another process, not resumable, or resumed with a
            different config.
        ConfigError / DatasetError: invalid configuration or data.
    """
    from mgral.strategies import build_strategy

    if config.oracle.kind == "human":
        raise ConfigError(
            "oracle.kind is human: people label the chosen images, one round at a time, so this config is not run "
            "by mgral run; use mgral query --config CONFIG --run RUN (writes what to label), label the images, "
            "then mgral import-labels --run RUN FILE, and query again"
        )
    run = RunDir(out)
    # Everything a typo breaks is checked before the first write (the lock creates the
    # directory): a refused config leaves no run behind that the corrected one would clash with.
    strategies = {s.label: build_strategy(s.name, **s.params) for s in config.strategies}
    exp = open_experiment(config, run, log, progress)
    check_detector(config, exp.dataset)
    initials = {seed: initial_ids(config, exp.dataset, exp.pool, seed) for seed in config.seeds}
    resolved = config_to_dict(config)
    with run.lock():
        if resume and run.config_file.exists():
            run.open(resolved, ignore=EXECUTION_KEYS)
        else:
            run.create(resolved)
        remove_stale_temp_files(run.path, recursive=True)  # nothing else writes here while we hold the lock
        if config.executor != "inline":
            _run_parallel(exp)
            return Path(out)
        with _torch_threads(config.threads):
            for seed in config.seeds:
                initial = initials[seed]
                if config.full_data_reference:  # first: a run stopped part-way still has its ceiling
                    run_series(exp, REFERENCE_LABEL, None, seed, exp.pool)
                for label, strategy in strategies.items():
                    run_series(exp, label, strategy, seed, initial)
    return Path(out)


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (see :class:`stop_on_signals`). A ``KeyboardInterrupt``: no
    ``except Exception`` on the way up may swallow it, and extensions that wait in C (Ray)
    know to abort their wait for one (they may re-raise it as a plain ``KeyboardInterrupt``)."""

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class stop_on_signals:
    """Turn ``signums`` into :class:`Stopped` in the main thread inside the block; ``signum``
    then tells which one came (None: none).

    Python's default SIGTERM / SIGHUP end the process at once: no ``finally`` runs, so the
    run's worker processes (and Ray tasks) would train on, writing into a run directory
    whose lock is gone. Raised as an exception instead, the way out stops the executor's
    jobs, then releases the lock. Later signals are ignored until the block exits, so that
    this cleanup is not itself cut short.
    """

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signums, self.signum = signums, None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        for s in self.signums:
            signal.signal(s, signal.SIG_IGN)
        self.signum = signum
        raise Stopped(signum)

    def __enter__(self) -> stop_on_signals:
        self._previous = {s: signal.signal(s, self._handler) for s in self.signums}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class _torch_threads:
    """Use ``n`` torch threads inside the block (None: leave torch's setting alone)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.before = n, None

    def __enter__(self) -> None:
        if self.n is not None:
            import torch

            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)


# -- parallel series ---------------------------------------------------------------------

_CYCLE0 = "cycle-0"  # a task that trains (and predicts with) one seed's shared cycle-0 model
_SERIES = "series"


def _series_done(exp: Experiment, label: str, seed: int) -> bool:
    last = 0 if label == REFERENCE_LABEL else exp.config.cycles
    return len(read_cycle_records(exp.run.series(label, seed).records)) > last


def plan_tasks(exp: Experiment) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """The unfinished tasks of ``exp`` in two phases, each ``(kind, label, seed)``: the shared
    cycle-0 models of the seeds that still have series to run; then the full-data references
    (one training each, first so that a run stopped part-way, and its partial report, still
    has the ceiling that "labels to reach 90%" needs), then the series: the costliest
    strategies first (their ``selection_cost``), so that the run does not end with one long
    series alone; otherwise seed by seed, in the config's order."""
    from mgral.strategies import STRATEGIES

    config = exp.config
    order = [
        (-STRATEGIES.get(spec.name).selection_cost, s, i, (_SERIES, spec.label, s))
        for s in config.seeds
        for i, spec in enumerate(config.strategies)
    ]
    series = [task for *_, task in sorted(order)]
    series = [t for t in series if not _series_done(exp, t[1], t[2])]
    first = [(_CYCLE0, "", s) for s in sorted({t[2] for t in series})]
    references = [(_SERIES, REFERENCE_LABEL, s) for s in config.seeds if config.full_data_reference]
    return first, [t for t in references if not _series_done(exp, t[1], t[2])] + series


def _run_parallel(exp: Experiment) -> None:
    """Run the unfinished series of ``exp`` through its executor: every seed's shared cycle 0
    first, then the full-data references, then every (strategy, seed) series of a seed whose
    cycle 0 is done. Each task's failure is collected; the run fails at the end naming them
    all."""
    from mgral.executors import make_executor

    config = exp.config
    threads = config.threads or 1
    first, series = plan_tasks(exp)
    shared = (config_to_dict(config), str(exp.run.path), threads)
    failures: dict[tuple, str] = {}
    exp.log(
        f"running {len(series)} series ({len(first)} shared cycle-0 models first) with the {config.executor} "
        f"executor, {threads} torch thread(s) each"
    )
    with make_executor(
        config.executor,
        workers=config.workers,
        ray_address=config.ray_address,
        cpus_per_job=threads,
        gpus_per_job=config.gpus,
    ) as executor:
        for phase in (first, series):
            phase = [t for t in phase if not (t[0] == _SERIES and (_CYCLE0, "", t[2]) in failures)]
            for index, error in executor.map(_run_task, phase, shared):
                kind, label, seed = phase[index]
                name = f"seed {seed} shared cycle 0" if kind == _CYCLE0 else f"{label} seed {seed}"
                if error is None:
                    exp.log(f"{name}: done")
                else:
                    failures[phase[index]] = error
                    exp.log(f"{name}: FAILED\n{error}")
    if failures:
        names = [f"seed {s} shared cycle 0" if k == _CYCLE0 else f"{lab} seed {s}" for k, lab, s in failures]
        last = next(reversed(failures.values())).strip().splitlines()[-1]
        raise RunError(
            f"{len(failures)} task(s) failed: {', '.join(names)} (last error: {last}); the other series are "
            "saved: fix the cause and continue with --resume"
        )


_WORKER_EXPERIMENTS: dict[str, Experiment] = {}  # one per run, per worker process: read once


def _run_task(task: tuple[str, str, int], shared: tuple[dict, str, int]) -> str | None:
    """One task in a worker (process or Ray): returns None, or its failure (the message of an
    :class:`MgralError`, the traceback of anything else)."""
    kind, label, seed = task
    config_dict, out, threads = shared
    try:
        import torch

        torch.set_num_threads(threads)
        exp = _WORKER_EXPERIMENTS.get(out)
        if exp is None:
            config = config_from_dict(config_dict, source=str(RunDir(out).config_file))
            exp = _WORKER_EXPERIMENTS[out] = open_experiment(config, RunDir(out), log=_flush_print, progress=False)
        initial = initial_ids(exp.config, exp.dataset, exp.pool, seed)
        if kind == _CYCLE0:
            _shared_cycle0(exp, seed, initial)
        elif label == REFERENCE_LABEL:
            run_series(exp, label, None, seed, exp.pool)
        else:
            from mgral.strategies import build_strategy

            spec = next(s for s in exp.config.strategies if s.label == label)
            run_series(exp, label, build_strategy(spec.name, **spec.params), seed, initial)
        return None
    except MgralError as err:  # bad input, a full disk: the message says what and where, a traceback adds noise
        return str(err)
    except Exception:  # a bug: reported with its traceback by the parent, which goes on with the other series
        return traceback.format_exc()


def _flush_print(text: str) -> None:
    print(text, flush=True)


def _shared_cycle0(exp: Experiment, seed: int, initial: list[ImageId]) -> None:
    """Train one seed's shared cycle-0 model and, if a strategy needs them, cache its pool
    predictions, so that the seed's series (run in parallel) reuse both."""
    from mgral.strategies import STRATEGIES

    wdir = exp.run.shared_cycle0(seed)
    oracle = seed_oracle(exp, seed)
    view = visible_dataset(exp.dataset, {i: oracle.labels_for(i) for i in initial})
    detector, _ = train_and_evaluate(exp, seed, 0, wdir, view, initial, {})
    needs = set().union(*(STRATEGIES.get(s.name).requires for s in exp.config.strategies))
    if exp.config.cycles and needs & {"predictions", "embeddings"}:
        _cached_predictions(exp, detector, view, wdir.predictions, exp.pool)


def run_series(exp: Experiment, label: str, strategy, seed: int, initial: list[ImageId]) -> None:
    """Run the unfinished cycles of one series (``strategy=None``: one full-data cycle)."""
    config = exp.config
    sdir = exp.run.series(label, seed).mkdir()
    remove_stale_temp_files(sdir.path)  # e.g. a ledger write cut short by a kill; only this series writes here
    if sdir.ledger.exists():
        ledger = Ledger.load(sdir.ledger)
    else:
        ledger = Ledger.create(exp.pool, initial)
        ledger.save(sdir.ledger)
    oracle = seed_oracle(exp, seed)
    last = 0 if strategy is None else config.cycles
    for cycle in range(len(read_cycle_records(sdir.records)), last + 1):
        record = run_cycle(exp, label, strategy, seed, cycle, cycle == last, ledger, oracle)
        append_cycle_record(sdir.records, record)
        exp.log(
            f"{label} seed {seed} cycle {cycle}: {record['num_labeled']} images, {record['num_boxes_labeled']} "
            f"boxes, mAP {record['mAP']:.4f}, mAP50 {record['mAP50']:.4f} "
            f"({sum(record['seconds'].values()):.0f} s)"
        )
        if cycle and (previous := sdir.cycle(cycle - 1).model).exists():
            previous.unlink()  # keep the latest model only: earlier ones are reproducible


def run_cycle(
    exp: Experiment,
    label: str,
    strategy,
    seed: int,
    cycle: int,
    is_last: bool,
    ledger: Ledger,
    oracle: SimulatedOracle,
) -> dict[str, Any]:
    config, sdir = exp.config, exp.run.series(label, seed)
    cdir = sdir.cycle(cycle).mkdir()
    seconds: dict[str, float] = {}
    labeled = ledger.labeled(cycle)
    labels = {i: oracle.labels_for(i) for i in labeled}
    view = visible_dataset(exp.dataset, labels)

    # Cycle 0 trains on the seed's initial set, the same for every strategy: one model per
    # seed, trained once (identical to what each series would train) and shared.
    shared = strategy is not None and cycle == 0
    wdir = exp.run.shared_cycle0(seed) if shared else cdir
    init = None
    if config.detector.warm_start and cycle > 0:
        prev_shared = strategy is not None and cycle == 1
        init = (exp.run.shared_cycle0(seed) if prev_shared else sdir.cycle(cycle - 1)).model
    detector, result = train_and_evaluate(
        exp, seed, cycle, wdir, view, labeled, seconds, init, reference=strategy is None
    )

    selected: list[ImageId] = []
    scores: list[float] = []
    if not is_last and strategy is not None and ledger.unlabeled():
        selected, scores = select_batch(exp, strategy, seed, cycle, cdir, ledger, view, detector, seconds, shared)
        # Each step is skipped when a resumed run finds it done: request, then collect.
        asked = ledger.labeled_in.keys() | ledger.skipped.keys() | ledger.pending.keys()  # or answered
        new = [i for i in selected if i not in asked]
        if new:
            ledger.request(new, cycle + 1)
            ledger.save(sdir.ledger)  # the request is on disk before the oracle is waited on
        pending = [i for i in selected if ledger.pending.get(i) == cycle + 1]
        if pending:
            t0 = time.perf_counter()
            oracle.request(pending)
            answer = oracle.collect()
            ledger.resolve(list(answer.labels), answer.skipped, cycle + 1)
            ledger.save(sdir.ledger)
            seconds["label"] = time.perf_counter() - t0

    return cycle_record(config, label, strategy, seed, cycle, labeled, labels, result, selected, scores, seconds)


def cycle_record(
    config: ExperimentConfig,
    label: str,
    strategy,
    seed: int,
    cycle: int,
    labeled: list[ImageId],
    labels: Mapping[ImageId, Target],
    result: Mapping[str, Any],
    selected: list[ImageId],
    scores: list[float],
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    """The record of a finished cycle, as ``cycles.jsonl`` keeps it and ``mgral report`` reads it
    (``mAP`` / ``mAP50`` are None where nothing was evaluated)."""
    num_boxes = sum(len(labels[i]) for i in labeled)
    return {
        "strategy": label,
        "strategy_name": getattr(strategy, "name", "full-data"),
        "seed": seed,
        "cycle": cycle,
        "num_labeled": len(labeled),
        "num_boxes_labeled": num_boxes,
        "labeling_cost": len(labeled) + config.oracle.box_cost * num_boxes,
        "mAP": result["mAP"],
        "mAP50": result["mAP50"],
        "per_class": result["per_class"],
        "selected": selected,
        "scores": scores,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def train_and_evaluate(
    exp, seed, cycle, wdir, view, labeled, seconds, init=None, reference: bool = False
) -> tuple[Any, dict]:
    """Train (resuming from ``wdir.last``) and evaluate, or reuse both from ``wdir`` (a :class:`mgral.runs.CycleDir`).

    ``init``: a model file to start from (warm start) instead of the preset's initialisation;
    ``reference``: the full-data run (``reference_train`` applies)."""
    from mgral.detectors.torchvision_detector import MODEL_KEYS, RESUME_KEYS, TorchvisionDetector
    from mgral.detectors.training import load_state

    done, model_file, last = wdir.evaluation, wdir.model, wdir.last
    if done.exists() and model_file.exists():
        cached = json.loads(done.read_text(encoding="utf-8"))
        try:
            detector = TorchvisionDetector.load(model_file, device=exp.config.detector.device)
        except CheckpointError as err:
            # Broken after it was written (a disk fault, a copy cut short): training is
            # deterministic for a seed, so this cycle is trained again instead of failing the run.
            exp.log(f"{err}; training cycle {cycle} again")
            done.unlink()
        else:
            seconds.update(cached["seconds"])  # the cost of that training, for the timing tables
            return detector, cached["result"]
    if last.exists():
        try:
            load_state(last, MODEL_KEYS + RESUME_KEYS)
        except CheckpointError as err:  # as above: start this cycle's training over
            exp.log(f"{err}; training cycle {cycle} from the start")
            last.unlink()
    wdir.mkdir()
    t0 = time.perf_counter()
    detector = exp.detector(seed, cycle, reference=reference)
    if init is not None:
        if not init.exists():
            raise RunError(
                f"warm start: the previous cycle's model {str(init)!r} is missing; it is kept until the next "
                "cycle finishes, so it was deleted by hand: re-run without detector.warm_start or restore it"
            )
        try:
            previous = TorchvisionDetector.load(init, device="cpu")
        except CheckpointError as err:
            raise RunError(
                f"warm start: the previous cycle's model is unreadable ({err}); this cycle starts from it, so "
                "restore the file, or start a new run without detector.warm_start"
            ) from err
        detector.model.load_state_dict(previous.model.state_dict())
    detector.fit(view, labeled, checkpoint_dir=wdir.path, resume=True)
    detector.save(model_file)
    last.unlink(missing_ok=True)
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result: dict[str, Any] = {"mAP": None, "mAP50": None, "per_class": {}}  # no labeled test split (human runs)
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


def select_batch(exp, strategy, seed, cycle, cdir, ledger, view, detector, seconds, shared=False) -> tuple[list, list]:
    """The selection of ``cycle`` (reused from ``cdir.selection``, a :class:`mgral.runs.CycleDir`, when already made).

    ``shared``: ``detector`` is the seed's shared cycle-0 model, so its pool predictions are
    cached beside it, once for every strategy of the seed."""
    from mgral.strategies import SelectionContext

    path = cdir.selection
    if path.exists():  # made before a crash: never recomputed (JSON keeps int and str ids apart)
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["image_ids"], saved["scores"]
    pool, labeled = ledger.unlabeled(), ledger.labeled(cycle)
    context = SelectionContext(
        dataset=view,
        pool_ids=pool,
        labeled_ids=labeled,
        rng=np.random.default_rng([seed, cycle, 5]),
        cycle=cycle,
        work_dir=cdir.path,
    )
    t0 = time.perf_counter()
    if strategy.requires & {"predictions", "embeddings"}:
        if shared:  # one model for every strategy of the seed: predict once, for all of them
            cache, wanted = exp.run.shared_cycle0(seed).predictions, exp.pool
        else:
            cache, wanted = cdir.predictions, pool + (labeled if "embeddings" in strategy.requires else [])
        preds = _cached_predictions(exp, detector, view, cache, wanted)
        if "predictions" in strategy.requires:
            context.predictions = {i: preds[i] for i in pool}
        if "embeddings" in strategy.requires:
            context.embeddings = {i: preds[i].embedding for i in wanted}
    if "detector" in strategy.requires:
        context.detector = detector
    if "oracle" in strategy.requires:  # research-only reward sources: the true labels of every image
        context.oracle_dataset = exp.dataset
    seconds["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selection = strategy.select(context, exp.config.budget)
    ids, scores = list(selection.image_ids), [float(s) for s in selection.scores]
    if exp.config.budget_boxes is not None:
        ids, scores = _cap_boxes(exp.dataset, ids, scores, exp.config.budget_boxes)
    seconds["select"] = time.perf_counter() - t0
    atomic_write_json(path, {"image_ids": ids, "scores": scores, "info": selection.info}, indent=1)
    return ids, scores


def _cached_predictions(exp: Experiment, detector, view: Dataset, cache: Path, wanted: list[ImageId]) -> dict:
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
