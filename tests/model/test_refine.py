"""The second stage: point gathering, targets, identity start, learning, refine-only training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from haltdet import ConfigError
from haltdet.boxes import iou_3d_paired, points_in_boxes, wrap_angle
from haltdet.checkpoint import load_checkpoint
from haltdet.config import ModelConfig, load_config
from haltdet.model.detector import Detector
from haltdet.model.head import Detections
from haltdet.model.pillars import PillarFeatureNet, PointBatch, PointIndex
from haltdet.model.refine import (RESIDUAL_DIM, BoxRefiner, apply_residual, gather_box_points, jitter_boxes,
                                  refine_detections, refinement_loss, refinement_targets, training_proposals)
from haltdet.train import train

BOXES = torch.tensor([[1.0, 2.0, -1.0, 4.0, 2.0, 1.5, 0.5],
                      [-6.0, 3.0, -1.2, 0.8, 0.6, 1.8, -2.0],
                      [8.0, -5.0, -1.0, 1.8, 0.6, 1.7, 3.0]])


def _cloud(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([24.0, 24.0, 3.0]) + torch.tensor([0, 0, -1.0])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], dim=1)


def _surface_points(box: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Points on the four sides and the top of a box (what a LiDAR sees of an object)."""
    local = (torch.rand(n, 3, generator=g) - 0.5) * box[3:6]
    face = torch.randint(0, 3, (n,), generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    for axis in range(3):
        pick = face == axis
        local[pick, axis] = sign[pick] * box[3 + axis] / 2
    local[:, 2] = torch.where(face == 2, box[5] / 2, local[:, 2])  # top, not bottom
    cos, sin = math.cos(box[6]), math.sin(box[6])
    xyz = torch.stack([box[0] + local[:, 0] * cos - local[:, 1] * sin,
                       box[1] + local[:, 0] * sin + local[:, 1] * cos, box[2] + local[:, 2]], 1)
    return torch.cat([xyz, torch.full((n, 1), 0.5)], dim=1)


def test_gathered_points_are_those_in_the_enlarged_box_capped_evenly():
    points = _cloud(20000, 0)
    frame = torch.zeros(len(points), dtype=torch.long)
    box_frame = torch.zeros(len(BOXES), dtype=torch.long)
    inside = points_in_boxes(points, BOXES, margin=0.5)  # independent test: boxes.py
    uncapped = gather_box_points(points, frame, BOXES, box_frame, 0.5, 0)
    assert uncapped.counts.tolist() == inside.sum(1).tolist()
    assert torch.equal(torch.bincount(uncapped.box, minlength=3), uncapped.counts)
    for k in range(3):  # each box's points, in input order, in its frame
        local = uncapped.features[uncapped.box == k, :3]
        expected = points[inside[k]]
        dx, dy = expected[:, 0] - BOXES[k, 0], expected[:, 1] - BOXES[k, 1]
        c, s = math.cos(BOXES[k, 6]), math.sin(BOXES[k, 6])
        assert torch.allclose(local[:, 0], dx * c + dy * s, atol=1e-5)
        assert torch.allclose(local[:, 1], -dx * s + dy * c, atol=1e-5)
    capped = gather_box_points(points, frame, BOXES, box_frame, 0.5, 16)
    assert capped.counts.tolist() == uncapped.counts.tolist()  # the count feature is before the cap
    per_box = torch.bincount(capped.box, minlength=3)
    assert per_box.tolist() == uncapped.counts.clamp(max=16).tolist()
    again = gather_box_points(points, frame, BOXES, box_frame, 0.5, 16)
    assert torch.equal(capped.features, again.features) and torch.equal(capped.box, again.box)
    # points of another frame are never gathered
    other = gather_box_points(points, torch.ones_like(frame), BOXES, box_frame, 0.5, 0)
    assert other.features.shape[0] == 0 and other.counts.sum() == 0


def test_gathering_finds_every_point_of_every_box_over_frames_and_odd_points():
    """The strip index against the independent point-in-box test: two frames, boxes across
    strip edges and overlapping each other, NaN rows and points far outside every box."""
    g = torch.Generator().manual_seed(3)
    points = torch.cat([_cloud(6000, 1), _cloud(6000, 2)])
    points[::97, 1] = float("nan")
    points[5::89, :2] = torch.tensor([1e4, -1e4])
    frame = torch.arange(len(points)) // 6000
    boxes = torch.cat([torch.rand(40, 2, generator=g) * 20 - 10, torch.rand(40, 1, generator=g) - 1.5,
                       torch.rand(40, 3, generator=g) * 4 + 0.2, torch.rand(40, 1, generator=g) * 6 - 3], 1)
    box_frame = torch.arange(40) % 2
    gathered = gather_box_points(points, frame, boxes, box_frame, 0.3, 0)
    for k in range(40):
        own = points[frame == box_frame[k]]
        inside = points_in_boxes(own, boxes[k:k + 1], margin=0.3)[0]
        assert gathered.counts[k] == inside.sum() > 0
        assert torch.allclose(gathered.features[gathered.box == k, 2], own[inside, 2] - boxes[k, 2])


def test_one_point_index_serves_every_set_of_boxes():
    """A `PointIndex` made once (as the refinement passes share it) gathers, for a second
    and a third set of boxes, the same points as gathering afresh and as the independent
    point-in-box test, including boxes that reach past the frame's points on every side
    and boxes far outside them."""
    g = torch.Generator().manual_seed(4)
    points = _cloud(8000, 5)
    frame = torch.zeros(len(points), dtype=torch.long)
    index = PointIndex.of_points(points, frame)
    lo, hi = points[:, :2].amin(0), points[:, :2].amax(0)
    for spread in (1.0, 1.6, 4.0):  # boxes around the points' extent, then mostly far outside
        centre = (lo + hi) / 2 + (torch.rand(30, 2, generator=g) - 0.5) * (hi - lo) * spread
        boxes = torch.cat([centre, torch.rand(30, 1, generator=g) - 1.5,
                           torch.rand(30, 3, generator=g) * 5 + 0.3, torch.rand(30, 1, generator=g) * 6 - 3], 1)
        box_frame = torch.zeros(30, dtype=torch.long)
        shared = gather_box_points(points, frame, boxes, box_frame, 0.4, 0, index)
        fresh = gather_box_points(points, frame, boxes, box_frame, 0.4, 0)
        assert torch.equal(shared.features, fresh.features) and torch.equal(shared.box, fresh.box)
        inside = points_in_boxes(points, boxes, margin=0.4)
        assert shared.counts.tolist() == inside.sum(1).tolist()


@pytest.mark.parametrize("caps", [(0, 0, 0), (3000, 0, 0), (0, 8000, 0), (0, 0, 2)])
def test_the_pillar_nets_point_index_finds_what_a_fresh_one_finds(caps):
    """The index the pillar net makes from its own sort of the points (on `Tokens`), with
    each input cap binding in turn (max_pillars, max_points, max_points_per_pillar),
    gathers the same points around boxes as an index made afresh from the points it kept,
    over two frames."""
    g = torch.Generator().manual_seed(6)
    net = PillarFeatureNet([-12.8, -12.8, -4.0, 12.8, 12.8, 3.0], 0.32, [8, 16], *caps).eval()
    clouds = [_cloud(12000, 7), _cloud(10000, 8)]
    with torch.no_grad():
        tokens = net(PointBatch.from_list(clouds))
    kept = tokens.points
    assert tokens.pillars_capped + tokens.points_capped > 0 or caps == (0, 0, 0)
    boxes = torch.cat([torch.rand(24, 2, generator=g) * 24 - 12, torch.rand(24, 1, generator=g) - 1.5,
                       torch.rand(24, 3, generator=g) * 4 + 0.3, torch.rand(24, 1, generator=g) * 6 - 3], 1)
    box_frame = torch.arange(24) % 2
    from_net = gather_box_points(kept.points, kept.batch_index, boxes, box_frame, 0.4, 0, tokens.point_index)
    fresh = gather_box_points(kept.points, kept.batch_index, boxes, box_frame, 0.4, 0)
    assert torch.equal(from_net.features, fresh.features) and torch.equal(from_net.box, fresh.box)
    assert from_net.counts.sum() > 100


def test_applying_the_targets_gives_the_ground_truth_boxes():
    torch.manual_seed(1)
    gt = BOXES.repeat(30, 1)
    labels = torch.tensor([0, 1, 2]).repeat(30)
    proposals = jitter_boxes(gt, flip_probability=0.5)
    frame = torch.zeros(len(gt), dtype=torch.long)
    # one frame holding each box once: proposals match the box they came from
    targets = refinement_targets(proposals, frame, labels, [BOXES], [torch.tensor([0, 1, 2])], 0.1)
    assert targets.matched.all()
    assert targets.residual[:, 6].abs().max() <= math.pi / 2
    output = torch.cat([targets.residual, (2 * targets.flip.float() - 1)[:, None], torch.zeros(len(gt), 1)], 1)
    refined = apply_residual(proposals, output)
    assert torch.allclose(refined[:, :6], gt[:, :6], atol=1e-4)
    assert wrap_angle(refined[:, 6] - gt[:, 6]).abs().max() < 1e-4
    flipped = wrap_angle(proposals[:, 6] - gt[:, 6]).abs() > math.pi / 2
    assert torch.equal(targets.flip, flipped)


def test_matching_needs_the_same_class_and_overlap():
    proposals = torch.stack([BOXES[0], BOXES[0] + torch.tensor([20.0, 0, 0, 0, 0, 0, 0])])
    frame = torch.zeros(2, dtype=torch.long)
    same = refinement_targets(proposals, frame, torch.tensor([0, 0]), [BOXES[:1]], [torch.tensor([0])], 0.3)
    assert same.matched.tolist() == [True, False]
    assert torch.equal(same.residual[1], torch.zeros(RESIDUAL_DIM))
    other = refinement_targets(proposals, frame, torch.tensor([1, 1]), [BOXES[:1]], [torch.tensor([0])], 0.3)
    assert other.matched.tolist() == [False, False]


def test_training_proposals_draw_each_frames_jitter_from_its_own_seed():
    """A frame's jittered boxes depend on its seed only, not on the frames beside it in the
    batch (what makes a DDP process draw what one process would for the same frame)."""
    gt = [torch.tensor([[5.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.3]]), torch.tensor([[0.0, 8.0, -1.0, 0.8, 0.6, 1.7, 2.0]])]
    labels = [torch.tensor([0]), torch.tensor([1])]
    none = Detections(torch.zeros(0, 7), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    pair, frame, _ = training_proposals([none, none], gt, labels, 64, 4, seeds=[11, 22])
    alone, _, _ = training_proposals([none], gt[1:], labels[1:], 64, 4, seeds=[22])
    assert torch.equal(pair[frame == 1], alone) and not torch.equal(alone, gt[1].repeat(4, 1))
    other, _, _ = training_proposals([none], gt[1:], labels[1:], 64, 4, seeds=[23])
    assert not torch.equal(other, alone)
    with pytest.raises(ValueError, match="seeds"):
        training_proposals([none], gt[1:], labels[1:], 64, 4, seeds=[1, 2])


def test_untrained_refiner_changes_nothing_and_gives_iou_one_half():
    refiner = BoxRefiner([16, 32], 0.5, 32)
    points = _cloud(5000, 2)
    output = refiner(points, torch.zeros(5000, dtype=torch.long), BOXES, torch.zeros(3, dtype=torch.long),
                     torch.tensor([0, 1, 2]))
    assert torch.equal(apply_residual(BOXES, output), torch.cat([BOXES[:, :6], wrap_angle(BOXES[:, 6:])], 1))
    assert torch.sigmoid(output[:, RESIDUAL_DIM + 1]).eq(0.5).all()
    none = refiner(points, torch.zeros(5000, dtype=torch.long), BOXES[:0], torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.long))
    assert none.shape == (0, RESIDUAL_DIM + 2)


def test_point_features_keep_the_points_distance_and_old_checkpoints_load():
    torch.manual_seed(0)
    refiner = BoxRefiner([16, 32], 0.5, 32)
    features = torch.randn(50, 7)
    # A point twice as far from the box centre, with twice the intensity, is another point:
    # without the first layer's bias, LayerNorm would give both the same features.
    assert not torch.allclose(refiner.point_net(features), refiner.point_net(2 * features), atol=1e-3)
    old = {k: v for k, v in refiner.state_dict().items() if k != "point_net.0.bias"}  # the earlier layout
    loaded = BoxRefiner([16, 32], 0.5, 32)
    loaded.load_state_dict(old)  # strict: the missing bias is filled in
    assert torch.equal(loaded.point_net[0].bias, torch.zeros(16))
    assert torch.allclose(loaded.point_net(features), loaded.point_net(2 * features), atol=1e-4)


def test_mirror_averaging_is_the_mean_over_a_cloud_and_its_mirror_image():
    torch.manual_seed(0)
    refiner = BoxRefiner([16, 32], 0.5, 0).eval()  # no per-box cap: both clouds keep every point
    torch.nn.init.normal_(refiner.out.weight, std=0.3)  # a refiner with an opinion
    box = torch.tensor([[0.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]])  # heading along +x: mirror is y -> -y
    g = torch.Generator().manual_seed(4)
    points = torch.cat([_surface_points(box[0], 300, g), _cloud(2000, 5)])
    points[:, 1] += 0.013  # no point on the box's centre line (a cell boundary of the grid)
    mirrored = points * torch.tensor([1.0, -1.0, 1.0, 1.0])
    index, frame, label = torch.zeros(len(points), dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1)
    with torch.no_grad():
        plain, image = (refiner(p, index, box, frame, label.long()) for p in (points, mirrored))
        both = refiner(points, index, box, frame, label.long(), mirror=True)
        both_image = refiner(mirrored, index, box, frame, label.long(), mirror=True)
    back = torch.ones(RESIDUAL_DIM + 2)
    back[[1, 6]] = -1.0  # the mirror image's across offset and heading change, mirrored back
    assert not torch.allclose(plain, image * back, atol=1e-3)  # the plain refiner is not symmetric ...
    assert torch.allclose(both, (plain + image * back) / 2, atol=1e-5)  # ... mirror averages the two
    assert torch.allclose(both_image, both * back, atol=1e-5)  # and is symmetric by construction


@pytest.mark.slow
def test_refiner_learns_to_tighten_boxes():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gt = torch.tensor([[0.0, 0.0, -1.0, 4.5, 1.9, 1.5, 0.0]])
    refiner = BoxRefiner([32, 64], 0.5, 64)
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=3e-3)
    labels = torch.zeros(16, dtype=torch.long)

    def sample():
        yaw = float(torch.rand(1, generator=g)) * 6.28 - 3.14
        box = gt.clone()
        box[0, 6] = yaw
        points = _surface_points(box[0], 300, g)
        return points, box, jitter_boxes(box.repeat(16, 1), flip_probability=0.0, generator=g)

    def mean_iou(proposals, box, output=None):
        refined = proposals if output is None else apply_residual(proposals, output)
        return float(iou_3d_paired(refined, box.repeat(len(proposals), 1)).mean())

    frame = torch.zeros(16, dtype=torch.long)
    for _ in range(300):
        points, box, proposals = sample()
        output = refiner(points, torch.zeros(len(points), dtype=torch.long), proposals, frame, labels)
        targets = refinement_targets(proposals, frame, labels, [box], [torch.tensor([0])], 0.1)
        losses = refinement_loss(output, proposals, targets)
        optimizer.zero_grad()
        (losses["refine_box"] + losses["refine_iou"]).backward()
        optimizer.step()
    before, after = [], []
    with torch.no_grad():
        for _ in range(10):
            points, box, proposals = sample()
            output = refiner(points, torch.zeros(len(points), dtype=torch.long), proposals, frame, labels)
            before.append(mean_iou(proposals, box))
            after.append(mean_iou(proposals, box, output))
    print("mean 3D IoU before / after refinement:", np.mean(before), np.mean(after))
    assert np.mean(after) > np.mean(before) + 0.1


