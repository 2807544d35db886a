"""Token halting: the method in one module (docs/method.md).

After chosen encoder layers a scorer gives every still-active token a score in (0, 1);
tokens below the stage's threshold halt and no later layer processes them. This module
holds everything that decides and trains that:

* the scorers (`TokenScorer`; `RandomScorer`, the random-dropping peer);
* the keep decision (`select_per_frame`: threshold, keep ratio, cap, per frame);
* the gate of the differentiable training pass (`TokenHalting`): per stage, a factor whose
  forward value is the hard 0/1 decision and whose gradient reaches the score
  (`keep + s - stopgrad(s)`), or the smooth relaxation `sigmoid((s - threshold) / T)` that
  `haltdet gradcheck` compares it with;
* the non-uniform sparsity loss, its per-token weights and the adaptation of its weight
  to a target share of token-layers (`ShareTarget`);
* the optional supervision of the scores by the boxes (`score_supervision_loss`);
* token statistics (how many layers processed each token, objects against background).

The encoder (`haltdet/model/encoder.py`) runs the two passes that use it: removal at
inference, masked in training.

The gate of a token is the product of the factors of the stages that decided on it; a
stage does not touch the gate of a token halted before it. In the masked pass the gate
enters twice (`TokenHalting.gradient` chooses which entries carry the gradient):

* attention: key j's attention weight is `g_j exp(l_ij) / sum_k g_k exp(l_ik)` (a query
  always attends to itself), so a score learns how much the other tokens lose when it halts
  (for a halted key the change that attending to it would make, not the unbounded
  derivative at gate 0: `secant`, `encoder.gated_attention`); `attention_weight` scales
  this path's share of the gradient (`key_gate`);
* residual: `x = g * layer(x) + (1 - g) * x`, so a score learns how much its own
  feature would still change.

`hard` removes halted tokens in training too: only the survivors' residual factors carry a
gradient, nothing reaches a halted token's score but the sparsity loss.

`CumulativeHalting` is a peer rule on the same scorers (`halting_rule: act`): adaptive
computation time as A-ViT applies it to tokens, with cumulative halting probabilities, a
mean-field output and a ponder cost instead of a threshold and a gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from haltdet.config import GRADIENT_PATHS, HALTING_RULES
from haltdet.distributed import batch_count


class TokenScorer(nn.Module):
    """Halting score in (0, 1) from each token's own feature (a small MLP)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model // 2), nn.ReLU(inplace=True),
                                 nn.Linear(d_model // 2, 1))
        # Start with every token kept (score ~0.95): the sparsity loss teaches halting.
        nn.init.constant_(self.net[-1].bias, 3.0)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, active: torch.Tensor,
                batch_size: int) -> torch.Tensor:
        return torch.sigmoid(_at_least_float32(self.net(x).squeeze(1)))


