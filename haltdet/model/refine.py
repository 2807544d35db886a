"""Second stage: refine each first-stage box from the raw points around it.

The first stage sees the scene through 0.32 m pillars and predicts boxes from 0.64 m
cells; at the 0.7 IoU of vehicles its centres, heights and lengths are not tight enough
(`haltdet diagnose`). The refiner looks at the raw points in and around each box, in the
box's own frame (LiDAR R-CNN-style canonicalisation: translation and rotation removed,
so one small PointNet serves every position and heading), and predicts:

* a residual (7): centre along / across the box heading and vertical (metres), log
  size ratios, and a small heading change (radians);
* a flip logit: the box's front is at the other end of its axis;
* the 3D IoU of the refined box with its object (a logit), which rescores the box.

Points: those inside the box enlarged by `context` metres on every side (so a box that
is too short or too low still sees its object's ends, and the ground below), at most
`num_points` per box, taken evenly in input order when there are more: deterministic.
Per point: the box-frame offsets (metres), the same divided by the half sizes, and the
intensity. The point features are max-pooled per box, then joined with the box's log
size, its class and its log point count.

Training (`refinement_targets`): proposals are the first stage's own detections plus
jittered ground-truth boxes (so every object is seen at many errors, whatever the first
stage's quality); a proposal regresses the same-class ground-truth box it overlaps most
in BEV (IoU >= `match_iou`); the others only learn IoU 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from haltdet.boxes import iou_3d_paired, iou_bev, wrap_angle
from haltdet.distributed import batch_count
from haltdet.model.head import Detections, nms_per_class
from haltdet.model.pillars import PointIndex

NUM_CLASSES = 3
POINT_FEATURES = 7  # box-frame x, y, z; the same over the half sizes; intensity
RESIDUAL_DIM = 7  # along, across, z, log l, log w, log h ratios, heading change


@dataclass
class BoxPoints:
    """Points gathered around boxes, flat: point `i` belongs to box `box[i]`.

    features: (M, POINT_FEATURES); box: (M,) int64, sorted; counts: (K,) points per box
    before the per-box cap (log-count feature); position: (M, 3) box-frame offsets over the
    enlarged half sizes, in [-1, 1] (the cell of the box's grid a point falls in)."""

    features: torch.Tensor
    box: torch.Tensor
    counts: torch.Tensor
    position: torch.Tensor


def gather_box_points(points: torch.Tensor, batch_index: torch.Tensor, boxes: torch.Tensor,
                      box_frame: torch.Tensor, context: float, num_points: int,
                      index: PointIndex | None = None) -> BoxPoints:
    """Points (P, 4) of frames `batch_index` (P,) around boxes (K, 7) of frames
    `box_frame` (K,): those inside each box enlarged by `context` metres per side, at most
    `num_points` per box (evenly in input order). Deterministic. index: the points'
    `PointIndex`, if the caller has it (it is made here otherwise)."""
    device = points.device
    boxes = boxes.float()
    radius = 0.5 * torch.sqrt((boxes[:, 3] + 2 * context) ** 2 + (boxes[:, 4] + 2 * context) ** 2)
    if boxes.shape[0] and points.shape[0]:
        index = PointIndex.of_points(points, batch_index) if index is None else index
        pair_box, pair_point = index.candidates(box_frame, boxes[:, :2].detach(), radius.detach() + 0.01)
    else:
        pair_box = pair_point = torch.zeros(0, dtype=torch.long, device=device)
    # index_select rather than subscripts: several times faster for rows on a CPU
    b = boxes.index_select(0, pair_box)
    p = points.index_select(0, pair_point).float()
    dx, dy, dz = p[:, 0] - b[:, 0], p[:, 1] - b[:, 1], p[:, 2] - b[:, 2]
    cos, sin = torch.cos(boxes[:, 6]).index_select(0, pair_box), torch.sin(boxes[:, 6]).index_select(0, pair_box)
    local = torch.stack([dx * cos + dy * sin, -dx * sin + dy * cos, dz], dim=1)
    inside = (local.abs() <= b[:, 3:6] / 2 + context).all(dim=1)
    order = torch.nonzero(inside).flatten()
    key = pair_box.index_select(0, order) * points.shape[0] + pair_point.index_select(0, order)
    order = order.index_select(0, torch.argsort(key))  # by box, then input order
    local, pair_box, p = local.index_select(0, order), pair_box.index_select(0, order), p.index_select(0, order)
    half = (boxes[:, 3:6] / 2).index_select(0, pair_box)
    counts = torch.bincount(pair_box, minlength=boxes.shape[0])
    if num_points and pair_box.numel():
        n = counts.index_select(0, pair_box)
        # pair_box is sorted: a point's rank in its box is its distance from the box's first
        rank = torch.arange(pair_box.numel(), device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, pair_box)
        cap = n.clamp(max=num_points)
        keep = torch.nonzero((rank * cap) // n != ((rank - 1) * cap) // n).flatten()
        local, half, pair_box, p = (t.index_select(0, keep) for t in (local, half, pair_box, p))
    features = torch.cat([local, local / half.clamp(min=0.05), p[:, 3:4].clamp(0, 1)], dim=1)
    return BoxPoints(features, pair_box, counts, local / (half + context).clamp(min=0.05))


def _max_per_group(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups, C) max of the rows of each group; values are >= 0 (ReLU), so an empty
    group's 0 is exact."""
    out = values.new_zeros(groups, values.shape[1])
    return out.scatter_reduce(0, group[:, None].expand_as(values), values, reduce="amax", include_self=True)


class BoxRefiner(nn.Module):
    """PointNet over the points of each box -> residual (7), flip logit, IoU logit.

    The point features are max-pooled over the whole box and, reduced to `grid_channels`,
    over each cell of a grid laid on the enlarged box (`grid` cells along, across, up):
    where in the box a feature occurs (a cabin set back, handlebars ahead) is what tells
    the front from the back."""

    def __init__(self, channels: list[int], context: float, num_points: int,
                 grid: tuple[int, int, int] = (6, 2, 3), grid_channels: int = 16):
        super().__init__()
        self.context, self.num_points = context, num_points
        self.register_buffer("grid", torch.tensor(grid, dtype=torch.long), persistent=False)
        self.cells = math.prod(grid)
        layers, in_dim = [], POINT_FEATURES
        for i, out_dim in enumerate(channels):
            # The first layer has a bias: LayerNorm(W f) would see only the direction of a
            # point's features f, not how far the point lies from the box centre.
            layers += [nn.Linear(in_dim, out_dim, bias=i == 0), nn.LayerNorm(out_dim), nn.ReLU(inplace=True)]
            in_dim = out_dim
        self.point_net = nn.Sequential(*layers)
        self.grid_net = nn.Sequential(nn.Linear(in_dim, grid_channels), nn.ReLU(inplace=True))
        box_dim = 3 + NUM_CLASSES + 1  # log size, class one-hot, log point count
        in_dim += self.cells * grid_channels
        self.box_net = nn.Sequential(nn.Linear(in_dim + box_dim, channels[-1]), nn.ReLU(inplace=True),
                                     nn.Linear(channels[-1], channels[-1]), nn.ReLU(inplace=True))
        self.out = nn.Linear(channels[-1], RESIDUAL_DIM + 2)
        nn.init.zeros_(self.out.weight)  # start as the identity: no change, no flip
        nn.init.zeros_(self.out.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the first layer had a bias: a zero bias is their network.
        weight, bias = prefix + "point_net.0.weight", prefix + "point_net.0.bias"
        if weight in state_dict and bias not in state_dict:
            state_dict[bias] = state_dict[weight].new_zeros(state_dict[weight].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, points: torch.Tensor, batch_index: torch.Tensor, boxes: torch.Tensor,
                box_frame: torch.Tensor, labels: torch.Tensor, mirror: bool = False,
                index: PointIndex | None = None) -> torch.Tensor:
        """-> (K, RESIDUAL_DIM + 2): residual, flip logit, IoU logit per box (index: the
        points' `PointIndex`, if the caller has one). With `mirror`,
        the mean of the outputs for the points as they are and mirrored left-right in each
        box's frame (objects are nearly symmetric across their heading; the mirrored
        output's across offset and heading change are mirrored back)."""
        gathered = gather_box_points(points, batch_index, boxes, box_frame, self.context, self.num_points, index)
        output = self._predict(gathered, boxes, labels)
        if not mirror:
            return output
        across = gathered.position.new_tensor([1.0, -1.0, 1.0])
        # the point features (POINT_FEATURES) are box-frame x, y, z, the same over the half
        # sizes, and the intensity: mirroring negates the two y columns
        sign = torch.cat([across, across, across.new_ones(1)]).to(gathered.features.dtype)
        mirrored = BoxPoints(gathered.features * sign, gathered.box, gathered.counts, gathered.position * across)
        back = torch.ones(output.shape[1], device=output.device)
        back[[1, 6]] = -1.0  # across offset, heading change
        return (output + self._predict(mirrored, boxes, labels) * back) / 2

    def _predict(self, gathered: BoxPoints, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        point_features = self.point_net(gathered.features)
        k = boxes.shape[0]
        pooled = _max_per_group(point_features, gathered.box, k)
        cell = ((gathered.position + 1) / 2 * self.grid).floor().long()
        cell = torch.minimum(cell.clamp(min=0), self.grid - 1)
        cell = (cell[:, 0] * self.grid[1] + cell[:, 1]) * self.grid[2] + cell[:, 2]
        grid = _max_per_group(self.grid_net(point_features), gathered.box * self.cells + cell, k * self.cells)
        box_features = torch.cat([
            pooled,
            grid.view(k, self.cells * grid.shape[1]),  # explicit: k may be 0
            boxes[:, 3:6].float().clamp(min=1e-3).log(),
            F.one_hot(labels.long(), NUM_CLASSES).to(pooled.dtype),
            torch.log1p(gathered.counts.to(pooled.dtype))[:, None],
        ], dim=1)
        return self.out(self.box_net(box_features))


def apply_residual(boxes: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Boxes (K, 7) changed by the refiner's output (K, >= 8): the residual, and a half
    turn where the flip logit is positive."""
    boxes = boxes.float()
    residual = output[:, :RESIDUAL_DIM].float()
    cos, sin = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    x = boxes[:, 0] + residual[:, 0] * cos - residual[:, 1] * sin
    y = boxes[:, 1] + residual[:, 0] * sin + residual[:, 1] * cos
    z = boxes[:, 2] + residual[:, 2]
    size = boxes[:, 3:6] * residual[:, 3:6].clamp(-3, 3).exp()
    yaw = boxes[:, 6] + residual[:, 6] + math.pi * (output[:, RESIDUAL_DIM] > 0).float()
    return torch.cat([torch.stack([x, y, z], 1), size, wrap_angle(yaw)[:, None]], dim=1)


def jitter_boxes(boxes: torch.Tensor, flip_probability: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Ground-truth boxes (K, 7) with errors like the first stage's (`haltdet diagnose`),
    somewhat wider: centre along / across the heading 15 % / 10 % of the length / width
    (plus 5 cm), z 0.15 m, sizes 10 % (log), heading 0.1 rad, and the front reversed with
    `flip_probability`."""
    n = boxes.shape[0]
    noise = torch.randn(n, 7, generator=generator).to(boxes.device)
    flip = (torch.rand(n, generator=generator) < flip_probability).float().to(boxes.device)
    boxes = boxes.float()
    cos, sin = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    du = noise[:, 0] * (0.15 * boxes[:, 3] + 0.05)
    dv = noise[:, 1] * (0.1 * boxes[:, 4] + 0.05)
    out = boxes.clone()
    out[:, 0] += du * cos - dv * sin
    out[:, 1] += du * sin + dv * cos
    out[:, 2] += noise[:, 2] * 0.15
    out[:, 3:6] *= (noise[:, 3:6] * 0.1).exp()
    out[:, 6] = wrap_angle(out[:, 6] + noise[:, 6] * 0.1 + math.pi * flip)
    return out


@dataclass
class RefinementTargets:
    """matched: (K,) bool, the proposal regresses a ground-truth box; residual (K, 7) and
    flip (K,) its targets (rows of unmatched proposals are zeros); gt (K, 7) the matched
    box (zeros if none)."""

    matched: torch.Tensor
    residual: torch.Tensor
    flip: torch.Tensor
    gt: torch.Tensor


def refinement_targets(proposals: torch.Tensor, proposal_frame: torch.Tensor, proposal_labels: torch.Tensor,
                       gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor],
                       match_iou: float) -> RefinementTargets:
    """Match each proposal to the same-class ground-truth box of its frame it overlaps
    most in BEV (IoU >= match_iou) and express that box in the proposal's frame."""
    k = proposals.shape[0]
    matched = torch.zeros(k, dtype=torch.bool, device=proposals.device)
    gt = proposals.new_zeros(k, 7)
    for frame, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        index = torch.nonzero(proposal_frame == frame).flatten()
        if not index.numel() or not boxes.shape[0]:
            continue
        iou = iou_bev(proposals[index], boxes.to(proposals))
        iou = iou * (proposal_labels[index, None] == labels.to(proposal_labels)[None, :])
        best, which = iou.max(dim=1)
        hit = best >= match_iou
        matched[index[hit]] = True
        gt[index[hit]] = boxes.to(proposals)[which[hit]]
    p = proposals.float()
    delta = wrap_angle(gt[:, 6] - p[:, 6])
    flip = delta.abs() > math.pi / 2
    delta = wrap_angle(delta - math.pi * flip.float())
    dx, dy = gt[:, 0] - p[:, 0], gt[:, 1] - p[:, 1]
    cos, sin = torch.cos(p[:, 6]), torch.sin(p[:, 6])
    residual = torch.stack([dx * cos + dy * sin, -dx * sin + dy * cos, gt[:, 2] - p[:, 2],
                            *(gt[:, 3:6].clamp(min=1e-3) / p[:, 3:6].clamp(min=1e-3)).log().unbind(1),
                            delta], dim=1)
    m = matched.float()[:, None]
    return RefinementTargets(matched, residual * m, flip & matched, gt)


def refinement_loss(output: torch.Tensor, proposals: torch.Tensor, targets: RefinementTargets
                    ) -> dict[str, torch.Tensor]:
    """Smooth-L1 of the residual and binary cross-entropy of the flip over matched
    proposals; binary cross-entropy of the IoU logit against the refined box's 3D IoU
    with its object (0 for unmatched proposals) over all."""
    output = output.float()
    matched = targets.matched.float()
    positives = batch_count(matched.sum(), minimum=1.0)
    everyone = batch_count(torch.tensor(float(output.shape[0]), device=output.device), minimum=1.0)
    residual = (F.smooth_l1_loss(output[:, :RESIDUAL_DIM], targets.residual, beta=0.05, reduction="none")
                .sum(dim=1) * matched).sum() / positives
    flip = (F.binary_cross_entropy_with_logits(output[:, RESIDUAL_DIM], targets.flip.float(), reduction="none")
            * matched).sum() / positives
    with torch.no_grad():
        refined = apply_residual(proposals, output.detach())
        iou_target = iou_3d_paired(refined, targets.gt).float() * matched if output.shape[0] else matched
    iou = F.binary_cross_entropy_with_logits(output[:, RESIDUAL_DIM + 1], iou_target, reduction="sum") / everyone
    return {"refine_box": residual, "refine_flip": flip, "refine_iou": iou}


def refine_detections(refiner: BoxRefiner, points: torch.Tensor, batch_index: torch.Tensor,
                      detections: list[Detections], rectify: list[float], nms_iou: list[float],
                      max_detections: int, passes: int = 1, min_score: float = 0.0,
                      mirror: bool = False, index: PointIndex | None = None) -> list[Detections]:
    """Refine every frame's detections with score >= min_score (the others are dropped)
    `passes` times (each pass starts from the last one's boxes and is followed by NMS
    within each class: refined duplicates can overlap more); then scores become
    score^(1 - a) * IoU^a with the last pass's IoU (a = rectify[class]). `mirror`: see
    `BoxRefiner.forward`. index: the points' `PointIndex` (made here if not given)."""
    detections = [Detections(d.boxes[keep], d.scores[keep], d.labels[keep])
                  for d, keep in ((d, d.scores >= min_score) for d in detections)]
    index = PointIndex.of_points(points, batch_index) if index is None else index  # one for every pass
    for done in range(passes):
        if not sum(len(d.boxes) for d in detections):
            return detections
        boxes = torch.cat([d.boxes for d in detections]).float()
        labels = torch.cat([d.labels for d in detections])
        scores = torch.cat([d.scores for d in detections]).float()
        frame = torch.cat([torch.full((len(d.boxes),), f, dtype=torch.long, device=boxes.device)
                           for f, d in enumerate(detections)])
        output = refiner(points, batch_index, boxes, frame, labels, mirror=mirror, index=index)
        refined = apply_residual(boxes, output)
        if done == passes - 1:
            quality = torch.sigmoid(output[:, RESIDUAL_DIM + 1].float())
            alpha = torch.tensor(rectify, dtype=scores.dtype, device=scores.device)[labels]
            scores = scores.pow(1 - alpha) * quality.pow(alpha)
        detections = [nms_per_class(Detections(refined[index], scores[index], labels[index]), nms_iou,
                                    max_detections)
                      for index in (torch.nonzero(frame == f).flatten() for f in range(len(detections)))]
    return detections


def training_proposals(detections: list[Detections], gt_boxes: list[torch.Tensor],
                       gt_labels: list[torch.Tensor], per_frame: int, jitter: int,
                       min_score: float = 0.1, seeds: list[int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes, frame, labels) to train the refiner on: each frame's best `per_frame`
    first-stage detections with score >= min_score, plus `jitter` jittered copies of each
    ground-truth box (`jitter_boxes`, drawn from a generator seeded by the frame's entry of
    `seeds`, else from torch's global generator). Per-frame seeds make the draws of a frame
    independent of which process, and which batch neighbours, it is trained with."""
    if seeds is not None and len(seeds) != len(detections):
        raise ValueError(f"{len(seeds)} jitter seeds for {len(detections)} frames")
    boxes, frames, labels = [], [], []
    for f, (d, gt, gl) in enumerate(zip(detections, gt_boxes, gt_labels)):
        keep = torch.nonzero(d.scores >= min_score).flatten()[:per_frame]  # sorted by score
        b = [d.boxes[keep].float()]
        lab = [d.labels[keep]]
        if jitter and gt.shape[0]:
            generator = None if seeds is None else torch.Generator().manual_seed(int(seeds[f]))
            b.append(jitter_boxes(gt.float().repeat(jitter, 1), generator=generator))
            lab.append(gl.to(d.labels).repeat(jitter))
        b, lab = torch.cat(b), torch.cat(lab)
        boxes.append(b)
        labels.append(lab)
        frames.append(torch.full((b.shape[0],), f, dtype=torch.long, device=b.device))
    return torch.cat(boxes), torch.cat(frames), torch.cat(labels)
