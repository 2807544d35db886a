"""Waymo Open Dataset v1: TFRecord files of ``waymo.open_dataset.Frame`` protos.

``open_source(path)`` takes one ``.tfrecord`` file or a directory of them. Frame ids are
``<context name>_<timestamp_micros>`` (``<file stem>_<record index>`` when a record has
neither). Listing reads only the record headers and the start of each record (the
context name and timestamp come first); ``read`` verifies the record's checksum and
decodes it with the minimal wire decoder of :mod:`.protowire` against the field-number
tables below (the public ``dataset.proto`` / ``label.proto``; no protobuf needed).

Conversion (see docs/waymo.md):
  * boxes: Waymo's ``Label.Box`` (centre, length along the heading, width, height,
    heading CCW from +x, vehicle frame) is already the project convention;
  * frame: the vehicle frame (x forward, y left, z up, the road about 0.2 m below the
    origin) moved down 1.7 m into the project frame (the road at z = -1.9,
    :func:`haltdet.data.formats.to_project_frame`), points and boxes alike;
  * classes: TYPE_VEHICLE -> Vehicle, TYPE_PEDESTRIAN -> Pedestrian, TYPE_CYCLIST ->
    Cyclist; TYPE_SIGN and TYPE_UNKNOWN are dropped;
  * points: the range images of all lidars (first return; the second too with
    ``second_return=True``) in the vehicle frame, see :func:`range_image_to_points`;
    intensity is ``tanh(raw intensity)`` in [0, 1); elongation and the no-label-zone
    flag are dropped (no-label-zone points are kept);
  * ``num_points``: Waymo's ``num_lidar_points_in_box`` when present, else recounted;
    ``difficulty``: the project rule on it, raised to LEVEL_2 where Waymo's
    ``detection_difficulty_level`` says LEVEL_2 (boxes with 0 points stay ignored).
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from haltdet import InputError
from haltdet.boxes import count_points_in_boxes, wrap_angle
from haltdet.data.formats import tfrecord, to_project_frame
from haltdet.data.formats.protowire import LEN, VARINT, Message, WireError, iter_fields
from haltdet.data.frames import LEVEL_1, LEVEL_2, Frame, difficulty_from_points, validate_points

logger = logging.getLogger(__name__)

GROUND_BELOW_ORIGIN = 0.2
"""The road below the vehicle frame's origin: the bottoms of the labelled boxes within
30 m of the Waymo repository's test frame lie 0.19 m below it (median of 50)."""


# ----------------------------------------------------------------------------- schema subset
# Field numbers of the public Waymo Open Dataset protos (dataset.proto, label.proto).


class FrameF:
    CONTEXT, TIMESTAMP_MICROS, POSE, LASERS, LASER_LABELS = 1, 2, 3, 5, 6


class ContextF:
    NAME, LASER_CALIBRATIONS = 1, 3


class LaserCalibrationF:
    NAME, BEAM_INCLINATIONS, BEAM_INCLINATION_MIN, BEAM_INCLINATION_MAX, EXTRINSIC = 1, 2, 3, 4, 5


class TransformF:
    TRANSFORM = 1  # repeated double, 4x4 row-major


class LaserF:
    NAME, RI_RETURN1, RI_RETURN2 = 1, 2, 3


class RangeImageF:
    RANGE_IMAGE_COMPRESSED, RANGE_IMAGE_POSE_COMPRESSED = 2, 4  # zlib(MatrixFloat)


class MatrixF:  # MatrixFloat / MatrixInt32, and MatrixShape.dims
    DATA, SHAPE, DIMS = 1, 2, 1


class LabelF:
    BOX, TYPE, ID, DETECTION_DIFFICULTY_LEVEL, NUM_LIDAR_POINTS_IN_BOX = 1, 3, 4, 5, 7


class BoxF:
    CENTER_X, CENTER_Y, CENTER_Z, WIDTH, LENGTH, HEIGHT, HEADING = 1, 2, 3, 4, 5, 6, 7


