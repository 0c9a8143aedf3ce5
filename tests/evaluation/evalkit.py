"""Workload generators and the pycocotools reference shared by the evaluation tests.

(A plain module, not conftest.py: tests import its helpers, and ``conftest`` is ambiguous
when several test directories have one.)
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import numpy as np

from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.evaluation.result import COCO_FIGURES


@dataclass
class Workload:
    """Knobs of a random detection workload (defaults: a small mixed one)."""

    images: int = 30
    classes: int = 6
    max_gt: int = 6
    max_dets: int = 25
    p_empty: float = 0.1  # image with neither GT nor detections
    p_no_dets: float = 0.1  # image with GT but no detections
    p_no_gt: float = 0.1  # image with detections but no GT
    p_crowd: float = 0.1  # GT box marked iscrowd
    p_difficult: float = 0.15
    p_crowded: float = 0.1  # image with a cluster of many overlapping boxes of one class
    crowded_gt: int = 30
    crowded_dets: int = 130  # > 100: exercises maxDets truncation
    tie_levels: int = 0  # > 0: scores drawn from this many values (tied scores)
    classes_without_gt: int = 1  # last classes get no GT (but may get detections)
    str_ids: bool = False
    size: int = 640


def _random_boxes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """xyxy boxes whose sizes span COCO's small, medium and large ranges."""
    side = np.exp(rng.uniform(np.log(4), np.log(size * 0.8), size=(n, 2)))
    x = rng.uniform(0, size - side[:, 0])
    y = rng.uniform(0, size - side[:, 1])
    return np.stack([x, y, x + side[:, 0], y + side[:, 1]], axis=1)


def _jitter(rng: np.random.Generator, boxes: np.ndarray, scale: float) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    d = rng.normal(0, scale, size=boxes.shape) * np.stack([w, h, w, h], axis=1)
    out = boxes + d
    out[:, 2] = np.maximum(out[:, 2], out[:, 0] + 0.5)
    out[:, 3] = np.maximum(out[:, 3], out[:, 1] + 0.5)
    return out


