"""Sparse regional attention (SRA) encoder over pillar tokens, SST-style.

The BEV grid is cut into windows of `window_size` x `window_size` pillars; tokens attend
only to tokens of their own window. Even layers use unshifted windows, odd layers windows
shifted by half a window, so information crosses window borders.

Batching: windows hold between 1 and window_size**2 tokens. Each window is put in the
smallest of a few padding buckets (`attention_plan`, sizes scaled to the window) that holds
it, with padded slots masked out of the keys. In sparse token sets (`PACK_SPARSE`), such
as the survivors of a halting stage, most windows hold a few tokens, which padding would
multiply: there the small windows (at most `PACK_FRACTION` of the window's pillars) are
packed together into chunks of that many slots instead, each token attending only to its
own window's tokens in the chunk. The chunks and each bucket are one dense (rows, slots,
channels) tensor and one attention call. Python loops over the handful of buckets, and
over windows only to pack them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from haltdet.model.halting import TokenHalting

# Bucket capacities as fractions of the window's pillar count (the last is the full window).
BUCKET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)


# In a token set whose windows hold on average at most PACK_SPARSE of their pillars, the
# windows of at most PACK_FRACTION of them are packed into chunks of that many slots
# (`_pack_windows`) rather than padded each to a bucket of its own. Denser sets are not
# packed: there the chunks' longer rows cost more than the padding they save. Measured
# layer by layer (docs/experiments.md).
PACK_FRACTION = 1 / 4
PACK_SPARSE = 1 / 16


# Below this many slots a window's attention rows are too short for the vector loops of
# the CPU kernels: torch.softmax falls back to scalar code (on an AVX512 CPU, rows of 9
# take ~16x as long as rows of 16 for as many entries: scripts/attention_kernels.py
# --softmax-rows), so such buckets attend by matrix products with their own softmax
# (`short_softmax`).
SHORT_ROW = 16


def attention_plan(device: torch.device | str = "cpu") -> tuple[float, tuple[float, ...]]:
    """(largest bucket, in slots, that attends by matrix products rather than the fused
    kernel; the bucket capacities), for the device and, on a CPU, the current thread
    count. Measured on CPUs by scripts/attention_kernels.py: the fused kernel gains little
    from a second thread, the matrix products do (at two threads every bucket); at one
    thread they win only on short rows. Other devices use the fused kernel for every
    bucket, one kernel launch where the products take five (not measured here)."""
    if torch.device(device).type != "cpu":
        return 0, BUCKET_FRACTIONS
    return (math.inf if torch.get_num_threads() > 1 else SHORT_ROW - 1), BUCKET_FRACTIONS


@dataclass
class Bucket:
    """Rows of `slots` token slots, each row one window padded to `slots` or, if `segment`
    is given, a chunk of several small windows packed together.

    gather_index: (num_windows * slots,) token filling each slot; padding slots hold T
      (no token).
    key_valid: (num_windows, slots) bool, False on padding.
    segment: None, or (num_windows, slots) int64: in a chunk, the window of each slot's
      token, and a negative label of its own on each padding slot; a token attends only
      to the tokens of its own window.
    """

    gather_index: torch.Tensor
    key_valid: torch.Tensor
    slots: int
    fused: bool = True  # the fused attention kernel, else matrix products (`window_attention`)
    segment: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    additive: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mask is None:
            self.mask = key_mask(self.key_valid, self.segment)

    @property
    def num_windows(self) -> int:
        """Rows: windows, or chunks of windows."""
        return self.key_valid.shape[0]

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as an additive bias: 0 where attended, -inf elsewhere (made at the first
        call if the partition did not make it)."""
        if self.additive is None or self.additive.dtype != dtype:
            self.additive = torch.zeros(self.mask.shape, dtype=dtype,
                                        device=self.mask.device).masked_fill_(~self.mask, -math.inf)
        return self.additive


def key_mask(key_valid, segment=None):
    """Which keys each query of a bucket may attend to (`key_valid`, `segment` as in
    `Bucket`; numpy arrays or tensors alike), broadcastable to (rows, heads, slots, slots):
    (rows, 1, 1, slots) for padded windows; (rows, 1, slots, slots) for chunks, the slots
    of the query's window (a padding slot's query: itself only, a finite row). Made once
    per partition: the layers of one shift share it."""
    if segment is None:
        return key_valid[:, None, None, :]
    return (segment[:, :, None] == segment[:, None, :])[:, None]