class RandomScorer(nn.Module):
    """Random token dropping, a peer of learned halting (`halting_scorer: random`, with
    keep ratios): scores uniform in [0, 1), drawn afresh every training step (from torch's
    generator, which training seeds per step), and at inference a fixed hash of the
    token's pillar and the stage, so the same cloud always drops the same tokens."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor, coords: torch.Tensor, active: torch.Tensor,
                batch_size: int) -> torch.Tensor:
        if self.training:
            return torch.rand(x.shape[0], device=x.device)
        # An integer mix of (iy, ix, stage); int64 products wrap, the same on every device.
        key = (coords[:, 1] * 40503 + coords[:, 2] + self.stage * 7919) * 2654435761
        key = (key ^ (key >> 15)) * 2246822519
        key = key ^ (key >> 13)
        return (key & 0xFFFFFF).float() / float(1 << 24)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Scores in float32 under reduced-precision autocast, float64 in float64 models."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def select_per_frame(scores: torch.Tensor, frame: torch.Tensor, candidates: torch.Tensor,
                     threshold: float, keep_ratio: float | None, max_tokens: int) -> torch.Tensor:
    """Which candidate tokens stay active after a halting stage (bool (T,)).

    threshold: keep tokens with score >= threshold (ignored when keep_ratio is given);
    keep_ratio: keep the ceil(ratio * n) best-scored candidates of each frame;
    max_tokens: keep at most this many per frame (0 = no cap), the best-scored ones.
    Per frame, so a frame's result never depends on the other frames of its batch; ties
    are broken by token order, so the choice is deterministic.
    """
    keep = candidates & (scores >= threshold) if keep_ratio is None else candidates.clone()
    if keep_ratio is None and max_tokens <= 0:
        return keep
    # Rank the candidates of each frame by descending score (stable: token order on ties).
    order = torch.argsort(scores.masked_fill(~keep, -1.0), descending=True, stable=True)
    order = order[torch.argsort(frame[order], stable=True)]
    sorted_frame = frame[order]
    num_frames = int(frame.max().item()) + 1 if frame.numel() else 0
    counts = torch.bincount(frame, minlength=num_frames)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[sorted_frame]
    limit = torch.bincount(frame[keep], minlength=num_frames).to(torch.float64)
    if keep_ratio is not None:
        limit = torch.ceil(limit * keep_ratio)
    if max_tokens > 0:
        limit = limit.clamp(max=max_tokens)
    return keep & (rank < limit.long()[frame])


def with_neighbours(keep: torch.Tensor, candidates: torch.Tensor, coords: torch.Tensor,
                    radius: int) -> torch.Tensor:
    """`keep` (T,) bool, plus the `candidates` within `radius` pillars (Chebyshev distance,
    same frame) of a kept token; coords (T, 3) (frame, iy, ix). Each of the (2r + 1)^2
    offsets is a binary search of the tokens' cells among the kept ones: no grid."""
    if radius <= 0 or not bool(keep.any()):
        return keep
    span = int(coords[:, 1:].max()) + 2 * radius + 1
    frame, y, x = coords[:, 0], coords[:, 1] + radius, coords[:, 2] + radius

    def cell(dy: int, dx: int) -> torch.Tensor:
        return (frame * span + y + dy) * span + x + dx

    kept = cell(0, 0)[keep].sort().values
    near = torch.zeros_like(keep)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            key = cell(dy, dx)
            found = kept[torch.searchsorted(kept, key).clamp_(max=kept.numel() - 1)]
            near |= found == key
    return keep | (candidates & near)


@dataclass
class StageDecision:
    """One halting stage's outcome for every token.

    scores: (T,) float32 halting scores (0 for tokens that were not candidates).
    keep: (T,) bool, active after the stage.
    factor: (T,) float32 the stage's gate factor: forward value `keep` exactly, gradient
      into `scores` (straight-through); under the relaxation sigmoid((s - threshold) / T).
    """

    scores: torch.Tensor
    keep: torch.Tensor
    factor: torch.Tensor


