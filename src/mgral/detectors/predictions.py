"""Your own model as a detector kind: mgral reads its results files, one per cycle.

A team that trains with its own framework (Ultralytics, Detectron2, MMDetection, ...) runs
the whole active-learning loop with it (``mgral run`` in a simulation, ``mgral query`` /
``mgral import-labels`` with people labeling)::

    detector:
      kind: predictions
      params:
        results: preds/{label}/seed-{seed}/cycle-{cycle}.json   # COCO results of your model
        embeddings: preds/{label}/seed-{seed}/cycle-{cycle}.npz # optional (core_set, ...)
        match: auto          # how the results name images: id, stem (Ultralytics) or auto
        categories: id       # id, index1 (Ultralytics on a non-COCO dataset) or index0

Where mgral would train the model of a cycle, it writes ``train.json`` in the cycle's
directory (COCO: the images labeled so far, with their labels; ``mgral_id`` keeps each
image's dataset id) and reads the results file of the model you trained on exactly those
images: its detections on the pool and on the test split (the point of the AL curve). Until
the file exists the command stops with exit status 3, naming the file to write; run it again
(``mgral run --resume``, ``mgral query``) once it is there. ``{label}``, ``{seed}`` and
``{cycle}`` in the paths name the series and cycle (relative paths are relative to the
config file). The results files of Ultralytics' ``val(save_json=True)``, Detectron2's
``COCOEvaluator`` and MMDetection's ``CocoMetric`` load unchanged
(:func:`mgral.evaluation.read_predictions`); embeddings are read by
:func:`mgral.selection.read_embeddings`.

The files a cycle used are recorded in its ``model.pt`` (JSON here, with each file's
SHA-256): a results file changed after its cycle used it is refused, since the run's
selections were made from the old one.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgral._io import atomic_write_json
from mgral._untrusted import short_repr
from mgral.data.records import Category, Dataset, Detections, ImageId
from mgral.errors import CheckpointError, ConfigError, WaitingForModel

PARAMS = {"results": None, "embeddings": None, "match": "auto", "categories": "id"}
"""The parameters of this kind (``detector.params``) and their defaults (``results`` is required)."""
FIELDS = ("label", "seed", "cycle")
"""The placeholders a results or embeddings path may hold."""
FORMAT = "mgral-predictions-1"


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    from mgral.evaluation.predictions import CATEGORIES, MATCH

    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ConfigError(
            f"detector.params: {unknown} are not parameters of kind predictions; its parameters: {sorted(PARAMS)}"
        )
    p = {**PARAMS, **params}
    if not isinstance(p["results"], str) or not p["results"]:
        raise ConfigError(
            "detector.params.results: kind predictions needs the path of your model's COCO results file per cycle, "
            "e.g. results: preds/{label}/seed-{seed}/cycle-{cycle}.json"
        )
    for key in ("results", "embeddings"):
        if p[key] is None:
            continue
        if not isinstance(p[key], str):
            raise ConfigError(f"detector.params.{key}: expected a path, got {short_repr(p[key])}")
        names = {f[1] for f in string.Formatter().parse(p[key]) if f[1] is not None}
        if names - set(FIELDS):
            raise ConfigError(
                f"detector.params.{key}: {p[key]!r} names {sorted(names - set(FIELDS))}; a path may hold "
                f"{', '.join('{' + f + '}' for f in FIELDS)} only"
            )
    if p["match"] not in MATCH:
        raise ConfigError(f"detector.params.match: expected one of {', '.join(MATCH)}, got {short_repr(p['match'])}")
    if p["categories"] not in CATEGORIES:
        raise ConfigError(
            f"detector.params.categories: expected one of {', '.join(CATEGORIES)}, got {short_repr(p['categories'])}"
        )
    return p


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PredictionsDetector:
    """The results files of a model trained outside mgral, one per cycle (see the module docstring)."""

    kind = "predictions"

    def __init__(self, categories: Sequence[Category], /, **params: Any) -> None:
        self.categories = list(categories)
        self.params = _check_params(params)
        self.files: dict[str, str] = {}  # "results" / "embeddings" -> the file this cycle uses
        self.hashes: dict[str, str] = {}
        self._read: tuple[int, dict[ImageId, Detections]] | None = None  # (id of the dataset, its detections)

    # -- the kind's side of the protocol (mgral.detectors.base) ----------------------------------
    @classmethod
    def from_config(
        cls, spec: Any, categories: Sequence[Category], *, seed: int, train: dict[str, Any]
    ) -> PredictionsDetector:
        return cls(categories, **spec.params)

    @classmethod
    def check_config(cls, spec: Any, categories: Sequence[Category], trainings: Sequence[dict[str, Any]]) -> None:
        _check_params(dict(spec.params))

    @classmethod
    def capabilities(cls, spec: Any) -> frozenset[str]:
        return frozenset()  # files give detections and embeddings; no views, clones or fine-tunes

    def start_from(self, other: Any) -> None:
        raise ConfigError("kind predictions: your model trains elsewhere; detector.warm_start does not apply")

    # -- a cycle -------------------------------------------------------------------------------
    def fit(
        self, dataset: Dataset, image_ids: Sequence[ImageId], *, checkpoint_dir: str | Path, **_: Any
    ) -> dict[str, Any]:
        """Write what the model of this cycle must be trained on (``train.json`` in
        ``checkpoint_dir``, the cycle's directory), then find its results file.

        Raises:
            WaitingForModel: the results file is not there yet (saying what to write where).
        """
        from mgral.data.coco import to_coco_dict

        cdir = Path(checkpoint_dir)
        where = {"label": cdir.parent.parent.name, "seed": int(cdir.parent.name[5:]), "cycle": int(cdir.name[6:])}
        train_file = cdir / "train.json"
        coco = to_coco_dict(dataset.subset(list(image_ids)))
        for entry, i in zip(coco["images"], image_ids, strict=True):
            entry["mgral_id"] = i
        atomic_write_json(train_file, coco)
        for key in ("results", "embeddings"):
            if self.params[key] is not None:
                self.files[key] = self.params[key].format(**where)
        results = Path(self.files["results"])
        if not results.is_file():
            raise WaitingForModel(
                f"cycle {where['cycle']} of {where['label']} seed {where['seed']} needs your model's results: train "
                f"it on the {len(image_ids)} images of {train_file} (COCO, with their labels), run it on the pool and "
                f"the test split, and write the COCO results to {results}; then run the same command again"
            )
        embeddings = self.files.get("embeddings")
        if embeddings is not None and not Path(embeddings).is_file():
            raise WaitingForModel(
                f"cycle {where['cycle']} of {where['label']} seed {where['seed']}: the results are there but not the "
                f"embeddings file {embeddings} (detector.params.embeddings); write it, then run the command again"
            )
        self.hashes = {k: _sha256(Path(v)) for k, v in self.files.items()}
        preds = self._predictions(dataset)
        return {"results": str(results), "images_with_predictions": len(preds)}

    def save(self, path: str | Path) -> None:
        """Record the files this cycle used (JSON, atomically)."""
        record = {"format": FORMAT, "categories": [[c.id, c.name] for c in self.categories], "params": self.params}
        atomic_write_json(Path(path), {**record, "files": self.files, "sha256": self.hashes}, indent=1)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> PredictionsDetector:
        """The detector of a finished cycle: the files it used, checked unchanged.

        Raises:
            CheckpointError: an unreadable record, or a file that changed or is gone.
        """
        path = Path(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}")
            det = cls([Category(int(i), str(n)) for i, n in state["categories"]], **state["params"])
            det.files, det.hashes = dict(state["files"]), dict(state["sha256"])
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{path}: not a record of the files a cycle used ({err})") from err
        for key, file in det.files.items():
            if not Path(file).is_file() or _sha256(Path(file)) != det.hashes.get(key):
                raise CheckpointError(
                    f"{path}: the {key} file {file} changed (or is gone) since this cycle used it; the run's later "
                    "selections were made from it: restore it, or start a new run"
                )
        return det

    # -- detections ------------------------------------------------------------------------------
    def _predictions(self, dataset: Dataset) -> dict[ImageId, Detections]:
        from mgral.evaluation.predictions import read_predictions
        from mgral.selection import read_embeddings

        if self._read is None or self._read[0] != id(dataset):
            p = self.params
            preds = read_predictions(self.files["results"], dataset, match=p["match"], categories=p["categories"])
            if "embeddings" in self.files:
                vectors = read_embeddings(self.files["embeddings"], dataset)
                preds = {i: preds.get(i, Detections()) for i in set(preds) | set(vectors)}
                for i, v in vectors.items():
                    preds[i].embedding = np.asarray(v, dtype=np.float32)
            self._read = (id(dataset), preds)
        return self._read[1]

    def predict(self, dataset: Dataset, image_ids: Sequence[ImageId], **options: Any) -> dict[ImageId, Detections]:
        """The results file's detections of ``image_ids``: none for an image it does not list."""
        if options.get("augment") is not None:
            raise ConfigError("kind predictions: the results files hold one view of each image; augment does not apply")
        preds = self._predictions(dataset)
        return {i: preds.get(i, Detections()) for i in image_ids}

    def embed(self, dataset: Dataset, image_ids: Sequence[ImageId], **options: Any) -> dict[ImageId, np.ndarray]:
        return {i: d.embedding for i, d in self.predict(dataset, image_ids).items()}

    def evaluate(self, dataset: Dataset, image_ids: Sequence[ImageId], *, style: str = "coco", **_: Any):
        """The mAP of the results on ``image_ids`` (the test split).

        Raises:
            DatasetError: the results file lists none of ``image_ids``.
        """
        from mgral.errors import DatasetError
        from mgral.evaluation import evaluate

        preds = self._predictions(dataset)
        if image_ids and not set(image_ids) & set(preds):
            raise DatasetError(
                f"{self.files['results']}: no detection on any of the {len(image_ids)} test images; the AL curve "
                "needs your model's results on the test split too: run it on those images as well"
            )
        return evaluate(dataset.subset(image_ids), self.predict(dataset, image_ids), style=style)
