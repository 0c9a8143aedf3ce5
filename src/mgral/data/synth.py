"""The built-in dataset: scenes of real handwritten digits on cluttered backgrounds.

Generated, never downloaded. The digits are the 1797 8x8 grey-level (0..16) images of the
UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin and C. Kaynak, 1998),
as shipped inside scikit-learn (:func:`sklearn.datasets.load_digits`). Each scene is a
square RGB image with a few digits, upscaled to varied sizes and composited in a random
ink colour onto a background made of a base colour, a smooth gradient, blurred blobs,
distractor strokes as thick as digit ink (lines, arcs, outlines) and pixel noise.

The 1797 samples of each class are divided between the train, val and test splits in the
split fractions, so the test scenes show handwriting no training scene contains.

Layout written by :func:`generate`::

    out_dir/annotations.json              COCO, with each image's "split"
    out_dir/images/<split>/<id:05d>.png   image ids 1..N, train first, then val, then test

Boxes follow :mod:`mgral.data.records`: the tight box of the visible ink (normalized ink
intensity >= ``INK_THRESHOLD``) in the continuous pixel frame (``x2`` = last column + 1).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mgral._io import atomic_directory
from mgral.data import coco
from mgral.data._layout import OutputExistsError
from mgral.data.records import SPLITS, Category, Dataset, ImageRecord, Target
from mgral.errors import ConfigError

ANNOTATIONS_FILE = coco.ANNOTATIONS_FILE
INK_THRESHOLD = 0.25
"""Normalized ink intensity (0..1, before opacity) from which a pixel counts as ink."""

_MAX_IOU = 0.1
_MAX_COVERED = 0.25  # of the smaller box: keeps a small digit from sitting inside a big one
_PLACEMENT_TRIES = 10
_MIN_INK_DISTANCE = 90.0  # RGB distance between ink and the background under it
_PAD = 1  # zero source pixels around each 8x8 digit, so upscaled strokes fade out


@dataclass(frozen=True)
class SynthConfig:
    """How many scenes, how big, how many digits, how hard.

    ``min_digit_size``/``max_digit_size`` are the rendered height in pixels of a digit's
    8x8 source frame (the ink box is about that tall); widths are 0.8-1.0 times the height.
    ``imbalance`` is the ratio of the most to the least frequent class (class ``k`` has
    probability proportional to ``imbalance ** (-k / (classes - 1))``). ``clutter`` scales
    noise, gradient and the number of distractors (0 = plain background).

    Raises:
        ConfigError: on construction, for any invalid value.
    """

    images: int = 600
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 6
    min_digit_size: int = 14
    max_digit_size: int = 40
    classes: int = 10
    imbalance: float = 1.0
    clutter: float = 1.0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int(self, "images", 3, why="one image per split at least")
        _check_int(self, "min_objects", 0)
        _check_int(self, "max_objects", 1)
        _check_int(self, "min_digit_size", 8, why="the source digits are 8x8; smaller ones are illegible")
        _check_int(self, "max_digit_size", 8)
        _check_int(self, "image_size", 8)
        _check_int(self, "classes", 1, 10, why="there are ten digits")
        _check_int(self, "seed", 0)
        _check_number(self, "imbalance", 1.0, why="it is the ratio of the most to the least frequent class")
        _check_number(self, "clutter", 0.0)
        if self.min_objects > self.max_objects:
            raise ConfigError(f"synth: min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        if self.min_digit_size > self.max_digit_size:
            raise ConfigError(f"synth: min_digit_size ({self.min_digit_size}) > max_digit_size ({self.max_digit_size})")
        needed = _frame_pixels(self.max_digit_size)
        if self.image_size < needed:
            raise ConfigError(
                f"synth: image_size ({self.image_size}) is too small for max_digit_size ({self.max_digit_size}); "
                f"a digit that tall needs {needed} pixels with its margin (raise image_size or lower max_digit_size)"
            )
        fractions = self.split_fractions
        if (
            not isinstance(fractions, (tuple, list))
            or len(fractions) != 3
            or not all(_is_number(f) and f > 0 for f in fractions)
        ):
            raise ConfigError(
                f"synth: split_fractions must be three positive numbers (train, val, test), got {fractions!r}"
            )
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(f"synth: split_fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions):g})")
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in fractions))


def _is_number(v: object) -> bool:
    return (
        not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)  # type: ignore[arg-type]
    )


def _check_int(config: SynthConfig, name: str, low: int, high: int | None = None, *, why: str = "") -> None:
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"synth: {name} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"synth: {name} must be {bound}, got {v}" + (f" ({why})" if why else ""))


def _check_number(config: SynthConfig, name: str, low: float, *, why: str = "") -> None:
    v = getattr(config, name)
    if not _is_number(v):
        raise ConfigError(f"synth: {name} must be a finite number, got {v!r}")
    if v < low:
        raise ConfigError(f"synth: {name} must be >= {low}, got {v}" + (f" ({why})" if why else ""))


@dataclass(frozen=True, eq=False)
class Scene:
    """One rendered image and its ground truth.

    Attributes:
        image: uint8 ``[H, W, 3]`` RGB.
        boxes: float32 ``[N, 4]`` xyxy pixels, the tight boxes of the visible ink.
        labels: int64 ``[N]`` category ids (digit + 1).
        alphas: float32 ``[N, H, W]`` each digit's normalized ink intensity (0..1) where it
            was placed; ``boxes[i]`` is the box of ``alphas[i] >= INK_THRESHOLD``.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    alphas: np.ndarray


