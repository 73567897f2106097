"""nuScenes-style detection metrics: AP by BEV centre distance, TP errors, and an NDS over the errors that exist.

The rules follow the nuScenes devkit (`nuscenes.eval.detection`): per class and distance threshold d, predictions
in descending score order are greedily matched to the nearest unmatched ground-truth box of the same scene with
BEV centre distance < d; precision is interpolated onto 101 recall points (0, 0.01, …, 1; 0 beyond the highest
recall reached); AP = mean over the recall points above 0.1 of max(precision − 0.1, 0), divided by 0.9 (the
devkit drops the 0.1 point itself). mAP is the mean over classes and thresholds. TP errors use the matches at
2 m: translation (BEV centre distance), scale (1 − IoU of the boxes aligned on centre and yaw) and orientation
(absolute yaw difference, radians, in [0, π]); each is the devkit's running mean over matches interpolated on
the same recall grid and averaged from recall 0.1 to the highest recall reached (1.0 for a class without a match
at 2 m). There are no velocities or attributes here, so NDS = (5·mAP + Σ_err (1 − min(1, err))) / (5 + 3).

A class without ground-truth boxes in the whole evaluation set has no AP; it is reported as such and left out of
the means (the devkit never meets this case). A set without any ground-truth box has no metric: DataError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xmodal.errors import DataError

DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
RECALL_POINTS = 101
TP_ERRORS = ("trans_err", "scale_err", "orient_err")
NDS_FORMULA = "NDS = (5*mAP + (1 - min(1, mATE)) + (1 - min(1, mASE)) + (1 - min(1, mAOE))) / 8"
AP_RULE = ("AP = mean over the 101-point recall grid above 0.1 (0.11 ... 1.00) of max(precision - 0.1, 0) / 0.9; "
           "greedy matching by BEV centre distance < d per class, d in {0.5, 1, 2, 4} m; TP errors at 2 m")


# ----------------------------------------------------------------------------------------------- box geometry


def center_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """BEV (x, y) distance between box centres; broadcasts over leading dimensions."""
    return np.hypot(a[..., 0] - b[..., 0], a[..., 1] - b[..., 1])


def scale_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes moved onto one centre and yaw: only their sizes (l, w, h) differ."""
    sa, sb = np.asarray(a[3:6], dtype=np.float64), np.asarray(b[3:6], dtype=np.float64)
    inter = float(np.prod(np.minimum(sa, sb)))
    return inter / (float(np.prod(sa)) + float(np.prod(sb)) - inter)


def yaw_difference(a: float, b: float) -> float:
    """|a − b| wrapped to [0, π]."""
    d = (float(a) - float(b) + math.pi) % (2 * math.pi) - math.pi
    return abs(d)


def _cummean(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) / np.arange(1, len(x) + 1)


# ----------------------------------------------------------------------------------------------- inputs


def _as_boxes(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)
    arr = arr.reshape(-1, 7) if arr.size == 0 else arr
    if arr.ndim != 2 or arr.shape[1] != 7:
        raise DataError(f"{where}: boxes must be [N, 7] (x, y, z, l, w, h, yaw), got shape {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: boxes hold NaN or infinite values")
    if (arr[:, 3:6] <= 0).any():
        raise DataError(f"{where}: boxes must have positive sizes (l, w, h)")
    return arr


def _as_vector(value: Any, n: int, where: str, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=dtype).reshape(-1)
    if arr.shape[0] != n:
        raise DataError(f"{where}: expected {n} values (one per box), got {arr.shape[0]}")
    if dtype is np.float64 and not np.isfinite(arr).all():
        raise DataError(f"{where}: scores must be finite")
    return arr


def _scenes(items: Sequence[Mapping[str, Any]], what: str, with_scores: bool) -> list[dict[str, np.ndarray]]:
    out = []
    for i, item in enumerate(items):
        where = f"{what}[{i}]"
        for key in ("boxes", "labels") + (("scores",) if with_scores else ()):
            if key not in item:
                raise DataError(f"{where} has no '{key}' (keys: {', '.join(item)})")
        boxes = _as_boxes(item["boxes"], where)
        rec = {"boxes": boxes, "labels": _as_vector(item["labels"], len(boxes), f"{where} labels", np.int64)}
        if with_scores:
            rec["scores"] = _as_vector(item["scores"], len(boxes), f"{where} scores")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------- per class


def _no_predictions() -> dict[str, np.ndarray]:
    """The devkit's "no predictions" curve: precision and confidence 0, every TP error 1."""
    zeros = np.zeros(RECALL_POINTS)
    return {"precision": zeros, "confidence": zeros, **{k: np.ones(RECALL_POINTS) for k in TP_ERRORS}}