TYPE_UNKNOWN, TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_SIGN, TYPE_CYCLIST = 0, 1, 2, 3, 4
TYPE_TO_CLASS = {TYPE_VEHICLE: 0, TYPE_PEDESTRIAN: 1, TYPE_CYCLIST: 2}
"""Waymo ``Label.Type`` -> index into :data:`haltdet.CLASSES`; other types are dropped."""
LASER_NAMES = {1: "TOP", 2: "FRONT", 3: "SIDE_LEFT", 4: "SIDE_RIGHT", 5: "REAR"}
WAYMO_LEVEL_2 = 2
_PEEK_BYTES = 1 << 16


# ----------------------------------------------------------------------------- geometry


def row_inclinations(height: int, values=None, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """The beam inclination of each range image row, row 0 first.

    Waymo stores ``beam_inclinations`` in increasing order while row 0 of a range image
    is the highest beam, so the list is reversed. Without explicit values the beams are
    uniform: ascending ``lo + (i + 0.5) / height * (hi - lo)``, reversed likewise.
    """
    if values is not None and len(values):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (height,):
            raise InputError(f"{values.size} beam inclinations for a range image of {height} rows")
        return values[::-1].copy()
    if lo is None or hi is None:
        raise InputError("lidar calibration has neither beam_inclinations nor beam_inclination_min/max")
    return (lo + (np.arange(height) + 0.5) / height * (hi - lo))[::-1].copy()


def euler_to_rotation(roll, pitch, yaw) -> np.ndarray:
    """Rotation matrices Rz(yaw) @ Ry(pitch) @ Rx(roll), shape (..., 3, 3)."""
    roll, pitch, yaw = (np.asarray(a, dtype=np.float64) for a in (roll, pitch, yaw))
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    return np.stack(
        [
            np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], axis=-1),
            np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], axis=-1),
            np.stack([-sp, cp * sr, cp * cr], axis=-1),
        ],
        axis=-2,
    )


def range_image_to_points(range_image, inclinations, extrinsic, pixel_pose=None, frame_pose=None) -> np.ndarray:
    """Points of one Waymo range image, in the vehicle frame.

    Pixel (row r, column c) is the beam at inclination ``inclinations[r]`` and, in the
    sensor frame, azimuth ``pi * (1 - (2c + 1) / W) - yaw(extrinsic)``: column 0 looks
    backwards (azimuth just below +pi in the vehicle frame) and azimuth decreases with
    the column (clockwise seen from above), whatever the sensor's mounting yaw. The point
    ``range * (cos inc cos az, cos inc sin az, sin inc)`` is mapped by the extrinsic to
    the vehicle frame. With ``pixel_pose`` (rolling-shutter compensation, TOP lidar) it
    is then mapped to the world by that pixel's vehicle pose and back to the vehicle
    frame of the frame by ``frame_pose``.

    Args:
        range_image: (H, W) ranges or (H, W, C) with channel 0 the range in metres;
            pixels with range <= 0 (or NaN) are empty.
        inclinations: (H,) beam inclination of each row in radians, row 0 first (see
            :func:`row_inclinations` for Waymo's calibration order).
        extrinsic: (4, 4) sensor -> vehicle transform.
        pixel_pose: optional (H, W, 6) vehicle -> world pose of each pixel as
            (roll, pitch, yaw, x, y, z), angles as in :func:`euler_to_rotation`.
        frame_pose: (4, 4) vehicle -> world pose of the frame; required with pixel_pose.
    Returns:
        (N, 2 + C) float64: x, y, z, then channels 1.. of the non-empty pixels, in
        row-major pixel order.
    """
    image = np.asarray(range_image, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] < 1:
        raise InputError(f"range image must have shape (H, W) or (H, W, C), got {image.shape}")
    height, width = image.shape[:2]
    incl = np.asarray(inclinations, dtype=np.float64).reshape(-1)
    ext = np.asarray(extrinsic, dtype=np.float64)
    if incl.shape[0] != height:
        raise InputError(f"{incl.shape[0]} inclinations for a range image of {height} rows")
    if ext.shape != (4, 4):
        raise InputError(f"extrinsic must be 4x4, got shape {ext.shape}")
    rows, cols = np.nonzero(image[..., 0] > 0)
    rng = image[rows, cols, 0]
    azimuth = np.pi * (1.0 - (2.0 * cols + 1.0) / width) - np.arctan2(ext[1, 0], ext[0, 0])
    inc = incl[rows]
    xyz = np.stack([np.cos(inc) * np.cos(azimuth), np.cos(inc) * np.sin(azimuth), np.sin(inc)], axis=1) * rng[:, None]
    xyz = xyz @ ext[:3, :3].T + ext[:3, 3]
    if pixel_pose is not None:
        pose = np.asarray(pixel_pose, dtype=np.float64)
        if pose.shape != (height, width, 6):
            raise InputError(f"pixel pose must have shape ({height}, {width}, 6), got {pose.shape}")
        if frame_pose is None:
            raise InputError("a per-pixel pose needs the frame pose")
        fpose = np.asarray(frame_pose, dtype=np.float64)
        if fpose.shape != (4, 4):
            raise InputError(f"frame pose must be 4x4, got shape {fpose.shape}")
        p = pose[rows, cols]
        rot = euler_to_rotation(p[:, 0], p[:, 1], p[:, 2])
        # world = R_px xyz + t_px; vehicle = R_f^T (world - t_f), translations subtracted first.
        rel = np.einsum("nij,nj->ni", rot, xyz) + (p[:, 3:] - fpose[:3, 3])
        xyz = rel @ fpose[:3, :3]
    return np.concatenate([xyz, image[rows, cols, 1:]], axis=1)


