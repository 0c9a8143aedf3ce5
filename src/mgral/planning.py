"""Paper-scale runs before they start: what a run costs, and a dry run that checks a config.

:func:`estimate_workload` counts what a whole run pushes through the detector, in images:
training images (one forward and backward pass each) and inferred images (evaluation, pool
predictions, the strategies' extra passes). It follows the loop (:mod:`mgral.loop`): per
seed, one shared cycle-0 model; per (strategy, seed) series, cycles ``1..cycles`` each train a
model on the images labeled so far (``epochs`` x labeled images, or ``iterations`` x
``batch_size``); every model is evaluated on the test split; a strategy that needs
predictions or embeddings gets the unlabeled pool predicted each cycle (the cycle-0 pool once
per seed). What a strategy adds (CALD's extra views of the pool, CDAL's pass over the
labeled images, MGRAL's surrogate fine-tunes) is its own :meth:`~mgral.strategies.Strategy.workload`.
Selection arithmetic (k-center, k-medoids, the agent) and data loading are not counted.

:meth:`Workload.hours` turns the counts into hours at given throughputs (images per second);
it is an estimate, only as good as those throughputs and the counting above.

:func:`dry_run` is ``mgral run CONFIG --dry-run``: it reads the config's dataset in full (so
a bad layout fails now, not after hours), runs one micro cycle of every strategy on a few of
its images with a few training iterations on the configured device (so a missing weights
file, a device problem or a strategy that breaks on this detector fails now), measures the
device's throughput with the configured detector, and estimates the full run's hours.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mgral.config import ExperimentConfig, config_from_dict, config_to_dict
from mgral.data.records import Dataset, ImageId
from mgral.errors import ConfigError

if TYPE_CHECKING:
    from mgral.detectors.training import TrainConfig

# -- the cost of a run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What a run pushes through the detector, counted in images (see the module docstring).

    ``parts`` maps a part (``"cycle 0 (shared)"``, a strategy label, ``"reference"``) to its
    (training images, inferred images), summed over seeds."""

    series: int
    trainings: int
    train_images: float
    infer_images: float
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)

    def hours(self, train_rate: float, infer_rate: float) -> float:
        """Hours at ``train_rate`` training and ``infer_rate`` inferred images per second."""
        if train_rate <= 0 or infer_rate <= 0:
            raise ValueError(f"throughputs must be positive, got {train_rate} and {infer_rate} images/s")
        return (self.train_images / train_rate + self.infer_images / infer_rate) / 3600


def _train_length(config: ExperimentConfig, extra: dict[str, Any] | None = None) -> TrainConfig:
    """The settings of one training, as the detector will read them."""
    from mgral.detectors.models import PRESETS
    from mgral.detectors.training import make_config

    return make_config(PRESETS.get(config.detector.preset).train_defaults, config.detector.train, extra or {})


def _trained(train: TrainConfig, labeled: int) -> float:
    """Images seen by one training on ``labeled`` images: ``epochs`` passes over them, or
    ``iterations`` full batches, and at least ``min_iterations`` full batches."""
    seen = train.iterations * train.batch_size if train.iterations is not None else train.epochs * labeled
    return float(max(seen, train.min_iterations * train.batch_size))


def _selection(strategy: Any, labeled: int, unlabeled: int, budget: int, cycle: int) -> tuple[float, float]:
    """(training, inferred) images of one selection by the built ``strategy``, beyond the
    pool predictions the loop makes for it (in cycle 0 those cover the labeled images too)."""
    train, infer = strategy.workload(labeled=labeled, unlabeled=unlabeled, budget=budget)
    if "embeddings" in strategy.requires and cycle > 0:
        infer += labeled  # the labeled images' embeddings, beside the pool's
    return train, infer


