"""The on-disk frame format of haltdet, and readers for raw point files.

A dataset is a directory::

    DIR/dataset.json            the index (see below)
    DIR/frames/<frame_id>.npz   one file per frame (``numpy.savez``, uncompressed)

``dataset.json`` is a JSON object with at least::

    {"format": "haltdet-frames", "version": 1,
     "classes": ["Vehicle", "Pedestrian", "Cyclist"],
     "frames": ["000000", "000001", ...],     # frame ids, in order
     ...}                                     # free metadata: source, seed, sensor, scene

Each frame file holds five arrays:

============  =========  =======  ==================================================
name          shape      dtype    meaning
============  =========  =======  ==================================================
points        (N, 4)     float32  x, y, z, intensity in the LiDAR frame (metres, [0,1])
boxes         (M, 7)     float32  (x, y, z, l, w, h, yaw), see :mod:`haltdet.boxes`
labels        (M,)       int64    index into :data:`haltdet.CLASSES`
num_points    (M,)       int64    points of ``points`` inside each box
difficulty    (M,)       int64    0 ignored (0 points), 1 LEVEL_1 (>5), 2 LEVEL_2 (1..5)
============  =========  =======  ==================================================

A frame may also hold ``camera_projection`` (3, 4) float64 and ``camera_image_size`` (2,)
float64: the camera view that bounds its labels (:class:`CameraView`; KITTI frames).
The frame id is the file name without ``.npz``. Every reader here validates what it
reads and raises :class:`haltdet.InputError` naming the file and the problem. Points
with NaN/inf coordinates are the one thing repaired rather than refused: those rows are
dropped, and the count is reported with a :class:`DroppedPointsWarning` (also logged).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from haltdet import CLASSES, InputError

logger = logging.getLogger(__name__)

GROUND_Z = -1.9
"""The project frame, that of every frame and of the models' input: x forward, y left,
z up, metres, origin at the LiDAR, the road about 1.9 m below it (z = -1.9), as the
simulator mounts its default sensor. Dataset readers convert to it
(:func:`haltdet.data.formats.to_project_frame`); raw point files are taken to be in it
unless told the sensor's height (:func:`shift_to_ground`)."""


def estimate_ground_z(points: np.ndarray, near: float = 5.0, far: float = 30.0) -> float:
    """The height of the road in a cloud (N, >= 3): the most populated 5 cm slice of z
    among the points between `near` and `far` metres of the origin horizontally (the road
    is the largest horizontal surface a driving LiDAR sees), refined to the median z of
    the points within 15 cm of it. NaN when no point lies in that ring."""
    points = np.asarray(points)
    ring = np.hypot(points[:, 0], points[:, 1])
    z = points[(ring >= near) & (ring <= far), 2].astype(np.float64)
    z = z[np.isfinite(z)]
    if z.size == 0:
        return float("nan")
    counts, edges = np.histogram(z, bins=np.arange(z.min(), z.max() + 0.1, 0.05))
    mode = edges[counts.argmax()] + 0.025
    return float(np.median(z[np.abs(z - mode) <= 0.15]))


def shift_to_ground(points: np.ndarray, sensor_height: float | str | None, path="<points>") -> np.ndarray:
    """Points (N, 4) of a sensor `sensor_height` metres above the road, moved to the
    project frame's ground (:data:`GROUND_Z`): z + sensor_height - 1.9. "auto": the
    height measured from the points (:func:`estimate_ground_z`); None: unchanged."""
    if sensor_height is None:
        return points
    if sensor_height == "auto":
        ground = estimate_ground_z(points)
        if not np.isfinite(ground):
            raise InputError(f"{path}: --sensor-height auto: no points 5-30 m from the sensor to find the road in")
        sensor_height = -ground
    if not 0.0 <= float(sensor_height) <= 10.0:
        raise InputError(f"{path}: sensor height {sensor_height} m above the road is not plausible (0 to 10 m)")
    points = np.array(points, dtype=np.float32, copy=True)
    points[:, 2] += np.float32(float(sensor_height) + GROUND_Z)
    return points


FORMAT_NAME = "haltdet-frames"
FORMAT_VERSION = 1
INDEX_FILE = "dataset.json"
FRAMES_DIR = "frames"
FRAME_ARRAYS = ("points", "boxes", "labels", "num_points", "difficulty")

IGNORED, LEVEL_1, LEVEL_2 = 0, 1, 2
"""Difficulty values: 0 points -> ignored, more than 5 -> LEVEL_1, 1..5 -> LEVEL_2."""
LEVEL_2_MAX_POINTS = 5

POINT_FILE_EXTENSIONS = (".npy", ".bin", ".npz", ".txt", ".csv", ".pcd", ".ply")
MAX_BOX_SIZE = 200.0  # metres; larger boxes are malformed labels


class DroppedPointsWarning(UserWarning):
    """Points with NaN/inf coordinates were dropped while reading a file."""