@dataclass
class WindowPartition:
    """How a set of tokens is grouped into windows for one shift.

    buckets: the padding buckets.
    gather_index: (S,) the buckets' gather indices one after the other (S padded slots
      in all); each bucket's is a slice of it.
    scatter_index: (T,) position of each token in the concatenation of all buckets'
      flattened padded slots.
    position: (T, C) sine encoding of each token's coordinates inside its window.
    order, window_of_sorted, capacity: the tokens sorted by window, each one's window
      (numbered 0, 1, ... in that order; both host numpy arrays) and the window's pillar
      count, kept by `partition_windows` so that `subset` can partition the survivors of a
      halting stage without sorting again (None, None, 0 for equal-size groups).
    """

    buckets: list[Bucket]
    gather_index: torch.Tensor
    scatter_index: torch.Tensor
    position: torch.Tensor
    order: np.ndarray | None = None
    window_of_sorted: np.ndarray | None = None
    capacity: int = 0

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """(S,) the row of q, k, v each padded slot reads: its token, padding the last one
        (masked out of the keys, its query's output unused: any finite row serves, and no
        zero row has to be appended to a copy of q, k, v). Made once, shared by the layers."""
        return self.gather_index.clamp(max=max(self.scatter_index.numel() - 1, 0))

    def subset(self, keep: torch.Tensor, rows: torch.Tensor | None = None) -> "WindowPartition":
        """The partition of the tokens with `keep` (T,) bool, numbered in their order: the
        same as partitioning their coordinates afresh (a stable sort's order restricted to
        a subset is the subset's stable order), from the stored order. rows: the indices
        of `keep`'s True entries, if the caller has them."""
        rows = keep.nonzero().squeeze(1) if rows is None else rows
        kept = keep.cpu().numpy()
        kept_sorted = np.flatnonzero(kept[self.order])  # places in the stored order that stay
        order = (np.cumsum(kept) - 1)[self.order[kept_sorted]]
        window_of_sorted, counts = _consecutive_runs(self.window_of_sorted[kept_sorted])
        return _bucket_windows(order, window_of_sorted, counts, self.capacity, self.position.index_select(0, rows))


def partition_windows(coords: torch.Tensor, window_size: int, shift: int,
                      channels: int) -> WindowPartition:
    """Group tokens into (possibly shifted) windows.

    Args:
        coords: (T, 3) int64 (frame, iy, ix) pillar coordinates.
        window_size: window side in pillars.
        shift: shift of the window grid in pillars (0 or window_size // 2).
        channels: width of the positional encoding.
    """
    shifted_y, shifted_x, window_y, window_x = _shifted_windows(coords, window_size, shift)
    position = _in_window_position(shifted_y, shifted_x, window_size, channels)
    # The layout is index arithmetic on a few thousand integers: on the host, in numpy, where
    # each operation costs a fraction of a torch operator's dispatch.
    frame, window_y, window_x = coords[:, 0].cpu().numpy(), window_y.cpu().numpy(), window_x.cpu().numpy()
    windows_per_row = int(window_x.max()) + 1 if frame.size else 1
    windows_per_col = int(window_y.max()) + 1 if frame.size else 1
    window_key = (frame * windows_per_col + window_y) * windows_per_row + window_x
    order = np.argsort(window_key, kind="stable")
    window_of_sorted, counts = _consecutive_runs(window_key[order])
    return _bucket_windows(order, window_of_sorted, counts, window_size * window_size, position)


