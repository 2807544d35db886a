"""The shipped checkpoints load, are deterministic and detect objects on a frame they never saw."""

import numpy as np
import pytest
import torch

from haltdet.boxes import iou_3d
from haltdet.checkpoint import BUNDLED_DIR, load_model
from haltdet.cli import DEMO_SEED, main
from haltdet.data.synth import simulate_frame
from haltdet.model.pillars import PointBatch
from haltdet.predict import detect_points


def vehicles_found(model, frame, iou: float) -> float:
    """Fraction of the well-observed vehicles of a frame detected (score >= 0.3) at 3D
    IoU >= `iou`; the detections must be deterministic."""
    first = detect_points(model, frame.points)
    second = detect_points(model, frame.points)
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.scores, second.scores)
    vehicles = frame.boxes[(frame.labels == 0) & (frame.difficulty == 1)]
    predicted = first.boxes[(first.labels == 0) & (first.scores >= 0.3)].numpy()
    assert len(vehicles) >= 5
    best = iou_3d(vehicles.astype(np.float64), predicted.astype(np.float64)).max(axis=1)
    return float((best >= iou).mean())


def assert_finds_vehicles(name: str, iou: float, fraction: float):
    """The bundled model `name` finds at least `fraction` of the well-observed vehicles of
    an unseen frame at 3D IoU >= `iou`, and its second stage finds more than its first
    stage alone."""
    assert (BUNDLED_DIR / f"{name}.pt").exists() and (BUNDLED_DIR / f"{name}.md").exists()
    model, config = load_model(name)
    frame = simulate_frame(DEMO_SEED)
    refined = vehicles_found(model, frame, iou)
    assert refined >= fraction
    refiner, model.refiner = model.refiner, None
    assert refiner is not None and vehicles_found(model, frame, iou) < refined
    model.refiner = refiner
    return model, config, frame


def test_bundled_baseline_finds_vehicles_on_an_unseen_frame():
    # At the metric's own IoU threshold: 17 of 22 on this frame (its first stage alone: 8).
    _, config, _ = assert_finds_vehicles("baseline", iou=0.7, fraction=0.65)
    assert not config.model.halting_layers and config.model.refine


@pytest.mark.parametrize("name, fraction", [
    ("halting", 0.6),  # 16 of 22 at IoU 0.7 on this frame (its first stage alone: 7; the baseline: 17)
    ("halting_large", 0.6),  # 16 of 22 (its first stage alone: 8)
])
def test_bundled_halting_models_halt_background_first(name, fraction):
    model, config, frame = assert_finds_vehicles(name, iou=0.7, fraction=fraction)
    assert config.model.halting_layers
    with torch.no_grad():
        output = model(PointBatch.from_list([torch.from_numpy(frame.points)]))
    boxes = [frame.boxes[frame.difficulty > 0]]
    (stats,) = model.token_statistics(output, boxes)
    active = stats["active_per_layer"]
    assert all(a >= b for a, b in zip(active, active[1:]))  # a halted token never resumes
    assert active[-1] < 0.5 * active[0]  # it does halt most tokens of a frame ...
    assert stats["foreground_mean_layers"] > stats["background_mean_layers"]  # ... background first


def test_bundled_halting_large_is_the_preset_on_finer_pillars():
    """`halting_large` is what `haltdet train --config halting_large_refine` makes: its
    embedded config is the preset's, field for field."""
    from haltdet.config import load_config

    _, config = load_model("halting_large")
    assert config == load_config("halting_large_refine")
    assert config.model.pillar_size == 0.24 < load_model("halting")[1].model.pillar_size


def test_demo_runs_the_halting_model_with_no_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "Vehicle" in out and (tmp_path / "haltdet_demo.png").stat().st_size > 50_000
    assert "token-layers executed" in out and (tmp_path / "haltdet_demo_halting.png").stat().st_size > 50_000


def test_dense_stage_on_the_support_gives_the_dense_detections(monkeypatch):
    """At inference the 3x3 convolutions of the bundled baseline skip the background of
    the map (head.SparseMap): on the demo frame they stay on the support and give the
    detections of the dense convolutions, to float rounding."""
    from haltdet.model import head

    model, _ = load_model("baseline")
    frame = simulate_frame(DEMO_SEED)
    kinds = []
    conv = head.SparseMap.conv3x3_relu
    monkeypatch.setattr(head.SparseMap, "conv3x3_relu",
                        lambda self, *args: kinds.append(type(r := conv(self, *args))) or r)
    on_support = detect_points(model, frame.points)
    assert kinds == [head.SparseMap] * 3
    monkeypatch.setattr(head, "SPARSE_SUPPORT_MAX", 0.0)
    dense = detect_points(model, frame.points)
    assert torch.equal(on_support.labels, dense.labels)
    torch.testing.assert_close(on_support.scores, dense.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(on_support.boxes, dense.boxes, rtol=0, atol=1e-4)