@dataclass
class CameraView:
    """The image of a camera whose view bounds a frame's labels (KITTI labels only what
    the front camera sees): pixel = projection @ (x, y, z, 1) from the project frame, in
    an image of width x height pixels."""

    projection: np.ndarray  # (3, 4) float64
    width: float
    height: float

    def sees(self, xyz: np.ndarray) -> np.ndarray:
        """Bool (N,): the points (N, >= 3) lie in front of the camera and inside its image."""
        h = np.asarray(xyz, dtype=np.float64)[:, :3] @ self.projection[:, :3].T + self.projection[:, 3]
        depth = h[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u, v = h[:, 0] / depth, h[:, 1] / depth
        return (depth > 0) & (u >= 0) & (u < self.width) & (v >= 0) & (v < self.height)


@dataclass
class Frame:
    """One LiDAR frame with its labels (all arrays in the project conventions)."""

    frame_id: str
    points: np.ndarray  # (N, 4) float32: x, y, z, intensity, LiDAR frame
    boxes: np.ndarray  # (M, 7) float32, project convention
    labels: np.ndarray  # (M,) int64 index into haltdet.CLASSES
    num_points: np.ndarray  # (M,) int64 points inside each box
    difficulty: np.ndarray  # (M,) int64: 0 ignored (0 points), 1 LEVEL_1, 2 LEVEL_2
    camera: CameraView | None = None  # the view the labels are bounded by, if any

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points)
        self.boxes = np.asarray(self.boxes)
        self.labels = np.asarray(self.labels)
        self.num_points = np.asarray(self.num_points)
        self.difficulty = np.asarray(self.difficulty)

    @property
    def num_objects(self) -> int:
        return int(self.boxes.shape[0])


def difficulty_from_points(num_points: np.ndarray) -> np.ndarray:
    """The difficulty rule: 0 points -> 0 (ignored), 1..5 -> 2 (LEVEL_2), >5 -> 1 (LEVEL_1)."""
    n = np.asarray(num_points, dtype=np.int64)
    out = np.full(n.shape, LEVEL_1, dtype=np.int64)
    out[n <= LEVEL_2_MAX_POINTS] = LEVEL_2
    out[n <= 0] = IGNORED
    return out


# ----------------------------------------------------------------------------- validation


def _fail(path, problem: str) -> InputError:
    return InputError(f"{path}: {problem}")


def _report_dropped(path, count: int, what: str = "points") -> None:
    if count:
        msg = f"{path}: dropped {count} {what} with NaN/inf coordinates"
        logger.warning(msg)
        warnings.warn(msg, DroppedPointsWarning, stacklevel=3)


def _as_float(arr: np.ndarray, name: str, path) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise _fail(path, f"array '{name}' has dtype {arr.dtype}, which cannot be read as float")
    return arr.astype(np.float32, copy=False)


def _as_int(arr: np.ndarray, name: str, path) -> np.ndarray:
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iu":
        raise _fail(path, f"array '{name}' has dtype {arr.dtype}, expected an integer dtype")
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise _fail(path, f"array '{name}' has values too large for int64")
    return arr.astype(np.int64, copy=False)


