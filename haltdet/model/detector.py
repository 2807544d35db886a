"""The detector: points -> pillars -> tokens -> window-attention encoder -> BEV -> head -> boxes."""

from __future__ import annotations

import dataclasses
import functools
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from haltdet.boxes import points_in_boxes
from haltdet import ConfigError
from haltdet.config import INFERENCE_SETTINGS, ModelConfig, per_stage
from haltdet.data.frames import validate_points
from haltdet.distributed import batch_count
from haltdet.model.encoder import EncoderOutput, SparseWindowEncoder
from haltdet.model.halting import (score_supervision_loss, sparsity_loss, token_layer_share, token_statistics,
                                   token_weights)
from haltdet.model.head import (BEVBackbone, CenterHead, Detections, HeadTargets, build_targets,
                                decode, distillation_loss, heatmap_focal_loss, regression_loss,
                                suppress_across_classes)
from haltdet.model.pillars import PillarFeatureNet, PointBatch, Tokens, pillar_centres
from haltdet.model.refine import (BoxRefiner, refine_detections, refinement_loss, refinement_targets,
                                  training_proposals)

log = logging.getLogger(__name__)


@functools.cache
def cpu_runs_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 convolutions in oneDNN's fast kernels (AVX-512 and
    newer); without them (AVX2 CPUs) bfloat16 falls back to slow reference code: the dense
    stage took 1,089 ms per frame against 101 ms in float32 on a 2-core AVX2 CPU (`haltdet
    bench --checkpoint baseline --checkpoint baseline@bfloat16 --threads 1`). True when
    it cannot be told."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@dataclass
class DetectorOutput:
    """Raw outputs of a forward pass.

    heatmap: (B, 3, H, W) class logits; regression: (B, 9, H, W);
    tokens: the pillar tokens entering the encoder (coords give each token's pillar);
    encoded: the encoder's output (features, layer at which each token halted, scores).
    The second stage (model.refine) reads `tokens.points`: the points the pillar net kept
    (in range, finite, within the input caps).
    """

    heatmap: torch.Tensor
    regression: torch.Tensor
    tokens: Tokens
    encoded: EncoderOutput | None = None


