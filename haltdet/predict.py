"""Running a detector over frames, and scoring it on a dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from haltdet.data.dataset import FrameFolder, collate
from haltdet.evaluate import FrameBoxes, evaluate
from haltdet.model.detector import Detector
from haltdet.model.head import Detections


def detect_points(model: Detector, points: np.ndarray, device="cpu") -> Detections:
    """Detect objects in one cloud: points (N, 4) numbers -> Detections on the CPU
    (`Detector.detect`). An empty cloud (or one with no point in range) has no
    detections; clouds of any size run within the model's input caps."""
    return model.to(device).detect(points)


@torch.no_grad()
def predict_dataset(model: Detector, data_dir, batch_size: int = 2, device="cpu",
                    progress: bool = True, num_workers: int = 1, frames: int = 0, camera_view: bool = True
                    ) -> tuple[list[FrameBoxes], list[FrameBoxes], list[dict]]:
    """Detections, ground truth and token statistics (`Detector.token_statistics`) for
    every frame of a dataset directory (the first `frames` only, if > 0).

    What can be scored: ground truth whose centre lies outside the model's range is
    ignored (no detection can be there); in frames whose labels are bounded by a camera
    view (KITTI), with `camera_view`, so are ground truth and detections whose centres the
    camera does not see."""
    dataset = FrameFolder(data_dir)
    if frames:
        dataset = Subset(dataset, range(min(frames, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    predictions, ground_truth, token_stats = [], [], []
    model.eval()
    for batch in tqdm(loader, desc="detect", unit="batch", disable=not progress, dynamic_ncols=True):
        output = model(batch.points.to(device))
        token_stats += model.token_statistics(output, batch.trainable()[0])
        for frame_id, detections, boxes, labels, num_points, difficulty, camera in zip(
                batch.frame_ids, model.decode(output), batch.boxes, batch.labels,
                batch.num_points, batch.difficulty, batch.cameras):
            pred_boxes, pred_labels = detections.boxes.cpu().numpy(), detections.labels.cpu().numpy()
            pred_scores = detections.scores.cpu().numpy()
            difficulty = np.where(in_range(boxes, model.config.point_cloud_range), difficulty, 0)
            if camera is not None and camera_view:
                seen = camera.sees(pred_boxes)
                pred_boxes, pred_labels, pred_scores = pred_boxes[seen], pred_labels[seen], pred_scores[seen]
                difficulty = np.where(camera.sees(boxes), difficulty, 0)
            predictions.append(FrameBoxes(frame_id, pred_boxes, pred_labels, scores=pred_scores))
            ground_truth.append(FrameBoxes(frame_id, boxes, labels, num_points=num_points,
                                           difficulty=difficulty))
    return predictions, ground_truth, token_stats


def in_range(boxes: np.ndarray, point_cloud_range: list[float]) -> np.ndarray:
    """Bool (M,): the boxes' centres lie inside the model's range in x and y."""
    r = point_cloud_range
    return ((boxes[:, 0] >= r[0]) & (boxes[:, 0] < r[3]) & (boxes[:, 1] >= r[1]) & (boxes[:, 1] < r[4]))


def summarise_tokens(token_stats: list[dict]) -> dict:
    """Per-frame token statistics averaged over frames (NaN entries skipped)."""
    summary = {}
    for key in token_stats[0]:
        values = np.array([s[key] for s in token_stats], dtype=np.float64)
        summary[key] = (values.mean(axis=0).tolist() if values.ndim > 1
                        else float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"))
    return summary


def evaluate_model(model: Detector, data_dir, batch_size: int = 2, device="cpu",
                   progress: bool = True, num_workers: int = 1, frames: int = 0, bootstrap: int = 0,
                   camera_view: bool = True, against: Detector | None = None) -> dict:
    """Waymo-style AP/APH of a model on a dataset directory (its first `frames`, if > 0),
    with its token statistics averaged per frame under "tokens", with `bootstrap` > 0 the
    split's evaluation noise, and with `against` the difference from that model on the same
    frames (`evaluate.evaluate`); what is scored: `predict_dataset`."""
    predictions, ground_truth, token_stats = predict_dataset(model, data_dir, batch_size, device, progress,
                                                             num_workers, frames, camera_view)
    other = None
    if against is not None:
        other = predict_dataset(against, data_dir, batch_size, device, progress, num_workers, frames, camera_view)[0]
    result = evaluate(ground_truth, predictions, bootstrap=bootstrap, against=other)
    if token_stats:
        result["tokens"] = summarise_tokens(token_stats)
    return result
