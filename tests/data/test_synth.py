"""Tests of the synthetic LiDAR simulator (small sensors keep them fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from haltdet import CLASSES, ConfigError, InputError
from haltdet.boxes import count_points_in_boxes, points_in_boxes
from haltdet.data import synth
from haltdet.data.frames import FrameDataset, read_dataset_index, read_frame
from haltdet.data.synth import SceneConfig, SensorConfig, frame_seed, generate_dataset, simulate_frame

SMALL = SensorConfig(azimuth_steps=256)


def _bev_overlap(a, b) -> bool:
    """Separating-axis test of two BEV rectangles (x, y, l, w, yaw) - strict overlap."""
    axes = []
    for r in (a, b):
        c, s = math.cos(r[4]), math.sin(r[4])
        axes += [(c, s), (-s, c)]
    for ux, uy in axes:
        def proj(r):
            c, s = math.cos(r[4]), math.sin(r[4])
            return r[2] / 2 * abs(c * ux + s * uy) + r[3] / 2 * abs(-s * ux + c * uy)
        if abs((b[0] - a[0]) * ux + (b[1] - a[1]) * uy) >= proj(a) + proj(b):
            return False
    return True


def test_determinism_same_seed_bit_identical():
    a = simulate_frame(7, SMALL)
    b = simulate_frame(7, SMALL)
    for name in ("points", "boxes", "labels", "num_points", "difficulty"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name


def test_different_seeds_differ():
    a = simulate_frame(1, SMALL)
    b = simulate_frame(2, SMALL)
    assert a.points.shape != b.points.shape or not np.array_equal(a.points, b.points)
    assert a.boxes.shape != b.boxes.shape or not np.array_equal(a.boxes, b.boxes)


def test_frame_arrays_dtypes_ranges_and_labels():
    sensor = SensorConfig(azimuth_steps=512)
    f = simulate_frame(3, sensor)
    assert f.points.dtype == np.float32 and f.points.ndim == 2 and f.points.shape[1] == 4
    assert f.boxes.dtype == np.float32 and f.boxes.shape[1] == 7
    for arr in (f.labels, f.num_points, f.difficulty):
        assert arr.dtype == np.int64 and arr.shape == (f.boxes.shape[0],)
    rng = np.linalg.norm(f.points[:, :3].astype(np.float64), axis=1)
    assert rng.max() <= sensor.max_range + 1e-3
    assert rng.min() >= sensor.min_range - 1e-3
    assert f.points[:, 3].min() >= 0.0 and f.points[:, 3].max() <= 1.0
    assert np.isfinite(f.points).all()
    # object centres inside the detector region, labels valid, positive sizes
    assert np.abs(f.boxes[:, :2]).max() <= 60.0 + 1e-4
    assert f.labels.min() >= 0 and f.labels.max() < len(CLASSES)
    assert (f.boxes[:, 3:6] > 0).all()
    assert np.all(np.abs(f.boxes[:, 6]) <= math.pi + 1e-6)


def test_num_points_recount_from_disk_and_difficulty(tmp_path):
    out = generate_dataset(tmp_path / "ds", frames=2, seed=5, sensor=SMALL, progress=False)
    index = read_dataset_index(out)
    assert index["frames"] == ["000000", "000001"] and index["source"] == "synth" and index["seed"] == 5
    ds = FrameDataset(out)
    assert len(ds) == 2
    for i, frame in enumerate(ds):
        recount = count_points_in_boxes(frame.points, frame.boxes)
        np.testing.assert_array_equal(recount, frame.num_points)
        expected = np.where(frame.num_points == 0, 0, np.where(frame.num_points <= 5, 2, 1))
        np.testing.assert_array_equal(frame.difficulty, expected)
        # the dataset frame is the frame simulate_frame gives for the derived seed
        direct = simulate_frame(frame_seed(5, i), SMALL)
        np.testing.assert_array_equal(direct.points, frame.points)
        np.testing.assert_array_equal(direct.boxes, frame.boxes)


def test_default_frame_mostly_background():
    f = simulate_frame(11)
    inside_any = points_in_boxes(f.points, f.boxes).any(axis=0)
    assert inside_any.mean() < 0.3
    assert f.points.shape[0] > 20000


def test_sparsity_and_classes_across_frames():
    frames = [simulate_frame(s, SensorConfig(azimuth_steps=512)) for s in range(4)]
    labels = np.concatenate([f.labels for f in frames])
    num = np.concatenate([f.num_points for f in frames])
    diff = np.concatenate([f.difficulty for f in frames])
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    assert (num == 0).any(), "some objects must be fully occluded / out of sight"
    assert (diff == 2).any(), "some objects must be LEVEL_2 (1..5 points)"
    assert (diff == 1).any()
    # default counts
    for f in frames:
        counts = np.bincount(f.labels, minlength=3)
        assert 10 <= counts[0] <= 35 and 4 <= counts[1] <= 20 and 2 <= counts[2] <= 10


def test_boxes_do_not_overlap_in_bev_and_stand_on_ground():
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        world = synth._World(rng, SMALL, SceneConfig())  # the world simulate_frame builds first
        f = simulate_frame(seed, SMALL)
        boxes = f.boxes.astype(np.float64)
        assert len(world.objects) == len(boxes)
        rects = [(b[0], b[1], b[3], b[4], b[6]) for b in boxes]
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                assert not _bev_overlap(rects[i], rects[j]), (seed, i, j)
        bottom = boxes[:, 2] - boxes[:, 5] / 2
        ground = world.ground.surface(boxes[:, 0], boxes[:, 1])
        np.testing.assert_allclose(bottom, ground, atol=1e-3)
        # and near the sensor's ground level (gentle slopes only)
        assert np.all(np.abs(bottom + SMALL.mount_height) < 2.5)


def test_flat_scene_objects_on_flat_ground():
    scene = SceneConfig(ground_slope_max=0.0, ground_undulation=0.0, curb_height=0.0)
    f = simulate_frame(4, SMALL, scene)
    bottom = f.boxes[:, 2] - f.boxes[:, 5] / 2
    np.testing.assert_allclose(bottom, -SMALL.mount_height, atol=1e-4)


def test_flat_ground_geometry_matches_beam_elevations():
    sensor = SensorConfig(azimuth_steps=64, range_noise_std=0.0, dropout=0.0)
    f = simulate_frame(0, sensor, SceneConfig.flat_ground())
    assert f.boxes.shape == (0, 7)
    p = f.points.astype(np.float64)
    np.testing.assert_allclose(p[:, 2], -sensor.mount_height, atol=1e-4)
    dist = np.hypot(p[:, 0], p[:, 1])
    expected = []
    for e in sensor.beam_elevations_deg:
        if e < 0:
            d = sensor.mount_height / math.tan(math.radians(-e))
            r = math.hypot(d, sensor.mount_height)
            if sensor.min_range <= r <= sensor.max_range:
                expected.append(d)
    expected = np.array(sorted(expected))
    # every point lies on the ring of one beam (to ~1 cm) ...
    nearest = np.abs(dist[:, None] - expected[None, :]).min(axis=1)
    assert nearest.max() < 0.01
    # ... and every ring is complete: 64 azimuth steps per downward beam within range
    assert len(p) == 64 * len(expected)


def test_presets():
    for name, beams, mount, max_range in (("hdl64", 64, 1.73, 120.0), ("waymo_top", 64, 2.1, 75.0),
                                           ("nuscenes32", 32, 1.84, 70.0), ("default", 64, 1.9, 75.0)):
        s = SensorConfig.preset(name)
        assert len(s.beam_elevations_deg) == beams
        assert s.mount_height == pytest.approx(mount) and s.max_range == pytest.approx(max_range)
        assert s.azimuth_steps >= 1024
    hdl = SensorConfig.preset("hdl64")
    assert max(hdl.beam_elevations_deg) == pytest.approx(2.0) and min(hdl.beam_elevations_deg) == pytest.approx(-24.8)
    nus = SensorConfig.preset("nuscenes32")
    assert max(nus.beam_elevations_deg) == pytest.approx(10.0) and min(nus.beam_elevations_deg) == pytest.approx(-30.0)
    d = SensorConfig()
    e = np.sort(np.array(d.beam_elevations_deg))
    assert e[0] == pytest.approx(-25.0) and e[-1] == pytest.approx(3.0)
    gaps = np.diff(e)
    near_horizon = gaps[np.abs(e[:-1] + 2) < 3].mean()
    assert near_horizon < gaps[:5].mean()  # denser near the horizon than at the bottom
    with pytest.raises(InputError, match="hdl64"):
        SensorConfig.preset("velodyne9000")
    small = SensorConfig.preset("hdl64", azimuth_steps=128)
    assert small.azimuth_steps == 128 and small.max_range == 120.0


def test_config_validation_and_dict_round_trip():
    with pytest.raises(ConfigError):
        SceneConfig(region=70.0)
    with pytest.raises(ConfigError):
        SceneConfig(vehicles=(5, 2))
    with pytest.raises(ConfigError):
        SensorConfig(dropout=1.5)
    s = SensorConfig.preset("waymo_top")
    assert SensorConfig.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    sc = SceneConfig(vehicles=(3, 4))
    assert SceneConfig.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
    with pytest.raises(ConfigError):
        SceneConfig.from_dict({"nope": 1})


def test_generate_dataset_refuses_foreign_directory(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not a haltdet dataset"):
        generate_dataset(foreign, frames=1, seed=0, sensor=SensorConfig(azimuth_steps=32), progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_generate_dataset_overwrites_existing_dataset(tmp_path):
    tiny = SensorConfig(azimuth_steps=32)
    out = generate_dataset(tmp_path / "ds", frames=3, seed=0, sensor=tiny, progress=False)
    out = generate_dataset(out, frames=1, seed=1, sensor=tiny, progress=False)
    index = read_dataset_index(out)
    assert index["frames"] == ["000000"] and index["seed"] == 1 and index["complete"] is True
    assert index["simulator_version"] == synth.SIMULATOR_VERSION
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["000000.npz"]
    assert SensorConfig.from_dict(index["sensor"]) == tiny
    read_frame(out / "frames" / "000000.npz")


@pytest.mark.slow
def test_generate_dataset_workers_match_serial(tmp_path):
    tiny = SensorConfig(azimuth_steps=64)
    a = generate_dataset(tmp_path / "a", frames=2, seed=3, sensor=tiny, progress=False)
    b = generate_dataset(tmp_path / "b", frames=2, seed=3, sensor=tiny, workers=2, progress=False)
    for fa, fb in zip(FrameDataset(a), FrameDataset(b)):
        np.testing.assert_array_equal(fa.points, fb.points)
        np.testing.assert_array_equal(fa.boxes, fb.boxes)


def test_culling_loses_no_hits(monkeypatch):
    """The azimuth/elevation culling gives exactly the points of a brute-force cast."""
    sensor = SensorConfig(azimuth_steps=96)
    culled = simulate_frame(21, sensor)

    def no_cull(cx, cy, rad, zlo, zhi, elev, n_az, phase, max_range):
        n = len(cx)
        return (np.zeros(n, np.int64), np.full(n, len(elev)), np.zeros(n, np.int64), np.full(n, n_az))

    monkeypatch.setattr(synth, "_cull", no_cull)
    brute = simulate_frame(21, sensor)
    np.testing.assert_array_equal(culled.points, brute.points)
    np.testing.assert_array_equal(culled.num_points, brute.num_points)


def test_pedestrians_show_which_way_they_face():
    """Real people are not front/back symmetric, and a detector is scored on their heading
    (APH): shoes reach forward of the legs and the head sits ahead of the torso, in the
    object frame (x = heading)."""
    rng = np.random.default_rng(0)
    toe_reach, head_ahead = [], []
    for _ in range(200):
        parts, _, _, _ = synth._centre_parts(synth._pedestrian_parts(rng, 0.1))
        ext = np.array([synth._part_extent(p) for p in parts])  # x0, x1, y0, y1, z0, z1
        legs = [p for p in parts if p[0] == "cyl"]
        low = ext[:, 5] <= 0.1  # the shoes
        leg_x = np.mean([p[1] for p in legs])
        toe_reach.append((ext[low, 1].max() - leg_x) - (leg_x - ext[low, 0].min()))
        ellipsoids = [p for p in parts if p[0] == "ell"]
        head = max(ellipsoids, key=lambda p: p[3])  # the highest centre
        torso = max(ellipsoids, key=lambda p: p[6])  # the tallest
        head_ahead.append(head[1] - torso[1])
    assert len(legs) == 2 and low.sum() == 2
    assert min(toe_reach) > 0.08  # toes well ahead of the legs, heels just behind them
    assert min(head_ahead) > 0.03