def validate_points(points: Any, path="<points>", columns: int = 4) -> np.ndarray:
    """Check a point array and return it as (N, 4) float32; NaN/inf rows are dropped.

    ``points`` must be 2-D with exactly ``columns`` columns (4 for frame files).
    """
    try:
        arr = np.asarray(points)
    except (TypeError, ValueError) as exc:  # ragged or not numbers
        raise _fail(path, f"points are not an array of numbers ({exc})") from None
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise _fail(path, f"points must have shape (N, {columns}), got {arr.shape}")
    arr = _as_float(arr, "points", path)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        _report_dropped(path, int((~finite).sum()))
        arr = arr[finite]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _validate_labels(arrays: dict, path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(arrays["boxes"])
    if boxes.ndim != 2 or boxes.shape[1] != 7:
        raise _fail(path, f"boxes must have shape (M, 7), got {boxes.shape}")
    boxes = _as_float(boxes, "boxes", path)
    if not np.isfinite(boxes).all():
        raise _fail(path, "boxes contain NaN or inf")
    if boxes.shape[0] and not (boxes[:, 3:6] > 0).all():
        raise _fail(path, "boxes have non-positive sizes (l, w, h must be > 0)")
    if boxes.shape[0] and (boxes[:, 3:6] > MAX_BOX_SIZE).any():
        raise _fail(path, f"boxes larger than {MAX_BOX_SIZE:g} m (l, w or h): not an object")
    m = boxes.shape[0]
    out = [np.ascontiguousarray(boxes)]
    for name in ("labels", "num_points", "difficulty"):
        arr = np.asarray(arrays[name])
        if arr.ndim != 1:
            raise _fail(path, f"{name} must have shape (M,), got {arr.shape}")
        if arr.shape[0] != m:
            raise _fail(path, f"inconsistent lengths: {m} boxes but {arr.shape[0]} {name}")
        out.append(np.ascontiguousarray(_as_int(arr, name, path)))
    _, labels, num_points, difficulty = out
    if m:
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            bad = labels[(labels < 0) | (labels >= len(CLASSES))]
            raise _fail(
                path,
                f"labels out of range: {sorted(set(bad.tolist()))[:5]} "
                f"(valid: 0..{len(CLASSES) - 1} for {list(CLASSES)})",
            )
        if num_points.min() < 0:
            raise _fail(path, "num_points has negative values")
        if not np.isin(difficulty, (IGNORED, LEVEL_1, LEVEL_2)).all():
            raise _fail(path, "difficulty values must be 0, 1 or 2")
    return boxes, labels, num_points, difficulty


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an npz file, turning any read failure into InputError."""
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise _fail(path, "not an npz archive (a single .npy array?)")
        with data:
            return {name: data[name] for name in data.files}
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
        raise _fail(path, f"truncated or corrupt npz file ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- frames


def frame_path(dataset_dir, frame_id: str) -> Path:
    """Where the frame ``frame_id`` of the dataset in ``dataset_dir`` lives."""
    return Path(dataset_dir) / FRAMES_DIR / f"{frame_id}.npz"


def write_frame(dataset_dir, frame: Frame) -> Path:
    """Write ``frame`` to ``dataset_dir/frames/<frame_id>.npz`` and return the path.

    The arrays are written with the documented dtypes, the labels checked as `read_frame`
    checks them (a frame the reader would refuse is an InputError here); the file is written to
    a temporary name first and renamed, so a reader never sees a half-written frame.
    """
    fid = str(frame.frame_id)
    if not fid or "/" in fid or "\\" in fid or fid.startswith("."):
        raise InputError(f"invalid frame id {fid!r}")
    path = frame_path(dataset_dir, fid)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "points": np.ascontiguousarray(frame.points, dtype=np.float32).reshape(-1, 4),
        "boxes": np.ascontiguousarray(frame.boxes, dtype=np.float32).reshape(-1, 7),
        "labels": np.ascontiguousarray(frame.labels, dtype=np.int64).reshape(-1),
        "num_points": np.ascontiguousarray(frame.num_points, dtype=np.int64).reshape(-1),
        "difficulty": np.ascontiguousarray(frame.difficulty, dtype=np.int64).reshape(-1),
    }
    if frame.camera is not None:
        arrays["camera_projection"] = np.asarray(frame.camera.projection, dtype=np.float64).reshape(3, 4)
        arrays["camera_image_size"] = np.array([frame.camera.width, frame.camera.height], dtype=np.float64)
    # Labels as the reader checks them (non-finite points it drops and counts itself).
    _validate_labels(arrays, f"frame {fid}")
    tmp = path.with_name(f".{fid}.tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def read_frame(path) -> Frame:
    """Read and validate one frame file; the frame id is the file name stem."""
    path = Path(path)
    arrays = _load_npz(path)
    missing = [name for name in FRAME_ARRAYS if name not in arrays]
    if missing:
        raise _fail(path, f"missing array(s) {missing} (a frame file needs {list(FRAME_ARRAYS)})")
    points = validate_points(arrays["points"], path)
    boxes, labels, num_points, difficulty = _validate_labels(arrays, path)
    return Frame(path.stem, points, boxes, labels, num_points, difficulty, _camera(arrays, path))


def _camera(arrays: dict, path) -> CameraView | None:
    """The optional camera view of a frame file (arrays camera_projection, camera_image_size)."""
    if "camera_projection" not in arrays and "camera_image_size" not in arrays:
        return None
    projection = np.asarray(arrays.get("camera_projection", np.zeros(0)), dtype=np.float64)
    size = np.asarray(arrays.get("camera_image_size", np.zeros(0)), dtype=np.float64)
    if projection.shape != (3, 4) or size.shape != (2,) or not (np.isfinite(projection).all()
                                                               and np.isfinite(size).all() and (size > 0).all()):
        raise _fail(path, "camera_projection must be (3, 4) and camera_image_size (2,) positive, all finite")
    return CameraView(projection, float(size[0]), float(size[1]))


# ----------------------------------------------------------------------------- dataset index


def write_dataset_index(dataset_dir, frame_ids: Iterable[str], meta: dict | None = None) -> Path:
    """Write ``dataset_dir/dataset.json`` listing ``frame_ids`` (in order) plus ``meta``."""
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": list(CLASSES),
        "frames": [str(f) for f in frame_ids],
    }
    for key, value in (meta or {}).items():
        if key in ("format", "version", "classes", "frames"):
            raise InputError(f"metadata key {key!r} is reserved in {INDEX_FILE}")
        index[key] = value
    path = dataset_dir / INDEX_FILE
    tmp = dataset_dir / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def is_dataset_dir(path) -> bool:
    """True when ``path`` holds a readable haltdet ``dataset.json``."""
    try:
        read_dataset_index(path)
    except InputError:
        return False
    return True


def read_dataset_index(dataset_dir) -> dict:
    """Read and check ``dataset_dir/dataset.json``; returns the whole JSON object."""
    path = Path(dataset_dir) / INDEX_FILE
    if not path.is_file():
        raise _fail(path, "file not found (not a haltdet dataset directory?)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"unreadable JSON ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a haltdet dataset index (expected \"format\": \"{FORMAT_NAME}\")")
    if index.get("version") != FORMAT_VERSION:
        raise _fail(path, f"unsupported version {index.get('version')!r} (supported: {FORMAT_VERSION})")
    if list(index.get("classes", [])) != list(CLASSES):
        raise _fail(path, f"classes {index.get('classes')!r} differ from {list(CLASSES)}")
    frames = index.get("frames")
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        raise _fail(path, "\"frames\" must be a list of frame id strings")
    return index


def open_dataset(dataset_dir) -> list[Path]:
    """The frame file paths of a dataset, in index order (each must exist)."""
    index = read_dataset_index(dataset_dir)
    paths = [frame_path(dataset_dir, fid) for fid in index["frames"]]
    for p in paths:
        if not p.is_file():
            raise _fail(p, "file not found (listed in dataset.json)")
    return paths


class FrameDataset(Sequence):
    """Minimal random-access reader: ``len(ds)``, ``ds[i] -> Frame``, ``ds.index``."""

    def __init__(self, dataset_dir) -> None:
        self.root = Path(dataset_dir)
        self.index = read_dataset_index(self.root)
        self.paths = open_dataset(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [read_frame(p) for p in self.paths[i]]
        return read_frame(self.paths[i])

    @property
    def frame_ids(self) -> list[str]:
        return list(self.index["frames"])


# ----------------------------------------------------------------------------- raw point files

NUSCENES_SUFFIX = ".pcd.bin"
"""nuScenes LIDAR_TOP sweeps: float32 x 5 columns (x, y, z, intensity 0..255, ring)."""
NUSCENES_COLUMNS = 5
BIN_COLUMNS = 4  # KITTI velodyne: float32 x, y, z, reflectance
BIN_DTYPES = ("float32", "float64")

# What a raw .bin reading must look like to be taken as a LiDAR frame (see _implausible).
# A wrong column count or dtype shifts values between columns (x, y and z land in the
# intensity column, intensities and ring numbers in z) or reads halves of doubles as
# floats (values like 1e19); real frames (KITTI, nuScenes, the synthetic sensor) keep the
# 1st-99th percentile of z within a few metres and intensities in [0, 1] or [0, 255].
PLAUSIBLE_FINITE_SHARE = 0.5  # at least half the rows are finite numbers
PLAUSIBLE_Z_RANGE = 50.0  # metres: 1st and 99th percentile of z inside [-50, 50]
PLAUSIBLE_XY_RANGE = 500.0  # metres: 1st and 99th percentile of x and of y inside [-500, 500]
PLAUSIBLE_INTENSITY_MAX = 255.0  # intensities lie in [0, 255] (8-bit) or [0, 1]
PLAUSIBLE_BAD_INTENSITY_SHARE = 0.001  # share of rows with intensity outside [0, 255] tolerated
GUESS_COLUMNS = (4, 5, 6, 7, 8, 3)  # layouts tried for a hint, those with an intensity first
GUESS_ROWS = 200_000  # rows (a strided sample) examined per guessed layout
HEADER_LIMIT = 65536  # bytes: a PCD or PLY header longer than this is not one

PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
PCD_TYPES = {"F": ("f", (2, 4, 8)), "U": ("u", (1, 2, 4, 8)), "I": ("i", (1, 2, 4, 8))}
PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def load_points_file(path, columns: int | None = None, *, intensity_scale: float | None = None,
                     dtype: str = "float32") -> np.ndarray:
    """Read a user's point cloud file as (N, 4) float32 (x, y, z in metres, intensity in [0, 1]).

    The format comes from the name and, for PCD and PLY, from the file's header:

      * ``.npy``: a 2-D array with 3+ columns x, y, z[, intensity, ...]; extra columns
        are dropped, 3 columns get intensity 0;
      * ``.pcd.bin``: a nuScenes sweep, float32 x 5 columns (x, y, z, intensity 0..255,
        ring) unless ``columns`` says otherwise;
      * ``.bin``: raw rows (KITTI style) of ``columns`` values (default 4) of ``dtype``
        (float32, or float64). A raw file carries no layout, so the reading is checked
        for plausibility (finite rows, z and x/y ranges, intensities in [0, 255]) and
        refused with an :class:`~haltdet.InputError` suggesting ``--columns N`` when it
        does not look like a LiDAR frame: a wrong column count whose rows happen to
        divide the file size would otherwise give garbage points silently;
      * ``.pcd``: PCL's PCD v0.7 with ``DATA ascii`` or ``DATA binary`` (any SIZE/TYPE/
        COUNT of the fields); fields x, y, z and, if present, intensity (else 0) are
        read, others ignored; ``binary_compressed`` is refused; VIEWPOINT is ignored
        (points are taken as stored, in the sensor frame);
      * ``.ply``: ascii, binary_little_endian or binary_big_endian, vertex properties
        x, y, z and optional intensity (other properties ignored; list properties in or
        before the vertex element are refused);
      * ``.npz``: a haltdet frame file (or any npz with a ``points`` array);
      * ``.txt`` / ``.csv``: one point per line, whitespace or comma separated, 3+
        columns; lines starting with ``#`` are comments.

    Intensity: the project's convention is [0, 1]. ``intensity_scale=None`` (automatic)
    divides by 255 and clips to [0, 1] when the intensities exceed 1 (8-bit sensors,
    nuScenes, most PCD files), logged at INFO; a number (> 0) divides by it and nothing
    else (``1`` keeps the values as stored).

    Empty clouds are valid and give shape (0, 4). NaN/inf rows are dropped (counted).
    """
    path = Path(path)
    scale = _check_intensity_scale(path, intensity_scale)
    points = _read_points(path, columns, dtype)
    return _scale_intensity(points, path, scale)


def _read_points(path: Path, columns, dtype) -> np.ndarray:
    """The (N, 4) float32 points of ``path`` as stored (before intensity scaling)."""
    suffix = path.suffix.lower()
    if suffix not in POINT_FILE_EXTENSIONS:
        raise _fail(path, f"unsupported point file extension {suffix!r} (supported: {', '.join(POINT_FILE_EXTENSIONS)})")
    if not path.is_file():
        raise _fail(path, "file not found")
    if suffix == ".npz":
        arrays = _load_npz(path)
        if all(name in arrays for name in FRAME_ARRAYS):
            return read_frame(path).points
        if "points" not in arrays:
            raise _fail(path, f"npz file has no 'points' array (arrays: {sorted(arrays)})")
        return _to_xyzi(arrays["points"], path)
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise _fail(path, f"truncated or corrupt npy file ({type(exc).__name__}: {exc})") from exc
        return _to_xyzi(arr, path)
    if suffix == ".bin":
        return _read_bin(path, columns, dtype)
    if suffix == ".pcd":
        return _read_pcd(path)
    if suffix == ".ply":
        return _read_ply(path)
    # text
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"unreadable text file ({exc})") from exc
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return np.zeros((0, 4), dtype=np.float32)
    delimiter = "," if "," in lines[0] else None
    try:
        arr = np.loadtxt(lines, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise _fail(path, f"cannot parse numbers ({exc})") from exc
    return _to_xyzi(arr, path)


def _to_xyzi(arr: np.ndarray, path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[0] == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise _fail(path, f"points must be a 2-D array with at least 3 columns (x, y, z), got shape {arr.shape}")
    arr = _as_float(arr, "points", path)
    if arr.shape[1] == 3:
        arr = np.concatenate([arr, np.zeros((arr.shape[0], 1), np.float32)], axis=1)
    return validate_points(arr[:, :4], path)


# ----------------------------------------------------------------------------- intensity


def _check_intensity_scale(path, value) -> float | None:
    """``intensity_scale`` as a float (None stays None: automatic); refused unless finite and > 0."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(path, f"intensity_scale (--intensity-scale) must be a number > 0, got {value!r}")
    scale = float(value)
    if not np.isfinite(scale) or scale <= 0:
        raise _fail(path, f"intensity_scale (--intensity-scale) must be a finite number > 0, got {value!r}")
    return scale


