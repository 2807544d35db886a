"""Torch datasets over the frame format, augmentation, and batching of variable-size clouds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from haltdet.boxes import points_in_boxes, wrap_angle
from haltdet.config import DataConfig
from haltdet.data.formats import open_data
from haltdet.data.frames import CameraView, Frame, read_frame
from haltdet.model.pillars import PointBatch

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A training/evaluation batch.

    points: the frames' points, concatenated.
    boxes / labels / difficulty / num_points: per frame, every ground-truth box (numpy).
    frame_ids: per frame.
    cameras: per frame, the camera view bounding its labels, or None.
    """

    points: PointBatch
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    difficulty: list[np.ndarray]
    num_points: list[np.ndarray]
    frame_ids: list[str]
    cameras: list[CameraView | None]

    def trainable(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Boxes and labels that should be detected: boxes with at least one point."""
        keep = [d > 0 for d in self.difficulty]
        return ([b[k] for b, k in zip(self.boxes, keep)], [lab[k] for lab, k in zip(self.labels, keep)])


def collate(frames: list[Frame]) -> Batch:
    return Batch(
        points=PointBatch.from_list([torch.from_numpy(f.points) for f in frames]),
        boxes=[f.boxes for f in frames],
        labels=[f.labels for f in frames],
        difficulty=[f.difficulty for f in frames],
        num_points=[f.num_points for f in frames],
        frame_ids=[f.frame_id for f in frames],
        cameras=[f.camera for f in frames],
    )


class FrameFolder(Dataset):
    """Frames of a data spec (a haltdet dataset directory or ``FORMAT:PATH``, see
    :func:`haltdet.data.formats.open_data`), optionally augmented.

    Augmentation is random but reproducible: frame `i` in epoch `e` is augmented with a
    generator seeded by (seed, e, i), so runs, workers and resumes agree.
    """

    def __init__(self, root: str | Path, augment: DataConfig | None = None, seed: int = 0):
        self.source = open_data(root)
        self.frame_ids = self.source.frame_ids()
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.gt_database = None
        if augment is not None and augment.gt_sampling:
            self.gt_database = GTDatabase.build(self.source.read(fid) for fid in self.frame_ids)

    @property
    def paths(self) -> list[Path] | None:
        """The frame files when the data is a haltdet dataset directory, else None."""
        return getattr(self.source, "paths", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getitem__(self, index: int) -> Frame:
        frame = self.source.read(self.frame_ids[index])
        if self.augment is None:
            return frame
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.gt_database is not None:
            frame = self.gt_database.paste(frame, rng, self.augment.gt_sampling_max)
        return augment_frame(frame, self.augment, rng)


def augment_frame(frame: Frame, config: DataConfig, rng: np.random.Generator) -> Frame:
    """Global flip, rotation about z and scaling, applied to points and boxes alike."""
    points = frame.points.copy()
    boxes = frame.boxes.astype(np.float64).copy()
    if config.flip:
        if rng.random() < 0.5:  # mirror y
            points[:, 1] *= -1
            boxes[:, 1] *= -1
            boxes[:, 6] = -boxes[:, 6]
        if rng.random() < 0.5:  # mirror x
            points[:, 0] *= -1
            boxes[:, 0] *= -1
            boxes[:, 6] = np.pi - boxes[:, 6]
    angle = rng.uniform(-config.rotation, config.rotation)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    points[:, :2] = points[:, :2] @ rotation.T
    boxes[:, :2] = boxes[:, :2] @ rotation.T
    boxes[:, 6] += angle
    scale = rng.uniform(*config.scale)
    points[:, :3] *= scale
    boxes[:, :6] *= scale
    boxes[:, 6] = wrap_angle(boxes[:, 6])
    return Frame(frame.frame_id, points.astype(np.float32), boxes.astype(np.float32), frame.labels,
                 frame.num_points, frame.difficulty)


class GTDatabase:
    """Objects cut from training frames (their box and the points inside it), pasted into
    other frames at their original place when they collide with nothing there."""

    def __init__(self, objects: list[tuple[int, np.ndarray, np.ndarray]]):
        self.objects = objects  # (class index, box (7,), points (n, 4))
        self.by_class = {c: [i for i, o in enumerate(objects) if o[0] == c] for c in range(3)}

    @staticmethod
    def build(frames: Iterable[Frame | str | Path], min_points: int = 5) -> "GTDatabase":
        """Collect the objects with at least `min_points` points from frames (or frame files)."""
        objects, num_frames = [], 0
        for frame in frames:
            frame = frame if isinstance(frame, Frame) else read_frame(frame)
            num_frames += 1
            inside = points_in_boxes(frame.points, frame.boxes)
            for box, label, mask, count in zip(frame.boxes, frame.labels, inside, frame.num_points):
                if count >= min_points:
                    objects.append((int(label), box.copy(), frame.points[mask].copy()))
        log.info("ground-truth database: %d objects from %d frames", len(objects), num_frames)
        return GTDatabase(objects)

    def paste(self, frame: Frame, rng: np.random.Generator, max_per_class: list[int]) -> Frame:
        boxes, labels = list(frame.boxes), list(frame.labels)
        counts, difficulty = list(frame.num_points), list(frame.difficulty)
        pasted_points = []
        for cls, limit in enumerate(max_per_class):
            candidates = self.by_class[cls]
            if not candidates or limit == 0:
                continue
            for pick in rng.choice(len(candidates), size=min(limit, len(candidates)), replace=False):
                _, box, obj_points = self.objects[candidates[pick]]
                if _collides(box, boxes):
                    continue
                boxes.append(box)
                labels.append(cls)
                counts.append(len(obj_points))
                difficulty.append(1 if len(obj_points) > 5 else 2)
                pasted_points.append((box, obj_points))
        if not pasted_points:
            return frame
        new_boxes = np.stack([b for b, _ in pasted_points])
        # Remove the frame's own points inside the pasted boxes (slightly enlarged).
        occupied = points_in_boxes(frame.points, new_boxes, margin=0.1).any(axis=0)
        points = np.concatenate([frame.points[~occupied]] + [p for _, p in pasted_points])
        return Frame(frame.frame_id, points, np.stack(boxes).astype(np.float32),
                     np.asarray(labels, dtype=np.int64), np.asarray(counts, dtype=np.int64),
                     np.asarray(difficulty, dtype=np.int64))


def _collides(box: np.ndarray, boxes: list[np.ndarray], margin: float = 0.5) -> bool:
    """Conservative BEV collision test on bounding circles."""
    if not boxes:
        return False
    others = np.stack(boxes)
    radius = np.hypot(box[3], box[4]) / 2
    other_radius = np.hypot(others[:, 3], others[:, 4]) / 2
    distance = np.hypot(others[:, 0] - box[0], others[:, 1] - box[1])
    return bool((distance < radius + other_radius + margin).any())
