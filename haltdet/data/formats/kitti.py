"""KITTI 3D object benchmark layout -> haltdet frames.

``ROOT`` is a split folder (``training/`` or ``testing/``)::

    ROOT/velodyne/<id>.bin   float32 rows x, y, z, reflectance (Velodyne frame)
    ROOT/label_2/<id>.txt    one object per line (camera frame), absent for the test split
    ROOT/calib/<id>.txt      P0..P3, R0_rect, Tr_velo_to_cam, ... (needed for labels)

Frame ids are the ``velodyne`` file stems. Conventions:

* points: the Velodyne frame (x forward, y left, z up, origin the sensor, 1.73 m above
  the road) moved down 0.17 m into the project frame (the road at z = -1.9,
  :func:`haltdet.data.formats.to_project_frame`), boxes with them; the reflectance is
  already in [0, 1] and is only clipped to it;
* a label line is ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y``
  (a 16th value, a detection score, is allowed). ``x y z`` is the *bottom* centre in the
  rectified camera frame (y down); the centre is ``h / 2`` above it. Centre and heading
  are mapped to the Velodyne frame by the inverse of ``R0_rect @ Tr_velo_to_cam``; the
  heading vector (cos ry, 0, -sin ry) gives yaw, which for the ideal axis permutation is
  ``-rotation_y - pi / 2``. ``l`` is along the heading, ``w`` across, ``h`` vertical;
* classes: Car, Van, Truck -> Vehicle; Pedestrian, Person_sitting -> Pedestrian;
  Cyclist -> Cyclist; Tram, Misc, DontCare dropped; any other type is an error.

Without a ``label_2`` folder (the test split) frames have no boxes; with one, a frame's
missing label file is an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from haltdet import CLASSES, InputError
from haltdet.boxes import wrap_angle
from haltdet.data.formats import make_frame, map_classes, to_project_frame
from haltdet.data.frames import GROUND_Z, CameraView, Frame, load_points_file

IMAGE_SIZE = (1242.0, 375.0)
"""Width and height of most KITTI images (some are 1224 x 370 or 1238 x 374)."""
GROUND_BELOW_ORIGIN = 1.73
"""The road below the Velodyne (KITTI's setup: the scanner is mounted 1.73 m up)."""
CLASS_MAP: dict[str, str | None] = {
    "Car": "Vehicle", "Van": "Vehicle", "Truck": "Vehicle",
    "Pedestrian": "Pedestrian", "Person_sitting": "Pedestrian",
    "Cyclist": "Cyclist",
    "Tram": None, "Misc": None, "DontCare": None,
}
"""KITTI object type -> haltdet class (None: dropped)."""


def read_calib(path) -> np.ndarray:
    """The 4x4 transform from the rectified camera frame to the Velodyne frame:
    inverse of ``R0_rect @ Tr_velo_to_cam`` read from a KITTI calib file."""
    return np.linalg.inv(_calibration(path)[1])


def camera_view(path) -> CameraView:
    """The left colour camera's view (P2) in the project frame, from a KITTI calib file;
    the image is taken to be IMAGE_SIZE (calib files do not say)."""
    p2, velo_to_rect = _calibration(path)
    velo_from_project = np.eye(4)
    velo_from_project[2, 3] = -(GROUND_Z + GROUND_BELOW_ORIGIN)  # undo to_project_frame's move
    return CameraView(p2 @ velo_to_rect @ velo_from_project, *IMAGE_SIZE)


def _calibration(path) -> tuple[np.ndarray, np.ndarray]:
    """P2 (3, 4) and R0_rect @ Tr_velo_to_cam (4, 4) of a KITTI calib file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (calibration)")
    values: dict[str, list[float]] = {}
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        try:
            values[key.strip()] = [float(v) for v in rest.split()]
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: malformed calibration line ({exc})") from exc
    rect, velo_to_cam, p2 = np.eye(4), np.eye(4), np.zeros((3, 4))
    for key, size, matrix in (("R0_rect", 9, rect[:3, :3]), ("Tr_velo_to_cam", 12, velo_to_cam[:3, :4]),
                              ("P2", 12, p2)):
        if len(values.get(key, [])) != size:
            raise InputError(f"{path}: needs '{key}:' with {size} numbers")
        matrix[:] = np.reshape(values[key], matrix.shape)
    transform = rect @ velo_to_cam
    if not np.isfinite(transform).all() or abs(np.linalg.det(transform)) < 1e-9:
        raise InputError(f"{path}: R0_rect @ Tr_velo_to_cam is not invertible")
    return p2, transform


def read_labels(path) -> tuple[list[str], np.ndarray]:
    """Object types and their 14 numbers (truncated ... rotation_y) from a label file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (labels)")
    types, rows = [], []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise InputError(f"{path}:{lineno}: expected 15 fields (type and 14 numbers), got {len(fields)}")
        try:
            rows.append([float(v) for v in fields[1:15]])
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: malformed number ({exc})") from exc
        types.append(fields[0])
    return types, np.asarray(rows, dtype=np.float64).reshape(-1, 14)


def camera_to_lidar_boxes(values: np.ndarray, cam_to_velo: np.ndarray) -> np.ndarray:
    """Label numbers (M, 14) in the camera frame -> (M, 7) boxes in the Velodyne frame."""
    h, w, l = values[:, 7], values[:, 8], values[:, 9]
    bottom, rot_y = values[:, 10:13], values[:, 13]
    centre_cam = bottom - np.stack([np.zeros_like(h), h / 2, np.zeros_like(h)], axis=1)
    centre = centre_cam @ cam_to_velo[:3, :3].T + cam_to_velo[:3, 3]
    heading_cam = np.stack([np.cos(rot_y), np.zeros_like(rot_y), -np.sin(rot_y)], axis=1)
    heading = heading_cam @ cam_to_velo[:3, :3].T
    yaw = wrap_angle(np.arctan2(heading[:, 1], heading[:, 0]))
    return np.stack([centre[:, 0], centre[:, 1], centre[:, 2], l, w, h, yaw], axis=1)


KITTI_TYPES = {"Vehicle": "Car", "Pedestrian": "Pedestrian", "Cyclist": "Cyclist"}
IDEAL_VELO_TO_RECT = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 1.0]])
"""Camera axes (x right, y down, z forward) at the LiDAR: the frame without a calib file."""