def _scale_intensity(points: np.ndarray, path, scale: float | None) -> np.ndarray:
    """Bring the intensity column of (N, 4) ``points`` to the project's [0, 1].

    ``scale=None``: intensities above 1 mean an 8-bit sensor (0..255): divide by 255 and
    clip to [0, 1] (values above 255 saturate, with a warning); clouds already in [0, 1]
    are left alone. A number: divide by it, no clipping (the caller chose).
    """
    if not len(points):
        return points
    points = points if points.flags.writeable else points.copy()
    intensity = points[:, 3].astype(np.float64)
    if scale is None:
        top = float(intensity.max())
        if top <= 1.0:
            return points
        points[:, 3] = np.clip(intensity / 255.0, 0.0, 1.0)
        logger.info("%s: intensities reach %g (> 1): taken as 0..255, divided by 255 and clipped to [0, 1] "
                    "(intensity_scale / --intensity-scale sets the divisor)", path, top)
        over = int((intensity > 255.0).sum())
        if over:
            logger.warning("%s: %d intensities above 255 (up to %g) clipped to 1; pass intensity_scale "
                           "(--intensity-scale) with the sensor's largest intensity", path, over, top)
        return points
    with np.errstate(over="ignore"):
        scaled = (intensity / scale).astype(np.float32)
    if not np.isfinite(scaled).all():
        raise _fail(path, f"intensity_scale {scale:g} makes intensities overflow float32")
    points[:, 3] = scaled
    return points


