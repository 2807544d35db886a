"""Pillarization, targets and the whole detector."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haltdet.config import ModelConfig
from haltdet.model.detector import Detector, DetectorOutput
from haltdet.model.head import REGRESSION_DIM, HeadTargets, distillation_loss, local_max_3x3
from haltdet.model.pillars import PillarFeatureNet, PointBatch

SMALL = dict(point_cloud_range=[-19.2, -19.2, -4.0, 19.2, 19.2, 3.0], d_model=32,
             pfn_channels=[16, 32], num_heads=4, ffn_dim=64, num_layers=2, window_size=8,
             bev_channels=16, head_channels=16, bev_convs=1)


def random_cloud(n: int, seed: int, extent: float = 25.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([extent, extent, 2.0])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], dim=1)


def test_one_token_per_nonempty_pillar_in_range():
    cloud = random_cloud(5000, 0)
    net = PillarFeatureNet(SMALL["point_cloud_range"], 0.32, [16, 32])
    tokens = net(PointBatch.from_list([cloud, cloud[:100]]))
    for frame, points in enumerate([cloud, cloud[:100]]):
        p = points.numpy()
        inside = (np.abs(p[:, 0]) < 19.2) & (np.abs(p[:, 1]) < 19.2) & (p[:, 2] >= -4) & (p[:, 2] < 3)
        cells = np.floor((p[inside, :2] + 19.2) / 0.32).astype(int)
        expected = {(int(iy), int(ix)) for ix, iy in cells}
        got = {(int(r[1]), int(r[2])) for r in tokens.coords if r[0] == frame}
        assert got == expected
    assert tokens.features.shape == (tokens.coords.shape[0], 32)
    # tokens sorted by (frame, iy, ix)
    keys = (tokens.coords[:, 0] * 1000 + tokens.coords[:, 1]) * 1000 + tokens.coords[:, 2]
    assert torch.all(keys[1:] > keys[:-1])


def test_pillar_features_ignore_point_order():
    cloud = random_cloud(3000, 1)
    net = PillarFeatureNet(SMALL["point_cloud_range"], 0.32, [16, 32])
    a = net(PointBatch.from_list([cloud]))
    b = net(PointBatch.from_list([cloud[torch.randperm(3000)]]))
    assert torch.equal(a.coords, b.coords)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)


def test_pillar_layers_equal_their_modules_on_the_concatenation():
    """After the first layer the pillar net multiplies a point's half and its pillar's
    pooled half of the layer's input apart (the pillar's once per pillar); values and
    gradients equal running each layer's modules on the concatenated input. In float64:
    the two sum their products in different orders, which float32 rounding would blur
    (gradients summed over 4,000 points differ by 2e-5 on some CPUs)."""
    from haltdet.model.pillars import _scatter_max

    torch.manual_seed(0)
    net = PillarFeatureNet(SMALL["point_cloud_range"], 0.32, [16, 32, 48]).double()
    pillar = torch.randint(0, 300, (4000,))
    pillar[:300] = torch.arange(300)  # no empty pillar
    inputs = torch.randn(4000, 9, dtype=torch.float64, requires_grad=True)
    ours = net.pool(inputs, pillar, 300)
    features = inputs
    for layer in net.layers:
        point_features = layer(features)
        pooled = _scatter_max(point_features, pillar, 300)
        features = torch.cat([point_features, pooled.index_select(0, pillar)], dim=1)
    assert ours.shape == pooled.shape == (300, 48)
    torch.testing.assert_close(ours, pooled, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(pooled)
    parameters = [inputs, *net.parameters()]
    grads_ours = torch.autograd.grad((ours * upstream).sum(), parameters)
    grads_reference = torch.autograd.grad((pooled * upstream).sum(), parameters)
    for mine, theirs in zip(grads_ours, grads_reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("yaws", [[0.3, -2.0, 3.0], [1.5707, -1.6, 0.78], [-0.8, 2.4, -3.1]])
def test_targets_decode_back_to_the_boxes(yaws):
    """Encoding boxes as targets and decoding a perfect prediction recovers the boxes,
    headings included, in every quadrant."""
    model = Detector(ModelConfig(**SMALL))
    boxes = np.array([[3.3, -4.1, -1.0, 4.5, 1.9, 1.6, yaws[0]],
                      [-10.0, 7.7, -1.2, 0.7, 0.6, 1.8, yaws[1]],
                      [12.1, 12.9, -1.1, 1.8, 0.6, 1.7, yaws[2]]], dtype=np.float32)
    labels = np.array([0, 1, 2])
    targets = model.targets([boxes], [labels])
    height, width = model.head_grid
    heatmap = torch.full((1, 3, height, width), -10.0)
    regression = torch.zeros(1, REGRESSION_DIM, height * width)
    for cell, target, label in zip(targets.cell, targets.regression, labels):
        heatmap.view(1, 3, -1)[0, label, cell] = 10.0
        regression[0, :, cell] = target
        regression[0, 8, cell] = 4.0 * (2 * target[8] - 1)  # direction target 0/1 -> a confident logit
    output = DetectorOutput(heatmap, regression.view(1, REGRESSION_DIM, height, width), None)
    (det,) = model.decode(output)
    order = torch.argsort(det.labels)
    np.testing.assert_allclose(det.boxes[order].numpy()[:, :6], boxes[:, :6], atol=1e-4)
    yaw_error = np.angle(np.exp(1j * (det.boxes[order].numpy()[:, 6] - boxes[:, 6])))
    np.testing.assert_allclose(yaw_error, 0, atol=1e-4)
    assert det.labels[order].tolist() == [0, 1, 2]
    # The heatmap peaks are exactly 1 at the centres and Gaussian around them.
    assert targets.heatmap.max() == 1.0
    assert (targets.heatmap == 1.0).sum() == 3


def test_two_centres_in_one_cell_regress_the_nearer_object():
    model = Detector(ModelConfig(**SMALL))
    size = model.cell_size
    corner = np.array(model.range_min) + 40 * size  # a cell's lower corner
    boxes = np.array([[corner[0] + 0.2 * size, corner[1] + 0.5 * size, -1.2, 0.7, 0.6, 1.8, 1.0],
                      [corner[0] + 0.45 * size, corner[1] + 0.55 * size, -1.2, 0.7, 0.6, 1.8, -2.0],
                      [corner[0] + 5.5 * size, corner[1] + 0.5 * size, -1.0, 4.5, 1.9, 1.6, 0.4]],
                     dtype=np.float32)
    targets = model.targets([boxes], [np.array([1, 1, 0])])
    assert targets.cell.tolist() == sorted(targets.cell.tolist()) and len(targets.cell) == 2
    torch.testing.assert_close(targets.boxes, torch.from_numpy(boxes[1:]))  # the second is nearer the centre
    assert (targets.heatmap == 1.0).sum() == 2  # one peak for the two pedestrians, one for the vehicle


def test_detector_is_deterministic_and_trains():
    torch.manual_seed(0)
    model = Detector(ModelConfig(**SMALL))
    batch = PointBatch.from_list([random_cloud(4000, 2), random_cloud(3000, 3)])
    boxes = [np.array([[1.0, 2.0, -1.0, 4.0, 2.0, 1.5, 0.5]], dtype=np.float32),
             np.zeros((0, 7), dtype=np.float32)]
    targets = model.targets(boxes, [np.array([0]), np.array([], dtype=np.int64)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model.loss(model(batch), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    first = model.detect(batch)
    second = model.detect(batch)
    for a, b in zip(first, second):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_empty_and_out_of_range_clouds_run():
    model = Detector(ModelConfig(**SMALL)).eval()
    far = torch.tensor([[500.0, 0.0, 0.0, 0.5]])
    for cloud in (torch.zeros(0, 4), far):
        (det,) = model.detect(PointBatch.from_list([cloud]))
        # No point in range, no token: no detection (not the head's bias over an empty map).
        assert det.boxes.shape == (0, 7) and len(det.scores) == len(det.labels) == 0


def test_configure_changes_inference_settings_one_way():
    from haltdet import ConfigError

    model = Detector(ModelConfig(**SMALL, halting_layers=[1], refine=True, refine_channels=[8, 16])).eval()
    model.configure(halting_threshold=[0.3], nms_iou=[0.1, 0.1, 0.1], refine_passes=3, second_stage=False)
    assert model.config.halting_threshold == [0.3] and model.encoder.halting.thresholds == [0.3]
    assert model.config.nms_iou == [0.1, 0.1, 0.1] and model.config.refine_passes == 3
    assert model.refiner is not None and not model.second_stage  # kept, not used by decode
    model.set_halting(keep_ratios=[0.5])
    assert model.config.halting_keep_ratio == [0.5] and model.encoder.halting.keep_ratios == [0.5]
    for bad in (dict(lr=0.1), dict(refine_passes=0), dict(halting_threshold=[0.1, 0.2, 0.3])):
        with pytest.raises(ConfigError):
            model.configure(**bad)
    assert model.config.refine_passes == 3  # a refused change changes nothing
    with pytest.raises(ConfigError, match="halting stages"):
        Detector(ModelConfig(**SMALL)).configure(halting_threshold=[0.5])  # "... has none"


def test_bfloat16_inference_is_close_to_float32_deterministic_and_off_in_training():
    """`model.inference_dtype: bfloat16` on the bundled halting model and a simulated frame:
    only the dense stage changes precision (the encoder and its halting decisions are
    float32's exactly), the heatmap stays close, the confident boxes of float32 are found
    again, everything comes out in float32 and the same twice; training ignores it."""
    from haltdet import ConfigError, load
    from haltdet.bench import bench_cloud

    model = load("halting")
    batch = PointBatch.from_list([bench_cloud(3)])
    with torch.no_grad():
        exact = model(batch)
        model.configure(inference_dtype="bfloat16")
        fast, again = model(batch), model(batch)
    assert fast.heatmap.dtype == fast.regression.dtype == torch.float32
    assert torch.equal(fast.heatmap, again.heatmap) and torch.equal(fast.regression, again.regression)
    assert torch.equal(fast.encoded.features, exact.encoded.features)
    assert torch.equal(fast.encoded.halted_at, exact.encoded.halted_at)
    change = (fast.heatmap.sigmoid() - exact.heatmap.sigmoid()).abs().flatten()
    assert 0 < change.max() and change.quantile(0.999) < 0.05 and change.median() < 1e-3
    (exact_boxes,), (fast_boxes,) = model.decode(exact), model.decode(fast)
    assert fast_boxes.boxes.dtype == fast_boxes.scores.dtype == torch.float32
    confident = exact_boxes.boxes[exact_boxes.scores > 0.3]
    assert len(confident) >= 10
    # every one found again, most within a centimetre or two (its accuracy: `haltdet eval --dtype`)
    shift = torch.cdist(confident[:, :3], fast_boxes.boxes[:, :3]).min(dim=1).values
    assert shift.max() < 0.5 and shift.median() < 0.02
    model.train()
    assert model.inference_precision().__class__.__name__ == "nullcontext"
    with pytest.raises(ConfigError, match="inference_dtype"):
        model.configure(inference_dtype="float16")


def test_bfloat16_on_a_cpu_without_fast_kernels_is_said_once(monkeypatch, caplog):
    """Where oneDNN has no fast bfloat16 kernels (AVX2 CPUs) bfloat16 inference is several
    times slower than float32: the model says so once, and nothing where the kernels exist."""
    from haltdet.model import detector

    batch = PointBatch.from_list([random_cloud(2000, 4)])
    for fast, warnings in ((True, 0), (False, 1)):
        monkeypatch.setattr(detector, "cpu_runs_bfloat16", lambda fast=fast: fast)
        model = Detector(ModelConfig(**SMALL)).eval()
        model.configure(inference_dtype="bfloat16")
        caplog.clear()
        with torch.no_grad():
            model(batch), model(batch)
        said = [r for r in caplog.records if "without fast bfloat16 kernels" in r.getMessage()]
        assert len(said) == warnings, (fast, [r.getMessage() for r in caplog.records])


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_strided_convolution_on_tokens_equals_the_dense_one(stride):
    """The BEV stage's first convolution reads the tokens directly; it must equal the
    strided convolution over the zero-filled pillar grid, values and gradients."""
    from haltdet.model.head import BEVBackbone

    torch.manual_seed(0)
    grid, batch_size, channels = (24, 16), 2, 8
    backbone = BEVBackbone(channels, 6, num_convs=1, stride=stride).eval()
    cells = torch.randperm(batch_size * grid[0] * grid[1])[:150]
    coords = torch.stack([cells // (grid[0] * grid[1]), cells // grid[1] % grid[0], cells % grid[1]], 1)
    features = torch.randn(len(cells), channels, requires_grad=True)

    ours = backbone.downsample(features, coords, batch_size, grid)
    dense = torch.zeros(batch_size, grid[0], grid[1], channels)
    dense = dense.index_put((coords[:, 0], coords[:, 1], coords[:, 2]), features)
    reference = backbone.net[0](dense.permute(0, 3, 1, 2))
    assert ours.shape == reference.shape == (batch_size, 6, grid[0] // stride, grid[1] // stride)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(reference)
    grad_ours, = torch.autograd.grad((ours * upstream).sum(), features)
    grad_reference, = torch.autograd.grad((reference * upstream).sum(), features)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-5, atol=1e-6)
    weight_ours, = torch.autograd.grad((backbone.downsample(features, coords, batch_size, grid)
                                        * upstream).sum(), backbone.net[0].weight)
    weight_reference, = torch.autograd.grad((backbone.net[0](dense.permute(0, 3, 1, 2)) * upstream).sum(),
                                            backbone.net[0].weight)
    torch.testing.assert_close(weight_ours, weight_reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_format,sparse,support_max", [
    (torch.contiguous_format, False, 0.5), (torch.channels_last, False, 0.5),
    (torch.channels_last, True, 1.0), (torch.channels_last, True, 0.0)])
def test_folded_batch_norm_at_inference_equals_the_modules(memory_format, sparse, support_max, monkeypatch):
    """At inference the BEV stage and the head run each convolution and its batch norm as
    one folded convolution; the values equal running the modules one after the other (the
    first convolution over the zero-filled grid), with batch norm statistics far from the
    identity. Training runs the modules themselves. `sparse`: the 3x3 convolutions on the
    support of the map (head.SparseMap) always (support_max 1) or never (0)."""
    from haltdet.model import head as head_module
    from haltdet.model.head import BEVBackbone, CenterHead

    monkeypatch.setattr(head_module, "SPARSE_SUPPORT_MAX", support_max)

    torch.manual_seed(0)
    grid, batch_size, channels = (24, 16), 2, 8
    backbone, head = BEVBackbone(channels, 6, num_convs=2, stride=2), CenterHead(6, 5)
    for norm in [m for m in (*backbone.modules(), *head.modules()) if isinstance(m, torch.nn.BatchNorm2d)]:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.2, 3)
        torch.nn.init.uniform_(norm.weight, 0.5, 2)
        torch.nn.init.uniform_(norm.bias, -1, 1)
    backbone.eval(), head.eval()
    cells = torch.randperm(batch_size * grid[0] * grid[1])[:150]
    coords = torch.stack([cells // (grid[0] * grid[1]), cells // grid[1] % grid[0], cells % grid[1]], 1)
    features = torch.randn(len(cells), channels)
    with torch.no_grad():
        bev = backbone(features, coords, batch_size, grid, memory_format, sparse)
        heatmap, regression = head(bev)
        if isinstance(bev, head_module.SparseMap):
            bev = bev.tensor
        dense = torch.zeros(batch_size, grid[0], grid[1], channels)
        dense = dense.index_put((coords[:, 0], coords[:, 1], coords[:, 2]), features).permute(0, 3, 1, 2)
        reference = backbone.net(dense)
        shared = head.shared(reference)
    torch.testing.assert_close(bev, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heatmap, head.heatmap(shared), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(regression, head.regression(shared), rtol=1e-5, atol=1e-5)
    backbone.train()
    calls = []
    backbone.net[1].register_forward_hook(lambda *args: calls.append(1))
    backbone(features, coords, batch_size, grid, memory_format)
    assert calls  # in training the batch norm module runs (its batch statistics)


@pytest.mark.parametrize("tap_products_below", [0.0, 2.0])
def test_sparse_map_convolutions_equal_the_dense_ones(tap_products_below, monkeypatch):
    """Three 3x3 convolutions on a `SparseMap` (a few occupied cells, some on the edges
    and corners of the maps, a non-zero background) equal the dense convolutions with
    zero padding on the whole map; the support grows by one cell per convolution (and the
    map's border ring, where the padding enters); once it exceeds SPARSE_SUPPORT_MAX of
    the cells the dense convolution takes over. Both ways of computing a sparse
    convolution: gathered neighbourhoods (TAP_PRODUCTS_BELOW 0) and per-tap products
    summed per cell (2: always)."""
    import torch.nn.functional as F

    from haltdet.model import head as head_module
    from haltdet.model.head import SparseMap

    monkeypatch.setattr(head_module, "TAP_PRODUCTS_BELOW", tap_products_below)
    torch.manual_seed(0)
    batch, height, width, channels = 2, 30, 26, 5
    cells = torch.tensor([0, 3 * width + 7, 12 * width + 12, 13 * width + 12, height * width - 1,
                          height * width + 25, height * width + 20 * width + 3, 2 * height * width - width])
    rows = torch.cat([torch.randn(len(cells), channels), torch.randn(1, channels), torch.zeros(1, channels)])
    sparse = SparseMap(rows, cells, (batch, height, width))
    dense = sparse.tensor
    expected = torch.zeros(batch * height * width, dtype=torch.bool)
    expected[cells] = True
    for step in range(3):
        weight, bias = torch.randn(channels, channels, 3, 3) * 0.3, torch.randn(channels) * 0.3
        monkeypatch.setattr(head_module, "SPARSE_SUPPORT_MAX", 0.5)
        sparse = sparse.conv3x3_relu(weight, bias)
        dense = F.conv2d(dense, weight, bias, padding=1).relu_()
        assert isinstance(sparse, SparseMap)
        grown = F.max_pool2d(expected.view(batch, 1, height, width).float(), 3, 1, 1)[:, 0] > 0
        grown[:, 0], grown[:, -1], grown[:, :, 0], grown[:, :, -1] = True, True, True, True
        expected = grown.view(-1)
        assert torch.equal(sparse.cells, expected.nonzero().squeeze(1))
        torch.testing.assert_close(sparse.tensor, dense, rtol=1e-5, atol=1e-5)
        assert dense.permute(0, 2, 3, 1).reshape(-1, channels)[~expected].unique(dim=0).shape[0] == 1
    monkeypatch.setattr(head_module, "SPARSE_SUPPORT_MAX", 0.1)
    taken_over = sparse.conv3x3_relu(weight, bias)
    assert not isinstance(taken_over, SparseMap)
    torch.testing.assert_close(taken_over, F.conv2d(dense, weight, bias, padding=1).relu_(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("support_max", [1.0, 0.3])
def test_sparse_training_pass_equals_the_dense_one(support_max, monkeypatch):
    """In training the BEV stage and the head on a `SparseMap` (support_max 1: every
    convolution on the support; 0.3: the dense convolutions take over once the support
    has grown) give the dense modules' outputs, the same gradients for the tokens and
    every parameter, and the same running statistics (the background counted once per
    background cell in the batch statistics). In float64, so that the comparison is
    tight: the two sum in different orders."""
    import copy

    from haltdet.model import head as head_module
    from haltdet.model.head import BEVBackbone, CenterHead

    monkeypatch.setattr(head_module, "SPARSE_SUPPORT_MAX", support_max)
    torch.manual_seed(0)
    grid, batch_size, channels = (40, 36), 2, 8
    dense_stage = nn.ModuleList([BEVBackbone(channels, 6, num_convs=2, stride=2), CenterHead(6, 5)])
    dense_stage = dense_stage.double().train()
    for norm in [m for m in dense_stage.modules() if isinstance(m, nn.BatchNorm2d)]:
        nn.init.uniform_(norm.weight, 0.5, 2)
        nn.init.uniform_(norm.bias, -1, 1)
    sparse_stage = copy.deepcopy(dense_stage)
    cells = torch.randperm(batch_size * grid[0] * grid[1])[:60]
    coords = torch.stack([cells // (grid[0] * grid[1]), cells // grid[1] % grid[0], cells % grid[1]], 1)
    features = torch.randn(len(cells), channels, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(batch_size, 12, grid[0] // 2, grid[1] // 2, dtype=torch.float64)
    outputs, gradients = [], []
    for stage, sparse in ((dense_stage, False), (sparse_stage, True)):
        bev = stage[0](features, coords, batch_size, grid, torch.contiguous_format, sparse)
        assert isinstance(bev, head_module.SparseMap) == (sparse and support_max == 1.0)
        heatmap, regression = stage[1](bev)
        output = torch.cat([heatmap, regression], 1)
        parameters = [features, *stage.parameters()]
        outputs.append(output)
        gradients.append(torch.autograd.grad((output * upstream).sum(), parameters))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    assert len(gradients[0]) == len(gradients[1])
    for ours, reference in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    for (name, ours), (_, reference) in zip(sparse_stage.named_buffers(), dense_stage.named_buffers()):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10, msg=name)


def test_pillar_max_pool_gradient_is_autograds_for_scatter_max():
    """The pillar max-pool's own backward equals autograd's for scatter_reduce amax,
    ties (rounded values, zeros tying with the zero start) included."""
    from haltdet.model.pillars import _scatter_max

    torch.manual_seed(0)
    index = torch.randint(0, 300, (2000,))
    values = torch.relu(torch.randn(2000, 16)).round(decimals=1).requires_grad_(True)
    upstream = torch.randn(300, 16)
    ours = _scatter_max(values, index, 300)
    reference = torch.zeros(300, 16).scatter_reduce(0, index[:, None].expand_as(values), values,
                                                    reduce="amax", include_self=True)
    assert torch.equal(ours, reference)
    grad_ours, = torch.autograd.grad((ours * upstream).sum(), values)
    grad_reference, = torch.autograd.grad((reference * upstream).sum(), values)
    assert torch.equal(grad_ours, grad_reference)
    assert (grad_ours != 0).any() and (grad_ours == 0).any()


def test_equal_group_encoder_trains_and_keeps_frames_independent():
    """model.group_size: a detector whose encoder attends in equal-size token groups runs,
    trains (every parameter gets a gradient) and gives a frame the same result alone or in
    a batch (groups never mix frames); it is not combined with halting."""
    from haltdet import ConfigError

    torch.manual_seed(0)
    model = Detector(ModelConfig(**SMALL, group_size=29)).eval()
    clouds = [torch.rand(3000, 4) * torch.tensor([36.0, 36.0, 3.0, 1.0]) - torch.tensor([18.0, 18.0, 2.0, 0.0])
              for _ in range(2)]
    with torch.no_grad():
        both = model(PointBatch.from_list(clouds))
        alone = model(PointBatch.from_list(clouds[1:]))
    torch.testing.assert_close(both.heatmap[1:], alone.heatmap, atol=1e-5, rtol=1e-5)
    model.train()
    output = model(PointBatch.from_list(clouds))
    (output.heatmap.sum() + output.regression.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ConfigError, match="model.group_size"):
        ModelConfig(**SMALL, group_size=29, halting_layers=[1]).validate()


def test_cross_class_suppression_keeps_the_better_box_on_a_spot():
    from haltdet.model.head import Detections, suppress_across_classes

    boxes = torch.tensor([[5.0, 0.0, -1.0, 0.8, 0.6, 1.7, 0.0], [5.05, 0.0, -1.0, 1.7, 0.6, 1.7, 0.0],
                          [9.0, 3.0, -1.0, 4.5, 1.9, 1.6, 0.3], [9.0, 3.0, -1.0, 4.5, 1.9, 1.6, 0.3]])
    detections = Detections(boxes, torch.tensor([0.5, 0.7, 0.9, 0.4]), torch.tensor([1, 2, 0, 0]))
    kept = suppress_across_classes(detections, 0.3)
    # the cyclist (0.7) outscores the pedestrian on its spot; the lower duplicate vehicle goes too
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7]) and kept.labels.tolist() == [0, 2]
    assert suppress_across_classes(detections, 1.0) is detections  # off
    model = Detector(ModelConfig(**SMALL))
    model.configure(cross_class_iou=0.3)
    assert model.config.cross_class_iou == 0.3


def test_local_max_is_max_pool_exactly():
    """The decoder's peak finder against the pooling kernel: random maps with many ties
    (quantised values), batches, one-row and one-column maps, negative values at the border."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 17, 23), (1, 1, 1, 9), (1, 2, 7, 1), (1, 3, 192, 192)]:
        x = (torch.rand(shape, generator=g) * 8).floor() - 4
        assert torch.equal(local_max_3x3(x), F.max_pool2d(x, 3, stride=1, padding=1))


def test_distillation_loss_is_zero_at_the_teacher_and_a_kl_divergence_elsewhere():
    generator = torch.Generator().manual_seed(0)
    teacher_heatmap = torch.randn(2, 3, 5, 6, generator=generator) * 3
    teacher_regression = torch.randn(2, REGRESSION_DIM, 5, 6, generator=generator)
    peaks = torch.zeros(2, 3, 5, 6)
    peaks[0, 1, 2, 3] = peaks[1, 0, 4, 1] = 1.0  # two peaks: the heatmap term is divided by 2
    targets = HeadTargets(peaks, *(torch.zeros(0, dtype=torch.long),) * 2, torch.zeros(0, REGRESSION_DIM),
                          torch.zeros(0, 7))
    heatmap = teacher_heatmap.clone().requires_grad_()
    regression = teacher_regression.clone().requires_grad_()
    heat, box = distillation_loss(heatmap, regression, teacher_heatmap, teacher_regression, targets)
    (heat + box).backward()
    assert abs(float(heat.detach())) < 1e-5 and float(box.detach()) == 0.0
    assert float(heatmap.grad.abs().max()) < 1e-7

    student_heatmap = torch.randn(2, 3, 5, 6, generator=generator)
    student_regression = teacher_regression + 0.5
    heat, box = distillation_loss(student_heatmap, student_regression, teacher_heatmap, teacher_regression, targets)
    p, q = torch.sigmoid(teacher_heatmap).double(), torch.sigmoid(student_heatmap).double()
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert float(heat) == pytest.approx(float(kl.sum()) / 2, rel=1e-4)
    # the same distance everywhere: the confidence-weighted mean of it
    assert float(box) == pytest.approx(0.5 * REGRESSION_DIM, rel=1e-5)
