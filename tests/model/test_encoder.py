"""The batched window attention equals attention computed window by window."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haltdet.model import encoder
from haltdet.model.encoder import EncoderLayer, SparseWindowEncoder, WindowAttention, partition_windows


def random_coords(num_tokens: int, grid: int = 60, frames: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randperm(frames * grid * grid, generator=generator)[:num_tokens].sort().values
    return torch.stack([keys // (grid * grid), (keys // grid) % grid, keys % grid], dim=1)


def reference_attention(attention: WindowAttention, x, coords, window_size, shift, key_active=None):
    """Plain per-window multi-head attention, one window at a time."""
    channels = x.shape[1]
    heads = attention.num_heads
    position = partition_windows(coords, window_size, shift, channels).position
    q_all, k_all = attention.query_key(x + position).chunk(2, dim=1)
    v_all = attention.value(x)
    window = torch.stack([coords[:, 0], (coords[:, 1] + shift) // window_size,
                          (coords[:, 2] + shift) // window_size], dim=1)
    out = torch.zeros_like(x)
    for key in torch.unique(window, dim=0):
        members = torch.nonzero((window == key).all(dim=1)).flatten()
        q, k, v = (t[members].view(len(members), heads, -1).transpose(0, 1) for t in (q_all, k_all, v_all))
        scores = q @ k.transpose(1, 2) / math.sqrt(channels // heads)
        if key_active is not None:
            allowed = key_active[members][None, :] | torch.eye(len(members), dtype=torch.bool)
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[members] = (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(members), channels)
    return attention.out(out)


@pytest.mark.parametrize("matmul_max", [0, 9, 1000])  # fused kernel only, both, matrix products only
@pytest.mark.parametrize("pack", [0.0, encoder.PACK_FRACTION, 1.0])  # no chunks, the default, all chunks
@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("num_tokens", [1, 40, 700, 3000])
def test_window_attention_matches_per_window_reference(shift, num_tokens, pack, matmul_max, monkeypatch):
    """Both attention kernels (`encoder.attention_plan` picks them by device and thread count), with
    small windows packed into chunks or each padded."""
    fractions = encoder.attention_plan()[1]
    monkeypatch.setattr(encoder, "attention_plan", lambda device="cpu": (matmul_max, fractions))
    monkeypatch.setattr(encoder, "PACK_FRACTION", pack)
    monkeypatch.setattr(encoder, "PACK_SPARSE", 1.0)  # every token set sparse
    torch.manual_seed(1)
    coords = random_coords(num_tokens)
    x = torch.randn(num_tokens, 32)
    attention = WindowAttention(32, 4)
    partition = partition_windows(coords, 6, shift, 32)
    got = attention(x, partition)
    expected = reference_attention(attention, x, coords, 6, shift)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_short_softmax_matches_torch_softmax_with_masked_entries():
    torch.manual_seed(3)
    for length in (1, 2, 9, 15):
        logits = torch.randn(50, 4, length, length) * 20
        logits[..., 1:] = logits[..., 1:].masked_fill(torch.rand(50, 1, 1, length - 1) < 0.4, float("-inf"))
        torch.testing.assert_close(encoder.short_softmax(logits), torch.softmax(logits, -1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gate_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("pack", [False, True])
def test_masked_keys_are_not_attended(gate_dtype, pack, monkeypatch):
    """A boolean key mask and a 0/1 float key gate (the halting gate) both exclude keys,
    in padded windows and in chunks of packed windows."""
    monkeypatch.setattr(encoder, "PACK_SPARSE", 1.0 if pack else 0.0)
    torch.manual_seed(2)
    coords = random_coords(500)
    x = torch.randn(500, 32)
    active = torch.rand(500) < 0.5
    attention = WindowAttention(32, 4)
    partition = partition_windows(coords, 6, 0, 32)
    assert any(b.segment is not None for b in partition.buckets) == pack
    gate = active.to(gate_dtype)
    got = attention(x, partition, gate)
    expected = reference_attention(attention, x, coords, 6, 0, key_active=active)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Changing an inactive token's feature changes no other token's output.
    inactive = torch.nonzero(~active).flatten()[0]
    x2 = x.clone()
    x2[inactive] += 10.0
    got2 = attention(x2, partition, gate)
    others = torch.arange(500) != inactive
    torch.testing.assert_close(got2[others], got[others], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [100, 40])  # sparse: small windows only; dense: both kinds
def test_partition_covers_every_token_once_and_windows_fit_buckets(grid, monkeypatch):
    """Every token in one slot; a padded row holds one window; a chunk holds whole small
    windows, its slots labelled by window."""
    monkeypatch.setattr(encoder, "PACK_SPARSE", 1.0)  # every token set sparse
    coords = random_coords(2000, grid=grid)
    chunk = math.ceil(144 * encoder.PACK_FRACTION)
    for shift in (0, 6):
        partition = partition_windows(coords, 12, shift, 16)
        gathered = torch.cat([b.gather_index[b.key_valid.flatten()] for b in partition.buckets])
        assert sorted(gathered.tolist()) == list(range(2000))
        window = ((coords[:, 0] * 100 + (coords[:, 1] + shift) // 12) * 100 + (coords[:, 2] + shift) // 12).tolist()
        sizes = {w: window.count(w) for w in window}
        packed = [b for b in partition.buckets if b.segment is not None]
        assert len(packed) == 1 and packed[0].slots == chunk
        assert (len(packed) < len(partition.buckets)) == (grid == 40)
        for bucket in partition.buckets:
            tokens = bucket.gather_index.view(bucket.num_windows, bucket.slots)
            segment = bucket.segment if bucket.segment is not None else torch.where(bucket.key_valid, 0, -1)
            for row, valid, labels in zip(tokens, bucket.key_valid, segment):
                assert torch.all((labels >= 0) == valid)
                for label in labels[valid].unique():
                    members = {window[t] for t in row[labels == label]}
                    assert len(members) == 1  # one window per label of a row
                    (w,) = members
                    assert int((labels == label).sum()) == sizes[w]  # the whole window
                    assert (sizes[w] <= chunk) == (bucket.segment is not None)


def test_token_order_does_not_matter():
    torch.manual_seed(3)
    coords = random_coords(300)
    x = torch.randn(300, 32)
    encoder = SparseWindowEncoder(32, 4, 64, num_layers=2, window_size=6).eval()
    permutation = torch.randperm(300)
    out = encoder(x, coords, batch_size=2).features
    out_permuted = encoder(x[permutation], coords[permutation], batch_size=2).features
    torch.testing.assert_close(out_permuted, out[permutation], atol=1e-5, rtol=1e-5)


def test_padding_is_masked_not_attended():
    """A window alone in its bucket with padding: padding must not change the result."""
    torch.manual_seed(4)
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1]])
    x = torch.randn(3, 16)
    layer = EncoderLayer(16, 2, 32, 0.0).eval()
    partition = partition_windows(coords, 12, 0, 16)
    assert partition.buckets[0].slots > 3
    attention = layer.attention
    q, k = attention.query_key(x + partition.position).chunk(2, dim=1)
    v = attention.value(x)
    heads = 2
    q, k, v = (t.view(3, heads, 8).transpose(0, 1) for t in (q, k, v))
    expected = attention.out(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(3, 16))
    torch.testing.assert_close(attention(x, partition), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 40, 700])
def test_equal_groups_attend_within_groups_of_window_sorted_tokens(num_tokens):
    """partition_groups: each frame's tokens sorted by window then cell, cut into groups of
    `group` (a frame's last one padded), never mixing frames; attention over a group
    equals plain attention over its members."""
    from haltdet.model.encoder import partition_groups

    torch.manual_seed(2)
    coords = random_coords(num_tokens)
    partition = partition_groups(coords, 6, 3, 32, group=23)
    (bucket,) = partition.buckets
    members = [row[row < num_tokens] for row in bucket.gather_index.view(-1, 23)]
    assert sorted(torch.cat(members).tolist()) == list(range(num_tokens))
    for frame in range(2):
        count = int((coords[:, 0] == frame).sum())
        sizes = [len(m) for m in members if len(m) and int(coords[m[0], 0]) == frame]
        assert sizes == [23] * (count // 23) + ([count % 23] if count % 23 else [])
    for m in members:
        assert len(set(coords[m, 0].tolist())) == 1
        shifted = coords[m, 1:] + 3
        key = (shifted[:, 0] // 6 * 100 + shifted[:, 1] // 6) * 36 + (shifted[:, 0] % 6) * 6 + shifted[:, 1] % 6
        assert torch.all(key[1:] >= key[:-1])  # sorted by window, then by cell
    x = torch.randn(num_tokens, 32)
    attention = WindowAttention(32, 4)
    got = attention(x, partition)
    q_all, k_all = attention.query_key(x + partition.position).chunk(2, dim=1)
    v_all = attention.value(x)
    expected = torch.zeros_like(x)
    for m in members:
        q, k, v = (t[m].view(len(m), 4, 8).transpose(0, 1) for t in (q_all, k_all, v_all))
        expected[m] = ((q @ k.transpose(1, 2) / math.sqrt(8)).softmax(-1) @ v).transpose(0, 1).reshape(len(m), 32)
    torch.testing.assert_close(got, attention.out(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kept", [0.0, 0.1, 0.6, 1.0])
def test_subset_of_a_partition_is_the_partition_of_the_subset(kept):
    """What the removal pass does after a halting stage: the survivors' partition derived
    from the stored order equals partitioning their coordinates afresh."""
    coords = random_coords(900, grid=40, seed=3)
    keep = torch.rand(900, generator=torch.Generator().manual_seed(4)) < kept
    for shift in (0, 3):
        derived = partition_windows(coords, 6, shift, 32).subset(keep)
        fresh = partition_windows(coords[keep], 6, shift, 32)
        for name in ("gather_index", "scatter_index", "position"):
            assert torch.equal(getattr(derived, name), getattr(fresh, name)), name
        for name in ("order", "window_of_sorted"):
            assert np.array_equal(getattr(derived, name), getattr(fresh, name)), name
        assert [(b.slots, b.fused) for b in derived.buckets] == [(b.slots, b.fused) for b in fresh.buckets]
        for a, b in zip(derived.buckets, fresh.buckets):
            assert torch.equal(a.gather_index, b.gather_index) and torch.equal(a.key_valid, b.key_valid)
            assert (a.segment is None) == (b.segment is None)
            assert a.segment is None or torch.equal(a.segment, b.segment)
        # a tenth of the tokens is sparse: its small windows packed; the whole set is not
        assert any(b.segment is not None for b in derived.buckets) == (0 < kept <= 0.1)


def test_pack_windows_next_fit_decreasing_by_hand():
    """Windows of 5, 30, 20, 10 and 40 tokens in chunks of 36: the 40 is not packed; by size,
    30 opens chunk 0 (slots 0-29); 20 does not fit after it and opens chunk 1 (36-55); 10
    follows it (56-65), then 5 (66-70)."""
    start, num_chunks, big = encoder._pack_windows(np.array([5, 30, 20, 10, 40]), 36)
    assert start[:4].tolist() == [66, 0, 36, 56] and num_chunks == 2 and big.tolist() == [4]
    assert encoder._pack_windows(np.array([5, 30]), 0) == (None, 0, None)


def test_consecutive_runs_by_hand():
    runs, counts = encoder._consecutive_runs(np.array([3, 3, 5, 5, 5, 9, 3]))
    assert runs.tolist() == [0, 0, 1, 1, 1, 2, 3] and counts.tolist() == [2, 3, 1, 1]
    runs, counts = encoder._consecutive_runs(np.zeros(0, dtype=np.int64))
    assert runs.size == 0 and counts.size == 0
