"""The detector: points -> pillars -> tokens -> window-attention encoder -> BEV -> head -> boxes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from haltdet.config import ModelConfig
from haltdet.model.encoder import SparseWindowEncoder
from haltdet.model.head import (BEVBackbone, CenterHead, Detections, HeadTargets, build_targets,
                                decode, heatmap_focal_loss, regression_loss, scatter_to_bev)
from haltdet.model.pillars import PillarFeatureNet, PointBatch, Tokens


@dataclass
class DetectorOutput:
    """Raw outputs of a forward pass.

    heatmap: (B, 3, H, W) class logits; regression: (B, 8, H, W);
    tokens: the encoder's output tokens (features after the last layer).
    """

    heatmap: torch.Tensor
    regression: torch.Tensor
    tokens: Tokens


class Detector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.grid = config.grid_size()
        self.pillar_net = PillarFeatureNet(config.point_cloud_range, config.pillar_size,
                                           config.pfn_channels)
        self.encoder = SparseWindowEncoder(config.d_model, config.num_heads, config.ffn_dim,
                                           config.num_layers, config.window_size, config.dropout)
        self.bev = BEVBackbone(config.d_model, config.bev_channels, config.bev_convs,
                               config.bev_stride)
        self.head = CenterHead(config.bev_channels, config.head_channels)
        # CPU convolutions (oneDNN) run about twice as fast on channels-last tensors.
        self.bev.to(memory_format=torch.channels_last)
        self.head.to(memory_format=torch.channels_last)

    @property
    def cell_size(self) -> float:
        return self.config.pillar_size * self.config.bev_stride

    @property
    def head_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.config.bev_stride, self.grid[1] // self.config.bev_stride

    @property
    def range_min(self) -> tuple[float, float]:
        r = self.config.point_cloud_range
        return r[0], r[1]

    def forward(self, batch: PointBatch) -> DetectorOutput:
        tokens = self.pillar_net(batch)
        features = self.encoder(tokens.features, tokens.coords)
        encoded = Tokens(features, tokens.coords, tokens.batch_size)
        bev = scatter_to_bev(features, tokens.coords, batch.batch_size, self.grid)
        heatmap, regression = self.head(self.bev(bev))
        return DetectorOutput(heatmap, regression, encoded)

    def targets(self, boxes: list[np.ndarray], labels: list[np.ndarray]) -> HeadTargets:
        """Targets for frames' boxes (ignored boxes already removed)."""
        return build_targets(boxes, labels, self.head_grid, self.range_min, self.cell_size,
                             self.config.min_gaussian_radius, self.config.gaussian_overlap)

    def loss(self, output: DetectorOutput, targets: HeadTargets, heatmap_weight: float = 1.0,
             regression_weight: float = 0.25) -> dict[str, torch.Tensor]:
        heatmap = heatmap_focal_loss(output.heatmap, targets.heatmap)
        regression = regression_loss(output.regression, targets)
        total = heatmap_weight * heatmap + regression_weight * regression
        return {"loss": total, "heatmap": heatmap.detach(), "regression": regression.detach()}

    def decode(self, output: DetectorOutput) -> list[Detections]:
        c = self.config
        return decode(output.heatmap, output.regression, self.range_min, self.cell_size,
                      c.score_threshold, c.max_detections, c.nms_iou)

    @torch.no_grad()
    def detect(self, batch: PointBatch) -> list[Detections]:
        return self.decode(self.forward(batch))
