"""nuScenes-style detection metric: perfect predictions, threshold steps, a hand-computed case, TP errors, NDS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.errors import DataError
from xmodal.tasks.bev.metrics import detection_metrics, scale_iou, yaw_difference

CLASSES = ("car", "pedestrian", "cyclist")


def box(x, y, length=4.0, w=2.0, h=1.5, yaw=0.0):
    return [x, y, h / 2, length, w, h, yaw]


def scene(boxes, labels, scores=None):
    d = {"boxes": np.asarray(boxes, dtype=float).reshape(-1, 7), "labels": np.asarray(labels, dtype=int)}
    if scores is not None:
        d["scores"] = np.asarray(scores, dtype=float)
    return d


def ap_of(points: list[float]) -> float:
    """AP from precision at recall 0.00 ... 1.00 (101 values), by the rule: points above recall 0.1."""
    return sum(max(p - 0.1, 0.0) for p in points[11:]) / 90 / 0.9


def test_perfect_predictions_score_one():
    gt = [scene([box(10, 0), box(20, 3, 0.6, 0.6, 1.7)], [0, 1]), scene([box(5, -2, 1.8, 0.6, 1.6, 1.0)], [2])]
    pred = [dict(g, scores=np.linspace(0.9, 0.5, len(g["labels"]))) for g in gt]
    m = detection_metrics(pred, gt, CLASSES)
    assert m["mAP"] == pytest.approx(1.0) and m["NDS"] == pytest.approx(1.0)
    assert m["mATE"] == m["mASE"] == m["mAOE"] == pytest.approx(0.0)
    assert all(ap == pytest.approx(1.0) for e in m["per_class"].values() for ap in e["AP"].values())
    assert m["nds_formula"].endswith("/ 8")


def test_box_shifted_between_thresholds():
    gt = [scene([box(10, 0)], [0])]
    pred = [scene([box(11.5, 0)], [0], [0.8])]  # 1.5 m off: missed at 0.5 and 1 m, found at 2 and 4 m
    m = detection_metrics(pred, gt, CLASSES)
    assert m["per_class"]["car"]["AP"] == {"0.5": 0.0, "1.0": 0.0, "2.0": pytest.approx(1.0), "4.0": pytest.approx(1.0)}
    assert m["mAP"] == pytest.approx(0.5)
    assert m["mATE"] == pytest.approx(1.5)
    far = detection_metrics([scene([box(13, 0)], [0], [0.8])], gt, CLASSES)  # 3 m: only the 4 m threshold
    assert far["mAP"] == pytest.approx(0.25) and far["mATE"] == 1.0  # no match at 2 m: error 1 by convention


def test_hand_computed_classes_and_false_positives():
    # scene A: cars at (10,0) and (20,5); predictions 0.3 m off (0.9), a false positive (0.8), 1.5 m off (0.7)
    # scene B: a car nobody finds; a pedestrian found exactly (0.6) after a false positive pedestrian (0.95)
    gt = [scene([box(10, 0), box(20, 5)], [0, 0]),
          scene([box(5, 5), box(8, 2, 0.6, 0.6, 1.7)], [0, 1])]
    pred = [scene([box(10.3, 0), box(15, -5), box(20, 6.5)], [0, 0, 0], [0.9, 0.8, 0.7]),
            scene([box(30, 0, 0.6, 0.6, 1.7), box(8, 2, 0.6, 0.6, 1.7)], [1, 1], [0.95, 0.6])]
    m = detection_metrics(pred, gt, CLASSES)
    grid = [i / 100 for i in range(101)]
    # car at 0.5 m and 1 m: one TP of three cars, then two FPs → precision 1 up to recall 1/3, 0 beyond
    car_tight = ap_of([1.0 if r < 1 / 3 else 0.0 for r in grid])
    assert car_tight == pytest.approx(23 / 90)
    # car at 2 m and 4 m: TP, FP, TP → (recall, precision) (1/3, 1), (1/3, 1/2), (2/3, 2/3), linear in between
    car_loose = ap_of([1.0 if r < 1 / 3 else (0.5 + (r - 1 / 3) * 0.5 if r < 2 / 3 else 0.0) for r in grid])
    car = m["per_class"]["car"]
    assert car["AP"]["0.5"] == pytest.approx(car_tight) and car["AP"]["1.0"] == pytest.approx(car_tight)
    assert car["AP"]["2.0"] == pytest.approx(car_loose) and car["AP"]["4.0"] == pytest.approx(car_loose)
    # pedestrian: FP then TP → (0, 0), (1, 1/2): precision r/2 along the grid
    ped_ap = ap_of([r / 2 for r in grid])
    assert all(v == pytest.approx(ped_ap) for v in m["per_class"]["pedestrian"]["AP"].values())
    assert m["per_class"]["cyclist"]["AP"] is None and m["classes_without_gt"] == ["cyclist"]
    assert m["mAP"] == pytest.approx(((car_tight + car_loose) / 2 + ped_ap) / 2)
    assert m["per_class"]["pedestrian"]["trans_err"] == pytest.approx(0.0)


def test_tp_errors_and_nds():
    gt = [scene([box(10, 0, 4, 2, 1.5, 0.1)], [0])]
    pred = [scene([box(10.3, 0, 4, 1, 1.5, 0.1 + 0.4)], [0], [0.9])]  # 0.3 m off, half as wide, 0.4 rad turned
    m = detection_metrics(pred, gt, CLASSES)
    assert m["mAP"] == pytest.approx(1.0)
    assert (m["mATE"], m["mASE"], m["mAOE"]) == (pytest.approx(0.3), pytest.approx(0.5), pytest.approx(0.4))
    assert m["NDS"] == pytest.approx((5 * 1.0 + 0.7 + 0.5 + 0.6) / 8)


def test_empty_scenes():
    gt = [scene([box(10, 0)], [0])]
    pred = [scene([box(10, 0)], [0], [0.9])]
    base = detection_metrics(pred, gt, CLASSES)
    empties = detection_metrics(pred + [scene([], [], []), scene([], [], [])],
                                gt + [scene([], []), scene([], [])], CLASSES)
    assert empties["mAP"] == base["mAP"] == pytest.approx(1.0) and empties["scenes"] == 3
    # a detection in an empty scene is a false positive: ranked first, the curve runs from (0, 0) to (1, 1/2)
    fp_first = detection_metrics(pred + [scene([box(3, 3)], [0], [0.99])], gt + [scene([], [])], CLASSES)
    assert fp_first["mAP"] == pytest.approx(ap_of([i / 200 for i in range(101)])) == pytest.approx(0.2)
    assert detection_metrics([scene([], [], [])], gt, CLASSES)["mAP"] == 0.0  # nothing predicted
    with pytest.raises(DataError, match="no ground-truth boxes"):
        detection_metrics([scene([], [], [])], [scene([], [])], CLASSES)


def test_bad_inputs_named():
    gt = [scene([box(10, 0)], [0])]
    with pytest.raises(DataError, match=r"predictions\[0\] has no 'scores'"):
        detection_metrics([scene([box(10, 0)], [0])], gt, CLASSES)
    with pytest.raises(DataError, match="scores must be finite"):
        detection_metrics([scene([box(10, 0)], [0], [math.nan])], gt, CLASSES)
    with pytest.raises(DataError, match="class index out of range"):
        detection_metrics([scene([box(10, 0)], [5], [0.5])], gt, CLASSES)
    with pytest.raises(DataError, match="ground truth for 1"):
        detection_metrics([], gt, CLASSES)


def test_geometry_helpers():
    assert scale_iou(np.array(box(0, 0, 2, 2, 2)), np.array(box(5, 5, 1, 2, 2, 1.0))) == pytest.approx(0.5)
    assert yaw_difference(math.pi - 0.1, -math.pi + 0.1) == pytest.approx(0.2)
    assert yaw_difference(0.0, math.pi) == pytest.approx(math.pi)
