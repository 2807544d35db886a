"""Token halting: the masked training pass equals the removal inference pass, gradients
reach the scores, decisions are deterministic, monotone and per frame."""

import numpy as np
import pytest
import torch

from haltdet.config import ModelConfig, TrainConfig
from haltdet.model.detector import Detector
from haltdet.model.encoder import SparseWindowEncoder, select_per_frame
from haltdet.model.pillars import PointBatch

HALTING = dict(point_cloud_range=[-19.2, -19.2, -4.0, 19.2, 19.2, 3.0], d_model=32,
               pfn_channels=[16, 32], num_heads=4, ffn_dim=64, num_layers=4, window_size=8,
               bev_channels=16, head_channels=16, bev_convs=1, halting_layers=[1, 3])


def random_cloud(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([19.0, 19.0, 2.0])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], dim=1)


def spread_scores(model: Detector) -> None:
    """Random scorer weights give scores spread over (0, 1) instead of the kept-all init."""
    for scorer in model.encoder.scorers:
        for name, p in scorer.named_parameters():
            torch.nn.init.normal_(p, std=0.0 if name.endswith("bias") else 0.4)


def make_model(seed: int, **overrides) -> Detector:
    torch.manual_seed(seed)
    model = Detector(ModelConfig(**{**HALTING, **overrides}))
    spread_scores(model)
    return model.eval()


BATCH = PointBatch.from_list([random_cloud(6000, 1), random_cloud(2500, 2)])


@pytest.mark.parametrize("recycling", [True, False])
@pytest.mark.parametrize("scorer", ["mlp", "bev"])
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_masked_training_pass_equals_removal_pass(recycling, scorer, quantile):
    model = make_model(0, recycling=recycling, halting_scorer=scorer, halt_stage_embedding=True)
    # Thresholds at quantiles of the first stage's scores, so every case halts some tokens.
    model.set_halting(thresholds=[0.0])
    with torch.no_grad():
        first_scores = model(BATCH, masked=False).encoded.scores[0]
    model.set_halting(thresholds=[float(torch.quantile(first_scores, quantile))])
    with torch.no_grad():
        masked = model(BATCH, masked=True)
        removed = model(BATCH, masked=False)
    # The case is not trivial: tokens end in at least two different ways.
    assert len(removed.encoded.halted_at.unique()) >= 2
    assert torch.equal(masked.encoded.halted_at, removed.encoded.halted_at)
    assert torch.equal(masked.encoded.gate, removed.encoded.gate)
    torch.testing.assert_close(masked.encoded.features, removed.encoded.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.heatmap, removed.heatmap, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.regression, removed.regression, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("knobs", [dict(keep_ratios=[0.6, 0.5]), dict(max_tokens=900),
                                   dict(thresholds=[0.3, 0.6], max_tokens=1500)])
def test_keep_ratio_and_cap_equal_in_both_passes(knobs):
    model = make_model(1)
    model.set_halting(**knobs)
    with torch.no_grad():
        masked = model(BATCH, masked=True).encoded
        removed = model(BATCH, masked=False).encoded
    assert torch.equal(masked.halted_at, removed.halted_at)
    torch.testing.assert_close(masked.features, removed.features, atol=1e-5, rtol=1e-5)
    tokens = model.pillar_net(BATCH)
    for frame in range(2):
        in_frame = tokens.coords[:, 0] == frame
        alive = int((removed.gate[in_frame] > 0).sum())
        if "max_tokens" in knobs:
            assert alive <= knobs["max_tokens"]
        if "keep_ratios" in knobs:
            after_first = int((removed.halted_at[in_frame] > 1).sum())
            assert after_first == int(np.ceil(0.6 * int(in_frame.sum())))
            assert alive == int(np.ceil(0.5 * after_first))


def test_halting_is_monotone_and_deterministic():
    model = make_model(2)
    with torch.no_grad():
        first = model(BATCH)
        second = model(BATCH)
    assert torch.equal(first.heatmap, second.heatmap) and torch.equal(first.regression, second.regression)
    halted_at = first.encoded.halted_at
    assert set(halted_at.unique().tolist()) <= {1, 3, 4}
    assert torch.equal(first.encoded.gate > 0, halted_at == 4)
    # A token halted at stage 1 is never scored again: its stage-2 score is 0.
    assert torch.all(first.encoded.scores[1][halted_at == 1] == 0)
    assert torch.all(first.encoded.scores[0] > 0)
    # The features of a token halted at layer 1 are its layer-1 output, frozen.
    tokens = model.pillar_net(BATCH)
    x = model.encoder.layers[0](tokens.features, model.encoder.partitions(tokens.coords)[0])
    stopped = halted_at == 1
    torch.testing.assert_close(first.encoded.features[stopped], x[stopped], atol=1e-5, rtol=1e-5)


def test_frames_are_independent_of_their_batch():
    model = make_model(3)
    model.set_halting(keep_ratios=[0.7, 0.5], max_tokens=1000)
    with torch.no_grad():
        both = model(BATCH).encoded
        alone = model(PointBatch.from_list([random_cloud(2500, 2)])).encoded
    frame1 = model.pillar_net(BATCH).coords[:, 0] == 1
    assert torch.equal(both.halted_at[frame1], alone.halted_at)


def test_select_per_frame_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.7, 0.2])
    frame = torch.tensor([0, 0, 0, 1, 1, 1])
    everyone = torch.ones(6, dtype=torch.bool)
    assert select_per_frame(scores, frame, everyone, 0.5, None, 0).tolist() == [1, 0, 1, 1, 1, 0]
    assert select_per_frame(scores, frame, everyone, 0.5, None, 1).tolist() == [1, 0, 0, 0, 1, 0]
    assert select_per_frame(scores, frame, everyone, 0.0, 0.5, 0).tolist() == [1, 0, 1, 1, 1, 0]
    # ties broken by token order; candidates only
    candidates = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    tied = torch.full((6,), 0.5)
    # frame 0: ceil(0.34 * 3) = 2 of 3 candidates; frame 1: ceil(0.34 * 2) = 1 of 2
    assert select_per_frame(tied, frame, candidates, 0.0, 0.34, 0).tolist() == [1, 1, 0, 0, 1, 0]


