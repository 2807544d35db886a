"""Readers of real datasets into haltdet frames (:class:`haltdet.data.frames.Frame`).

Every format is a small module exposing ``open_source(path) -> Source``. A source lists
its frames and reads one at a time, converting at the boundary: points to (N, 4) float32
x, y, z, intensity in the project frame (x forward, y left, the road at
:data:`~haltdet.data.frames.GROUND_Z`: :func:`to_project_frame`), boxes to the project convention of
:mod:`haltdet.boxes`, classes to :data:`haltdet.CLASSES` (others dropped), and
``num_points`` / ``difficulty`` recounted from the points (:func:`make_frame`; Waymo
keeps its own per-box point counts and difficulty levels where the labels carry them).

A data argument is either a haltdet dataset directory or ``FORMAT:PATH`` (see
:func:`open_data`). The conventions of each format are in its module docstring and in
``docs/data_format.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from haltdet import CLASSES, InputError
from haltdet.boxes import count_points_in_boxes, wrap_angle
from haltdet.data.frames import (GROUND_Z, Frame, difficulty_from_points, frame_path, open_dataset,
                                 read_dataset_index, read_frame)

FORMATS = {
    "kitti": "haltdet.data.formats.kitti",
    "nuscenes": "haltdet.data.formats.nuscenes",
    "av2": "haltdet.data.formats.av2",
    "waymo": "haltdet.data.formats.waymo_v1",
    "waymo-v2": "haltdet.data.formats.waymo_v2",
}
"""Format name -> module (imported on first use)."""


class Source(Protocol):
    """A readable collection of frames."""

    def frame_ids(self) -> list[str]:
        ...

    def read(self, frame_id: str) -> Frame:
        ...


class FrameDirectory:
    """A haltdet dataset directory (``dataset.json`` + ``frames/``) as a :class:`Source`."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.index = read_dataset_index(self.root)
        self.paths = open_dataset(self.root)

    def frame_ids(self) -> list[str]:
        return list(self.index["frames"])

    def read(self, frame_id: str) -> Frame:
        return read_frame(frame_path(self.root, frame_id))


def open_format(name: str, path) -> Source:
    """The source of format `name` at `path` (InputError for an unknown format)."""
    if name not in FORMATS:
        raise InputError(f"{path}: unknown data format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return importlib.import_module(FORMATS[name]).open_source(path)


def parse_spec(spec) -> tuple[str | None, str]:
    """Split a data spec into (format, path): ``"kitti:/d"`` -> ("kitti", "/d").

    Only a prefix naming a known format (case-insensitive) counts as one, so paths that
    contain ':' (``C:\\data``, ``run:3``) stay paths: (None, spec).
    """
    text = str(spec)
    name, sep, rest = text.partition(":")
    if sep and name.lower() in FORMATS:
        return name.lower(), rest
    return None, text


def open_data(spec) -> Source:
    """The frames named by a data spec: ``FORMAT:PATH`` or a haltdet dataset directory."""
    name, path = parse_spec(spec)
    if name is not None:
        return open_format(name, path)
    if Path(path).is_dir() and not (Path(path) / "dataset.json").exists():
        raise InputError(f"{path}: not a haltdet dataset directory (no dataset.json); for a real "
                         f"dataset write FORMAT:PATH with FORMAT one of {', '.join(sorted(FORMATS))}")
    return FrameDirectory(path)


def data_source(spec) -> str | None:
    """What kind of data a spec holds: its format for ``FORMAT:PATH``, else the
    ``source`` its dataset.json records ("synth" for simulated data, the format for
    converted data); None if unknown."""
    name, path = parse_spec(spec)
    if name is not None:
        return name
    try:
        return read_dataset_index(path).get("source")
    except InputError:
        return None


def map_classes(names: Sequence[str], class_map: Mapping[str, str | None], where) -> tuple[np.ndarray, np.ndarray]:
    """Map dataset class names to haltdet classes.

    ``class_map`` lists every class of the dataset: its haltdet class name, or None to
    drop it. Returns (indices of the kept entries of ``names``, their class indices).
    A name missing from ``class_map`` is an InputError naming ``where``.
    """
    unknown = sorted(set(names) - set(class_map))
    if unknown:
        raise InputError(f"{where}: unknown class name(s) {unknown[:5]} (known: {', '.join(sorted(class_map))})")
    keep = [i for i, name in enumerate(names) if class_map[name] is not None]
    labels = [CLASSES.index(class_map[names[i]]) for i in keep]  # type: ignore[arg-type]
    return np.asarray(keep, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def to_project_frame(points: np.ndarray, boxes: np.ndarray, ground_below_origin: float,
                     yaw: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 4) and boxes (M, 7) of a dataset's frame, in the project frame
    (:data:`haltdet.data.frames.GROUND_Z`): rotated by `yaw` about z (to put x forward),
    then moved up or down so that the road, `ground_below_origin` metres below the
    dataset frame's origin, lies at GROUND_Z. Float64 arithmetic, float32 results."""
    points = np.asarray(points, dtype=np.float64).copy()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7).copy()
    if yaw:
        c, s = np.cos(yaw), np.sin(yaw)
        for xy in (points[:, :2], boxes[:, :2]):
            xy[:] = xy @ np.array([[c, s], [-s, c]])
        boxes[:, 6] = wrap_angle(boxes[:, 6] + yaw)
    dz = GROUND_Z + ground_below_origin
    points[:, 2] += dz
    boxes[:, 2] += dz
    return points.astype(np.float32), boxes.astype(np.float32)


def make_frame(frame_id: str, points: np.ndarray, boxes: np.ndarray, labels: np.ndarray, where) -> Frame:
    """A frame from converted points (N, 4) and boxes (M, 7), with ``num_points``
    recounted in float32 (as a reader of the written frame would) and ``difficulty``
    derived from it. Non-finite or non-positive-size boxes are an InputError."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 7)
    if not np.isfinite(boxes).all():
        raise InputError(f"{where}: boxes contain NaN or inf")
    if not (boxes[:, 3:6] > 0).all():
        raise InputError(f"{where}: boxes have non-positive sizes")
    num_points = count_points_in_boxes(points, boxes)
    return Frame(str(frame_id), points, boxes, np.asarray(labels, dtype=np.int64).reshape(-1),
                 num_points, difficulty_from_points(num_points))