def _frame_pixels(height: int) -> int:
    return math.ceil(height * (8 + 2 * _PAD) / 8)


def categories(config: SynthConfig) -> list[Category]:
    """Category ids ``1..classes``, named after their digit ``"0".."9"``."""
    return [Category(k + 1, str(k)) for k in range(config.classes)]


def class_probabilities(classes: int, imbalance: float) -> np.ndarray:
    """float64 ``[classes]``: ``p_k`` proportional to ``imbalance ** (-k / (classes - 1))``."""
    if classes == 1:
        return np.ones(1)
    p = float(imbalance) ** (-np.arange(classes) / (classes - 1))
    return p / p.sum()


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items in ``fractions`` (largest remainders), each part at least 1 when ``n >= len``."""
    raw = np.asarray(fractions, dtype=float) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    while n >= len(counts) and counts.min() == 0:
        counts[np.argmin(counts)] += 1
        counts[np.argmax(counts)] -= 1
    return counts.tolist()


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ink = bunch.images / bunch.images.max(axis=(1, 2), keepdims=True)
    return ink.astype(np.float32), bunch.target.astype(np.int64)


def _digit_pools(config: SynthConfig, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Per split, per class: the indices of the source digits that split may draw."""
    _, target = _digits()
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for k in range(config.classes):
        idx = rng.permutation(np.flatnonzero(target == k))
        bounds = np.cumsum(split_counts(len(idx), config.split_fractions))[:-1]
        for split, part in zip(SPLITS, np.split(idx, bounds), strict=True):
            pools[split].append(part)
    return pools


def _background(config: SynthConfig, rng: np.random.Generator) -> Image.Image:
    s, c = config.image_size, config.clutter
    base = rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:s, 0:s] / s - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    amplitude = rng.normal(0, 50, 3) * min(c, 2.0)
    pixels = base + ramp[..., None] * amplitude
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGBA")
    if c == 0:
        return image
    scale = c * (s / 128) ** 2

    def colour(low: int = 120) -> tuple[int, int, int, int]:
        r, g, b = rng.integers(0, 256, 3).tolist()
        return r, g, b, int(rng.integers(low, 256))

    def point() -> tuple[float, float]:
        return tuple(rng.uniform(-0.1 * s, 1.1 * s, 2).tolist())

    # Blobs are smooth: drawn and blurred at a quarter of the resolution, then upscaled.
    q = max(1, s // 4)
    blobs = Image.new("RGBA", (q, q))
    draw = ImageDraw.Draw(blobs)
    for _ in range(rng.poisson(2 * scale)):
        (x, y), (rx, ry) = point(), rng.uniform(0.05 * s, 0.25 * s, 2)
        draw.ellipse(tuple(v * q / s for v in (x - rx, y - ry, x + rx, y + ry)), fill=colour(60))
    blobs = blobs.filter(ImageFilter.GaussianBlur(float(rng.uniform(2, 8)) * q / s))
    image.alpha_composite(blobs.resize((s, s), Image.Resampling.BILINEAR))

    # Strokes as thick as digit ink (and arcs as curved), so thresholding alone cannot
    # tell digits from clutter.
    strokes = Image.new("RGBA", (s, s))
    draw = ImageDraw.Draw(strokes)
    digit = config.max_digit_size
    for _ in range(rng.poisson(2.5 * scale)):
        draw.line((point(), point()), fill=colour(), width=int(rng.integers(1, 7)))
    for _ in range(rng.poisson(2.5 * scale)):
        (x, y), (rx, ry) = point(), rng.uniform(0.15 * digit, 0.6 * digit, 2)
        start = float(rng.uniform(0, 360))
        draw.arc(
            (x - rx, y - ry, x + rx, y + ry),
            start,
            start + float(rng.uniform(60, 300)),
            fill=colour(),
            width=int(rng.integers(2, 7)),
        )
    for _ in range(rng.poisson(1.5 * scale)):
        (x, y), (w, h) = point(), rng.uniform(0.1 * s, 0.5 * s, 2)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + w, y + h), outline=colour(), width=int(rng.integers(1, 5)))
    image.alpha_composite(strokes)
    return image


