"""The labels people imported for a series (``labels.json``, COCO): read, written, compared."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mgral._io import atomic_write_json
from mgral.data.records import Dataset, ImageId, ImageRecord, Target
from mgral.errors import DatasetError, RunError
from mgral.pool import Ledger
from mgral.runs import SeriesDir


class LabelStore:
    """The labels of a series' labeled images: the dataset file's for the initial set (cycle
    0), the imported ones (``labels.json``) after. ``imported``: image id -> (cycle, target)."""

    def __init__(self, sdir: SeriesDir, dataset: Dataset, ledger: Ledger) -> None:
        self.sdir, self.dataset, self.ledger = sdir, dataset, ledger
        self.imported = read_labels(sdir.labels, dataset)

    def __call__(self, ids: Sequence[ImageId]) -> dict[ImageId, Target]:
        out = {}
        for i in ids:
            if self.ledger.labeled_in[i] == 0:
                out[i] = self.dataset[i].target
            elif i in self.imported:
                out[i] = self.imported[i][1]
            else:
                raise RunError(
                    f"{self.sdir.ledger}: image {i!r} is labeled in cycle {self.ledger.labeled_in[i]}, but its labels "
                    f"are missing from {self.sdir.labels}; restore that file, or import the labels of that "
                    "round again (mgral import-labels)"
                )
        return out

    def save(self, imported: Mapping[ImageId, tuple[int, Target]]) -> None:
        """Write ``imported`` as the series' labels (atomically), then keep it."""
        write_labels(self.sdir.labels, self.dataset, imported)
        self.imported = dict(imported)


def read_labels(path: str | os.PathLike[str], dataset: Dataset) -> dict[ImageId, tuple[int, Target]]:
    """The labels file of a series (:attr:`mgral.runs.SeriesDir.labels`): image id -> (cycle, target).

    Raises:
        RunError: a corrupt file, or an image that is not in the dataset.
    """
    from mgral.data._layout import read_json
    from mgral.data.coco import from_coco_dict

    path = Path(path)
    if not path.exists():
        return {}
    hint = "the file is corrupt or was edited by hand; restore it"
    try:
        obj = read_json(path, expected="the labels imported so far (COCO)")
        labeled = from_coco_dict(obj, source=str(path), image_root=dataset.root, check_files=False)
        entries = {e["id"]: (e["mgral_id"], e["mgral_cycle"]) for e in obj["images"]}  # type: ignore[index]
    except (DatasetError, KeyError, TypeError) as err:
        raise RunError(f"{path}: cannot read the imported labels ({err}); {hint}") from err
    store = {}
    for rec in labeled:
        image_id, cycle = entries[rec.id]
        if image_id not in dataset or isinstance(cycle, bool) or not isinstance(cycle, int):
            raise RunError(f"{path}: image {image_id!r} (cycle {cycle!r}) is not an image of the dataset; {hint}")
        store[image_id] = (cycle, rec.target)
    return store


def write_labels(path: str | os.PathLike[str], dataset: Dataset, store: Mapping[ImageId, tuple[int, Target]]) -> None:
    """Write the labels file atomically: a COCO file whose images keep their dataset id in
    ``mgral_id`` (COCO ids are ``1..N``) and their cycle in ``mgral_cycle``."""
    from mgral.data.coco import to_coco_dict

    ids = sorted(store, key=lambda i: (store[i][0], str(type(i)), i))
    records = [
        ImageRecord(n, dataset[i].file_name, dataset[i].width, dataset[i].height, target=store[i][1])
        for n, i in enumerate(ids, start=1)
    ]
    obj = to_coco_dict(Dataset(dataset.root, dataset.categories, records))
    for entry, i in zip(obj["images"], ids, strict=True):
        entry["mgral_id"], entry["mgral_cycle"] = i, store[i][0]
    atomic_write_json(path, obj)


def same_boxes(a: Target, b: Target) -> bool:
    if len(a) != len(b):
        return False

    def rows(t: Target) -> np.ndarray:
        r = np.concatenate([t.labels[:, None].astype(np.float64), t.boxes.astype(np.float64)], axis=1)
        return r[np.lexsort(r.T[::-1])]

    return bool(np.allclose(rows(a), rows(b), atol=0.05))