def accumulate(gt: list[dict], pred: list[dict], cls: int, dist_th: float) -> dict[str, np.ndarray]:
    """Greedy matching of one class at one threshold → precision, confidence and TP errors on the recall grid."""
    gt_boxes = [g["boxes"][g["labels"] == cls] for g in gt]
    npos = sum(len(b) for b in gt_boxes)
    if npos == 0:
        return _no_predictions()
    scene_of, boxes, scores = [], [], []
    for s, p in enumerate(pred):
        keep = p["labels"] == cls
        scene_of += [s] * int(keep.sum())
        boxes.append(p["boxes"][keep])
        scores.append(p["scores"][keep])
    if not scene_of:
        return _no_predictions()
    boxes_all, scores_all = np.concatenate(boxes), np.concatenate(scores)
    order = np.argsort(-scores_all, kind="stable")
    taken = [np.zeros(len(b), dtype=bool) for b in gt_boxes]
    tp, conf = [], []
    match: dict[str, list[float]] = {k: [] for k in TP_ERRORS}
    match_conf: list[float] = []
    for i in order:
        s, box = scene_of[i], boxes_all[i]
        cand = gt_boxes[s]
        dist = np.where(taken[s], np.inf, center_distance(cand, box[None])) if len(cand) else np.zeros(0)
        j = int(dist.argmin()) if len(dist) else -1
        hit = j >= 0 and dist[j] < dist_th
        if hit:
            taken[s][j] = True
            g = cand[j]
            match["trans_err"].append(float(dist[j]))
            match["scale_err"].append(1.0 - scale_iou(g, box))
            match["orient_err"].append(yaw_difference(g[6], box[6]))
            match_conf.append(float(scores_all[i]))
        tp.append(hit)
        conf.append(float(scores_all[i]))
    if not match_conf:
        return _no_predictions()
    tp_c = np.cumsum(tp).astype(np.float64)
    fp_c = np.cumsum(~np.asarray(tp)).astype(np.float64)
    prec, rec = tp_c / (tp_c + fp_c), tp_c / npos
    grid = np.linspace(0.0, 1.0, RECALL_POINTS)
    out = {"precision": np.interp(grid, rec, prec, right=0), "confidence": np.interp(grid, rec, conf, right=0)}
    mc = np.asarray(match_conf)
    for k, v in match.items():  # running mean over matches, read off at each recall point's confidence
        out[k] = np.interp(out["confidence"][::-1], mc[::-1], _cummean(np.asarray(v))[::-1])[::-1]
    return out


def average_precision(curve: Mapping[str, np.ndarray]) -> float:
    prec = np.asarray(curve["precision"])[round(100 * MIN_RECALL) + 1:] - MIN_PRECISION
    return float(np.clip(prec, 0, None).mean()) / (1.0 - MIN_PRECISION)


def tp_error(curve: Mapping[str, np.ndarray], name: str) -> float:
    """Mean of a TP error from just above recall 0.1 to the highest recall reached; 1.0 when never reached."""
    first = round(100 * MIN_RECALL) + 1
    nonzero = np.nonzero(curve["confidence"])[0]
    last = int(nonzero[-1]) if len(nonzero) else 0
    if last < first:
        return 1.0
    return float(np.mean(curve[name][first:last + 1]))


# ----------------------------------------------------------------------------------------------- all classes


def detection_metrics(predictions: Sequence[Mapping[str, Any]], ground_truth: Sequence[Mapping[str, Any]],
                      classes: Sequence[str], *, dist_thresholds: Sequence[float] = DIST_THRESHOLDS) -> dict[str, Any]:
    """mAP, NDS, mean TP errors and per-class results over scenes.

    predictions[i] / ground_truth[i] belong to the same scene: "boxes" [N, 7], "labels" [N] class indices, and
    for predictions "scores" [N]. Scenes may be empty.
    """
    if len(predictions) != len(ground_truth):
        raise DataError(f"got predictions for {len(predictions)} scenes but ground truth for {len(ground_truth)}")
    gt = _scenes(ground_truth, "ground_truth", False)
    pred = _scenes(predictions, "predictions", True)
    n_cls = len(classes)
    for what, recs in (("ground_truth", gt), ("predictions", pred)):
        for i, r in enumerate(recs):
            if len(r["labels"]) and (r["labels"].min() < 0 or r["labels"].max() >= n_cls):
                raise DataError(f"{what}[{i}]: class index out of range 0..{n_cls - 1} ({', '.join(classes)})")
    if TP_THRESHOLD not in dist_thresholds:
        raise DataError(f"dist_thresholds must include the TP threshold {TP_THRESHOLD} m, got {list(dist_thresholds)}")
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        n_gt = int(sum((g["labels"] == c).sum() for g in gt))
        n_pred = int(sum((p["labels"] == c).sum() for p in pred))
        entry: dict[str, Any] = {"gt_boxes": n_gt, "predictions": n_pred}
        if n_gt == 0:
            entry.update(AP=None, mean_AP=None, **{k: None for k in TP_ERRORS})
        else:
            curves = {d: accumulate(gt, pred, c, d) for d in dist_thresholds}
            aps = {str(d): average_precision(curves[d]) for d in dist_thresholds}
            entry.update(AP=aps, mean_AP=float(np.mean(list(aps.values()))),
                         **{k: tp_error(curves[TP_THRESHOLD], k) for k in TP_ERRORS})
        per_class[name] = entry
    scored = [e for e in per_class.values() if e["mean_AP"] is not None]
    if not scored:
        raise DataError(f"the evaluation set has no ground-truth boxes of any class ({', '.join(classes)}): "
                        "detection metrics are undefined")
    m_ap = float(np.mean([e["mean_AP"] for e in scored]))
    errors = {k: float(np.mean([e[k] for e in scored])) for k in TP_ERRORS}
    nds = (5 * m_ap + sum(1 - min(1.0, v) for v in errors.values())) / (5 + len(errors))
    return {
        "mAP": m_ap,
        "NDS": float(nds),
        "mATE": errors["trans_err"],
        "mASE": errors["scale_err"],
        "mAOE": errors["orient_err"],
        "per_class": per_class,
        "classes_without_gt": [n for n, e in per_class.items() if e["mean_AP"] is None],
        "dist_thresholds": [float(d) for d in dist_thresholds],
        "scenes": len(gt),
        "nds_formula": NDS_FORMULA,
        "ap_rule": AP_RULE,
    }
