"""Argoverse 2 sensor-dataset logs -> haltdet frames (needs ``pip install haltdet[real]``).

``PATH`` is a log folder, or a folder of log folders (a split)::

    LOG/sensors/lidar/<timestamp_ns>.feather   x, y, z (float16, ego frame), intensity (uint8),
                                               laser_number, offset_ns
    LOG/annotations.feather                    one cuboid per row: timestamp_ns, category,
                                               length_m, width_m, height_m, qw, qx, qy, qz,
                                               tx_m, ty_m, tz_m, num_interior_pts, ...

Frame ids are the sweep timestamps (``<log>_<timestamp>`` for a split folder); a sweep's
boxes are the annotation rows with its timestamp. Without ``annotations.feather`` (the
test split) frames have no boxes. Conventions:

* points: the ego-vehicle frame (x forward, y left, z up, origin at the rear axle, about
  0.4 m above the road; both LiDARs merged) moved down 1.5 m into the project frame (the
  road at z = -1.9, :func:`haltdet.data.formats.to_project_frame`), boxes with them;
  float16 values; intensity / 255, clipped to [0, 1];
* boxes: ``(tx, ty, tz)`` is the centre, ``length_m`` along the heading, yaw the rotation
  of the quaternion about z (AV2 cuboids are upright);
* classes: REGULAR_VEHICLE, LARGE_VEHICLE, BUS, SCHOOL_BUS, ARTICULATED_BUS, BOX_TRUCK,
  TRUCK, TRUCK_CAB, VEHICULAR_TRAILER -> Vehicle; PEDESTRIAN, OFFICIAL_SIGNALER ->
  Pedestrian; BICYCLIST, MOTORCYCLIST (the riders) -> Cyclist. Dropped: BICYCLE and
  MOTORCYCLE (the vehicles, ridden or parked, boxed separately from their riders),
  RAILED_VEHICLE (as KITTI's Tram), MESSAGE_BOARD_TRAILER and TRAFFIC_LIGHT_TRAILER
  (signage), WHEELED_RIDER, WHEELED_DEVICE, WHEELCHAIR, STROLLER, DOG, ANIMAL and the
  static objects. A category outside the 30 of AV2 is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from haltdet import InputError
from haltdet.data.formats import make_frame, map_classes, to_project_frame
from haltdet.data.frames import Frame, validate_points

LIDAR_DIR = Path("sensors") / "lidar"
GROUND_BELOW_ORIGIN = 0.40
"""The road below the ego frame's origin (the rear axle): the most populated height of
the av2-api test log's points 5-30 m out is 0.43 m below it, its nearby cuboids' bottoms
0.36 m."""
ANNOTATIONS = "annotations.feather"
POINT_COLUMNS = ("x", "y", "z", "intensity")
BOX_COLUMNS = ("timestamp_ns", "category", "length_m", "width_m", "height_m", "qw", "qx", "qy", "qz",
               "tx_m", "ty_m", "tz_m", "num_interior_pts")

_VEHICLE = ("REGULAR_VEHICLE", "LARGE_VEHICLE", "BUS", "SCHOOL_BUS", "ARTICULATED_BUS", "BOX_TRUCK", "TRUCK",
            "TRUCK_CAB", "VEHICULAR_TRAILER")
_DROPPED = ("BICYCLE", "MOTORCYCLE", "RAILED_VEHICLE", "MESSAGE_BOARD_TRAILER", "TRAFFIC_LIGHT_TRAILER",
            "WHEELED_RIDER", "WHEELED_DEVICE", "WHEELCHAIR", "STROLLER", "DOG", "ANIMAL", "BOLLARD",
            "CONSTRUCTION_CONE", "CONSTRUCTION_BARREL", "SIGN", "STOP_SIGN", "MOBILE_PEDESTRIAN_CROSSING_SIGN")
CLASS_MAP: dict[str, str | None] = {
    **{c: "Vehicle" for c in _VEHICLE},
    "PEDESTRIAN": "Pedestrian", "OFFICIAL_SIGNALER": "Pedestrian",
    "BICYCLIST": "Cyclist", "MOTORCYCLIST": "Cyclist",
    **{c: None for c in _DROPPED},
}
"""AV2 category (all 30) -> haltdet class (None: dropped)."""


def _feather(path):
    """pyarrow's feather module, or an InputError saying how to install it."""
    try:
        from pyarrow import feather
    except ImportError as exc:
        raise InputError(f"{path}: reading Argoverse 2 needs pyarrow: pip install haltdet[real]") from exc
    return feather


