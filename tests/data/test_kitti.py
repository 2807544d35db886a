"""KITTI reader: calibration and box conversion, checked on the real frames and by hand."""

import math
from pathlib import Path

import numpy as np
import pytest

from haltdet import CLASSES, InputError
from haltdet.boxes import count_points_in_boxes
from haltdet.data.formats import open_data
from haltdet.data.formats.kitti import read_calib, read_labels

KITTI = Path(__file__).parents[2].parent / "shared" / "data" / "real" / "kitti" / "training"
HDL64_RANGE = 120.0  # metres


@pytest.fixture
def kitti():
    if not KITTI.is_dir():
        pytest.skip(f"real-data fixture not found: {KITTI}")
    return open_data(f"kitti:{KITTI}")


def test_frames_and_point_counts(kitti):
    assert kitti.frame_ids() == ["000000", "000001"]
    for frame_id, count in (("000000", 115_384), ("000001", 120_268)):
        frame = kitti.read(frame_id)
        assert frame.points.shape == (count, 4) and frame.points.dtype == np.float32
        assert 0 <= frame.points[:, 3].min() and frame.points[:, 3].max() <= 1


def test_every_labelled_object_in_range_contains_points(kitti):
    for frame_id, expected in (("000000", ["Pedestrian"]), ("000001", ["Vehicle", "Vehicle", "Cyclist"])):
        frame = kitti.read(frame_id)
        types, values = read_labels(KITTI / "label_2" / f"{frame_id}.txt")
        objects = [t for t in types if t != "DontCare"]
        assert len(objects) == frame.num_objects
        assert [CLASSES[i] for i in frame.labels] == expected
        in_range = np.hypot(frame.boxes[:, 0], frame.boxes[:, 1]) < HDL64_RANGE
        assert in_range.all()
        print(frame_id, dict(zip(objects, frame.num_points.tolist())))
        assert (frame.num_points[in_range] > 0).all()
        assert np.array_equal(frame.num_points, count_points_in_boxes(frame.points, frame.boxes))
        # The exact calibration rotates headings by less than a degree from the ideal formula.
        rot_y = values[[t != "DontCare" for t in types], 13]
        ideal = -rot_y - math.pi / 2
        assert np.abs(np.angle(np.exp(1j * (frame.boxes[:, 6] - ideal)))).max() < 0.02


def test_heading_and_centre_are_confirmed_by_the_points(kitti):
    frame = kitti.read("000001")  # the truck is 12.3 m long: a wrong heading or z loses its points
    counts = frame.num_points
    turned = frame.boxes.copy()
    turned[:, 6] += math.pi / 2
    bottom = frame.boxes.copy()
    bottom[:, 2] -= bottom[:, 5] / 2  # as if z were the bottom
    assert (count_points_in_boxes(frame.points, turned)[:2] < counts[:2] / 4).all()
    assert count_points_in_boxes(frame.points, bottom).sum() < 0.7 * counts.sum()


# ----------------------------------------------------------------------------- hand-made cases

# Velodyne -> camera: x_cam = -y_velo, y_cam = -z_velo, z_cam = x_velo, then a translation.
TR = np.array([[0, -1, 0, 0.0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]])


def _write_kitti(root: Path, labels: str | None, points: np.ndarray, calib: bool = True) -> Path:
    for name in ("velodyne",) + (("label_2", "calib") if labels is not None else ()):
        (root / name).mkdir(parents=True, exist_ok=True)
    points.astype(np.float32).tofile(root / "velodyne" / "000007.bin")
    if labels is not None:
        (root / "label_2" / "000007.txt").write_text(labels)
        if calib:
            (root / "calib" / "000007.txt").write_text(
                "P0: " + " ".join(["0"] * 12) + "\nP2: 721.5 0 609.6 44.9 0 721.5 172.9 0.2 0 0 1 0.003\n"
                "R0_rect: 1 0 0 0 1 0 0 0 1\n"
                "Tr_velo_to_cam: " + " ".join(str(v) for v in TR.ravel()) + "\n")
    return root