def estimate_workload(config: ExperimentConfig, pool_size: int, test_size: int) -> Workload:
    """Count the images a run of ``config`` trains on and infers (see the module docstring).

    Raises:
        ConfigError: an unknown preset or strategy, or invalid training settings.
    """
    from mgral.strategies import build_strategy

    length = _train_length(config)
    seeds = len(config.seeds)
    if config.initial.size is not None:
        initial = config.initial.size
    elif config.initial.fraction is not None:
        initial = max(1, round(config.initial.fraction * pool_size))  # as the loop draws it
    else:
        raise ConfigError("the workload of a run needs initial.size or initial.fraction (an ids file's is unknown)")
    initial = min(initial, pool_size)
    labeled = [min(pool_size, initial + c * config.budget) for c in range(config.cycles + 1)]
    strategies = {s.label: build_strategy(s.name, **s.params) for s in config.strategies}
    needs_pool = any(s.requires & {"predictions", "embeddings"} for s in strategies.values()) and config.cycles > 0
    parts: dict[str, tuple[float, float]] = {
        "cycle 0 (shared)": (
            seeds * _trained(length, labeled[0]),
            seeds * (test_size + (pool_size if needs_pool else 0)),
        )
    }
    trainings = seeds
    for label, strategy in strategies.items():
        train = infer = 0.0
        for c, n in enumerate(labeled):
            if c > 0:
                train += _trained(length, n)
                infer += test_size
            if c < config.cycles:
                unlabeled = pool_size - n
                if c > 0 and strategy.requires & {"predictions", "embeddings"}:
                    infer += unlabeled
                extra = _selection(strategy, n, unlabeled, config.budget, c)
                train, infer = train + extra[0], infer + extra[1]
        parts[label] = (seeds * train, seeds * infer)
        trainings += seeds * config.cycles
    references = len(config.reference_seed_list)
    if references:
        parts["reference"] = (
            references * _trained(_train_length(config, config.reference_train), pool_size),
            references * test_size,
        )
        trainings += references
    return Workload(
        series=seeds * len(config.strategies) + references,
        trainings=trainings,
        train_images=sum(t for t, _ in parts.values()),
        infer_images=sum(i for _, i in parts.values()),
        parts=parts,
    )


# -- the dry run ----------------------------------------------------------------------------


@dataclass
class DryRun:
    """What :func:`dry_run` found: the split sizes of the real data, the micro run's records,
    the measured throughputs, and the full run's workload."""

    config: ExperimentConfig
    device: str
    split_sizes: dict[str, int]
    pool_size: int
    test_size: int
    run_dir: Path
    records: dict[str, list[dict[str, Any]]]
    train_rate: float
    infer_rate: float
    measured: str
    workload: Workload

    @property
    def hours(self) -> float:
        return self.workload.hours(self.train_rate, self.infer_rate)

    def summary(self) -> str:
        c, w = self.config, self.workload
        splits = ", ".join(f"{name} {n}" for name, n in self.split_sizes.items())
        lines = [
            f"data: {splits}; pool {self.pool_size} images ({', '.join(c.dataset.pool_splits)}), test "
            f"{self.test_size} ({', '.join(c.dataset.test_splits)})",
            f"micro cycle (in {self.run_dir}): "
            + "; ".join(
                f"{label}: {' -> '.join(str(r['num_labeled']) for r in recs)} images, {c.evaluation.style} mAP "
                + " -> ".join("-" if r["mAP"] is None else f"{r['mAP']:.4f}" for r in recs)
                for label, recs in self.records.items()
            ),
            f"throughput on {self.device} ({self.measured}): {self.train_rate:.2f} training and "
            f"{self.infer_rate:.2f} inferred images per second",
            f"the full run: {w.series} series, {w.trainings} trainings, {w.train_images / 1e6:.2f} M training and "
            f"{w.infer_images / 1e6:.2f} M inferred images: about {self.hours:.1f} hours on this device, one run at a "
            "time (an estimate from the throughput above, not a measurement; divide by the GPUs working in parallel)",
        ]
        lines += [
            f"  {part}: {t / 1e6:.3f} M training, {i / 1e6:.3f} M inferred images, "
            f"{(t / self.train_rate + i / self.infer_rate) / 3600:.1f} h"
            for part, (t, i) in w.parts.items()
        ]
        return "\n".join(lines)


