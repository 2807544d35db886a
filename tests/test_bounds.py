"""Input bounds: caps on pillars and points, huge / empty / malformed clouds."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from haltdet import InputError
from haltdet.config import ModelConfig
from haltdet.data.frames import DroppedPointsWarning, Frame, read_frame, write_dataset_index, write_frame
from haltdet.model.detector import Detector
from haltdet.model.pillars import PillarFeatureNet, PointBatch, _water_level
from haltdet.predict import detect_points

RANGE = [-19.2, -19.2, -4.0, 19.2, 19.2, 3.0]


def _cloud(n: int, seed: int, extent: float = 30.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([extent, extent, 2.0])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], dim=1)


@pytest.mark.parametrize("seed", range(20))
def test_water_level_is_the_largest_cap_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    frames = int(rng.integers(1, 4))
    frame = torch.from_numpy(np.sort(rng.integers(0, frames, 30)))
    counts = torch.from_numpy(rng.integers(1, 40, 30))
    budget = int(rng.integers(1, 400))
    cap = _water_level(counts, frame, budget)
    for f in frame.unique():
        n = counts[frame == f]
        fits = [c for c in range(1, int(n.max()) + 1) if int(n.clamp(max=c).sum()) <= budget]
        assert torch.equal(n.clamp(max=cap[frame == f]), n.clamp(max=max(fits, default=1)))


def test_caps_bound_pillars_and_points_deterministically():
    net = PillarFeatureNet(RANGE, 0.32, [16, 32], max_pillars=500,
                           max_points=3000, max_points_per_pillar=4)
    clouds = [_cloud(20_000, 0), _cloud(2_000, 1, extent=3.0)]
    batch = PointBatch.from_list(clouds)
    tokens = net(batch)
    again = net(batch)
    assert torch.equal(tokens.coords, again.coords) and torch.equal(tokens.features, again.features)
    assert tokens.points_used + tokens.points_dropped + tokens.points_capped == 22_000
    assert tokens.points.points.shape[0] == tokens.points_used  # what the second stage reads
    assert torch.bincount(tokens.points.batch_index, minlength=2).max() <= 3000
    assert tokens.points_dropped == int(((clouds[0][:, :2].abs() >= 19.2).any(1)).sum())
    per_frame = torch.bincount(tokens.coords[:, 0])
    assert per_frame.max() <= 500 and tokens.pillars_capped > 0
    assert tokens.points_used <= 2 * 3000 and torch.isfinite(tokens.features).all()
    # The kept pillars of frame 0 are the 500 nearest the sensor.
    uncapped = PillarFeatureNet(RANGE, 0.32, [16, 32])(PointBatch.from_list(clouds[:1]))
    centres = lambda c: ((c[:, 1:].double() + 0.5) * 0.32 - 19.2).pow(2).sum(1)  # noqa: E731
    kept = centres(tokens.coords[tokens.coords[:, 0] == 0])
    assert kept.max() <= torch.sort(centres(uncapped.coords)).values[499] + 1e-6


def test_two_million_points_run_within_the_caps(tiny_model_config):
    config = ModelConfig(**tiny_model_config, max_pillars=4096, max_points=100_000, refine=True,
                         refine_channels=[16, 32])  # the refiner reads the capped points
    model = Detector(config).eval()
    cloud = _cloud(2_000_000, 2, extent=25.0)
    with torch.no_grad():
        output = model(PointBatch.from_list([cloud]))
        (detections,) = model.decode(output)
    tokens = output.tokens
    assert tokens.coords.shape[0] <= 4096 and tokens.pillars_capped > 0
    assert tokens.points_used <= 100_000 and tokens.points_capped > 1_000_000
    assert torch.isfinite(detections.boxes).all() and torch.isfinite(detections.scores).all()


@pytest.fixture
def tiny_model(tiny_model_config):
    torch.manual_seed(0)
    return Detector(ModelConfig(**tiny_model_config)).eval()


@pytest.mark.parametrize("cloud", [np.zeros((0, 4), np.float32), np.full((50, 4), 500.0, np.float32)],
                         ids=["empty", "out-of-range"])
def test_a_cloud_without_points_in_range_has_no_detections(tiny_model, cloud):
    detections = detect_points(tiny_model, cloud)
    assert detections.boxes.shape == (0, 7) and len(detections.scores) == len(detections.labels) == 0


def test_nan_rows_are_dropped_and_counted(tiny_model):
    cloud = _cloud(1000, 3).numpy()
    cloud[:5, 1] = np.nan
    cloud[5:7, 3] = -np.inf
    with pytest.warns(DroppedPointsWarning, match="dropped 7 points"):
        detect_points(tiny_model, cloud)


@pytest.mark.parametrize("points", [
    np.zeros((10, 3), np.float32), np.zeros(10, np.float32), np.zeros((10, 4, 1), np.float32),
    np.zeros((10, 4), np.complex64), np.array([["a"] * 4]), [[1, 2, 3, 4], [1, 2]], None,
], ids=["3-columns", "1-d", "3-d", "complex", "strings", "ragged", "none"])
def test_malformed_clouds_are_input_errors(tiny_model, points):
    with pytest.raises(InputError):
        detect_points(tiny_model, points)
    if isinstance(points, np.ndarray) and points.dtype.kind != "U":
        with pytest.raises(InputError):
            tiny_model.detect(PointBatch.from_list([torch.from_numpy(points)]))


def test_malformed_point_batches_are_input_errors(tiny_model):
    points = torch.zeros(3, 4)
    frames = torch.zeros(3, dtype=torch.long)
    for batch in (PointBatch(points, torch.tensor([0, 1, 2]), 2), PointBatch(points, frames[:2], 1),
                  PointBatch(points.long(), frames, 1), PointBatch(points[:, :3], frames, 1)):
        with pytest.raises(InputError):
            tiny_model.detect(batch)
    # Integer and float64 clouds are converted to float32.
    batch = PointBatch.from_list([np.zeros((4, 4), np.int32), torch.zeros(2, 4, dtype=torch.float64)])
    assert batch.points.dtype == torch.float32 and len(tiny_model.detect(batch)) == 2


def test_every_parameter_gets_a_gradient_from_an_empty_batch(tiny_model_config):
    """What DDP needs when one process's frames hold no point in range."""
    model = Detector(ModelConfig(**tiny_model_config, halting_layers=[1], halt_stage_embedding=True)).train()
    output = model(PointBatch.from_list([torch.zeros(0, 4), torch.full((3, 4), 900.0)]))
    targets = model.targets([np.zeros((0, 7), np.float32)] * 2, [np.zeros(0, np.int64)] * 2)
    model.loss(output, targets)["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_training_runs_through_empty_frames(tiny_data, tiny_config, tmp_path):
    from haltdet.cli import main

    frames = [read_frame(p) for p in sorted((tiny_data / "frames").glob("*.npz"))]
    empty = Frame("empty", np.zeros((0, 4), np.float32), frames[0].boxes, frames[0].labels,
                  np.zeros(len(frames[0].boxes), np.int64), np.zeros(len(frames[0].boxes), np.int64))
    far = Frame("far", frames[1].points + np.float32([1000, 0, 0, 0]), np.zeros((0, 7), np.float32),
                *(np.zeros(0, np.int64) for _ in range(3)))
    data = tmp_path / "data"
    for frame in (empty, far, *frames[2:]):
        write_frame(data, frame)
    write_dataset_index(data, ["empty", "far", frames[2].frame_id, frames[3].frame_id])
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroppedPointsWarning)
        assert main(["train", "--config", str(tiny_config(data=data, batch_size=2, max_steps=2)),
                     "--out", str(run), "--quiet"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(entry["loss"]) and entry["skipped_steps"] == 0 for entry in log)
