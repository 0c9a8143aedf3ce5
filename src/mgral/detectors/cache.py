"""On-disk cache of a pool's predictions: one ``.npz`` file per cycle, written atomically.

Strategies and reports reuse the file instead of running the detector again. The file
holds plain arrays only (``allow_pickle=False`` on load): image ids as JSON (so int and
str ids keep their type), per-image counts, and the concatenated boxes, scores, labels,
class distributions, embeddings and pre-NMS candidate counts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mgral._io import atomic_write_bytes
from mgral.data.records import Detections, ImageId
from mgral.errors import CheckpointError


def save_predictions(path: str | Path, preds: Mapping[ImageId, Detections]) -> None:
    """Write ``preds`` to ``path`` (``.npz``) atomically."""
    ids = list(preds)
    dets = [preds[i] for i in ids]
    arrays: dict[str, np.ndarray] = {
        "ids": np.array(json.dumps(ids)),
        "counts": np.array([len(d) for d in dets], dtype=np.int64),
        "boxes": np.concatenate([d.boxes for d in dets]) if dets else np.zeros((0, 4), np.float32),
        "scores": np.concatenate([d.scores for d in dets]) if dets else np.zeros(0, np.float32),
        "labels": np.concatenate([d.labels for d in dets]) if dets else np.zeros(0, np.int64),
        "num_candidates": np.array([-1 if d.num_candidates is None else d.num_candidates for d in dets], np.int64),
    }
    if dets and all(d.probs is not None for d in dets):
        arrays["probs"] = np.concatenate([d.probs for d in dets])
    if dets and all(d.embedding is not None for d in dets):
        arrays["embeddings"] = np.stack([d.embedding for d in dets])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_predictions(path: str | Path) -> dict[ImageId, Detections]:
    """Read a file written by ``save_predictions``.

    Raises:
        CheckpointError: missing, corrupt or inconsistent file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        ids = json.loads(str(data["ids"]))
        counts = data["counts"]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        if len(ids) != len(counts) or offsets[-1] != len(data["boxes"]):
            raise ValueError("counts do not match the arrays")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"prediction cache {str(path)!r} is unreadable ({err}); delete it to recompute") from err
    probs, emb = data.get("probs"), data.get("embeddings")
    out: dict[ImageId, Detections] = {}
    for k, image_id in enumerate(ids):
        a, b = offsets[k], offsets[k + 1]
        nc = int(data["num_candidates"][k])
        out[image_id] = Detections(
            boxes=data["boxes"][a:b],
            scores=data["scores"][a:b],
            labels=data["labels"][a:b],
            probs=None if probs is None else probs[a:b],
            embedding=None if emb is None else emb[k],
            num_candidates=None if nc < 0 else nc,
        )
    return out
