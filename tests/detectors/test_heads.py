from pathlib import Path

import numpy as np
import pytest
import torch

from mgral.detectors.heads import (
    cache_head_inputs,
    cache_nbytes,
    evaluate_head,
    finetune_head,
    load_head_cache,
    predict_from_cache,
    save_head_cache,
    supports_head_cache,
)
from mgral.detectors.torchvision_detector import TorchvisionDetector
from mgral.errors import CheckpointError, ConfigError
from tests.detectors.conftest import make_squares

FAST = {"progress": False, "batch_size": 4, "warmup_iters": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small Faster R-CNN (untrained trunk, 128 px) fitted a few steps on the squares (some empty)."""
    ds = make_squares(tmp_path_factory.mktemp("heads") / "squares", images=20, empty_every=5)
    det = TorchvisionDetector(
        "mobilenet_v2_fpn", ds.categories, device="cpu", seed=0, train=FAST, pretrained=False, min_size=128
    )
    train, test = ds.image_ids("train"), ds.image_ids("test")
    det.fit(ds, train, iterations=4)
    return ds, det, train, test


def _zero_steps_are_the_detector(ds, det, train, test):
    """The float32 cache of ``train + test``, after checking that its zero-step predictions on
    ``test`` are the detector's own, bit for bit, and score the same mAP."""
    cache = cache_head_inputs(det, ds, train + test, labeled=train, dtype=torch.float32)
    own = det.predict(ds, test, embeddings=False)
    from_cache = predict_from_cache(det, cache, test)
    assert sum(len(d) for d in own.values()) > 0
    for i in test:
        for name in ("boxes", "scores", "labels", "probs"):
            np.testing.assert_array_equal(getattr(from_cache[i], name), getattr(own[i], name))
    assert evaluate_head(det, cache, ds, test).mAP == det.evaluate(ds, test).mAP
    return cache


def test_zero_steps_on_the_cache_are_the_detector_itself(setup):
    _zero_steps_are_the_detector(*setup)


def test_cache_holds_ground_truth_of_labeled_images_only(setup):
    ds, det, train, test = setup
    cache = cache_head_inputs(det, ds, train[:3] + test[:2], labeled=train[:3])
    for i in train[:3]:
        h = cache[i]
        n = len(ds[i].target.boxes)
        assert h.gt_boxes.shape == (n, 4) and h.gt_features.shape == (n, h.features.shape[1])
        assert h.features.dtype == torch.float16 and h.image_size == (128, 128) and h.original_size == (96, 96)
        np.testing.assert_allclose(h.gt_boxes.numpy() * 96 / 128, ds[i].target.boxes, rtol=1e-5)
        assert sorted(h.gt_labels.tolist()) == sorted(det.class_index[int(c)] for c in ds[i].target.labels)
    assert not cache[test[0]].labeled
    empty = cache_head_inputs(det, ds, [5], labeled=[5])[5]  # a labeled image without boxes: all background
    assert empty.gt_boxes.shape == (0, 4) and empty.gt_features.shape == (0, empty.features.shape[1])
    assert cache_nbytes(cache) > 0
    with pytest.raises(ConfigError, match=r"image .* has no cached labels; pass it in labeled="):
        finetune_head(det, cache, [test[0]])
    with pytest.raises(ConfigError, match=r"not in the head cache"):
        finetune_head(det, cache, [train[5]])
    with pytest.raises(ConfigError, match=r"labeled image .* is not among the images to cache"):
        cache_head_inputs(det, ds, test[:1], labeled=train[:1])


def test_head_finetune_is_deterministic_lowers_its_loss_and_leaves_the_global_rng(setup):
    ds, det, train, test = setup
    cache = cache_head_inputs(det, ds, train, labeled=train)
    before = det.model.roi_heads.box_predictor.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a, losses = finetune_head(det, cache, train, seed=3, iterations=30)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)
    b, _ = finetune_head(det, cache, train, seed=3, iterations=30)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert losses[-1] < 0.8 * losses[0]
    c, _ = finetune_head(det, cache, train, seed=4, iterations=30)  # another sample of RoIs
    assert not torch.equal(c.state_dict()["cls_score.weight"], a.state_dict()["cls_score.weight"])
    for k, v in det.model.roi_heads.box_predictor.state_dict().items():
        assert torch.equal(v, before[k])  # the detector's own head is untouched


def test_save_load_round_trip_and_corrupt_file(setup, tmp_path):
    ds, det, train, test = setup
    cache = cache_head_inputs(det, ds, train[:4] + test[:3], labeled=train[:4])
    save_head_cache(tmp_path / "heads.npz", cache)
    again = load_head_cache(tmp_path / "heads.npz")
    assert list(again) == list(cache)
    for i, h in cache.items():
        g = again[i]
        assert (g.image_size, g.original_size, g.labeled) == (h.image_size, h.original_size, h.labeled)
        for name in ("proposals", "features", "gt_boxes", "gt_labels", "gt_features"):
            x, y = getattr(h, name), getattr(g, name)
            assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype)
    a = predict_from_cache(det, cache, test[:3])
    fresh = TorchvisionDetector.from_bytes(det.to_bytes(), device="cpu")  # as loaded: a module in train mode
    b = predict_from_cache(fresh, again, test[:3])
    for i in test[:3]:
        np.testing.assert_array_equal(a[i].boxes, b[i].boxes)
    (tmp_path / "bad.npz").write_bytes(b"not a cache")
    with pytest.raises(CheckpointError, match=r"head cache .*bad.npz.* is unreadable .* delete it to recompute"):
        load_head_cache(tmp_path / "bad.npz")


