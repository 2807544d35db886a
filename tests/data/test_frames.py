"""Tests of the on-disk frame format and of the raw point file readers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from haltdet import InputError
from haltdet.data.frames import (
    DroppedPointsWarning,
    Frame,
    FrameDataset,
    difficulty_from_points,
    load_points_file,
    open_dataset,
    read_dataset_index,
    read_frame,
    write_dataset_index,
    write_frame,
)


def _frame(fid="000042", n=50, m=3, seed=0) -> Frame:
    rng = np.random.default_rng(seed)
    points = rng.uniform(-20, 20, (n, 4)).astype(np.float32)
    points[:, 3] = rng.uniform(0, 1, n)
    boxes = np.zeros((m, 7), np.float32)
    boxes[:, :3] = rng.uniform(-10, 10, (m, 3))
    boxes[:, 3:6] = rng.uniform(0.5, 5, (m, 3))
    boxes[:, 6] = rng.uniform(-3, 3, m)
    labels = np.arange(m, dtype=np.int64) % 3
    num = np.array([0, 3, 17][:m], dtype=np.int64)
    return Frame(fid, points, boxes, labels, num, difficulty_from_points(num))


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _arrays(frame: Frame) -> dict:
    return {k: getattr(frame, k) for k in ("points", "boxes", "labels", "num_points", "difficulty")}


def test_round_trip(tmp_path):
    f = _frame()
    path = write_frame(tmp_path, f)
    assert path == tmp_path / "frames" / "000042.npz"
    g = read_frame(path)
    assert g.frame_id == "000042"
    for name, arr in _arrays(f).items():
        got = getattr(g, name)
        np.testing.assert_array_equal(got, arr)
    assert g.points.dtype == np.float32 and g.boxes.dtype == np.float32
    assert g.labels.dtype == np.int64 and g.num_points.dtype == np.int64 and g.difficulty.dtype == np.int64


def test_round_trip_empty_frame(tmp_path):
    f = Frame("empty", np.zeros((0, 4), np.float32), np.zeros((0, 7), np.float32), np.zeros(0, np.int64),
              np.zeros(0, np.int64), np.zeros(0, np.int64))
    g = read_frame(write_frame(tmp_path, f))
    assert g.points.shape == (0, 4) and g.boxes.shape == (0, 7)


def test_difficulty_rule():
    np.testing.assert_array_equal(difficulty_from_points([0, 1, 5, 6, 100]), [0, 2, 2, 1, 1])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.npz"):
        read_frame(tmp_path / "nope.npz")


def test_truncated_npz(tmp_path):
    path = write_frame(tmp_path, _frame(n=2000))
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.npz"):
        read_frame(cut)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(InputError, match="garbage.npz"):
        read_frame(garbage)


def test_nan_points_dropped_and_counted(tmp_path):
    f = _frame(n=20)
    f.points[3, 0] = np.nan
    f.points[7, 2] = np.inf
    f.points[9, 3] = -np.inf
    path = write_frame(tmp_path, f)
    with pytest.warns(DroppedPointsWarning, match=r"000042\.npz: dropped 3 points"):
        g = read_frame(path)
    assert g.points.shape == (17, 4)
    assert np.isfinite(g.points).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(points=np.zeros((5, 3), np.float32)), r"points must have shape \(N, 4\)"),
        (dict(points=np.zeros(8, np.float32)), r"points must have shape"),
        (dict(points=np.array([["a", "b", "c", "d"]])), "cannot be read as float"),
        (dict(boxes=np.zeros((3, 6), np.float32)), r"boxes must have shape \(M, 7\)"),
        (dict(labels=np.array([0, 1, 3])), "labels out of range"),
        (dict(labels=np.array([0, -1, 2])), "labels out of range"),
        (dict(labels=np.array([0.0, 1.0, 2.0])), "integer dtype"),
        (dict(labels=np.array([0, 1])), "inconsistent lengths"),
        (dict(num_points=np.array([0, 1, 2, 3])), "inconsistent lengths"),
        (dict(num_points=np.array([0, -1, 2])), "negative"),
        (dict(difficulty=np.array([0, 5, 1])), "difficulty"),
    ],
)
def test_bad_arrays(tmp_path, change, match):
    arrays = _arrays(_frame())
    arrays.update(change)
    path = _write_npz(tmp_path / "bad_frame.npz", **arrays)
    with pytest.raises(InputError, match=match) as info:
        read_frame(path)
    assert "bad_frame.npz" in str(info.value)


def test_nan_boxes_rejected(tmp_path):
    arrays = _arrays(_frame())
    arrays["boxes"] = arrays["boxes"].copy()
    arrays["boxes"][1, 4] = np.nan
    path = _write_npz(tmp_path / "nanbox.npz", **arrays)
    with pytest.raises(InputError, match="nanbox.npz: boxes contain NaN"):
        read_frame(path)


def test_missing_array(tmp_path):
    arrays = _arrays(_frame())
    del arrays["difficulty"]
    path = _write_npz(tmp_path / "partial.npz", **arrays)
    with pytest.raises(InputError, match=r"partial.npz: missing array\(s\) \['difficulty'\]"):
        read_frame(path)


def test_float64_points_cast(tmp_path):
    arrays = _arrays(_frame())
    arrays["points"] = arrays["points"].astype(np.float64)
    g = read_frame(_write_npz(tmp_path / "f64.npz", **arrays))
    assert g.points.dtype == np.float32


def test_dataset_index(tmp_path):
    frames = [_frame(fid=f"{i:06d}", seed=i) for i in range(3)]
    for f in frames:
        write_frame(tmp_path, f)
    write_dataset_index(tmp_path, [f.frame_id for f in frames], {"source": "test", "seed": 9})
    index = read_dataset_index(tmp_path)
    assert index["format"] == "haltdet-frames" and index["version"] == 1
    assert index["classes"] == ["Vehicle", "Pedestrian", "Cyclist"]
    assert index["frames"] == ["000000", "000001", "000002"] and index["source"] == "test"
    paths = open_dataset(tmp_path)
    assert [p.name for p in paths] == ["000000.npz", "000001.npz", "000002.npz"]
    ds = FrameDataset(tmp_path)
    assert len(ds) == 3 and ds.frame_ids == index["frames"]
    np.testing.assert_array_equal(ds[1].points, frames[1].points)
    (tmp_path / "frames" / "000001.npz").unlink()
    with pytest.raises(InputError, match="000001.npz"):
        open_dataset(tmp_path)


def test_dataset_index_errors(tmp_path):
    with pytest.raises(InputError, match="dataset.json"):
        read_dataset_index(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a haltdet dataset"):
        read_dataset_index(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset.json"):
        read_dataset_index(tmp_path)
    with pytest.raises(InputError, match="reserved"):
        write_dataset_index(tmp_path, [], {"frames": []})


# ----------------------------------------------------------------------------- load_points_file


def test_load_npy_columns(tmp_path):
    rng = np.random.default_rng(0)
    for cols in (3, 4, 6):
        arr = rng.normal(size=(10, cols))
        path = tmp_path / f"p{cols}.npy"
        np.save(path, arr)
        pts = load_points_file(path, intensity_scale=1)  # 1: intensities as stored
        assert pts.shape == (10, 4) and pts.dtype == np.float32
        np.testing.assert_allclose(pts[:, :3], arr[:, :3], rtol=1e-6)
        if cols == 3:
            assert (pts[:, 3] == 0).all()
        else:
            np.testing.assert_allclose(pts[:, 3], arr[:, 3], rtol=1e-6)
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    assert load_points_file(tmp_path / "empty.npy").shape == (0, 4)
    np.save(tmp_path / "flat.npy", np.zeros(12, np.float32))
    with pytest.raises(InputError, match="flat.npy"):
        load_points_file(tmp_path / "flat.npy")
    np.save(tmp_path / "two.npy", np.zeros((5, 2), np.float32))
    with pytest.raises(InputError, match="at least 3 columns"):
        load_points_file(tmp_path / "two.npy")


def test_load_bin(tmp_path):
    # Raw .bin readings must look like a LiDAR frame: intensities in [0, 1] here.
    arr = np.random.default_rng(1).normal(size=(25, 4)).astype(np.float32)
    arr[:, 3] = np.abs(arr[:, 3]) / np.abs(arr[:, 3]).max()
    arr.tofile(tmp_path / "kitti.bin")
    np.testing.assert_array_equal(load_points_file(tmp_path / "kitti.bin"), arr)
    arr5 = np.random.default_rng(2).normal(size=(7, 5)).astype(np.float32)
    arr5[:, 3] = np.abs(arr5[:, 3]) / np.abs(arr5[:, 3]).max()
    arr5.tofile(tmp_path / "five.bin")
    np.testing.assert_array_equal(load_points_file(tmp_path / "five.bin", columns=5), arr5[:, :4])
    (tmp_path / "cut.bin").write_bytes(arr.tobytes()[:-6])
    with pytest.raises(InputError, match="cut.bin.*truncated or wrong column count"):
        load_points_file(tmp_path / "cut.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    assert load_points_file(tmp_path / "empty.bin").shape == (0, 4)


def test_load_npz_frame_and_points_only(tmp_path):
    f = _frame()
    path = write_frame(tmp_path, f)
    np.testing.assert_array_equal(load_points_file(path), f.points)
    np.savez(tmp_path / "pts.npz", points=f.points[:, :3])
    pts = load_points_file(tmp_path / "pts.npz")
    assert pts.shape == (f.points.shape[0], 4)
    np.savez(tmp_path / "other.npz", xyz=f.points)
    with pytest.raises(InputError, match="other.npz.*'points'"):
        load_points_file(tmp_path / "other.npz")


def test_load_text(tmp_path):
    (tmp_path / "a.txt").write_text("# x y z i\n1 2 3 0.5\n4 5 6 0.25\n")
    np.testing.assert_allclose(load_points_file(tmp_path / "a.txt"), [[1, 2, 3, 0.5], [4, 5, 6, 0.25]])
    (tmp_path / "b.csv").write_text("1,2,3\n4,5,6\n")
    np.testing.assert_allclose(load_points_file(tmp_path / "b.csv"), [[1, 2, 3, 0], [4, 5, 6, 0]])
    (tmp_path / "one.csv").write_text("1,2,3,0.1,7,8\n")
    np.testing.assert_allclose(load_points_file(tmp_path / "one.csv"), [[1, 2, 3, 0.1]], rtol=1e-6)
    (tmp_path / "empty.txt").write_text("")
    assert load_points_file(tmp_path / "empty.txt").shape == (0, 4)
    (tmp_path / "bad.txt").write_text("1 2 three\n")
    with pytest.raises(InputError, match="bad.txt"):
        load_points_file(tmp_path / "bad.txt")


def test_load_points_errors_and_nan(tmp_path):
    with pytest.raises(InputError, match="missing.bin"):
        load_points_file(tmp_path / "missing.bin")
    (tmp_path / "cloud.las").write_text("x")
    with pytest.raises(InputError, match="cloud.las.*unsupported"):
        load_points_file(tmp_path / "cloud.las")
    (tmp_path / "cloud.pcd").write_text("x")  # .pcd is read now: this one is not a PCD file
    with pytest.raises(InputError, match="cloud.pcd.*not a PCD file"):
        load_points_file(tmp_path / "cloud.pcd")
    arr = np.ones((6, 4), np.float32)
    arr[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pts = load_points_file(tmp_path / "nan.npy")
    assert pts.shape == (5, 4)
    assert any(issubclass(w.category, DroppedPointsWarning) and "dropped 1 points" in str(w.message) for w in caught)


def test_write_frame_refuses_what_the_reader_would(tmp_path):
    """A converter cannot write a frame that the project's own reader then rejects."""
    from haltdet.data.frames import Frame, write_frame

    points = np.zeros((3, 4), np.float32)
    huge = np.array([[0, 0, 0, 500.0, 2, 2, 0]], np.float32)
    one = np.ones(1, np.int64)
    with pytest.raises(InputError, match="larger than 200 m"):
        write_frame(tmp_path, Frame("x", points, huge, np.zeros(1, np.int64), one, one))
    with pytest.raises(InputError, match="labels out of range"):
        write_frame(tmp_path, Frame("y", points, huge * [1, 1, 1, 0.01, 1, 1, 1], np.full(1, 7), one, one))
    assert not list(tmp_path.rglob("*.npz"))


