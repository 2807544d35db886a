"""One frame for every source: readers put the road where the models were trained
(GROUND_Z, measured from the points), nuScenes turned to x forward; raw clouds moved by
a given or measured sensor height."""

from pathlib import Path

import numpy as np
import pytest

from haltdet import InputError
from haltdet.boxes import count_points_in_boxes
from haltdet.data.formats import open_data, to_project_frame
from haltdet.data.frames import GROUND_Z, estimate_ground_z, shift_to_ground
from haltdet.data.synth import simulate_frame

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real"
SOURCES = [("kitti", "kitti/training", "000000"), ("kitti", "kitti/training", "000001"),
           ("nuscenes", "nuscenes", None), ("av2", "av2/7fab2350-7eaf-3b7e-a39d-6937a4c1bede", None)]


@pytest.mark.parametrize("fmt, folder, frame_id", SOURCES)
def test_real_frames_have_the_road_at_the_training_height(fmt, folder, frame_id):
    if not (REAL / folder).is_dir():
        pytest.skip(f"real-data fixture not found: {REAL / folder}")
    if fmt == "av2":
        pytest.importorskip("pyarrow", reason="the AV2 reader needs pyarrow")
    source = open_data(f"{fmt}:{REAL / folder}")
    frame = source.read(frame_id or source.frame_ids()[0])
    ground = estimate_ground_z(frame.points)
    print(f"{fmt} {frame.frame_id}: road at z = {ground:.3f} (training frame: {GROUND_Z})")
    assert abs(ground - GROUND_Z) <= 0.15


def test_the_simulator_puts_the_road_at_ground_z():
    """The training frames' road, measured as on real frames: at GROUND_Z under the sensor,
    sloped and undulating farther out, so its measured height spreads by ~0.1 m."""
    grounds = np.array([estimate_ground_z(simulate_frame(seed).points) for seed in range(6)])
    assert abs(grounds.mean() - GROUND_Z) <= 0.1 and np.abs(grounds - GROUND_Z).max() <= 0.2, grounds


def test_to_project_frame_turns_and_lifts_points_and_boxes_together():
    points = np.array([[1.0, 0.0, 0.0, 0.5], [0.0, 2.0, 1.0, 0.1]])
    boxes = np.array([[0.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    p, b = to_project_frame(points, boxes, ground_below_origin=1.7, yaw=-np.pi / 2)
    # x right / y forward -> x forward / y left; the road 1.7 m down goes to GROUND_Z.
    np.testing.assert_allclose(p, [[0, -1, GROUND_Z + 1.7, 0.5], [2, 0, 1 + GROUND_Z + 1.7, 0.1]], atol=1e-6)
    np.testing.assert_allclose(b, [[2, 0, GROUND_Z + 1.7, 4, 2, 1.5, -np.pi / 2]], atol=1e-6)
    assert p.dtype == b.dtype == np.float32
    # Containment is unchanged by the move.
    cloud = np.random.default_rng(0).uniform(-5, 5, (2000, 4))
    before = count_points_in_boxes(cloud.astype(np.float32), boxes.astype(np.float32))
    after = count_points_in_boxes(*to_project_frame(cloud, boxes, 0.4, yaw=0.7))
    assert before.tolist() == after.tolist() and before[0] > 0


def test_shift_to_ground_by_height_or_by_measurement():
    cloud = simulate_frame(0).points
    kitti_like = cloud.copy()
    kitti_like[:, 2] += 1.9 - 1.73  # a sensor 1.73 m above the road
    np.testing.assert_allclose(shift_to_ground(kitti_like, 1.73)[:, 2], cloud[:, 2], atol=1e-5)
    assert abs(estimate_ground_z(shift_to_ground(kitti_like, "auto")) - GROUND_Z) < 1e-3
    assert shift_to_ground(cloud, None) is cloud
    with pytest.raises(InputError, match="not plausible"):
        shift_to_ground(cloud, 25.0)
    with pytest.raises(InputError, match="no points 5-30 m"):
        shift_to_ground(np.zeros((10, 4), np.float32), "auto")


def test_estimate_ground_z_finds_the_road_under_clutter():
    """A road at z = -1.5 (5,000 points 5-30 m out) under 3,000 points of walls and
    trees spread over 0-4 m above it: the estimate is the road, within a centimetre."""
    rng = np.random.default_rng(0)
    radius, angle = rng.uniform(5, 30, 5000), rng.uniform(-np.pi, np.pi, 5000)
    road = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.normal(-1.5, 0.02, 5000)], 1)
    clutter = np.stack([rng.uniform(-30, 30, 3000), rng.uniform(-30, 30, 3000), rng.uniform(-1.5, 2.5, 3000)], 1)
    near = np.array([[1.0, 0.0, 5.0]] * 500)  # inside 5 m: not counted
    assert abs(estimate_ground_z(np.concatenate([road, clutter, near])) + 1.5) < 0.01
    assert np.isnan(estimate_ground_z(near))
