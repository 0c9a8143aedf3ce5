"""Surrogate fine-tunes: what training on a candidate combination would do to the detector.

One job copies the task detector, fine-tunes it for ``steps`` steps and scores it on the
reward set. Every job of a cycle draws the *same* labeled mini-batches (its own generator,
seeded by the cycle), so two jobs differ only in their extra images: the control job has
none; a semi-supervised job adds a candidate combination **without labels**, with loss

    L = L_sup(labeled batch) + w(step) * (L_pseudo + L_cons)

where ``L_pseudo`` is the detector's own loss on the candidates with the task detector's
detections over a confidence threshold as targets (pseudo-labels), ``L_cons`` the flip
consistency of the dense head outputs (class probabilities and box regression of every
location against its mirror location on the flipped image), and ``w`` a Gaussian ramp
``w_max * exp(-5 (1 - t)^2)`` over the first ``ramp`` fraction of the steps. The research
ablations (labeled simulation, oracle gains) reuse the same job with true targets,
``w = 1`` and no consistency term.

Flip consistency is exact in the anchor grid: a location at column ``j`` (anchor centre
``j * stride``) mirrors to column ``W_l - j`` of the flipped input, so columns ``1..W_l-1``
are compared. One-stage heads (FCOS, RetinaNet) compare classification (and FCOS
centerness) probabilities and regression with left/right swapped (FCOS) or ``dx`` negated
(RetinaNet); two-stage models (Faster R-CNN) compare the RPN's objectness and deltas. SSD
has no consistency term here (pseudo-labels only); the job reports which term it used.

A job reads only what it is given: the visible dataset (boxes on labeled images only) and
the pseudo-labels computed by the parent from the task detector's predictions. Nothing in
it can reach a pool image's true labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mgral.data.records import Dataset, ImageId
from mgral.detectors.training import derive_seed, load_image, make_config, make_optimizer, trainable_boxes


@dataclass(frozen=True)
class SurrogateShared:
    """What every job of a cycle shares (sent once per worker).

    Attributes:
        model: the task detector, ``detector.to_bytes()`` (capability ``clone``).
        kind: its detector kind (``mgral.detectors.KINDS``), which rebuilds it.
        dataset: the visible dataset (labels on labeled images only).
        fit_ids: the labeled images the surrogates train on (``L_fit``).
        eval_ids: the reward set ``E_t`` (never trained on).
        train: optimizer settings (``TrainConfig`` keys: optimizer, lr, weight_decay, ...).
        steps: fine-tuning steps ``K``; batch_size: labeled (and extra) images per step.
        unsup_weight: ``w_max``; ramp: fraction of the steps over which ``w`` ramps up.
        threads: torch threads per job (fixed, so every backend computes the same).
        seed: the cycle's seed (labeled batches, flips).
        device: where the job fine-tunes (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        device_fallback: True: a job whose process sees no GPU runs on the CPU (``device:
            auto``: a Ray task that reserved no GPU, say); False: it fails, saying so.
    """

    model: bytes
    dataset: Dataset
    fit_ids: list[ImageId]
    eval_ids: list[ImageId]
    train: dict[str, Any]
    steps: int
    batch_size: int
    unsup_weight: float = 1.0
    ramp: float = 0.25
    threads: int = 1
    seed: int = 0
    device: str = "cpu"
    device_fallback: bool = True
    kind: str = "torchvision"


@dataclass(frozen=True)
class SurrogateJob:
    """One table row's fine-tune.

    Attributes:
        name: ``"control"`` or ``"m<k>"``.
        extra_ids: the combination's images (empty for the control).
        extra_targets: id -> (boxes ``[N, 4]``, category ids ``[N]``): pseudo-labels, or true
            labels in the research ablations.
        semi: True: ramped weight and flip consistency (label-free); False: weight 1, no
            consistency (the extra images are treated as labeled).
    """

    name: str
    extra_ids: list[ImageId] = field(default_factory=list)
    extra_targets: dict[ImageId, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    semi: bool = True


def ramp_weight(step: int, steps: int, w_max: float, ramp: float) -> float:
    """Gaussian ramp-up: ``w_max * exp(-5 (1 - t)^2)``, ``t = step / (ramp * steps)`` capped at 1."""
    length = max(1.0, ramp * steps)
    t = min(1.0, step / length)
    return float(w_max * math.exp(-5.0 * (1.0 - t) ** 2))


def job_device(shared: SurrogateShared) -> torch.device:
    """The device this job runs on: ``shared.device`` where this process can use it.

    A CUDA index this process cannot see (a Ray task sees only the GPU it reserved, as
    ``cuda:0``) maps to the current GPU. Without any GPU the job falls back to the CPU when
    ``shared.device_fallback`` is set.

    Raises:
        ConfigError: a GPU was asked for explicitly and this process has none.
    """
    from mgral.errors import ConfigError

    dev = torch.device(shared.device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        if shared.device_fallback:
            return torch.device("cpu")
        raise ConfigError(
            f"mgral: surrogate device {shared.device!r} requested but this job's process sees no GPU; with "
            "jobs: {executor: ray} give each job a GPU (jobs.gpus: 1), or set jobs.device: auto (the CPU where no GPU "
            "is visible)"
        )
    index = dev.index if dev.index is not None and dev.index < torch.cuda.device_count() else None
    return torch.device("cuda", index if index is not None else torch.cuda.current_device())


def _batch(dataset: Dataset, ids, targets, class_index, gen: torch.Generator, device: torch.device):
    """Images and torchvision targets (class indices), each flipped with probability 1/2
    (decided on the CPU generator, so every device draws the same flips), on ``device``."""
    images, out = [], []
    for i in ids:
        image = load_image(dataset, i)
        boxes, labels = targets(i)
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        labels = torch.tensor([class_index[int(c)] for c in np.asarray(labels).reshape(-1)], dtype=torch.int64)
        if torch.rand((), generator=gen).item() < 0.5:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        images.append(image.to(device))
        out.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, out


def _cycle_batches(ids: list, batch_size: int, gen: torch.Generator):
    """Endless mini-batches: shuffled passes over ``ids``."""
    while True:
        order = torch.randperm(len(ids), generator=gen).tolist()
        for start in range(0, len(ids), batch_size):
            yield [ids[k] for k in order[start : start + batch_size]]


def run_surrogate(job: SurrogateJob, shared: SurrogateShared) -> dict[str, Any]:
    """Fine-tune a copy of the task detector as ``job`` says and score it on the reward set.

    Returns a JSON-able dict: ``mAP`` (COCO mAP@[.5:.95] on ``eval_ids``; NaN if undefined),
    ``per_class`` (list aligned with the dataset's categories), mean ``loss_sup``,
    ``loss_pseudo``, ``loss_cons``, ``consistency`` (the head it used), ``device`` (where it
    ran), ``seconds``.
    """
    from mgral.detectors import detector_class
    from mgral.evaluation import SubsetEvaluator

    t0 = time.perf_counter()
    device = job_device(shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(shared.threads)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(shared.seed, 3))
            det = detector_class(shared.kind).from_bytes(shared.model, device=str(device))
            model, class_index = det.model, det.class_index
            config = make_config(shared.train)
            optimizer = make_optimizer(model, config)
            labeled_gen = torch.Generator().manual_seed(derive_seed(shared.seed, 1))  # the same in every job
            extra_gen = torch.Generator().manual_seed(derive_seed(shared.seed, 2))
            labeled = _cycle_batches(list(shared.fit_ids), shared.batch_size, labeled_gen)
            extra = _cycle_batches(list(job.extra_ids), shared.batch_size, extra_gen) if job.extra_ids else None
            sums = {"loss_sup": 0.0, "loss_pseudo": 0.0, "loss_cons": 0.0}
            used = "none"
            model.train()
            for step in range(shared.steps):
                images, targets = _batch(
                    shared.dataset,
                    next(labeled),
                    _true_targets(shared.dataset, config.ignored_boxes),
                    class_index,
                    labeled_gen,
                    device,
                )
                loss = sup = sum(model(images, targets).values())
                sums["loss_sup"] += float(sup.detach())
                if extra is not None:
                    ids = next(extra)
                    uimages, utargets = _batch(
                        shared.dataset, ids, lambda i: job.extra_targets[i], class_index, extra_gen, device
                    )
                    pseudo = sum(model(uimages, utargets).values())
                    sums["loss_pseudo"] += float(pseudo.detach())
                    if job.semi:
                        cons, used = det.consistency_loss(uimages)
                        sums["loss_cons"] += float(cons.detach())
                        w = ramp_weight(step, shared.steps, shared.unsup_weight, shared.ramp)
                        loss = loss + w * (pseudo + cons)
                    else:
                        loss = loss + pseudo
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
            preds = det.predict(shared.dataset, shared.eval_ids, embeddings=False)
        ap = SubsetEvaluator(shared.dataset.subset(shared.eval_ids), preds).average_precision()
    finally:
        torch.set_num_threads(threads)
    steps = max(shared.steps, 1)
    return {
        "name": job.name,
        "mAP": float(ap.mAP),
        "per_class": [float(v) for v in ap.per_class],
        **{k: v / steps for k, v in sums.items()},
        "consistency": used,
        "device": str(device),
        "seconds": time.perf_counter() - t0,
    }


def _true_targets(dataset: Dataset, ignored_boxes: str):
    def get(i: ImageId) -> tuple[np.ndarray, np.ndarray]:
        return trainable_boxes(dataset[i].target, ignored_boxes)

    return get
