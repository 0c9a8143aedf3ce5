import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgral.data import synth
from mgral.data.synth import INK_THRESHOLD, SynthConfig, class_probabilities, generate, scenes, split_counts
from mgral.errors import ConfigError

SMALL = {"images": 12, "image_size": 64, "min_digit_size": 10, "max_digit_size": 24}


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p)) for p in sorted(root.glob("images/*/*.png"))}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = generate(tmp_path / "a", SynthConfig(**SMALL, seed=3))
    generate(tmp_path / "b", SynthConfig(**SMALL, seed=3))
    generate(tmp_path / "c", SynthConfig(**SMALL, seed=4))
    ann = {k: (tmp_path / k / "annotations.json").read_bytes() for k in "abc"}
    assert ann["a"] == ann["b"]
    assert ann["a"] != ann["c"]
    pa, pb, pc = (_pixels(tmp_path / k) for k in "abc")
    assert pa.keys() == pb.keys() == pc.keys() and len(pa) == 12
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert not any(np.array_equal(pa[k], pc[k]) for k in pa)
    assert a.root == tmp_path / "a"


def test_splits_follow_the_fractions_and_ids_are_unique(tmp_path):
    ds = generate(tmp_path / "d", SynthConfig(**{**SMALL, "images": 40}, split_fractions=(0.5, 0.25, 0.25)))
    assert [len(ds.image_ids(s)) for s in ("train", "val", "test")] == [20, 10, 10]
    assert list(ds.image_ids()) == list(range(1, 41))
    for rec in ds:
        assert rec.file_name == f"images/{rec.split}/{rec.id:05d}.png"
        assert (tmp_path / "d" / rec.file_name).is_file()
        assert (rec.width, rec.height) == (64, 64)
    coco = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert {im["split"] for im in coco["images"]} == {"train", "val", "test"}
    assert [c["name"] for c in coco["categories"]] == [str(k) for k in range(10)]
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))


def test_split_counts_never_leave_a_split_empty():
    assert split_counts(3, (0.9, 0.05, 0.05)) == [1, 1, 1]
    assert split_counts(600, (0.7, 0.15, 0.15)) == [420, 90, 90]
    assert sum(split_counts(101, (0.7, 0.15, 0.15))) == 101


def test_boxes_are_the_tight_boxes_of_each_digits_visible_ink():
    config = SynthConfig(images=30, seed=1)
    total = 0
    for _, _, scene in scenes(config):
        assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
        assert scene.boxes.dtype == np.float32 and scene.labels.dtype == np.int64
        assert len(scene.boxes) == len(scene.labels) == len(scene.alphas) <= config.max_objects
        for box, label, alpha in zip(scene.boxes, scene.labels, scene.alphas, strict=True):
            assert 1 <= label <= 10
            ys, xs = np.nonzero(alpha >= INK_THRESHOLD)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= 128
            assert config.min_digit_size <= box[3] - box[1] <= config.max_digit_size + 3
            # The ink is really drawn: the image under it is not the untouched background
            # colour of the box's border (the digit is composited with a contrasting ink).
            x1, y1, x2, y2 = box.astype(int)
            inside = scene.image[y1:y2, x1:x2].astype(float)
            ink = alpha[y1:y2, x1:x2] >= 0.9
            assert np.linalg.norm(inside[ink].mean(0) - inside[~ink].mean(0)) > 20
        total += len(scene.boxes)
    assert total >= 30 * config.min_objects * 0.9