def scale_intensity(raw: np.ndarray) -> np.ndarray:
    """Waymo's unbounded intensity to [0, 1): tanh (monotonic, ~linear below 0.5)."""
    return np.tanh(np.clip(raw, 0.0, None))


# ----------------------------------------------------------------------------- labels


@dataclass
class WaymoLabels:
    """Every laser label of a frame, before class filtering."""

    boxes: np.ndarray  # (M, 7) float64 (x, y, z, l, w, h, yaw), project convention
    types: np.ndarray  # (M,) int64 Waymo Label.Type
    num_points: np.ndarray  # (M,) int64 Waymo num_lidar_points_in_box, -1 when absent
    levels: np.ndarray  # (M,) int64 Waymo detection_difficulty_level (0 unknown)
    ids: list[str]


def labels_from_arrays(boxes, types, num_points=None, levels=None, ids=None) -> WaymoLabels:
    m = len(types)
    return WaymoLabels(
        np.asarray(boxes, dtype=np.float64).reshape(m, 7),
        np.asarray(types, dtype=np.int64).reshape(m),
        np.full(m, -1, np.int64) if num_points is None else np.asarray(num_points, dtype=np.int64).reshape(m),
        np.zeros(m, np.int64) if levels is None else np.asarray(levels, dtype=np.int64).reshape(m),
        [""] * m if ids is None else list(ids),
    )


def decode_labels(frame: Message) -> WaymoLabels:
    """The ``laser_labels`` of a decoded Frame (all types)."""
    boxes, types, num_points, levels, ids = [], [], [], [], []
    for label in frame.messages(FrameF.LASER_LABELS, "laser_labels"):
        box = label.message(LabelF.BOX, "box")
        if box is None:
            raise WireError(f"{label.name}: no box")
        fields = (BoxF.CENTER_X, BoxF.CENTER_Y, BoxF.CENTER_Z, BoxF.LENGTH, BoxF.WIDTH, BoxF.HEIGHT, BoxF.HEADING)
        boxes.append([box.double(f, 0.0) for f in fields])
        types.append(label.integer(LabelF.TYPE, TYPE_UNKNOWN))
        num_points.append(label.integer(LabelF.NUM_LIDAR_POINTS_IN_BOX, -1))
        levels.append(label.integer(LabelF.DETECTION_DIFFICULTY_LEVEL, 0))
        ids.append(label.string(LabelF.ID, ""))
    return labels_from_arrays(np.reshape(boxes, (-1, 7)), types, num_points, levels, ids)