def test_refined_detections_are_rescored_and_deterministic():
    refiner = BoxRefiner([16, 32], 0.5, 32).eval()
    torch.nn.init.constant_(refiner.out.bias, 0.0)
    refiner.out.bias.data[RESIDUAL_DIM + 1] = math.log(0.8 / 0.2)  # IoU 0.8 everywhere
    points = _cloud(5000, 3)
    detections = [Detections(BOXES, torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0, 1, 2])),
                  Detections(BOXES[:0], torch.zeros(0), torch.zeros(0, dtype=torch.long))]
    index = torch.zeros(5000, dtype=torch.long)
    out = refine_detections(refiner, points, index, detections, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 10)
    assert len(out) == 2 and len(out[1].boxes) == 0
    expected = (torch.tensor([0.9, 0.5, 0.3]) * 0.8).sqrt()
    assert torch.allclose(out[0].scores, expected, rtol=1e-5)  # sorted, as the scores were
    kept = refine_detections(refiner, points, index, detections, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 10,
                             min_score=0.4)  # the 0.3 box is dropped before refinement
    assert torch.allclose(kept[0].scores, expected[:2], rtol=1e-5)
    again = refine_detections(refiner, points, index, detections, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 10)
    assert torch.equal(out[0].boxes, again[0].boxes)
    # a second pass starts from the first's boxes; the scores are rescored once, after the last
    refiner.out.bias.data[0] = 0.25  # every pass moves each box 0.25 m ahead
    one = refine_detections(refiner, points, index, detections, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 10)
    two = refine_detections(refiner, points, index, detections, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 10, passes=2)
    assert torch.allclose(two[0].scores, expected, rtol=1e-5)
    shift = (two[0].boxes[:, :2] - one[0].boxes[:, :2]).norm(dim=1)
    assert torch.allclose(shift, torch.full_like(shift, 0.25), atol=1e-5)


