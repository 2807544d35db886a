"""nuScenes reader: the real LIDAR_TOP keyframe and its boxes.json, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from haltdet import CLASSES, InputError
from haltdet.boxes import count_points_in_boxes
from haltdet.data.formats import open_data, to_project_frame
from haltdet.data.formats.nuscenes import GROUND_BELOW_ORIGIN, read_boxes_json

NUSCENES = Path(__file__).parents[2].parent / "shared" / "data" / "real" / "nuscenes"
TOKEN = "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951"


@pytest.fixture
def nuscenes():
    if not NUSCENES.is_dir():
        pytest.skip(f"real-data fixture not found: {NUSCENES}")
    return open_data(f"nuscenes:{NUSCENES}")


def project_boxes(boxes: np.ndarray) -> np.ndarray:
    return to_project_frame(np.zeros((0, 4)), boxes, GROUND_BELOW_ORIGIN, yaw=-np.pi / 2)[1]


def test_recount_reproduces_num_lidar_pts_for_most_boxes(nuscenes):
    raw = read_boxes_json(NUSCENES / "boxes.json")
    points = nuscenes.read(TOKEN).points  # in the project frame: the boxes go with them
    counts = count_points_in_boxes(points, project_boxes(raw.boxes))
    exact = counts == raw.num_lidar_pts
    print(f"nuScenes: recount == num_lidar_pts for {exact.sum()}/{len(exact)} boxes ({exact.mean():.1%}); "
          f"largest difference {np.abs(counts - raw.num_lidar_pts).max()}")
    assert len(raw.labels) == 69
    assert exact.mean() >= 0.85


def test_frame_points_and_class_mapping(nuscenes):
    assert nuscenes.frame_ids() == [TOKEN]
    frame = nuscenes.read(TOKEN)
    assert frame.points.shape == (34_688, 4) and frame.points.dtype == np.float32
    assert frame.points[:, 3].min() >= 0 and frame.points[:, 3].max() == 1.0  # 255 -> 1
    raw = read_boxes_json(NUSCENES / "boxes.json")
    kept = [label not in ("barrier", "traffic_cone", "other") for label in raw.labels]
    np.testing.assert_array_equal(frame.boxes, project_boxes(raw.boxes[kept]))
    names = [CLASSES[i] for i in frame.labels]
    assert (names.count("Vehicle"), names.count("Pedestrian"), names.count("Cyclist")) == (12, 30, 1)
    np.testing.assert_array_equal(frame.num_points, count_points_in_boxes(frame.points, frame.boxes))
    # A single sweep file as the path reads the same frame.
    single = open_data(f"nuscenes:{NUSCENES / (TOKEN + '.pcd.bin')}").read(TOKEN)
    np.testing.assert_array_equal(single.boxes, frame.boxes)


def _write_sweep(folder: Path, boxes: list, n: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    points = np.zeros((n, 5), np.float32)
    points[:, 0] = np.linspace(-1, 1, n)
    points[:, 3] = 127.5
    points.tofile(folder / "sweep.pcd.bin")
    (folder / "boxes.json").write_text(json.dumps({"points_file": "sweep.pcd.bin", "boxes": boxes}))
    return folder


def test_hand_made_sweep(tmp_path):
    boxes = [{"label": "motorcycle", "center_xyz": [0, 0, 0], "size_lwh": [2, 1, 1], "yaw": 0.5},
             {"label": "traffic_cone", "center_xyz": [5, 0, 0], "size_lwh": [0.4, 0.4, 0.8], "yaw": 0}]
    frame = open_data(f"nuscenes:{_write_sweep(tmp_path / 'd', boxes)}").read("sweep")
    assert [CLASSES[i] for i in frame.labels] == ["Cyclist"]
    # Turned to x forward (-90 degrees about z), the road 1.70 m below the sensor moved to -1.9.
    np.testing.assert_allclose(frame.boxes, [[0, 0, -0.2, 2, 1, 1, 0.5 - np.pi / 2]], atol=1e-6)
    np.testing.assert_allclose(frame.points[[0, -1], :3], [[0, 1, -0.2], [0, -1, -0.2]], atol=1e-6)
    assert frame.num_points.tolist() == [10] and frame.difficulty.tolist() == [1]
    assert np.allclose(frame.points[:, 3], 0.5)


@pytest.mark.parametrize("boxes, message", [
    ([{"label": "car", "center_xyz": [0, 0, 0], "size_lwh": [2, 1, 1]}], "box 0 is malformed.*yaw"),
    ([{"label": "car", "center_xyz": [0, 0], "size_lwh": [2, 1, 1], "yaw": 0}], "box 0 is malformed"),
    ([{"label": "spaceship", "center_xyz": [0, 0, 0], "size_lwh": [2, 1, 1], "yaw": 0}], "unknown class name"),
    ([{"label": "car", "center_xyz": [0, 0, 0], "size_lwh": [2, 0, 1], "yaw": 0}], "non-positive sizes"),
])
def test_bad_boxes_json_is_an_input_error_naming_it(tmp_path, boxes, message):
    folder = _write_sweep(tmp_path / "d", boxes)
    with pytest.raises(InputError, match=message) as err:
        open_data(f"nuscenes:{folder}").read("sweep")
    assert "boxes.json" in str(err.value)


def test_truncated_sweep_and_wrong_points_file_are_input_errors(tmp_path):
    folder = _write_sweep(tmp_path / "d", [])
    (folder / "sweep.pcd.bin").write_bytes(b"\x00" * 22)
    with pytest.raises(InputError, match=r"sweep\.pcd\.bin.*truncated"):
        open_data(f"nuscenes:{folder}").read("sweep")
    (folder / "boxes.json").write_text(json.dumps({"points_file": "other.pcd.bin", "boxes": []}))
    with pytest.raises(InputError, match="boxes.json: its points_file 'other.pcd.bin'"):
        open_data(f"nuscenes:{folder}")
