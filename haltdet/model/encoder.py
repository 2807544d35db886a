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
    scatter_index: (T,) position of each token in the concatenation of all buckets'
      flattened padded slots.
    position: (T, C) sine encoding of each token's coordinates inside its window.
    """

    buckets: list[Bucket]
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

    capacity = window_size * window_size
    sizes = sorted({max(1, math.ceil(capacity * f)) for f in BUCKET_FRACTIONS})
    size_tensor = torch.tensor(sizes, device=device)
    bucket_of_window = torch.searchsorted(size_tensor, counts)

    buckets = []
    scatter_index = torch.zeros(num_tokens, dtype=torch.long, device=device)
    offset = 0
    for b, slots in enumerate(sizes):
        in_bucket = bucket_of_window == b
        num_windows = int(in_bucket.sum().item())
        if num_windows == 0:
            continue
        slot_of_window = torch.cumsum(in_bucket.long(), 0) - 1
        token_in_bucket = in_bucket[window_of_sorted]
        token_index = order[token_in_bucket]
        slot_index = slot_of_window[window_of_sorted[token_in_bucket]] * slots + rank[token_in_bucket]
        gather_index = torch.full((num_windows * slots,), num_tokens, dtype=torch.long, device=device)
        gather_index[slot_index] = token_index
        scatter_index[token_index] = slot_index + offset
        offset += num_windows * slots
        key_valid = (gather_index < num_tokens).view(num_windows, slots)
        buckets.append(Bucket(gather_index, key_valid, slots))
    in_window = torch.stack([shifted_x % window_size, shifted_y % window_size], dim=1)
    position = sine_encoding(in_window, window_size, channels)
    return WindowPartition(buckets, scatter_index, position)


def sine_encoding(cells: torch.Tensor, window_size: int, channels: int) -> torch.Tensor:
    """(T, 2) integer in-window (x, y) cells -> (T, channels) sine/cosine encoding."""
    centred = (cells.float() + 0.5) / window_size - 0.5  # in (-0.5, 0.5)
    num_freq = channels // 4
    freqs = torch.pow(2.0, torch.arange(num_freq, device=cells.device, dtype=torch.float32)) * math.pi
    angles = centred[:, :, None] * freqs  # (T, 2, F)
    encoding = torch.cat([angles.sin(), angles.cos()], dim=2)  # (T, 2, 2F)
    return encoding.reshape(cells.shape[0], 4 * num_freq)


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
        if key_active is not None:
            key_active = torch.cat([key_active, key_active.new_zeros(1)])
        outputs = []
        for bucket in partition.buckets:
            packed = qkv.index_select(0, bucket.gather_index)
            packed = packed.view(bucket.num_windows, bucket.slots, 3, heads, head_dim)
            q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # (W, H, S, D) each
            if key_active is None:
                mask = bucket.key_valid[:, None, None, :]  # (W, 1, 1, S)
            else:
                active = key_active[bucket.gather_index].view_as(bucket.key_valid)
                # A query may always attend to itself, so no row is fully masked.
                self_slot = torch.eye(bucket.slots, dtype=torch.bool, device=x.device)
                mask = (active[:, None, :] | self_slot)[:, None]  # (W, 1, S, S)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outputs.append(attended.permute(0, 2, 1, 3).reshape(-1, channels))
        if not outputs:
            return self.out(x.new_zeros(num_tokens, channels))
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


class SparseWindowEncoder(nn.Module):
    """A stack of window-attention layers alternating unshifted and shifted windows."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, num_layers: int,
                 window_size: int, dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.window_size = window_size
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ffn_dim, dropout) for _ in range(num_layers))

    def shift_of_layer(self, layer: int) -> int:
        return 0 if layer % 2 == 0 else self.window_size // 2

    def partitions(self, coords: torch.Tensor) -> dict[int, WindowPartition]:
        """The window partitions of both shifts for a token set."""
        shifts = {self.shift_of_layer(i) for i in range(len(self.layers))}
        return {s: partition_windows(coords, self.window_size, s, self.d_model) for s in shifts}

    def forward(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """features: (T, C); coords: (T, 3) (frame, iy, ix). Returns (T, C)."""
        partitions = self.partitions(coords)
        for i, layer in enumerate(self.layers):
            features = layer(features, partitions[self.shift_of_layer(i)])
        return features