def _consecutive_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run of each entry, numbered 0, 1, ...; length of each run) of equal consecutive
    `values`."""
    starts = np.flatnonzero(np.diff(values, prepend=values[:1] - 1)) if values.size else values[:0]
    run = np.zeros(values.size, dtype=np.int64)
    run[starts[1:]] = 1
    return np.cumsum(run), np.diff(np.append(starts, values.size))


def _bucket_windows(order: np.ndarray, window_of_sorted: np.ndarray, counts: np.ndarray, capacity: int,
                    position: torch.Tensor) -> WindowPartition:
    """The padded layout of windows: tokens `order` sorted by window, `window_of_sorted`
    their windows (0, 1, ...), `counts` (W,) tokens per window of `capacity` pillars (host
    int64 arrays). The index tensors go to `position`'s device."""
    device = position.device
    num_tokens = order.size
    rank = np.arange(num_tokens) - (np.cumsum(counts) - counts)[window_of_sorted]

    # In sparse sets small windows go into chunks (first in the layout), every other
    # window to the smallest bucket that holds it. The buckets' slots are laid out one
    # after the other (bucket by bucket, window by window), all at once: no loop over
    # buckets but the final slicing.
    matmul_max, fractions = attention_plan(device)
    sparse = num_tokens <= PACK_SPARSE * capacity * counts.size
    chunk = math.ceil(capacity * PACK_FRACTION) if sparse else 0
    sizes = np.array(sorted({max(1, math.ceil(capacity * f)) for f in fractions} - set(range(chunk + 1))))
    chunk_start, num_chunks, big = _pack_windows(counts, chunk)
    big_counts = counts if big is None else counts[big]
    bucket_of_window = np.searchsorted(sizes, big_counts)
    windows_in_bucket = np.bincount(bucket_of_window, minlength=sizes.size)
    bucket_slots = windows_in_bucket * sizes
    bucket_start = num_chunks * chunk + np.cumsum(bucket_slots) - bucket_slots
    window_order = np.argsort(bucket_of_window, kind="stable")
    window_rank = np.empty_like(window_order)
    window_rank[window_order] = np.arange(window_order.size)
    window_rank -= (np.cumsum(windows_in_bucket) - windows_in_bucket)[bucket_of_window]
    window_start = bucket_start[bucket_of_window] + window_rank * sizes[bucket_of_window]
    if big is not None:
        chunk_start[big] = window_start
        window_start = chunk_start

    slot_of_sorted = window_start[window_of_sorted] + rank
    scatter_index = np.empty(num_tokens, dtype=np.int64)
    scatter_index[order] = slot_of_sorted
    total_slots = num_chunks * chunk + int(bucket_slots.sum())
    gather_all = np.full(total_slots, num_tokens, dtype=np.int64)
    gather_all[scatter_index] = np.arange(num_tokens)
    segment = None
    if num_chunks:  # in the chunks, each slot's window; padding: labels of their own
        segment = -1 - np.arange(num_chunks * chunk)
        packed = slot_of_sorted < num_chunks * chunk
        segment[slot_of_sorted[packed]] = window_of_sorted[packed]
    # Each bucket's mask, and for the matrix products its additive bias, made here in numpy.
    valid = gather_all < num_tokens
    bounds = [(0, num_chunks * chunk, chunk, segment)] if num_chunks else []
    offset = num_chunks * chunk
    for slots, num_windows in zip(sizes.tolist(), windows_in_bucket.tolist()):
        if num_windows:
            bounds.append((offset, offset + num_windows * slots, slots, None))
            offset += num_windows * slots
    gather_tensor = torch.from_numpy(gather_all).to(device)
    buckets = []
    for start, end, slots, labels in bounds:
        key_valid = valid[start:end].reshape(-1, slots)
        labels = None if labels is None else labels.reshape(-1, slots)
        mask = key_mask(key_valid, labels)
        fused = slots > matmul_max
        additive = None if fused else torch.from_numpy(np.where(mask, np.float32(0), np.float32(-np.inf))).to(device)
        buckets.append(Bucket(gather_tensor[start:end], torch.from_numpy(key_valid).to(device), slots, fused,
                              None if labels is None else torch.from_numpy(labels).to(device),
                              torch.from_numpy(np.ascontiguousarray(mask)).to(device), additive))
    return WindowPartition(buckets, gather_tensor, torch.from_numpy(scatter_index).to(device), position,
                           order, window_of_sorted, capacity)


def _pack_windows(counts: np.ndarray, slots: int) -> tuple[np.ndarray | None, int, np.ndarray | None]:
    """The windows of at most `slots` tokens (`counts`, (W,)) packed into chunks of `slots`
    slots, largest first, each chunk filled until the next window does not fit (next fit
    decreasing). Returns each window's first slot in the chunks' layout (0 for the
    windows not packed), the number of chunks and the indices of the windows not packed;
    (None, 0, None) if `slots` is 0. The sequential fill is a plain loop over a few
    hundred numbers at most."""
    if not slots:
        return None, 0, None
    small = counts <= slots
    order = np.flatnonzero(small)
    order = order[np.argsort(-counts[order], kind="stable")]  # largest first, ties by window
    firsts, chunk, fill = [], -1, slots
    for size in counts[order].tolist():
        if fill + size > slots:
            chunk, fill = chunk + 1, 0
        firsts.append(chunk * slots + fill)
        fill += size
    start = np.zeros(counts.size, dtype=np.int64)
    start[order] = firsts
    return start, chunk + 1, np.flatnonzero(~small)