def test_detector_with_refiner_decodes_and_trains_jointly(tiny_model_config):
    torch.manual_seed(0)
    model = Detector(ModelConfig(**tiny_model_config, refine=True, refine_channels=[16, 32]))
    batch = PointBatch.from_list([_cloud(3000, 4), _cloud(3000, 5)])
    boxes = [BOXES.numpy(), BOXES[:1].numpy()]
    labels = [np.array([0, 1, 2]), np.array([0])]
    with pytest.raises(ValueError, match="ground-truth boxes and labels"):
        model.loss(model(batch), model.targets(boxes, labels))
    losses = model.loss(model(batch), model.targets(boxes, labels), None, boxes, labels)
    assert {"heatmap", "refine_box", "refine_flip", "refine_iou"} <= set(losses)
    losses["loss"].backward()
    assert model.refiner.out.weight.grad.abs().sum() > 0
    # a batch with nothing to refine: no ground truth, no first-stage box >= 0.1
    empty = [np.zeros((0, 7), dtype=np.float32)] * 2, [np.zeros(0, dtype=np.int64)] * 2
    nothing = PointBatch.from_list([torch.tensor([[500.0, 0.0, 0.0, 0.5]]), torch.zeros(0, 4)])
    losses = model.loss(model(nothing), model.targets(*empty), None, *empty)
    assert losses["refine_box"] == 0 and torch.isfinite(losses["loss"])
    assert model.pillar_net.layers[0][0].weight.grad.abs().sum() > 0
    model.eval()
    first, second = model.detect(batch), model.detect(batch)
    for a, b in zip(first, second):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_refine_only_training_changes_only_the_refiner(tiny_config, tmp_path):
    first = train(load_config(tiny_config(max_steps=1)), tmp_path / "first", progress=False)
    config = load_config(tiny_config(model={"refine": True, "refine_channels": [16, 32]}, refine_only=True,
                                     max_steps=2, lr=0.01))
    with pytest.raises(ConfigError, match="--init"):
        train(config, tmp_path / "no_init", progress=False)
    final = train(config, tmp_path / "second", progress=False, init=first)
    before, after = load_checkpoint(first)["model"], load_checkpoint(final)["model"]
    assert all(torch.equal(after[k], v) for k, v in before.items())  # BatchNorm statistics too
    refiner = [k for k in after if k.startswith("refiner.")]
    assert refiner and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in refiner
                           if k.startswith("refiner.out"))


