"""One selection from the user's own model: the next batch to label, without a loop.

A team that trains with its own framework (Ultralytics, Detectron2, MMDetection, ...) runs
its model over the pool, dumps COCO results (and, optionally, one embedding per image), and
asks mgral which images to label next::

    import mgral

    dataset = mgral.read_dataset("data/")                    # COCO / VOC / YOLO
    labeled = mgral.read_id_list("labeled.txt", dataset)
    predictions = mgral.read_predictions("preds.json", dataset, match="auto")
    batch = mgral.select_batch(dataset, labeled, "least_confidence", 50, predictions=predictions)
    print(batch.image_ids)

``mgral select`` is the same on the command line. A strategy that needs more than files can
give (CALD's predictions under extra views, MGRAL's surrogate fine-tunes) is refused with
what it needs.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgral.data._files import read_regular_file
from mgral.data.records import Dataset, Detections, ImageId, find_id
from mgral.errors import ConfigError, DatasetError
from mgral.strategies import STRATEGIES, Selection, SelectionContext, build_strategy, selection_rng

EVALUATION_SPLITS = ("val", "test")
"""Splits left out of the pool by default: images kept for measuring the model."""


def read_embeddings(path: str | os.PathLike[str], dataset: Dataset) -> dict[ImageId, np.ndarray]:
    """Per-image embeddings from an ``.npz`` file.

    Two layouts are read: arrays ``ids`` ``[N]`` and ``embeddings`` ``[N, D]``, or one
    array ``[D]`` per image named by its id (``str(id)``). Ids are matched as written, then
    as integers (``"17"`` finds COCO id 17).

    Raises:
        DatasetError: naming the file: unreadable, not an npz, an unknown id, a vector that
            is not 1-D, not finite, or of another length than the others.
    """
    source = str(path)
    try:
        data = read_regular_file(path, expected="an .npz file of per-image vectors")  # a FIFO would block np.load
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a plain .npy array
            raise ValueError(f"one array of shape {np.shape(loaded)}, not named arrays")
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DatasetError(
            f"{source}: cannot read embeddings ({err}); expected an .npz file of per-image vectors"
        ) from err
    if "ids" in arrays and "embeddings" in arrays:
        ids, matrix = arrays["ids"], arrays["embeddings"]
        if ids.ndim != 1 or matrix.ndim != 2 or len(ids) != len(matrix):
            raise DatasetError(
                f"{source}: expected 'ids' [N] and 'embeddings' [N, D], got shapes {ids.shape} and {matrix.shape}"
            )
        pairs: Iterable[tuple[Any, np.ndarray]] = zip(ids.tolist(), matrix, strict=True)
    else:
        pairs = arrays.items()
    out: dict[ImageId, np.ndarray] = {}
    width = None
    for key, vector in pairs:
        image_id = find_id(key, dataset)
        if image_id is None:
            raise DatasetError(f"{source}: {key!r:.60} is not an image id of the dataset")
        vector = np.asarray(vector)
        if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.number) or not np.isfinite(vector).all():
            raise DatasetError(f"{source}: the embedding of image {key!r} is not a finite 1-D vector ({vector.shape})")
        if width is not None and len(vector) != width:
            raise DatasetError(f"{source}: the embedding of image {key!r} has {len(vector)} values, the others {width}")
        width = len(vector)
        out[image_id] = vector.astype(np.float32)
    return out


def default_pool(dataset: Dataset, labeled: Iterable[ImageId], splits: Sequence[str] | None = None) -> list[ImageId]:
    """The images that may be selected: those of ``splits`` (default: every image outside
    :data:`EVALUATION_SPLITS`) that are not labeled, in dataset order."""
    done = set(labeled)
    if splits is None:
        return [i for i, r in dataset.images.items() if r.split not in EVALUATION_SPLITS and i not in done]
    wanted = set(splits)
    return [i for i, r in dataset.images.items() if r.split in wanted and i not in done]


def select_batch(
    dataset: Dataset,
    labeled: Iterable[ImageId],
    strategy: str,
    budget: int,
    *,
    predictions: Mapping[ImageId, Detections] | None = None,
    embeddings: Mapping[ImageId, np.ndarray] | None = None,
    params: Mapping[str, Any] | None = None,
    pool: Sequence[ImageId] | None = None,
    seed: int = 0,
    cycle: int = 0,
) -> Selection:
    """The next ``budget`` images to label, chosen by registered ``strategy`` from files.

    Args:
        dataset: the images (their labels are not read: only ids, sizes and categories).
        labeled: ids labeled so far; never selected.
        predictions: image id -> the user's model's detections; a pool image without an
            entry has no detections (not an error).
        embeddings: image id -> float ``[D]`` for every pool and labeled image, for the
            strategies that need them (``core_set``).
        params: the strategy's parameters.
        pool: the selectable ids (default :func:`default_pool`); labeled ids are removed.
        seed, cycle: the random stream, as the loop derives it (same inputs, same batch).

    Raises:
        ConfigError: an unknown strategy or parameter, a strategy that needs a trained
            detector (it says which), missing predictions or embeddings, an empty pool.
    """
    built = build_strategy(strategy, **dict(params or {}))
    needs = built.requires
    if "detector" in needs or "oracle" in needs:
        able = ", ".join(n for n in STRATEGIES.names() if not STRATEGIES.get(n).requires & {"detector", "oracle"})
        raise ConfigError(
            f"strategy {strategy!r} needs the trained detector itself (it predicts images again, or fine-tunes it), "
            f"which files cannot give; from predictions and embeddings, choose one of: {able}. "
            "Or run it in mgral's own loop (mgral run) with a torchvision detector"
        )
    labeled = list(labeled)
    done = set(labeled)
    pool = [i for i in (default_pool(dataset, labeled) if pool is None else pool) if i not in done]
    if "predictions" in needs:
        if predictions is None:
            raise ConfigError(
                f"strategy {strategy!r} ranks by the model's detections: pass predictions (--predictions)"
            )
        predictions = {i: predictions.get(i, Detections()) for i in pool}
    if "embeddings" in needs:
        if embeddings is None:
            raise ConfigError(f"strategy {strategy!r} needs one embedding per image: pass embeddings (--embeddings)")
        missing = [i for i in [*pool, *labeled] if i not in embeddings]
        if missing:
            raise ConfigError(
                f"strategy {strategy!r} needs an embedding of every pool and labeled image; {len(missing)} have none "
                f"(e.g. image {missing[0]!r})"
            )
    context = SelectionContext(
        dataset=dataset,
        pool_ids=pool,
        labeled_ids=labeled,
        rng=selection_rng(seed, cycle),
        cycle=cycle,
        predictions=predictions,
        embeddings=embeddings,
    )
    return built.select(context, budget)


def write_id_list(path: str | os.PathLike[str], ids: Sequence[ImageId]) -> None:
    """One id a line (what :func:`mgral.data.records.read_id_list` reads), atomically."""
    from mgral._io import atomic_write_text

    atomic_write_text(Path(path), "".join(f"{i}\n" for i in ids))
