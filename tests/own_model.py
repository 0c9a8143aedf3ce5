"""A user's own model, as mgral sees it: detections written in the shapes Ultralytics,
Detectron2 and MMDetection dump (for ``mgral select`` and the ``predictions`` detector kind)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mgral.data.records import Detections

FRAMEWORKS = ("ultralytics", "detectron2", "mmdetection")


def fake_model(dataset, seed: int = 0, ids=None) -> dict:
    """Detections a model might make: the true boxes, jittered, with random scores; a few
    images get none."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, rec in enumerate(dataset):
        if ids is not None and rec.id not in ids:
            continue
        if n % 7 == 3:
            continue  # no detections on this image: its entry is simply absent from the file
        boxes = rec.target.boxes + rng.normal(0, 1, rec.target.boxes.shape).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = rng.uniform(0.05, 1.0, len(boxes)).astype(np.float32)
        out[rec.id] = Detections(boxes=boxes, scores=scores, labels=rec.target.labels)
    return out


def results_rows(dataset, dets: dict, framework: str) -> list[dict]:
    """COCO results entries as ``framework`` writes them.

    Ultralytics' ``DetectionValidator.pred_to_json``: image_id = the file stem (an int when
    numeric), category_id = class index + 1 on a dataset that is not COCO, rounded numbers.
    Detectron2's ``COCOEvaluator`` (coco_instances_results.json): the dataset's image and
    category ids. MMDetection's ``CocoMetric.results2json``: the same keys, in its own order.
    """
    index = {c.id: n for n, c in enumerate(dataset.categories)}
    rows = []
    for image_id, det in dets.items():
        stem = Path(dataset[image_id].file_name).stem
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            bbox = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
            if framework == "ultralytics":
                row = {"image_id": int(stem) if stem.isdigit() else stem, "category_id": index[label] + 1}
                row |= {"bbox": bbox, "score": round(score, 5)}
            elif framework == "detectron2":
                row = {"image_id": image_id, "category_id": label, "bbox": bbox, "score": round(score, 5)}
            else:
                row = {"image_id": image_id, "bbox": bbox, "score": round(score, 5), "category_id": label}
            rows.append(row)
    return rows


def write_results(path: Path, dataset, dets: dict, framework: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_rows(dataset, dets, framework)))
    return path