def _micro_config(
    config: ExperimentConfig, data_file: Path, image_root: Path, pool: int, iterations: int
) -> ExperimentConfig:
    data = config_to_dict(config)
    data["name"] = f"{config.name}-dry-run"
    data["dataset"] = {
        "path": str(data_file),
        "format": "coco",
        "image_root": str(image_root),
        "pool_splits": ["train"],
        "test_split": "test",
        "clip_boxes": config.dataset.clip_boxes,
    }
    initial, budget = max(2, pool // 2), max(1, pool // 4)
    batch = _train_length(config).batch_size
    train = {k: v for k, v in config.detector.train.items() if k not in ("epochs", "iterations", "min_iterations")}
    data["detector"]["train"] = {
        **train,
        "iterations": iterations,
        "batch_size": min(batch, initial),
        "progress": False,
    }
    from mgral.strategies import STRATEGIES

    for spec in data["strategies"]:
        spec["params"] = {**spec["params"], **STRATEGIES.get(spec["name"]).micro_params}
    data.update(initial={"size": initial}, budget=budget, budget_boxes=None, cycles=1, seeds=config.seeds[:1])
    data.update(executor="inline", ray_address=None, workers=None, full_data_reference=False)
    data["jobs"] = {**data.get("jobs", {}), "executor": "inline", "workers": None, "ray_address": None, "gpus": 0}
    data.pop("reference_train", None)
    data.pop("reference_seeds", None)
    data.pop("tracking", None)  # a dry run logs nothing
    return config_from_dict(data, source=f"{config.name} (dry run)")


def _probe(
    config: ExperimentConfig, dataset: Dataset, train_ids: list[ImageId], test_ids: list[ImageId], steps: int
) -> tuple[float, float, str]:
    """Training and inference images per second of the configured detector on this device."""
    from mgral.detectors import detector_class

    det = config.detector
    detector = detector_class(det.kind).from_config(det, dataset.categories, seed=0, train=det.train)
    batch = config.detector.train["batch_size"]
    times = []
    for iterations in (1, 1 + steps):  # the difference is `steps` iterations without the set-up
        t0 = time.perf_counter()
        detector.fit(dataset, train_ids, iterations=iterations, batch_size=batch, progress=False)
        times.append(time.perf_counter() - t0)
    detector.predict(dataset, test_ids[:1], embeddings=False)  # warm-up
    t0 = time.perf_counter()
    detector.predict(dataset, test_ids, embeddings=False)
    infer_rate = len(test_ids) / max(time.perf_counter() - t0, 1e-9)
    spent = times[1] - times[0]
    if spent <= 0:  # timing noise: count the longer run whole
        return (1 + steps) * batch / times[1], infer_rate, f"{1 + steps} training iterations of {batch} images"
    return steps * batch / spent, infer_rate, f"{steps} training iterations of {batch} images after a warm-up"


def _record_rates(config: ExperimentConfig, records: dict[str, list[dict]], test: int) -> tuple[float, float, str]:
    """Throughputs from the micro run's timings (they include building and saving each model)."""
    iterations, batch = config.detector.train["iterations"], config.detector.train["batch_size"]
    train = [r["seconds"]["train"] for recs in records.values() for r in recs if r["seconds"].get("train")]
    evaluate = [r["seconds"]["evaluate"] for recs in records.values() for r in recs if r["seconds"].get("evaluate")]
    train_rate = iterations * batch / float(np.median(train)) if train else math.nan
    infer_rate = test / float(np.median(evaluate)) if evaluate else math.nan
    return train_rate, infer_rate, "the micro cycle's timings, model construction included: an upper bound on hours"


def dry_run(
    config: ExperimentConfig,
    out: str | Path,
    *,
    pool_images: int = 16,
    test_images: int = 8,
    iterations: int = 2,
    probe_steps: int = 3,
    log: Callable[[str], None] = print,
) -> DryRun:
    """Check ``config`` on its real data with one micro cycle into ``out`` and estimate the full run.

    Reads the whole dataset (every annotation and image file is checked), draws
    ``pool_images`` pool and ``test_images`` test images (seeded by the first seed), writes
    them as a small COCO file beside ``out/run`` (images stay where they are) and runs every
    strategy for one cycle on them: ``pool_images // 2`` initial images, a budget of
    ``pool_images // 4``, ``iterations`` training iterations per model, MGRAL with
    each strategy's ``micro_params``; same detector, weights, device and evaluation as ``config``. Then,
    unless ``probe_steps`` is 0, times ``probe_steps`` training iterations and a prediction
    pass of the configured detector; with 0, the throughputs come from the micro cycle's
    timings (which include building each model: hours are then over-estimated).

    Raises:
        ConfigError / DatasetError: anything the real run would refuse at its start (bad
            data, missing weights, unavailable device, unknown strategy), and a pool or test
            split smaller than the dry run needs.
        RunError: ``out/run`` already holds a run.
    """
    from mgral.data import coco
    from mgral.loop import prepare_dataset, run_experiment
    from mgral.runs import RunDir, read_cycle_records

    if config.detector.kind != "torchvision":
        raise ConfigError(
            f"a dry run times mgral's own training; detector kind {config.detector.kind!r} trains elsewhere, so "
            "there is nothing to estimate: run the config itself"
        )
    if pool_images < 4 or test_images < 1:
        raise ConfigError(f"a dry run needs at least 4 pool and 1 test images, got {pool_images} and {test_images}")
    out = Path(out)
    log(f"reading {config.dataset.path} ({config.dataset.format or 'format detected'}) ...")
    dataset = prepare_dataset(config)
    pool = dataset.image_ids(config.dataset.pool_splits)
    test = dataset.image_ids(config.dataset.test_split)
    split_sizes: dict[str, int] = {}
    for rec in dataset:
        split_sizes[str(rec.split)] = split_sizes.get(str(rec.split), 0) + 1
    if len(pool) < pool_images or len(test) < test_images:
        raise ConfigError(
            f"the pool splits {config.dataset.pool_splits} hold {len(pool)} images and the test split "
            f"{config.dataset.test_split!r} {len(test)} (the dataset's splits: {split_sizes}); a dry run needs "
            f"{pool_images} and {test_images}"
        )
    rng = np.random.default_rng([config.seeds[0], 7])
    pick_pool = [pool[k] for k in sorted(rng.choice(len(pool), pool_images, replace=False))]
    pick_test = [test[k] for k in sorted(rng.choice(len(test), test_images, replace=False))]
    micro_data = Dataset(
        dataset.root,
        dataset.categories,
        [replace(dataset[i], split="train") for i in pick_pool]
        + [replace(dataset[i], split="test") for i in pick_test],
    )
    data_file = out / "data" / coco.ANNOTATIONS_FILE
    data_file.parent.mkdir(parents=True, exist_ok=True)
    coco.write_json(micro_data, data_file)
    micro = _micro_config(config, data_file, dataset.root, pool_images, iterations)
    log(f"one micro cycle: {pool_images} pool and {test_images} test images, {iterations} training iterations a model")
    run_dir = run_experiment(micro, out / "run", log=log, progress=False)
    records = {
        s.label: read_cycle_records(RunDir(run_dir).series(s.label, micro.seeds[0]).records) for s in micro.strategies
    }
    from mgral.detectors.torchvision_detector import resolve_device

    device = str(resolve_device(config.detector.device))
    if probe_steps > 0:
        log(f"timing {probe_steps} training iterations and a prediction pass on {device} ...")
        train_rate, infer_rate, measured = _probe(micro, micro_data, pick_pool, pick_test, probe_steps)
    else:
        train_rate, infer_rate, measured = _record_rates(micro, records, test_images)
    workload = estimate_workload(config, len(pool), len(test))
    result = DryRun(
        config, device, split_sizes, len(pool), len(test), run_dir, records, train_rate, infer_rate, measured, workload
    )
    (out / "dry_run.json").write_text(
        json.dumps(
            {
                "split_sizes": split_sizes,
                "pool": len(pool),
                "test": len(test),
                "device": device,
                "train_images_per_s": train_rate,
                "infer_images_per_s": infer_rate,
                "measured": measured,
                "train_images": workload.train_images,
                "infer_images": workload.infer_images,
                "hours": result.hours,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    return result