def _digit_patch(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 ink intensity ``[h, w]`` of one 8x8 digit upscaled so its frame is ``height x width``."""
    padded = Image.fromarray(np.pad(digit, _PAD))
    size = (_frame_pixels(width), _frame_pixels(height))
    ink = np.asarray(padded.resize(size, Image.Resampling.BICUBIC))
    # Bicubic upscaling of 8x8 cells leaves wide soft ramps; a contrast stretch turns them
    # into pen-like strokes with short anti-aliased edges.
    ink = np.clip((ink - 0.15) / 0.45, 0.0, 1.0)
    x1, y1, x2, y2 = _tight_box(ink > 0)
    return np.ascontiguousarray(ink[y1:y2, x1:x2], dtype=np.float32)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """xyxy of the ``True`` pixels of a non-empty 2-D mask, ``x2``/``y2`` exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _ink_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour (float ``[3]``) at least ``_MIN_INK_DISTANCE`` from ``under``."""
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= _MIN_INK_DISTANCE:
            return colour
    return np.where(under > 127, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))


def _acceptable(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        areas = ((box[2:] - box[:2]).prod(), (other[2:] - other[:2]).prod())
        if inter / (sum(areas) - inter) > _MAX_IOU or inter / min(areas) > _MAX_COVERED:
            return False
    return True


def render_scene(config: SynthConfig, rng: np.random.Generator, pool: Sequence[np.ndarray]) -> Scene:
    """Render one scene, drawing the digits of class ``k`` from the source indices ``pool[k]``.

    Digits whose placement overlaps an earlier one too much (IoU > 0.1, or a quarter of the
    smaller box) are retried a few times, then left out: a scene may hold fewer than
    ``min_objects`` digits.
    """
    s = config.image_size
    sources, _ = _digits()
    pixels = np.asarray(_background(config, rng).convert("RGB"), dtype=np.float32)
    probs = class_probabilities(config.classes, config.imbalance)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    alphas: list[np.ndarray] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        k = int(rng.choice(config.classes, p=probs))
        height = int(rng.integers(config.min_digit_size, config.max_digit_size + 1))
        width = max(8, round(height * rng.uniform(0.8, 1.0)))
        ink = _digit_patch(sources[rng.choice(pool[k])], height, width)
        tight = np.asarray(_tight_box(ink >= INK_THRESHOLD), dtype=np.float32)
        ph, pw = ink.shape
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, s - pw + 1)), int(rng.integers(0, s - ph + 1))
            box = tight + np.array([x0, y0, x0, y0], dtype=np.float32)
            if _acceptable(box, boxes):
                break
        else:
            continue
        region = pixels[y0 : y0 + ph, x0 : x0 + pw]
        colour = _ink_colour(rng, region[ink >= INK_THRESHOLD].mean(axis=0))
        alpha = (ink * rng.uniform(0.8, 1.0))[..., None]
        region *= 1 - alpha
        region += alpha * colour
        full = np.zeros((s, s), dtype=np.float32)
        full[y0 : y0 + ph, x0 : x0 + pw] = ink
        boxes.append(box)
        labels.append(k + 1)
        alphas.append(full)
    if config.clutter > 0:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7) * config.clutter)
    return Scene(
        image=np.clip(np.rint(pixels), 0, 255).astype(np.uint8),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        alphas=np.asarray(alphas, dtype=np.float32).reshape(-1, s, s),
    )


def scenes(config: SynthConfig) -> Iterator[tuple[int, str, Scene]]:
    """Yield ``(image_id, split, scene)`` for every image, in id order (1..N).

    Everything derives from ``numpy.random.default_rng(config.seed)``; each image has its
    own child generator, so image ``i`` does not depend on how earlier ones were consumed.
    """
    rng = np.random.default_rng(config.seed)
    pools = _digit_pools(config, rng)
    counts = split_counts(config.images, config.split_fractions)
    splits = [split for split, n in zip(SPLITS, counts, strict=True) for _ in range(n)]
    for image_id, (split, child) in enumerate(zip(splits, rng.spawn(config.images), strict=True), start=1):
        yield image_id, split, render_scene(config, child, pools[split])


def generate(out_dir: str | os.PathLike[str], config: SynthConfig, *, overwrite: bool = False) -> Dataset:
    """Render the dataset into ``out_dir`` (see the module docstring) and return it
    (``root = out_dir``, images in id order, categories ``1..classes`` named ``"0".."9"``).

    The directory is built aside and moved into place whole, so a failure leaves nothing
    half-written. Same config, same bytes: the PNGs and ``annotations.json`` are identical
    from run to run.

    Raises:
        OutputExistsError: (a DatasetError and a FileExistsError) ``out_dir`` is a file, or
            exists, is not empty, and ``overwrite`` is False or it was not written by mgral
            (see :func:`mgral._io.atomic_directory`).
    """
    out_dir = Path(out_dir)
    records = []
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(
                atomic_directory(out_dir, overwrite=overwrite, what="the digits-scenes dataset (mgral synth)")
            )
        except FileExistsError as err:
            raise OutputExistsError(str(err)) from err
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
        for image_id, split, scene in scenes(config):
            file_name = f"images/{split}/{image_id:05d}.png"
            Image.fromarray(scene.image).save(tmp / file_name, format="PNG", compress_level=1)
            target = Target(boxes=scene.boxes, labels=scene.labels)
            records.append(ImageRecord(image_id, file_name, config.image_size, config.image_size, split, target))
        dataset = Dataset(out_dir, categories(config), records)
        coco.write_json(dataset, tmp / ANNOTATIONS_FILE)
    return dataset