def assemble_frame(frame_id: str, points: np.ndarray, labels: WaymoLabels, where: str = "") -> Frame:
    """A haltdet Frame from vehicle-frame points (N, 4) and Waymo labels, in the project
    frame (`to_project_frame`: the vehicle frame moved down 1.7 m)."""
    points = validate_points(points, where or frame_id)
    sizes_ok = np.isfinite(labels.boxes).all(axis=1) & (labels.boxes[:, 3:6] > 0).all(axis=1)
    known = np.isin(labels.types, list(TYPE_TO_CLASS))
    bad = int((known & ~sizes_ok).sum())
    if bad:
        logger.warning("%s: dropped %d labels with invalid box sizes", where or frame_id, bad)
    keep = known & sizes_ok
    boxes = labels.boxes[keep].copy()
    boxes[:, 6] = wrap_angle(boxes[:, 6])
    classes = np.array([TYPE_TO_CLASS[t] for t in labels.types[keep]], dtype=np.int64)
    num_points = labels.num_points[keep].copy()
    missing = num_points < 0
    if missing.any():
        num_points[missing] = count_points_in_boxes(points, boxes[missing].astype(np.float32))
    difficulty = difficulty_from_points(num_points)
    difficulty[(labels.levels[keep] == WAYMO_LEVEL_2) & (difficulty == LEVEL_1)] = LEVEL_2
    points, boxes = to_project_frame(points, boxes, GROUND_BELOW_ORIGIN)
    return Frame(frame_id, points, boxes, classes, num_points, difficulty)


# ----------------------------------------------------------------------------- lidar


def _transform(msg: Message | None, what: str) -> np.ndarray:
    if msg is None:
        raise WireError(f"missing {what}")
    values = msg.doubles(TransformF.TRANSFORM)
    if values.size != 16:
        raise WireError(f"{msg.name}: a transform needs 16 values, got {values.size}")
    return values.reshape(4, 4)


def decode_matrix(compressed: bytes, name: str, channels: int) -> np.ndarray:
    """A zlib-compressed MatrixFloat of shape (H, W, channels)."""
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as exc:
        raise WireError(f"{name}: corrupt zlib data ({exc})") from None
    matrix = Message(raw, name)
    data = matrix.floats(MatrixF.DATA)
    shape_msg = matrix.message(MatrixF.SHAPE, "shape")
    shape = tuple(shape_msg.integers(MatrixF.DIMS).tolist()) if shape_msg is not None else ()
    if len(shape) != 3 or shape[2] != channels or min(shape) < 0 or int(np.prod(shape)) != data.size:
        raise WireError(f"{name}: matrix of {data.size} values with shape {shape}, expected (H, W, {channels})")
    return data.reshape(shape)


