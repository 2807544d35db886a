"""Waymo-Open-Dataset-style 3D detection metric: AP and APH at LEVEL_1 / LEVEL_2.

What is computed (per class, per difficulty level):

* Ground truth boxes with ``num_points == 0`` are removed (only when ``num_points`` is
  given). A prediction that overlaps a removed box is an ordinary false positive.
* Difficulty of a ground truth box: its ``difficulty`` value if that is 1 or 2; otherwise
  (``difficulty`` absent, or 0 = "not set") derived from ``num_points``: LEVEL_2 for
  1..5 points, LEVEL_1 above; LEVEL_1 when neither is given.
* For each score cutoff c in 0.00, 0.01, ..., 1.00, per frame and class, the predictions
  with ``score >= c`` are matched one-to-one to the ground truth boxes by a maximum-weight
  bipartite matching (Hungarian, scipy ``linear_sum_assignment``) on 3D IoU, where only
  pairs with ``IoU >= IOU_THRESHOLDS[class]`` are eligible (others get weight 0 and are
  discarded if the solver pairs them).
* TP = matched predictions (at both levels, including predictions matched to a LEVEL_2
  box at LEVEL_1), FP = unmatched predictions, FN(level) = unmatched ground truth boxes
  of difficulty <= level.
* precision = TP / (TP + FP); heading-weighted precision = sum over TPs of
  (1 - |dyaw| / pi), dyaw wrapped to [0, pi], divided by (TP + FP);
  recall = TP / (TP + FN). Cutoffs with no predictions (TP + FP = 0) give no point.
* AP integration rule: from the (recall, precision) points of all cutoffs, take the
  sorted distinct recalls r_1 < r_2 < ... < r_n and the envelope
  p_env(r) = max precision over all points with recall >= r. Then
  ``AP = sum_i (r_i - r_{i-1}) * p_env(r_i)`` with r_0 = 0, i.e. the exact integral of the
  (non-increasing, piecewise constant) envelope from recall 0 to the largest recall
  reached. APH is the same with heading-weighted precision (its own envelope).
* A class with no ground truth at a level gets AP = APH = NaN there (``None`` in JSON
  from :func:`result_to_json`) and is left out of the means ``mAP_L1`` etc.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from haltdet import CLASSES, InputError
from haltdet.boxes import BOX_DIM, iou_3d

IOU_THRESHOLDS: dict[str, float] = {"Vehicle": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
LEVELS: tuple[str, str] = ("LEVEL_1", "LEVEL_2")
SCORE_CUTOFFS: np.ndarray = np.arange(101) / 100.0
"""0.00, 0.01, ..., 1.00 (each the nearest double to k/100)."""

MAX_LEVEL2_POINTS = 5
"""Ground truth with 1..5 points is LEVEL_2 when no difficulty is given."""


@dataclass
class FrameBoxes:
    """One frame's boxes (numpy). Ground truth or predictions."""

    frame_id: str
    boxes: np.ndarray  # (M, 7) float
    labels: np.ndarray  # (M,) int64 index into CLASSES
    scores: np.ndarray | None = None  # (M,) predictions
    num_points: np.ndarray | None = None  # (M,) ground truth, optional
    difficulty: np.ndarray | None = None  # (M,) 1|2 (0 = not set) ground truth, optional


# ---------------------------------------------------------------------------------------
# Matching and accumulation
# ---------------------------------------------------------------------------------------

# Columns of the per-cutoff statistics.
_TP, _FP, _HTP, _FN1, _FN2 = range(5)


def _gt_levels(frame: FrameBoxes) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, level in {1, 2}) of a ground truth frame's boxes."""
    m = len(frame.boxes)
    keep = np.ones(m, dtype=bool)
    level = np.ones(m, dtype=np.int64)
    if frame.num_points is not None:
        npts = np.asarray(frame.num_points)
        keep = npts > 0
        level = np.where(npts <= MAX_LEVEL2_POINTS, 2, 1)
    if frame.difficulty is not None:
        diff = np.asarray(frame.difficulty).astype(np.int64)
        level = np.where((diff == 1) | (diff == 2), diff, level)
    return keep, level