def training_loss(model: Detector, batch: PointBatch, boxes) -> torch.Tensor:
    targets = model.targets(boxes, [np.zeros(len(b), dtype=np.int64) for b in boxes])
    train = TrainConfig(sparsity_weight=0.1)
    return model.loss(model(batch, masked=True), targets, train, boxes)["loss"]


def score_gradient(model, batch, boxes) -> torch.Tensor:
    """Gradient of the loss with respect to the stage-1 scores, captured by a hook."""
    captured = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        captured["s"] = output

    handle = model.encoder.scorers[0].register_forward_hook(keep_output)
    model.zero_grad()
    training_loss(model, batch, boxes).backward()
    handle.remove()
    return captured["s"].grad


def test_scores_get_gradient_and_pseudo_gradient_agrees_with_relaxation():
    torch.manual_seed(4)
    model = Detector(ModelConfig(**{**HALTING, "halting_layers": [1], "num_layers": 2}))
    spread_scores(model)
    model.train()
    for module in model.modules():  # batch-norm statistics must not move between passes
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    batch = PointBatch.from_list([random_cloud(1500, 5)])
    boxes = [np.array([[2.0, 1.0, -1.0, 4.0, 2.0, 1.5, 0.3], [-6.0, 5.0, -1.0, 0.8, 0.7, 1.8, 1.0]],
                      dtype=np.float32)]
    pseudo = score_gradient(model, batch, boxes)
    assert pseudo.abs().sum() > 0
    for p in model.encoder.scorers[0].parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.encoder.relaxed_temperature = 0.05
    relaxed = score_gradient(model, batch, boxes)
    model.encoder.relaxed_temperature = None
    # Compare directions over the tokens the relaxation still sees (its sigmoid gate has a
    # usable slope only near the threshold).
    cosine = torch.nn.functional.cosine_similarity(pseudo.flatten(), relaxed.flatten(), dim=0)
    print(f"cosine(pseudo-gradient, relaxed-gate gradient) = {float(cosine):.3f}")
    assert cosine > 0


def test_sparsity_loss_weights_foreground_and_background():
    model = make_model(5)
    tokens = model.pillar_net(BATCH)
    boxes = [np.array([[0.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]], dtype=np.float32), np.zeros((0, 7), np.float32)]
    train = TrainConfig(sparsity_weight=1.0, sparsity_fg_weight=-0.5, sparsity_bg_weight=2.0, sparsity_margin=0.0)
    weights = model.token_weights(tokens, boxes, train)
    r, s = -19.2, 0.32
    cx = r + (tokens.coords[:, 2].float() + 0.5) * s
    cy = r + (tokens.coords[:, 1].float() + 0.5) * s
    inside = (tokens.coords[:, 0] == 0) & (cx.abs() <= 2.0) & (cy.abs() <= 1.0)
    assert inside.any()
    assert torch.all(weights[inside] == -0.5) and torch.all(weights[~inside] == 2.0)
    train.sparsity_uniform = True
    assert torch.all(model.token_weights(tokens, boxes, train) == 2.0)


def test_sparsity_weight_waits_then_ramps():
    """lambda is 0 before sparsity_start, rises linearly over sparsity_ramp, then holds."""
    train = TrainConfig(max_steps=1000, sparsity_weight=0.5, sparsity_start=0.3, sparsity_ramp=0.2)
    assert [train.sparsity_at(s) for s in (0, 299, 300, 400, 500, 999)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    assert TrainConfig(sparsity_weight=0.5).sparsity_at(0) == 0.5  # default: from the first step
