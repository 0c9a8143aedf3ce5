import pickle

import numpy as np
import pytest
import torch

from mgral.data.records import Category
from mgral.detectors.cache import load_predictions, save_predictions
from mgral.detectors.torchvision_detector import TorchvisionDetector
from mgral.errors import CheckpointError, ConfigError, DatasetError

FAST = {"progress": False, "batch_size": 4, "warmup_iters": 2}


def _det(preset, ds, **params):
    return TorchvisionDetector(preset, ds.categories, device="cpu", seed=0, train=FAST, **params)


@pytest.mark.parametrize("preset", ["tiny", "mobilenet_v2_fpn"])
def test_fit_predict_evaluate_save_load_round_trip(preset, squares, tmp_path):
    det = _det(preset, squares, pretrained=False)
    train_ids = squares.image_ids("train")
    summary = det.fit(squares, train_ids, iterations=2)
    assert summary["iterations"] == 2 and np.isfinite(summary["losses"]).all()

    test_ids = squares.image_ids("test")
    preds = det.predict(squares, test_ids)
    assert list(preds) == test_ids
    for d in preds.values():
        n = len(d)
        assert d.boxes.shape == (n, 4) and d.boxes.dtype == np.float32
        assert d.scores.shape == (n,) and d.labels.dtype == np.int64
        assert set(d.labels.tolist()) <= {10, 20, 30}
        assert d.probs.shape == (n, 4)
        assert d.embedding is not None and d.embedding.ndim == 1
        assert d.num_candidates is not None and d.num_candidates >= n

    result = det.evaluate(squares, test_ids)
    assert 0.0 <= result.mAP50 <= 1.0

    det.save(tmp_path / "model.pt")
    again = TorchvisionDetector.load(tmp_path / "model.pt", device="cpu")
    preds2 = again.predict(squares, test_ids)
    for i in test_ids:
        np.testing.assert_array_equal(preds[i].boxes, preds2[i].boxes)
        np.testing.assert_array_equal(preds[i].probs, preds2[i].probs)

    save_predictions(tmp_path / "cycle_0.npz", preds)
    cached = load_predictions(tmp_path / "cycle_0.npz")
    assert list(cached) == test_ids
    for i in test_ids:
        np.testing.assert_array_equal(cached[i].probs, preds[i].probs)
        np.testing.assert_array_equal(cached[i].embedding, preds[i].embedding)
        assert cached[i].num_candidates == preds[i].num_candidates


def _label_columns(det, d):
    return np.searchsorted(det.class_ids, d.labels) + 1


def test_faster_rcnn_probabilities_sum_to_one_and_match_scores(squares):
    det = _det("mobilenet_v2_fpn", squares, pretrained=False)
    preds = det.predict(squares, squares.image_ids()[:4])
    total = sum(len(d) for d in preds.values())
    assert total > 0
    for d in preds.values():
        np.testing.assert_allclose(d.probs.sum(1), 1.0, atol=1e-5)
        # a kept box's score is the softmax probability of its class: the row is its own
        np.testing.assert_allclose(d.probs[np.arange(len(d)), _label_columns(det, d)], d.scores, rtol=1e-6)


def test_fcos_probabilities_are_the_kept_anchors_distribution(squares):
    det = _det("tiny", squares, pretrained=False)
    preds = det.predict(squares, squares.image_ids()[:4])
    assert sum(len(d) for d in preds.values()) > 0
    for d in preds.values():
        np.testing.assert_allclose(d.probs.sum(1), 1.0, atol=1e-5)
        p = d.probs[np.arange(len(d)), _label_columns(det, d)]
        sigmoid = p / (p + d.probs[:, 0])  # softmax([0, z]) -> sigmoid(z_label)
        # FCOS score = sqrt(sigmoid(z_label) * sigmoid(centerness)) <= sqrt(sigmoid(z_label))
        assert np.all(d.scores <= np.sqrt(sigmoid) + 1e-5)


def test_retinanet_probabilities_match_sigmoid_scores(squares):
    det = TorchvisionDetector(
        "retinanet_resnet50_fpn", squares.categories, device="cpu", min_size=96, max_size=96, score_thresh=0.01
    )
    preds = det.predict(squares, squares.image_ids()[:2])
    assert sum(len(d) for d in preds.values()) > 0
    for d in preds.values():
        np.testing.assert_allclose(d.probs.sum(1), 1.0, atol=1e-5)
        p = d.probs[np.arange(len(d)), _label_columns(det, d)]
        np.testing.assert_allclose(p / (p + d.probs[:, 0]), d.scores, rtol=1e-4)