def test_camera_view_by_hand_and_bad_camera_arrays(tmp_path):
    from haltdet.data.frames import CameraView, Frame, read_frame, write_frame

    # A camera at the origin looking along +x (image u to the right = -y, v down = -z),
    # focal length 100 px, image 200 x 100 with its centre at (100, 50).
    projection = np.array([[100.0, -100.0, 0.0, 0.0], [50.0, 0.0, -100.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    projection[0, 0] = 100.0  # u = 100 * (x - y) / x
    camera = CameraView(projection, 200.0, 100.0)
    points = np.array([[10.0, 0.0, 0.0], [10.0, 9.9, 0.0], [10.0, -9.9, 0.0], [10.0, 0.0, 4.9],
                       [10.0, 10.1, 0.0], [10.0, 0.0, 5.1], [-10.0, 0.0, 0.0]])
    assert camera.sees(points).tolist() == [True, True, True, True, False, False, False]
    frame = Frame("f", np.zeros((1, 4), np.float32), np.zeros((0, 7), np.float32), np.zeros(0, np.int64),
                  np.zeros(0, np.int64), np.zeros(0, np.int64), camera)
    path = write_frame(tmp_path, frame)
    arrays = dict(np.load(path))
    arrays["camera_image_size"] = np.array([200.0, -1.0])
    np.savez(path, **arrays)
    with pytest.raises(InputError, match="camera_projection must be"):
        read_frame(path)
