"""EvalResult: the undefined-figure rule (NaN in the dataclass, None in JSON)."""

from __future__ import annotations

import json
import math

from mgral.evaluation import EvalResult


def test_coco_minus_one_becomes_nan_then_none() -> None:
    stats = [0.5, 0.7, -1, -1, 0.4, 0.6, 0.1, 0.2, 0.3, -1, 0.5, 0.6]
    r = EvalResult.from_coco_stats(stats, {"a": 0.5, "b": math.nan}, num_images=3)
    assert r.mAP == 0.5 and math.isnan(r.mAP75) and math.isnan(r.mAP_small) and math.isnan(r.AR_small)
    d = r.to_dict()
    assert d["mAP75"] is None and d["mAP_small"] is None and d["AR_small"] is None
    assert d["per_class"] == {"a": 0.5, "b": None}
    assert d["style"] == "coco" and d["num_images"] == 3
    json.dumps(d, allow_nan=False)


def test_voc_has_no_coco_only_figures() -> None:
    r = EvalResult.from_voc(0.6, {"a": 0.6}, style="voc07", num_images=2)
    assert r.mAP == r.mAP50 == 0.6
    assert r.mAP75 is None and r.mAP_small is None and r.AR1 is None and r.AR_large is None
    d = r.to_dict()
    assert d["mAP75"] is None and d["AR100"] is None and d["mAP"] == 0.6
    json.dumps(d, allow_nan=False)