def decode_points(frame: Message, second_return: bool = False) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity of every lidar of a decoded Frame (vehicle frame)."""
    context = frame.message(FrameF.CONTEXT, "context")
    calibrations = {}
    for calib in context.messages(ContextF.LASER_CALIBRATIONS, "laser_calibrations") if context else []:
        calibrations[calib.integer(LaserCalibrationF.NAME, 0)] = calib
    pose_msg = frame.message(FrameF.POSE, "pose")
    frame_pose = _transform(pose_msg, "pose") if pose_msg is not None else None
    clouds = [np.zeros((0, 4), np.float32)]
    for laser in frame.messages(FrameF.LASERS, "lasers"):
        name = laser.integer(LaserF.NAME, 0)
        returns = (LaserF.RI_RETURN1, LaserF.RI_RETURN2) if second_return else (LaserF.RI_RETURN1,)
        images = [laser.message(f, f"ri_return{i + 1}") for i, f in enumerate(returns)]
        compressed = [ri.raw(RangeImageF.RANGE_IMAGE_COMPRESSED, b"") if ri else b"" for ri in images]
        if not any(compressed):
            continue  # no range image for this laser (e.g. label-only files)
        calib = calibrations.get(name)
        if calib is None:
            raise WireError(f"{laser.name}: no calibration for laser {LASER_NAMES.get(name, name)}")
        extrinsic = _transform(calib.message(LaserCalibrationF.EXTRINSIC, "extrinsic"), f"{calib.name}.extrinsic")
        pose_raw = images[0].raw(RangeImageF.RANGE_IMAGE_POSE_COMPRESSED, b"") if images[0] else b""
        pixel_pose = decode_matrix(pose_raw, f"{laser.name}.range_image_pose", 6) if pose_raw else None
        if pixel_pose is not None and frame_pose is None:
            raise WireError(f"{laser.name}: per-pixel pose without a frame pose")
        for data, ri in zip(compressed, images):
            if not data:
                continue
            image = decode_matrix(data, f"{ri.name}.range_image", 4)  # type: ignore[union-attr]
            incl = row_inclinations(
                image.shape[0],
                calib.doubles(LaserCalibrationF.BEAM_INCLINATIONS),
                calib.double(LaserCalibrationF.BEAM_INCLINATION_MIN),
                calib.double(LaserCalibrationF.BEAM_INCLINATION_MAX),
            )
            pts = range_image_to_points(image, incl, extrinsic, pixel_pose, frame_pose)
            clouds.append(np.column_stack([pts[:, :3], scale_intensity(pts[:, 3])]).astype(np.float32))
    return np.concatenate(clouds)


# ----------------------------------------------------------------------------- source


def _peek_id(payload_prefix: bytes) -> tuple[str | None, int | None]:
    """Context name and timestamp from the start of a serialized Frame (may be cut)."""
    name = stamp = None
    try:
        for field, wire, value in iter_fields(payload_prefix):
            if field == FrameF.CONTEXT and wire == LEN:
                name = Message(value, "context").string(ContextF.NAME)
            elif field == FrameF.TIMESTAMP_MICROS and wire == VARINT:
                stamp = int(value)  # type: ignore[arg-type]
            if name is not None and stamp is not None:
                break
    except WireError:
        pass  # cut inside a field: keep what was found
    return name, stamp


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".") or "_"


class WaymoV1Source:
    """Frames of one or more Waymo v1 TFRecord files."""

    def __init__(self, path, second_return: bool = False) -> None:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if ".tfrecord" in p.name and p.is_file())
            if not files:
                raise InputError(f"{path}: no .tfrecord files in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise InputError(f"{path}: no such file or directory")
        self.second_return = second_return
        self._where: dict[str, tuple[Path, int]] = {}
        for file in files:
            for index, (offset, length) in enumerate(tfrecord.scan_records(file)):
                name, stamp = _peek_id(tfrecord.read_record(file, offset, prefix=_PEEK_BYTES))
                if (name is None or stamp is None) and length > _PEEK_BYTES:
                    name, stamp = _peek_id(tfrecord.read_record(file, offset))
                fid = _safe_id(f"{name}_{stamp}" if name and stamp is not None else f"{file.stem}_{index:06d}")
                if fid in self._where:
                    fid = _safe_id(f"{fid}_{file.stem}_{index:06d}")
                self._where[fid] = (file, offset)

    def frame_ids(self) -> list[str]:
        return list(self._where)

    def _record(self, frame_id: str) -> tuple[Path, int, Message]:
        if frame_id not in self._where:
            raise InputError(f"unknown Waymo frame id {frame_id!r}")
        file, offset = self._where[frame_id]
        payload = tfrecord.read_record(file, offset)
        try:
            return file, offset, Message(payload, "Frame")
        except InputError as exc:
            raise InputError(f"{file}: record at byte {offset}: {exc}") from None

    def read_labels(self, frame_id: str) -> WaymoLabels:
        """Every laser label of the frame (all Waymo types, unconverted classes)."""
        file, offset, frame = self._record(frame_id)
        try:
            return decode_labels(frame)
        except InputError as exc:
            raise InputError(f"{file}: record at byte {offset}: {exc}") from None

    def read(self, frame_id: str) -> Frame:
        file, offset, frame = self._record(frame_id)
        where = f"{file}: record at byte {offset}"
        try:
            return assemble_frame(frame_id, decode_points(frame, self.second_return), decode_labels(frame), where)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None


def open_source(path, second_return: bool = False) -> WaymoV1Source:
    """The frames of a Waymo v1 ``.tfrecord`` file or directory of them."""
    return WaymoV1Source(path, second_return=second_return)
