"""Token halting: the masked training pass equals the removal inference pass, gradients
reach the scores through attention and residual paths and per-stage gates, decisions are
deterministic, monotone and per frame."""

import math

import numpy as np
import pytest
import torch

from haltdet.config import ModelConfig, TrainConfig
from haltdet.model.detector import Detector
from haltdet.gradcheck import factor_gradients, finite_differences, gradcheck, random_case
from haltdet.model.halting import (score_supervision_loss, select_per_frame, sparsity_loss, token_weights,
                                   with_neighbours)
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
    for scorer in model.encoder.halting.scorers:
        for name, p in scorer.named_parameters():
            torch.nn.init.normal_(p, std=0.0 if name.endswith("bias") else 0.4)


def make_model(seed: int, **overrides) -> Detector:
    torch.manual_seed(seed)
    model = Detector(ModelConfig(**{**HALTING, **overrides}))
    spread_scores(model)
    return model.eval()


BATCH = PointBatch.from_list([random_cloud(6000, 1), random_cloud(2500, 2)])


@pytest.mark.parametrize("recycling", [True, False])
@pytest.mark.parametrize("scorer", ["mlp", "random"])
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("gradient", ["both", "attention", "residual"])
def test_masked_training_pass_equals_removal_pass(recycling, scorer, quantile, gradient):
    model = make_model(0, recycling=recycling, halting_scorer=scorer, halt_stage_embedding=True,
                       halting_gradient=gradient)
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


