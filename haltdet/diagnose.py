"""Oracle diagnosis: how much AP each box error costs.

Each prediction is matched to the same-class ground-truth box it overlaps most in BEV
(IoU > 0.1); one quantity of the matched predictions (centre x/y, z, size or heading) is
replaced by the ground truth's and the metric recomputed. The rise in AP says how much
that quantity's error costs.
"""

from __future__ import annotations

import numpy as np

from haltdet import CLASSES
from haltdet.boxes import iou_bev
from haltdet.evaluate import FrameBoxes, evaluate

COLUMNS = {"xy": [0, 1], "z": [2], "size": [3, 4, 5], "yaw": [6]}
EXPERIMENTS = ("", "xy", "z", "size", "yaw", "xy size", "xy z size yaw")


def with_ground_truth(predictions: list[FrameBoxes], ground_truth: list[FrameBoxes],
                      quantities: str) -> list[FrameBoxes]:
    """Copies of the predictions with the named quantities taken from matched GT boxes."""
    columns = [c for q in quantities.split() for c in COLUMNS[q]]
    out = []
    for pred, gt in zip(predictions, ground_truth):
        boxes = pred.boxes.copy()
        keep = gt.difficulty > 0
        gt_boxes, gt_labels = gt.boxes[keep], gt.labels[keep]
        if columns and len(boxes) and len(gt_boxes):
            overlap = np.asarray(iou_bev(boxes.astype(np.float64), gt_boxes.astype(np.float64)))
            overlap = np.where(pred.labels[:, None] == gt_labels[None], overlap, 0.0)
            match, matched = overlap.argmax(axis=1), overlap.max(axis=1) > 0.1
            boxes[np.ix_(matched, columns)] = gt_boxes[match[matched]][:, columns]
        out.append(FrameBoxes(pred.frame_id, boxes, pred.labels, scores=pred.scores))
    return out


def oracle_table(predictions: list[FrameBoxes], ground_truth: list[FrameBoxes]) -> list[dict]:
    """LEVEL_1 AP and APH per class for each experiment of EXPERIMENTS."""
    rows = []
    for quantities in EXPERIMENTS:
        result = evaluate(ground_truth, with_ground_truth(predictions, ground_truth, quantities))
        rows.append({"replaced": quantities or "nothing",
                     **{f"{c} AP": result[c]["LEVEL_1"]["AP"] for c in CLASSES},
                     **{f"{c} APH": result[c]["LEVEL_1"]["APH"] for c in CLASSES}})
    return rows