def test_other_detector_types_are_refused(squares):
    from mgral.detectors.models import build_model

    with torch.random.fork_rng(devices=[]):
        holder = type("Holder", (), {"model": build_model("ssd300_vgg16", 3), "preset": "ssd300_vgg16"})()
    with pytest.raises(ConfigError, match=r"head cache supports Faster R-CNN and FCOS .*preset 'ssd300_vgg16'.* SSD"):
        cache_head_inputs(holder, squares, squares.image_ids("test"))


@pytest.fixture(scope="module")
def fcos(tmp_path_factory):
    """The ``tiny`` FCOS (untrained trunk) fitted a few steps on the squares (some empty)."""
    ds = make_squares(tmp_path_factory.mktemp("fcos") / "squares", images=20, empty_every=5)
    det = TorchvisionDetector("tiny", ds.categories, device="cpu", seed=0, train=FAST, pretrained=False)
    train, test = ds.image_ids("train"), ds.image_ids("test")
    det.fit(ds, train, iterations=20)
    return ds, det, train, test


def test_fcos_zero_steps_on_the_cache_are_the_detector_itself(fcos):
    ds, det, train, test = fcos
    cache = _zero_steps_are_the_detector(ds, det, train, test)
    h = cache[train[0]]
    n = len(ds[train[0]].target.boxes)
    assert h.gt_boxes.shape == (n, 4) and len(h.cls_towers) == len(h.box_towers) == 3
    assert len(h.anchors) == sum(a * b for a, b in h.shape) and not cache[test[0]].labeled
    np.testing.assert_allclose(h.gt_boxes.numpy() * 96 / 128, ds[train[0]].target.boxes, rtol=1e-5)
    half = cache_head_inputs(det, ds, test[:1])[test[0]]
    assert half.cls_towers[0].dtype == torch.float16  # the towers in half precision (the anchors stay float32)
    assert cache_nbytes({0: half}) < 0.6 * cache_nbytes({0: cache[test[0]]})
    with pytest.raises(ConfigError, match="saving a dense .FCOS. head cache is not supported"):
        save_head_cache(Path("unused.npz"), {0: half})


def test_fcos_head_finetune_is_deterministic_lowers_its_loss_and_leaves_the_detector(fcos):
    ds, det, train, test = fcos
    cache = cache_head_inputs(det, ds, train + test, labeled=train)
    before = {k: v.clone() for k, v in det.model.head.state_dict().items()}
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a, losses = finetune_head(det, cache, train, iterations=30)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = finetune_head(det, cache, train, iterations=30)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert losses[-1] < 0.8 * losses[0]
    assert {k for k, _ in a.named_parameters()} == {
        "classification_head.cls_logits.weight",
        "classification_head.cls_logits.bias",
        "regression_head.bbox_reg.0.weight",
        "regression_head.bbox_reg.0.bias",
        "regression_head.bbox_ctrness.weight",
        "regression_head.bbox_ctrness.bias",
    }  # the final convolutions only: the towers are cached
    assert evaluate_head(det, cache, ds, train, predictor=a).mAP > evaluate_head(det, cache, ds, train).mAP
    for k, v in det.model.head.state_dict().items():
        assert torch.equal(v, before[k])  # the detector's own head is untouched
    with pytest.raises(ConfigError, match=r"image .* has no cached labels; pass it in labeled="):
        finetune_head(det, cache, [test[0]])


def test_fcos_head_loss_is_torchvisions_loss_of_one_batch_of_every_image(fcos, monkeypatch):
    """At zero steps the head's loss is what FCOS's own loss gives for one batch of the images
    (its matching, its normalisation); split into several batches (images of different shapes
    are), it is unchanged: each batch is weighted back by its foreground count."""
    import mgral.detectors.heads as heads

    ds, det, train, _ = fcos
    ids = train[:8]  # one predict batch: one padded size
    cache = cache_head_inputs(det, ds, ids, labeled=ids, dtype=torch.float32)
    model = det.model.eval()
    with torch.no_grad():
        from mgral.detectors.training import load_image

        batch, _ = model.transform([load_image(ds, i) for i in ids])
        features = list(model.backbone(batch.tensors).values())
        targets = [{"boxes": cache[i].gt_boxes, "labels": cache[i].gt_labels} for i in ids]
        expected = model.compute_loss(
            targets,
            model.head(features),
            model.anchor_generator(batch, features),
            [f.shape[-2] * f.shape[-1] for f in features],
        )
        _, objective = heads._dense_objective(det, cache, ids)
        assert float(objective()) == pytest.approx(float(sum(expected.values())), rel=1e-5)
        split = lambda cache, image_ids: {("a",): list(image_ids[:3]), ("b",): list(image_ids[3:])}  # noqa: E731
        monkeypatch.setattr(heads, "_by_shape", split)
        _, objective = heads._dense_objective(det, cache, ids)
        assert float(objective()) == pytest.approx(float(sum(expected.values())), rel=1e-5)


def test_every_preset_declares_head_cache_exactly_when_its_model_supports_it():
    """The capability a config check reads (``Preset.head_cache``) and what the cycle finds in the
    built model (``supports_head_cache``) agree for every preset: one truth, checked."""
    from mgral.detectors.models import PRESETS, build_model

    for name in PRESETS.names():
        with torch.random.fork_rng(devices=[]):
            model = build_model(name, 3)
        holder = type("Holder", (), {"model": model})()
        assert supports_head_cache(holder) == PRESETS.get(name).head_cache, name
