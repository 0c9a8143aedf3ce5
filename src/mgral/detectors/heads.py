"""Head-only fine-tuning on cached head inputs (Faster R-CNN and FCOS presets).

A full fine-tune of a detector costs minutes and is seed-noisy; MGRAL's surrogates need
hundreds of "what would training on these images do" answers per cycle. Here the detector
runs once per image (:func:`cache_head_inputs`) and keeps what its last layer sees: the RPN
proposals it makes in eval mode and the box-head features of those proposals (the input of
``roi_heads.box_predictor``), plus what post-processing needs (the model-input size and the
original size). Labeled images also keep their ground-truth boxes and those boxes' features,
since torchvision's RoIHeads trains on the proposals *plus* the ground-truth boxes
(``add_gt_proposals``). Features are computed in eval mode; this is what training would see
for the same boxes (the box head has no dropout or batch statistics, the trunk's BatchNorm is
frozen), except that training draws 300 proposals from the RPN in train mode where eval keeps
150.

:func:`finetune_head` then trains a copy of the box predictor alone on the cached features of
labeled images, with targets built as RoIHeads builds them (proposals matched to ground truth
at the model's IoU thresholds, a balanced positive/negative sample of
``box_batch_size_per_image``, box deltas encoded by its box coder, ``fastrcnn_loss``). It is
deterministic: the sample of each image is fixed by ``(seed, image id)``, every step is one
full batch in a fixed order, and nothing draws from the global torch generator.
:func:`predict_from_cache` turns cached features of any images into ``Detections`` through the
model's own ``postprocess_detections`` and transform. With zero steps they are the detector's
own predictions (bit for bit with ``dtype=torch.float32``). :func:`head_detections` gives the
same boxes in the cache's coordinates with the proposal each came from, so that sampled
detections can serve as labels (their features are their proposals' cached features).

**FCOS** (one-stage, dense): the cache keeps, per image, the outputs of the classification
and regression towers on every pyramid level (the inputs of the final ``cls_logits``,
``bbox_reg`` and ``bbox_ctrness`` convolutions, :class:`DenseHeadInputs`) and the anchor
points. A head fine-tune trains a copy of those three final convolutions on FCOS's own loss
(torchvision's matching with centre sampling, focal loss, GIoU, centerness), every location
of every image in each full-batch step: no sampling, so no seed enters. Images are cached in
the batches ``detector.predict`` makes, so their padded sizes, and with them the maps, are
the ones its predictions came from; images of one padded size train as one batch and the
loss is normalised over all foreground locations, as one batch of all of them would be.
Labels of a dense head need no features of their own (FCOS assigns locations to boxes), so a
sampled detection becomes a label by its box and class alone (:func:`with_labels`). A dense
cache is large: 2 towers x channels x locations per image in fp16, about 90 KiB for ``tiny``
at 128 px but about 20 MB for ``fcos_resnet50_fpn`` at 800 px (256 channels, ~20k locations),
so at paper scale it suits a few hundred images (the labeled set and the candidates), not a pool.

RetinaNet, SSD and other types are refused (``ConfigError``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mgral._io import atomic_write_bytes
from mgral.data.records import Dataset, Detections, ImageId
from mgral.detectors.training import derive_seed, load_image, lr_lambda, make_config, make_optimizer, trainable_boxes
from mgral.errors import CheckpointError, ConfigError

HEAD_TRAIN_DEFAULTS: dict[str, Any] = {
    "iterations": 100,
    "optimizer": "sgd",
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "warmup_iters": 0,
    "schedule": "cosine",
    "grad_clip": 10.0,
}
"""Head fine-tune settings (``TrainConfig`` keys; ``iterations`` = full-batch steps)."""


@dataclass(frozen=True)
class HeadInputs:
    """What the box predictor of one image sees, in model-input coordinates.

    Attributes:
        proposals: ``[P, 4]`` float32 RPN proposals (eval mode).
        features: ``[P, D]`` box-head features of the proposals (float16 by default).
        image_size: ``(h, w)`` after the model's transform; original_size: ``(h, w)`` of the file.
        gt_boxes: ``[G, 4]`` float32 ground-truth boxes (labeled images only, else None).
        gt_labels: ``[G]`` int64 class indices ``1..K``; gt_features: ``[G, D]`` their features.
    """

    proposals: torch.Tensor
    features: torch.Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]
    gt_boxes: torch.Tensor | None = None
    gt_labels: torch.Tensor | None = None
    gt_features: torch.Tensor | None = None

    @property
    def labeled(self) -> bool:
        return self.gt_boxes is not None


@dataclass(frozen=True)
class DenseHeadInputs:
    """What the final convolutions of a dense (FCOS) head see for one image, in model-input
    coordinates.

    Attributes:
        cls_towers / box_towers: per pyramid level ``[C, H, W]`` outputs of the classification /
            regression towers (float16 by default), at the padded size of the image's batch.
        anchors: ``[A, 4]`` float32 anchor boxes of every location, levels in order.
        image_size: ``(h, w)`` after the model's transform; original_size: ``(h, w)`` of the file.
        gt_boxes: ``[G, 4]`` float32 ground-truth boxes (labeled images only, else None).
        gt_labels: ``[G]`` int64 class indices ``1..K``.
    """

    cls_towers: tuple[torch.Tensor, ...]
    box_towers: tuple[torch.Tensor, ...]
    anchors: torch.Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]
    gt_boxes: torch.Tensor | None = None
    gt_labels: torch.Tensor | None = None

    @property
    def labeled(self) -> bool:
        return self.gt_boxes is not None

    @property
    def shape(self) -> tuple[tuple[int, int], ...]:
        """The levels' map sizes: images of one shape train and predict as one batch."""
        return tuple((int(t.shape[-2]), int(t.shape[-1])) for t in self.cls_towers)


