"""Points -> pillars -> tokens.

Every non-empty BEV pillar becomes one token. A PointNet-style pillar feature net
encodes each point with its offsets to the pillar centre and to the pillar's point
mean, and max-pools the point features of each pillar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
    def from_list(clouds: list[torch.Tensor]) -> "PointBatch":
        points = torch.cat(clouds) if clouds else torch.zeros(0, 4)
        batch_index = torch.cat([torch.full((len(c),), i, dtype=torch.long)
                                 for i, c in enumerate(clouds)]) if clouds else torch.zeros(0, dtype=torch.long)
        return PointBatch(points, batch_index, len(clouds))

    def to(self, device) -> "PointBatch":
        return PointBatch(self.points.to(device), self.batch_index.to(device), self.batch_size)


@dataclass
class Tokens:
    """Sparse pillar tokens.

    features: (T, C) float.
    coords: (T, 3) int64: frame index, pillar row iy, pillar column ix.
      Pillar (iy, ix) covers x in [x_min + ix * s, x_min + (ix + 1) * s), same for y.
    Tokens are sorted by (frame, iy, ix).
    """

    features: torch.Tensor
    coords: torch.Tensor
    batch_size: int


class PillarFeatureNet(nn.Module):
    """Per-point MLP on (x, y, z, intensity, offsets to pillar mean, offsets to pillar
    centre), max-pooled per pillar. Each layer but the last re-appends the pillar's pooled
    feature to its points (PointPillars-style), so points see their pillar."""

    def __init__(self, point_cloud_range: list[float], pillar_size: float,
                 channels: list[int]):
        super().__init__()
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

    def forward(self, batch: PointBatch) -> Tokens:
        points, batch_index = batch.points, batch.batch_index
        xyz = points[:, :3]
        in_range = ((xyz >= self.range_min) & (xyz < self.range_max)).all(dim=1)
        points, batch_index = points[in_range], batch_index[in_range]
        xyz = points[:, :3]

        cell = ((xyz[:, :2] - self.range_min[:2]) / self.pillar_size).floor().long()
        ix = cell[:, 0].clamp_(0, self.grid_x - 1)
        iy = cell[:, 1].clamp_(0, self.grid_y - 1)
        key = (batch_index * self.grid_y + iy) * self.grid_x + ix
        # Sorted unique keys give tokens ordered by (frame, iy, ix): deterministic.
        unique_keys, pillar_of_point = torch.unique(key, sorted=True, return_inverse=True)
        num_pillars = unique_keys.numel()

        counts = torch.zeros(num_pillars, device=xyz.device, dtype=xyz.dtype)
        counts.index_add_(0, pillar_of_point, torch.ones_like(xyz[:, 0]))
        sums = torch.zeros(num_pillars, 3, device=xyz.device, dtype=xyz.dtype)
        sums.index_add_(0, pillar_of_point, xyz)
        mean = sums / counts[:, None]
        centre_x = self.range_min[0] + (ix.to(xyz.dtype) + 0.5) * self.pillar_size
        centre_y = self.range_min[1] + (iy.to(xyz.dtype) + 0.5) * self.pillar_size
        features = torch.cat([
            points[:, :4],
            xyz - mean[pillar_of_point],
            (xyz[:, 0] - centre_x)[:, None],
            (xyz[:, 1] - centre_y)[:, None],
        ], dim=1)

        for i, layer in enumerate(self.layers):
            point_features = layer(features)
            pooled = _scatter_max(point_features, pillar_of_point, num_pillars)
            if i < len(self.layers) - 1:
                features = torch.cat([point_features, pooled[pillar_of_point]], dim=1)

        coords = torch.stack([
            unique_keys // (self.grid_y * self.grid_x),
            (unique_keys // self.grid_x) % self.grid_y,
            unique_keys % self.grid_x,
        ], dim=1)
        return Tokens(pooled, coords, batch.batch_size)


def pillar_centres(coords: torch.Tensor, point_cloud_range: list[float], pillar_size: float) -> torch.Tensor:
    """(T, 3) (frame, iy, ix) pillar coordinates -> (T, 2) float (x, y) pillar centres, metres."""
    return torch.stack([point_cloud_range[0] + (coords[:, 2].float() + 0.5) * pillar_size,
                        point_cloud_range[1] + (coords[:, 1].float() + 0.5) * pillar_size], dim=1)


def _scatter_max(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Per-group max of rows of `values` (groups given by `index`). ReLU outputs are >= 0,
    so initialising with zeros is exact."""
    out = torch.zeros(size, values.shape[1], device=values.device, dtype=values.dtype)
    return out.scatter_reduce(0, index[:, None].expand_as(values), values, reduce="amax",
                              include_self=True)