def partition_groups(coords: torch.Tensor, window_size: int, shift: int, channels: int,
                     group: int) -> WindowPartition:
    """Equal-size token groups instead of windows (FlatFormer-style): each frame's tokens
    sorted by (possibly shifted) window and by their cell in it, then cut into groups of
    `group` tokens (a frame's last group padded), all in one bucket: one attention call,
    no padding but the last group's. Groups never mix frames. Positions are encoded in
    the window as for `partition_windows`.
    """
    device = coords.device
    num_tokens = coords.shape[0]
    shifted_y, shifted_x, window_y, window_x = _shifted_windows(coords, window_size, shift)
    span = int(max(shifted_y.max().item(), shifted_x.max().item())) + 1 if num_tokens else 1
    windows = -(-span // window_size)
    cell = (shifted_y % window_size) * window_size + shifted_x % window_size
    key = ((coords[:, 0] * windows + window_y) * windows + window_x) * window_size * window_size + cell
    order = torch.argsort(key, stable=True)
    frame = coords[order, 0]
    num_frames = int(frame.max().item()) + 1 if num_tokens else 0
    counts = torch.bincount(frame, minlength=num_frames)
    groups = -(-counts // group)
    rank = torch.arange(num_tokens, device=device) - (torch.cumsum(counts, 0) - counts)[frame]
    first_group = torch.cumsum(groups, 0) - groups
    scatter_index = torch.empty(num_tokens, dtype=torch.long, device=device)
    scatter_index[order] = (first_group[frame] + torch.div(rank, group, rounding_mode="floor")) * group + rank % group
    total_groups = int(groups.sum().item())
    gather_all = torch.full((total_groups * group,), num_tokens, dtype=torch.long, device=device)
    gather_all[scatter_index] = torch.arange(num_tokens, device=device)
    fused = group > attention_plan(device)[0]  # the kernel the windows' buckets would use
    valid = (gather_all < num_tokens).view(total_groups, group)
    buckets = [Bucket(gather_all, valid, group, fused)] if total_groups else []
    return WindowPartition(buckets, gather_all, scatter_index,
                           _in_window_position(shifted_y, shifted_x, window_size, channels))


def _shifted_windows(coords: torch.Tensor, window_size: int, shift: int):
    """Pillar rows and columns moved by `shift`, and the window row and column of each."""
    shifted_y, shifted_x = coords[:, 1] + shift, coords[:, 2] + shift
    return (shifted_y, shifted_x, torch.div(shifted_y, window_size, rounding_mode="floor"),
            torch.div(shifted_x, window_size, rounding_mode="floor"))


def _in_window_position(shifted_y: torch.Tensor, shifted_x: torch.Tensor, window_size: int,
                        channels: int) -> torch.Tensor:
    """The sine encoding of each token's cell inside its window."""
    in_window = torch.stack([shifted_x % window_size, shifted_y % window_size], dim=1)
    return sine_encoding(in_window, window_size, channels)


def sine_encoding(cells: torch.Tensor, window_size: int, channels: int) -> torch.Tensor:
    """(T, 2) integer in-window (x, y) cells -> (T, channels) sine/cosine encoding:
    per axis, sin then cos of the centred coordinate at `channels // 4` octave frequencies.
    The window_size**2 possible encodings are made once (`_sine_table`) and looked up."""
    table = _sine_table(window_size, channels, cells.device)
    return table.index_select(0, cells[:, 1] * window_size + cells[:, 0])


@functools.lru_cache(maxsize=16)
def _sine_table(window_size: int, channels: int, device: torch.device) -> torch.Tensor:
    """(window_size**2, channels) encodings of every cell, row y * window_size + x: the x
    encoding, then the y encoding. Cached: a few kilobytes, and making it took longer than
    looking up a frame's tokens in it. Read only (callers get index_select copies)."""
    values = torch.arange(window_size, device=device)
    centred = (values.float() + 0.5) / window_size - 0.5  # in (-0.5, 0.5)
    num_freq = channels // 4
    freqs = torch.pow(2.0, torch.arange(num_freq, device=device, dtype=torch.float32)) * math.pi
    angles = centred[:, None] * freqs  # (window_size, F)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (window_size, 2F)
    return torch.cat([axis.repeat(window_size, 1), axis.repeat_interleave(window_size, dim=0)], dim=1)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows. Positions enter queries and keys only."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_key = nn.Linear(d_model, 2 * d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, partition: WindowPartition,
                key_gate: torch.Tensor | None = None, secant: bool = False) -> torch.Tensor:
        """x: (T, C) tokens. key_gate: optional (T,) weight of each token as a key (the
        halting gate of the training pass): bool, False = may not be attended to; or float,
        key j's attention weight becomes g_j exp(l_ij) / sum_k g_k exp(l_ik), so the gate's
        gradient sees what attending to the key changes (`gated_attention`, `secant`). A
        query always attends to itself. Returns (T, C)."""
        num_tokens, channels = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        query_key = self.query_key(x + partition.position.to(x.dtype))
        value = self.value(x)
        # One gather each for every bucket, then split: the backward pass of `split` is one
        # concatenation, where slicing would add each bucket's gradient into a zero-filled
        # copy of the whole tensor.
        sizes = [bucket.gather_index.numel() for bucket in partition.buckets]
        query_key_all = query_key.index_select(0, partition.rows).split(sizes)
        value_all = value.index_select(0, partition.rows).split(sizes)
        gate_all = [None] * len(sizes)
        if key_gate is not None:  # padding slots: gate 0
            gate_all = torch.cat([key_gate, key_gate.new_zeros(1)]).index_select(0, partition.gather_index).split(sizes)
        outputs = []
        for bucket, qk, v, gate in zip(partition.buckets, query_key_all, value_all, gate_all):
            q, k = qk.view(bucket.num_windows, bucket.slots, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            v = v.view(bucket.num_windows, bucket.slots, heads, head_dim).transpose(1, 2)  # (W, H, S, D) each
            if key_gate is None:
                attended = window_attention(q, k, v, bucket)
            else:
                # per key, (W, 1, S), within the keys the bucket lets each query attend to
                # (in a chunk, its own window's)
                gate, allowed = gate.view_as(bucket.key_valid)[:, None, :], bucket.mask[:, 0]
                gate = gate & allowed if gate.dtype == torch.bool else gate * allowed
                self_slot = torch.eye(bucket.slots, dtype=torch.bool, device=x.device)
                if gate.dtype == torch.bool:
                    mask = (gate | self_slot)[:, None]  # (W, 1, S, S)
                    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                else:
                    attended = gated_attention(q, k, v, torch.where(self_slot, 1.0, gate.to(q.dtype)), secant)
            outputs.append(attended.permute(0, 2, 1, 3).reshape(-1, channels))
        if not outputs:  # no tokens: an empty result that keeps every parameter in the
            return self.out(value + query_key[:, :channels] * 0)  # graph, as DDP requires
        return self.out(torch.cat(outputs).index_select(0, partition.scatter_index))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """Attention of a bucket's rows over their tokens (`Bucket.mask`: padding and, in
    chunks, other windows' tokens masked out). q, k, v: (W, H, S, D). Short rows: matrix
    products and a softmax over an additive bias; long ones: the fused kernel."""
    if bucket.fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask)
    # scaled and masked in place: no copy of q, no second logits tensor
    logits = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(bucket.bias(q.dtype))
    weights = short_softmax(logits) if bucket.slots < SHORT_ROW else torch.softmax(logits, dim=-1)
    return weights @ v


def short_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension from whole-tensor operations (the same values as
    torch.softmax to float rounding), for rows shorter than `SHORT_ROW`. Every row has a
    finite entry (a window's own tokens)."""
    exp = torch.exp(logits - logits.amax(-1, keepdim=True))
    return exp / exp.sum(-1, keepdim=True)


def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                    secant: bool = False) -> torch.Tensor:
    """Attention whose key weights carry a gate: A_ij = g_ij exp(l_ij) / sum_k g_ik exp(l_ik).

    q, k, v: (W, H, S, D); gate: (W, S, S) per query and key, >= 0, positive on the
    diagonal. With a 0/1 gate this is attention over the keys with gate 1 (the same values
    as a boolean mask). Its gradient with respect to a zero gate, the tangent
    (exp(l_ij) / Z_i) (v_j - o_i), grows without bound when the key's logit exceeds those of
    the attended keys; `secant` replaces it, for zero-gated keys only, by the change that
    including the key would make, (exp(l_ij) / (Z_i + exp(l_ij))) (v_j - o_i): the weight the
    key would get, at most 1. Forward values are the same either way. Returns (W, H, S, D).
    """
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    gate = gate[:, None]
    hard = gate.detach()
    # Shift by the largest logit among the weighted keys; a zero-gated key whose logit lies
    # far above them is clamped (its weight is 0 either way).
    shift = logits.detach().masked_fill(hard <= 0, -math.inf).amax(-1, keepdim=True)
    exp = torch.exp((logits - shift).clamp(max=30.0))
    if secant:
        attended = (exp * hard).sum(-1, keepdim=True).detach()
        scale = torch.where(hard > 0, 1.0, attended / (attended + exp.detach()))
        gate = hard + (gate - hard) * scale  # the same values: gate - hard is exactly 0 forward
    weights = exp * gate
    return (weights / weights.sum(-1, keepdim=True)) @ v


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
                key_gate: torch.Tensor | None = None, secant: bool = False) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, partition, key_gate, secant)))
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
    gate: (T,) float gate after the last stage, 1 = active to the end. Its forward value
      is exactly 0/1; in the masked pass its gradient reaches the scores (haltdet/model/halting.py).
    ponder: (T,) the ponder cost of each token under the act rule (`CumulativeHalting`,
      whose mixed outputs are then the features), else None.
    """

    features: torch.Tensor
    halted_at: torch.Tensor
    scores: list[torch.Tensor]
    gate: torch.Tensor
    ponder: torch.Tensor | None = None


class SparseWindowEncoder(nn.Module):
    """A stack of window-attention layers alternating unshifted and shifted windows, with
    optional token halting after chosen layers (`self.halting`, haltdet/model/halting.py).

    Two passes compute the same values:
      * removal (inference): halted tokens are physically dropped, later layers run on the
        active tokens only, so their cost falls with the count;
      * masked (training): every token goes through every layer, but a halted token's
        attention weight as a key and its update are multiplied by its gate, whose forward
        value is the hard 0/1 decision and whose gradient reaches the scores.
    With `halting.gradient == "hard"` training runs the removal pass too.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, num_layers: int,
                 window_size: int, dropout: float = 0.0, halting_layers: list[int] | None = None,
                 scorer: str = "mlp", gradient: str = "residual", secant: bool = True, rule: str = "threshold",
                 group_size: int = 0):
        super().__init__()
        self.d_model = d_model
        self.window_size = window_size
        self.group_size = group_size  # > 0: equal-size token groups instead of windows
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.halting = TokenHalting(d_model, halting_layers or [], scorer, gradient, secant, rule)
        self._register_load_state_dict_pre_hook(_rename_scorers)

    def shift_of_layer(self, layer: int) -> int:
        return 0 if layer % 2 == 0 else self.window_size // 2

    def partitions(self, coords: torch.Tensor) -> dict[int, WindowPartition]:
        """The window partitions of both shifts for a token set."""
        shifts = {self.shift_of_layer(i) for i in range(len(self.layers))}
        if self.group_size:
            return {s: partition_groups(coords, self.window_size, s, self.d_model, self.group_size) for s in shifts}
        return {s: partition_windows(coords, self.window_size, s, self.d_model) for s in shifts}

    def forward(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int = 1,
                masked: bool | None = None) -> EncoderOutput:
        """features: (T, C); coords: (T, 3) (frame, iy, ix).

        masked: run the masked (training) pass; default: in training mode, unless the
        halting gradient is "hard". Without halting stages both passes are the plain encoder.
        """
        if masked is None:
            masked = self.training and self.halting.gradient != "hard"
        if masked or not self.halting:
            return self._forward_masked(features, coords, batch_size)
        return self._forward_removal(features, coords, batch_size)

    def _forward_masked(self, x, coords, batch_size) -> EncoderOutput:
        num_tokens, halting = x.shape[0], self.halting
        partitions = self.partitions(coords)
        halted_at = torch.full((num_tokens,), len(self.layers), dtype=torch.long, device=x.device)
        active = torch.ones(num_tokens, dtype=torch.bool, device=x.device)
        gate = torch.ones(num_tokens, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        all_scores = []
        state = halting.start(x)  # the act rule's; None for the threshold rule
        index = torch.arange(num_tokens, device=x.device) if state is not None else None
        for i, layer in enumerate(self.layers):
            stage = halting.stage_before(i)
            if stage is not None:
                decision = halting(stage, x, coords, active, batch_size, state, index)
                halted_at[active & ~decision.keep] = i
                # A stage's factor joins the gates of the tokens it decided on only: a token
                # halted earlier keeps the gate of the decision that halted it.
                gate = torch.where(active, gate * decision.factor, gate)
                active = decision.keep
                all_scores.append(decision.scores)
            partition = partitions[self.shift_of_layer(i)]
            if not all_scores:  # before the first stage every token is active
                x = layer(x, partition)
                continue
            updated = layer(x, partition, halting.key_gate(gate, active), halting.secant)
            g = (gate if halting.residual_path else active.float()).to(x.dtype)[:, None]
            x = g * updated + (1 - g) * x
        if state is None:
            return EncoderOutput(x, halted_at, all_scores, gate)
        rows = active.nonzero().squeeze(1)
        return EncoderOutput(state.finish(rows, x[rows]), halted_at, all_scores, gate, state.ponder)

    def _forward_removal(self, x, coords, batch_size) -> EncoderOutput:
        num_tokens, inputs = x.shape[0], x
        features = None  # every token's latest feature, from the first stage on
        halted_at = torch.full((num_tokens,), len(self.layers), dtype=torch.long, device=x.device)
        alive = torch.arange(num_tokens, device=x.device)  # original index of each active token
        alive_coords = coords
        partitions = self.partitions(coords)
        # Training with the "hard" gradient: the survivors' updates carry their gates.
        alive_gate = torch.ones(num_tokens, device=x.device) if self.training and torch.is_grad_enabled() else None
        all_scores = []
        state = self.halting.start(x)
        for i, layer in enumerate(self.layers):
            stage = self.halting.stage_before(i)
            if stage is not None:
                everyone = torch.ones(alive.numel(), dtype=torch.bool, device=x.device)
                decision = self.halting(stage, x, alive_coords, everyone, batch_size, state, alive)
                keep = decision.keep
                rows = keep.nonzero().squeeze(1)
                all_scores.append(decision.scores.new_zeros(num_tokens).index_copy(0, alive, decision.scores))
                # Halted tokens leave with their current feature (kept for recycling); before
                # the first stage every token is alive, in order.
                features = x if features is None else _write_rows(features, alive, x, inputs)
                halted_at.index_copy_(0, alive, torch.where(keep, len(self.layers), i))
                if alive_gate is not None:
                    alive_gate = (alive_gate * decision.factor)[rows]
                # index_select: several times faster than indexing for rows of a matrix on a CPU
                alive, x, alive_coords = alive[rows], x.index_select(0, rows), alive_coords.index_select(0, rows)
                partitions = (self.partitions(alive_coords) if self.group_size
                              else {s: p.subset(keep, rows) for s, p in partitions.items()})
            updated = layer(x, partitions[self.shift_of_layer(i)])
            if alive_gate is None or not all_scores:
                x = updated
            else:
                g = alive_gate.to(x.dtype)[:, None]
                x = g * updated + (1 - g) * x
        # (the removal pass runs only with halting stages: `features` is set)
        features = _write_rows(features, alive, x, inputs) if state is None else state.finish(alive, x)
        gate = torch.zeros(num_tokens, dtype=torch.float32, device=x.device)
        gate[alive] = 1.0
        return EncoderOutput(features, halted_at, all_scores, gate, None if state is None else state.ponder)


def _write_rows(features: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                inputs: torch.Tensor) -> torch.Tensor:
    """`features` with `values` in `rows`: in place without autograd (a frame's features
    are megabytes, a fresh copy at every stage costs more than the write), never into the
    encoder's own input."""
    if torch.is_grad_enabled() or features is inputs:
        return features.index_copy(0, rows, values)
    return features.index_copy_(0, rows, values)


def _rename_scorers(state_dict, prefix, *args) -> None:
    """Checkpoints written before the halting module kept the scorers at `encoder.scorers`."""
    old = prefix + "scorers."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "halting." + key[len(prefix):]] = state_dict.pop(key)
