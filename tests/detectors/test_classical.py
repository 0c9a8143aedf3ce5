import numpy as np
import pytest

from mgral.data.records import Dataset, Detections, ImageRecord, Target
from mgral.data.synth import SynthConfig, generate
from mgral.detectors.classical import ClassicalDigitDetector, box_iou, nms, otsu_threshold


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Dataset:
    return generate(tmp_path_factory.mktemp("classical") / "data", SynthConfig(images=150, seed=0))


@pytest.fixture(scope="module")
def fitted(digits) -> tuple[ClassicalDigitDetector, dict]:
    detector = ClassicalDigitDetector(seed=0).fit(digits, digits.image_ids("train"))
    return detector, detector.predict(digits, digits.image_ids("test"))


def test_predictions_have_the_detection_contract(digits, fitted):
    _, preds = fitted
    test_ids = digits.image_ids("test")
    assert list(preds) == test_ids
    category_ids = {c.id for c in digits.categories}
    assert sum(len(d) for d in preds.values()) > len(test_ids)
    for image_id, det in preds.items():
        assert isinstance(det, Detections)
        assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
        assert det.scores.dtype == np.float32 and det.labels.dtype == np.int64
        rec = digits[image_id]
        b = det.boxes
        assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= rec.width) & (b[:, 3] <= rec.height)).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert ((det.scores > 0) & (det.scores <= 1)).all()
        assert np.all(np.diff(det.scores) <= 0)
        assert set(det.labels.tolist()) <= category_ids


def test_map_is_far_above_a_trivial_baseline(digits, fitted):
    evaluation = pytest.importorskip("mgral.evaluation")
    _, preds = fitted
    test = digits.subset(digits.image_ids("test"))
    result = evaluation.evaluate(test, preds, style="coco")
    # Measured 0.61-0.74 mAP50 (0.40-0.47 mAP) over seeds 0-4 at this size.
    assert result.mAP50 > 0.45
    assert result.mAP > 0.25
    # The same boxes with shuffled labels: what localization alone is worth.
    rng = np.random.default_rng(0)
    ids = np.asarray([c.id for c in digits.categories])
    shuffled = {k: Detections(d.boxes, d.scores, rng.choice(ids, len(d))) for k, d in preds.items()}
    assert evaluation.evaluate(test, shuffled, style="coco").mAP50 < result.mAP50 / 2


def test_same_seed_same_predictions(digits):
    train, test = digits.image_ids("train")[:30], digits.image_ids("test")[:8]
    a = ClassicalDigitDetector(seed=3).fit(digits, train).predict(digits, test)
    b = ClassicalDigitDetector(seed=3).fit(digits, train).predict(digits, test)
    for image_id in test:
        assert np.array_equal(a[image_id].boxes, b[image_id].boxes)
        assert np.array_equal(a[image_id].scores, b[image_id].scores)
        assert np.array_equal(a[image_id].labels, b[image_id].labels)


def test_predict_before_fit_and_fit_without_boxes_are_refused(digits):
    with pytest.raises(RuntimeError, match="call fit"):
        ClassicalDigitDetector().predict(digits, digits.image_ids("test")[:1])
    first = digits[digits.image_ids("train")[0]]
    empty = Dataset(
        digits.root, digits.categories, [ImageRecord(first.id, first.file_name, 128, 128, "train", Target())]
    )
    with pytest.raises(ValueError, match="no boxes"):
        ClassicalDigitDetector().fit(empty, [first.id])


def test_labels_are_the_datasets_own_sparse_category_ids(squares):
    train = [i for i in squares.image_ids() if squares[i].split == "train"]
    preds = ClassicalDigitDetector().fit(squares, train).predict(squares, squares.image_ids())
    labels = np.concatenate([d.labels for d in preds.values()])
    assert len(labels) and set(labels.tolist()) <= {10, 20, 30}


def test_nms_and_iou():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.3, 0.1], dtype=np.float32)
    assert box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 100)
    assert box_iou(boxes[:1], boxes[2:3])[0, 0] == 0
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2, 3]


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 1000), rng.normal(50, 3, 300)])
    assert 16 < otsu_threshold(values) < 42