def test_known_label_and_calibration_give_the_known_lidar_box(tmp_path):
    labels = ("Car 0.00 0 0.0 0 0 10 10 1.50 1.60 4.00 2.00 1.50 10.00 0.30\n"
              "DontCare -1 -1 -10 0 0 10 10 -1 -1 -1 -1000 -1000 -1000 -10\n"
              "Person_sitting 0.10 1 0.0 0 0 10 10 1.00 0.50 0.60 -1.00 1.70 5.00 -1.00\n"
              "Tram 0.00 0 0.0 0 0 10 10 3.00 2.50 15.00 5.00 1.50 30.00 0.00\n")
    points = np.array([[10.27, -2.0, -0.83, 0.5], [50.0, 50.0, 0.0, 1.5]])
    root = _write_kitti(tmp_path / "training", labels, points)
    frame = open_data(f"kitti:{root}").read("000007")
    # Car: camera bottom centre (2, 1.5, 10), h 1.5 -> centre (2, 0.75, 10) -> minus the
    # translation (2, 0.83, 10.27) -> Velodyne (10.27, -2, -0.83); yaw = -0.3 - pi/2.
    # Person_sitting: centre (-1, 1.2, 5) -> (5.27, 1, -1.28); yaw = 1 - pi/2.
    # Then 0.17 m down: the road, 1.73 m below the Velodyne, to the project frame's -1.9.
    expected = np.array([[10.27, -2.0, -1.0, 4.0, 1.6, 1.5, -0.3 - math.pi / 2],
                         [5.27, 1.0, -1.45, 0.6, 0.5, 1.0, 1.0 - math.pi / 2]])
    np.testing.assert_allclose(frame.boxes, expected, atol=1e-5)
    assert [CLASSES[i] for i in frame.labels] == ["Vehicle", "Pedestrian"]
    assert frame.num_points.tolist() == [1, 0] and frame.difficulty.tolist() == [2, 0]
    assert frame.points[:, 3].tolist() == [0.5, 1.0]  # reflectance clipped to [0, 1]
    np.testing.assert_allclose(read_calib(root / "calib" / "000007.txt")[:3, :3], TR[:, :3].T, atol=1e-12)


def test_test_split_without_labels_gives_empty_frames(tmp_path):
    root = _write_kitti(tmp_path / "testing", None, np.zeros((3, 4)))
    frame = open_data(f"kitti:{root}").read("000007")
    assert frame.boxes.shape == (0, 7) and frame.labels.shape == (0,) and len(frame.points) == 3


@pytest.mark.parametrize("labels, calib, message", [
    ("Car 0.00 0 0.0 0 0 10 10 1.50 1.60 4.00 2.00 1.50 10.00\n", True, "000007.txt:1: expected 15 fields"),
    ("Car 0.00 0 0.0 0 0 10 10 1.50 1.60 four 2.00 1.50 10.00 0.3\n", True, "000007.txt:1: malformed number"),
    ("Spaceship 0.00 0 0.0 0 0 10 10 1.50 1.60 4.00 2.00 1.50 10.00 0.3\n", True, "unknown class name"),
    ("Car 0.00 0 0.0 0 0 10 10 1.50 1.60 4.00 2.00 1.50 10.00 0.3\n", False, "calib/000007.txt: file not found"),
])
def test_bad_labels_are_input_errors_naming_the_file(tmp_path, labels, calib, message):
    root = _write_kitti(tmp_path / "training", labels, np.zeros((3, 4)), calib=calib)
    with pytest.raises(InputError, match=message) as err:
        open_data(f"kitti:{root}").read("000007")
    assert "000007.txt" in str(err.value)


def test_missing_label_file_and_truncated_points_are_input_errors(tmp_path):
    root = _write_kitti(tmp_path / "training", "", np.zeros((3, 4)))
    (root / "label_2" / "000007.txt").unlink()
    with pytest.raises(InputError, match="label_2/000007.txt: file not found"):
        open_data(f"kitti:{root}").read("000007")
    truncated = root / "velodyne" / "000007.bin"
    truncated.write_bytes(np.ones(250, np.float32).tobytes() + b"\x00\x00")  # 62.5 points
    with pytest.raises(InputError, match=r"000007\.bin.*truncated"):
        open_data(f"kitti:{root}").read("000007")