HeadCache = dict[ImageId, "HeadInputs | DenseHeadInputs"]


def supports_head_cache(detector: Any) -> bool:
    """Whether ``detector`` holds a torchvision Faster R-CNN or FCOS (what this module caches and fine-tunes)."""
    from torchvision.models.detection import FCOS, FasterRCNN

    return isinstance(getattr(detector, "model", None), (FasterRCNN, FCOS))


def _model(detector: Any) -> nn.Module:
    """The detector's model, if this module supports it."""
    if not supports_head_cache(detector):
        model = getattr(detector, "model", None)
        what = type(model).__name__ if model is not None else type(detector).__name__
        preset = getattr(detector, "preset", None)
        raise ConfigError(
            f"head cache supports Faster R-CNN and FCOS presets (mobilenet_v2_fpn, fasterrcnn_*, tiny, fcos_*); this "
            f"detector {'(preset ' + repr(preset) + ') ' if preset else ''}is a {what}"
        )
    return detector.model


def _dense(detector: Any) -> bool:
    from torchvision.models.detection import FCOS

    return isinstance(_model(detector), FCOS)


def _faster_rcnn(detector: Any) -> nn.Module:
    from torchvision.models.detection import FasterRCNN

    model = _model(detector)
    if not isinstance(model, FasterRCNN):
        raise ConfigError(f"this operation needs a Faster R-CNN detector, not a {type(model).__name__}")
    return model


@torch.inference_mode()
def cache_head_inputs(
    detector: Any,
    dataset: Dataset,
    image_ids: Sequence[ImageId],
    *,
    labeled: Sequence[ImageId] = (),
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
) -> HeadCache:
    """Run ``detector`` (a ``TorchvisionDetector`` with a Faster R-CNN or FCOS model) once over
    ``image_ids`` and keep its last layers' inputs (:class:`HeadInputs`, or
    :class:`DenseHeadInputs` for FCOS); for the ``labeled`` ones (a subset) also the dataset's
    trainable boxes (``trainable_boxes``), their class indices and (Faster R-CNN) features.

    Images are batched as ``detector.predict`` batches them (same ``batch_size``, same order),
    so the features are the ones its predictions came from.

    Raises:
        ConfigError: another detector type; a ``labeled`` id not in ``image_ids``.
        DatasetError: an unreadable image.
    """
    ids, gt_ids = list(image_ids), set(labeled)
    missing = gt_ids - set(ids)
    if missing:
        raise ConfigError(f"labeled image {next(iter(missing))!r} is not among the images to cache; cache it too")
    if _dense(detector):
        return _cache_dense(detector, dataset, ids, gt_ids, batch_size, dtype)
    return _cache_two_stage(detector, dataset, ids, gt_ids, batch_size, dtype)