@pytest.mark.parametrize("base, refined", [("baseline", "baseline_refine"), ("halting", "halting_refine")])
def test_refine_presets_are_their_first_stage_preset_plus_a_refiner(base, refined):
    first, second = load_config(base), load_config(refined)
    assert second.model.refine and second.train.refine_only and not first.model.refine
    def first_stage(model):
        return {k: v for k, v in dataclasses.asdict(model).items() if not k.startswith("refine")}

    assert first_stage(first.model) == first_stage(second.model)  # --init from a first-stage checkpoint fits
    assert first.data == second.data


@pytest.mark.slow
def test_refiner_learns_which_end_is_the_front():
    """An object whose rear half is lower than its front (a cab ahead of a low load): the
    refiner learns to flip proposals whose heading points the wrong way."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    refiner = BoxRefiner([32, 64], 0.5, 96)
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=3e-3)
    labels = torch.zeros(16, dtype=torch.long)
    frame = torch.zeros(16, dtype=torch.long)

    def sample():
        yaw = float(torch.rand(1, generator=g)) * 6.28 - 3.14
        box = torch.tensor([0.0, 0.0, -1.0, 4.0, 1.8, 1.6, yaw])
        local = _surface_points(torch.tensor([0.0, 0.0, 0.0, 4.0, 1.8, 1.6, 0.0]), 200, g)
        rear = local[:, 0] < 0
        local[rear, 2] = local[rear, 2].clamp(max=-0.2)  # the rear is 0.6 m lower
        c, s = math.cos(yaw), math.sin(yaw)
        points = torch.stack([local[:, 0] * c - local[:, 1] * s, local[:, 0] * s + local[:, 1] * c,
                              box[2] + local[:, 2], local[:, 3]], 1)
        return points, box[None], jitter_boxes(box[None].repeat(16, 1), 0.5, generator=g)

    for _ in range(200):
        points, box, proposals = sample()
        output = refiner(points, torch.zeros(len(points), dtype=torch.long), proposals, frame, labels)
        targets = refinement_targets(proposals, frame, labels, [box], [torch.tensor([0])], 0.1)
        optimizer.zero_grad()
        refinement_loss(output, proposals, targets)["refine_flip"].backward()
        optimizer.step()
    right = []
    with torch.no_grad():
        for _ in range(10):
            points, box, proposals = sample()
            output = refiner(points, torch.zeros(len(points), dtype=torch.long), proposals, frame, labels)
            targets = refinement_targets(proposals, frame, labels, [box], [torch.tensor([0])], 0.1)
            right.append(((output[:, RESIDUAL_DIM] > 0) == targets.flip).float().mean())
    assert float(torch.stack(right).mean()) > 0.95