def make_workload(seed: int, cfg: Workload | None = None) -> tuple[Dataset, dict]:
    """A seeded random (ground truth, predictions) pair covering the edge cases of ``cfg``."""
    cfg = cfg or Workload()
    rng = np.random.default_rng(seed)
    cat_ids = [3 * k + 1 for k in range(cfg.classes)]  # non-contiguous ids
    gt_classes = cat_ids[: max(1, cfg.classes - cfg.classes_without_gt)]
    records, preds = [], {}
    ids: list = (
        [f"img_{n:04d}" for n in rng.permutation(cfg.images)]
        if cfg.str_ids
        else list(rng.choice(10 * cfg.images, size=cfg.images, replace=False) + 1)
    )
    for image_id in ids:
        image_id = image_id if cfg.str_ids else int(image_id)
        kind = rng.random()
        n_gt = int(rng.integers(1, cfg.max_gt + 1))
        n_dt = int(rng.integers(1, cfg.max_dets + 1))
        if kind < cfg.p_empty:
            n_gt = n_dt = 0
        elif kind < cfg.p_empty + cfg.p_no_dets:
            n_dt = 0
        elif kind < cfg.p_empty + cfg.p_no_dets + cfg.p_no_gt:
            n_gt = 0
        boxes = _random_boxes(rng, n_gt, cfg.size)
        labels = rng.choice(gt_classes, size=n_gt)
        if rng.random() < cfg.p_crowded:
            center = _random_boxes(rng, 1, cfg.size)
            cluster = _jitter(rng, np.repeat(center, cfg.crowded_gt, axis=0), 0.08)
            boxes = np.concatenate([boxes, cluster])
            labels = np.concatenate([labels, np.full(cfg.crowded_gt, gt_classes[0])])
            n_dt_cluster = cfg.crowded_dets
        else:
            n_dt_cluster = 0
        n_box = len(boxes)
        crowd = rng.random(n_box) < cfg.p_crowd
        difficult = rng.random(n_box) < cfg.p_difficult
        records.append(
            ImageRecord(
                image_id,
                f"{image_id}.jpg",
                cfg.size,
                cfg.size,
                target=Target(boxes=boxes, labels=labels, difficult=difficult, iscrowd=crowd),
            )
        )
        # detections: jittered GT (some with the wrong class), exact copies, random boxes
        parts, plabels = [], []
        if n_box and n_dt:
            src = rng.integers(0, n_box, size=n_dt)
            parts.append(_jitter(rng, boxes[src], rng.choice([0.02, 0.1, 0.25])))
            plabels.append(np.where(rng.random(n_dt) < 0.15, rng.choice(cat_ids, size=n_dt), labels[src]))
            dup = rng.integers(0, n_box, size=max(1, n_dt // 5))
            parts.append(boxes[dup])
            plabels.append(labels[dup])
        if n_dt:
            parts.append(_random_boxes(rng, n_dt, cfg.size))
            plabels.append(rng.choice(cat_ids, size=n_dt))
        if n_dt_cluster:
            parts.append(_jitter(rng, np.repeat(boxes[-1:], n_dt_cluster, axis=0), 0.1))
            plabels.append(np.full(n_dt_cluster, gt_classes[0]))
        if parts:
            pb = np.concatenate(parts)
            pl = np.concatenate(plabels)
            if cfg.tie_levels:
                scores = rng.integers(1, cfg.tie_levels + 1, size=len(pb)) / cfg.tie_levels
            else:
                scores = rng.random(len(pb))
            preds[image_id] = Detections(boxes=pb, scores=scores, labels=pl)
    cats = [Category(c, f"class{c}") for c in cat_ids]
    return Dataset("/nonexistent", cats, records), preds


# -- the reference: pycocotools on COCO dicts built here, independently of mgral -----------


def coco_dicts(gt: Dataset, preds: dict, image_ids: list | None = None) -> tuple[dict, list, dict]:
    """(ground-truth dict, results list, mgral id -> int id) for pycocotools."""
    int_ids = all(isinstance(i, int) for i in gt.images)
    code = {i: (i if int_ids else n + 1) for n, i in enumerate(gt.images)}
    wanted = list(gt.images) if image_ids is None else image_ids
    images, anns, results = [], [], []
    for image_id in wanted:
        rec = gt[image_id]
        images.append({"id": code[image_id], "width": rec.width, "height": rec.height})
        b = rec.target.boxes.astype(np.float64)
        for box, label, crowd in zip(b, rec.target.labels, rec.target.iscrowd, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": code[image_id],
                    "category_id": int(label),
                    "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(crowd),
                }
            )
        det = preds.get(image_id)
        if det is None:
            continue
        d = det.boxes.astype(np.float64)
        for box, score, label in zip(d, det.scores.astype(np.float64), det.labels, strict=True):
            results.append(
                {
                    "image_id": code[image_id],
                    "category_id": int(label),
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                    "score": float(score),
                }
            )
    cats = [{"id": c.id, "name": c.name} for c in gt.categories]
    return {"images": images, "annotations": anns, "categories": cats}, results, code


def pycocotools_eval(gt_dict: dict, results: list, img_ids: list | None = None):
    """pycocotools COCOeval on in-memory dicts (prints silenced; it has no option for it)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt_dict))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(results))) if results else COCO()
        if not results:
            coco_dt.dataset = {"images": gt_dict["images"], "annotations": [], "categories": gt_dict["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def reference_per_class(ev, gt: Dataset) -> dict[str, float]:
    """Class name -> AP@[.5:.95] from pycocotools' precision (NaN for -1)."""
    names = {c.id: c.name for c in gt.categories}
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        s = ev.eval["precision"][:, :, k, 0, -1]
        out[names[cat_id]] = float(np.mean(s[s > -1])) if (s > -1).any() else float("nan")
    return out


def assert_close(ours: float | None, ref: float, tol: float, what: str) -> None:
    """``ref`` is pycocotools' figure (-1 = undefined, which we report as NaN)."""
    if ref == -1:
        assert ours is not None and np.isnan(ours), f"{what}: expected undefined (NaN), got {ours}"
    else:
        assert ours is not None and abs(ours - ref) <= tol, f"{what}: ours {ours!r} vs reference {ref!r}"


def assert_matches_reference(result, ev, gt: Dataset, tol: float = 1e-9) -> None:
    for name, ref in zip(COCO_FIGURES, ev.stats, strict=True):
        assert_close(getattr(result, name), float(ref), tol, name)
    ref_pc = reference_per_class(ev, gt)
    assert list(result.per_class) == list(ref_pc)
    for name, ref in ref_pc.items():
        assert_close(result.per_class[name], -1.0 if np.isnan(ref) else ref, tol, f"per_class[{name}]")


def unique_scores(preds: dict, seed: int) -> dict:
    """The same detections with all scores distinct (no ties anywhere)."""
    total = sum(len(d) for d in preds.values())
    values = (np.random.default_rng(seed).permutation(total) + 1) / (total + 1)
    out, n = {}, 0
    for image_id, det in preds.items():
        out[image_id] = Detections(boxes=det.boxes, scores=values[n : n + len(det)], labels=det.labels)
        n += len(det)
    return out


def duplicate(gt: Dataset, preds: dict, image_ids: list, weights: np.ndarray) -> tuple[Dataset, dict]:
    """A dataset where image ``image_ids[i]`` appears ``weights[i]`` times (copies get new ids)."""
    records, new_preds = [], {}
    for image_id, count in zip(image_ids, weights, strict=True):
        for copy in range(int(count)):
            new_id = f"{image_id}#{copy}" if isinstance(image_id, str) else int(image_id) * 1000 + copy
            rec = gt[image_id]
            records.append(ImageRecord(new_id, rec.file_name, rec.width, rec.height, target=rec.target))
            if image_id in preds:
                new_preds[new_id] = preds[image_id]
    return Dataset(gt.root, gt.categories, records), new_preds


# -- the VOC reference: the devkit's voc_eval.py loop, on mgral's continuous boxes ---------


def reference_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """py-faster-rcnn ``voc_ap``, as published."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def reference_voc(gt: Dataset, preds: dict, use_07_metric: bool, image_ids: list | None = None) -> dict[str, float]:
    """Class name -> AP@0.5 by a straightforward loop (devkit ``voc_eval``), NaN without npos.

    Detections are listed image by image (integer ids ascending, string ids in dataset
    order) and sorted by score with a stable sort, as mgral documents for ties.
    """
    ids = list(gt.images) if image_ids is None else list(image_ids)
    if all(isinstance(i, int) for i in gt.images):
        ids = sorted(ids)
    else:
        position = {i: n for n, i in enumerate(gt.images)}
        ids = sorted(ids, key=position.__getitem__)
    out = {}
    for cat in gt.categories:
        class_recs, npos = {}, 0
        for image_id in ids:
            t = gt[image_id].target
            m = t.labels == cat.id
            ignored = (t.difficult | t.iscrowd)[m]
            class_recs[image_id] = {
                "bbox": t.boxes[m].astype(np.float64),
                "difficult": ignored,
                "det": [False] * int(m.sum()),
            }
            npos += int((~ignored).sum())
        image_of, confidence, boxes = [], [], []
        for image_id in ids:
            det = preds.get(image_id)
            if det is None:
                continue
            m = det.labels == cat.id
            image_of += [image_id] * int(m.sum())
            confidence += det.scores[m].astype(np.float64).tolist()
            boxes += det.boxes[m].astype(np.float64).tolist()
        order = np.argsort(-np.array(confidence), kind="stable")
        nd = len(order)
        tp, fp = np.zeros(nd), np.zeros(nd)
        for d, j in enumerate(order):
            r = class_recs[image_of[j]]
            bb = np.array(boxes[j])
            ovmax = -np.inf
            bbgt = r["bbox"]
            if bbgt.size > 0:
                ixmin = np.maximum(bbgt[:, 0], bb[0])
                iymin = np.maximum(bbgt[:, 1], bb[1])
                ixmax = np.minimum(bbgt[:, 2], bb[2])
                iymax = np.minimum(bbgt[:, 3], bb[3])
                iw = np.maximum(ixmax - ixmin, 0.0)
                ih = np.maximum(iymax - iymin, 0.0)
                inters = iw * ih
                uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1]) - inters
                overlaps = inters / uni
                ovmax = np.max(overlaps)
                jmax = np.argmax(overlaps)
            if ovmax > 0.5:
                if not r["difficult"][jmax]:
                    if not r["det"][jmax]:
                        tp[d] = 1.0
                        r["det"][jmax] = True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        if npos == 0:
            out[cat.name] = float("nan")
            continue
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out[cat.name] = reference_voc_ap(rec, prec, use_07_metric)
    return out


def assert_same_per_class(ours: dict[str, float], ref: dict[str, float], tol: float = 1e-9) -> None:
    assert set(ours) == set(ref)
    for name, r in ref.items():
        if np.isnan(r):
            assert np.isnan(ours[name]), f"{name}: expected NaN, got {ours[name]}"
        else:
            assert abs(ours[name] - r) <= tol, f"{name}: ours {ours[name]!r} vs reference {r!r}"