def label_lines(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, calib=None) -> list[str]:
    """KITTI label lines (16 fields: the 15 of a label and the score) for boxes (M, 7) in
    the project frame: back to the Velodyne frame, then through the calib file's
    ``R0_rect @ Tr_velo_to_cam`` to the rectified camera frame (bottom centre, heading
    ``rotation_y``, ``alpha`` = rotation_y - atan2(x, z)) and its ``P2`` for the 2D box (the
    projected corners, clipped to IMAGE_SIZE). Without a calib file: the camera axes at the
    LiDAR (`IDEAL_VELO_TO_RECT`) and a 2D box of zeros. The inverse of `camera_to_lidar_boxes`."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7).copy()
    boxes[:, 2] -= GROUND_Z + GROUND_BELOW_ORIGIN  # the Velodyne frame
    p2, velo_to_rect = _calibration(calib) if calib is not None else (None, IDEAL_VELO_TO_RECT)
    rotation, translation = velo_to_rect[:3, :3], velo_to_rect[:3, 3]
    l, w, h, yaw = boxes[:, 3], boxes[:, 4], boxes[:, 5], boxes[:, 6]
    centre = boxes[:, :3] @ rotation.T + translation
    bottom = centre + np.stack([np.zeros_like(h), h / 2, np.zeros_like(h)], axis=1)
    heading = np.stack([np.cos(yaw), np.sin(yaw), np.zeros_like(yaw)], axis=1) @ rotation.T
    rot_y = wrap_angle(np.arctan2(-heading[:, 2], heading[:, 0]))
    alpha = wrap_angle(rot_y - np.arctan2(centre[:, 0], centre[:, 2]))
    corners_2d = np.zeros((len(boxes), 4))
    if p2 is not None and len(boxes):
        signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
        local = signs[None] * boxes[:, None, 3:6]  # (M, 8, 3) along, across, up
        c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
        corners = np.stack([c * local[..., 0] - s * local[..., 1], s * local[..., 0] + c * local[..., 1],
                            local[..., 2]], axis=-1) + boxes[:, None, :3]
        pixels = (corners @ rotation.T + translation) @ p2[:, :3].T + p2[:, 3]
        uv = pixels[..., :2] / np.maximum(pixels[..., 2:], 1e-6)
        width, height = IMAGE_SIZE
        corners_2d = np.concatenate([uv.min(1), uv.max(1)], axis=1).clip(0, [width - 1, height - 1] * 2)
    lines = []
    for i in range(len(boxes)):
        lines.append(" ".join([KITTI_TYPES[CLASSES[int(labels[i])]], "0.00", "0", f"{alpha[i]:.2f}"]
                              + [f"{v:.2f}" for v in (*corners_2d[i], h[i], w[i], l[i], *bottom[i], rot_y[i])]
                              + [f"{float(scores[i]):.4f}"]))
    return lines


class KittiSource:
    """The frames of one KITTI split folder."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        velodyne = self.root / "velodyne"
        if not velodyne.is_dir():
            hint = [p.name for p in (self.root / "training", self.root / "testing") if p.is_dir()]
            raise InputError(f"{self.root}: no 'velodyne' folder (not a KITTI split folder"
                             + (f"; try {self.root / hint[0]}" if hint else "") + ")")
        self.ids = sorted(p.stem for p in velodyne.glob("*.bin"))
        if not self.ids:
            raise InputError(f"{velodyne}: no *.bin files")
        self.labelled = (self.root / "label_2").is_dir()

    def frame_ids(self) -> list[str]:
        return list(self.ids)

    def read(self, frame_id: str) -> Frame:
        points = load_points_file(self.root / "velodyne" / f"{frame_id}.bin", columns=4, intensity_scale=1.0)  # clipped below
        points[:, 3] = np.clip(points[:, 3], 0.0, 1.0)
        boxes, labels = np.zeros((0, 7)), np.zeros(0, np.int64)
        if self.labelled:
            label_path = self.root / "label_2" / f"{frame_id}.txt"
            types, values = read_labels(label_path)
            keep, labels = map_classes(types, CLASS_MAP, label_path)
            calib = self.root / "calib" / f"{frame_id}.txt"
            if len(keep):
                boxes = camera_to_lidar_boxes(values[keep], read_calib(calib))
            where = label_path
        else:
            where = self.root / "velodyne" / f"{frame_id}.bin"
        points, boxes = to_project_frame(points, boxes, GROUND_BELOW_ORIGIN)
        frame = make_frame(frame_id, points, boxes, labels, where)
        if self.labelled:  # only objects the camera sees are labelled
            frame.camera = camera_view(calib)
        return frame


def open_source(path) -> KittiSource:
    return KittiSource(path)