class Detector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.grid = config.grid_size()
        self._slow_bfloat16_said = False  # warned once that this CPU runs bfloat16 slowly
        self.pillar_net = PillarFeatureNet(config.point_cloud_range, config.pillar_size,
                                           config.pfn_channels, config.max_pillars, config.max_points,
                                           config.max_points_per_pillar)
        self.encoder = SparseWindowEncoder(config.d_model, config.num_heads, config.ffn_dim,
                                           config.num_layers, config.window_size, config.dropout,
                                           config.halting_layers, config.halting_scorer, config.halting_gradient,
                                           config.halting_secant, config.halting_rule, config.group_size)
        self.encoder.halting.attention_weight = config.halting_attention_weight
        self.second_stage = True  # False: decode scores the first stage's boxes alone
        self.data_source: str | None = None  # what it was trained on, when loaded from a checkpoint
        self.configure()
        # Embedding of the stage at which a token halted (last row: never halted).
        self.stage_embedding = (nn.Embedding(len(config.halting_layers) + 1, config.d_model)
                                if config.halt_stage_embedding and config.halting_layers else None)
        self.bev = BEVBackbone(config.d_model, config.bev_channels, config.bev_convs,
                               config.bev_stride)
        self.head = CenterHead(config.bev_channels, config.head_channels)
        self.refiner = (BoxRefiner(config.refine_channels, config.refine_context, config.refine_points)
                        if config.refine else None)
        self.train()

    def train(self, mode: bool = True) -> "Detector":
        """Also lays out the dense stage for the mode: CPU convolutions (oneDNN) run forward
        fast on channels-last tensors, but their backward pass much slower than on
        contiguous ones (`python scripts/conv_backward_layout.py` measures both)."""
        super().train(mode)
        memory_format = torch.contiguous_format if mode else torch.channels_last
        self.bev.to(memory_format=memory_format)
        self.head.to(memory_format=memory_format)
        return self

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

    @property
    def halting(self) -> bool:
        return bool(self.config.halting_layers)

    def configure(self, second_stage: bool | None = None, **settings) -> None:
        """Change inference settings without retraining, the one way to do it: `settings`
        are ModelConfig keys of INFERENCE_SETTINGS (None: unchanged; halting values one, or
        one per stage), `second_stage=False` decodes the first stage's boxes alone.
        `self.config` is updated with them; an invalid value is a ConfigError naming it."""
        unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
        if unknown:
            raise ConfigError(f"not inference settings: {', '.join(unknown)} (they are {', '.join(INFERENCE_SETTINGS)})")
        changes = {key: value for key, value in settings.items() if value is not None}
        stages = len(self.config.halting_layers)
        if not stages and any(key.startswith("halting_") for key in changes):
            raise ConfigError("halting settings need a model with halting stages; this one has none")
        if second_stage and self.refiner is None:
            raise ConfigError("the model has no second stage (model.refine)")
        for key in ("halting_threshold", "halting_keep_ratio"):
            if key in changes:
                changes[key] = per_stage(changes[key], stages)
        config = dataclasses.replace(self.config, **changes)
        config.validate()
        self.config = config
        halting = self.encoder.halting
        halting.thresholds = config.stage_thresholds()
        halting.keep_ratios = per_stage(config.halting_keep_ratio, stages) or None
        halting.max_tokens = config.halting_max_tokens
        halting.dilation = config.halting_dilation
        if second_stage is not None:
            self.second_stage = second_stage

    def set_halting(self, thresholds: list[float] | None = None, keep_ratios: list[float] | None = None,
                    max_tokens: int | None = None) -> None:
        """`configure` for the halting knobs (per stage): thresholds, keep ratios, cap."""
        self.configure(halting_threshold=thresholds, halting_keep_ratio=keep_ratios, halting_max_tokens=max_tokens)

    def bev_features(self, encoded: EncoderOutput) -> torch.Tensor:
        """The feature each token contributes to the BEV map: with recycling every token's
        most recent feature (optionally plus its halting-stage embedding), without it only
        the tokens still active after the last layer."""
        features = encoded.features
        if self.halting:
            if self.stage_embedding is not None:
                stage = torch.bucketize(encoded.halted_at, torch.tensor(
                    self.config.halting_layers, device=features.device), right=True)
                features = features + self.stage_embedding(stage).to(features.dtype)
            if not self.config.recycling:
                features = features * encoded.gate.to(features.dtype)[:, None]
        return features

    def inference_precision(self):
        """The context the dense stage runs in at inference: autocast to bfloat16 with
        `model.inference_dtype: bfloat16` (its convolutions), nothing otherwise and in
        training (train.amp and train.cpu_bf16 decide there). Only the dense stage: there
        bfloat16 measured 2-3x faster on a CPU with AMX, while the encoder's attention and
        the refiner ran slower in it (docs/experiments.md)."""
        if self.training or self.config.inference_dtype == "float32":
            return nullcontext()
        device = next(self.parameters()).device.type
        if device == "cpu" and not cpu_runs_bfloat16() and not self._slow_bfloat16_said:
            log.warning("bfloat16 inference on a CPU without fast bfloat16 kernels (%s): the dense stage "
                        "runs several times slower than in float32", torch.backends.cpu.get_cpu_capability())
            self._slow_bfloat16_said = True
        return torch.autocast(device, dtype=torch.bfloat16)

    def forward(self, batch: PointBatch, masked: bool | None = None) -> DetectorOutput:
        """masked: use the masked (training) halting pass; default: in training mode."""
        tokens = self.pillar_net(batch)
        encoded = self.encoder(tokens.features, tokens.coords, batch.batch_size, masked)
        heatmap, regression = self.dense_stage(encoded, tokens.coords, batch.batch_size)
        return DetectorOutput(heatmap, regression, tokens, encoded)

    def dense_stage(self, encoded: EncoderOutput, coords: torch.Tensor, batch_size: int):
        """The BEV stage and the head on the encoded tokens: heatmap logits and regression
        (CenterHead.forward), in float32 whatever the precision they were computed in
        (`inference_precision`)."""
        # the layout `train` gave the dense stage
        memory_format = torch.contiguous_format if self.training else torch.channels_last
        features = self.bev_features(encoded)
        # In float32 on a CPU, training or inference, the 3x3 convolutions skip the
        # background (head.SparseMap); on a GPU and in bfloat16 they run dense.
        sparse = (features.device.type == "cpu" and features.dtype == torch.float32
                  and not torch.is_autocast_enabled("cpu")
                  and (self.training or self.config.inference_dtype == "float32"))
        with self.inference_precision():
            bev = self.bev(features, coords, batch_size, self.grid, memory_format, sparse)
            heatmap, regression = self.head(bev)
        return heatmap.float(), regression.float()

    def first_stage(self) -> list[nn.Module]:
        """Every part but the second stage (frozen by train.refine_only)."""
        return [m for name, m in self.named_children() if name != "refiner"]

    def targets(self, boxes: list[np.ndarray], labels: list[np.ndarray]) -> HeadTargets:
        """Targets for frames' boxes (ignored boxes already removed)."""
        return build_targets(boxes, labels, self.head_grid, self.range_min, self.cell_size,
                             self.config.min_gaussian_radius, self.config.gaussian_overlap)

    def loss(self, output: DetectorOutput, targets: HeadTargets, train=None,
             boxes: list[np.ndarray] | None = None, labels: list[np.ndarray] | None = None,
             jitter_seeds: list[int] | None = None,
             teacher: DetectorOutput | None = None) -> dict[str, torch.Tensor]:
        """Detection loss, plus lambda * the token sparsity loss for halting models, plus
        the second stage's loss for models with a refiner (only that with
        train.refine_only), plus train.distill_weight * the distance from `teacher`'s
        outputs on the same frames (`head.distillation_loss`) when one is given.

        train: a TrainConfig (loss weights); boxes, labels: the frames' ground-truth boxes
        and classes (ignored boxes removed): boxes make the sparsity loss non-uniform; the
        refiner needs both. jitter_seeds: per frame, the seed of the refiner's jittered
        ground-truth proposals (`refine.training_proposals`).
        """
        from haltdet.config import TrainConfig

        train = train or TrainConfig()
        if self.refiner is not None and (boxes is None or labels is None):
            raise ValueError("a model with a refiner needs the ground-truth boxes and labels for its loss")
        if train.refine_only:
            if self.refiner is None:
                raise ValueError("train.refine_only needs a model with model.refine: true")
            total, losses = self.refiner_loss(output, boxes, labels, train, jitter_seeds)
            return {"loss": total, **losses}
        heatmap = heatmap_focal_loss(output.heatmap, targets.heatmap)
        regression, direction = regression_loss(output.regression, targets)
        total = (train.heatmap_weight * heatmap + train.regression_weight * regression
                 + train.direction_weight * direction)
        losses = {"heatmap": heatmap.detach(), "regression": regression.detach(),
                  "direction": direction.detach()}
        if teacher is not None and train.distill_weight > 0:
            heat, box = distillation_loss(output.heatmap, output.regression, teacher.heatmap,
                                          teacher.regression, targets)
            total = total + train.distill_weight * (heat + box)
            losses.update(distill_heatmap=heat.detach(), distill_regression=box.detach())
        if self.halting:
            encoded = output.encoded
            foreground = (self.tokens_in_boxes(output.tokens.coords, boxes, train.sparsity_margin)
                          if boxes is not None else None)
            if train.sparsity_weight > 0:
                sparsity = self.sparsity_loss(output, train, foreground)
                total = total + train.sparsity_weight * sparsity
                losses["sparsity"] = sparsity.detach()
            if train.score_supervision > 0 and foreground is not None:
                supervision = score_supervision_loss(encoded.scores, encoded.halted_at,
                                                     self.config.halting_layers, foreground)
                total = total + train.score_supervision * supervision
                losses["score_supervision"] = supervision.detach()
            losses["kept_fraction"] = encoded.gate.detach().mean()
            losses["token_layers"] = token_layer_share(encoded.halted_at, self.config.num_layers)
            if foreground is not None:  # share of the layers run by object and background tokens
                depth = encoded.halted_at.float() / self.config.num_layers
                losses["foreground_layers"] = depth[foreground].mean() if foreground.any() else depth.new_tensor(0.0)
                losses["background_layers"] = depth[~foreground].mean() if (~foreground).any() else depth.new_tensor(0.0)
        if self.refiner is not None:
            refine, parts = self.refiner_loss(output, boxes, labels, train, jitter_seeds)
            total = total + refine
            losses.update(parts)
        return {"loss": total, **losses}

    def refiner_loss(self, output: DetectorOutput, boxes: list[np.ndarray], labels: list[np.ndarray],
                     train, jitter_seeds: list[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The second stage's weighted loss and its detached parts, on the first stage's
        detections of this pass (no gradient through them) plus jittered ground-truth boxes
        (`refine.training_proposals`)."""
        device = output.heatmap.device
        with torch.no_grad():
            first = self.decode_first_stage(output)
        gt_boxes = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 7), device=device) for b in boxes]
        gt_labels = [torch.as_tensor(np.asarray(lab, dtype=np.int64), device=device) for lab in labels]
        proposals, frame, proposal_labels = training_proposals(first, gt_boxes, gt_labels, train.refine_proposals,
                                                               train.refine_jitter, seeds=jitter_seeds)
        points = output.tokens.points
        prediction = self.refiner(points.points, points.batch_index, proposals, frame, proposal_labels,
                                  index=output.tokens.point_index)
        targets = refinement_targets(proposals, frame, proposal_labels, gt_boxes, gt_labels, train.refine_match_iou)
        parts = refinement_loss(prediction, proposals, targets)
        total = (train.refine_weight * parts["refine_box"] + train.refine_flip_weight * parts["refine_flip"]
                 + train.refine_iou_weight * parts["refine_iou"])
        return total, {k: v.detach() for k, v in parts.items()}

    def tokens_in_boxes(self, coords: torch.Tensor, boxes: list[np.ndarray], margin: float = 0.0) -> torch.Tensor:
        """(T,) bool: the pillar centre of each token (coords (T, 3): frame, iy, ix) lies
        inside a box of its frame (in BEV, the box enlarged by `margin` metres on every side)."""
        device = coords.device
        inside = torch.zeros(coords.shape[0], dtype=torch.bool)
        coords = coords.cpu()
        centres = pillar_centres(coords, self.config.point_cloud_range, self.config.pillar_size)
        centres = torch.cat([centres, torch.zeros(coords.shape[0], 1)], dim=1)
        for frame, frame_boxes in enumerate(boxes):
            if len(frame_boxes) == 0:
                continue
            index = torch.nonzero(coords[:, 0] == frame).flatten()
            flat_boxes = torch.as_tensor(np.asarray(frame_boxes), dtype=torch.float32).clone()
            flat_boxes[:, 2], flat_boxes[:, 5] = 0.0, 1e6  # ignore height
            inside[index] = points_in_boxes(centres[index], flat_boxes, margin=margin).any(0)
        return inside.to(device)

    def sparsity_loss(self, output: DetectorOutput, train, foreground: torch.Tensor | None) -> torch.Tensor:
        """The token sparsity loss (`halting.sparsity_loss`): per-token weights from
        `foreground` (bool (T,): pillar inside a ground-truth box enlarged by
        train.sparsity_margin; None: no boxes), one weight if uniform. Under the act rule
        the tokens' mean ponder cost."""
        encoded = output.encoded
        if encoded.ponder is not None:  # the act rule: its ponder cost, uniform as published
            return encoded.ponder.sum() / batch_count(encoded.ponder.new_tensor(encoded.ponder.numel()))
        if train.sparsity_uniform or foreground is None:
            foreground = torch.zeros_like(encoded.halted_at, dtype=torch.bool)
            balance = None
        else:
            balance = foreground if train.sparsity_balance else None
        weights = token_weights(foreground, train.sparsity_fg_weight, train.sparsity_bg_weight)
        return sparsity_loss(encoded.scores, encoded.halted_at, self.config.halting_layers, weights,
                             self.encoder.halting.thresholds, train.sparsity_hinge, balance)

    def decode_first_stage(self, output: DetectorOutput) -> list[Detections]:
        """The head's boxes per frame; a frame without tokens (no point in range) has none."""
        c = self.config
        detections = decode(output.heatmap, output.regression, self.range_min, self.cell_size,
                            c.score_threshold, c.max_detections, c.nms_iou)
        if output.tokens is None:
            return detections
        occupied = torch.bincount(output.tokens.coords[:, 0], minlength=len(detections)) > 0
        return [d if o else Detections(d.boxes[:0], d.scores[:0], d.labels[:0])
                for d, o in zip(detections, occupied.tolist())]

    def decode(self, output: DetectorOutput) -> list[Detections]:
        """Boxes per frame: the head's, refined by the second stage if the model has one."""
        detections = self.decode_first_stage(output)
        if self.refiner is not None and self.second_stage and output.tokens.points is not None:
            detections = self.refine(output, detections)
        return [suppress_across_classes(d, self.config.cross_class_iou) for d in detections]

    def refine(self, output: DetectorOutput, detections: list[Detections]) -> list[Detections]:
        """The second stage on the first stage's detections, reading the points the pillar
        net kept (`model.refine_passes` passes over the boxes with score >= `refine_min_score`)."""
        c, points = self.config, output.tokens.points
        return refine_detections(self.refiner, points.points, points.batch_index, detections,
                                 c.refine_rectify, c.nms_iou, c.max_detections, c.refine_passes, c.refine_min_score,
                                 c.refine_mirror, output.tokens.point_index)

    @torch.no_grad()
    def detect(self, points: PointBatch | np.ndarray | torch.Tensor) -> list[Detections] | Detections:
        """Boxes of a batch (a PointBatch: a list of Detections, one per frame) or of one
        cloud ((N, 4) x, y, z, intensity in [0, 1], array or tensor: its Detections, on
        the CPU). A cloud's rows with NaN/inf are dropped and counted
        (`DroppedPointsWarning`); another shape or a non-numeric dtype is an InputError."""
        if isinstance(points, PointBatch):
            return self.decode(self.forward(points))
        if isinstance(points, torch.Tensor):
            points = points.detach().cpu().numpy()
        cloud = torch.from_numpy(validate_points(points, "points"))
        device = next(self.parameters()).device
        (detections,) = self.decode(self.forward(PointBatch.from_list([cloud]).to(device)))
        return Detections(detections.boxes.cpu(), detections.scores.cpu(), detections.labels.cpu())

    def token_statistics(self, output: DetectorOutput, boxes: list[np.ndarray]) -> list[dict]:
        """Per frame: how many tokens each layer processed, objects against background
        (`halting.token_statistics`)."""
        return token_statistics(output.encoded.halted_at, self.tokens_in_boxes(output.tokens.coords, boxes),
                                output.tokens.coords[:, 0], len(boxes), self.config.num_layers)
