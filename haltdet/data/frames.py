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

FORMAT_NAME = "haltdet-frames"
FORMAT_VERSION = 1
INDEX_FILE = "dataset.json"
FRAMES_DIR = "frames"
FRAME_ARRAYS = ("points", "boxes", "labels", "num_points", "difficulty")

IGNORED, LEVEL_1, LEVEL_2 = 0, 1, 2
"""Difficulty values: 0 points -> ignored, more than 5 -> LEVEL_1, 1..5 -> LEVEL_2."""
LEVEL_2_MAX_POINTS = 5

POINT_FILE_EXTENSIONS = (".npy", ".bin", ".npz", ".txt", ".csv")
MAX_BOX_SIZE = 200.0  # metres; larger boxes are malformed labels


class DroppedPointsWarning(UserWarning):
    """Points with NaN/inf coordinates were dropped while reading a file."""


@dataclass
class Frame:
    """One LiDAR frame with its labels (all arrays in the project conventions)."""

    frame_id: str
    points: np.ndarray  # (N, 4) float32: x, y, z, intensity, LiDAR frame
    boxes: np.ndarray  # (M, 7) float32, project convention
    labels: np.ndarray  # (M,) int64 index into haltdet.CLASSES
    num_points: np.ndarray  # (M,) int64 points inside each box
    difficulty: np.ndarray  # (M,) int64: 0 ignored (0 points), 1 LEVEL_1, 2 LEVEL_2

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

    The arrays are written with the documented dtypes; the file is written to a
    temporary name first and renamed, so a reader never sees a half-written frame.
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
    return Frame(path.stem, points, boxes, labels, num_points, difficulty)


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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


def load_points_file(path, columns: int = 4) -> np.ndarray:
    """Read a user's point cloud file as (N, 4) float32 (x, y, z, intensity).

    Supported:
      * ``.npy``: a 2-D array with 3+ columns x, y, z[, intensity, ...]; extra columns
        are dropped, 3 columns get intensity 0;
      * ``.bin``: raw float32 rows (KITTI style) with ``columns`` values per row;
      * ``.npz``: a haltdet frame file (or any npz with a ``points`` array);
      * ``.txt`` / ``.csv``: one point per line, whitespace or comma separated, 3+
        columns; lines starting with ``#`` are comments.

    Empty clouds are valid and give shape (0, 4). NaN/inf rows are dropped (counted).
    """
    path = Path(path)
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
        if int(columns) < 3:
            raise _fail(path, f"columns must be >= 3 for a .bin file, got {columns}")
        size = path.stat().st_size
        row = 4 * int(columns)
        if size % row:
            raise _fail(
                path,
                f"size {size} bytes is not a multiple of {row} (float32 x {columns} columns): "
                "truncated or wrong column count",
            )
        arr = np.fromfile(path, dtype=np.float32).reshape(-1, int(columns))
        return _to_xyzi(arr, path)
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
