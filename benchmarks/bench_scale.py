"""Scale benchmark: selection time and peak memory of every strategy on pools of 1k, 10k and
100k images (budget 1% of the pool), from synthetic cached predictions and embeddings.

Workload (seeded, :func:`make_workload`): ``--classes`` (20) categories; images of 640x480;
embeddings of ``--dim`` (384: the ``mobilenet_v2_fpn`` detector's pooled FPN vector; the
``tiny`` one gives 192) drawn around 40 cluster centres, each cluster with its own class
profile and difficulty; per image a few objects (detected with scores that fall as the
image gets harder) plus low-score clutter, ``--boxes`` boxes per image on average (0 to
100, the detectors' ``detections_per_img``), each with a full class distribution
(background first) whose label column is the argmax. A labeled set of 5% of the pool has
ground-truth boxes and embeddings (and predictions, for CDAL). Test-time views (flip,
0.8 rescale, colour) are perturbed copies of an image's detections: boxes jittered,
dropped and added in proportion to the image's difficulty, then mapped into the view's
coordinates, as a detector's pass over the view would give them.

What is timed: one ``strategy.select(context, budget)`` call, the strategy's default
parameters, in a fresh process per (strategy, pool size). Detector passes are not timed
(they are O(N) predict cost, see ``benchmarks/results/detectors.md``): strategies that
call the detector get a :class:`ReplayDetector` that returns the precomputed view outputs.
MGRAL's default (``estimator: auto``, which is ``none``) is timed whole: the prior over the
pool, its candidates' mirrored features, the prior's top batch. For its fine-tune estimator
(the ``mgral[estimator=finetune...]`` variants) the surrogate fine-tunes are replaced by a
given table (:class:`GivenTableMGRAL`: the same ``M`` random combinations of ``B_c``
candidates, with dmAP from a planted linear reward on the compact features plus noise);
everything else in its ``select`` is timed: splits, candidates, features (flip
consistency, PCA, k-means), reward model fit and leave-one-out, agent training, agent
scoring and the final batch.

Peak memory: the peak resident set size during ``select`` above the resident size just
before it (the kernel's high-water mark ``VmHWM`` is reset through
``/proc/self/clear_refs`` once the inputs are built and freed memory returned with
``malloc_trim``).

    .venv/bin/python benchmarks/bench_scale.py [--sizes 1000 10000 100000] [--only cald] [--timeout 600]
        [--threads 1] [--variants] [--out benchmarks/results]
    .venv/bin/python benchmarks/bench_scale.py --render     # rewrite scale.md from scale.json

Writes ``scale.json`` and ``scale.md`` under ``--out`` (rows of other strategies measured with
the same settings are kept, so ``--only`` updates one strategy's rows); ``scale_notes.md`` there,
if present, is appended to ``scale.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

STRATEGIES = ("random", "entropy", "least_confidence", "margin", "core_set", "cald", "ppal", "cdal", "mgral")
BASELINE_TARGET_S = 10.0
MGRAL_TARGET_S = 60.0
WIDTH, HEIGHT = 640, 480
EMBEDDING_CLUSTERS = 40
MAX_BOXES = 100
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "core_set[subset=10000]": ("core_set", {"subset": 10000}),
    "cdal[subset=10000]": ("cdal", {"subset": 10000}),
    "ppal[candidate_ratio=1.5]": ("ppal", {"candidate_ratio": 1.5}),
    "mgral[estimator=finetune]": ("mgral", {"estimator": "finetune"}),
    "mgral[estimator=finetune,candidate_pool=4000]": ("mgral", {"estimator": "finetune", "candidate_pool": 4000}),
    "mgral[estimator=finetune,candidate_pool=4000,updates=150]": (
        "mgral",
        {"estimator": "finetune", "candidate_pool": 4000, "updates": 150},
    ),
}
"""Non-default settings measured with ``--variants`` (at the largest size only): approximate
ways to bound the cost on large pools (a random subset searched, fewer candidates, fewer
agent updates), which select differently from the defaults; and MGRAL's paper-faithful
fine-tune estimator (its agent on a given table), no longer its default."""
FLAG_SLOPE_NB = 1.2
"""Log-log slope of seconds against N x B above which a strategy is flagged as worse than
linear in pool size x budget (1 plus a margin for timing noise)."""

TIMED = {
    "random": "select: one random key per pool image, top B",
    "entropy": "select: box entropies from the cached class distributions, max per image, top B",
    "least_confidence": "select: box 1 - max prob, max per image, top B",
    "margin": "select: box 1 - (p1 - p2), max per image, top B",
    "core_set": "select: k-center greedy on the pool embeddings, centres = the labeled embeddings",
    "cald": "select with the flip / scale / colour passes replayed: box matching + consistency per view, "
    "then the class-diversity order of the 1.2 B candidates",
    "ppal": "select: difficulty-calibrated entropy, then matching distance + k-medoids on the 3 B candidates",
    "cdal": "select with the labeled-set pass replayed: contextual features of pool and labeled, k-center greedy",
    "mgral": "select with the mirrored pass replayed; its default (estimator auto = none): the prior's scores "
    "over the pool, candidates (4 B), their features, top B of the prior; `mgral[estimator=finetune...]`: "
    "the surrogate table given (M = 16 rows): splits, candidates (20 B), features + PCA + k-means, reward fit "
    "+ LOO, agent training (300 updates), agent scores (4 orders), top B",
}


# -- the workload ----------------------------------------------------------------------------


@dataclass
class Workload:
    """One synthetic selection problem: what the loop would hand a strategy, and more.

    Attributes:
        dataset: categories and records (labeled images carry their ground truth).
        pool_ids / labeled_ids: int ids.
        predictions: the cached detections of every pool image.
        embeddings: every pool and labeled image's embedding.
        labeled_predictions: detections of the labeled images (what CDAL asks the detector).
        views: view name -> image id -> the detections of a pass over that view, in the
            view's coordinates (``"flip"``, ``"scale"``, ``"color"``; only those asked for).
        difficulty: float ``[N]`` per pool image, the latent that drives its uncertainty.
    """

    dataset: Any
    pool_ids: list[int]
    labeled_ids: list[int]
    predictions: dict[int, Any]
    embeddings: dict[int, np.ndarray]
    labeled_predictions: dict[int, Any]
    views: dict[str, dict[int, Any]] = field(default_factory=dict)
    difficulty: np.ndarray | None = None


def _split(counts: np.ndarray, *arrays: np.ndarray) -> list[list[np.ndarray]]:
    cuts = np.cumsum(counts)[:-1]
    return [np.split(a, cuts) for a in arrays]


def _valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """Inside the image, at least 1 px wide and high."""
    boxes = np.clip(boxes, 0, [WIDTH - 1, HEIGHT - 1, WIDTH, HEIGHT])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes


def _box_probs(rng: np.random.Generator, cols: np.ndarray, fg: np.ndarray, confusion: np.ndarray, k: int):
    """float32 ``[T, K + 1]`` class distributions: background ``1 - fg``, the box's column a share
    ``1 - confusion / 2`` (>= 1/2) of ``fg``, the rest on two confusable columns; a 1% floor."""
    t = len(cols)
    p = np.zeros((t, k + 1), dtype=np.float64)
    rows = np.arange(t)
    share = 1.0 - 0.5 * confusion
    p[:, 0] = 1.0 - fg
    p[rows, cols] = fg * share
    c2 = (cols - 1 + rng.integers(1, k, size=t)) % k + 1
    c3 = (cols - 1 + rng.integers(1, k, size=t)) % k + 1
    u = rng.random(t)
    np.add.at(p, (rows, c2), fg * (1 - share) * u)
    np.add.at(p, (rows, c3), fg * (1 - share) * (1 - u))
    eps = 0.01
    return ((1 - eps) * p + eps / (k + 1)).astype(np.float32)


def _detections(
    rng: np.random.Generator, profile: np.ndarray, difficulty: np.ndarray, mean_boxes: float, k: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per image counts and the concatenated boxes, scores, labels (columns 1..K), probs and
    per-box difficulty of a detector's kept boxes (sorted by score within an image)."""
    n = len(difficulty)
    objects = np.where(rng.random(n) < 0.02, 0, 1 + rng.poisson(2.5, size=n))
    # negative binomial around mean_boxes: a detector at score >= 0.05 keeps a varied amount of clutter
    total = rng.negative_binomial(3, 3 / (3 + max(mean_boxes, 1e-3)), size=n)
    counts = np.where(objects == 0, 0, np.clip(np.maximum(total, objects), 0, MAX_BOXES))
    objects = np.minimum(objects, counts)
    t = int(counts.sum())
    image = np.repeat(np.arange(n), counts)
    rank = np.arange(t) - np.repeat(np.cumsum(counts) - counts, counts)
    is_obj = rank < np.repeat(objects, counts)
    d = difficulty[image]
    # classes: objects from the image's cluster profile, clutter half from it, half at random
    cum = np.cumsum(profile, axis=1)
    draw = (rng.random(t)[:, None] > cum[image]).sum(axis=1)
    cols = np.where(is_obj | (rng.random(t) < 0.5), draw, rng.integers(0, k, size=t)) + 1
    cols = np.minimum(cols, k)
    obj_s = rng.beta(1 + 8 * (1 - d), 2 + 6 * d)
    clutter_s = 0.05 + 0.95 * rng.beta(1.0, 8.0 + 4 * (1 - d))
    scores = np.clip(np.where(is_obj, obj_s, clutter_s), 0.05, 0.999)
    # boxes: objects anywhere (16-320 px), clutter mostly around an object of the image
    side = np.exp(rng.uniform(np.log(16), np.log(320), size=(t, 2)))
    cx, cy = rng.uniform(0, WIDTH, t), rng.uniform(0, HEIGHT, t)
    anchor = np.repeat(np.cumsum(counts) - counts, counts) + (rank % np.maximum(np.repeat(objects, counts), 1))
    near = ~is_obj & (rng.random(t) < 0.7) & (np.repeat(objects, counts) > 0)
    jitter = rng.normal(scale=0.3, size=(t, 2))
    cx = np.where(near, cx[anchor] + jitter[:, 0] * side[anchor, 0], cx)
    cy = np.where(near, cy[anchor] + jitter[:, 1] * side[anchor, 1], cy)
    side = np.where(near[:, None], side[anchor] * np.exp(rng.normal(scale=0.3, size=(t, 2))), side)
    boxes = np.stack([cx - side[:, 0] / 2, cy - side[:, 1] / 2, cx + side[:, 0] / 2, cy + side[:, 1] / 2], axis=1)
    boxes = _valid_boxes(boxes)
    fg = np.clip(scores * rng.uniform(1.0, 1.4, size=t), 0.05, 0.995)
    confusion = np.clip(rng.beta(1.0, 3.0, size=t) * (0.5 + d), 0.0, 1.0)
    probs = _box_probs(rng, cols, fg, confusion, k)
    # sort boxes by score within each image, as detectors return them
    order = np.lexsort((-scores, image))
    arrays = {"boxes": boxes, "scores": scores, "cols": cols, "probs": probs, "difficulty": d}
    return counts, {name: a[order] for name, a in arrays.items()}


