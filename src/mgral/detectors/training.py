"""Training of torchvision detectors: data, schedule, checkpoints, resume, DDP.

One entry point, ``train``, runs in a single process or under ``torchrun`` (then each
rank trains on its shard through ``DistributedSampler`` inside ``DistributedDataParallel``
and rank 0 alone writes checkpoints). On CPU a seed makes training deterministic on one
machine (another CPU's kernels, e.g. AVX2 or not, round differently and give another model): the
model's initialisation, the shuffling, the augmentation and torchvision's multi-scale
choice all draw from generators seeded from ``(seed, epoch)``, so a run resumed from an
epoch checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mgral._io import atomic_write_bytes
from mgral.data.records import Dataset, ImageId, Target, describe_image
from mgral.errors import CheckpointError, ConfigError, DatasetError
from mgral.progress import bar


class TrainConfig(BaseModel):
    """Training settings (validated; unknown keys are refused).

    Exactly one of ``epochs`` / ``iterations`` sets the length; ``epochs`` makes it follow the
    number of training images, and ``min_iterations`` is a floor on it (a few epochs of a small
    labeled set are otherwise a handful of steps). The learning rate warms up
    linearly over ``warmup_iters`` then follows ``schedule`` (``cosine`` to zero, ``step``
    by ``gamma`` at the fractions ``milestones`` of the run, or ``constant``).
    ``ignored_boxes``: ``skip`` (default) leaves VOC ``difficult`` and COCO ``iscrowd`` boxes
    out of training, and images that carry only such boxes; ``train`` trains on them as
    ordinary boxes. Evaluation ignores them either way.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1)
    iterations: int | None = Field(default=None, ge=1)
    min_iterations: int = Field(default=0, ge=0)
    batch_size: int = Field(default=4, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_iters: int = Field(default=50, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[float, ...] = (0.67, 0.89)
    gamma: float = Field(default=0.1, gt=0)
    grad_clip: float | None = Field(default=10.0, gt=0)
    hflip: float = Field(default=0.5, ge=0, le=1)
    scale_jitter: tuple[float, float] | None = (0.8, 1.25)
    amp: bool | None = None
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)
    on_bad_image: Literal["raise", "skip"] = "raise"
    progress: bool = True
    ignored_boxes: Literal["skip", "train"] = "skip"

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if self.epochs is None and self.iterations is None:
            self.epochs = 10
        if self.epochs is not None and self.iterations is not None:
            raise ValueError("set either epochs or iterations, not both")
        return self


def make_config(*layers: dict[str, Any]) -> TrainConfig:
    """Merge settings layers (preset defaults, then detector settings, then call overrides)
    and validate. A layer that sets ``epochs`` or ``iterations`` replaces the other one set by
    an earlier layer; a ``None`` length counts as not set. Any other ``None`` is a value:
    ``scale_jitter: null`` turns scale jitter off, ``grad_clip: null`` clipping, ``amp: null``
    means automatic (where ``None`` is not valid for a key, validation says so).

    Raises:
        ConfigError: unknown keys (the valid ones listed) or invalid values.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        given = {k: v for k, v in layer.items() if v is not None or k not in ("epochs", "iterations")}
        for a, b in (("epochs", "iterations"), ("iterations", "epochs")):
            if a in given and b not in given:
                merged.pop(b, None)
        merged.update(given)
    try:
        return TrainConfig(**merged)
    except ValueError as err:
        errors = getattr(err, "errors", lambda: [])()
        lines = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in errors] or [str(err)]
        if any(e["type"] == "extra_forbidden" for e in errors):
            lines.append(f"valid keys: {', '.join(TrainConfig.model_fields)}")
        raise ConfigError("invalid training settings: " + "; ".join(lines)) from err


# -- data ----------------------------------------------------------------------------------


def trainable_boxes(target: Target, ignored_boxes: str = "skip") -> tuple[np.ndarray, np.ndarray]:
    """The boxes and category ids a detector trains on.

    ``skip`` leaves out VOC ``difficult`` and COCO ``iscrowd`` boxes, as torchvision's
    detection references (crowd), Detectron2 (crowd), MMDetection (both, as ignored boxes)
    and ssd.pytorch (``keep_difficult=False``) do; the AP protocols ignore them too.
    ``train`` keeps them as ordinary boxes.
    """
    if ignored_boxes == "train":
        return target.boxes, target.labels
    keep = ~(target.difficult | target.iscrowd)
    return target.boxes[keep], target.labels[keep]


def only_ignored_boxes(target: Target) -> bool:
    """True when the image has boxes and every one is difficult or crowd: with ``skip``,
    training on it as an empty (background) image would teach that its objects are not there."""
    return len(target.boxes) > 0 and bool((target.difficult | target.iscrowd).all())


def load_image(dataset: Dataset, image_id: ImageId) -> torch.Tensor:
    """Decode an image to a float ``[3, H, W]`` tensor in ``[0, 1]``.

    Raises:
        DatasetError: the file is missing, does not decode, or its size differs from the
            record's (naming the image id and path).
    """
    from PIL import Image, UnidentifiedImageError

    rec = dataset[image_id]
    path = dataset.root / rec.file_name
    where = f"{describe_image(image_id, rec.file_name)} at {path}"
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{where} could not be decoded ({err}); fix or remove the file") from err
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DatasetError(f"{where} decoded to an empty image of shape {arr.shape}")
    if (arr.shape[1], arr.shape[0]) != (rec.width, rec.height):
        raise DatasetError(
            f"{where} is {arr.shape[1]}x{arr.shape[0]} but the annotations say {rec.width}x{rec.height}; "
            "fix the width/height in the annotation file"
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class DetectionData(torch.utils.data.Dataset):
    """Images and targets of ``image_ids`` as torchvision detection inputs.

    Targets carry ``labels`` as class indices ``1..K`` (``class_index`` maps category id ->
    index). Horizontal flips draw from a generator seeded by ``(seed, epoch, position)``.
    Unreadable images raise, or yield ``None`` (skipped by the collate) when
    ``on_bad_image='skip'``.
    """

    def __init__(
        self,
        dataset: Dataset,
        image_ids: Sequence[ImageId],
        class_index: dict[int, int],
        *,
        hflip: float = 0.0,
        scale_jitter: tuple[float, float] | None = None,
        seed: int = 0,
        on_bad_image: str = "raise",
        ignored_boxes: str = "skip",
    ) -> None:
        self.dataset, self.image_ids, self.class_index = dataset, list(image_ids), class_index
        self.hflip, self.scale_jitter, self.ignored_boxes = hflip, scale_jitter, ignored_boxes
        self.seed, self.on_bad_image, self.epoch = seed, on_bad_image, 0
        self.bad: list[str] = []

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        try:
            image = load_image(self.dataset, image_id)
        except DatasetError as err:
            if self.on_bad_image == "raise":
                raise
            warnings.warn(f"skipping: {err}", stacklevel=2)
            self.bad.append(str(err))
            return None
        raw_boxes, raw_labels = trainable_boxes(self.dataset[image_id].target, self.ignored_boxes)
        boxes = torch.from_numpy(raw_boxes.copy())
        labels = torch.tensor([self.class_index[int(c)] for c in raw_labels], dtype=torch.int64)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, i, 0))
        if self.hflip > 0 and torch.rand((), generator=g).item() < self.hflip:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        if self.scale_jitter is not None:
            image, boxes, labels = rescale_in_canvas(image, boxes, labels, self.scale_jitter, g)
        return image_id, image, {"boxes": boxes.reshape(-1, 4), "labels": labels}


def rescale_in_canvas(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scale_range: tuple[float, float],
    generator: torch.Generator,
    *,
    min_visible: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale augmentation that keeps the image size: zoom by a random factor, then pad
    (zoom out) or crop (zoom in) back to the original canvas at a random offset.

    Input sizes stay fixed on purpose: torchvision's own multi-scale training changes the
    tensor shape every batch, and on CPU each new shape rebuilds the convolution kernels
    (about 5x slower per iteration here). Boxes less than ``min_visible`` inside the
    canvas after a crop are dropped.
    """
    lo, hi = scale_range
    s = lo + (hi - lo) * torch.rand((), generator=generator).item()
    _, h, w = image.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    resized = torch.nn.functional.interpolate(
        image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=s < 1
    )[0]
    scaled = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    if s < 1:
        ox = int(torch.randint(0, w - nw + 1, (), generator=generator))
        oy = int(torch.randint(0, h - nh + 1, (), generator=generator))
        canvas = image.mean(dim=(1, 2), keepdim=True).expand(-1, h, w).clone()
        canvas[:, oy : oy + nh, ox : ox + nw] = resized
        return canvas, scaled + torch.tensor([ox, oy, ox, oy]), labels
    ox = int(torch.randint(0, nw - w + 1, (), generator=generator))
    oy = int(torch.randint(0, nh - h + 1, (), generator=generator))
    shifted = scaled - torch.tensor([ox, oy, ox, oy])
    clipped = torch.stack(
        [shifted[:, 0].clamp(0, w), shifted[:, 1].clamp(0, h), shifted[:, 2].clamp(0, w), shifted[:, 3].clamp(0, h)], 1
    )
    keep = (_area(clipped) >= min_visible * _area(shifted)) & (_area(clipped) > 1.0)
    return resized[:, oy : oy + h, ox : ox + w], clipped[keep], labels[keep]


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes, unlike ``hash`` of strings)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def collate(batch):
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]


