import dataclasses

import numpy as np
import pytest
import torch

import mgral.strategies.mgral.estimate as estimate_module
from mgral.detectors.heads import HeadDetections, cache_head_inputs, head_detections, predict_from_cache
from mgral.detectors.torchvision_detector import TorchvisionDetector
from mgral.errors import ConfigError
from mgral.strategies.mgral.estimate import CrossFitGain, cross_fit_folds, sample_labeling
from tests.detectors.conftest import make_squares

HEAD = {"iterations": 10}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained small Faster R-CNN (96 px) and the head cache of every image. Its RPN misses
    the squares, so each image's proposals are its first 10 plus its true boxes (with their
    features): held-out images then have a mAP above 0 that a head fine-tune can change."""
    ds = make_squares(tmp_path_factory.mktemp("estimate") / "squares", images=16, empty_every=7)
    det = TorchvisionDetector("mobilenet_v2_fpn", ds.categories, device="cpu", seed=0, pretrained=False, min_size=96)
    cache = cache_head_inputs(det, ds, ds.image_ids(), labeled=ds.image_ids())
    cache = {
        i: dataclasses.replace(
            h, proposals=torch.cat([h.proposals[:10], h.gt_boxes]), features=torch.cat([h.features[:10], h.gt_features])
        )
        for i, h in cache.items()
    }
    train = ds.image_ids("train")
    return ds, det, cache, train[:6], train[6:]


def test_head_detections_are_the_predictions_in_model_coordinates_with_their_proposals(setup):
    ds, det, cache, labeled, pool = setup
    dets = head_detections(det, cache, pool)
    preds = predict_from_cache(det, cache, pool)
    assert sum(len(d.rows) for d in dets.values()) > 0
    for i in pool:
        d, h = dets[i], cache[i]
        scale = np.array(h.original_size[::-1] * 2) / np.array(h.image_size[::-1] * 2)
        np.testing.assert_allclose(d.boxes.numpy() * scale, preds[i].boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(d.scores.numpy(), preds[i].scores)
        np.testing.assert_array_equal(d.probs.numpy(), preds[i].probs)
        # a box's score is its proposal's probability of its class
        np.testing.assert_array_equal(d.probs.numpy()[np.arange(len(d.rows)), d.labels.numpy()], d.scores.numpy())
        assert bool((d.rows < len(h.proposals)).all())


def test_a_detection_is_kept_with_probability_its_score_and_a_proposal_gives_one_label():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.9, 0.1, 0.0]])
    dets = HeadDetections(
        boxes=torch.zeros((3, 4)),
        scores=torch.tensor([0.5, 0.3, 0.1]),
        labels=torch.tensor([1, 2, 1]),
        probs=probs,
        rows=torch.tensor([4, 4, 7]),
    )
    rng = np.random.default_rng(0)
    kept = np.zeros((4000, 3), bool)
    for n in range(len(kept)):
        kept[n, sample_labeling(dets, rng)] = True
    np.testing.assert_allclose(kept.mean(axis=0), [0.5, 0.3, 0.1], atol=0.03)
    assert not (kept[:, 0] & kept[:, 1]).any()  # one proposal, one class
    none = torch.zeros(0, dtype=torch.int64)
    empty = HeadDetections(torch.zeros((0, 4)), torch.zeros(0), none, probs[:0], none)
    assert sample_labeling(empty, rng).shape == (0,)


def test_folds_partition_the_labeled_set_and_are_seeded():
    ids = list(range(10, 20))
    folds = cross_fit_folds(ids, 3, seed=0)
    assert sorted(i for f in folds for i in f) == ids and sorted(len(f) for f in folds) == [3, 3, 4]
    assert cross_fit_folds(ids, 3, seed=0) == folds and cross_fit_folds(ids, 3, seed=1) != folds
    for bad in (1, 11, 2.0):
        with pytest.raises(ConfigError, match=r"cross-fitting needs 2 <= folds <= 10 \(the labeled images\)"):
            cross_fit_folds(ids, bad, seed=0)


def test_labelings_are_sampled_detections_fixed_by_seed_image_and_index(setup):
    ds, det, cache, labeled, pool = setup
    est = CrossFitGain(det, cache, ds, labeled, folds=2, labelings=3, resamples=5, train=HEAD)
    dets = head_detections(det, cache, pool)
    torch.manual_seed(5)
    np.random.seed(5)
    state = torch.random.get_rng_state()
    sizes = []
    for i in pool:
        for j in range(8):
            lab = est.labeling(i, j)
            d = dets[i]
            keep = [int(np.flatnonzero((d.boxes == b).all(axis=1))[0]) for b in lab.gt_boxes]
            assert torch.equal(lab.gt_labels, d.labels[keep])  # labels are some of the detections
            assert torch.equal(lab.gt_features, cache[i].features[d.rows[keep]])
            assert lab.proposals is cache[i].proposals and lab.features is cache[i].features
            sizes.append(len(keep))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(set(sizes)) > 1  # the labelings differ
    other = CrossFitGain(det, cache, ds, labeled, folds=3, labelings=1, resamples=5, train=HEAD)
    for i in pool[:3]:
        assert torch.equal(other.labeling(i, 2).gt_boxes, est.labeling(i, 2).gt_boxes)


def test_every_labeled_image_is_scored_once_by_a_head_that_never_trained_on_it(setup, monkeypatch):
    ds, det, cache, labeled, pool = setup
    trained, scored = {}, []

    def spy_finetune(detector, cache, image_ids, **kw):
        head, losses = real_finetune(detector, cache, image_ids, **kw)
        trained[id(head)] = (head, set(image_ids))  # keep the head alive: ids stay unique
        return head, losses

    def spy_predict(detector, cache, image_ids, *, predictor, **kw):
        scored.append((id(predictor), list(image_ids)))
        return real_predict(detector, cache, image_ids, predictor=predictor, **kw)

    real_finetune, real_predict = estimate_module.finetune_head, estimate_module.predict_from_cache
    monkeypatch.setattr(estimate_module, "finetune_head", spy_finetune)
    monkeypatch.setattr(estimate_module, "predict_from_cache", spy_predict)
    est = CrossFitGain(det, cache, ds, labeled, folds=3, labelings=2, resamples=5, train=HEAD)
    est.estimate(pool[:4])
    assert len(scored) == 3 * (1 + 2)  # folds x (control + labelings)
    for n in range(0, len(scored), 3):  # the control, then each labeling: L once, fold by fold
        assert sorted(i for _, ids in scored[n : n + 3] for i in ids) == sorted(labeled)
    for head, ids in scored:
        assert not set(ids) & trained[head][1], "a head scored an image it was trained on"
    assert all(set(pool[:4]) <= t for _, t in list(trained.values())[3:])  # surrogates train on the batch


def test_estimates_are_deterministic_and_the_oracle_gain_uses_the_true_labels(setup):
    ds, det, cache, labeled, pool = setup
    batch = pool[:4]
    torch.manual_seed(0)
    a = CrossFitGain(det, cache, ds, labeled, folds=2, labelings=2, resamples=20, train=HEAD).estimate(batch)
    torch.manual_seed(1)
    est = CrossFitGain(det, cache, ds, labeled, folds=2, labelings=2, resamples=20, train=HEAD)
    b = est.estimate(batch)
    assert (a.gain, a.se, a.gains, a.control_mAP) == (b.gain, b.se, b.gains, b.control_mAP)
    np.testing.assert_array_equal(a.resampled, b.resampled)
    assert len(a.gains) == 2 and a.gain == pytest.approx(np.mean(a.gains)) and a.resampled.shape == (2, 20)
    assert a.se == pytest.approx(np.std(a.resampled.mean(axis=0), ddof=1)) and a.se > 0
    oracle = est.gain([{i: cache[i] for i in batch}])
    assert oracle.control_mAP == a.control_mAP and len(oracle.gains) == 1 and oracle.gain != a.gain
    with pytest.raises(ConfigError, match=rf"batch image {labeled[0]} is labeled already"):
        est.estimate([labeled[0], pool[0]])
    with pytest.raises(ConfigError, match=r"labelings must be an integer >= 1, got 0"):
        CrossFitGain(det, cache, ds, labeled, labelings=0)


def test_an_fcos_estimate_samples_its_labels_from_the_detections_and_is_deterministic(tmp_path):
    """On a dense (FCOS) task detector a labeling's boxes are sampled detections (no features
    of their own: FCOS matches locations to boxes), and estimates repeat exactly."""
    ds = make_squares(tmp_path / "squares", images=12, empty_every=5)
    det = TorchvisionDetector(
        "tiny", ds.categories, device="cpu", seed=0, pretrained=False, train={"progress": False, "batch_size": 4}
    )
    ids = ds.image_ids()
    labeled, pool = ids[:6], ids[6:]
    det.fit(ds, labeled, iterations=10)
    cache = cache_head_inputs(det, ds, ids, labeled=labeled)
    est = CrossFitGain(det, cache, ds, labeled, folds=2, labelings=2, resamples=10, train=HEAD)
    for i in pool[:2]:
        dets = head_detections(det, cache, [i])
        lab = est.labeling(i, 0)
        assert lab.labeled and not cache[i].labeled and lab.cls_towers is cache[i].cls_towers
        assert bool((dets[i].rows < len(cache[i].anchors)).all()) and len(lab.gt_boxes) > 0
        boxes = {tuple(b) for b in dets[i].boxes.tolist()}
        assert {tuple(b) for b in lab.gt_boxes.tolist()} <= boxes
    a = est.estimate(pool[:3])
    b = CrossFitGain(det, cache, ds, labeled, folds=2, labelings=2, resamples=10, train=HEAD).estimate(pool[:3])
    assert (a.gain, a.se, a.gains) == (b.gain, b.se, b.gains) and np.isfinite(a.control_mAP)