def read_feather(path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named columns of a feather file as numpy arrays (InputError naming the file);
    every column but ``category`` must be numeric."""
    feather = _feather(path)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = feather.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise InputError(f"{path}: truncated or corrupt feather file ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (has {table.column_names})")
    arrays = {c: table.column(c).to_numpy() for c in columns}
    for name, values in arrays.items():
        if name != "category" and not (np.issubdtype(values.dtype, np.number) and values.dtype.kind != "c"):
            raise InputError(f"{path}: column '{name}' has type {table.schema.field(name).type}, expected numbers")
    return arrays


@dataclass
class Annotations:
    """A sweep's cuboids as stored, before class mapping: (M, 7) boxes in the project
    convention (float64), AV2 categories and the dataset's ``num_interior_pts``."""

    boxes: np.ndarray
    categories: list[str]
    num_interior_pts: np.ndarray


def _select(table: dict[str, np.ndarray], timestamp: int) -> Annotations:
    rows = np.flatnonzero(table["timestamp_ns"] == timestamp)
    col = {name: np.asarray(values[rows], dtype=np.float64) for name, values in table.items()
           if name not in ("timestamp_ns", "category")}
    qw, qx, qy, qz = col["qw"], col["qx"], col["qy"], col["qz"]
    yaw = np.arctan2(2 * (qw * qz + qx * qy), 1 - 2 * (qy * qy + qz * qz))
    boxes = np.stack([col["tx_m"], col["ty_m"], col["tz_m"], col["length_m"], col["width_m"],
                      col["height_m"], yaw], axis=1)
    return Annotations(boxes, [str(c) for c in table["category"][rows]],
                       col["num_interior_pts"].astype(np.int64))


def read_annotations(log, timestamp: int) -> Annotations:
    """The cuboids of the sweep ``timestamp`` (ns) of a log, before class mapping."""
    return _select(read_feather(Path(log) / ANNOTATIONS, BOX_COLUMNS), int(timestamp))


def read_sweep(path) -> np.ndarray:
    """A sweep's points as (N, 4) float32 x, y, z, intensity in [0, 1]."""
    cols = read_feather(path, POINT_COLUMNS)
    points = np.stack([cols[c].astype(np.float32) for c in POINT_COLUMNS], axis=1)
    points[:, 3] = np.clip(points[:, 3] / 255.0, 0.0, 1.0)
    return validate_points(points, path)


class AV2Source:
    """The sweeps of one AV2 log, or of every log in a split folder."""

    def __init__(self, path) -> None:
        self.root = Path(path)
        _feather(self.root)
        if (self.root / LIDAR_DIR).is_dir():
            self.logs = {"": self.root}
        else:
            found = sorted(p for p in self.root.glob("*") if (p / LIDAR_DIR).is_dir()) if self.root.is_dir() else []
            if not found:
                raise InputError(f"{self.root}: not an Argoverse 2 log (no {LIDAR_DIR}) nor a folder of logs")
            self.logs = {p.name: p for p in found}
        self.ids = [f"{name}_{f.stem}" if name else f.stem
                    for name, log in self.logs.items() for f in sorted((log / LIDAR_DIR).glob("*.feather"))]
        if not self.ids:
            raise InputError(f"{self.root}: no sweeps in {LIDAR_DIR}")
        self._tables: dict[str, dict[str, np.ndarray] | None] = {}

    def frame_ids(self) -> list[str]:
        return list(self.ids)

    def read(self, frame_id: str) -> Frame:
        name, _, stamp = frame_id.rpartition("_")
        if name not in self.logs or not stamp.isdigit():
            raise InputError(f"{self.root}: no sweep {frame_id!r} (ids are "
                             f"{'<log>_<timestamp>' if '' not in self.logs else '<timestamp>'})")
        log = self.logs[name]
        points = read_sweep(log / LIDAR_DIR / f"{stamp}.feather")
        if name not in self._tables:
            path = log / ANNOTATIONS
            self._tables[name] = read_feather(path, BOX_COLUMNS) if path.exists() else None
        table = self._tables[name]
        if table is None:
            return make_frame(frame_id, *to_project_frame(points, np.zeros((0, 7)), GROUND_BELOW_ORIGIN),
                              np.zeros(0, np.int64), log)
        annotations = _select(table, int(stamp))
        keep, labels = map_classes(annotations.categories, CLASS_MAP, log / ANNOTATIONS)
        points, boxes = to_project_frame(points, annotations.boxes[keep], GROUND_BELOW_ORIGIN)
        return make_frame(frame_id, points, boxes, labels, log / ANNOTATIONS)


def open_source(path) -> AV2Source:
    return AV2Source(path)