def test_digits_do_not_overlap_much():
    for _, _, scene in scenes(SynthConfig(images=40, seed=2, max_objects=8)):
        b = scene.boxes
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1)
        area = (b[:, 2:] - b[:, :2]).prod(-1)
        iou = inter / (area[:, None] + area[None, :] - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max(initial=0) <= 0.1 + 1e-6


def test_written_images_are_the_rendered_scenes(tmp_path):
    config = SynthConfig(**SMALL, seed=5)
    ds = generate(tmp_path / "e", config)
    for image_id, split, scene in scenes(config):
        rec = ds[image_id]
        assert rec.split == split
        assert np.array_equal(np.asarray(Image.open(ds.image_path(image_id))), scene.image)
        assert np.array_equal(rec.target.boxes, scene.boxes) and np.array_equal(rec.target.labels, scene.labels)


def test_class_probabilities_are_geometric_with_the_requested_ratio():
    p = class_probabilities(10, 8.0)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[-1] == pytest.approx(8.0)
    assert np.allclose(p[1:] / p[:-1], 8.0 ** (-1 / 9))
    assert np.allclose(class_probabilities(10, 1.0), 0.1)
    assert class_probabilities(1, 5.0).tolist() == [1.0]


def test_imbalance_is_honoured_by_the_drawn_labels():
    config = SynthConfig(images=300, image_size=96, min_digit_size=10, max_digit_size=24, imbalance=4.0, seed=7)
    labels = np.concatenate([s.labels for _, _, s in scenes(config)])
    counts = np.bincount(labels - 1, minlength=10)
    assert counts.sum() > 1000
    # The fitted log-linear trend over all classes is far less noisy than two end counts.
    slope = np.polyfit(np.arange(10), np.log(counts), 1)[0]
    assert 2.8 < np.exp(-9 * slope) < 5.7


def test_fewer_classes_use_the_first_digits(tmp_path):
    config = SynthConfig(**SMALL, classes=3)
    assert [c.name for c in synth.categories(config)] == ["0", "1", "2"]
    labels = np.concatenate([s.labels for _, _, s in scenes(config)])
    assert set(labels.tolist()) <= {1, 2, 3}


def test_plain_background_without_clutter():
    _, _, scene = next(scenes(SynthConfig(**SMALL, clutter=0.0, min_objects=0, max_objects=1)))
    ink = scene.alphas.sum(0) > 0
    background = scene.image[~ink].astype(int)
    # Base colour only: no gradient, no noise, no strokes.
    assert (background == background[0]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": 2}, r"images must be >= 3, got 2"),
        ({"min_objects": 5, "max_objects": 3}, r"min_objects \(5\) > max_objects \(3\)"),
        ({"min_digit_size": 30, "max_digit_size": 20}, r"min_digit_size \(30\) > max_digit_size \(20\)"),
        ({"image_size": 40}, r"image_size \(40\) is too small for max_digit_size \(40\)"),
        ({"split_fractions": (0.7, 0.2, 0.2)}, r"split_fractions must sum to 1"),
        ({"split_fractions": (1.0, 0.0, 0.0)}, r"three positive numbers"),
        ({"classes": 11}, r"classes must be between 1 and 10, got 11"),
        ({"imbalance": 0.5}, r"imbalance must be >= 1.0"),
        ({"clutter": float("nan")}, r"clutter must be a finite number"),
        ({"images": 10.0}, r"images must be an integer"),
        ({"seed": -1}, r"seed must be >= 0"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**kwargs)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "f"
    generate(out, SynthConfig(**SMALL))
    with pytest.raises(FileExistsError):
        generate(out, SynthConfig(**SMALL, seed=1))
    generate(out, SynthConfig(**SMALL, seed=1), overwrite=True)
    assert len(list(out.glob("images/*/*.png"))) == 12


def test_a_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = []
    real = synth.render_scene

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "render_scene", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate(tmp_path / "g", SynthConfig(**SMALL))
    assert list(tmp_path.iterdir()) == []


def test_coco_reader_reads_the_dataset_back_with_its_files(tmp_path):
    coco = pytest.importorskip("mgral.data.coco")
    ds = generate(tmp_path / "h", SynthConfig(**SMALL, seed=9))
    back = coco.read(tmp_path / "h" / "annotations.json", check_files=True)
    assert back.root == ds.root
    assert back.categories == ds.categories
    assert list(back.images) == list(ds.images)
    for rec in ds:
        other = back[rec.id]
        assert (other.file_name, other.width, other.height, other.split) == (
            rec.file_name,
            rec.width,
            rec.height,
            rec.split,
        )
        assert other.target == rec.target
