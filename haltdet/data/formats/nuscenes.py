"""nuScenes LIDAR_TOP sweeps (``.pcd.bin``) with ``boxes.json`` labels -> haltdet frames.

``PATH`` is a folder of ``<token>.pcd.bin`` files (float32 x 5 columns: x, y, z,
intensity 0..255, ring index), or one such file. Frame ids are the file names without
``.pcd.bin``. Labels come from a ``boxes.json`` beside the sweeps, in this layout::

    {"points_file": "<token>.pcd.bin",      # the sweep these boxes belong to
     "boxes": [{"label": "car", "center_xyz": [x, y, z], "size_lwh": [l, w, h],
                "yaw": yaw, "num_lidar_pts": n}, ...]}

with boxes in the LIDAR_TOP frame, ``center_xyz`` the centre, ``l`` along the heading
and ``yaw`` counter-clockwise from +x: already the project convention, so only the
classes change. Sweeps not named by a ``boxes.json`` have no boxes. (The full nuScenes
database tables, with boxes in the global frame, are not read.)

Conventions:

* points: the LIDAR_TOP frame (x right, y forward, z up, origin the sensor, the road
  about 1.70 m below) turned by -90 degrees about z (x forward, y left) and moved down
  0.2 m into the project frame (the road at z = -1.9,
  :func:`haltdet.data.formats.to_project_frame`), boxes with them; intensity / 255,
  clipped to [0, 1]; the ring column is dropped;
* classes (the ten detection classes, by their short names): car, truck, bus, trailer,
  construction_vehicle -> Vehicle; pedestrian -> Pedestrian; bicycle and motorcycle
  (with or without rider; ``boxes.json`` carries no attributes) -> Cyclist, as Waymo
  labels motorcyclists; barrier, traffic_cone, other -> dropped; anything else is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from haltdet import InputError
from haltdet.data.formats import make_frame, map_classes, to_project_frame
from haltdet.data.frames import Frame, load_points_file

SUFFIX = ".pcd.bin"
LABEL_FILE = "boxes.json"
GROUND_BELOW_ORIGIN = 1.70
"""The road below LIDAR_TOP: the most populated height of the nuScenes-mini sweep's points
5-30 m out is 1.68 m below the sensor, its nearby boxes' bottoms 1.75 m."""
CLASS_MAP: dict[str, str | None] = {
    "car": "Vehicle", "truck": "Vehicle", "bus": "Vehicle", "trailer": "Vehicle",
    "construction_vehicle": "Vehicle",
    "pedestrian": "Pedestrian",
    "bicycle": "Cyclist", "motorcycle": "Cyclist",
    "barrier": None, "traffic_cone": None, "other": None,
}
"""nuScenes detection class -> haltdet class (None: dropped)."""


@dataclass
class Boxes:
    """The boxes of a ``boxes.json`` as stored: (M, 7) boxes, class names, point counts."""

    points_file: str
    boxes: np.ndarray
    labels: list[str]
    num_lidar_pts: np.ndarray


def read_boxes_json(path) -> Boxes:
    """Read and check a ``boxes.json`` (InputError naming the file and the problem)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("points_file"), str) \
            or not isinstance(data.get("boxes"), list):
        raise InputError(f"{path}: needs \"points_file\" (a string) and \"boxes\" (a list)")
    rows, labels, counts = [], [], []
    for i, box in enumerate(data["boxes"]):
        try:
            row = [float(v) for v in (*box["center_xyz"], *box["size_lwh"], box["yaw"])]
            if len(row) != 7 or not isinstance(box["label"], str):
                raise ValueError("center_xyz and size_lwh need 3 numbers each, label a string")
            rows.append(row)
            labels.append(box["label"])
            counts.append(int(box.get("num_lidar_pts", -1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: box {i} is malformed ({type(exc).__name__}: {exc}); needs label, "
                             "center_xyz, size_lwh, yaw") from exc
    return Boxes(data["points_file"], np.asarray(rows, dtype=np.float64).reshape(-1, 7), labels,
                 np.asarray(counts, dtype=np.int64))


class NuScenesSource:
    """LIDAR_TOP sweeps of one folder and the boxes of its ``boxes.json``."""

    def __init__(self, path) -> None:
        path = Path(path)
        if path.is_file() and path.name.endswith(SUFFIX):
            self.folder, files = path.parent, [path]
        elif path.is_dir():
            self.folder, files = path, sorted(path.glob(f"*{SUFFIX}"))
        else:
            raise InputError(f"{path}: not found (expected a folder of *{SUFFIX} files or one such file)")
        if not files:
            raise InputError(f"{path}: no *{SUFFIX} files")
        self.ids = [f.name[: -len(SUFFIX)] for f in files]
        label_path = self.folder / LABEL_FILE
        self.labels = read_boxes_json(label_path) if label_path.exists() else None
        if self.labels is not None and not (self.folder / self.labels.points_file).is_file():
            raise InputError(f"{label_path}: its points_file {self.labels.points_file!r} is not in {self.folder}")

    def frame_ids(self) -> list[str]:
        return list(self.ids)

    def read(self, frame_id: str) -> Frame:
        points_path = self.folder / f"{frame_id}{SUFFIX}"
        points = load_points_file(points_path, columns=5, intensity_scale=1.0)  # scaled below
        points[:, 3] = np.clip(points[:, 3] / 255.0, 0.0, 1.0)
        boxes, labels = np.zeros((0, 7)), np.zeros(0, np.int64)
        where = points_path
        if self.labels is not None and self.labels.points_file == points_path.name:
            where = self.folder / LABEL_FILE
            keep, labels = map_classes(self.labels.labels, CLASS_MAP, where)
            boxes = self.labels.boxes[keep]
        points, boxes = to_project_frame(points, boxes, GROUND_BELOW_ORIGIN, yaw=-math.pi / 2)
        return make_frame(frame_id, points, boxes, labels, where)


def open_source(path) -> NuScenesSource:
    return NuScenesSource(path)
