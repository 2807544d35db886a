"""How much of the matmul peak a window encoder of this size can reach on this CPU.

`haltdet bench` reports the encoder's useful GFLOP per frame (`encoder_flop`: the linear
layers on every token-layer and the attention products over each window's tokens, no
padding) over its time, as a share of a dense 2048 x 2048 matmul's GFLOP/s. This script
bounds that share from above: on the same synthetic frames and tokens it times only the
products every such encoder has to compute, each at its best:
  * per layer, the linear layers as matrix products over all tokens at once: query, key
    and value in one product (C -> 3C), the output projection (C -> C), the FFN's two
    (C -> F -> C), with no bias, norm, activation or copy;
  * per layer, the attention products Q K^T and A V with the windows grouped by their
    exact token count, one batched product per count: no padding, no mask, no softmax.
A real layer also needs the norms, the softmax, the bias additions and the gathers into
windows, so its time is longer and its share of the peak lower. If these products alone
stay below a share, no implementation built from PyTorch's CPU operators reaches it.

The same frames' tokens also go through the FlatFormer-style peer of `haltdet bench
--encoder-peer flat` (equal groups of 69 tokens, the same weights): the products' time
over the peer's whole encoder's time is the least ratio to the peer that a window encoder
computing these products can have. `--profile N` also lists the N operators with the most
self time in the encoder as run (torch.profiler, per frame): where the rest of its time
goes. Run on an otherwise idle machine:

    python scripts/encoder_bound.py --threads 2 [--profile 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from haltdet.bench import bench_cloud, encoder_flop, flat_group_encoder, load_spec, matmul_peak, window_counts
from haltdet.model.pillars import PointBatch


def best_time(function, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls (after one warm-up call)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def products(encoder, features: torch.Tensor, coords: torch.Tensor) -> list[tuple[str, float, object]]:
    """(kind, floating-point operations, a call computing it) for every product one pass of
    all layers over these tokens needs: "linear" per layer and weight, "attention" per layer
    and window size (random operands of the real shapes). Their operations add up to
    `encoder_flop` of a pass that halts no token."""
    layer = encoder.layers[0]
    num_tokens, channels = features.shape
    ffn, heads = layer.ffn[0].out_features, layer.attention.num_heads
    generator = torch.Generator().manual_seed(0)
    tokens, hidden = features.contiguous(), torch.randn(num_tokens, ffn, generator=generator)
    # query, key and value in one product; the output projection; the FFN's two
    linear = [(x, torch.randn(x.shape[1], n_out, generator=generator) * 0.1)
              for x, n_out in ((tokens, 3 * channels), (tokens, channels), (tokens, ffn), (hidden, channels))]
    work = []
    for i in range(len(encoder.layers)):
        for x, weight in linear:
            work.append(("linear", 2.0 * num_tokens * weight.numel(), lambda x=x, w=weight: x @ w))
        for size, windows in zip(*torch.unique(window_counts(encoder, coords, i), return_counts=True)):
            n, w = int(size), int(windows)
            q, k, v = torch.randn(3, w, heads, n, channels // heads, generator=generator)
            work.append(("attention", 4.0 * channels * n * n * w,
                         lambda q=q, k=k, v=v: (q @ k.transpose(-1, -2)) @ v))
    return work


def score_entries(encoder, coords: torch.Tensor) -> tuple[float, float]:
    """Attention scores per token and layer: (over each window's own tokens, as the
    encoder computes them: every slot of its padded buckets or packed chunks)."""
    exact = padded = 0.0
    partitions = encoder.partitions(coords)
    for i in range(len(encoder.layers)):
        exact += float((window_counts(encoder, coords, i).double() ** 2).sum())
        padded += sum(b.num_windows * b.slots ** 2 for b in partitions[encoder.shift_of_layer(i)].buckets)
    scale = len(encoder.layers) * coords.shape[0]
    return exact / scale, padded / scale


def product_times(encoder, features: torch.Tensor, coords: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds of the linear layers' products, of the attention products) for one pass of
    all layers over these tokens, each product timed at its best."""
    seconds = {"linear": 0.0, "attention": 0.0}
    for kind, _, call in products(encoder, features, coords):
        seconds[kind] += best_time(call, repeats)
    return seconds["linear"], seconds["attention"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="baseline")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_spec(args.checkpoint, torch.device("cpu"))
    if model.encoder.halting:
        parser.error(f"{args.checkpoint} halts tokens: the bound is of an encoder that runs every token")
    rows = []
    with torch.no_grad():
        for i in range(args.frames):
            tokens = model.pillar_net(PointBatch.from_list([bench_cloud(10_000 + i)]))
            encoder = model.encoder
            start = time.perf_counter()
            encoded = encoder(tokens.features, tokens.coords, 1)
            measured = time.perf_counter() - start
            start = time.perf_counter()
            flat_group_encoder(encoder, tokens.features, tokens.coords)
            peer = time.perf_counter() - start
            flop = encoder_flop(encoder, tokens.coords, encoded.halted_at)
            linear, attention = product_times(encoder, tokens.features, tokens.coords, args.repeats)
            exact, padded = score_entries(encoder, tokens.coords)
            rows.append((flop, measured, peer, linear, attention, exact, padded))
    peak = matmul_peak()["float32"]
    flop, measured, peer, linear, attention, exact, padded = (statistics.median(column) for column in zip(*rows))
    print(f"{args.checkpoint}, {args.threads} threads, medians over {args.frames} frames")
    print(f"dense matmul peak: {peak:.0f} GFLOP/s float32")
    print(f"useful work per frame: {flop / 1e9:.2f} GFLOP; attention scores per token and layer: "
          f"{exact:.0f} over each window's tokens, {padded:.0f} as the encoder computes them")
    print(f"encoder as run: {measured * 1e3:.1f} ms, {flop / measured / 1e9:.1f} GFLOP/s "
          f"= {flop / measured / 1e9 / peak:.0%} of the peak")
    print(f"its products alone: linear layers {linear * 1e3:.1f} ms, attention {attention * 1e3:.1f} ms; "
          f"together {flop / (linear + attention) / 1e9:.1f} GFLOP/s = "
          f"{flop / (linear + attention) / 1e9 / peak:.0%} of the peak (the bound)")
    print(f"the flat-group peer's encoder: {peer * 1e3:.1f} ms; the encoder as run {measured / peer:.2f}x "
          f"its time, the products alone {(linear + attention) / peer:.2f}x")
    if args.profile:
        print_profile(model, args.frames, args.profile)


def print_profile(model, frames: int, rows: int) -> None:
    """The `rows` operators with the most self time in the encoder, per frame, over the
    same frames (each frame's encoder run once before, unprofiled)."""
    from torch.profiler import profile

    inputs = []
    with torch.no_grad():
        for i in range(frames):
            tokens = model.pillar_net(PointBatch.from_list([bench_cloud(10_000 + i)]))
            model.encoder(tokens.features, tokens.coords, 1)
            inputs.append(tokens)
        with profile() as prof:
            for tokens in inputs:
                model.encoder(tokens.features, tokens.coords, 1)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / frames / 1e3
    print(f"profiled encoder, self time per frame: {total:.1f} ms (the profiler's own overhead included)")
    for event in events[:rows]:
        print(f"  {event.key:44s} {event.self_cpu_time_total / frames / 1e3:6.2f} ms  "
              f"{event.count / frames:6.1f} calls")


if __name__ == "__main__":
    main()