def test_a_folder_without_velodyne_is_an_input_error(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(InputError, match="no 'velodyne' folder.*try"):
        open_data(f"kitti:{tmp_path}")


def test_labelled_frames_carry_the_front_camera_view_and_eval_scores_only_it(kitti, tmp_path):
    """KITTI labels only what the front camera sees: each labelled frame carries that view
    (P2 of its calib, in the project frame); its labelled objects are in it, points behind
    the car are not; it survives conversion; eval scores only detections the camera sees
    unless --whole-scene."""
    import haltdet
    from haltdet.data.formats import open_data as open_spec
    from haltdet.data.frames import read_frame, write_frame
    from haltdet.predict import predict_dataset

    for frame_id in kitti.frame_ids():
        frame = kitti.read(frame_id)
        assert frame.camera is not None and frame.camera.sees(frame.boxes).all()
        assert 0.05 < frame.camera.sees(frame.points).mean() < 0.4  # about the front quarter
        assert not frame.camera.sees(np.array([[-10.0, 0.0, -1.0], [10.0, 10.0, -1.0]])).any()
        assert frame.camera.sees(np.array([[10.0, 0.0, -1.0]])).all()
        back = read_frame(write_frame(tmp_path / "converted", frame))
        np.testing.assert_array_equal(back.camera.projection, frame.camera.projection)
        assert (back.camera.width, back.camera.height) == (frame.camera.width, frame.camera.height)
    model = haltdet.load("baseline")
    spec = f"kitti:{KITTI}"
    front, _, _ = predict_dataset(model, spec, progress=False)
    everywhere, truth, _ = predict_dataset(model, spec, progress=False, camera_view=False)
    for seen, full, frame_id in zip(front, everywhere, kitti.frame_ids()):
        camera = kitti.read(frame_id).camera
        assert camera.sees(seen.boxes).all() and len(seen.boxes) == camera.sees(full.boxes).sum() < len(full.boxes)
    assert sum(len(t.boxes) for t in truth) == 4 and open_spec(spec).read("000001").num_objects == 3


def test_kitti_label_export_reads_back_as_the_same_boxes(kitti, tmp_path):
    """Labels written by `label_lines` (and `detect --kitti-labels`) are the KITTI labels of
    the boxes: read back by this reader they give the same boxes; without calib, the
    camera axes at the LiDAR."""
    from haltdet.cli import main
    from haltdet.boxes import wrap_angle
    from haltdet.data.formats import to_project_frame
    from haltdet.data.formats.kitti import (GROUND_BELOW_ORIGIN, camera_to_lidar_boxes, label_lines, read_calib,
                                            read_labels)

    for frame_id in kitti.frame_ids():
        frame = kitti.read(frame_id)
        calib = KITTI / "calib" / f"{frame_id}.txt"
        path = tmp_path / f"{frame_id}.txt"
        path.write_text("\n".join(label_lines(frame.boxes, frame.labels, np.full(len(frame.boxes), 0.5), calib)))
        types, values = read_labels(path)
        assert types == [{"Vehicle": "Car"}.get(CLASSES[i], CLASSES[i]) for i in frame.labels]
        original_types, original = read_labels(KITTI / "label_2" / f"{frame_id}.txt")
        kept = [t != "DontCare" for t in original_types]
        np.testing.assert_allclose(values[:, 7:], original[kept][:, 7:], atol=0.011)  # sizes, place, rotation_y
        np.testing.assert_allclose(values[:, 3:7], original[kept][:, 3:7], atol=15)  # 2D boxes, pixels
        _, back = to_project_frame(np.zeros((0, 4)), camera_to_lidar_boxes(values, read_calib(calib)),
                                   GROUND_BELOW_ORIGIN)
        np.testing.assert_allclose(back[:, :6], frame.boxes[:, :6], atol=0.02)
        assert np.abs(wrap_angle(back[:, 6] - frame.boxes[:, 6])).max() < 0.02
    ideal = label_lines(np.array([[10.0, 2.0, -1.0, 4.0, 2.0, 1.5, 0.0]]), np.array([0]), np.array([0.9]))
    # camera x = -y, y = -(z + 0.17) + h / 2 (bottom), z = x; rotation_y = -yaw - pi / 2
    assert ideal == ["Car 0.00 0 -1.37 0.00 0.00 0.00 0.00 1.50 2.00 4.00 -2.00 1.58 10.00 -1.57 0.9000"]
    out = tmp_path / "labels"
    assert main(["detect", "--data", f"kitti:{KITTI}", "--checkpoint", "baseline", "--min-score", "0.3",
                 "--kitti-labels", str(out), "--json", str(tmp_path / "det.json")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.txt", "000001.txt"]
    assert all(len(line.split()) == 16 for line in (out / "000001.txt").read_text().splitlines())


def test_calib_without_p2_is_an_input_error_naming_it(tmp_path):
    root = _write_kitti(tmp_path / "training", "Car 0.00 0 0.0 0 0 10 10 1.5 1.6 4.0 2.0 1.5 10.0 0.3\n",
                        np.zeros((3, 4)))
    calib = root / "calib" / "000007.txt"
    calib.write_text("\n".join(line for line in calib.read_text().splitlines() if not line.startswith("P2")))
    with pytest.raises(InputError, match=r"000007\.txt: needs 'P2:' with 12 numbers"):
        open_data(f"kitti:{root}").read("000007")