def match_boxes(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight one-to-one matching of predictions (rows) to ground truth (columns).

    Only pairs with ``iou >= threshold`` can be matched. Returns (pred_idx, gt_idx) of the
    matched pairs.
    """
    eligible = iou >= threshold
    rows = np.flatnonzero(eligible.any(axis=1))
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    cols = np.flatnonzero(eligible.any(axis=0))
    sub_eligible = eligible[np.ix_(rows, cols)]
    weight = np.where(sub_eligible, iou[np.ix_(rows, cols)], 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    ok = sub_eligible[r, c]
    return rows[r[ok]], cols[c[ok]]


def _frame_class_stats(
    gt_boxes: np.ndarray,
    gt_level: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """(len(SCORE_CUTOFFS), 5) statistics TP, FP, heading-weighted TP, FN_L1, FN_L2."""
    n_cut = len(SCORE_CUTOFFS)
    stats = np.zeros((n_cut, 5), dtype=np.float64)
    order = np.argsort(-pred_scores, kind="stable")
    sorted_scores = pred_scores[order]
    # Predictions with score >= cutoff are a prefix of the sorted order; its length:
    counts = np.searchsorted(-sorted_scores, -SCORE_CUTOFFS, side="right")
    n_l1 = int((gt_level == 1).sum())
    n_gt = len(gt_boxes)
    if n_gt == 0 or len(order) == 0:
        stats[:, _FP] = counts
        stats[:, _FN1] = n_l1
        stats[:, _FN2] = n_gt
        return stats
    pb = pred_boxes[order].astype(np.float64)
    iou = iou_3d(pb, gt_boxes.astype(np.float64))  # (P, G)
    dyaw = np.abs((pb[:, None, 6] - gt_boxes[None, :, 6] + math.pi) % (2 * math.pi) - math.pi)
    heading_w = 1.0 - np.minimum(dyaw, math.pi) / math.pi
    cache: dict[int, np.ndarray] = {}
    for ci, k in enumerate(counts):
        k = int(k)
        if k not in cache:
            row = np.zeros(5)
            if k > 0:
                pi_, gi = match_boxes(iou[:k], threshold)
                tp = len(pi_)
                matched = np.zeros(n_gt, dtype=bool)
                matched[gi] = True
                row[_TP] = tp
                row[_FP] = k - tp
                row[_HTP] = heading_w[pi_, gi].sum()
                row[_FN1] = int(((gt_level == 1) & ~matched).sum())
                row[_FN2] = n_gt - tp
            else:
                row[_FN1], row[_FN2] = n_l1, n_gt
            cache[k] = row
        stats[ci] = cache[k]
    return stats


def envelope_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope: sum_i (r_i - r_{i-1}) * max{p_j : r_j >= r_i}.

    r_1 < ... < r_n are the distinct recalls of the points, r_0 = 0. Points with NaN
    precision are ignored; no points -> 0.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    ok = ~np.isnan(precision) & ~np.isnan(recall)
    recall, precision = recall[ok], precision[ok]
    if recall.size == 0:
        return 0.0
    distinct = np.unique(recall)  # sorted
    best = np.full(distinct.shape, -np.inf)
    np.maximum.at(best, np.searchsorted(distinct, recall), precision)
    envelope = np.maximum.accumulate(best[::-1])[::-1]
    widths = np.diff(np.concatenate([[0.0], distinct]))
    return float((widths * envelope).sum())


def _ap_from_stats(tp, fp, htp, fn) -> tuple[float, float]:
    with np.errstate(invalid="ignore", divide="ignore"):
        n_pred = tp + fp
        precision = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), np.nan)
        precision_h = np.where(n_pred > 0, htp / np.maximum(n_pred, 1), np.nan)
        denom = tp + fn
        recall = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
    return envelope_ap(recall, precision), envelope_ap(recall, precision_h)


def _check_frame(frame: FrameBoxes, what: str, need_scores: bool) -> None:
    where = f"{what} frame {frame.frame_id!r}"
    boxes = np.asarray(frame.boxes)
    if boxes.ndim != 2 or boxes.shape[1] != BOX_DIM:
        raise InputError(f"{where}: boxes must have shape (M, 7), got {boxes.shape}")
    m = boxes.shape[0]
    if not np.all(np.isfinite(boxes)):
        raise InputError(f"{where}: boxes contain NaN or inf")
    labels = np.asarray(frame.labels)
    if labels.shape != (m,):
        raise InputError(f"{where}: labels must have shape ({m},), got {labels.shape}")
    if m and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise InputError(f"{where}: labels must be integer indices into {CLASSES}")
    if need_scores:
        if frame.scores is None:
            raise InputError(f"{where}: predictions need scores")
        scores = np.asarray(frame.scores)
        if scores.shape != (m,):
            raise InputError(f"{where}: scores must have shape ({m},), got {scores.shape}")
        if m and (not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1):
            raise InputError(f"{where}: scores must be in [0, 1]")
    for name in ("num_points", "difficulty"):
        value = getattr(frame, name)
        if value is not None and np.asarray(value).shape != (m,):
            raise InputError(f"{where}: {name} must have shape ({m},), got {np.asarray(value).shape}")


def _index_frames(frames: list[FrameBoxes], what: str, need_scores: bool) -> dict[str, FrameBoxes]:
    out: dict[str, FrameBoxes] = {}
    for frame in frames:
        if frame.frame_id in out:
            raise InputError(f"{what}: duplicate frame id {frame.frame_id!r}")
        _check_frame(frame, what, need_scores)
        out[frame.frame_id] = frame
    return out


def evaluate(gt: list[FrameBoxes], pred: list[FrameBoxes], bootstrap: int = 0, seed: int = 0,
             against: list[FrameBoxes] | None = None) -> dict:
    """Waymo-style AP / APH of predictions against ground truth (see the module docstring).

    Frames are matched by ``frame_id``; a prediction frame without a ground truth frame is
    an :class:`InputError`; a ground truth frame without a prediction frame has no
    predictions.

    Returns:
        ``result[class_name][level]`` = {"AP", "APH", "num_gt", "num_pred"} for level in
        "LEVEL_1", "LEVEL_2" (AP/APH NaN when num_gt is 0), plus "mAP_L1", "mAPH_L1",
        "mAP_L2", "mAPH_L2" (means over classes with ground truth at that level; NaN if
        none) and "num_frames" (number of ground truth frames).
        With ``bootstrap`` > 0 also "bootstrap": the evaluation noise of the split, the
        spread of mAPH_L2 over that many sets of frames drawn from it with replacement
        (``seed``): {"samples", "seed", "mAPH_L2_std", "mAPH_L2_p5", "mAPH_L2_p95"}.
        With ``against`` (other predictions for the same frames) also "against": their
        mAPH_L2 and the difference of these predictions' from it, with, given
        ``bootstrap``, the difference's spread over the same resampled frame sets
        ("difference_std", "difference_p5", "difference_p95"): whether a difference
        exceeds the split's noise.
    """
    gt_by_id = _index_frames(gt, "ground truth", need_scores=False)
    keep_frames = bootstrap > 0 and len(gt_by_id) > 0  # keep every frame's statistics to resample them
    def totals(stats):  # the split's statistics, summed over frames
        return [x.sum(0) for x in stats] if keep_frames else stats

    stats = _split_statistics(gt_by_id, pred, keep_frames)
    result = _metrics(*totals(stats))
    result["num_frames"] = len(gt_by_id)
    other = None
    if against is not None:
        other = _split_statistics(gt_by_id, against, keep_frames)
        base = _metrics(*totals(other))["mAPH_L2"]
        result["against"] = {"mAPH_L2": base, "difference": result["mAPH_L2"] - base}
    if keep_frames:
        rng = np.random.default_rng(seed)
        frames = len(gt_by_id)
        values, differences = [], []
        for _ in range(bootstrap):
            weight = np.bincount(rng.integers(0, frames, frames), minlength=frames)
            value = _metrics(*(np.tensordot(weight, x, 1) for x in stats))["mAPH_L2"]
            values.append(value)
            if other is not None:
                differences.append(value - _metrics(*(np.tensordot(weight, x, 1) for x in other))["mAPH_L2"])
        result["bootstrap"] = {"samples": bootstrap, "seed": seed, **_spread("mAPH_L2", values)}
        if other is not None:
            result["against"].update(_spread("difference", differences))
    return result


def _spread(name: str, values: list[float]) -> dict:
    values = np.array(values)
    return {f"{name}_std": float(np.nanstd(values)), f"{name}_p5": float(np.nanpercentile(values, 5)),
            f"{name}_p95": float(np.nanpercentile(values, 95))}


def _split_statistics(gt_by_id: dict[str, FrameBoxes], pred: list[FrameBoxes], per_frame: bool):
    """The matching statistics of predictions on the split (`_frame_statistics`): stacked
    per frame (each array with a leading frame axis), or summed over the frames."""
    pred_by_id = _index_frames(pred, "predictions", need_scores=True)
    unknown = [fid for fid in pred_by_id if fid not in gt_by_id]
    if unknown:
        raise InputError(
            f"predictions: {len(unknown)} frame(s) have no ground truth frame, e.g. {unknown[0]!r}"
        )
    frame_stats = _frame_statistics(gt_by_id, pred_by_id)
    if per_frame:
        return [np.stack(x) for x in zip(*frame_stats)]
    sums = [np.zeros((len(CLASSES), len(SCORE_CUTOFFS), 5)), np.zeros((len(CLASSES), 2), np.int64),
            np.zeros(len(CLASSES), np.int64)]
    for frame in frame_stats:
        for total, x in zip(sums, frame):
            total += x
    return sums


def _frame_statistics(gt_by_id: dict[str, FrameBoxes], pred_by_id: dict[str, FrameBoxes]):
    """Per ground-truth frame: per class the matching statistics at every score cutoff
    (classes, cutoffs, 5), the ground truth counts per level (classes, 2) and the
    prediction counts (classes,). A generator."""
    n_cls = len(CLASSES)
    empty_boxes = np.zeros((0, BOX_DIM))
    for fid, g in gt_by_id.items():
        totals = np.zeros((n_cls, len(SCORE_CUTOFFS), 5), dtype=np.float64)
        num_gt = np.zeros((n_cls, 2), dtype=np.int64)
        num_pred = np.zeros(n_cls, dtype=np.int64)
        keep, level = _gt_levels(g)
        g_boxes = np.asarray(g.boxes, dtype=np.float64)[keep]
        g_labels = np.asarray(g.labels)[keep]
        g_level = level[keep]
        p = pred_by_id.get(fid)
        if p is not None:
            p_boxes = np.asarray(p.boxes, dtype=np.float64)
            p_labels = np.asarray(p.labels)
            p_scores = np.asarray(p.scores, dtype=np.float64)
        else:
            p_boxes, p_labels, p_scores = empty_boxes, np.zeros(0, np.int64), np.zeros(0)
        for c, name in enumerate(CLASSES):
            gm = g_labels == c
            pm = p_labels == c
            num_gt[c] = int((g_level[gm] == 1).sum()), int(gm.sum())
            num_pred[c] = int(pm.sum())
            if gm.any() or pm.any():
                totals[c] = _frame_class_stats(g_boxes[gm], g_level[gm], p_boxes[pm], p_scores[pm],
                                               IOU_THRESHOLDS[name])
        yield totals, num_gt, num_pred


def _metrics(totals: np.ndarray, num_gt: np.ndarray, num_pred: np.ndarray) -> dict:
    """AP/APH per class and level and their means from summed statistics (`evaluate`)."""
    result: dict = {}
    means: dict[str, list[float]] = {k: [] for k in ("mAP_L1", "mAPH_L1", "mAP_L2", "mAPH_L2")}
    for c, name in enumerate(CLASSES):
        result[name] = {}
        t = totals[c]
        for li, level_name in enumerate(LEVELS):
            fn = t[:, _FN1] if li == 0 else t[:, _FN2]
            if num_gt[c, li] > 0:
                ap, aph = _ap_from_stats(t[:, _TP], t[:, _FP], t[:, _HTP], fn)
                suffix = f"_L{li + 1}"
                means["mAP" + suffix].append(ap)
                means["mAPH" + suffix].append(aph)
            else:
                ap = aph = float("nan")
            result[name][level_name] = {
                "AP": ap,
                "APH": aph,
                "num_gt": int(num_gt[c, li]),
                "num_pred": int(num_pred[c]),
            }
    for key, values in means.items():
        result[key] = float(np.mean(values)) if values else float("nan")
    return result


# ---------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def result_to_json(result: dict, indent: int | None = 2) -> str:
    """Serialise an :func:`evaluate` result as strict JSON (NaN -> null)."""
    return json.dumps(_nan_to_none(result), indent=indent)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_frame(raw, idx: int, path, kind: str, seen: set) -> FrameBoxes:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: frame #{idx}: must be an object, got {type(raw).__name__}")
    if "frame_id" not in raw:
        raise InputError(f"{path}: frame #{idx}: missing key 'frame_id'")
    fid = raw["frame_id"]
    if not isinstance(fid, str):
        raise InputError(f"{path}: frame #{idx}: 'frame_id' must be a string, got {fid!r}")
    where = f"{path}: frame {fid!r}"
    if fid in seen:
        raise InputError(f"{where}: duplicate frame id")
    seen.add(fid)
    for key in ("boxes", "labels") + (("scores",) if kind == "pred" else ()):
        if key not in raw:
            raise InputError(f"{where}: missing key {key!r}")
    boxes_raw = raw["boxes"]
    if not isinstance(boxes_raw, list):
        raise InputError(f"{where}: 'boxes' must be a list")
    for i, row in enumerate(boxes_raw):
        if not isinstance(row, list) or len(row) != BOX_DIM or not all(_is_number(v) for v in row):
            raise InputError(f"{where}: box {i} must be a list of 7 numbers (x, y, z, l, w, h, yaw), got {row!r}")
        if not all(math.isfinite(v) for v in row):
            raise InputError(f"{where}: box {i} has a non-finite value: {row!r}")
    m = len(boxes_raw)
    boxes = np.asarray(boxes_raw, dtype=np.float64).reshape(m, BOX_DIM)
    if np.any(boxes[:, 3:6] < 0):
        raise InputError(f"{where}: box sizes (l, w, h) must be non-negative")

    def seq(key: str) -> list:
        value = raw[key]
        if not isinstance(value, list):
            raise InputError(f"{where}: {key!r} must be a list")
        if len(value) != m:
            raise InputError(f"{where}: {key!r} has {len(value)} entries but there are {m} boxes")
        return value

    labels = []
    for i, lab in enumerate(seq("labels")):
        if isinstance(lab, str):
            if lab not in CLASSES:
                raise InputError(f"{where}: label {i}: unknown class name {lab!r} (known: {', '.join(CLASSES)})")
            labels.append(CLASSES.index(lab))
        elif isinstance(lab, int) and not isinstance(lab, bool) and 0 <= lab < len(CLASSES):
            labels.append(lab)
        else:
            raise InputError(f"{where}: label {i}: unknown class {lab!r} (known: {', '.join(CLASSES)})")
    frame = FrameBoxes(fid, boxes, np.asarray(labels, dtype=np.int64).reshape(m))

    if kind == "pred":
        scores = seq("scores")
        for i, s in enumerate(scores):
            if not _is_number(s) or not (0.0 <= s <= 1.0):
                raise InputError(f"{where}: score {i} must be a number in [0, 1], got {s!r}")
        frame.scores = np.asarray(scores, dtype=np.float64).reshape(m)
    else:
        if raw.get("num_points") is not None:
            npts = seq("num_points")
            for i, v in enumerate(npts):
                if not _is_number(v) or not math.isfinite(v) or v < 0 or v != int(v):
                    raise InputError(f"{where}: num_points {i} must be a non-negative integer, got {v!r}")
            frame.num_points = np.asarray(npts, dtype=np.int64).reshape(m)
        if raw.get("difficulty") is not None:
            diff = seq("difficulty")
            for i, v in enumerate(diff):
                if not _is_number(v) or v not in (0, 1, 2):
                    raise InputError(f"{where}: difficulty {i} must be 1 or 2 (0 = not set), got {v!r}")
            frame.difficulty = np.asarray(diff, dtype=np.int64).reshape(m)
    return frame


def load_boxes_json(path, kind: str) -> list[FrameBoxes]:
    """Read a JSON box file (``kind`` "gt" or "pred"); see the module docs for the format.

    ``{"frames": [{"frame_id", "boxes", "labels", "scores" (pred), "num_points",
    "difficulty" (gt, optional)}]}``; labels are class names or integer indices.
    Raises :class:`InputError` naming the file, the frame and the problem.
    """
    if kind not in ("gt", "pred"):
        raise InputError(f"kind must be 'gt' or 'pred', got {kind!r}")
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a box file") from None
    if not isinstance(data, dict) or "frames" not in data:
        raise InputError(f"{path}: top level must be an object with key 'frames'")
    if not isinstance(data["frames"], list):
        raise InputError(f"{path}: 'frames' must be a list")
    seen: set = set()
    return [_parse_frame(raw, i, path, kind, seen) for i, raw in enumerate(data["frames"])]


def save_boxes_json(path, frames: list[FrameBoxes], kind: str) -> None:
    """Write frames in the format read by :func:`load_boxes_json` (labels as class names)."""
    if kind not in ("gt", "pred"):
        raise InputError(f"kind must be 'gt' or 'pred', got {kind!r}")
    out = []
    for fr in frames:
        boxes = np.asarray(fr.boxes, dtype=np.float64).reshape(-1, BOX_DIM)
        item: dict = {
            "frame_id": str(fr.frame_id),
            "boxes": boxes.tolist(),
            "labels": [CLASSES[int(i)] for i in np.asarray(fr.labels).reshape(-1)],
        }
        if kind == "pred":
            if fr.scores is None:
                raise InputError(f"frame {fr.frame_id!r}: predictions need scores")
            item["scores"] = np.asarray(fr.scores, dtype=np.float64).reshape(-1).tolist()
        else:
            if fr.num_points is not None:
                item["num_points"] = [int(v) for v in np.asarray(fr.num_points).reshape(-1)]
            if fr.difficulty is not None:
                item["difficulty"] = [int(v) for v in np.asarray(fr.difficulty).reshape(-1)]
        out.append(item)
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        json.dump({"frames": out}, f)


def evaluate_files(gt_path, pred_path) -> dict:
    """:func:`evaluate` on two JSON box files."""
    return evaluate(load_boxes_json(gt_path, "gt"), load_boxes_json(pred_path, "pred"))


def format_table(result: dict) -> str:
    """Readable text table of an :func:`evaluate` result."""

    def num(v) -> str:
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"

    header = f"{'class':<11} {'L1 AP':>6} {'L1 APH':>6} {'L2 AP':>6} {'L2 APH':>6} {'gt L1':>6} {'gt L2':>6} {'pred':>6}"
    lines = [header, "-" * len(header)]
    for name in CLASSES:
        if name not in result:
            continue
        l1, l2 = result[name]["LEVEL_1"], result[name]["LEVEL_2"]
        lines.append(
            f"{name:<11} {num(l1['AP'])} {num(l1['APH'])} {num(l2['AP'])} {num(l2['APH'])} "
            f"{l1['num_gt']:>6d} {l2['num_gt']:>6d} {l1['num_pred']:>6d}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'mean':<11} {num(result.get('mAP_L1'))} {num(result.get('mAPH_L1'))} "
        f"{num(result.get('mAP_L2'))} {num(result.get('mAPH_L2'))}"
    )
    lines.append(f"frames: {result.get('num_frames', 0)}")
    return "\n".join(lines)