def _gt_in_model_coordinates(detector: Any, dataset: Dataset, i: ImageId, orig, size, device):
    """Image ``i``'s trainable boxes resized as the model's transform resizes the image, and their class indices."""
    from torchvision.models.detection.transform import resize_boxes

    boxes, cats = trainable_boxes(dataset[i].target)
    gt = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=device)
    return resize_boxes(gt, list(orig), list(size)), [detector.class_index[int(c)] for c in cats]


def _model_batches(model: nn.Module, dataset: Dataset, ids: list[ImageId], batch_size: int):
    """Per batch of ``ids`` (as ``detector.predict`` batches them): the ids, the images' original
    sizes, the transformed batch and the backbone's features (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        images = [load_image(dataset, i).to(device) for i in chunk]
        batch, _ = model.transform(images)
        yield chunk, [tuple(im.shape[-2:]) for im in images], batch, model.backbone(batch.tensors)


def _cache_two_stage(detector, dataset, ids, gt_ids, batch_size, dtype) -> HeadCache:
    model = _faster_rcnn(detector)
    roi = model.roi_heads
    device = next(model.parameters()).device
    out: HeadCache = {}
    for chunk, originals, batch, features in _model_batches(model, dataset, ids, batch_size):
        proposals, _ = model.rpn(batch, features)
        gts, gt_cats = [], []
        for i, orig, size in zip(chunk, originals, batch.image_sizes, strict=True):
            gt, cats = (
                _gt_in_model_coordinates(detector, dataset, i, orig, size, device)
                if i in gt_ids
                else (torch.zeros((0, 4), device=device), [])
            )
            gts.append(gt)
            gt_cats.append(cats)
        box_feats = roi.box_head(roi.box_roi_pool(features, proposals, batch.image_sizes))
        gt_feats = (
            roi.box_head(roi.box_roi_pool(features, gts, batch.image_sizes)) if any(len(g) for g in gts) else None
        )
        counts, gt_counts = [len(p) for p in proposals], [len(g) for g in gts]
        per_image = box_feats.split(counts)
        per_gt = gt_feats.split(gt_counts) if gt_feats is not None else [box_feats[:0]] * len(chunk)
        for k, i in enumerate(chunk):
            gt_entry: dict[str, Any] = {}
            if i in gt_ids:
                gt_entry = {
                    "gt_boxes": gts[k].cpu(),
                    "gt_labels": torch.tensor(gt_cats[k], dtype=torch.int64),
                    "gt_features": per_gt[k].to("cpu", dtype),
                }
            out[i] = HeadInputs(
                proposals[k].cpu(),
                per_image[k].to("cpu", dtype),
                tuple(int(v) for v in batch.image_sizes[k]),
                tuple(int(v) for v in originals[k]),
                **gt_entry,
            )
    return out


def _cache_dense(detector, dataset, ids, gt_ids, batch_size, dtype) -> HeadCache:
    model = _model(detector)
    head = model.head
    device = next(model.parameters()).device
    out: HeadCache = {}
    for chunk, originals, batch, levels in _model_batches(model, dataset, ids, batch_size):
        features = list(levels.values())
        cls_towers = [head.classification_head.conv(f) for f in features]
        box_towers = [head.regression_head.conv(f) for f in features]
        anchors = model.anchor_generator(batch, features)
        for k, i in enumerate(chunk):
            gt_entry: dict[str, Any] = {}
            if i in gt_ids:
                gt, cats = _gt_in_model_coordinates(detector, dataset, i, originals[k], batch.image_sizes[k], device)
                gt_entry = {"gt_boxes": gt.cpu(), "gt_labels": torch.tensor(cats, dtype=torch.int64)}
            out[i] = DenseHeadInputs(
                tuple(t[k].to("cpu", dtype) for t in cls_towers),
                tuple(t[k].to("cpu", dtype) for t in box_towers),
                anchors[k].float().cpu(),
                tuple(int(v) for v in batch.image_sizes[k]),
                tuple(int(v) for v in originals[k]),
                **gt_entry,
            )
    return out


def with_labels(inputs: HeadInputs | DenseHeadInputs, boxes, labels, rows) -> HeadInputs | DenseHeadInputs:
    """``inputs`` with ``boxes`` (model-input coordinates) and ``labels`` (class indices) as its
    labels: detections of the cache made labels (``rows``: the candidate each came from, whose
    features a two-stage head trains the label on; a dense head needs none)."""
    if isinstance(inputs, DenseHeadInputs):
        return dataclasses.replace(inputs, gt_boxes=boxes, gt_labels=labels)
    return dataclasses.replace(inputs, gt_boxes=boxes, gt_labels=labels, gt_features=inputs.features[rows])


def cache_nbytes(cache: HeadCache) -> int:
    """Bytes the cache's tensors hold."""
    total = 0
    for h in cache.values():
        for f in dataclasses.fields(h):
            v = getattr(h, f.name)
            for t in v if isinstance(v, tuple) else (v,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def save_head_cache(path: str | Path, cache: HeadCache) -> None:
    """Write ``cache`` (Faster R-CNN inputs) to ``path`` (``.npz``, plain arrays only) atomically.

    Raises:
        ConfigError: a dense (FCOS) cache: it is rebuilt from the model, not saved.
    """
    if any(isinstance(h, DenseHeadInputs) for h in cache.values()):
        raise ConfigError("saving a dense (FCOS) head cache is not supported; cache the images again instead")
    ids = list(cache)
    heads = [cache[i] for i in ids]
    lab = [h for h in heads if h.labeled]
    dim = heads[0].features.shape[1] if heads else 0
    dtype = heads[0].features.numpy().dtype if heads else np.float16

    def cat(tensors, width, dt):
        return np.concatenate([t.numpy() for t in tensors]) if tensors else np.zeros((0, width), dt)

    arrays = {
        "ids": np.array(json.dumps(ids)),
        "counts": np.array([len(h.proposals) for h in heads], np.int64),
        "proposals": cat([h.proposals for h in heads], 4, np.float32),
        "features": cat([h.features for h in heads], dim, dtype),
        "sizes": np.array([[*h.image_size, *h.original_size] for h in heads], np.int64).reshape(-1, 4),
        "labeled": np.array([h.labeled for h in heads], bool),
        "gt_counts": np.array([len(h.gt_boxes) for h in lab], np.int64),
        "gt_boxes": cat([h.gt_boxes for h in lab], 4, np.float32),
        "gt_labels": np.concatenate([h.gt_labels.numpy() for h in lab]) if lab else np.zeros(0, np.int64),
        "gt_features": cat([h.gt_features for h in lab], dim, dtype),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_head_cache(path: str | Path) -> HeadCache:
    """Read a file written by :func:`save_head_cache`.

    Raises:
        CheckpointError: missing, corrupt or inconsistent file (delete it to recompute).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        ids = json.loads(str(data["ids"]))
        offsets = np.concatenate([[0], np.cumsum(data["counts"])])
        gt_offsets = np.concatenate([[0], np.cumsum(data["gt_counts"])])
        if (
            len(ids) != len(data["counts"])
            or offsets[-1] != len(data["features"])
            or data["labeled"].sum() != len(data["gt_counts"])
            or gt_offsets[-1] != len(data["gt_features"])
        ):
            raise ValueError("counts do not match the arrays")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"head cache {str(path)!r} is unreadable ({err}); delete it to recompute") from err
    out: HeadCache = {}
    g = 0
    for k, i in enumerate(ids):
        a, b = offsets[k], offsets[k + 1]
        gt_entry: dict[str, Any] = {}
        if data["labeled"][k]:
            ga, gb = gt_offsets[g], gt_offsets[g + 1]
            g += 1
            gt_entry = {
                "gt_boxes": torch.from_numpy(data["gt_boxes"][ga:gb]),
                "gt_labels": torch.from_numpy(data["gt_labels"][ga:gb]),
                "gt_features": torch.from_numpy(data["gt_features"][ga:gb]),
            }
        h, w, oh, ow = (int(v) for v in data["sizes"][k])
        out[i] = HeadInputs(
            torch.from_numpy(data["proposals"][a:b]),
            torch.from_numpy(data["features"][a:b]),
            (h, w),
            (oh, ow),
            **gt_entry,
        )
    return out


def _image_seed(seed: int, image_id: ImageId) -> int:
    """A seed per (seed, image id): an image's sample does not depend on which others train beside it."""
    return derive_seed(seed, zlib.crc32(json.dumps(image_id).encode()))


def head_training_samples(
    detector: Any, cache: HeadCache, image_ids: Sequence[ImageId], *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32), class targets ``[N]`` and box-delta targets ``[N, 4]`` of
    the RoIs RoIHeads would train on for ``image_ids``: proposals plus ground-truth boxes,
    matched at the model's IoU thresholds, a balanced sample per image fixed by ``(seed, id)``.

    Raises:
        ConfigError: an image without cached labels (not ``labeled`` when cached).
    """
    model = _faster_rcnn(detector)
    roi = model.roi_heads
    per_image = roi.fg_bg_sampler.batch_size_per_image
    positive = int(per_image * roi.fg_bg_sampler.positive_fraction)
    check_cached(cache, image_ids)
    feats, labels, deltas = [], [], []
    for i in image_ids:
        h = cache[i]
        if not h.labeled:
            raise ConfigError(f"image {i!r} has no cached labels; pass it in labeled= when caching its head inputs")
        boxes = torch.cat([h.proposals, h.gt_boxes])
        x = torch.cat([h.features, h.gt_features]).float()
        matched, lab = roi.assign_targets_to_proposals([boxes], [h.gt_boxes], [h.gt_labels])
        matched, lab = matched[0], lab[0]
        g = torch.Generator().manual_seed(_image_seed(seed, i))
        pos, neg = torch.where(lab >= 1)[0], torch.where(lab == 0)[0]
        n_pos = min(positive, len(pos))
        n_neg = min(per_image - n_pos, len(neg))
        keep = torch.cat(
            [pos[torch.randperm(len(pos), generator=g)[:n_pos]], neg[torch.randperm(len(neg), generator=g)[:n_neg]]]
        )
        gt = h.gt_boxes if len(h.gt_boxes) else torch.zeros((1, 4))
        feats.append(x[keep])
        labels.append(lab[keep])
        deltas.append(roi.box_coder.encode([gt[matched[keep]]], [boxes[keep]])[0])
    return torch.cat(feats), torch.cat(labels), torch.cat(deltas)


def finetune_head(
    detector: Any,
    cache: HeadCache,
    image_ids: Sequence[ImageId],
    *,
    seed: int = 0,
    **train: Any,
) -> tuple[nn.Module, list[float]]:
    """Train a copy of the detector's last layers on the cached labeled ``image_ids``:
    ``iterations`` full-batch steps (``HEAD_TRAIN_DEFAULTS``, overridden by ``train``) on the
    model's own loss: the ``box_predictor`` on ``fastrcnn_loss`` (Faster R-CNN), or the final
    convolutions on FCOS's loss (:func:`dense_head`). Returns the trained copy and the loss
    before each step. Deterministic for a seed (a dense head draws nothing: the seed does not
    enter); the global torch generator is neither read nor changed.

    Raises:
        ConfigError: another detector type, no images, an image without cached labels, bad settings.
    """
    if not image_ids:
        raise ConfigError("a head fine-tune needs at least one labeled image")
    config = make_config(HEAD_TRAIN_DEFAULTS, train)
    if _dense(detector):
        head, objective = _dense_objective(detector, cache, image_ids)
    else:
        head, objective = _two_stage_objective(detector, cache, image_ids, seed)
    optimizer = make_optimizer(head, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, config.iterations))
    losses = []
    for _ in range(config.iterations):
        loss = objective()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return head.eval(), losses


def _two_stage_objective(detector: Any, cache: HeadCache, image_ids: Sequence[ImageId], seed: int):
    """A trainable copy of the box predictor and its full-batch ``fastrcnn_loss``."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    model = _faster_rcnn(detector)
    head = copy.deepcopy(model.roi_heads.box_predictor).float().cpu()
    head.requires_grad_(True)
    x, labels, deltas = head_training_samples(detector, cache, image_ids, seed=seed)
    return head, lambda: sum(fastrcnn_loss(*head(x), [labels], [deltas]))


def dense_head(detector: Any) -> nn.Module:
    """A float32 CPU copy of an FCOS head whose towers are identities: applied to cached tower
    outputs it is the final ``cls_logits``, ``bbox_reg`` and ``bbox_ctrness`` convolutions with
    torchvision's own reshaping (and a preset's output activation)."""
    head = copy.deepcopy(_model(detector).head).float().cpu()
    head.classification_head.conv = nn.Identity()
    head.regression_head.conv = nn.Identity()
    return head


def _stacked(inputs: Sequence[DenseHeadInputs], dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The cached towers of images of one shape as batches ``[N, C, H, W]`` per level, in ``dtype``."""
    levels = range(len(inputs[0].cls_towers))
    return (
        [torch.stack([h.cls_towers[lvl] for h in inputs]).to(dtype) for lvl in levels],
        [torch.stack([h.box_towers[lvl] for h in inputs]).to(dtype) for lvl in levels],
    )


def _dense_outputs(head: nn.Module, towers: tuple[list[torch.Tensor], list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``head``'s outputs (``cls_logits``, ``bbox_regression``, ``bbox_ctrness``, ``[N, A, .]``)
    on stacked towers (:func:`_stacked`)."""
    cls, box = towers
    regression, ctrness = head.regression_head(box)
    return {"cls_logits": head.classification_head(cls), "bbox_regression": regression, "bbox_ctrness": ctrness}


class _Matches:
    """Stands in for the model in ``FCOS.compute_loss``, which keeps torchvision's matching of
    locations to boxes (centre sampling, the levels' scale ranges) inline: run on this, that
    code returns its matches instead of a loss, so they are torchvision's, not a copy."""

    def __init__(self, model: nn.Module) -> None:
        self.center_sampling_radius = model.center_sampling_radius
        self.head = self

    @staticmethod
    def compute_loss(targets, head_outputs, anchors, matched_idxs):
        return matched_idxs


def _by_shape(cache: HeadCache, image_ids: Sequence[ImageId]) -> dict[tuple, list[ImageId]]:
    """``image_ids`` grouped by their maps' sizes (each group in ``image_ids``' order)."""
    groups: dict[tuple, list[ImageId]] = {}
    for i in image_ids:
        groups.setdefault(cache[i].shape, []).append(i)
    return groups


def _dense_objective(detector: Any, cache: HeadCache, image_ids: Sequence[ImageId]):
    """A trainable :func:`dense_head` and FCOS's loss over every location of ``image_ids``.

    Images of one shape form one batch; each batch's losses (torchvision normalises them by
    its foreground count) are weighted back to sums and normalised by the foreground of all
    of them, which is the loss one batch of every image would have."""
    model = _model(detector)
    check_cached(cache, image_ids)
    batches = []
    for ids in _by_shape(cache, image_ids).values():
        inputs = [cache[i] for i in ids]
        for i, h in zip(ids, inputs, strict=True):
            if not h.labeled:
                raise ConfigError(f"image {i!r} has no cached labels; pass it in labeled= when caching its head inputs")
        targets = [{"boxes": h.gt_boxes.float(), "labels": h.gt_labels} for h in inputs]
        anchors = [h.anchors for h in inputs]
        per_level = [a * b for a, b in inputs[0].shape]
        matched = type(model).compute_loss(_Matches(model), targets, {}, anchors, per_level)
        foreground = int(sum(int((m >= 0).sum()) for m in matched))
        batches.append((_stacked(inputs, torch.float32), targets, anchors, matched, foreground))
    total = max(1, sum(b[-1] for b in batches))
    head = dense_head(detector)
    head.requires_grad_(True)

    def objective() -> torch.Tensor:
        loss = torch.zeros(())
        for towers, targets, anchors, matched, foreground in batches:
            parts = head.compute_loss(targets, _dense_outputs(head, towers), anchors, matched)
            loss = loss + sum(parts.values()) * max(1, foreground)
        return loss / total

    return head, objective


@dataclass(frozen=True)
class HeadDetections:
    """A predictor's detections of one cached image in model-input coordinates, before the
    rescaling to the original size, with the proposal each box came from.

    Attributes:
        boxes: ``[N, 4]`` float32 xyxy; scores: ``[N]`` float32; labels: ``[N]`` int64 class
            indices ``1..K``.
        probs: ``[N, K + 1]`` float32 class distribution of each box's proposal (background first).
        rows: ``[N]`` int64 index of each box's proposal in ``HeadInputs.proposals`` (and
            ``features``); for a dense head, of its location in ``DenseHeadInputs.anchors``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    rows: torch.Tensor


def _postprocessed(detector: Any, cache: HeadCache, image_ids: Sequence[ImageId], predictor, batch_size: int):
    """Per chunk of ``image_ids``: the ids, their cached inputs, the model's
    ``postprocess_detections`` result dicts (model-input coordinates) with the extra keys of
    :mod:`mgral.detectors.postprocess` (``probs``, ``rows``, ``num_candidates``)."""
    if _dense(detector):
        yield from _dense_postprocessed(detector, cache, image_ids, predictor, batch_size)
        return
    model = _faster_rcnn(detector)
    roi = model.roi_heads
    head = predictor if predictor is not None else roi.box_predictor
    dtype = next(head.parameters()).dtype
    check_cached(cache, image_ids)
    ids = list(image_ids)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        heads = [cache[i] for i in chunk]
        logits, regression = head(torch.cat([h.features for h in heads]).to(dtype))
        sizes = [h.image_size for h in heads]
        boxes, scores, labels = roi.postprocess_detections(logits, regression, [h.proposals for h in heads], sizes)
        extra = roi.__dict__.pop("_mgral_extra", None) or [{}] * len(heads)
        results = [
            {"boxes": b, "scores": s, "labels": lab, **ex}
            for b, s, lab, ex in zip(boxes, scores, labels, extra, strict=True)
        ]
        yield chunk, heads, results


def _dense_postprocessed(detector: Any, cache: HeadCache, image_ids: Sequence[ImageId], predictor, batch_size: int):
    """:func:`_postprocessed` of an FCOS: the final convolutions on the cached towers, images of
    one shape as one batch, then the model's ``postprocess_detections``."""
    model = _model(detector)
    head = predictor if predictor is not None else dense_head(detector)
    dtype = next(head.parameters()).dtype
    check_cached(cache, image_ids)
    ids = list(image_ids)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        found = {}
        for group in _by_shape(cache, chunk).values():
            inputs = [cache[i] for i in group]
            per_level = [a * b for a, b in inputs[0].shape]
            outputs = {
                k: list(v.split(per_level, dim=1)) for k, v in _dense_outputs(head, _stacked(inputs, dtype)).items()
            }
            anchors = [list(h.anchors.split(per_level)) for h in inputs]
            results = model.postprocess_detections(outputs, anchors, [h.image_size for h in inputs])
            found.update(zip(group, results, strict=True))
        yield chunk, [cache[i] for i in chunk], [found[i] for i in chunk]


@torch.inference_mode()
def predict_from_cache(
    detector: Any,
    cache: HeadCache,
    image_ids: Sequence[ImageId],
    *,
    predictor: nn.Module | None = None,
    batch_size: int = 8,
) -> dict[ImageId, Detections]:
    """``Detections`` of ``image_ids`` from their cached features through ``predictor``
    (default: the detector's own), the model's ``postprocess_detections`` (class
    distributions kept) and its transform's rescaling to the original image size."""
    model = _model(detector)
    model.eval()  # the transform rescales boxes to the original size in eval mode only
    out = {}
    for chunk, heads, results in _postprocessed(detector, cache, image_ids, predictor, batch_size):
        sizes = [h.image_size for h in heads]
        results = model.transform.postprocess(results, sizes, [h.original_size for h in heads])
        for i, res in zip(chunk, results, strict=True):
            out[i] = detector._to_detections(res, None)
    return out


@torch.inference_mode()
def head_detections(
    detector: Any,
    cache: HeadCache,
    image_ids: Sequence[ImageId],
    *,
    predictor: nn.Module | None = None,
    batch_size: int = 8,
) -> dict[ImageId, HeadDetections]:
    """The boxes :func:`predict_from_cache` gives, in the cache's coordinates, with their
    proposals' rows: a box's features are ``cache[i].features[rows]`` (those of the proposal
    it was regressed from), so detections can serve as labels of a head fine-tune."""
    out = {}
    for chunk, _, results in _postprocessed(detector, cache, image_ids, predictor, batch_size):
        for i, res in zip(chunk, results, strict=True):
            out[i] = HeadDetections(
                res["boxes"].float(), res["scores"].float(), res["labels"], res["probs"].float(), res["rows"]
            )
    return out


def evaluate_head(
    detector: Any,
    cache: HeadCache,
    dataset: Dataset,
    image_ids: Sequence[ImageId],
    *,
    predictor: nn.Module | None = None,
    style: str = "coco",
):
    """``mgral.evaluation.evaluate`` of :func:`predict_from_cache` on ``image_ids``."""
    from mgral.evaluation import evaluate

    preds = predict_from_cache(detector, cache, image_ids, predictor=predictor)
    return evaluate(dataset.subset(image_ids), preds, style=style)


def check_cached(cache: Mapping[ImageId, HeadInputs], image_ids: Sequence[ImageId]) -> None:
    """Raise ``ConfigError`` naming the first of ``image_ids`` missing from ``cache``."""
    missing = [i for i in image_ids if i not in cache]
    if missing:
        raise ConfigError(f"{len(missing)} image(s) not in the head cache, e.g. {missing[0]!r}; cache them first")
