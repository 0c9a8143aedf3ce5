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

The steps are :class:`mgral.series.Series`'s, which the human loop (:mod:`mgral.human`)
drives too. Cycle 0 of every strategy of a seed is one model (same seed, same initial set):
it is trained once, in ``RUN/_shared/seed-<s>/cycle-0``, and reused.

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

import signal
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mgral.config import EXECUTION_KEYS, ExperimentConfig, config_from_dict, config_to_dict
from mgral.data.records import Dataset, ImageId, read_id_list
from mgral.errors import ConfigError, MgralError, RunError
from mgral.oracles import SimulatedOracle
from mgral.progress import RunProgress
from mgral.runs import REFERENCE_LABEL, RunDir, read_cycle_records, remove_stale_temp_files
from mgral.series import (
    Experiment,
    Series,
    cached_predictions,
    describe_result,
    train_and_evaluate,
    train_settings,
    visible_dataset,
)
from mgral.tracking import open_tracker


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


def check_detector(config: ExperimentConfig, dataset: Dataset, strategies: Iterable[Any] = ()) -> None:
    """Refuse a detector spec that would fail only when the first model is built or trained
    (the kind's own checks: for torchvision an unknown preset, a bad parameter or weights
    file, an invalid training setting, an unknown device), and a strategy that needs a
    capability the detector lacks.

    Raises:
        ConfigError / CheckpointError: naming the setting.
    """
    from mgral.detectors import detector_class
    from mgral.detectors.base import CAPABILITIES

    spec = config.detector
    kind = detector_class(spec.kind)
    references = (False, True) if config.full_data_reference else (False,)
    kind.check_config(spec, dataset.categories, [train_settings(config, reference=r) for r in references])
    has = kind.capabilities(spec)
    for strategy in strategies:
        missing = sorted(set(strategy.detector_needs) - has)
        if missing:
            needs = "; ".join(f"{m}: {CAPABILITIES[m]}" for m in missing)
            raise ConfigError(
                f"strategy {strategy.name!r} needs what a detector of kind {spec.kind!r} cannot do ({needs}); "
                "choose another strategy, or a detector kind that can (mgral list detectors)"
            )


def seed_oracle(exp: Experiment, seed: int) -> SimulatedOracle:
    """The simulated annotator of ``seed``: its answers depend only on (seed, image id)."""
    o = exp.config.oracle
    return SimulatedOracle(exp.dataset, seed=seed, label_noise=o.label_noise, drop_boxes=o.drop_boxes)


def open_experiment(config: ExperimentConfig, run: RunDir, log=print, progress: bool = True) -> Experiment:
    """Read the dataset and split it into pool and test.

    Raises:
        ConfigError: an empty pool or test split (:func:`prepare_dataset`).
    """
    dataset = prepare_dataset(config, run)
    pool = dataset.image_ids(config.dataset.pool_splits)
    test = dataset.image_ids(config.dataset.test_split)
    # one cycle-0 model per seed, shared by its strategies, where mgral trains it
    share = config.detector.kind == "torchvision"
    return Experiment(config, run, dataset, pool, test, log, progress, share_cycle0=share)


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
    check_detector(config, exp.dataset, strategies.values())
    initials = {seed: initial_ids(config, exp.dataset, exp.pool, seed) for seed in config.seeds}
    exp.tracker = open_tracker(config, run.path)  # a missing MLflow install is refused here, before any write
    resolved = config_to_dict(config)
    with run.lock():
        if resume and run.config_file.exists():
            run.open(resolved, ignore=EXECUTION_KEYS)
        else:
            run.create(resolved)
        remove_stale_temp_files(run.path, recursive=True)  # nothing else writes here while we hold the lock
        references = len(config.reference_seed_list)
        with RunProgress(
            len(config.seeds) * len(strategies) + references,
            config.cycles,
            references=references,
            records=[r for s in run.list_series() for r in read_cycle_records(s.records)],
            workers=1 if config.executor == "inline" else (config.workers or 1),
            enabled=progress,
        ) as exp.display:
            if config.executor != "inline":
                _run_parallel(exp)
                return Path(out)
            with _torch_threads(config.threads):
                for seed in config.seeds:
                    initial = initials[seed]
                    if seed in config.reference_seed_list:  # first: a run stopped part-way still has its ceiling
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
    from mgral.strategies import build_strategy

    config = exp.config
    cost = {spec.label: build_strategy(spec.name, **spec.params).selection_cost for spec in config.strategies}
    order = [
        (-cost[spec.label], s, i, (_SERIES, spec.label, s))
        for s in config.seeds
        for i, spec in enumerate(config.strategies)
    ]
    series = [task for *_, task in sorted(order)]
    series = [t for t in series if not _series_done(exp, t[1], t[2])]
    first = [(_CYCLE0, "", s) for s in sorted({t[2] for t in series})] if exp.share_cycle0 else []
    references = [(_SERIES, REFERENCE_LABEL, s) for s in config.reference_seed_list]
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
    shown = {(s.label, s.seed): len(read_cycle_records(s.records)) for s in exp.run.list_series()}
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
                if kind == _SERIES:
                    _show_series(exp, label, seed, shown)
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


def _show_series(exp: Experiment, label: str, seed: int, shown: dict[tuple[str, int], int]) -> None:
    """Show the cycles a worker finished for series (label, seed) and log them to the tracker
    (the parent learns of them when the series' task ends)."""
    records = read_cycle_records(exp.run.series(label, seed).records)
    exp.series_started(label, seed, 0 if label == REFERENCE_LABEL else exp.config.cycles)
    new = records[shown.get((label, seed), 0) :]
    shown[(label, seed)] = len(records)
    for record in new[:-1]:
        if exp.display is not None:
            exp.display.cycle_done(record)
    if new:
        exp.recorded(new[-1])  # and one tracker sync for them all


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
        cached_predictions(exp, detector, view, wdir.predictions, exp.pool)


def run_series(exp: Experiment, label: str, strategy, seed: int, initial: list[ImageId]) -> None:
    """Run the unfinished cycles of one series (``strategy=None``: one full-data cycle)."""
    oracle = seed_oracle(exp, seed)
    series = Series.open(exp, label, strategy, seed, initial, lambda ids: {i: oracle.labels_for(i) for i in ids})
    last = 0 if strategy is None else exp.config.cycles
    exp.series_started(label, seed, last)
    for cycle in range(series.finished, last + 1):
        record = run_cycle(series, oracle, cycle, cycle == last)
        exp.log(
            f"{label} seed {seed} cycle {cycle}: {record['num_labeled']} images, {record['num_boxes_labeled']} "
            f"boxes, {describe_result(record)} ({sum(record['seconds'].values()):.0f} s)"
        )


def run_cycle(series: Series, oracle: SimulatedOracle, cycle: int, is_last: bool) -> dict[str, Any]:
    """One cycle of a simulated series: train, select, request, collect the oracle's answer, record."""
    seconds: dict[str, float] = {}
    detector, result, view = series.train(cycle, seconds)
    selected: list[ImageId] = []
    scores: list[float] = []
    if not is_last and series.strategy is not None and series.ledger.unlabeled():
        selected, scores = series.select(cycle, detector, view, seconds)
        _, pending = series.request(cycle, selected)  # on disk before the oracle is waited on
        if pending:
            series.exp.phase("label")
            t0 = time.perf_counter()
            oracle.request(pending)
            answer = oracle.collect()
            series.resolve(cycle, list(answer.labels), answer.skipped)
            seconds["label"] = time.perf_counter() - t0
    return series.finish(cycle, result, selected, scores, seconds)