class CumulativeHalting:
    """The state of ACT-style cumulative halting over one encoder pass (`halting_rule: act`,
    A-ViT's rule on this encoder's halting stages), for the token set of the pass.

    At each stage an active token's halting probability is h = 1 - score (the scorers
    start near score 0.95, so nothing halts at first); it halts at the stage where the sum
    of its probabilities reaches the stage threshold (A-ViT: 1 - eps, 0.99). Its output is
    the mean-field mixture of its features at the points where it was scored: h times the
    feature at every stage it passes, the remainder R = 1 - (the sum of its earlier h) at
    the stage where it halts, or on the final feature if it never does. The detection loss
    reaches the probabilities through the mixture; the ponder cost (stages passed + R)
    pushes them up. Halted tokens leave attention as under the threshold rule (no gate
    gradient). Both encoder passes give the same values.

    All tensors are indexed by token of the pass: `index` arguments say which tokens the
    rows of `x` and `score` are.
    """

    def __init__(self, x: torch.Tensor):
        n = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        self.cumulative = torch.zeros(n, dtype=dtype, device=x.device)
        self.remainder = torch.ones(n, dtype=dtype, device=x.device)
        self.output = torch.zeros_like(x)
        self.ponder = torch.zeros(n, dtype=dtype, device=x.device)

    def stage(self, index: torch.Tensor, x: torch.Tensor, score: torch.Tensor, threshold: float) -> torch.Tensor:
        """One stage for the tokens `index` (features x, scores): which of them continue."""
        halting = 1 - score
        cumulative = self.cumulative[index] + halting
        keep = cumulative.detach() < threshold
        remainder = self.remainder[index]
        weight = torch.where(keep, halting, remainder)
        self.output = self.output.index_add(0, index, weight[:, None].to(x.dtype) * x)
        self.ponder = self.ponder.index_add(0, index, torch.where(keep, 1.0, remainder))
        self.cumulative = self.cumulative.index_put((index,), cumulative)
        self.remainder = self.remainder.index_put((index,), torch.where(keep, remainder - halting, remainder))
        return keep

    def finish(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """After the last layer, for the tokens `index` still active (features x): the
        mixed output of every token (T, C)."""
        remainder = self.remainder[index]
        self.output = self.output.index_add(0, index, remainder[:, None].to(x.dtype) * x)
        self.ponder = self.ponder.index_add(0, index, remainder)
        return self.output


class TokenHalting(nn.Module):
    """The halting stages of an encoder: scorers, decision knobs and the training gate.

    `halting_layers[k]` counts layers: stage k scores the tokens after that many layers.
    Knobs (per stage; plain attributes, set through `Detector.configure`):
    thresholds, keep_ratios (None: use thresholds), max_tokens (0: no cap).
    gradient: which entries of the masked pass carry the gate's gradient (module docstring).
    secant: a halted key's attention gradient is the change that attending to it would
      make rather than the unbounded derivative at gate 0 (`encoder.gated_attention`).
    relaxation: None, or a temperature T: every token's factor becomes the smooth
      sigmoid((score - threshold) / T) and nothing is removed (`haltdet gradcheck`).
    rule: "threshold" (the method) or "act" (`CumulativeHalting`, whose thresholds are the
      cumulative halting levels; the gate then carries no gradient).
    dilation: a stage also keeps the candidates within this many pillars of a token its
      scores keep (`with_neighbours`; the threshold rule).
    paused: in training, every stage keeps every token it decides on and no gradient
      reaches the scores (`train.halting_start`: the steps before halting begins).
    """

    def __init__(self, d_model: int, halting_layers: list[int], scorer: str = "mlp",
                 gradient: str = "residual", secant: bool = True, rule: str = "threshold"):
        super().__init__()
        if gradient not in GRADIENT_PATHS:
            raise ValueError(f"halting gradient must be one of {GRADIENT_PATHS}, got {gradient!r}")
        if rule not in HALTING_RULES:
            raise ValueError(f"halting rule must be one of {HALTING_RULES}, got {rule!r}")
        self.rule = rule
        self.halting_layers = list(halting_layers)
        self.scorers = nn.ModuleList(
            TokenScorer(d_model) if scorer == "mlp" else RandomScorer(stage) for stage in range(len(self.halting_layers)))
        self.thresholds = [0.5] * len(self.halting_layers)
        self.keep_ratios: list[float] | None = None
        self.max_tokens = 0
        self.gradient = gradient
        self.attention_weight = 1.0  # the share of the attention path's gradient (`key_gate`)
        self._secant = secant
        self.relaxation: float | None = None
        self.paused = False
        self.dilation = 0

    def __len__(self) -> int:
        return len(self.halting_layers)

    def stage_before(self, layer: int) -> int | None:
        """The stage that decides right before `layer` runs (after `layer` layers), or None."""
        return self.halting_layers.index(layer) if layer in self.halting_layers else None

    def start(self, x: torch.Tensor) -> CumulativeHalting | None:
        """The per-pass state of the rule for the tokens `x` (None: the threshold rule has none)."""
        return CumulativeHalting(x) if self.rule == "act" and len(self) else None

    @property
    def attention_path(self) -> bool:
        if self.rule == "act":
            return False
        return self.relaxation is not None or self.gradient in ("both", "attention")

    def key_gate(self, gate: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """What a masked-pass attention weighs each key by: its gate (float), with
        `attention_weight` of the gate's gradient (the same forward values), or, without
        the attention path, whether it is active (bool)."""
        if not self.attention_path:
            return active
        if self.attention_weight == 1.0 or self.relaxation is not None:
            return gate
        hard = gate.detach()
        return hard + self.attention_weight * (gate - hard)

    @property
    def secant(self) -> bool:
        """Halted keys' attention gradient: the secant (bounded), except under the
        relaxation, whose gradient is the exact one (`encoder.gated_attention`)."""
        return self._secant and self.relaxation is None

    @secant.setter
    def secant(self, value: bool) -> None:
        self._secant = value

    @property
    def residual_path(self) -> bool:
        if self.rule == "act":
            return False
        return self.relaxation is not None or self.gradient in ("both", "residual")

    def forward(self, stage: int, x: torch.Tensor, coords: torch.Tensor, active: torch.Tensor,
                batch_size: int, state: CumulativeHalting | None = None,
                index: torch.Tensor | None = None) -> StageDecision:
        """Score the active tokens `x` (T, C) at `coords` (T, 3) and decide which stay.
        With the act rule, `state` is the pass's `start` and `index` (T,) the pass's
        token index of each row of `x`."""
        scores = self.scorers[stage](x, coords, active, batch_size) * active
        threshold = self.thresholds[stage]
        if self.paused and self.training:
            # Every token stays; the scores stay in the graph with a zero gradient (DDP
            # expects a gradient for every parameter).
            return StageDecision(scores, active, active.to(scores.dtype) + (scores - scores.detach()) * 0.0)
        if state is not None:
            rows = active.nonzero().squeeze(1)
            keep = torch.zeros_like(active)
            keep[rows] = state.stage(index[rows], x[rows], scores[rows], threshold)
            return StageDecision(scores, keep, keep.to(scores.dtype))
        if self.relaxation is not None:
            return StageDecision(scores, active, torch.sigmoid((scores - threshold) / self.relaxation))
        ratio = self.keep_ratios[stage] if self.keep_ratios else None
        # The scores' choice, its neighbours, then the cap (the lowest scores leave first).
        keep = select_per_frame(scores.detach(), coords[:, 0], active, threshold, ratio, 0)
        keep = with_neighbours(keep, active, coords, self.dilation)
        if self.max_tokens:
            keep = select_per_frame(scores.detach(), coords[:, 0], keep, -math.inf, None, self.max_tokens)
        # (scores - scores.detach()) is exactly 0 forward: the factor stays exactly 0/1.
        return StageDecision(scores, keep, keep.float() + (scores - scores.detach()))


def token_weights(foreground: torch.Tensor, fg_weight: float, bg_weight: float) -> torch.Tensor:
    """Per-token weight of the sparsity loss: `fg_weight` on foreground tokens (bool (T,)),
    `bg_weight` elsewhere. A negative weight pushes scores up (keeps the token)."""
    return torch.full(foreground.shape, bg_weight, device=foreground.device).masked_fill(foreground, fg_weight)


def sparsity_loss(scores: list[torch.Tensor], halted_at: torch.Tensor, halting_layers: list[int],
                  weights: torch.Tensor, thresholds: list[float], hinge: float = 0.0,
                  foreground: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over halting stages of the weighted mean term of the tokens scored there.

    The term of a token with weight w and score s is `w * s` (hinge 0): minimising it
    pushes scores down, background hardest, and up where w < 0. With a hinge margin m > 0
    it is `|w| * relu(m + (s - threshold))` for w > 0 and `|w| * relu(m - (s - threshold))`
    for w < 0: a score is pushed only until it is on its side of the threshold by m.
    foreground: optional (T,) bool; given, the foreground and the background tokens are
    averaged apart and the two means added, so each group weighs the same whatever its
    token count (objects are a few percent of the tokens).
    """
    per_stage = []
    for layer, stage_scores, threshold in zip(halting_layers, scores, thresholds):
        if hinge > 0:
            direction = torch.sign(weights)
            terms = weights.abs() * torch.relu(hinge + direction * (stage_scores - threshold))
        else:
            terms = weights * stage_scores
        per_stage.append(_scored_mean(terms, halted_at >= layer, foreground))
    return torch.stack(per_stage).mean()


def _scored_mean(terms: torch.Tensor, scored: torch.Tensor, foreground: torch.Tensor | None) -> torch.Tensor:
    """Mean of `terms` (T,) over the `scored` tokens (bool (T,)); with `foreground` (bool
    (T,)), the means over the scored object and background tokens, added."""
    groups = [scored] if foreground is None else [scored & foreground, scored & ~foreground]
    total = 0.0
    for group in groups:
        group = group.to(terms.dtype)
        total = total + (terms * group).sum() / batch_count(group.sum())
    return total


def score_supervision_loss(scores: list[torch.Tensor], halted_at: torch.Tensor, halting_layers: list[int],
                           foreground: torch.Tensor) -> torch.Tensor:
    """Mean over halting stages of the binary cross-entropy of the scores of the tokens
    scored there against `foreground` (bool (T,): the token lies in an object), the object
    and the background tokens averaged apart and the two means added (objects are a few
    percent of the tokens). It teaches a scorer which tokens are objects, beside what the
    pseudo-gradient teaches it about which tokens the detection needs."""
    per_stage = []
    for layer, stage_scores in zip(halting_layers, scores):
        # by hand: torch's binary_cross_entropy refuses CUDA autocast
        p = stage_scores.clamp(1e-6, 1 - 1e-6)
        target = foreground.to(p.dtype)
        terms = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
        per_stage.append(_scored_mean(terms, halted_at >= layer, foreground))
    return torch.stack(per_stage).mean()


class ShareTarget:
    """Lambda adapted to a target share of token-layers (train.sparsity_target).

    The sparsity weight of a step is `sparsity_weight * multiplier`. Once adapting, every
    step multiplies the multiplier by exp(rate * (share - target) / target), share being
    that step's share of the token-layers (the same on every process): a model that runs
    more than the target is pushed harder towards halting, one that runs less more gently,
    so models trained with different gradient paths or losses end near the same cost and
    compare at equal latency. It starts adapting when a step first runs no more than the
    target, or at step `start` if that comes first: held until then, the multiplier does
    not grow while the scorers are still learning to halt anything (every token runs at
    first), which would push far past the target later. The multiplier stays within
    [1 / LIMIT, LIMIT]; `state()` goes into a training checkpoint (exact resume).
    """

    LIMIT = 1000.0

    def __init__(self, target: float, rate: float, start: int, state: dict | None = None):
        self.target, self.rate, self.start = target, rate, start
        state = state or {}
        self.multiplier, self.engaged = state.get("multiplier", 1.0), state.get("engaged", False)

    def state(self) -> dict:
        return {"multiplier": self.multiplier, "engaged": self.engaged}

    def update(self, share: float, step: int) -> None:
        """After step `step` (0-based), which ran the share `share` of the token-layers."""
        self.engaged = self.engaged or share <= self.target or step >= self.start
        if self.engaged:
            factor = math.exp(self.rate * (share - self.target) / self.target)
            self.multiplier = min(self.LIMIT, max(1.0 / self.LIMIT, self.multiplier * factor))


def token_layer_share(halted_at: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Share of the token-layers a pass ran: mean over tokens of the layers that processed
    each (halted_at, (T,)), over num_layers. A 0-dim tensor; normalised as a loss is
    (`batch_count`), so the mean over processes is the global batch's share."""
    return halted_at.float().sum() / (batch_count(halted_at.new_tensor(halted_at.numel())) * num_layers)


def token_statistics(halted_at: torch.Tensor, foreground: torch.Tensor, frame: torch.Tensor,
                     num_frames: int, num_layers: int) -> list[dict]:
    """Per frame: how many tokens each layer processed, split into foreground (bool (T,):
    pillar inside a ground-truth box) and background. halted_at: (T,) layers that
    processed each token; frame: (T,) frame of each token.

    Returns per frame {"tokens", "foreground_tokens", "active_per_layer" (list, one
    count per layer), "token_layers" (executed token-layers / (tokens * layers)),
    "foreground_token_layers", "background_token_layers", "foreground_mean_layers",
    "background_mean_layers"}.
    """
    halted_at, foreground, frame = halted_at.cpu(), foreground.cpu(), frame.cpu()

    def mean(x):
        return float(x.mean()) if x.numel() else math.nan

    stats = []
    for f in range(num_frames):
        in_frame = frame == f
        depth = halted_at[in_frame].double()
        fg = foreground[in_frame]
        stats.append({
            "tokens": int(in_frame.sum()),
            "foreground_tokens": int(fg.sum()),
            "active_per_layer": [int((depth > layer).sum()) for layer in range(num_layers)],
            "token_layers": mean(depth) / num_layers,
            "foreground_token_layers": mean(depth[fg]) / num_layers,
            "background_token_layers": mean(depth[~fg]) / num_layers,
            "foreground_mean_layers": mean(depth[fg]),
            "background_mean_layers": mean(depth[~fg]),
        })
    return stats
