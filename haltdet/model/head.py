"""Tokens -> dense BEV -> CenterPoint-style head -> boxes.

The dense stage runs at `bev_stride` (default 2: 0.64 m cells) with few channels: on a
CPU a dense BEV stage sized like SST's GPU one would cost more than the whole encoder.
The head predicts per cell a class heatmap and a regression of the box at the cell:
sub-cell offset (2), centre z (1), log size l, w, h (3), sin and cos of twice the yaw (2)
and a direction logit (1). Twice the yaw is the box axis, unambiguous even where front and
back look alike (regressing sin/cos of the yaw itself averages the two modes into a wrong
axis); the direction logit picks which end of the axis is the front.

The regression is supervised at each object's centre cell (a cell holding two centres
regresses the nearer object).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from haltdet.boxes import nms_bev
from haltdet.distributed import batch_count, batch_norm_rows

NUM_CLASSES = 3
REGRESSION_DIM = 9  # dx, dy, z, log l, log w, log h, sin 2yaw, cos 2yaw, direction logit
DIRECTION_OFFSET = math.pi / 4  # direction = cos(yaw - offset) > 0: the class boundary sits
# at +-45 degrees from the road axes, away from the headings traffic usually has


@dataclass
class Detections:
    """Detections of one frame: boxes (K, 7) in the project convention, scores (K,),
    labels (K,) int64 class indices."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


