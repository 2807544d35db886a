"""Points -> pillars -> tokens.

Every non-empty BEV pillar becomes one token. A PointNet-style pillar feature net
encodes each point with its offsets to the pillar centre and to the pillar's point
mean, and max-pools the point features of each pillar.

Input bounds (the same in training and inference, deterministic for a given input):
  * points outside `point_cloud_range` or with a NaN/inf value are dropped; intensity is
    clamped to [0, 1], the data format's range (readers normalise to it);
  * per frame at most `max_pillars` pillars (tokens) are kept: those nearest the sensor
    (ties by pillar order), so the encoder's work is bounded; a window never holds more
    than window_size**2 tokens anyway;
  * per pillar at most `max_points_per_pillar` points, and per frame at most `max_points`
    points: the densest pillars are thinned first (one cap per frame, the largest that
    fits the budget, at least 1 point per pillar), each evenly in input order.
Each count is reported on the returned `Tokens`. 0 disables a cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from haltdet import InputError
from haltdet.model.halting import select_per_frame


@dataclass
class PointBatch:
    """Points of several frames, concatenated.

    points: (P, 4) float: x, y, z, intensity in the LiDAR frame (metres).
    batch_index: (P,) int64 frame index of each point, in [0, batch_size).
    """

    points: torch.Tensor
    batch_index: torch.Tensor
    batch_size: int

    @staticmethod
    def from_list(clouds: Sequence) -> "PointBatch":
        """Batch clouds: each an (N, 4) tensor or array of real numbers (converted to
        float32); anything else is an InputError."""
        clouds = [_as_cloud(cloud, i) for i, cloud in enumerate(clouds)]
        points = torch.cat(clouds) if clouds else torch.zeros(0, 4)
        batch_index = torch.cat([torch.full((len(c),), i, dtype=torch.long)
                                 for i, c in enumerate(clouds)]) if clouds else torch.zeros(0, dtype=torch.long)
        return PointBatch(points, batch_index, len(clouds))

    def to(self, device) -> "PointBatch":
        return PointBatch(self.points.to(device), self.batch_index.to(device), self.batch_size)

    def validate(self) -> None:
        """InputError unless the shapes, dtypes and frame indices are as documented."""
        points, index = self.points, self.batch_index
        if points.ndim != 2 or points.shape[1] != 4 or not points.is_floating_point():
            raise InputError(f"points must be a float (P, 4) tensor, got {points.dtype} {tuple(points.shape)}")
        if index.shape != points.shape[:1] or index.dtype != torch.long:
            raise InputError(f"batch_index must be an int64 ({points.shape[0]},) tensor, "
                             f"got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise InputError(f"batch_index values must be in [0, {self.batch_size})")


def _as_cloud(cloud, index: int) -> torch.Tensor:
    if not isinstance(cloud, torch.Tensor):
        try:
            cloud = torch.as_tensor(np.asarray(cloud))
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"cloud {index}: not an array of numbers ({err})") from None
    if cloud.ndim != 2 or cloud.shape[1] != 4:
        raise InputError(f"cloud {index}: points must have shape (N, 4), got {tuple(cloud.shape)}")
    if cloud.dtype == torch.bool or cloud.is_complex():
        raise InputError(f"cloud {index}: points must be real numbers, got {cloud.dtype}")
    return cloud.float()


class PointIndex:
    """Points arranged to find those near boxes by binary search: the points sorted by the
    cell of a grid of square cells they fall in, by (frame, row, column) and in input order
    within a cell, beside their sorted cell keys. The points within `radius` of a centre
    are then, for each row the square around it spans, one run of keys from its first
    column to its last: index arithmetic and binary search, no loop over boxes. The
    pillar net makes one from its own sort of the points into pillars (`PillarFeatureNet`,
    kept on `Tokens`); `of_points` makes one for any points.

    keys: (N,) int64 ascending, (frame * rows + row) * cols + column of each indexed point;
    point_ids: (N,) the indexed points' rows in the points, in the same order;
    origin: the (x, y) corner of cell (0, 0); cell: the cells' side, metres.
    """

    def __init__(self, keys: torch.Tensor, point_ids: torch.Tensor, origin: tuple[float, float],
                 cell: float, rows: int, cols: int):
        self.keys, self.point_ids = keys, point_ids
        self.origin, self.cell, self.rows, self.cols = origin, cell, rows, cols

    @classmethod
    def of_points(cls, points: torch.Tensor, batch_index: torch.Tensor, cell: float = 1.0) -> "PointIndex":
        """The index of the finite points (P, 4) of frames `batch_index` (P,), on cells of
        `cell` metres from the points' least x and y."""
        finite = torch.nonzero(torch.isfinite(points).all(1)).flatten()  # NaN would compare false
        xy = points.detach().index_select(0, finite)[:, :2]
        origin = xy.amin(0) if finite.numel() else xy.new_zeros(2)
        cells = torch.floor((xy - origin) / cell).long()
        cols, rows = (cells.amax(0) + 1).tolist() if finite.numel() else (1, 1)
        keys, order = torch.sort((batch_index.index_select(0, finite) * rows + cells[:, 1]) * cols + cells[:, 0],
                                 stable=True)
        return cls(keys, finite.index_select(0, order), (float(origin[0]), float(origin[1])), cell, rows, cols)

    def candidates(self, frame: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (box, point) of boxes in frames `frame` (K,) with centres (K, 2) and the
        indexed points of their frame in the cells that the square of half side `radius`
        (K,) around each centre touches: every point within `radius` of its centre, and
        others near it (those the caller's exact test removes)."""
        device = centres.device
        origin = centres.new_tensor(self.origin)
        low = torch.floor((centres - radius[:, None] - origin) / self.cell).long()
        high = torch.floor((centres + radius[:, None] - origin) / self.cell).long()
        first_col, last_col = low[:, 0].clamp(0, self.cols - 1), high[:, 0].clamp(0, self.cols - 1)
        first_row, last_row = low[:, 1].clamp(min=0), high[:, 1].clamp(max=self.rows - 1)
        num_rows = (last_row - first_row + 1).clamp(min=0)
        box_of_run = torch.repeat_interleave(torch.arange(centres.shape[0], device=device), num_rows)
        row = first_row[box_of_run] + torch.arange(box_of_run.numel(), device=device) \
            - (torch.cumsum(num_rows, 0) - num_rows)[box_of_run]
        base = (frame[box_of_run] * self.rows + row) * self.cols
        start = torch.searchsorted(self.keys, base + first_col[box_of_run])
        end = torch.searchsorted(self.keys, base + last_col[box_of_run], right=True)
        size = end - start
        run = torch.repeat_interleave(torch.arange(size.numel(), device=device), size)
        rank = torch.arange(run.numel(), device=device) - (torch.cumsum(size, 0) - size)[run]
        return box_of_run[run], self.point_ids[start[run] + rank]


@dataclass
class Tokens:
    """Sparse pillar tokens.

    features: (T, C) float.
    coords: (T, 3) int64: frame index, pillar row iy, pillar column ix.
      Pillar (iy, ix) covers x in [x_min + ix * s, x_min + (ix + 1) * s), same for y.
    Tokens are sorted by (frame, iy, ix).
    Counts over the batch: points_used entered the features; points_dropped were outside
    the range or not finite; points_capped were removed by the caps, pillars_capped
    non-empty pillars by max_pillars.
    points: the points that entered the features, a PointBatch (the second stage reads
    them: bounded by the same caps), or None.
    point_index: those points' `PointIndex` on the pillar grid, or None.
    """

    features: torch.Tensor
    coords: torch.Tensor
    batch_size: int
    points_used: int = 0
    points_dropped: int = 0
    points_capped: int = 0
    pillars_capped: int = 0
    points: PointBatch | None = None
    point_index: PointIndex | None = None


class PillarFeatureNet(nn.Module):
    """Per-point MLP on (x, y, z, intensity, offsets to pillar mean, offsets to pillar
    centre), max-pooled per pillar. Each layer but the last re-appends the pillar's pooled
    feature to its points (PointPillars-style), so points see their pillar."""

    def __init__(self, point_cloud_range: list[float], pillar_size: float,
                 channels: list[int], max_pillars: int = 0, max_points: int = 0,
                 max_points_per_pillar: int = 0):
        super().__init__()
        self.point_cloud_range = list(point_cloud_range)
        self.max_pillars, self.max_points = max_pillars, max_points
        self.max_points_per_pillar = max_points_per_pillar
        self.register_buffer("range_min", torch.tensor(point_cloud_range[:3]), persistent=False)
        self.register_buffer("range_max", torch.tensor(point_cloud_range[3:]), persistent=False)
        self.pillar_size = pillar_size
        self.grid_x = round((point_cloud_range[3] - point_cloud_range[0]) / pillar_size)
        self.grid_y = round((point_cloud_range[4] - point_cloud_range[1]) / pillar_size)
        in_dim = 4 + 3 + 2
        layers = []
        for i, out_dim in enumerate(channels):
            last = i == len(channels) - 1
            hidden = out_dim if last else out_dim // 2
            layers.append(nn.Sequential(nn.Linear(in_dim, hidden, bias=False),
                                        nn.LayerNorm(hidden), nn.ReLU(inplace=True)))
            in_dim = hidden * 2
        self.layers = nn.ModuleList(layers)

    def _pillars(self, points: torch.Tensor, batch_index: torch.Tensor):
        """(ix, iy, sorted unique pillar keys, pillar of each point, the points' index on
        the pillar grid) of in-range points."""
        cell = ((points[:, :2] - self.range_min[:2]) / self.pillar_size).floor().long()
        ix = cell[:, 0].clamp_(0, self.grid_x - 1)
        iy = cell[:, 1].clamp_(0, self.grid_y - 1)
        key = (batch_index * self.grid_y + iy) * self.grid_x + ix
        # Sorted unique keys give tokens ordered by (frame, iy, ix): deterministic. The sort
        # (stable) is kept as the points' index for the second stage.
        sorted_keys, order = torch.sort(key, stable=True)
        unique_keys, pillar_of_sorted = torch.unique_consecutive(sorted_keys, return_inverse=True)
        pillar_of_point = torch.empty_like(order).index_copy_(0, order, pillar_of_sorted)
        origin = (float(self.point_cloud_range[0]), float(self.point_cloud_range[1]))
        index = PointIndex(sorted_keys, order, origin, self.pillar_size, self.grid_y, self.grid_x)
        return ix, iy, unique_keys, pillar_of_point, index

    def _kept_pillars(self, unique_keys: torch.Tensor) -> torch.Tensor | None:
        """Bool per pillar under max_pillars (the nearest to the sensor), None if no cap binds."""
        frame = unique_keys // (self.grid_y * self.grid_x)
        if not self.max_pillars or not frame.numel() or int(torch.bincount(frame).max()) <= self.max_pillars:
            return None
        coords = torch.stack([frame, (unique_keys // self.grid_x) % self.grid_y, unique_keys % self.grid_x], 1)
        distance = pillar_centres(coords, self.point_cloud_range, self.pillar_size).pow(2).sum(1)
        everyone = torch.ones_like(frame, dtype=torch.bool)
        return select_per_frame(-distance, frame, everyone, -float("inf"), None, self.max_pillars)

    def _kept_points(self, unique_keys: torch.Tensor, pillar_of_point: torch.Tensor) -> torch.Tensor | None:
        """Bool per point under max_points_per_pillar and max_points, None if no cap binds."""
        counts = torch.bincount(pillar_of_point, minlength=unique_keys.numel())
        cap = counts.clone()
        if self.max_points_per_pillar:
            cap.clamp_(max=self.max_points_per_pillar)
        frame = unique_keys // (self.grid_y * self.grid_x)
        if self.max_points and counts.numel() and int(torch.bincount(frame, counts).max()) > self.max_points:
            cap = torch.minimum(cap, _water_level(counts, frame, self.max_points))
        if torch.equal(cap, counts):
            return None
        # Keep cap of the pillar's n points, evenly spread in input order: the points at
        # which floor(rank * cap / n) steps.
        rank = _rank_in_group(pillar_of_point, counts)
        n, c = counts[pillar_of_point], cap[pillar_of_point]
        return (rank * c) // n != ((rank - 1) * c) // n

    def forward(self, batch: PointBatch) -> Tokens:
        batch.validate()
        points, batch_index = batch.points.float(), batch.batch_index
        total = points.shape[0]
        valid = ((points[:, :3] >= self.range_min) & (points[:, :3] < self.range_max)).all(dim=1)
        valid &= points[:, 3].isfinite()  # coordinates: NaN fails the range test
        points, batch_index = points[valid], batch_index[valid]
        in_range = points.shape[0]
        ix, iy, unique_keys, pillar_of_point, index = self._pillars(points, batch_index)
        pillars = unique_keys.numel()
        kept = self._kept_pillars(unique_keys)
        if kept is not None:
            keep = kept[pillar_of_point]
            points, batch_index = points[keep], batch_index[keep]
            ix, iy, unique_keys, pillar_of_point, index = self._pillars(points, batch_index)
        keep = self._kept_points(unique_keys, pillar_of_point)
        if keep is not None:  # every pillar keeps at least one point: the pillars stay
            points, ix, iy, pillar_of_point = points[keep], ix[keep], iy[keep], pillar_of_point[keep]
            batch_index = batch_index[keep]
            stays = keep.index_select(0, index.point_ids)  # the index's kept points, renumbered
            index.keys, index.point_ids = index.keys[stays], (torch.cumsum(keep, 0) - 1)[index.point_ids[stays]]
        xyz = points[:, :3]
        num_pillars = unique_keys.numel()

        counts = torch.zeros(num_pillars, device=xyz.device, dtype=xyz.dtype)
        counts.index_add_(0, pillar_of_point, torch.ones_like(xyz[:, 0]))
        sums = torch.zeros(num_pillars, 3, device=xyz.device, dtype=xyz.dtype)
        sums.index_add_(0, pillar_of_point, xyz)
        mean = sums / counts[:, None]
        centre_x = self.range_min[0] + (ix.to(xyz.dtype) + 0.5) * self.pillar_size
        centre_y = self.range_min[1] + (iy.to(xyz.dtype) + 0.5) * self.pillar_size
        features = torch.cat([
            xyz,
            points[:, 3:4].clamp(0, 1),  # the format's intensity range: no overflow downstream
            xyz - mean.index_select(0, pillar_of_point),
            (xyz[:, 0] - centre_x)[:, None],
            (xyz[:, 1] - centre_y)[:, None],
        ], dim=1)

        pooled = self.pool(features, pillar_of_point, num_pillars)

        coords = torch.stack([
            unique_keys // (self.grid_y * self.grid_x),
            (unique_keys // self.grid_x) % self.grid_y,
            unique_keys % self.grid_x,
        ], dim=1)
        return Tokens(pooled, coords, batch.batch_size, points_used=points.shape[0],
                      points_dropped=total - in_range, points_capped=in_range - points.shape[0],
                      pillars_capped=pillars - num_pillars,
                      points=PointBatch(points, batch_index, batch.batch_size), point_index=index)

    def pool(self, features: torch.Tensor, pillar_of_point: torch.Tensor, num_pillars: int) -> torch.Tensor:
        """Point features (P, 9) -> pillar features (num_pillars, C): each layer, then a max
        over each pillar's points. After the first layer a point's input is its feature
        beside its pillar's pooled one: that half of the layer's product is made once per
        pillar and gathered (the same values as the product of the concatenation, to float
        rounding; half the work and no concatenated copy). index_select, not pooled[...]:
        the gradient of an indexed gather sums the points of a pillar with atomic adds on
        several threads (order varies run to run)."""
        pooled = None
        for linear, norm, relu in self.layers:
            weight = linear.weight
            if pooled is None:
                mixed = features @ weight.t()
            else:
                split = features.shape[1]
                mixed = (pooled @ weight[:, split:].t()).index_select(0, pillar_of_point)
                mixed.addmm_(features, weight[:, :split].t())  # in place: no copy of the gathered rows
            features = relu(norm(mixed))
            pooled = _scatter_max(features, pillar_of_point, num_pillars)
        return pooled


def pillar_centres(coords: torch.Tensor, point_cloud_range: list[float], pillar_size: float) -> torch.Tensor:
    """(T, 3) (frame, iy, ix) pillar coordinates -> (T, 2) float (x, y) pillar centres, metres."""
    return torch.stack([point_cloud_range[0] + (coords[:, 2].float() + 0.5) * pillar_size,
                        point_cloud_range[1] + (coords[:, 1].float() + 0.5) * pillar_size], dim=1)


def _scatter_max(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Per-group max of rows of `values` (groups given by `index`). ReLU outputs are >= 0,
    so initialising with zeros is exact."""
    return _ScatterMax.apply(values, index, size)


class _ScatterMax(torch.autograd.Function):
    """`scatter_reduce(..., "amax", include_self=True)` into zeros with the same gradient
    (shared evenly among the tied maxima, the zero start counting as one), computed with
    row gathers: autograd's generic backward for it took a quarter of a training step."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        out = values.new_zeros(size, values.shape[1])
        out.scatter_reduce_(0, index[:, None].expand_as(values), values, reduce="amax", include_self=True)
        ctx.save_for_backward(values, index, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, index, out = ctx.saved_tensors
        winner = values == out.index_select(0, index)
        ties = (out == 0).to(out.dtype).index_add_(0, index, winner.to(out.dtype))
        return torch.where(winner, (grad / ties).index_select(0, index), 0.0), None, None


def _rank_in_group(group: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Rank of each element among the elements of its group, in index order (groups are
    0..G-1 with `sizes` elements each)."""
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=group.device) - starts[group[order]]
    return rank


def _water_level(counts: torch.Tensor, frame: torch.Tensor, budget: int) -> torch.Tensor:
    """Per pillar, its frame's largest cap c with sum over the frame's pillars of
    min(count, c) <= budget (at least 1; effectively no cap when the frame fits)."""
    order = torch.argsort(counts, stable=True)
    order = order[torch.argsort(frame[order], stable=True)]  # by frame, then by count
    n, f = counts[order], frame[order]
    size = torch.bincount(f)
    end = torch.cumsum(size, 0)
    position = torch.arange(n.numel(), device=n.device)
    before = torch.cumsum(n, 0) - n
    before = before - before[(end - size)[f]]  # counts of the frame's smaller pillars
    level = (budget - before) // (end[f] - position)  # the cap if this pillar is the first capped
    first = torch.full_like(size, n.numel()).scatter_reduce(
        0, f, torch.where(level < n, position, n.numel()), "amin")
    frame_cap = torch.where(first < n.numel(), level[first.clamp(max=n.numel() - 1)], n.max())
    return frame_cap[frame].clamp(min=1)