def _view(rng: np.random.Generator, counts: np.ndarray, base: dict[str, np.ndarray], name: str, k: int):
    """A pass over a view of every image: the boxes perturbed, some dropped, some added, then in
    the view's coordinates (mirrored for ``flip``, scaled by 0.8 for ``scale``)."""
    t = len(base["scores"])
    image = np.repeat(np.arange(len(counts)), counts)
    d, s = base["difficulty"], base["scores"]
    keep = rng.random(t) < 0.55 + 0.45 * s * (1 - 0.5 * d)
    extra = rng.random(t) < 0.1 * (0.5 + d)  # a spurious box beside this one
    src = np.concatenate([np.flatnonzero(keep), np.flatnonzero(extra)])
    img = image[src]
    order = np.argsort(img, kind="stable")
    src, img = src[order], img[order]
    m = len(src)
    spurious = order >= int(keep.sum())  # the added boxes
    dd = d[src]
    size = base["boxes"][src, 2:] - base["boxes"][src, :2]
    shift = rng.normal(size=(m, 4)) * (0.02 + 0.15 * dd)[:, None] * np.tile(size, 2)
    shift[spurious] *= 4
    boxes = _valid_boxes(base["boxes"][src] + shift)
    scores = np.clip(s[src] + rng.normal(scale=0.03 + 0.12 * dd), 0.05, 0.999)
    scores[spurious] = 0.05 + 0.95 * rng.beta(1.0, 10.0, size=int(spurious.sum()))
    flip_class = rng.random(m) < 0.1 * dd
    cols = np.where(flip_class, (base["cols"][src] - 1 + rng.integers(1, k, size=m)) % k + 1, base["cols"][src])
    fg = np.clip(scores * rng.uniform(1.0, 1.4, size=m), 0.05, 0.995)
    probs = _box_probs(rng, cols, fg, np.clip(rng.beta(1.0, 3.0, size=m) * (0.5 + dd), 0.0, 1.0), k)
    if name == "flip":
        boxes = np.stack([WIDTH - boxes[:, 2], boxes[:, 1], WIDTH - boxes[:, 0], boxes[:, 3]], axis=1)
    elif name == "scale":
        w, h = max(1, round(WIDTH * 0.8)), max(1, round(HEIGHT * 0.8))
        boxes = boxes * np.array([w / WIDTH, h / HEIGHT, w / WIDTH, h / HEIGHT])
    view_counts = np.bincount(img, minlength=len(counts))
    order = np.lexsort((-scores, img))
    return view_counts, {"boxes": boxes[order], "scores": scores[order], "cols": cols[order], "probs": probs[order]}