@dataclass
class HeadTargets:
    """Training targets for a batch.

    heatmap: (B, NUM_CLASSES, H, W) Gaussian peaks at object centres.
    frame: (N,) frame index of each supervised cell.
    cell: (N,) flat cell index (row * W + col).
    regression: (N, REGRESSION_DIM) targets at those cells.
    boxes: (N, 7) the ground-truth box the cell regresses.
    """

    heatmap: torch.Tensor
    frame: torch.Tensor
    cell: torch.Tensor
    regression: torch.Tensor
    boxes: torch.Tensor

    def to(self, device) -> "HeadTargets":
        return HeadTargets(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def folded(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution that computes `conv` (no bias) followed by
    `norm` with its running statistics: what both compute at inference, one pass over the
    map instead of two."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    return conv.weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale


def conv_norm_relu(block: nn.Sequential, x):
    """A (Conv2d, BatchNorm2d, ReLU) block: in training as its modules run, at inference
    as one folded convolution (`folded`) and the ReLU; on a `SparseMap` only where the
    output can differ from the background (`SparseMap.convolved` and
    `SparseMap.normalised_relu` in training, `SparseMap.conv3x3_relu` at inference)."""
    conv, norm, _ = block
    if isinstance(x, SparseMap):
        if not norm.training:
            return x.conv3x3_relu(*folded(conv, norm))
        x = x.convolved(conv.weight)
        return x.normalised_relu(norm) if isinstance(x, SparseMap) else block[1:](x)
    if norm.training:
        return block(x)
    return F.conv2d(x, *folded(conv, norm), conv.stride, conv.padding).relu_()


# A BEV map is mostly background: every empty cell starts at the same vector (the first
# convolution's bias, or its batch norm's image of zero in training), and a 3x3
# convolution maps a neighbourhood of equal vectors inside the map to one new vector, as
# batch norm and the ReLU map equal vectors to equal vectors. So each 3x3 convolution is
# computed only at the cells whose neighbourhood holds a non-background cell or the map's
# zero padding (the support grows by one cell per convolution), as matrix products over
# the gathered neighbourhoods, and the background is carried as one row (in training its
# batch-norm statistics count it once per background cell). The same values and
# gradients as the dense convolutions to float rounding, at a fraction of their cost on a
# CPU while the support is small: above this share of the cells the dense convolution
# runs instead.
SPARSE_SUPPORT_MAX = 0.5
_GATHER_CELLS = 2048  # cells gathered per matrix product: one buffer of the same size every time
# Where a convolution's input rows are fewer than this share of its output cells (the
# first 3 x 3 convolution, on the occupied cells only), each input row is multiplied by
# all nine taps once and each cell sums its nine tap rows (`F.embedding_bag`): fewer
# products and no gathered copy of the neighbourhoods. Above it the gathered
# neighbourhoods' one product is as fast or faster (measured on `haltdet bench` frames).
TAP_PRODUCTS_BELOW = 0.5


@dataclass
class SparseMap:
    """An inference BEV map of shape (B, C, H, W) kept as the rows of its support.

    rows: (N + 2, C) the N support cells' vectors (in cell order), then the background
      vector (every other cell's), then zeros (read for neighbours outside the map: the
      convolutions' zero padding).
    cells: (N,) the support cells, flat indices b * H * W + y * W + x, ascending.
    shape: (B, H, W).
    """

    rows: torch.Tensor
    cells: torch.Tensor
    shape: tuple[int, int, int]

    def bordered_slots(self) -> np.ndarray:
        """(B, H + 2, W + 2) the row each cell of the maps with a one-cell border reads: its
        own (the support's), the background's, or, on the border, the zero row."""
        batch, height, width = self.shape
        cells = self.cells.cpu().numpy()
        background = cells.size
        slots = np.full((batch, height + 2, width + 2), background, dtype=np.int64)
        slots[:, [0, -1]] = background + 1
        slots[:, :, [0, -1]] = background + 1
        slots.reshape(-1)[_bordered(cells, height, width)] = np.arange(background)
        return slots

    def slots(self) -> torch.Tensor:
        """(B * H * W,) the row of each cell."""
        inside = np.ascontiguousarray(self.bordered_slots()[:, 1:-1, 1:-1]).reshape(-1)
        return torch.from_numpy(inside).to(self.rows.device)

    def dense_rows(self) -> torch.Tensor:
        """(B * H * W, C) every cell's vector."""
        return self.rows.index_select(0, self.slots())

    @property
    def tensor(self) -> torch.Tensor:
        """The whole map, (B, C, H, W) channels-last."""
        batch, height, width = self.shape
        return self.dense_rows().view(batch, height, width, -1).permute(0, 3, 1, 2)

    def conv3x3_relu(self, weight: torch.Tensor, bias: torch.Tensor):
        """relu(conv2d(map, weight, bias, padding=1)) for a (C', C, 3, 3) weight: a
        `SparseMap`, or the dense (B, C', H, W) channels-last map once the support is
        too large. The index arithmetic runs in numpy on the host (a CPU map's cells are
        a view of a numpy array), over maps with a one-cell border: a neighbour's place is
        the cell's plus a constant, with no test for the map's edges."""
        batch, height, width = self.shape
        num_cells = batch * height * width
        cells = self.cells.cpu().numpy()
        grown = grown_cells(cells, self.shape)
        if grown.size > SPARSE_SUPPORT_MAX * num_cells:
            return F.conv2d(self.tensor, weight, bias, 1, 1).relu_()
        background = cells.size
        index = self.neighbourhoods(grown)
        channels, out_channels = self.rows.shape[1], weight.shape[0]
        rows = torch.empty(grown.size + 2, out_channels, dtype=self.rows.dtype, device=self.rows.device)
        if background < TAP_PRODUCTS_BELOW * grown.size:
            # row r times tap k is row 9 r + k of `products`; a cell sums its nine
            products = self.rows @ weight.permute(1, 2, 3, 0).reshape(channels, 9 * out_channels)
            bags = torch.from_numpy(index * 9 + np.arange(9)).to(self.rows.device)
            torch.add(F.embedding_bag(bags, products.view(-1, out_channels), mode="sum"), bias, out=rows[:-2])
        else:
            index = torch.from_numpy(index.reshape(-1)).to(self.rows.device)
            weight_rows = weight.permute(2, 3, 1, 0).reshape(9 * channels, out_channels)
            taps = self.rows.new_empty(min(grown.size, _GATHER_CELLS) * 9, channels)
            for start in range(0, grown.size, _GATHER_CELLS):
                end = min(start + _GATHER_CELLS, grown.size)
                gathered = torch.index_select(self.rows, 0, index[9 * start:9 * end], out=taps[:9 * (end - start)])
                torch.addmm(bias, gathered.view(end - start, -1), weight_rows, out=rows[start:end])
        torch.addmv(bias, weight.sum((2, 3)), self.rows[-2], out=rows[-2])  # the background's image
        rows[-1] = 0
        return SparseMap(rows.relu_(), torch.from_numpy(grown).to(self.cells.device), self.shape)

    def convolved(self, weight: torch.Tensor):
        """conv2d(map, weight, padding=1) for a (C', C, 3, 3) weight, differentiable (for
        training): a `SparseMap`, or the dense (B, C', H, W) map once the support is too
        large, as `conv3x3_relu`."""
        batch, height, width = self.shape
        grown = grown_cells(self.cells.cpu().numpy(), self.shape)
        if grown.size > SPARSE_SUPPORT_MAX * batch * height * width:
            return F.conv2d(self.tensor.contiguous(), weight, None, 1, 1)
        index = torch.from_numpy(self.neighbourhoods(grown).reshape(-1)).to(self.rows.device)
        channels, out_channels = self.rows.shape[1], weight.shape[0]
        gathered = self.rows.index_select(0, index).view(grown.size, 9 * channels)
        support = gathered @ weight.permute(2, 3, 1, 0).reshape(9 * channels, out_channels)
        background = weight.sum((2, 3)) @ self.rows[-2]
        rows = torch.cat([support, background[None], support.new_zeros(1, out_channels)])
        return SparseMap(rows, torch.from_numpy(grown).to(self.cells.device), self.shape)

    def normalised_relu(self, norm: nn.BatchNorm2d) -> "SparseMap":
        """relu(norm(map)) in training: the batch statistics of every cell of the maps,
        the background's row counted once per background cell
        (`distributed.batch_norm_rows`); the zero row stays zero."""
        batch, height, width = self.shape
        counts = self.rows.new_ones(self.rows.shape[0] - 1)
        counts[-1] = batch * height * width - self.cells.numel()
        rows = batch_norm_rows(norm, self.rows[:-1], counts).relu()
        return SparseMap(torch.cat([rows, rows.new_zeros(1, rows.shape[1])]), self.cells, self.shape)

    def neighbourhoods(self, cells: np.ndarray) -> np.ndarray:
        """(N, 9) the rows the 3x3 neighbourhoods of the flat `cells` read, in the
        kernel's order."""
        _, height, width = self.shape
        return self.bordered_slots().reshape(-1)[_bordered(cells, height, width)[:, None] + _taps(width)]


def grown_cells(cells: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The flat cells (ascending) of maps `shape` (B, H, W) where a 3x3 convolution of a
    map can differ from the background's image, given the flat `cells` where the map can:
    those with such a cell among their neighbours, and the border ring, where the zero
    padding enters."""
    batch, height, width = shape
    marked = np.zeros((batch, height + 2, width + 2), dtype=bool)
    marked.reshape(-1)[(_bordered(cells, height, width)[:, None] + _taps(width)).reshape(-1)] = True
    inside = marked[:, 1:-1, 1:-1]  # a view: the ring below is marked in `marked`
    inside[:, [0, -1]] = True
    inside[:, :, [0, -1]] = True
    return np.flatnonzero(inside)


def _bordered(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flat cells of (B, height, width) maps -> the same cells' flat indices in the maps
    with a one-cell border, (B, height + 2, width + 2)."""
    frame, rest = np.divmod(cells, height * width)
    y, x = np.divmod(rest, width)
    return (frame * (height + 2) + y + 1) * (width + 2) + x + 1


def _taps(width: int) -> np.ndarray:
    """(9,) offsets of a cell's 3x3 neighbours in bordered maps of `width` (+ 2) columns,
    in the kernel's order (dy, then dx, from -1 to 1)."""
    return (np.arange(-1, 2)[:, None] * (width + 2) + np.arange(-1, 2)).reshape(-1)


class BEVBackbone(nn.Module):
    """Space-to-depth to `stride` (a stride x stride convolution), then 3x3 convolutions
    that fill the holes between tokens.

    The strided convolution reads only the tokens: each output cell is the sum over the
    tokens inside it of the kernel tap at the token's position times its feature, which
    is what the convolution computes on the zero-filled pillar grid without building that
    grid (at 0.32 m, 5 % occupied: the dense convolution and its backward pass cost more
    than the rest of a training step)."""

    def __init__(self, in_channels: int, channels: int, num_convs: int, stride: int):
        super().__init__()
        self.stride = stride
        layers = [nn.Conv2d(in_channels, channels, stride, stride=stride, bias=False),
                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for _ in range(num_convs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def downsample(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int,
                   grid: tuple[int, int], weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, sparse: bool = False):
        """Tokens (T, C) at (frame, iy, ix) of a (ny, nx) grid -> the strided convolution's
        output (B, channels, ny / stride, nx / stride), channels-last in memory; with the
        convolution's weight (channels, C, s, s) and bias (channels,) if given instead of
        its own (no bias). sparse: as a `SparseMap` whose support is the occupied cells
        (the background row: the bias, or zero)."""
        s = self.stride
        weight = self.net[0].weight if weight is None else weight
        channels = weight.shape[0]
        ny, nx = grid[0] // s, grid[1] // s
        # A token meets one kernel tap, the one at its place in its s x s cell: the tokens
        # grouped by tap, one product per tap (not every tap for every token), then put
        # back in token order.
        tap = (coords[:, 1] % s) * s + coords[:, 2] % s
        order = torch.argsort(tap, stable=True)
        taps = weight.permute(2, 3, 1, 0).reshape(s * s, features.shape[1], channels)
        groups = features.index_select(0, order).split(torch.bincount(tap, minlength=s * s).tolist())
        contribution = torch.cat([group @ taps[k] for k, group in enumerate(groups)])
        back = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        contribution = contribution.index_select(0, back)
        cell = (coords[:, 0] * ny + coords[:, 1] // s) * nx + coords[:, 2] // s
        if sparse:
            cells, cell = torch.unique(cell, return_inverse=True)
        num_cells = cells.numel() + 2 if sparse else batch_size * ny * nx
        if bias is None:
            canvas = contribution.new_zeros(num_cells, channels)
        else:  # every cell, empty or not, starts at the bias
            canvas = bias.to(contribution.dtype).expand(num_cells, channels).clone()
        canvas.index_add_(0, cell, contribution)
        if sparse:  # the occupied cells, the background (the bias), the zero row
            canvas[-1] = 0
            return SparseMap(canvas, cells, (batch_size, ny, nx))
        return canvas.view(batch_size, ny, nx, channels).permute(0, 3, 1, 2)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int,
                grid: tuple[int, int], memory_format=torch.channels_last, sparse: bool = False):
        """Tokens (T, C) at (frame, iy, ix) -> (B, channels, ny / stride, nx / stride).
        At inference each convolution and its batch norm run as one (`folded`). With
        `sparse`, in training or at inference, on a `SparseMap`, which is returned (or the
        dense map, where the support grew too large: `SparseMap.convolved`)."""
        if self.training:
            bev = self.downsample(features, coords, batch_size, grid, sparse=sparse)
            if not sparse:
                return self.net[1:](bev.contiguous(memory_format=memory_format))
            bev = bev.normalised_relu(self.net[1])
        else:
            bev = self.downsample(features, coords, batch_size, grid, *folded(self.net[0], self.net[1]),
                                  sparse=sparse)
            if sparse:
                bev.rows.relu_()
            else:
                bev = bev.contiguous(memory_format=memory_format).relu_()
        for i in range(3, len(self.net), 3):
            bev = conv_norm_relu(self.net[i:i + 3], bev)
        return bev


class CenterHead(nn.Module):
    """A shared 3x3 convolution, then 1x1 convolutions for the heatmap and the regression
    (lean on purpose: on a CPU every dense 3x3 convolution costs as much as the encoder)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(channels, NUM_CLASSES, 1)
        self.regression = nn.Conv2d(channels, REGRESSION_DIM, 1)
        # Start with a low foreground probability (focal-loss practice).
        nn.init.constant_(self.heatmap.bias, -2.19)

    def forward(self, bev) -> tuple[torch.Tensor, torch.Tensor]:
        """bev: (B, C, H, W) or a `SparseMap` -> heatmap logits (B, 3, H, W)
        and regression (B, 9, H, W)."""
        shared = conv_norm_relu(self.shared, bev)
        # The 1x1 convolutions as one matrix product in the map's memory layout (the
        # convolution backward pass on contiguous maps zero-fills a map per call).
        weight = torch.cat([self.heatmap.weight.flatten(1), self.regression.weight.flatten(1)])
        bias = torch.cat([self.heatmap.bias, self.regression.bias])
        if isinstance(shared, SparseMap):  # on the support and the background row, then spread
            maps = torch.addmm(bias, shared.rows[:-1], weight.t()).index_select(0, shared.slots())
            maps = maps.view(*shared.shape, -1).permute(0, 3, 1, 2)
        elif shared.is_contiguous():
            b, c, h, w = shared.shape
            maps = (torch.matmul(weight, shared.view(b, c, h * w)) + bias[:, None]).view(b, -1, h, w)
        else:  # channels-last
            maps = torch.addmm(bias, shared.permute(0, 2, 3, 1).flatten(0, 2), weight.t())
            maps = maps.view(*shared.permute(0, 2, 3, 1).shape[:3], -1).permute(0, 3, 1, 2)
        return maps[:, :NUM_CLASSES], maps[:, NUM_CLASSES:]


# ---------------------------------------------------------------------------- targets

def gaussian_radius(length_cells: float, width_cells: float, min_overlap: float) -> float:
    """Largest centre error (in cells) keeping IoU >= min_overlap for a box of this BEV
    size, the CornerNet/CenterPoint bound (smallest of its three cases)."""
    h, w = length_cells, width_cells
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def build_targets(boxes: list[np.ndarray], labels: list[np.ndarray], grid: tuple[int, int],
                  range_min: tuple[float, float], cell_size: float, min_radius: int,
                  min_overlap: float) -> HeadTargets:
    """Heatmap and regression targets for a batch.

    boxes[i]: (M, 7) boxes of frame i that should be detected (ignored boxes removed).
    labels[i]: (M,) class indices. grid: (H, W) cells of the head's output. The
    regression is supervised at each object's centre cell (the nearer centre's object
    where two share a cell).
    """
    height, width = grid
    heatmap = np.zeros((len(boxes), NUM_CLASSES, height, width), dtype=np.float32)
    claims: dict[tuple[int, int], tuple] = {}  # (frame, cell) -> (distance, target, box)
    for frame, (frame_boxes, frame_labels) in enumerate(zip(boxes, labels)):
        for box, label in zip(frame_boxes, frame_labels):
            cx = (box[0] - range_min[0]) / cell_size
            cy = (box[1] - range_min[1]) / cell_size
            col, row = int(math.floor(cx)), int(math.floor(cy))
            if not (0 <= col < width and 0 <= row < height):
                continue
            radius = gaussian_radius(box[3] / cell_size, box[4] / cell_size, min_overlap)
            radius = max(min_radius, int(radius))
            _draw_gaussian(heatmap[frame, int(label)], row, col, radius)
            shape = [math.log(box[3]), math.log(box[4]), math.log(box[5]), math.sin(2 * box[6]),
                     math.cos(2 * box[6]), float(math.cos(box[6] - DIRECTION_OFFSET) > 0)]
            distance = (cx - col - 0.5) ** 2 + (cy - row - 0.5) ** 2
            key = (frame, row * width + col)
            if key not in claims or distance < claims[key][0]:
                claims[key] = (distance, [cx - col, cy - row, box[2]] + shape, box[:7])
    keys = sorted(claims)
    return HeadTargets(
        torch.from_numpy(heatmap),
        torch.tensor([k[0] for k in keys], dtype=torch.long),
        torch.tensor([k[1] for k in keys], dtype=torch.long),
        torch.tensor([claims[k][1] for k in keys], dtype=torch.float32).reshape(-1, REGRESSION_DIM),
        torch.tensor(np.array([claims[k][2] for k in keys], dtype=np.float32)).reshape(-1, 7),
    )


def _draw_gaussian(channel: np.ndarray, row: int, col: int, radius: int) -> None:
    sigma = (2 * radius + 1) / 6
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    height, width = channel.shape
    top, bottom = max(0, row - radius), min(height, row + radius + 1)
    left, right = max(0, col - radius), min(width, col + radius + 1)
    patch = kernel[top - row + radius:bottom - row + radius, left - col + radius:right - col + radius]
    np.maximum(channel[top:bottom, left:right], patch, out=channel[top:bottom, left:right])


# ---------------------------------------------------------------------------- losses

def heatmap_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of peaks."""
    prob = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    negative_weight = torch.pow(1 - target, 4)
    pos_loss = torch.log(prob) * torch.pow(1 - prob, 2) * positive
    neg_loss = torch.log(1 - prob) * torch.pow(prob, 2) * negative_weight * (1 - positive)
    return -(pos_loss.sum() + neg_loss.sum()) / batch_count(positive.sum())


def _at_targets(dense: torch.Tensor, targets: HeadTargets) -> torch.Tensor:
    """(B, C, H, W) -> (N, C): the values at the targets' cells."""
    batch, channels = dense.shape[:2]
    return dense.float().permute(0, 2, 3, 1).reshape(batch, -1, channels)[targets.frame, targets.cell]


def regression_loss(regression: torch.Tensor, targets: HeadTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """At the supervised cells: L1 of the box regression (summed over its 8 values, mean
    over cells) and binary cross-entropy of the direction logit."""
    cells = batch_count(targets.cell.new_tensor(targets.cell.numel()), minimum=1e-6)  # before any return: DDP
    if targets.cell.numel() == 0:
        zero = regression.sum() * 0
        return zero, zero
    predicted = _at_targets(regression, targets)
    box = (predicted[:, :8] - targets.regression[:, :8]).abs().sum() / cells
    direction = F.binary_cross_entropy_with_logits(predicted[:, 8], targets.regression[:, 8],
                                                   reduction="sum") / cells
    return box, direction


def distillation_loss(heatmap: torch.Tensor, regression: torch.Tensor, teacher_heatmap: torch.Tensor,
                      teacher_regression: torch.Tensor, targets: HeadTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the outputs are from a teacher's on the same frames (all (B, C, H, W)):
    the Bernoulli KL divergence of every heatmap cell's class probability from the
    teacher's, summed and normalised by the number of peaks as the focal loss is; and the
    L1 distance of the regression at every cell, weighted by the teacher's highest class
    probability there, over the sum of those weights. Both are 0 when the outputs are the
    teacher's. Returns (heatmap term, regression term)."""
    logits, teacher = heatmap.float(), teacher_heatmap.float().detach()
    prob = torch.sigmoid(teacher)
    # KL(p_t || p) = BCE(logits, p_t) - BCE(teacher logits, p_t), cell by cell
    kl = (F.binary_cross_entropy_with_logits(logits, prob, reduction="none")
          - F.binary_cross_entropy_with_logits(teacher, prob, reduction="none"))
    heat = kl.sum() / batch_count(targets.heatmap.eq(1).float().sum())
    weight = prob.amax(1, keepdim=True)
    distance = (regression.float() - teacher_regression.float().detach()).abs().sum(1, keepdim=True)
    box = (weight * distance).sum() / batch_count(weight.sum(), minimum=1e-6)
    return heat, box


# ---------------------------------------------------------------------------- decoding

def boxes_at_cells(reg: torch.Tensor, cell: torch.Tensor, width: int, range_min: tuple[float, float],
                   cell_size: float) -> torch.Tensor:
    """Boxes (K, 7) from regression rows reg (K, REGRESSION_DIM) at flat cells (K,)."""
    row, col = cell // width, cell % width
    x = range_min[0] + (col.float() + reg[:, 0]) * cell_size
    y = range_min[1] + (row.float() + reg[:, 1]) * cell_size
    size = reg[:, 3:6].clamp(-5, 5).exp()
    axis = torch.atan2(reg[:, 6], reg[:, 7]) / 2
    forward = torch.cos(axis - DIRECTION_OFFSET) > 0
    yaw = torch.where(forward == (reg[:, 8] >= 0), axis, axis + math.pi)
    yaw = torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi
    return torch.stack([x, y, reg[:, 2], size[:, 0], size[:, 1], size[:, 2], yaw], dim=1)


def local_max_3x3(x: torch.Tensor) -> torch.Tensor:
    """The largest value of each 3 x 3 neighbourhood of (..., H, W) maps (outside the map:
    -inf), as `max_pool2d(x, 3, 1, 1)` computes it, from six element-wise maxima of shifted
    views (separable: rows, then columns), ~30x faster than the pooling kernel on a CPU."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=-math.inf)
    rows = torch.maximum(torch.maximum(padded[..., :width], padded[..., 1:width + 1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :height, :], rows[..., 1:height + 1, :]), rows[..., 2:, :])


def decode(heatmap_logits: torch.Tensor, regression: torch.Tensor, range_min: tuple[float, float],
           cell_size: float, score_threshold: float, max_detections: int,
           nms_iou: list[float], pre_nms: int = 500) -> list[Detections]:
    """Heatmap peaks -> boxes, with per-class rotated NMS. Deterministic."""
    heatmap = torch.sigmoid(heatmap_logits.float().contiguous())
    regression = regression.float()
    peaks = local_max_3x3(heatmap) == heatmap
    heatmap = heatmap * peaks
    batch, _, height, width = heatmap.shape
    results = []
    for frame in range(batch):
        scores, flat = heatmap[frame].reshape(-1).topk(min(pre_nms, heatmap[frame].numel()))
        labels = flat // (height * width)
        cell = flat % (height * width)
        keep = scores >= score_threshold
        scores, labels, cell = scores[keep], labels[keep], cell[keep]
        boxes = boxes_at_cells(regression[frame].reshape(REGRESSION_DIM, -1)[:, cell].T, cell, width,
                               range_min, cell_size)
        results.append(nms_per_class(Detections(boxes, scores, labels), nms_iou, max_detections))
    return results


def suppress_across_classes(detections: Detections, iou_threshold: float) -> Detections:
    """Class-agnostic rotated BEV NMS at `iou_threshold`: of two boxes of different (or the
    same) classes on the same spot, the better-scored stays (a pedestrian and a cyclist
    box on one object). Order by score kept. 1 or more: nothing is suppressed."""
    if iou_threshold >= 1 or detections.scores.numel() < 2:
        return detections
    kept = nms_bev(detections.boxes, detections.scores, iou_threshold)
    kept = kept[torch.argsort(detections.scores[kept], descending=True, stable=True)]
    return Detections(detections.boxes[kept], detections.scores[kept], detections.labels[kept])


def nms_per_class(detections: Detections, nms_iou: list[float], max_detections: int) -> Detections:
    """Rotated BEV NMS within each class (one `nms_bev` pass with the labels), then the
    best `max_detections` by score (ties: lower class, then lower index). Deterministic."""
    boxes, scores, labels = detections.boxes, detections.scores, detections.labels
    kept = nms_bev(boxes, scores, nms_iou, labels=labels)
    kept = kept[torch.argsort(labels[kept], stable=True)]
    kept = kept[torch.argsort(scores[kept], descending=True, stable=True)][:max_detections]
    return Detections(boxes[kept], scores[kept], labels[kept])
