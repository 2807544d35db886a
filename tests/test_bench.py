"""Benchmark accounting: useful encoder work, the matmul peak, paired ratios."""

import pytest
import torch

from haltdet.bench import encoder_flop, matmul_peak, paired_ratio
from haltdet.model.encoder import SparseWindowEncoder


def test_encoder_flop_by_hand():
    """Two layers of width 8, FFN 16, windows of 4: per token-layer 2 * (4 * 64 + 2 * 128)
    = 1,024 for the linear layers; per window of n active tokens 4 * 8 * n^2 for Q K^T and A V."""
    encoder = SparseWindowEncoder(d_model=8, num_heads=2, ffn_dim=16, num_layers=2, window_size=4)
    # Three tokens: two share the unshifted window (0, 0), the third is at (1, 5).
    coords = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 5]])
    everyone = torch.tensor([2, 2, 2])
    # layer 0 (no shift): windows {2 tokens, 1 token}; layer 1 (shift 2): cells + 2 -> (2, 2),
    # (3, 3) in window (0, 0), (3, 7) in window (0, 1): again {2, 1}
    per_layer = 3 * 1024 + 32 * (2 ** 2 + 1 ** 2)
    assert encoder_flop(encoder, coords, everyone) == 2 * per_layer
    # the third token halts after the first layer: the second layer runs one window of 2
    assert encoder_flop(encoder, coords, torch.tensor([2, 2, 1])) == per_layer + 2 * 1024 + 32 * 4


def test_matmul_peak_reports_both_dtypes():
    peak = matmul_peak(max_size=256, repeats=1)
    assert set(peak) == {"float32", "bfloat16"} and all(v > 0 for v in peak.values())


def test_flat_peer_equals_window_attention_when_groups_are_windows():
    """Four full 4 x 4 windows and groups of 16: each group is a window, so the peer's
    single unmasked attention call computes the window encoder's layer."""
    from haltdet.bench import flat_group_encoder

    torch.manual_seed(0)
    encoder = SparseWindowEncoder(d_model=16, num_heads=2, ffn_dim=32, num_layers=1, window_size=4).eval()
    cells = torch.arange(64)
    coords = torch.stack([torch.zeros_like(cells), cells // 8, cells % 8], 1)
    features = torch.randn(64, 16)
    with torch.no_grad():
        expected = encoder(features, coords).features
        got = flat_group_encoder(encoder, features, coords, group=16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # groups of 6 straddle windows: a different encoder
    with torch.no_grad():
        assert not torch.allclose(flat_group_encoder(encoder, features, coords, group=6), expected, atol=1e-3)


def test_specs_carry_thresholds_and_precision():
    import pytest

    from haltdet import InputError
    from haltdet.bench import load_spec
    from haltdet.pareto import bench_name

    model = load_spec("halting@0.3,bfloat16", "cpu")
    assert model.config.inference_dtype == "bfloat16" and model.encoder.halting.thresholds == [0.3, 0.3]
    model = load_spec("baseline@bfloat16", "cpu", {"score_threshold": 0.2})
    assert model.config.inference_dtype == "bfloat16" and model.config.score_threshold == 0.2
    assert load_spec("halting@0.4,0.6", "cpu").config.inference_dtype == "float32"
    for bad, message in (("halting@fast", "after '@'"), ("baseline@0.5", "has no halting")):
        with pytest.raises(InputError, match=message):
            load_spec(bad, "cpu")
    point = {"checkpoint": "halting", "threshold": [0.3], "dtype": "bfloat16"}
    assert bench_name(point) == "halting@0.3,bfloat16"
    assert bench_name({**point, "threshold": None, "dtype": "float32"}) == "halting"


def test_paired_ratio_is_a_percentile_of_per_frame_ratios():
    """Frames timed 1, 2, 4 and 8 s for the first model and 0.5, 1.5, 2, 2 for another:
    per-frame ratios 0.5, 0.75, 0.5, 0.25, median 0.5 (the ratio of the medians would be
    1.75 / 3 = 0.583): a frame slow for both (machine drift) moves the ratio of medians,
    not the paired one."""
    first = [{"encoder": t} for t in (1.0, 2.0, 4.0, 8.0)]
    other = [{"encoder": t} for t in (0.5, 1.5, 2.0, 2.0)]
    assert paired_ratio(other, first, "encoder") == pytest.approx(0.5)
    assert paired_ratio(other, first, "encoder", 100) == pytest.approx(0.75)
    assert paired_ratio(other, first, "encoder", 0) == pytest.approx(0.25)
    assert paired_ratio(first, first, "encoder") == 1.0
