"""The torchvision adapter: the reference implementation of the ``Detector`` protocol.

Strategies never see which model runs: they get ``Detections`` per image id (boxes,
scores, category-id labels, each kept box's full class distribution, an image
embedding). The model's class indices are ``0 = background`` and ``1..K`` = the dataset's
categories in ``dataset.categories`` order; the adapter maps them to category ids.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgral.data.records import Category, Dataset, Detections, ImageId
from mgral.detectors.models import PRESETS, build_model
from mgral.detectors.postprocess import keep_class_probabilities
from mgral.detectors.training import (
    DetectionData,
    derive_seed,
    dist_info,
    load_image,
    load_state,
    make_config,
    maybe_init_distributed,
    only_ignored_boxes,
    save_state,
    train,
)
from mgral.errors import CheckpointError, ConfigError, DatasetError
from mgral.progress import bar

CHECKPOINT_FORMAT = 1
MODEL_KEYS = ("model", "format", "preset", "params", "categories")
"""What a model file (``save``) holds; an epoch checkpoint (``last.pt``) adds ``RESUME_KEYS``."""
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "iteration")


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: CUDA when present (this rank's GPU under torchrun), else CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


class TorchvisionDetector:
    """A torchvision detection model built from a named preset.

    Args:
        preset: registry name (``mgral list detectors``).
        categories: the dataset's categories, in order (class index k+1 = categories[k]).
        weights: optional local weights file (a state dict; class-dependent head layers
            that do not match are left freshly initialised).
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` (default).
        seed: initialisation and training seed.
        train: training overrides on top of the preset's defaults (see ``TrainConfig``).
        params: flat preset parameters (e.g. ``pretrained=False``).
    """

    kind = "torchvision"  # its name in mgral.detectors.KINDS

    def __init__(
        self,
        preset: str,
        categories: Sequence[Category],
        *,
        weights: str | Path | None = None,
        device: str | None = None,
        seed: int = 0,
        train: dict[str, Any] | None = None,
        **params: Any,
    ) -> None:
        self.preset, self.categories, self.params = preset, list(categories), params
        self.seed, self.train_overrides = seed, dict(train or {})
        if not self.categories:
            raise ConfigError("a detector needs at least one category")
        self.device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0, 3))
            self.model = keep_class_probabilities(
                build_model(preset, len(self.categories) + 1, weights=weights, **params)
            )
        self.model.to(self.device)
        self.class_ids = np.array([c.id for c in self.categories], dtype=np.int64)

    # -- the kind's side of the protocol (mgral.detectors.base) ----------------------------------
    @classmethod
    def from_config(
        cls, spec: Any, categories: Sequence[Category], *, seed: int, train: dict[str, Any]
    ) -> TorchvisionDetector:
        """A fresh detector from a config's ``detector`` section."""
        params = spec.params
        return cls(spec.preset, categories, weights=spec.weights, device=spec.device, seed=seed, train=train, **params)

    @classmethod
    def check_config(cls, spec: Any, categories: Sequence[Category], trainings: Sequence[dict[str, Any]]) -> None:
        """Refuse an unknown preset, a bad parameter or weights file, an invalid training
        setting, an unknown device. Builds the model once, on the CPU, and trains nothing."""
        preset = PRESETS.get(spec.preset)
        for overrides in trainings:
            make_config(preset.train_defaults, overrides)
        resolve_device(spec.device)
        with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
            build_model(spec.preset, len(categories) + 1, weights=spec.weights, **spec.params)

    @classmethod
    def capabilities(cls, spec: Any) -> frozenset[str]:
        head = {"head_cache"} if PRESETS.get(spec.preset).head_cache else set()
        return frozenset({"augment", "clone", "self_training", *head})

    def start_from(self, other: TorchvisionDetector) -> None:
        """Take ``other``'s weights (same preset and categories)."""
        self.model.load_state_dict(other.model.state_dict())

    @property
    def class_index(self) -> dict[int, int]:
        return {int(c): i + 1 for i, c in enumerate(self.class_ids)}

    # -- training ---------------------------------------------------------------------------
    def fit(
        self,
        dataset: Dataset,
        image_ids: Sequence[ImageId],
        *,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Train on ``image_ids`` of ``dataset``; return a summary (losses per epoch, ...).

        Images without boxes are valid negative samples. A category missing from the
        labeled set is fine (its head is trained on negatives only). Writes
        ``checkpoint_dir/last.pt`` after every epoch (atomically) when given; ``resume``
        continues from it.

        Raises:
            ConfigError: empty ``image_ids``, invalid settings, diverged training.
            DatasetError: unknown category in a target, unreadable image (unless
                ``on_bad_image='skip'``).
        """
        self._check_categories(dataset)
        config = self.train_config(**overrides)
        ids = list(image_ids)
        if config.ignored_boxes == "skip":
            ids = [i for i in ids if not only_ignored_boxes(dataset[i].target)]
            if image_ids and not ids:
                raise ConfigError(
                    f"all {len(image_ids)} training images carry only difficult or crowd boxes, which training "
                    "leaves out by default; label more images, or set detector.train.ignored_boxes: train"
                )
        distributed = maybe_init_distributed(self.device)
        data = DetectionData(
            dataset,
            ids,
            self.class_index,
            hflip=config.hflip,
            scale_jitter=config.scale_jitter,
            seed=config.seed,
            on_bad_image=config.on_bad_image,
            ignored_boxes=config.ignored_boxes,
        )
        ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
        resume_state = None
        if resume and ckpt_path is not None and ckpt_path.is_file():
            resume_state = load_state(ckpt_path, MODEL_KEYS + RESUME_KEYS)
            self._check_meta(resume_state, ckpt_path)

        def checkpoint(epoch: int, state: dict[str, Any]) -> None:
            if ckpt_path is not None:
                save_state(ckpt_path, {**state, **self._meta()})

        with torch.random.fork_rng(devices=[]):
            summary = train(
                self.model,
                data,
                config,
                device=self.device,
                checkpoint=checkpoint,
                resume_state=resume_state,
            )
        if distributed:
            torch.distributed.barrier()
        if len(ids) < len(image_ids):
            summary["images_with_only_ignored_boxes"] = len(image_ids) - len(ids)
        return summary

    def train_config(self, **overrides: Any) -> Any:
        """The resolved training settings (``TrainConfig``): the preset's defaults, this
        detector's overrides, then ``overrides``."""
        defaults = {**PRESETS.get(self.preset).train_defaults, "seed": self.seed}
        return make_config(defaults, self.train_overrides, overrides)

    def consistency_loss(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
        """Flip consistency of the model's dense outputs on ``images`` (capability
        ``self_training``), and which head it used (:mod:`mgral.detectors.consistency`)."""
        from mgral.detectors.consistency import consistency_loss

        return consistency_loss(self.model, images)

    # -- inference --------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        dataset: Dataset,
        image_ids: Sequence[ImageId],
        *,
        batch_size: int = 8,
        embeddings: bool = True,
        on_bad_image: str = "raise",
        progress: bool | str = False,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[ImageId, Detections]:
        """Detections (with class distributions and, if asked, embeddings) per image id.

        ``progress``: show a bar (:func:`mgral.progress.bar`) named ``predict``, or named by
        the string given (e.g. a strategy's ``CALD view flip``).

        ``augment`` maps each loaded image (float ``[3, H, W]`` in ``[0, 1]``) to the view the
        model sees (a flip, a rescale, a colour change); boxes are then in that view's pixel
        coordinates. Strategies use it for test-time views (flip consistency, CALD).

        Under torchrun each rank predicts its shard (every ``world``-th image) and the
        shards are gathered, so every rank returns the whole result.
        """
        self._check_categories(dataset)
        ids = list(image_ids)
        rank, world = dist_info()
        mine = ids[rank::world]
        self.model.eval()
        pooled: list[torch.Tensor] = []
        hook = self.model.backbone.register_forward_hook(lambda m, a, out: pooled.append(_pool(out)))
        out: dict[ImageId, Detections] = {}
        name = progress if isinstance(progress, str) else "predict"
        try:
            with bar(name, len(mine), enabled=bool(progress) and rank == 0) as steps:
                for start in range(0, len(mine), batch_size):
                    batch_ids, images = [], []
                    for i in mine[start : start + batch_size]:
                        try:
                            image = load_image(dataset, i)
                            images.append((augment(image) if augment is not None else image).to(self.device))
                            batch_ids.append(i)
                        except DatasetError:
                            if on_bad_image == "raise":
                                raise
                    pooled.clear()
                    results = self.model(images) if images else []
                    emb = pooled[0].cpu().numpy() if pooled else None
                    for k, (i, res) in enumerate(zip(batch_ids, results, strict=True)):
                        out[i] = self._to_detections(res, emb[k] if (embeddings and emb is not None) else None)
                    steps.advance(len(mine[start : start + batch_size]))
        finally:
            hook.remove()
        if world > 1:
            gathered: list[dict] = [None] * world  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, out)
            out = {i: d for part in gathered for i, d in part.items()}
        return {i: out[i] for i in ids if i in out}

    def embed(self, dataset: Dataset, image_ids: Sequence[ImageId], **kwargs: Any) -> dict[ImageId, np.ndarray]:
        """One pooled backbone feature vector per image (float32 ``[D]``)."""
        preds = self.predict(dataset, image_ids, embeddings=True, **kwargs)
        return {i: d.embedding for i, d in preds.items()}

    def evaluate(self, dataset: Dataset, image_ids: Sequence[ImageId], *, style: str = "coco", **kwargs: Any):
        """Predict ``image_ids`` and score them with ``mgral.evaluation.evaluate``."""
        from mgral.evaluation import evaluate

        preds = self.predict(dataset, image_ids, embeddings=False, **kwargs)
        return evaluate(dataset.subset(image_ids), preds, style=style)

    def _to_detections(self, res: dict[str, torch.Tensor], embedding: np.ndarray | None) -> Detections:
        labels = res["labels"].cpu().numpy()
        return Detections(
            boxes=res["boxes"].float().cpu().numpy(),
            scores=res["scores"].float().cpu().numpy(),
            labels=self.class_ids[labels - 1] if len(labels) else labels,
            probs=res["probs"].float().cpu().numpy() if "probs" in res else None,
            embedding=embedding,
            num_candidates=res.get("num_candidates"),
        )

    # -- persistence ------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "preset": self.preset,
            "params": dict(self.params),
            "categories": [[c.id, c.name] for c in self.categories],
            "seed": self.seed,
        }

    def _check_meta(self, state: dict[str, Any], path: Path) -> None:
        want = self._meta()
        for key in ("preset", "categories"):
            if state.get(key) != want[key]:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} was made for {key} {state.get(key)!r}, "
                    f"but this detector has {want[key]!r}"
                )

    def _check_categories(self, dataset: Dataset) -> None:
        if [c.id for c in dataset.categories] != self.class_ids.tolist():
            raise ConfigError(
                f"the dataset's categories {[c.name for c in dataset.categories]} differ from the detector's "
                f"{[c.name for c in self.categories]}; build the detector from this dataset's categories"
            )

    def save(self, path: str | Path) -> None:
        """Write the model and what is needed to rebuild it (atomic; loads with weights_only)."""
        save_state(Path(path), {"model": self.model.state_dict(), **self._meta()})

    def to_bytes(self) -> bytes:
        """The model and its metadata as ``save`` writes them (to ship to a worker process)."""
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), **self._meta()}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, device: str | None = None) -> TorchvisionDetector:
        """Rebuild a detector from ``to_bytes`` (tensors and plain data only)."""
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls._from_state(state, "<bytes>", device)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> TorchvisionDetector:
        """Rebuild a detector saved by ``save`` (or an epoch checkpoint of ``fit``).

        Raises:
            CheckpointError: corrupt file, unknown format, or weights that do not fit.
        """
        return cls._from_state(load_state(Path(path), MODEL_KEYS), path, device)

    @classmethod
    def _from_state(cls, state: dict[str, Any], path: str | Path, device: str | None) -> TorchvisionDetector:
        if state.get("format") != CHECKPOINT_FORMAT or "preset" not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} has no mgral metadata (format {state.get('format')!r})")
        try:
            categories = [Category(int(i), str(n)) for i, n in state["categories"]]
            det = cls(state["preset"], categories, device=device, seed=int(state.get("seed", 0)), **state["params"])
            det.model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, ValueError, ConfigError) as err:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit its model: {str(err).splitlines()[0]}"
            ) from err
        return det


def _pool(features: Any) -> torch.Tensor:
    """Global average pool of every feature map, concatenated: ``[B, sum(C_l)]``."""
    maps = list(features.values()) if isinstance(features, dict) else [features]
    return torch.cat([m.mean(dim=(-2, -1)) for m in maps], dim=1)