# ----------------------------------------------------------------------------- raw .bin


def _bin_dtype(path, dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in BIN_DTYPES:
        raise _fail(path, f"dtype must be one of {', '.join(BIN_DTYPES)} for a .bin file, got {dtype!r}")
    return dt.newbyteorder("<")


def _read_bin(path: Path, columns, dtype) -> np.ndarray:
    """Raw rows of ``columns`` values of ``dtype``, checked for plausibility (see module constants)."""
    if columns is None:
        columns = NUSCENES_COLUMNS if path.name.lower().endswith(NUSCENES_SUFFIX) else BIN_COLUMNS
    try:
        if int(columns) < 3:
            raise ValueError
    except (TypeError, ValueError):
        raise _fail(path, f"columns must be >= 3 for a .bin file, got {columns}") from None
    columns = int(columns)
    dt = _bin_dtype(path, dtype)
    size = path.stat().st_size
    row = dt.itemsize * columns
    if size % row:
        raise _fail(
            path,
            f"size {size} bytes is not a multiple of {row} ({dt.name} x {columns} columns): "
            "truncated or wrong column count" + _layout_hint(path, (dt.name, columns), refused=False),
        )
    arr = np.fromfile(path, dtype=dt).reshape(-1, columns)
    problems = _implausible(arr)
    if problems:
        raise _fail(
            path,
            f"read as {dt.name} x {columns} columns (a raw .bin file's layout is a guess), it is not "
            f"a plausible LiDAR frame: {'; '.join(problems)}." + _layout_hint(path, (dt.name, columns), refused=True),
        )
    return _to_xyzi(arr, path)


def _implausible(arr: np.ndarray) -> list[str]:
    """What makes an (N, C) reading of a raw file unlike a LiDAR frame (empty: plausible).

    Checks, on the first four columns: at least ``PLAUSIBLE_FINITE_SHARE`` of the rows
    finite; of the finite rows, the 1st and 99th percentile of x and y within
    +-``PLAUSIBLE_XY_RANGE`` m and of z within +-``PLAUSIBLE_Z_RANGE`` m; intensities (4th
    column) in [0, 255] but for ``PLAUSIBLE_BAD_INTENSITY_SHARE`` of the rows.
    """
    if arr.shape[0] == 0:
        return []
    head = arr[:, :4]
    with np.errstate(all="ignore"):
        finite = np.isfinite(head).all(axis=1)
        problems = []
        share = float(finite.mean())
        if share < PLAUSIBLE_FINITE_SHARE:
            problems.append(f"only {share:.0%} of the rows are finite numbers")
        good = head[finite].astype(np.float64)
        if not len(good):
            return problems
        low, high = np.percentile(good[:, :3], [1, 99], axis=0)
        limits = (("x", PLAUSIBLE_XY_RANGE), ("y", PLAUSIBLE_XY_RANGE), ("z", PLAUSIBLE_Z_RANGE))
        for axis, (name, limit) in enumerate(limits):
            if low[axis] < -limit or high[axis] > limit:
                problems.append(f"{name} spans {low[axis]:.3g}..{high[axis]:.3g} m (1st-99th percentile; "
                                f"a LiDAR frame's lies within +-{limit:g} m)")
        if head.shape[1] >= 4:
            intensity = good[:, 3]
            bad = float(((intensity < 0) | (intensity > PLAUSIBLE_INTENSITY_MAX)).mean())
            if bad > PLAUSIBLE_BAD_INTENSITY_SHARE:
                problems.append(f"{bad:.1%} of the intensities (4th column) lie outside 0..{PLAUSIBLE_INTENSITY_MAX:g} "
                                f"(they span {intensity.min():.3g}..{intensity.max():.3g})")
    return problems


def _plausible_layouts(path: Path, exclude: tuple[str, int]) -> list[tuple[str, int]]:
    """The (dtype, columns) layouts, other than ``exclude``, whose reading of ``path`` looks
    like a LiDAR frame: float32 first, then float64; per dtype the first in ``GUESS_COLUMNS``."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    found = []
    for name in BIN_DTYPES:
        dt = np.dtype(name).newbyteorder("<")
        for columns in GUESS_COLUMNS:
            row = dt.itemsize * columns
            if (name, columns) == exclude or not data or len(data) % row:
                continue
            arr = np.frombuffer(data, dtype=dt).reshape(-1, columns)
            arr = arr[:: max(1, arr.shape[0] // GUESS_ROWS)]
            if not _implausible(arr):
                found.append((name, columns))
                break
    return found


def _layout_hint(path: Path, tried: tuple[str, int], refused: bool) -> str:
    """The end of the message refusing a raw .bin reading: which layout reads plausibly."""
    layouts = _plausible_layouts(path, tried)
    singles = [c for name, c in layouts if name == "float32"]
    doubles = [c for name, c in layouts if name == "float64"]
    if singles:
        return f" It reads plausibly as float32 x {singles[0]} columns: pass --columns {singles[0]}."
    if doubles:
        return (f" It looks like float64 (doubles) x {doubles[0]} columns, which no --columns N of float32 "
                f"reads: convert it to float32 rows or .npy (in Python, load_points_file(..., "
                f"columns={doubles[0]}, dtype='float64') reads it).")
    if refused:
        return (" Pass --columns N with the file's number of float32 values per point (a nuScenes .pcd.bin "
                "has 5), or save the points as .npy.")
    return ""


# ----------------------------------------------------------------------------- PCD and PLY


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"unreadable file ({exc})") from exc


def _header_lines(path: Path, data: bytes, what: str):
    """Yield (text, end offset) per line of an ASCII header (at most ``HEADER_LIMIT`` bytes)."""
    pos = 0
    while pos < len(data):
        if pos > HEADER_LIMIT:
            raise _fail(path, f"no end of the {what} header in the first {HEADER_LIMIT} bytes (not a {what} file?)")
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        try:
            text = data[pos:end].decode("ascii").strip()
        except UnicodeDecodeError:
            raise _fail(path, f"not a {what} file (binary bytes in its header)") from None
        yield text, end
        pos = end


def _xyzi_index(path, names: list[str], what: str) -> list[int | None]:
    """Positions of x, y, z and intensity (None: absent) in ``names`` (case-insensitive)."""
    lower = [n.lower() for n in names]
    missing = [a for a in ("x", "y", "z") if a not in lower]
    if missing:
        raise _fail(path, f"{what} has no {', '.join(missing)} (it has: {', '.join(names) or 'nothing'})")
    return [lower.index(a) for a in ("x", "y", "z")] + [lower.index("intensity") if "intensity" in lower else None]


def _ascii_rows(path, body: bytes, skip: int, n: int, what: str) -> np.ndarray | None:
    """Rows skip..skip+n of the non-empty text lines of `body` as an (n, K) float64 table
    (None when n is 0); a short or unparsable body is an InputError naming `what`."""
    try:
        lines = [ln for ln in body.decode("ascii").splitlines() if ln.strip()][skip: skip + n]
    except UnicodeDecodeError:
        raise _fail(path, f"{what}: non-text bytes") from None
    if len(lines) != n:
        raise _fail(path, f"{what}: {len(lines)} lines for {n} points (truncated?)")
    if n == 0:
        return None
    try:
        return np.loadtxt(lines, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise _fail(path, f"{what}: cannot parse numbers ({exc})") from exc


def _stack_xyzi(path, columns: list[np.ndarray | None], n: int) -> np.ndarray:
    """(n, 4) points from the x, y, z and intensity columns (intensity None -> 0)."""
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    out = np.zeros((n, 4), dtype=np.float64)
    for j, col in enumerate(columns):
        if col is not None:
            out[:, j] = col
    return _to_xyzi(out, path)


def _header_int(path, header: dict, key: str, default: int | None = None) -> int:
    values = header.get(key)
    if values is None:
        if default is None:
            raise _fail(path, f"PCD header has no {key} line")
        return default
    try:
        value = int(values[0])
    except (IndexError, ValueError):
        raise _fail(path, f"PCD header: {key} needs a whole number, got {' '.join(values)!r}") from None
    if value < 0:
        raise _fail(path, f"PCD header: {key} is negative ({value})")
    return value


def _read_pcd(path: Path) -> np.ndarray:
    """Points of a PCL PCD file (v0.7, ``DATA ascii`` or ``binary``) as (N, 4) float32."""
    data = _read_bytes(path)
    header: dict[str, list[str]] = {}
    body = None
    for text, end in _header_lines(path, data, "PCD"):
        if not text or text.startswith("#"):
            continue
        key, *values = text.split()
        key = key.upper()
        if key not in PCD_KEYS:
            raise _fail(path, f"not a PCD file: unexpected header line {text[:40]!r} (expected {', '.join(PCD_KEYS)})")
        header[key] = values
        if key == "DATA":
            body = end
            break
    if body is None:
        raise _fail(path, "not a PCD file or truncated header: no DATA line")
    fields = header.get("FIELDS") or []
    sizes, types = header.get("SIZE") or [], header.get("TYPE") or []
    counts = header.get("COUNT") or ["1"] * len(fields)
    if not fields or not len(fields) == len(sizes) == len(types) == len(counts):
        raise _fail(path, f"PCD header: FIELDS, SIZE, TYPE and COUNT must list one entry per field, got "
                          f"{len(fields)}, {len(sizes)}, {len(types)} and {len(counts)}")
    width, height = _header_int(path, header, "WIDTH"), _header_int(path, header, "HEIGHT", 1)
    n = _header_int(path, header, "POINTS", width * height)
    if n != width * height:
        raise _fail(path, f"PCD header: POINTS {n} differs from WIDTH x HEIGHT = {width} x {height}")
    formats = []
    for name, size, kind, count in zip(fields, sizes, types, counts):
        code, allowed = PCD_TYPES.get(kind.upper(), (None, ()))
        try:
            size_i, count_i = int(size), int(count)
        except ValueError:
            size_i = count_i = 0
        if size_i not in allowed or count_i < 1:
            raise _fail(path, f"PCD field {name!r}: TYPE {kind} SIZE {size} COUNT {count} is not a number type "
                              "(TYPE F with SIZE 4 or 8; U or I with SIZE 1, 2, 4 or 8; COUNT >= 1)")
        formats.append((f"{code}{size_i}", count_i))
    index = _xyzi_index(path, fields, "PCD FIELDS")
    for i in index:
        if i is not None and formats[i][1] != 1:
            raise _fail(path, f"PCD field {fields[i]!r} has COUNT {formats[i][1]}; x, y, z and intensity need COUNT 1")
    mode = (header["DATA"] or [""])[0].lower()
    if mode == "binary_compressed":
        raise _fail(path, "PCD DATA binary_compressed is not supported: save the cloud with DATA binary or ascii "
                          "(e.g. pcl_convert_pcd_ascii_binary IN.pcd OUT.pcd 1)")
    if mode == "binary":
        dtype = np.dtype([(f"f{i}", "<" + code, (count,) if count > 1 else ())
                          for i, (code, count) in enumerate(formats)])
        if n == 0:
            return np.zeros((0, 4), dtype=np.float32)
        need = n * dtype.itemsize
        if len(data) - body < need:
            raise _fail(path, f"truncated: DATA binary needs {need} bytes for {n} points of {dtype.itemsize} bytes, "
                              f"the file has {len(data) - body}")
        records = np.frombuffer(data, dtype=dtype, count=n, offset=body)
        return _stack_xyzi(path, [None if i is None else records[f"f{i}"] for i in index], n)
    if mode == "ascii":
        table = _ascii_rows(path, data[body:], 0, n, "PCD DATA ascii")
        if table is None:
            return np.zeros((0, 4), dtype=np.float32)
        starts = np.concatenate([[0], np.cumsum([count for _, count in formats])])
        if table.shape[1] != starts[-1]:
            raise _fail(path, f"PCD DATA ascii has {table.shape[1]} values per line, the header {starts[-1]}")
        return _stack_xyzi(path, [None if i is None else table[:, starts[i]] for i in index], n)
    raise _fail(path, f"PCD DATA {mode!r} is not supported (ascii or binary)")


def _read_ply(path: Path) -> np.ndarray:
    """Points of a PLY file (ascii or binary; vertex x, y, z[, intensity]) as (N, 4) float32."""
    data = _read_bytes(path)
    if not data.startswith(b"ply"):
        raise _fail(path, "not a PLY file (it does not start with 'ply')")
    fmt, body = None, None
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []  # name, count, (property, dtype)
    for text, end in _header_lines(path, data, "PLY"):
        words = text.split()
        if not words or words[0] in ("ply", "comment", "obj_info"):
            continue
        if words[0] == "end_header":
            body = end
            break
        if words[0] == "format" and len(words) >= 2 and words[1] in PLY_FORMATS:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in PLY_TYPES:
            elements[-1][2].append((words[2], PLY_TYPES[words[1]]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], None))
        else:
            raise _fail(path, f"PLY header: cannot read line {text[:40]!r}")
    if body is None or fmt is None:
        raise _fail(path, "PLY header has no " + ("end_header" if body is None else "format ascii / binary_* line"))
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise _fail(path, f"PLY file has no vertex element (elements: {', '.join(names) or 'none'})")
    at = names.index("vertex")
    for name, _, props in elements[: at + 1]:
        if any(dt is None for _, dt in props):
            raise _fail(path, f"PLY element {name!r} has list properties: only fixed-size elements up to "
                              "'vertex' are supported")
    n, props = elements[at][1], elements[at][2]
    index = _xyzi_index(path, [p for p, _ in props], "PLY vertex element")
    order = PLY_FORMATS[fmt]
    if order is None:  # ascii: one line per element instance
        table = _ascii_rows(path, data[body:], sum(e[1] for e in elements[:at]), n, "PLY ascii vertex lines")
        if table is None:
            return np.zeros((0, 4), dtype=np.float32)
        if table.shape[1] != len(props):
            raise _fail(path, f"PLY vertex lines have {table.shape[1]} values, the header {len(props)} properties")
        return _stack_xyzi(path, [None if i is None else table[:, i] for i in index], n)
    dtypes = [np.dtype([(f"p{i}", order + dt) for i, (_, dt) in enumerate(e[2])]) for e in elements[: at + 1]]
    offset = body + sum(e[1] * dt.itemsize for e, dt in zip(elements[:at], dtypes[:at]))
    need = offset + n * dtypes[at].itemsize
    if len(data) < need:
        raise _fail(path, f"truncated: the PLY vertices need {need} bytes, the file has {len(data)}")
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    records = np.frombuffer(data, dtype=dtypes[at], count=n, offset=offset)
    return _stack_xyzi(path, [None if i is None else records[f"p{i}"] for i in index], n)