def test_removal_pass_halting_before_the_first_layer_leaves_its_input_alone():
    """The removal pass writes the halted tokens' features in place at inference; with a
    stage before the first layer the encoder's input would be that buffer: it is copied
    instead, and the pass still equals the masked one."""
    from haltdet.model.encoder import SparseWindowEncoder

    model = make_model(0)  # (a config refuses a stage before the first layer; the encoder takes it)
    encoder = SparseWindowEncoder(32, 4, 64, 4, 8, halting_layers=[0, 2]).eval()
    encoder.load_state_dict(model.encoder.state_dict())
    encoder.halting.thresholds = [0.4, 0.4]
    with torch.no_grad():
        tokens = model.pillar_net(BATCH)
        before = tokens.features.clone()
        removed = encoder(tokens.features, tokens.coords, 2, masked=False)
        assert torch.equal(tokens.features, before)
        masked = encoder(tokens.features, tokens.coords, 2, masked=True)
    assert 0 < int((removed.halted_at == 0).sum()) < len(before)
    torch.testing.assert_close(masked.features, removed.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gradient", ["both", "attention", "residual"])
def test_both_passes_equal_with_every_token_set_packed(gradient, monkeypatch):
    """Small windows packed into chunks in every partition, the masked pass's (whose
    gates then act inside chunks) as well as the survivors': the passes still agree."""
    from haltdet.model import encoder

    monkeypatch.setattr(encoder, "PACK_SPARSE", 1.0)
    model = make_model(2, halting_gradient=gradient)
    model.set_halting(thresholds=[0.5, 0.5])
    with torch.no_grad():
        masked = model(BATCH, masked=True)
        removed = model(BATCH, masked=False)
        partition = model.encoder.partitions(model.pillar_net(BATCH).coords)[0]
    assert any(bucket.segment is not None for bucket in partition.buckets)
    assert len(removed.encoded.halted_at.unique()) >= 2
    assert torch.equal(masked.encoded.halted_at, removed.encoded.halted_at)
    torch.testing.assert_close(masked.encoded.features, removed.encoded.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.heatmap, removed.heatmap, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("knobs", [dict(keep_ratios=[0.6, 0.5]), dict(max_tokens=900),
                                   dict(thresholds=[0.3, 0.6], max_tokens=1500)])
@pytest.mark.parametrize("gradient", ["both", "residual"])
def test_keep_ratio_and_cap_equal_in_both_passes(knobs, gradient):
    model = make_model(1, halting_gradient=gradient)
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


@pytest.mark.parametrize("radius", [1, 2])
def test_with_neighbours_keeps_the_candidates_near_a_kept_token(radius):
    """Against every pair's Chebyshev distance: a candidate stays if a kept token of its
    frame lies within `radius` pillars; a token that is not a candidate never joins."""
    g = torch.Generator().manual_seed(radius)
    cells = torch.randperm(2 * 30 * 30, generator=g)[:700].sort().values
    coords = torch.stack([cells // 900, (cells // 30) % 30, cells % 30], dim=1)
    candidates = torch.rand(700, generator=g) < 0.8
    keep = candidates & (torch.rand(700, generator=g) < 0.1)
    grown = with_neighbours(keep, candidates, coords, radius)
    distance = (coords[:, None, 1:] - coords[None, keep, 1:]).abs().amax(-1)
    same_frame = coords[:, None, 0] == coords[None, keep, 0]
    expected = keep | (candidates & ((distance <= radius) & same_frame).any(1))
    assert torch.equal(grown, expected)
    assert int(grown.sum()) > int(keep.sum())  # the case is not trivial
    assert torch.equal(with_neighbours(keep, candidates, coords, 0), keep)


@pytest.mark.parametrize("knobs", [dict(thresholds=[0.6, 0.6]), dict(thresholds=[0.6, 0.6], max_tokens=700)])
@pytest.mark.parametrize("gradient", ["both", "residual"])
def test_dilation_equal_in_both_passes_and_under_the_cap(knobs, gradient):
    """A stage that also keeps its kept tokens' neighbours: the masked training pass still
    equals the removal pass, it keeps more tokens than without, and the cap still holds."""
    plain = make_model(3, halting_gradient=gradient)
    model = make_model(3, halting_gradient=gradient, halting_dilation=1)
    for m in (plain, model):
        m.set_halting(**knobs)
    with torch.no_grad():
        masked = model(BATCH, masked=True).encoded
        removed = model(BATCH, masked=False).encoded
        alone = plain(BATCH, masked=False).encoded
        plain.configure(halting_dilation=1)  # the same model, the setting changed at inference
        configured = plain(BATCH, masked=False).encoded
    assert torch.equal(masked.halted_at, removed.halted_at)
    assert torch.equal(configured.halted_at, removed.halted_at)
    torch.testing.assert_close(masked.features, removed.features, atol=1e-5, rtol=1e-5)
    # The first stage sees the same features with or without: its neighbours only add.
    first, first_alone = removed.halted_at > 1, alone.halted_at > 1
    if "max_tokens" not in knobs:
        assert bool((first | ~first_alone).all())
    tokens = model.pillar_net(BATCH)
    for frame in range(2):
        in_frame = tokens.coords[:, 0] == frame
        if "max_tokens" in knobs:
            assert int((removed.halted_at[in_frame] > 1).sum()) <= knobs["max_tokens"]
        else:
            assert int((removed.halted_at[in_frame] > 1).sum()) > int((alone.halted_at[in_frame] > 1).sum())


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


def halting_case(seed: int = 0, gradient: str = "both"):
    """A small float64 encoder with two halting stages that halts part of the tokens."""
    encoder, features, coords, loss_weights = random_case(seed)
    encoder.halting.gradient = gradient
    return encoder.train(), features, coords, loss_weights


def test_hard_gradient_trains_on_the_removal_pass():
    encoder, features, coords, _ = halting_case(1, "hard")
    out = encoder(features, coords)  # training mode: the removal pass with straight-through gates
    encoder.eval()
    with torch.no_grad():
        removed = encoder(features, coords)
        masked = encoder(features, coords, masked=True)
    assert torch.equal(out.halted_at, removed.halted_at)
    torch.testing.assert_close(out.features, removed.features, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.features, masked.features, atol=1e-10, rtol=0)


def test_first_stage_score_gets_gradient_from_the_last_layer():
    """Per-stage gates: a token halted at the first stage keeps that stage's gate, so a loss
    on the last layer's output alone still reaches its first-stage score (through the layers
    after the second stage, where its frozen feature is a key of the active tokens)."""
    encoder, features, coords, loss_weights = halting_case(2)
    captured = {}
    handle = encoder.halting.register_forward_hook(lambda m, args, d: captured.setdefault(args[0], d))
    out = encoder(features, coords)
    handle.remove()
    first, second = captured[0], captured[1]
    halted_first = ~first.keep
    assert halted_first.any() and (first.keep & ~second.keep).any()
    # A loss on what the last layer computes: the tokens active to the end.
    alive = out.halted_at == len(encoder.layers)
    (score_grad,) = torch.autograd.grad((out.features[alive] * loss_weights[alive]).sum(), first.scores)
    assert (score_grad[halted_first] != 0).float().mean() > 0.5


def test_attention_path_reaches_a_halted_keys_score_from_another_token():
    encoder, features, coords, loss_weights = halting_case(3, "attention")
    captured = {}
    handle = encoder.halting.register_forward_hook(lambda m, args, d: captured.setdefault(args[0], d))
    out = encoder(features, coords)
    handle.remove()
    halted = ~captured[0].keep
    alive = out.halted_at == len(encoder.layers)
    # The outputs of the tokens active to the end only (a weighted sum: the plain sum of a
    # LayerNorm output is constant): a halted token's own output is not in the loss, it acts
    # as a key of the others.
    assert alive.any()
    (grad,) = torch.autograd.grad((out.features[alive] * loss_weights[alive]).sum(), captured[0].scores)
    assert (grad[halted] != 0).float().mean() > 0.5
    # Without the attention path, another token's output gives a halted token nothing.
    encoder.halting.gradient = "residual"
    captured.clear()
    handle = encoder.halting.register_forward_hook(lambda m, args, d: captured.setdefault(args[0], d))
    out = encoder(features, coords)
    handle.remove()
    (grad,) = torch.autograd.grad((out.features[alive] * loss_weights[alive]).sum(), captured[0].scores)
    assert torch.all(grad[halted] == 0)


@pytest.mark.parametrize("gradient", ["both", "attention", "residual"])
def test_pseudo_gradient_is_the_derivative_with_respect_to_the_gate(gradient):
    """At the hard 0/1 gates the last stage's pseudo-gradient of each path is exactly the
    derivative of the masked pass with respect to that path's gate (central differences in
    float64), with the tangent attention gradient. (An earlier stage's also flows through
    the later stage's straight-through factor, which finite differences of the hard pass
    do not see.)"""
    encoder, features, coords, loss_weights = halting_case(2, gradient)  # 76 tokens reach stage 2
    encoder.halting.secant = False
    grads, candidates = factor_gradients(encoder, features, coords, loss_weights)
    probes = [torch.nonzero(c).flatten()[:12] for c in candidates]
    numeric = finite_differences(encoder, features, coords, loss_weights, probes, eps=1e-6)
    assert numeric[-1].abs().max() > 1e-3
    torch.testing.assert_close(grads[-1][:12], numeric[-1], atol=1e-6, rtol=1e-5)


def test_attention_weight_scales_the_attention_paths_share():
    """The last stage's pseudo-gradient with both paths and attention weight w is the
    residual path's plus w times the attention path's, with the same forward values. (An
    earlier stage's also flows through the later stage's straight-through factor, whose
    gradient depends on the paths too: there the paths' shares do not simply add.)"""
    parts = {}
    for gradient, weight in (("residual", 1.0), ("attention", 1.0), ("both", 0.3), ("both", 1.0)):
        encoder, features, coords, loss_weights = random_case(3)
        encoder.train()
        encoder.halting.gradient, encoder.halting.attention_weight = gradient, weight
        parts[gradient, weight] = factor_gradients(encoder, features, coords, loss_weights)[0]
        parts[gradient, weight, "out"] = encoder(features, coords).features.detach()
    both, residual, attention = parts["both", 0.3][-1], parts["residual", 1.0][-1], parts["attention", 1.0][-1]
    assert attention.abs().max() > 1e-3
    torch.testing.assert_close(both, residual + 0.3 * attention, rtol=1e-9, atol=1e-12)
    assert torch.equal(parts["both", 0.3, "out"], parts["both", 1.0, "out"])


def test_gradcheck_pseudo_gradient_follows_the_relaxation():
    report = gradcheck(cases=6, progress=False)
    # The finite differences check the relaxation's own gradient.
    assert report["relaxed_vs_fd_median"] > 0.999
    both = report["paths"]["both"]
    assert both["cosine_median"] >= 0.8
    # Both paths follow the relaxation better than either alone.
    for path in ("attention", "residual", "hard"):
        assert both["cosine_median"] > report["paths"][path]["cosine_median"]


def test_sparsity_hinge_by_hand():
    scores = [torch.tensor([0.9, 0.45, 0.2, 0.55])]
    halted_at = torch.full((4,), 4)
    weights = torch.tensor([1.0, 1.0, -2.0, -2.0])
    # linear: mean of w * s
    linear = sparsity_loss(scores, halted_at, [2], weights, [0.5])
    assert float(linear) == pytest.approx((0.9 + 0.45 - 0.4 - 1.1) / 4)
    # hinge 0.1 at threshold 0.5: background pushed while s > 0.4, foreground while s < 0.6
    hinge = sparsity_loss(scores, halted_at, [2], weights, [0.5], hinge=0.1)
    assert float(hinge) == pytest.approx((0.5 + 0.05 + 2 * 0.4 + 2 * 0.05) / 4)
    # balanced: the background (first two) and foreground means added
    foreground = torch.tensor([False, False, True, True])
    balanced = sparsity_loss(scores, halted_at, [2], weights, [0.5], hinge=0.1, foreground=foreground)
    assert float(balanced) == pytest.approx((0.5 + 0.05) / 2 + (2 * 0.4 + 2 * 0.05) / 2)
    # tokens halted before the stage are not scored there
    early = torch.tensor([4, 1, 4, 4])
    assert float(sparsity_loss(scores, early, [2], weights, [0.5])) == pytest.approx((0.9 - 0.4 - 1.1) / 3)


def test_sparsity_loss_weights_foreground_and_background():
    model = make_model(5)
    tokens = model.pillar_net(BATCH)
    boxes = [np.array([[0.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]], dtype=np.float32), np.zeros((0, 7), np.float32)]
    train = TrainConfig(sparsity_weight=1.0, sparsity_fg_weight=-0.5, sparsity_bg_weight=2.0, sparsity_margin=0.0)
    weights = token_weights(model.tokens_in_boxes(tokens.coords, boxes, train.sparsity_margin),
                            train.sparsity_fg_weight, train.sparsity_bg_weight)
    r, s = -19.2, 0.32
    cx = r + (tokens.coords[:, 2].float() + 0.5) * s
    cy = r + (tokens.coords[:, 1].float() + 0.5) * s
    inside = (tokens.coords[:, 0] == 0) & (cx.abs() <= 2.0) & (cy.abs() <= 1.0)
    assert inside.any()
    assert torch.all(weights[inside] == -0.5) and torch.all(weights[~inside] == 2.0)


def test_score_supervision_by_hand():
    scores = [torch.tensor([0.9, 0.2, 0.6, 0.7]), torch.tensor([0.8, 0.0, 0.3, 0.0])]
    halted_at = torch.tensor([4, 2, 4, 2])  # tokens 1 and 3 halted at the first stage
    foreground = torch.tensor([True, False, False, True])
    loss = score_supervision_loss(scores, halted_at, [2, 3], foreground)
    # stage 1 scores all four: objects -log(0.9), -log(0.7); background -log(0.8), -log(0.4)
    first = (-math.log(0.9) - math.log(0.7)) / 2 + (-math.log(0.8) - math.log(0.4)) / 2
    # stage 2 only tokens 0 (object) and 2 (background)
    second = -math.log(0.8) - math.log(0.7)
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)


def test_score_supervision_joins_the_loss_and_teaches_the_scorers():
    model = make_model(5).train()
    output = model(BATCH)
    boxes = [np.array([[0.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]], dtype=np.float32), np.zeros((0, 7), np.float32)]
    labels = [np.zeros(1, np.int64), np.zeros(0, np.int64)]
    targets = model.targets(boxes, labels)
    plain = model.loss(output, targets, TrainConfig(), boxes, labels)
    supervised = model.loss(output, targets, TrainConfig(score_supervision=0.5), boxes, labels)
    assert "score_supervision" not in plain
    torch.testing.assert_close(supervised["loss"], plain["loss"] + 0.5 * supervised["score_supervision"])
    # it reaches both stages' scorers
    difference = supervised["loss"] - plain["loss"]
    grads = torch.autograd.grad(difference, list(model.encoder.halting.scorers.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_secant_attention_gradient_is_the_change_of_including_a_key():
    """For a zero-gated key the secant gradient of each output equals the exact change
    that gate 1 makes; for a gated-in key it is the derivative. Forward values agree."""
    from haltdet.model.encoder import gated_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64) for _ in range(3))
    k[..., 3, :] = 4 * q[..., 0, :]  # key 3 draws far more of query 0 than the others: the tangent explodes
    hard = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.bool)
    gate = hard.clone().requires_grad_(True)
    full = lambda g, secant=False: gated_attention(q, k, v, torch.where(eye, 1.0, g[None, None, :]), secant)  # noqa: E731
    out = full(gate, secant=True)
    torch.testing.assert_close(out, full(hard), atol=0, rtol=0)
    for key in (2, 3):
        (grad,) = torch.autograd.grad(out[0, 0, 0].sum(), gate, retain_graph=True)
        flipped = hard.clone()
        flipped[key] = 1.0
        change = (full(flipped) - full(hard))[0, 0, 0].sum()
        torch.testing.assert_close(grad[key], change, atol=1e-12, rtol=1e-9)
    (tangent,) = torch.autograd.grad(full(gate)[0, 0, 0].sum(), gate)
    assert tangent[3].abs() > 10 * grad[3].abs()  # the derivative at 0 overshoots the change
    (secant_kept,) = torch.autograd.grad(full(gate, secant=True)[0, 0, 0].sum(), gate)
    torch.testing.assert_close(secant_kept[[1, 4]], tangent[[1, 4]])  # gated-in keys: the derivative


def test_random_dropping_is_fixed_at_inference_and_fresh_in_training():
    model = make_model(6, halting_scorer="random")
    model.set_halting(keep_ratios=[0.5, 0.5])
    with torch.no_grad():
        first, again = model(BATCH, masked=False).encoded, model(BATCH, masked=False).encoded
        masked = model(BATCH, masked=True).encoded
    assert torch.equal(first.halted_at, again.halted_at) and torch.equal(first.halted_at, masked.halted_at)
    torch.testing.assert_close(first.features, masked.features, atol=1e-5, rtol=1e-5)
    tokens = model.pillar_net(BATCH)
    in_frame = tokens.coords[:, 0] == 0
    scores = first.scores[0][in_frame]
    assert abs(float(scores.mean()) - 0.5) < 0.05 and float(scores.std()) > 0.25  # about uniform
    assert int((first.halted_at[in_frame] > 1).sum()) == int(np.ceil(0.5 * int(in_frame.sum())))
    # A frame drops the same tokens alone as in a batch; the two stages draw differently.
    with torch.no_grad():
        alone = model(PointBatch.from_list([random_cloud(2500, 2)]), masked=False).encoded
    assert torch.equal(alone.halted_at, first.halted_at[~in_frame])
    reached = first.halted_at > 1  # scored by both stages
    assert (first.scores[0][reached] - first.scores[1][reached]).abs().mean() > 0.2
    model.train()
    torch.manual_seed(0)
    drawn = model.encoder.halting.scorers[0](tokens.features, tokens.coords, None, 2)
    torch.manual_seed(1)
    assert not torch.equal(drawn, model.encoder.halting.scorers[0](tokens.features, tokens.coords, None, 2))
    assert not list(model.encoder.halting.parameters())


def test_cumulative_halting_by_hand():
    """ACT-style halting: halting probabilities 1 - score add up; a token halts where the
    sum reaches the level; its output mixes its features with weights h on the stages it
    passes and the remainder where it stops (they sum to 1); ponder = stages passed + R."""
    from haltdet.model.halting import CumulativeHalting

    x0 = torch.tensor([[1.0], [2.0], [3.0]])
    state = CumulativeHalting(x0)
    index = torch.arange(3)
    keep = state.stage(index, x0, torch.tensor([0.9, 0.2, 0.6]), 0.99)  # h = 0.1, 0.8, 0.4
    assert keep.tolist() == [True, True, True]
    x1 = x0 * 10
    keep = state.stage(index, x1, torch.tensor([0.5, 0.7, 0.3]), 0.99)  # sums 0.6, 1.1, 1.1
    assert keep.tolist() == [True, False, False]
    output = state.finish(index[:1], x1[:1] * 10)
    # token 0: 0.1 * 1 + 0.5 * 10 + (1 - 0.6) * 100; token 1: 0.8 * 2 + 0.2 * 20; token 2: 0.4 * 3 + 0.6 * 30
    torch.testing.assert_close(output.squeeze(1), torch.tensor([45.1, 5.6, 19.2]))
    torch.testing.assert_close(state.ponder, torch.tensor([2.4, 1.2, 1.6]))


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_cumulative_halting_masked_equals_removal_and_trains_the_scores(level):
    model = make_model(3, halting_rule="act", halting_threshold=[level])
    with torch.no_grad():
        masked = model(BATCH, masked=True).encoded
        removed = model(BATCH, masked=False).encoded
    assert set(removed.halted_at.unique().tolist()) == {1, 3, 4}  # both stages halt some, some run on
    assert torch.equal(masked.halted_at, removed.halted_at)
    torch.testing.assert_close(masked.features, removed.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.ponder, removed.ponder)
    # The detection side reaches the first stage's scores through the mixed outputs, also
    # for tokens that stopped at the second stage; the ponder cost pushes scores down.
    model.train()
    tokens = model.pillar_net(BATCH)
    encoded = model.encoder(tokens.features, tokens.coords, 2)
    first_scores = encoded.scores[0]
    grad, = torch.autograd.grad(encoded.features.square().sum(), first_scores, retain_graph=True)
    assert (grad[encoded.halted_at == 3] != 0).all()
    grad, = torch.autograd.grad(encoded.ponder.sum(), first_scores)
    assert (grad[encoded.halted_at > 1] > 0).all()  # d(R)/d(score) = +1 for every earlier stage


def test_act_rule_loss_is_the_mean_ponder_cost_and_reaches_every_parameter():
    model = make_model(4, halting_rule="act", halting_threshold=[0.7]).train()
    output = model(BATCH)
    targets = model.targets([np.zeros((0, 7), np.float32)] * 2, [np.zeros(0, np.int64)] * 2)
    losses = model.loss(output, targets, TrainConfig(sparsity_weight=0.5))
    torch.testing.assert_close(losses["sparsity"], output.encoded.ponder.mean().detach())
    losses["loss"].backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def test_sparsity_warmup_raises_lambda_linearly_then_holds_it():
    from haltdet.train import at_step

    train = TrainConfig(sparsity_weight=0.5, sparsity_warmup=0.25, max_steps=400)
    weights = [at_step(train, step).sparsity_weight for step in (0, 49, 99, 100, 399)]
    assert weights == pytest.approx([0.5 / 100, 0.25, 0.5, 0.5, 0.5])
    assert at_step(train, 49).heatmap_weight == train.heatmap_weight  # nothing else changes
    assert at_step(TrainConfig(sparsity_weight=0.5), 0).sparsity_weight == 0.5  # no warm-up


def test_halting_start_holds_lambda_at_zero_then_starts_the_warmup():
    from haltdet.train import at_step, halting_paused

    train = TrainConfig(sparsity_weight=0.5, sparsity_warmup=0.25, halting_start=0.25, max_steps=400)
    assert [halting_paused(train, step) for step in (0, 99, 100)] == [True, True, False]
    weights = [at_step(train, step).sparsity_weight for step in (0, 99, 100, 149, 199, 200, 399)]
    assert weights == pytest.approx([0.0, 0.0, 0.5 / 100, 0.25, 0.5, 0.5, 0.5])
    no_ramp = TrainConfig(sparsity_weight=0.5, halting_start=0.5, max_steps=10)
    assert [at_step(no_ramp, step).sparsity_weight for step in (4, 5)] == [0.0, 0.5]


def test_share_target_holds_lambda_until_the_target_or_its_start_step_then_tracks_it_within_limits():
    from haltdet.model.halting import ShareTarget

    target = ShareTarget(0.4, 0.1, start=100)
    target.update(0.9, 0)  # every token still runs: lambda holds
    assert (target.multiplier, target.engaged) == (1.0, False)
    target.update(0.4, 1)  # the target reached before the start step: adapting from here
    assert (target.multiplier, target.engaged) == (1.0, True)
    target.update(0.6, 2)  # runs more than the target: lambda grows
    assert target.multiplier == pytest.approx(math.exp(0.1 * 0.2 / 0.4))
    target.update(0.2, 3)  # runs less: lambda shrinks, here back to its start
    assert target.multiplier == pytest.approx(1.0)
    resumed = ShareTarget(0.4, 0.1, 100, target.state())
    assert (resumed.multiplier, resumed.engaged) == (target.multiplier, True)
    for _ in range(10_000):
        target.update(1.0, 4)
    assert target.multiplier == ShareTarget.LIMIT
    never_there = ShareTarget(0.4, 0.1, start=2)  # a model that keeps more than the target at first
    for step in range(3):
        never_there.update(0.8, step)
    assert never_there.engaged and never_there.multiplier == pytest.approx(math.exp(0.1))  # from step 2 only


def test_training_to_a_target_share_adapts_lambda_every_step_and_resumes_exactly(tiny_config, tmp_path):
    import json
    import shutil

    from haltdet.checkpoint import load_checkpoint
    from haltdet.config import load_config
    from haltdet.train import train

    config = load_config(tiny_config(model={"num_layers": 4, "halting_layers": [1, 3], "halting_threshold": [0.953]},
                                     batch_size=2, max_steps=6, sparsity_weight=1.0, sparsity_target=0.4,
                                     sparsity_target_rate=0.5, sparsity_target_after=0.5, save_steps=[3],
                                     deterministic=True))
    train(config, tmp_path / "run", progress=False)

    def logged(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return {entry["step"]: entry for entry in map(json.loads, lines) if "loss" in entry}

    steps = logged("run")
    assert steps[1]["token_layers"] > 0.4 and steps[2]["sparsity_weight"] == 1.0  # held above the target
    engaged = False
    for step in range(1, 6):  # lambda of the next step from this step's share of token-layers
        engaged = engaged or steps[step]["token_layers"] <= 0.4 or step > 6 * 0.5  # sparsity_target_after
        factor = math.exp(0.5 * (steps[step]["token_layers"] - 0.4) / 0.4) if engaged else 1.0
        assert steps[step + 1]["sparsity_weight"] == pytest.approx(steps[step]["sparsity_weight"] * factor, rel=1e-9)
    assert len({round(entry["sparsity_weight"], 9) for entry in steps.values()}) > 1
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "run" / "step_3.pt", tmp_path / "resumed" / "latest.pt")
    train(config, tmp_path / "resumed", resume=True, progress=False)
    resumed_log = logged("resumed")
    assert [resumed_log[s]["sparsity_weight"] for s in (4, 5, 6)] == [steps[s]["sparsity_weight"] for s in (4, 5, 6)]
    resumed, uninterrupted = (load_checkpoint(tmp_path / run / "final.pt")["model"] for run in ("resumed", "run"))
    assert all(torch.equal(resumed[key], value) for key, value in uninterrupted.items())


@pytest.mark.parametrize("gradient", ["residual", "both", "hard"])
def test_paused_halting_keeps_every_token_and_gives_the_scores_no_gradient(gradient):
    model = make_model(5, halting_gradient=gradient).train()
    tokens = model.pillar_net(BATCH)
    halting = model.encoder.halting
    assert (model.encoder(tokens.features, tokens.coords, 2).halted_at < 4).any()  # these scores halt some
    halting.paused = True
    encoded = model.encoder(tokens.features, tokens.coords, 2)
    assert (encoded.halted_at == 4).all() and torch.equal(encoded.gate, torch.ones_like(encoded.gate))
    with torch.no_grad():  # the same features as the encoder without halting stages
        plain = model.encoder.eval()
        halting.halting_layers, layers = [], halting.halting_layers
        expected = plain(tokens.features, tokens.coords, 2).features
        halting.halting_layers = layers
    torch.testing.assert_close(encoded.features, expected, atol=1e-5, rtol=1e-5)
    encoded.features.square().sum().backward()
    for scorer in halting.scorers:  # in the graph (as DDP expects), with a zero gradient
        assert all(p.grad is not None and not p.grad.any() for p in scorer.parameters())
    model.eval()
    assert (model.encoder(tokens.features, tokens.coords, 2).halted_at < 4).any()  # only in training


def test_training_with_halting_start_halts_nothing_before_it(tiny_config, tmp_path):
    import json

    from haltdet.config import load_config
    from haltdet.train import train

    config = load_config(tiny_config(model={"num_layers": 4, "halting_layers": [1, 3]}, batch_size=2, max_steps=4,
                                     halting_start=0.5, sparsity_weight=1.0, sparsity_fg_weight=-0.2))
    train(config, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = {entry["step"]: entry for entry in log if "loss" in entry}
    assert [steps[s]["sparsity_weight"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert steps[1]["kept_fraction"] == steps[2]["kept_fraction"] == 1.0
    assert "sparsity" not in steps[1] and steps[3]["sparsity"] > 0