# -- schedule and checkpoints ----------------------------------------------------------------


def lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / config.warmup_iters) if config.warmup_iters else 1.0
        frac = it / max(total, 1)
        if config.schedule == "cosine":
            sched = 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        elif config.schedule == "step":
            sched = config.gamma ** sum(frac >= m for m in config.milestones)
        else:
            sched = 1.0
        return warm * sched

    return factor


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` into memory, then an atomic write: a crash never leaves half a file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


CHECKPOINT_HINT = "expected a checkpoint written by mgral train or mgral run"


def load_state(path: Path, required: Sequence[str] = ("model",)) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only).

    ``required``: the keys the state must have.

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, one that needs unpickling
            code, or one without a ``required`` key (naming the file and what is wrong).
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle stream). Telling other
    # bytes apart here gives a clear message: torch's own errors for them can be empty or
    # advise loading with weights_only=False, which a broken file never needs.
    if size == 0 or not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        what = "0 bytes: an interrupted write or a full disk" if size == 0 else f"{size} bytes, starting {head!r}"
        raise CheckpointError(f"{where}: not a torch checkpoint ({what}); {CHECKPOINT_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = (str(err).strip().splitlines() or ["no details"])[0].split(". ")[0][:300]  # torch's first sentence
        raise CheckpointError(
            f"{where} could not be loaded ({type(err).__name__}: {first}); it is truncated or corrupt, or holds "
            f"more than tensors and plain data; {CHECKPOINT_HINT}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not an mgral checkpoint; {CHECKPOINT_HINT}")
    missing = [k for k in required if k not in state]
    if missing:
        keys = ", ".join(repr(k) for k in missing)
        raise CheckpointError(f"{where} is missing key {keys}; {CHECKPOINT_HINT}")
    return state


# -- the loop --------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def maybe_init_distributed(device: torch.device) -> bool:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def schedule_length(config: TrainConfig, images: int, world: int = 1) -> int:
    """Optimizer steps of one training on ``images`` images over ``world`` processes:
    ``iterations``, or ``epochs`` passes of ``ceil(images / (batch_size * world))`` steps,
    and at least ``min_iterations``."""
    per_epoch = max(1, math.ceil(images / (config.batch_size * world)))
    length = config.iterations if config.iterations is not None else config.epochs * per_epoch
    return max(length, config.min_iterations)


def train(
    model: nn.Module,
    data: DetectionData,
    config: TrainConfig,
    *,
    device: torch.device,
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    resume_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; return a summary (``losses`` per epoch, ``iterations``).

    ``checkpoint(epoch, state)`` is called by rank 0 after every epoch with the full
    training state; ``resume_state`` (such a state) continues from the epoch after it.
    """
    rank, world = dist_info()
    n = len(data)
    if n == 0:
        raise ConfigError("cannot train on an empty set of images; label some images first")
    per_epoch = max(1, math.ceil(n / (config.batch_size * world)))
    total = schedule_length(config, n, world)
    epochs = math.ceil(total / per_epoch)

    model.to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total))
    use_amp = bool(config.amp) if config.amp is not None else device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    start_epoch, iteration, losses, seen = 0, 0, [], 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch, iteration = int(resume_state["epoch"]) + 1, int(resume_state["iteration"])
        losses = list(resume_state.get("losses", []))

    with bar("train", total, enabled=config.progress and rank == 0, completed=iteration) as progress:
        for epoch in range(start_epoch, epochs):
            if iteration >= total:
                break
            data.epoch = epoch
            torch.manual_seed(derive_seed(config.seed, epoch, 1))  # torchvision draws its multi-scale choice here
            if world > 1:
                sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=config.seed)
                sampler.set_epoch(epoch)
            else:
                g = torch.Generator().manual_seed(derive_seed(config.seed, epoch, 2))
                sampler = torch.utils.data.RandomSampler(data, generator=g)
            loader = torch.utils.data.DataLoader(
                data, batch_size=config.batch_size, sampler=sampler, collate_fn=collate, num_workers=config.num_workers
            )
            net.train()
            epoch_loss, batches = 0.0, 0
            for _, images, targets in loader:
                if iteration >= total:
                    break
                if not images:
                    continue
                images = [im.to(device) for im in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                ctx = torch.autocast(device.type) if use_amp else nullcontext()
                with ctx:
                    loss_dict = net(images, targets)
                    loss = sum(loss_dict.values())
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"training diverged at iteration {iteration} (loss {loss.item()}); lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                value = float(loss.detach())
                epoch_loss += value
                batches += 1
                seen += len(images)
                progress.advance(description=f"train epoch {epoch + 1}/{epochs}", info=f"loss {value:.3f}")
            losses.append(epoch_loss / max(batches, 1))
            if checkpoint is not None and rank == 0:
                checkpoint(
                    epoch,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "iteration": iteration,
                        "losses": losses,
                    },
                )
            if world > 1:
                torch.distributed.barrier()
    if world > 1:
        # Gradients are all-reduced but buffers (BatchNorm running statistics) drift per rank
        # after the last forward; every rank takes rank 0's, which is what rank 0 checkpoints.
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    return {
        "losses": losses,
        "iterations": iteration,
        "epochs": epochs,
        "images_seen": seen,  # by this rank, in this call (not before a resume)
        "bad_images": list(data.bad),
    }
