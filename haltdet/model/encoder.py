"""Sparse regional attention (SRA) encoder over pillar tokens, SST-style.

The BEV grid is cut into windows of `window_size` x `window_size` pillars; tokens attend
only to tokens of their own window. Even layers use unshifted windows, odd layers windows
shifted by half a window, so information crosses window borders.

Batching: windows hold between 1 and window_size**2 tokens. Each window is put in the
smallest of a few padding buckets (sizes `BUCKET_SIZES` scaled to the window) that holds
it; each bucket is one dense (windows, slots, channels) tensor and one attention call,
with padded slots masked out of the keys. No Python loop runs over windows, only over
the handful of buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Bucket capacities as fractions of the window's pillar count (the last is the full window).
BUCKET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)


@dataclass
class Bucket:
    """Windows padded to `slots` tokens.

    gather_index: (num_windows * slots,) token filling each padded slot; padding slots
      hold T, the index of an extra all-zero row.
    key_valid: (num_windows, slots) bool, False on padding.
    """

    gather_index: torch.Tensor
    key_valid: torch.Tensor
    slots: int

    @property
    def num_windows(self) -> int:
        return self.key_valid.shape[0]


@dataclass
class WindowPartition:
    """How a set of tokens is grouped into windows for one shift.

    buckets: the padding buckets.
    gather_index: (S,) the buckets' gather indices one after the other (S padded slots
      in all); each bucket's is a slice of it.
    scatter_index: (T,) position of each token in the concatenation of all buckets'
      flattened padded slots.
    position: (T, C) sine encoding of each token's coordinates inside its window.
    """

    buckets: list[Bucket]
    gather_index: torch.Tensor
    scatter_index: torch.Tensor
    position: torch.Tensor


def partition_windows(coords: torch.Tensor, window_size: int, shift: int,
                      channels: int) -> WindowPartition:
    """Group tokens into (possibly shifted) windows.

    Args:
        coords: (T, 3) int64 (frame, iy, ix) pillar coordinates.
        window_size: window side in pillars.
        shift: shift of the window grid in pillars (0 or window_size // 2).
        channels: width of the positional encoding.
    """
    device = coords.device
    num_tokens = coords.shape[0]
    shifted_y = coords[:, 1] + shift
    shifted_x = coords[:, 2] + shift
    window_y = torch.div(shifted_y, window_size, rounding_mode="floor")
    window_x = torch.div(shifted_x, window_size, rounding_mode="floor")
    windows_per_row = int(window_x.max().item()) + 1 if num_tokens else 1
    windows_per_col = int(window_y.max().item()) + 1 if num_tokens else 1
    window_key = (coords[:, 0] * windows_per_col + window_y) * windows_per_row + window_x

    order = torch.argsort(window_key, stable=True)
    _, window_of_sorted, counts = torch.unique_consecutive(
        window_key[order], return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_tokens, device=device) - starts[window_of_sorted]

    # Every window goes to the smallest bucket that holds it. The buckets' padded slots are
    # laid out one after the other (bucket by bucket, window by window), all at once: no
    # loop over buckets but the final slicing.
    capacity = window_size * window_size
    sizes = sorted({max(1, math.ceil(capacity * f)) for f in BUCKET_FRACTIONS})
    size_tensor = torch.tensor(sizes, device=device)
    bucket_of_window = torch.searchsorted(size_tensor, counts)
    windows_in_bucket = torch.bincount(bucket_of_window, minlength=len(sizes))
    bucket_slots = windows_in_bucket * size_tensor
    bucket_start = torch.cumsum(bucket_slots, 0) - bucket_slots
    window_order = torch.argsort(bucket_of_window, stable=True)
    window_rank = torch.empty_like(window_order)
    window_rank[window_order] = torch.arange(window_order.numel(), device=device)
    window_rank -= (torch.cumsum(windows_in_bucket, 0) - windows_in_bucket)[bucket_of_window]
    window_start = bucket_start[bucket_of_window] + window_rank * size_tensor[bucket_of_window]

    scatter_index = torch.empty(num_tokens, dtype=torch.long, device=device)
    scatter_index[order] = window_start[window_of_sorted] + rank
    total_slots, *per_bucket = torch.cat([bucket_slots.sum()[None], windows_in_bucket]).tolist()
    gather_all = torch.full((total_slots,), num_tokens, dtype=torch.long, device=device)
    gather_all[scatter_index] = torch.arange(num_tokens, device=device)
    buckets, offset = [], 0
    for slots, num_windows in zip(sizes, per_bucket):
        if num_windows:
            gather_index = gather_all[offset:offset + num_windows * slots]
            buckets.append(Bucket(gather_index, (gather_index < num_tokens).view(num_windows, slots), slots))
            offset += num_windows * slots
    in_window = torch.stack([shifted_x % window_size, shifted_y % window_size], dim=1)
    position = sine_encoding(in_window, window_size, channels)
    return WindowPartition(buckets, gather_all, scatter_index, position)


def sine_encoding(cells: torch.Tensor, window_size: int, channels: int) -> torch.Tensor:
    """(T, 2) integer in-window (x, y) cells -> (T, channels) sine/cosine encoding:
    per axis, sin then cos of the centred coordinate at `channels // 4` octave frequencies.
    The window_size possible values per axis are encoded once and looked up."""
    values = torch.arange(window_size, device=cells.device)
    centred = (values.float() + 0.5) / window_size - 0.5  # in (-0.5, 0.5)
    num_freq = channels // 4
    freqs = torch.pow(2.0, torch.arange(num_freq, device=cells.device, dtype=torch.float32)) * math.pi
    angles = centred[:, None] * freqs  # (window_size, F)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)  # (window_size, 2F)
    return torch.cat([table[cells[:, 0]], table[cells[:, 1]]], dim=1)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows. Positions enter queries and keys only."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_key = nn.Linear(d_model, 2 * d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, partition: WindowPartition,
                key_active: torch.Tensor | None = None) -> torch.Tensor:
        """x: (T, C) tokens; key_active: optional (T,) bool, False = may not be attended
        to (halted tokens in the training pass). Returns (T, C)."""
        num_tokens, channels = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        qkv = torch.cat([self.query_key(x + partition.position.to(x.dtype)), self.value(x)], dim=1)
        qkv = torch.cat([qkv, qkv.new_zeros(1, 3 * channels)])  # row T: padding
        packed_all = qkv.index_select(0, partition.gather_index)
        if key_active is not None:
            active_all = torch.cat([key_active, key_active.new_zeros(1)])[partition.gather_index]
        outputs, offset = [], 0
        for bucket in partition.buckets:
            rows = slice(offset, offset + bucket.gather_index.numel())
            offset = rows.stop
            packed = packed_all[rows].view(bucket.num_windows, bucket.slots, 3, heads, head_dim)
            q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # (W, H, S, D) each
            if key_active is None:
                mask = bucket.key_valid[:, None, None, :]  # (W, 1, 1, S)
            else:
                active = active_all[rows].view_as(bucket.key_valid)
                # A query may always attend to itself, so no row is fully masked.
                self_slot = torch.eye(bucket.slots, dtype=torch.bool, device=x.device)
                mask = (active[:, None, :] | self_slot)[:, None]  # (W, 1, S, S)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outputs.append(attended.permute(0, 2, 1, 3).reshape(-1, channels))
        if not outputs:  # no tokens: an empty result that keeps every parameter in the
            return self.out(qkv[:num_tokens, 2 * channels:])  # graph, as DDP requires
        return self.out(torch.cat(outputs).index_select(0, partition.scatter_index))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer with window attention (as in SST)."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attention = WindowAttention(d_model, num_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, partition: WindowPartition,
                key_active: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, partition, key_active)))
        return self.norm2(x + self.dropout(self.ffn(x)))


@dataclass
class EncoderOutput:
    """What the encoder hands to the BEV stage.

    features: (T, C) every token's most recent feature: a halted token keeps the feature
      it had when it halted (token recycling uses it).
    halted_at: (T,) int64 number of layers that processed the token (num_layers if it
      never halted).
    scores: per halting stage, (T,) halting scores (0 for tokens already halted before that
      stage; in the removal pass also for tokens never scored). Training uses them.
    gate: (T,) float mask of the last stage, 1 = active to the end. Its forward value is
      exactly 0/1; in training its gradient reaches the scores (straight-through).
    """

    features: torch.Tensor
    halted_at: torch.Tensor
    scores: list[torch.Tensor]
    gate: torch.Tensor


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
        return torch.sigmoid(self.net(x).squeeze(1).float())


class BEVContextScorer(nn.Module):
    """Halting score from a token and its neighbourhood: active tokens are reduced to a few
    channels, scattered to the pillar grid, passed through two 3x3 convolutions, and read
    back at the tokens. Halted tokens are not scattered, so the training (masked) and
    inference (removed) passes see the same map."""

    def __init__(self, d_model: int, grid: tuple[int, int], channels: int = 16):
        super().__init__()
        self.grid = grid
        self.reduce = nn.Linear(d_model, channels)
        self.context = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Linear(2 * channels, 1)
        nn.init.constant_(self.out.bias, 3.0)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, active: torch.Tensor,
                batch_size: int) -> torch.Tensor:
        ny, nx = self.grid
        reduced = torch.relu(self.reduce(x)) * active[:, None].to(x.dtype)
        flat = (coords[:, 0] * ny + coords[:, 1]) * nx + coords[:, 2]
        canvas = reduced.new_zeros(batch_size * ny * nx, reduced.shape[1]).index_copy(0, flat, reduced)
        bev = canvas.view(batch_size, ny, nx, -1).permute(0, 3, 1, 2)
        context = self.context(bev).permute(0, 2, 3, 1).reshape(batch_size * ny * nx, -1)[flat]
        return torch.sigmoid(self.out(torch.cat([reduced, context], dim=1)).squeeze(1).float())


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


class SparseWindowEncoder(nn.Module):
    """A stack of window-attention layers alternating unshifted and shifted windows, with
    optional token halting after chosen layers.

    Halting (METHOD.md section 2). After `halting_layers[k]` layers, a scorer gives every
    still-active token a score; tokens below the stage's threshold halt and no later layer
    processes them. Two passes compute the same values:
      * removal (inference): halted tokens are physically dropped, later layers run on the
        active tokens only, so their cost falls with the count;
      * masked (training): every token goes through every layer, but halted tokens are
        excluded from the attention keys and their features are not updated, through a
        gate whose forward value is the hard 0/1 decision and whose gradient reaches the
        score (straight-through: gate = hard + score - stopgrad(score)).
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, num_layers: int,
                 window_size: int, dropout: float = 0.0, halting_layers: list[int] | None = None,
                 scorer: str = "mlp", grid: tuple[int, int] | None = None):
        super().__init__()
        self.d_model = d_model
        self.window_size = window_size
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.halting_layers = list(halting_layers or [])
        self.scorers = nn.ModuleList(
            TokenScorer(d_model) if scorer == "mlp" else BEVContextScorer(d_model, grid)
            for _ in self.halting_layers)
        # Decision knobs, per stage; plain attributes so evaluation can override them.
        self.thresholds = [0.5] * len(self.halting_layers)
        self.keep_ratios: list[float] | None = None
        self.max_tokens = 0
        # None: straight-through gate (the method). A temperature T replaces the gate by the
        # smooth relaxation sigmoid((score - threshold) / T), only to compare gradients.
        self.relaxed_temperature: float | None = None

    def shift_of_layer(self, layer: int) -> int:
        return 0 if layer % 2 == 0 else self.window_size // 2

    def partitions(self, coords: torch.Tensor) -> dict[int, WindowPartition]:
        """The window partitions of both shifts for a token set."""
        shifts = {self.shift_of_layer(i) for i in range(len(self.layers))}
        return {s: partition_windows(coords, self.window_size, s, self.d_model) for s in shifts}

    def _decide(self, stage: int, scores, frame, active) -> torch.Tensor:
        ratio = self.keep_ratios[stage] if self.keep_ratios else None
        return select_per_frame(scores, frame, active, self.thresholds[stage], ratio, self.max_tokens)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int = 1,
                masked: bool | None = None) -> EncoderOutput:
        """features: (T, C); coords: (T, 3) (frame, iy, ix).

        masked: run the masked (training) pass; default: in training mode. Without
        halting stages both passes are the plain encoder.
        """
        if masked is None:
            masked = self.training
        if masked or not self.halting_layers:
            return self._forward_masked(features, coords, batch_size)
        return self._forward_removal(features, coords, batch_size)

    def _forward_masked(self, x, coords, batch_size) -> EncoderOutput:
        num_tokens = x.shape[0]
        partitions = self.partitions(coords)
        halted_at = torch.full((num_tokens,), len(self.layers), dtype=torch.long, device=x.device)
        active = torch.ones(num_tokens, dtype=torch.bool, device=x.device)
        gate = torch.ones(num_tokens, dtype=torch.float32, device=x.device)
        all_scores = []
        for i, layer in enumerate(self.layers):
            if i in self.halting_layers:
                stage = self.halting_layers.index(i)
                scores = self.scorers[stage](x, coords, active, batch_size) * active
                keep = self._decide(stage, scores.detach(), coords[:, 0], active)
                halted_at[active & ~keep] = i
                active = keep
                if self.relaxed_temperature is None:
                    # (scores - scores.detach()) is exactly 0 forward: the gate stays exactly 0/1.
                    gate = gate * (keep.float() + (scores - scores.detach()))
                else:
                    gate = gate * torch.sigmoid((scores - self.thresholds[stage]) / self.relaxed_temperature)
                all_scores.append(scores)
            if not self.halting_layers:
                x = layer(x, partitions[self.shift_of_layer(i)])
                continue
            updated = layer(x, partitions[self.shift_of_layer(i)], key_active=active)
            g = gate.to(x.dtype)[:, None]
            x = g * updated + (1 - g) * x
        return EncoderOutput(x, halted_at, all_scores, gate)

    def _forward_removal(self, x, coords, batch_size) -> EncoderOutput:
        num_tokens = x.shape[0]
        features = x
        halted_at = torch.full((num_tokens,), len(self.layers), dtype=torch.long, device=x.device)
        alive = torch.arange(num_tokens, device=x.device)  # original index of each active token
        alive_coords = coords
        partitions = self.partitions(coords)
        all_scores = []
        for i, layer in enumerate(self.layers):
            if i in self.halting_layers:
                stage = self.halting_layers.index(i)
                everyone = torch.ones(alive.numel(), dtype=torch.bool, device=x.device)
                scores = self.scorers[stage](x, alive_coords, everyone, batch_size)
                keep = self._decide(stage, scores, alive_coords[:, 0], everyone)
                stage_scores = torch.zeros(num_tokens, dtype=scores.dtype, device=x.device)
                all_scores.append(stage_scores.index_copy(0, alive, scores))
                # Halted tokens leave with their current feature (kept for recycling).
                features = features.index_copy(0, alive, x)
                halted_at[alive[~keep]] = i
                alive, x, alive_coords = alive[keep], x[keep], alive_coords[keep]
                partitions = self.partitions(alive_coords)
            x = layer(x, partitions[self.shift_of_layer(i)])
        features = features.index_copy(0, alive, x)
        gate = torch.zeros(num_tokens, dtype=torch.float32, device=x.device)
        gate[alive] = 1.0
        return EncoderOutput(features, halted_at, all_scores, gate)