def _to_detections(ids: Sequence[int], counts: np.ndarray, arrays: dict[str, np.ndarray], class_ids: np.ndarray):
    from mgral.data.records import Detections

    boxes, scores, labels, probs = _split(
        counts,
        arrays["boxes"].astype(np.float32),
        arrays["scores"].astype(np.float32),
        class_ids[arrays["cols"] - 1],
        arrays["probs"],
    )
    return {
        i: Detections(boxes[k], scores[k], labels[k], probs=probs[k], num_candidates=int(counts[k]))
        for k, i in enumerate(ids)
    }


def make_workload(
    n: int,
    *,
    seed: int = 0,
    classes: int = 20,
    dim: int = 384,
    boxes: float = 30.0,
    labeled_fraction: float = 0.05,
    views: Sequence[str] = (),
    labeled_predictions: bool = False,
) -> Workload:
    """The seeded synthetic pool of ``n`` images and its labeled set (see the module doc)."""
    from mgral.data.records import Category, Dataset, ImageRecord, Target

    rng = np.random.default_rng([seed, n])
    k = classes
    categories = [Category(c + 1, f"class{c + 1}") for c in range(k)]
    class_ids = np.array([c.id for c in categories], dtype=np.int64)
    n_lab = max(2, round(labeled_fraction * n))
    total = n + n_lab
    centres = rng.normal(size=(EMBEDDING_CLUSTERS, dim)) + rng.normal(size=dim)
    cluster = rng.integers(0, EMBEDDING_CLUSTERS, size=total)
    emb = (centres[cluster] + rng.normal(scale=0.8, size=(total, dim))).astype(np.float32)
    profile = rng.dirichlet(np.full(k, 0.3), size=EMBEDDING_CLUSTERS)
    cluster_difficulty = rng.uniform(-0.25, 0.25, size=EMBEDDING_CLUSTERS)
    difficulty = np.clip(rng.beta(2.0, 4.0, size=total) + cluster_difficulty[cluster], 0.0, 1.0)
    pool_ids, labeled_ids = list(range(n)), list(range(n, total))

    counts, dets = _detections(rng, profile[cluster[:n]], difficulty[:n], boxes, k)
    predictions = _to_detections(pool_ids, counts, dets, class_ids)
    view_preds = {}
    for name in views:
        vc, va = _view(np.random.default_rng([seed, n, len(name), ord(name[0])]), counts, dets, name, k)
        view_preds[name] = _to_detections(pool_ids, vc, va, class_ids)
    lab_preds = {}
    if labeled_predictions:
        lc, la = _detections(rng, profile[cluster[n:]], difficulty[n:], boxes, k)
        lab_preds = _to_detections(labeled_ids, lc, la, class_ids)

    records = [ImageRecord(i, f"{i}.jpg", WIDTH, HEIGHT, "train") for i in pool_ids]
    cum = np.cumsum(profile, axis=1)
    for j, i in enumerate(labeled_ids):  # ground truth of the labeled images: 1-6 objects of the cluster's classes
        m = int(rng.integers(1, 7))
        cols = np.minimum((rng.random(m)[:, None] > cum[cluster[n + j]]).sum(axis=1), k - 1)
        xy = rng.uniform(0, [WIDTH - 40, HEIGHT - 40], size=(m, 2))
        gt = np.concatenate([xy, xy + rng.uniform(16, 40, size=(m, 2))], axis=1)
        records.append(ImageRecord(i, f"{i}.jpg", WIDTH, HEIGHT, "train", Target(gt, class_ids[cols])))
    dataset = Dataset("/nonexistent", categories, records)
    embeddings = {i: emb[k] for k, i in enumerate(pool_ids + labeled_ids)}
    return Workload(dataset, pool_ids, labeled_ids, predictions, embeddings, lab_preds, view_preds, difficulty[:n])


