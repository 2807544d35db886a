"""Waymo Open Dataset v2: per-component parquet files (needs pyarrow: ``pip install haltdet[real]``).

``open_source(root)`` takes a directory holding the component directories, each with one
``<context name>.parquet`` per segment::

    root/lidar/              [LiDARComponent] range images (values + shape), per laser
    root/lidar_box/          [LiDARBoxComponent] boxes
    root/lidar_calibration/  [LiDARCalibrationComponent] extrinsic, beam inclinations
    root/lidar_pose/         [LiDARPoseComponent] per-pixel pose of the TOP lidar (optional)
    root/vehicle_pose/       [VehiclePoseComponent] frame pose (needed with lidar_pose)

Frame ids are ``<context name>_<frame_timestamp_micros>`` (frames listed from ``lidar/``,
or from ``lidar_box/`` when there are no lidar files: those frames have no points). The
conversion is that of :mod:`.waymo_v1` (same geometry, classes, intensity, difficulty);
the v2 box ``size.x/y/z`` is length/width/height.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from haltdet import InputError
from haltdet.data.formats.waymo_v1 import (
    WaymoLabels,
    assemble_frame,
    labels_from_arrays,
    range_image_to_points,
    row_inclinations,
    scale_intensity,
)
from haltdet.data.frames import Frame

KEY_CONTEXT = "key.segment_context_name"
KEY_TIMESTAMP = "key.frame_timestamp_micros"
KEY_LASER = "key.laser_name"
KEY_OBJECT = "key.laser_object_id"
LIDAR = "[LiDARComponent].range_image_return{}"  # .values / .shape
LIDAR_POSE = "[LiDARPoseComponent].range_image_return1"
VEHICLE_POSE = "[VehiclePoseComponent].world_from_vehicle.transform"
CALIB = "[LiDARCalibrationComponent]"
BOX = "[LiDARBoxComponent]"
BOX_COLUMNS = [f"{BOX}.box.{name}" for name in
               ("center.x", "center.y", "center.z", "size.x", "size.y", "size.z", "heading")]
BOX_TYPE = f"{BOX}.type"
BOX_NUM_POINTS = f"{BOX}.num_lidar_points_in_box"
BOX_LEVEL = f"{BOX}.difficulty_level.detection"
_Calibration = Tuple[np.ndarray, Optional[np.ndarray], Optional[float], Optional[float]]
"""extrinsic (4, 4), explicit beam inclinations (ascending) or None, inclination min, max."""
COMPONENTS = ("lidar", "lidar_box", "lidar_calibration", "lidar_pose", "vehicle_pose")


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Waymo v2 parquet files needs pyarrow: pip install haltdet[real]") from None
    return pq


def _values(scalar, dtype) -> np.ndarray | None:
    """A list cell as a numpy array (None for a null cell)."""
    if not scalar.is_valid:
        return None
    return np.asarray(scalar.values.to_numpy(zero_copy_only=False), dtype=dtype)


def _image(table, row: int, prefix: str, channels: int, where: str) -> np.ndarray | None:
    values = _values(table.column(f"{prefix}.values")[row], np.float32)
    shape = _values(table.column(f"{prefix}.shape")[row], np.int64)
    if values is None or shape is None or values.size == 0:
        return None
    if shape.shape != (3,) or shape[2] != channels or int(np.prod(shape)) != values.size:
        raise InputError(f"{where}: {prefix}: {values.size} values with shape {shape.tolist()}, "
                         f"expected (H, W, {channels})")
    return values.reshape(tuple(shape))


class WaymoV2Source:
    """Frames of a Waymo v2 component directory."""

    def __init__(self, root, second_return: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such directory")
        _parquet()  # fail early, with the install hint
        self.second_return = second_return
        listing = "lidar" if (self.root / "lidar").is_dir() else "lidar_box"
        files = sorted((self.root / listing).glob("*.parquet"))
        if not files:
            raise InputError(f"{self.root}: no lidar/*.parquet or lidar_box/*.parquet files "
                             f"(expected the Waymo v2 component directories {', '.join(COMPONENTS)})")
        self._frames: dict[str, tuple[str, int]] = {}
        for file in files:
            table = self._read(file, [KEY_CONTEXT, KEY_TIMESTAMP])
            pairs = set(zip(table.column(KEY_CONTEXT).to_pylist(), table.column(KEY_TIMESTAMP).to_pylist()))
            for context, stamp in sorted(pairs):
                self._frames[f"{context}_{stamp}"] = (context, int(stamp))
        self._calibrations: dict[str, dict[int, _Calibration]] = {}

    # ------------------------------------------------------------------ parquet access

    def _read(self, path: Path, columns: list[str], stamp: int | None = None, optional=()):
        """Read ``columns`` (plus those of ``optional`` present) of one file, one frame."""
        try:
            pq = _parquet()
            names = set(pq.read_schema(path).names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing} (not a Waymo v2 component file?)")
            wanted = columns + [c for c in optional if c in names]
            filters = [(KEY_TIMESTAMP, "=", stamp)] if stamp is not None else None
            return pq.read_table(path, columns=wanted, filters=filters)
        except InputError:
            raise
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on bad files
            raise InputError(f"{path}: unreadable parquet file ({type(exc).__name__}: {exc})") from exc

    def _component(self, name: str, context: str) -> Path | None:
        path = self.root / name / f"{context}.parquet"
        return path if path.is_file() else None

    def _calibration(self, context: str) -> dict[int, _Calibration]:
        if context not in self._calibrations:
            path = self._component("lidar_calibration", context)
            if path is None:
                raise InputError(f"{self.root / 'lidar_calibration' / (context + '.parquet')}: file not found")
            columns = [KEY_LASER, f"{CALIB}.extrinsic.transform"]
            optional = [f"{CALIB}.beam_inclination.{k}" for k in ("values", "min", "max")]
            table = self._read(path, columns, optional=optional)
            cal = {}
            for i, laser in enumerate(table.column(KEY_LASER).to_pylist()):
                extrinsic = _values(table.column(columns[1])[i], np.float64)
                if extrinsic is None or extrinsic.size != 16:
                    raise InputError(f"{path}: laser {laser}: extrinsic needs 16 values")
                get = {c: table.column(c)[i] for c in optional if c in table.column_names}
                values = _values(get[optional[0]], np.float64) if optional[0] in get else None
                lo, hi = (get[c].as_py() if c in get else None for c in optional[1:])
                cal[int(laser)] = (extrinsic.reshape(4, 4), values, lo, hi)
            self._calibrations[context] = cal
        return self._calibrations[context]

    # ------------------------------------------------------------------ frames

    def frame_ids(self) -> list[str]:
        return list(self._frames)

    def read_labels(self, frame_id: str) -> WaymoLabels:
        """Every box of the frame (all Waymo types)."""
        context, stamp = self._lookup(frame_id)
        path = self._component("lidar_box", context)
        if path is None:
            return labels_from_arrays(np.zeros((0, 7)), [])
        table = self._read(path, BOX_COLUMNS + [BOX_TYPE], stamp, optional=[BOX_NUM_POINTS, BOX_LEVEL, KEY_OBJECT])
        boxes = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in BOX_COLUMNS], axis=1)

        def col(name):
            return np.nan_to_num(table.column(name).to_numpy(zero_copy_only=False).astype(float), nan=-1)

        return labels_from_arrays(
            boxes.astype(np.float64),
            table.column(BOX_TYPE).to_numpy(zero_copy_only=False),
            col(BOX_NUM_POINTS) if BOX_NUM_POINTS in table.column_names else None,
            np.maximum(col(BOX_LEVEL), 0) if BOX_LEVEL in table.column_names else None,
            table.column(KEY_OBJECT).to_pylist() if KEY_OBJECT in table.column_names else None,
        )

    def read_points(self, frame_id: str) -> np.ndarray:
        """(N, 4) float32 x, y, z, intensity of every lidar (vehicle frame)."""
        context, stamp = self._lookup(frame_id)
        path = self._component("lidar", context)
        clouds = [np.zeros((0, 4), np.float32)]
        if path is None:
            return clouds[0]
        returns = (1, 2) if self.second_return else (1,)
        table = self._read(path, [KEY_LASER] + [f"{LIDAR.format(1)}.{k}" for k in ("values", "shape")], stamp,
                           optional=[f"{LIDAR.format(r)}.{k}" for r in returns[1:] for k in ("values", "shape")])
        calibration = self._calibration(context)
        pixel_poses, frame_pose = self._poses(context, stamp)
        where = str(path)
        for row, laser in enumerate(table.column(KEY_LASER).to_pylist()):
            if laser not in calibration:
                raise InputError(f"{where}: laser {laser} has no calibration in lidar_calibration/{context}.parquet")
            extrinsic, values, lo, hi = calibration[laser]
            for r in returns:
                if f"{LIDAR.format(r)}.values" not in table.column_names:
                    continue
                image = _image(table, row, LIDAR.format(r), 4, where)
                if image is None:
                    continue
                incl = row_inclinations(image.shape[0], values, lo, hi)
                pose = pixel_poses.get(laser)
                pts = range_image_to_points(image, incl, extrinsic, pose, frame_pose if pose is not None else None)
                clouds.append(np.column_stack([pts[:, :3], scale_intensity(pts[:, 3])]).astype(np.float32))
        return np.concatenate(clouds)

    def _poses(self, context: str, stamp: int) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """Per-pixel poses by laser, and the frame pose (both optional)."""
        frame_pose = None
        path = self._component("vehicle_pose", context)
        if path is not None:
            table = self._read(path, [VEHICLE_POSE], stamp)
            if table.num_rows:
                frame_pose = _values(table.column(VEHICLE_POSE)[0], np.float64)
                if frame_pose is None or frame_pose.size != 16:
                    raise InputError(f"{path}: world_from_vehicle needs 16 values")
                frame_pose = frame_pose.reshape(4, 4)
        poses: dict[int, np.ndarray] = {}
        path = self._component("lidar_pose", context)
        if path is not None:
            table = self._read(path, [KEY_LASER, f"{LIDAR_POSE}.values", f"{LIDAR_POSE}.shape"], stamp)
            for row, laser in enumerate(table.column(KEY_LASER).to_pylist()):
                image = _image(table, row, LIDAR_POSE, 6, str(path))
                if image is not None:
                    poses[int(laser)] = image
            if poses and frame_pose is None:
                raise InputError(f"{path}: per-pixel lidar poses need vehicle_pose/{context}.parquet for frame {stamp}")
        return poses, frame_pose

    def _lookup(self, frame_id: str) -> tuple[str, int]:
        if frame_id not in self._frames:
            raise InputError(f"{self.root}: unknown Waymo v2 frame id {frame_id!r}")
        return self._frames[frame_id]

    def read(self, frame_id: str) -> Frame:
        context, _ = self._lookup(frame_id)
        return assemble_frame(frame_id, self.read_points(frame_id), self.read_labels(frame_id),
                              f"{self.root} (context {context})")


def open_source(path, second_return: bool = False) -> WaymoV2Source:
    """The frames of a Waymo v2 component directory."""
    return WaymoV2Source(path, second_return=second_return)