def test_training_is_deterministic_for_a_seed(squares):
    states = []
    for _ in range(2):
        det = _det("tiny", squares, pretrained=False)
        det.fit(squares, squares.image_ids("train"), iterations=3)
        states.append(det.model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_resume_from_epoch_checkpoint_matches_uninterrupted(squares, tmp_path, monkeypatch):
    import mgral.detectors.torchvision_detector as training

    ids = squares.image_ids("train")
    full = _det("tiny", squares, pretrained=False)
    full.fit(squares, ids, epochs=2)

    real_save, saves = training.save_state, []

    def crash_after_first_checkpoint(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        raise KeyboardInterrupt  # the process dies right after epoch 0 is on disk

    monkeypatch.setattr(training, "save_state", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _det("tiny", squares, pretrained=False).fit(squares, ids, epochs=2, checkpoint_dir=tmp_path)
    assert saves == [0]
    monkeypatch.setattr(training, "save_state", real_save)

    resumed = _det("tiny", squares, pretrained=False)
    summary = resumed.fit(squares, ids, epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert len(summary["losses"]) == 2
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_empty_labeled_set_is_a_clear_error(squares):
    with pytest.raises(ConfigError, match="empty set of images"):
        _det("tiny", squares, pretrained=False).fit(squares, [])


def test_images_without_boxes_and_missing_classes_train(tmp_path):
    from tests.detectors.conftest import make_squares

    ds = make_squares(tmp_path / "d", images=8, empty_every=2)
    only_red = [r.id for r in ds if set(r.target.labels.tolist()) <= {10}]
    det = _det("tiny", ds, pretrained=False)
    summary = det.fit(ds, only_red or ds.image_ids()[:2], iterations=2)
    assert np.isfinite(summary["losses"]).all()


def test_corrupt_and_malicious_checkpoints_are_refused(squares, tmp_path):
    det = _det("tiny", squares, pretrained=False)
    det.save(tmp_path / "ok.pt")
    blob = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    for name in ("trunc.pt", "junk.pt", "evil.pt", "missing.pt"):
        with pytest.raises(CheckpointError, match=name):
            TorchvisionDetector.load(tmp_path / name, device="cpu")


def test_mismatched_checkpoint_is_refused(squares, tmp_path):
    det = _det("tiny", squares, pretrained=False)
    det.fit(squares, squares.image_ids("train"), iterations=1, checkpoint_dir=tmp_path)
    other = TorchvisionDetector("tiny", [Category(1, "a"), Category(2, "b")], device="cpu", pretrained=False)
    with pytest.raises(CheckpointError, match="made for categories"):
        other._check_meta(torch.load(tmp_path / "last.pt", weights_only=True), tmp_path / "last.pt")


def test_bad_images_are_named_and_can_be_skipped(squares):
    root = squares.root
    (root / "1.png").write_bytes((root / "1.png").read_bytes()[:60])  # truncated
    (root / "2.png").write_bytes(b"\x00" * 100)  # not an image
    det = _det("tiny", squares, pretrained=False)
    with pytest.raises(DatasetError, match=r"image 1 \('1.png'\) at .*1.png could not be decoded"):
        det.predict(squares, [1])
    with pytest.raises(DatasetError, match=r"image 2 \('2.png'\)"):
        det.fit(squares, [0, 2], iterations=1)
    preds = det.predict(squares, [0, 1, 2, 3], on_bad_image="skip")
    assert list(preds) == [0, 3]
    with pytest.warns(UserWarning, match="skipping"):
        summary = det.fit(squares, [0, 1, 2, 3], iterations=1, on_bad_image="skip")
    assert len(summary["bad_images"]) == 2


def test_image_size_mismatch_is_reported(squares):
    squares[0].width = 50
    with pytest.raises(DatasetError, match=r"is 96x96 but the annotations say 50x96"):
        _det("tiny", squares, pretrained=False).predict(squares, [0])


def test_paper_scale_weights_are_never_downloaded(squares, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(
        ConfigError, match=r"never downloads; place fasterrcnn_resnet50_fpn_coco-\w+\.pth .* at .*hub/checkpoints"
    ):
        TorchvisionDetector("fasterrcnn_resnet50_fpn", squares.categories, device="cpu", pretrained=True)


def test_local_weights_file_loads_all_but_the_class_dependent_head(squares, tmp_path):
    src = TorchvisionDetector("tiny", [Category(1, "a")], device="cpu", seed=5, pretrained=False)
    torch.save(src.model.state_dict(), tmp_path / "w.pth")
    det = TorchvisionDetector("tiny", squares.categories, device="cpu", seed=0, weights=tmp_path / "w.pth")
    own, other = det.model.state_dict(), src.model.state_dict()
    skipped = det.model._mgral_skipped_weights
    assert skipped == ["head.classification_head.cls_logits.bias", "head.classification_head.cls_logits.weight"]
    for k, v in own.items():
        if k not in skipped:
            assert torch.equal(v, other[k]), k
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="could not be loaded as a state dict"):
        TorchvisionDetector("tiny", squares.categories, device="cpu", weights=tmp_path / "bad.pth")


def test_torchvision_detector_implements_the_protocol(squares):
    from mgral.detectors.base import Detector

    assert isinstance(_det("tiny", squares, pretrained=False), Detector)


def test_tiny_box_regression_cannot_die(squares):
    """With torchvision's ReLU output, negative box-distance outputs get no gradient and box
    regression stops learning for good; the tiny preset's softplus output always learns."""
    from mgral.detectors.training import DetectionData, collate

    def regression_grad(det, conv):
        with torch.no_grad():
            conv.bias.fill_(-3.0)  # every distance output below zero
        data = DetectionData(squares, squares.image_ids("train")[:4], det.class_index)
        _, images, targets = collate([data[i] for i in range(4)])
        det.model.train()
        det.model(images, targets)["bbox_regression"].backward()
        return conv.bias.grad.abs().sum().item()

    det = _det("tiny", squares, pretrained=False)
    assert regression_grad(det, det.model.head.regression_head.bbox_reg[0]) > 0
    relu_head = _det("tiny", squares, pretrained=False)
    conv = relu_head.model.head.regression_head.bbox_reg[0]
    relu_head.model.head.regression_head.bbox_reg = conv  # torchvision's own output: relu(conv)
    assert regression_grad(relu_head, conv) == 0.0


def _flag(ds, flag_box):
    """``ds`` with ``flag_box(record, k) -> (difficult, iscrowd)`` set on every box."""
    from dataclasses import replace

    from mgral.data.records import Dataset, Target

    recs = []
    for r in ds:
        flags = [flag_box(r, k) for k in range(len(r.target.boxes))]
        difficult = [f[0] for f in flags]
        crowd = [f[1] for f in flags]
        recs.append(replace(r, target=Target(r.target.boxes, r.target.labels, difficult=difficult, iscrowd=crowd)))
    return Dataset(ds.root, ds.categories, recs)


def test_difficult_and_crowd_boxes_are_left_out_of_training_unless_asked(squares):
    from dataclasses import replace

    from mgral.data.records import Dataset, Target

    # the second box of every two-box image is ignored: difficult on even ids, crowd on odd ones
    flagged = _flag(squares, lambda r, k: (k == 1 and r.id % 2 == 0, k == 1 and r.id % 2 == 1))
    assert sum(int(r.target.difficult.sum() + r.target.iscrowd.sum()) for r in flagged) >= 3
    removed = Dataset(
        squares.root,
        squares.categories,
        [replace(r, target=Target(r.target.boxes[:1], r.target.labels[:1])) for r in squares],
    )
    ids = squares.image_ids("train")
    states = []
    for ds, train in ((flagged, {}), (removed, {}), (flagged, {"ignored_boxes": "train"})):
        det = _det("tiny", ds, pretrained=False)
        det.fit(ds, ids, iterations=2, **train)
        states.append(det.model.state_dict())
    skip, same, kept = states
    assert all(torch.equal(skip[k], same[k]) for k in skip)  # skipping == the boxes were never there
    assert not all(torch.equal(skip[k], kept[k]) for k in skip)  # training on them is a different run


def test_images_with_only_ignored_boxes_are_not_trained_as_background(squares):
    ids = squares.image_ids("train")
    crowd_first = _flag(squares, lambda r, k: (False, r.id in ids[:2]))  # two images: all their boxes are crowd
    summary = _det("tiny", crowd_first, pretrained=False).fit(crowd_first, ids, iterations=1)
    assert summary["images_with_only_ignored_boxes"] == 2
    all_crowd = _flag(squares, lambda r, k: (False, True))
    with pytest.raises(ConfigError, match=r"all 12 training images carry only difficult or crowd boxes.*ignored_boxes"):
        _det("tiny", all_crowd, pretrained=False).fit(all_crowd, ids, iterations=1)
    summary = _det("tiny", all_crowd, pretrained=False).fit(all_crowd, ids, iterations=1, ignored_boxes="train")
    assert "images_with_only_ignored_boxes" not in summary


def test_training_and_prediction_bars_print_timestamped_lines_off_a_terminal(squares, capsys):
    det = _det("tiny", squares, pretrained=False)
    det.fit(squares, squares.image_ids("train"), iterations=2, progress=True)
    det.predict(squares, squares.image_ids("test"), progress="CALD view 1/1 (flip)")
    err = capsys.readouterr().err.splitlines()
    assert any(" train epoch 1/" in line and "1/2 (50%)" in line and ", loss " in line for line in err), err
    assert any(" CALD view 1/1 (flip): " in line and "(100%)" in line for line in err), err
    assert not any("nan" in line for line in err), err