# -- stand-ins for the detector passes and the surrogate table ---------------------------------


class ReplayDetector:
    """A detector whose passes return precomputed detections: ``augment`` (CALD's and MGRAL's
    view functions) picks the view; no ``augment`` returns the plain store (pool + labeled).
    Each call is recorded in ``calls`` as ``(view, images)``."""

    def __init__(self, categories, plain: Mapping, views: Mapping[str, Mapping]) -> None:
        from mgral.strategies._detection_math import hflip
        from mgral.strategies.cald import VIEWS

        self.categories = categories
        self.plain = plain
        self.views = views
        self.view_of = {id(v.augment): name for name, v in VIEWS.items()}
        self.view_of[id(hflip)] = "flip"
        self.calls: list[tuple[str, int]] = []

    def predict(self, dataset, image_ids, *, embeddings: bool = True, augment=None, **options) -> dict:
        name = "plain" if augment is None else self.view_of.get(id(augment))
        if name is None or (name != "plain" and name not in self.views):
            raise KeyError(f"no precomputed pass for augment {augment!r}")
        store = self.plain if name == "plain" else self.views[name]
        self.calls.append((name, len(image_ids)))
        return {i: store[i] for i in image_ids if i in store}


def _given_table_class():
    from mgral.strategies.mgral.strategy import MGRAL, table_rows

    class GivenTableMGRAL(MGRAL):
        """MGRAL whose look-up table is given instead of fine-tuned: the same ``M`` random
        combinations of ``B_c`` candidates as the real table draws, each with
        ``dmAP = sum of planted credits w . phi(x) over the combination + noise`` (``w`` a
        seeded random vector over the compact features, the noise a tenth of the rows' spread)."""

        def _table(self, context, budget, split, phi, index, clusters, num_clusters, seed, out):
            cand = split.ids
            rng = np.random.default_rng([seed, 17])
            bc = min(self.table.combination_size or budget, max(1, len(cand) // 2))
            combos = [
                [cand[k] for k in sorted(rng.choice(len(cand), bc, replace=False))]
                for _ in range(self.table.combinations)
            ]
            w = np.random.default_rng(12345).normal(size=phi.shape[1]) * 1e-3 / max(bc, 1) ** 0.5
            clean = np.array([phi[[index[i] for i in c]].sum(axis=0) @ w for c in combos])
            dmap = clean + rng.normal(scale=0.1 * (clean.std() + 1e-12), size=len(clean))
            return [], table_rows(combos, dmap, phi, index, clusters, num_clusters)

    return GivenTableMGRAL


def make_strategy(name: str, params: Mapping[str, Any] | None = None):
    """The registered strategy ``name`` with its defaults (updated by ``params``); MGRAL with
    its table given (:func:`_given_table_class`)."""
    from mgral.strategies import build_strategy

    params = dict(params or {})
    if name == "mgral":
        return _given_table_class()(**params)
    return build_strategy(name, **params)


def make_context(work: Workload, strategy, seed: int):
    """The selection context the loop would build for ``strategy`` (only what it requires),
    with a :class:`ReplayDetector` where it requires the detector."""
    from mgral.strategies import SelectionContext

    req = strategy.requires
    detector = None
    if "detector" in req:
        plain = {**work.predictions, **work.labeled_predictions}
        detector = ReplayDetector(work.dataset.categories, plain, work.views)
    return SelectionContext(
        work.dataset,
        list(work.pool_ids),
        list(work.labeled_ids),
        np.random.default_rng([seed, 1]),
        cycle=1,
        predictions=work.predictions if "predictions" in req else None,
        embeddings=work.embeddings if "embeddings" in req else None,
        detector=detector,
    )


def needs(name: str) -> dict[str, Any]:
    """Which precomputed passes ``name``'s select asks the detector for."""
    return {
        "views": {"cald": ("flip", "scale", "color"), "mgral": ("flip",)}.get(name, ()),
        "labeled_predictions": name == "cdal",
    }


# -- one measurement ---------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Return freed heap to the system and reset the kernel's peak-RSS mark; False if impossible."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def run_one(
    name: str,
    n: int,
    *,
    seed: int = 0,
    boxes: float = 30.0,
    dim: int = 384,
    classes: int = 20,
    params: Mapping[str, Any] | None = None,
    label: str | None = None,
    repeat_below_s: float = 5.0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Build the workload, then time ``select`` (the fastest of ``repeats`` runs when one takes
    less than ``repeat_below_s``; peak memory from the first). Checks the answer: exactly the
    budget of distinct pool ids, the same every run."""
    import torch
    from scipy.spatial.distance import pdist  # noqa: F401  (imported before timing, as a running loop has it)
    from sklearn.cluster import KMeans  # noqa: F401
    from sklearn.decomposition import PCA  # noqa: F401
    from sklearn.linear_model import Ridge  # noqa: F401

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    budget = max(1, round(0.01 * n))
    t0 = time.perf_counter()
    work = make_workload(n, seed=seed, boxes=boxes, dim=dim, classes=classes, **needs(name))
    build_s = time.perf_counter() - t0
    strategy = make_strategy(name, params)
    times, selections, peak_mib, info, calls, method = [], [], None, {}, [], ""
    for turn in range(repeats):
        context = make_context(work, strategy, seed)
        exact = _reset_peak() if turn == 0 else False
        rss0 = _status_kib("VmRSS") if exact else None
        ru0 = _maxrss_kib()
        t0 = time.perf_counter()
        sel = strategy.select(context, budget)
        times.append(time.perf_counter() - t0)
        if turn == 0:
            if exact and rss0 is not None:
                peak_mib, method = max(0, (_status_kib("VmHWM") or 0) - rss0) / 1024, "VmHWM - VmRSS"
            else:  # fallback: growth of the process's lifetime peak (a lower bound)
                peak_mib, method = max(0, _maxrss_kib() - ru0) / 1024, "ru_maxrss growth (lower bound)"
            info = dict(sel.info)
            calls = list(context.detector.calls) if context.detector is not None else []
        selections.append(list(sel.image_ids))
        del context
        if times[-1] >= repeat_below_s:
            break
    ids = selections[0]
    pool = set(work.pool_ids)
    ok = len(ids) == budget and len(set(ids)) == budget and all(i in pool for i in ids)
    return {
        "strategy": name,
        "label": label or name,
        "params": dict(params or {}),
        "n": n,
        "budget": budget,
        "seconds": min(times),
        "seconds_runs": [round(t, 4) for t in times],
        "peak_mib": None if peak_mib is None else round(peak_mib, 1),
        "peak_method": method,
        "build_s": round(build_s, 2),
        "pool_boxes": int(sum(len(d) for d in work.predictions.values())),
        "selected": len(ids),
        "distinct": len(set(ids)),
        "valid": bool(ok),
        "deterministic": all(s == ids for s in selections),
        "detector_calls": calls,
        "stage_seconds": info.get("seconds", {}),
        "loo_spearman": info.get("loo_spearman"),
        "candidates": info.get("candidates"),
        "threads": torch.get_num_threads(),
    }


def _maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_subprocess(spec: dict[str, Any], timeout: float, threads: int | None = None) -> dict[str, Any]:
    """:func:`run_one` in a fresh process, killed (with its children) after ``timeout`` s;
    ``threads`` caps the BLAS / OpenMP / torch threads (None: the libraries' defaults)."""
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**_identity(spec), "timeout": timeout, "seconds": None}
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {**_identity(spec), "error": err[-2000:], "seconds": None}
    return json.loads(line[len("RESULT ") :])


def _identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    n = spec["n"]
    label = spec.get("label") or spec["strategy"]
    return {
        "strategy": spec["strategy"],
        "label": label,
        "params": spec.get("params") or {},
        "n": n,
        "budget": max(1, round(0.01 * n)),
    }


# -- growth, flags, report ---------------------------------------------------------------------


def _label(row: Mapping[str, Any]) -> str:
    return row.get("label") or row["strategy"]


def slope(x0: float, y0: float | None, x1: float, y1: float | None) -> float | None:
    if not y0 or not y1 or y0 <= 0 or y1 <= 0:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def growth(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per strategy: log-log slopes of seconds vs N and vs N x B between consecutive sizes
    (the last pair is the headline), the target check at the largest size and the flags."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(_label(r) for r in rows):
        mine = sorted((r for r in rows if _label(r) == name), key=lambda r: r["n"])
        pairs = []
        for a, b in zip(mine, mine[1:], strict=False):
            nb_a, nb_b = (
                a["n"] * a.get("budget", max(1, round(0.01 * a["n"]))),
                b["n"] * b.get("budget", max(1, round(0.01 * b["n"]))),
            )
            pairs.append(
                {
                    "from": a["n"],
                    "to": b["n"],
                    "slope_n": slope(a["n"], a.get("seconds"), b["n"], b.get("seconds")),
                    "slope_nb": slope(nb_a, a.get("seconds"), nb_b, b.get("seconds")),
                }
            )
        target = MGRAL_TARGET_S if mine[0]["strategy"] == "mgral" else BASELINE_TARGET_S
        flags = []
        last = pairs[-1] if pairs else None
        if last and last["slope_nb"] is not None and last["slope_nb"] > FLAG_SLOPE_NB:
            flags.append(f"super-linear in N x B (slope {last['slope_nb']:.2f})")
        big = mine[-1] if mine else None
        if big is not None and big["n"] >= 100_000:
            if big.get("seconds") is None:
                flags.append(f"misses target (> {big.get('timeout', '?')} s timeout)" if "timeout" in big else "error")
            elif big["seconds"] > target:
                flags.append(f"misses target ({big['seconds']:.1f} s > {target:.0f} s at {big['n']})")
        out[name] = {"pairs": pairs, "target_s": target, "flags": flags}
    return out


def _fmt_s(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r.get("seconds") is None:
        return f"> {r['timeout']:.0f} (timeout)" if "timeout" in r else "error"
    s = r["seconds"]
    return f"{s:.3f}" if s < 1 else f"{s:.2f}" if s < 100 else f"{s:.0f}"


def _fmt_slope(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def machine() -> list[str]:
    import torch

    from mgral._machine import cores, cpu_model, ram_gib

    ram = ram_gib()
    return [
        f"- CPU: {cpu_model()}, {cores()} cores; RAM {'?' if ram is None else f'{ram:.1f} GiB'}",
        f"- Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
    ]


def detector_context(n: int) -> list[str]:
    """What the excluded detector passes cost, from ``detectors.json`` (the detector benchmark)."""
    path = RESULTS / "detectors.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    lines = [
        f"Not timed: the detector passes. From `benchmarks/results/detectors.md` (same machine), one pass over "
        f"{n:,} images takes:",
        "",
    ]
    for r in rows:
        rate = r.get("predict_img_per_s")
        if rate:
            lines.append(f"- {r['name']}: {rate} img/s, so {n / rate / 60:.0f} min per pass")
    lines += [
        "",
        "Every strategy needs the cached pool predictions (one pass, shared by all); CALD adds 3 passes over the "
        "pool (flip, scale, colour), CDAL one over the labeled set, MGRAL one mirrored pass over its candidates "
        "(20 B by default) plus M + 1 surrogate fine-tunes for its table.",
    ]
    return lines


def write_results(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """``scale.json`` (rows, growth, settings) and ``scale.md`` (the table) under ``out_dir``."""
    from mgral._io import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    grow = growth(rows)
    sizes = sorted({r["n"] for r in rows})
    by = {(_label(r), r["n"]): r for r in rows}
    names = list(grow)  # rows come sorted: strategies in registry order, each followed by its variants
    atomic_write_json(out_dir / "scale.json", {**meta, "rows": rows, "growth": grow}, indent=1)

    head = ["strategy", *(f"s @ {n:,}" for n in sizes), *(f"peak MiB @ {n:,}" for n in sizes)]
    head += ["slope N (last)", "slope N x B (last)", "us / image (largest)", "flags"]
    lines = [
        "# Scale benchmark: selection time and memory vs pool size",
        "",
        (
            f"Synthetic cached predictions and embeddings (seed {meta['seed']}): {meta['classes']} classes, "
            f"embedding dim {meta['dim']}, {meta['boxes']} boxes per image on average (0-{MAX_BOXES}), "
            "labeled set 5% of the pool, budget B = 1% of the pool N. Each cell is one "
            "`strategy.select` in a fresh process (default parameters); seconds are wall clock "
            "(the fastest of up to 3 runs when a run takes under 5 s); peak MiB is the resident-set "
            "peak during `select` above the resident size just before it (VmHWM reset via "
            "/proc/self/clear_refs). Detector passes are excluded (replayed); MGRAL's surrogate "
            "table is given (see below)."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for name in names:
        g = grow[name]
        last = g["pairs"][-1] if g["pairs"] else {}
        big = by.get((name, sizes[-1])) if sizes else None
        per_image = (
            f"{1e6 * big['seconds'] / big['n']:.0f}" if big is not None and big.get("seconds") is not None else "-"
        )
        cells = [name]
        cells += [_fmt_s(by.get((name, n))) for n in sizes]
        cells += [
            "-" if by.get((name, n), {}).get("peak_mib") is None else f"{by[(name, n)]['peak_mib']:.0f}" for n in sizes
        ]
        cells += [_fmt_slope(last.get("slope_n")), _fmt_slope(last.get("slope_nb")), per_image]
        cells.append("; ".join(g["flags"]) or "ok")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            f"Slopes are log-log between the two largest sizes; B = N / 100, so N x B grows as N^2 and a "
            f"strategy linear in N x B has slope 2 vs N. Flagged: slope vs N x B above {FLAG_SLOPE_NB} "
            f"(worse than about linear in N x B), and a miss of the targets at 100k "
            f"(baselines < {BASELINE_TARGET_S:.0f} s, MGRAL agent + selection < {MGRAL_TARGET_S:.0f} s)."
        ),
        "",
    ]
    mgral_rows = [r for r in rows if r["strategy"] == "mgral" and r.get("stage_seconds")]
    if mgral_rows:
        stages = list(dict.fromkeys(k for r in mgral_rows for k in r["stage_seconds"]))
        lines += [
            "MGRAL by stage (seconds; `table` is the given table's rows, no fine-tune):",
            "",
            "| setting | N | candidates | " + " | ".join(stages) + " | LOO Spearman |",
            "|---|---|---|" + "|".join("---" for _ in stages) + "|---|",
        ]
        for r in mgral_rows:
            rho = "-" if r.get("loo_spearman") is None else f"{r['loo_spearman']:.2f}"
            st = " | ".join(f"{r['stage_seconds'].get(k, 0):.2f}" for k in stages)
            lines.append(f"| {_label(r)} | {r['n']:,} | {r.get('candidates')} | {st} | {rho} |")
        lines.append("")
    lines += [*detector_context(sizes[-1] if sizes else 100_000), ""]
    lines += ["What is timed, per strategy:", ""]
    lines += [f"- `{name}`: {TIMED.get(name, 'select')}" for name in names if name in TIMED]
    variants = [r for r in rows if _label(r) != r["strategy"]]
    if variants:
        lines += ["", "Variants (non-default parameters, approximate: they select differently from the default):", ""]
        lines += [
            f"- `{label}`: `{r['strategy']}` with {json.dumps(r.get('params') or {})}"
            for label, r in {_label(r): r for r in variants}.items()
        ]
    lines += [
        "",
        "Machine:",
        "",
        *meta.get("machine", []),
        f"- date: {meta.get('date')}",
        f"- threads per run (BLAS, OpenMP, torch): {meta.get('threads') or 'the libraries defaults'}",
        *(f"- command: `{c}`" for c in meta.get("commands", [])),
    ]
    if meta.get("note"):
        lines += [f"- {meta['note']}"]
    notes = out_dir / "scale_notes.md"
    if notes.exists():  # hand-written findings kept beside the generated tables
        lines += ["", notes.read_text().rstrip()]
    atomic_write_text(out_dir / "scale.md", "\n".join(lines) + "\n")
    return out_dir / "scale.md", out_dir / "scale.json"


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--only", action="append", choices=STRATEGIES, help="run only this strategy (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per (strategy, size) process")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boxes", type=float, default=30.0, help="mean detections per image")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--threads", type=int, help="BLAS / OpenMP / torch threads per run (default: the libraries')")
    p.add_argument("--note", default="", help="a line added under Machine (e.g. what else ran on the machine)")
    p.add_argument("--variants", action="store_true", help="also run the VARIANTS at the largest size")
    p.add_argument("--variants-only", action="store_true", help="run only the VARIANTS (with --only: theirs)")
    p.add_argument("--list-variants", action="store_true", help="print the VARIANTS and exit")
    p.add_argument("--render", action="store_true", help="rewrite scale.md from the existing scale.json and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one (strategy, size) as JSON; prints RESULT json
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(spec.pop("strategy"), spec.pop("n"), **spec)), flush=True)
        return 0
    if args.render:
        data = json.loads((args.out / "scale.json").read_text())
        rows = data.pop("rows")
        data.pop("growth", None)
        md, _ = write_results(rows, args.out, data)
        print(md.read_text())
        return 0
    if args.list_variants:
        for label, (name, params) in VARIANTS.items():
            print(f"{label}: {name} {json.dumps(params)}")
        return 0

    names = [] if args.variants_only else (args.only or list(STRATEGIES))
    settings = {"seed": args.seed, "boxes": args.boxes, "dim": args.dim, "classes": args.classes}
    threads = {"threads": args.threads}
    jobs = [(name, name, {}, n) for name in names for n in sorted(args.sizes)]
    if args.variants or args.variants_only:
        for label, (name, params) in VARIANTS.items():
            if not args.only or name in args.only:
                jobs.append((label, name, params, max(args.sizes)))
    rows: list[dict[str, Any]] = []
    for label, name, params, n in jobs:
        t0 = time.perf_counter()
        spec = {"strategy": name, "label": label, "params": params, "n": n, **settings}
        r = run_subprocess(spec, args.timeout, args.threads)
        rows.append(r)
        extra = f"peak {r.get('peak_mib')} MiB" if r.get("seconds") is not None else r.get("error", "timeout")
        print(f"{label:>40} N={n:>7}: {_fmt_s(r)} s, {extra} ({time.perf_counter() - t0:.0f} s wall)", flush=True)

    command = shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])
    commands = [command]
    previous = args.out / "scale.json"
    if previous.exists():  # keep rows of other (strategy, size) pairs measured with the same settings
        with contextlib.suppress(ValueError, KeyError):
            old = json.loads(previous.read_text())
            if all(old.get(k) == v for k, v in {**settings, **threads}.items()):
                done = {(_label(r), r["n"]) for r in rows}
                kept = [r for r in old["rows"] if (_label(r), r["n"]) not in done]
                rows = kept + rows
                if kept:
                    before = old.get("commands") or ([old["command"]] if old.get("command") else [])
                    commands = [c for c in before if c != command] + [command]
    order = {s: k for k, s in enumerate(STRATEGIES)}
    variant_order = {v: k for k, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (order.get(r["strategy"], 99), variant_order.get(_label(r), -1), r["n"]))
    meta = {
        **settings,
        **threads,
        "machine": machine(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commands": commands,
        "note": args.note,
    }
    md, js = write_results(rows, args.out, meta)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
