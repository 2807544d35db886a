"""Latency, throughput and memory benchmarks.

`haltdet bench --checkpoint A [--checkpoint B ...]` times every model on the same
synthetic frames in one process, interleaving the models frame by frame so machine
noise hits them alike, and reports each stage's median latency and the ratios against
the first model (the baseline). Timings are wall-clock medians over frames.
A checkpoint may carry halting thresholds, `NAME@T` or `NAME@T1,T2` (one per stage),
so one halting model can be timed at several operating points in the same run, and an
inference precision, `NAME@bfloat16` or `NAME@T,bfloat16`, to time both precisions in one run.
`--points N` times frames of N points (`bench_cloud`), e.g. 2,000,000 to see the input
caps bound time and memory; "points" and "tokens" are what reached the model after them.

Ratios against the first model are paired: per frame, a model's time over the first
model's time on the same frame, timed moments apart; the median of those per-frame
ratios, with their 10th and 90th percentiles. On a shared machine whose speed drifts
during the run this cancels the drift that a ratio of the two medians keeps (on a 2-core
cloud VM, four runs of 20 frames: the halting encoder's paired ratio spread over 0.017,
the ratio of medians over 0.075; docs/experiments.md). The ratio of medians is in the
JSON too (`ratio_of_medians`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STAGES = ("pillars", "encoder", "bev_head", "decode", "refine")  # refine: 0 without a second stage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_stages(model, points: torch.Tensor, device: torch.device, peer: bool = False) -> dict[str, float]:
    """Seconds spent in each stage of one detection pass over one cloud; with `peer`, also
    the FlatFormer-style peer encoder on the same tokens ("peer_encoder")."""
    from haltdet.model.detector import DetectorOutput
    from haltdet.model.pillars import PointBatch

    batch = PointBatch.from_list([points]).to(device)
    times = {}
    _sync(device)
    start = time.perf_counter()
    tokens = model.pillar_net(batch)
    _sync(device)
    times["pillars"] = time.perf_counter() - start
    start = time.perf_counter()
    encoded = model.encoder(tokens.features, tokens.coords, 1)
    _sync(device)
    times["encoder"] = time.perf_counter() - start
    start = time.perf_counter()
    heatmap, regression = model.dense_stage(encoded, tokens.coords, 1)
    _sync(device)
    times["bev_head"] = time.perf_counter() - start
    start = time.perf_counter()
    output = DetectorOutput(heatmap, regression, tokens, encoded)
    detections = model.decode_first_stage(output)
    _sync(device)
    times["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    if model.refiner is not None:
        model.refine(output, detections)
        _sync(device)
    times["refine"] = time.perf_counter() - start
    times["total"] = sum(times[s] for s in STAGES)
    times["tokens"] = tokens.features.shape[0]
    times["token_layers"] = int(encoded.halted_at.sum())  # layers run, summed over tokens
    times["encoder_flop"] = encoder_flop(model.encoder, tokens.coords, encoded.halted_at)
    if peer:
        _sync(device)
        start = time.perf_counter()
        flat_group_encoder(model.encoder, tokens.features, tokens.coords)
        _sync(device)
        times["peer_encoder"] = time.perf_counter() - start
    times["points_used"] = tokens.points_used
    return times


def flat_group_encoder(encoder, features: torch.Tensor, coords: torch.Tensor, group: int = 69) -> torch.Tensor:
    """The FlatFormer-style peer of the window encoder, for timing on the same tokens with
    the same weights: per layer, tokens sorted by (shifted) window and by their cell in it,
    cut into equal groups of `group` (the last padded), one unmasked attention call over
    all groups, by the kernel the window encoder picks for that size (`attention_plan`).
    Not the same outputs as the window encoder (groups straddle windows)."""
    from haltdet.model.encoder import attention_plan, sine_encoding

    matmul_max = attention_plan(features.device)[0]

    size, channels = encoder.window_size, features.shape[1]
    num_tokens = features.shape[0]
    padded = -(-num_tokens // group) * group
    layouts = {}
    for shift in {encoder.shift_of_layer(i) for i in range(len(encoder.layers))}:
        cell_y, cell_x = coords[:, 1] + shift, coords[:, 2] + shift
        window = (coords[:, 0] * 100_000 + torch.div(cell_y, size, rounding_mode="floor")) * 100_000 \
            + torch.div(cell_x, size, rounding_mode="floor")
        order = torch.argsort(window * size * size + (cell_y % size) * size + cell_x % size)
        in_window = torch.stack([cell_x % size, cell_y % size], 1)
        layouts[shift] = (order, sine_encoding(in_window, size, channels).to(features.dtype))
    x = features
    for i, layer in enumerate(encoder.layers):
        order, position = layouts[encoder.shift_of_layer(i)]
        attention = layer.attention
        heads = attention.num_heads
        qkv = torch.cat([attention.query_key(x + position), attention.value(x)], dim=1)[order]
        qkv = torch.cat([qkv, qkv.new_zeros(padded - num_tokens, 3 * channels)])
        q, k, v = qkv.view(-1, group, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if group > matmul_max:
            attended = F.scaled_dot_product_attention(q, k, v)
        else:  # the kernel the window encoder would use for a bucket of this size
            attended = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
        attended = attended.permute(0, 2, 1, 3).reshape(padded, channels)
        out = torch.empty_like(x)
        out[order] = attended[:num_tokens]
        x = layer.norm1(x + attention.out(out))
        x = layer.norm2(x + layer.ffn(x))
    return x


def window_counts(encoder, coords: torch.Tensor, layer: int) -> torch.Tensor:
    """Tokens in each non-empty window of the layer's shift, for tokens `coords` (T, 3)."""
    shift = encoder.shift_of_layer(layer)
    window_y, window_x = (torch.div(coords[:, k] + shift, encoder.window_size, rounding_mode="floor")
                          for k in (1, 2))
    span = int(max(window_y.max(), window_x.max())) + 1
    return torch.unique((coords[:, 0] * span + window_y) * span + window_x, return_counts=True)[1]


def encoder_flop(encoder, coords: torch.Tensor, halted_at: torch.Tensor) -> float:
    """Useful floating-point operations of the encoder's layers on these tokens: per
    token-layer the linear layers (query/key, value, output, FFN), per window and layer
    the attention products over the window's active tokens; no padding, no scorer."""
    layer = encoder.layers[0]
    channels, ffn = layer.attention.out.in_features, layer.ffn[0].out_features
    per_token = 2 * (4 * channels * channels + 2 * channels * ffn)
    total = 0.0
    for i in range(len(encoder.layers)):
        active = coords[halted_at > i]
        if not len(active):
            continue
        counts = window_counts(encoder, active, i).double()
        total += per_token * len(active) + 4 * channels * float((counts ** 2).sum())  # Q K^T and A V
    return total


def matmul_peak(max_size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a dense square matmul, best of `repeats`, per dtype: the CPU's limit for
    the encoder's linear layers. The size doubles from 256 up to `max_size` while one
    product takes under 50 ms (CPUs without bfloat16 units take minutes at 2048)."""
    peak = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        size = 256
        while True:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            start = time.perf_counter()
            a @ b  # also the warm-up
            if size >= max_size or time.perf_counter() - start > 0.05:
                break
            size *= 2
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        peak[name] = 2 * size ** 3 / best / 1e9
    return peak


def bench_cloud(seed: int, points: int = 0) -> torch.Tensor:
    """A synthetic frame; with `points` > 0, topped up to exactly that many points (or cut)
    with points scattered uniformly over 150 x 150 x 6 m around the sensor, which fill
    every pillar of the range: a worst case for the input caps (`model.max_pillars`,
    `model.max_points`)."""
    from haltdet.data.synth import simulate_frame

    cloud = simulate_frame(seed).points[:points or None]
    extra = max(0, points - len(cloud))
    scatter = np.random.default_rng(seed).uniform([-75, -75, -3, 0], [75, 75, 3, 1], (extra, 4))
    return torch.from_numpy(np.concatenate([cloud, scatter.astype(np.float32)]))


def load_spec(spec: str, device, settings: dict | None = None):
    """A model from `NAME` or `NAME@ITEM[,ITEM...]`, with inference `settings`
    (`Detector.configure`) applied first; each ITEM a halting threshold (one, or one per
    stage, in order) or an inference precision (`float32`, `bfloat16`): `halting@0.3`,
    `baseline@bfloat16`, `halting@0.3,bfloat16`."""
    from haltdet import InputError
    from haltdet.checkpoint import load_model
    from haltdet.config import INFERENCE_DTYPES

    name, _, items = str(spec).partition("@")
    model = load_model(name, device)[0]
    model.configure(**(settings or {}))
    thresholds = []
    for item in items.split(",") if items else []:
        if item in INFERENCE_DTYPES:
            model.configure(inference_dtype=item)
            continue
        try:
            thresholds.append(float(item))
        except ValueError:
            raise InputError(f"{spec}: after '@' come halting thresholds (numbers) and a precision "
                             f"({', '.join(INFERENCE_DTYPES)}), e.g. {name}@0.4") from None
    if thresholds:
        if not model.halting:
            raise InputError(f"{name}: '@{items}' sets halting thresholds, but the model has no halting")
        model.set_halting(thresholds)
    return model


def run_benchmark(args) -> dict:
    """`haltdet bench`: `benchmark` with the command's arguments, printed and written."""
    from haltdet.config import inference_overrides

    report = benchmark(args.checkpoint, args.frames, args.points, args.warmup, args.device, args.threads,
                       args.encoder_peer == "flat", inference_overrides(args.set, args.dtype))
    _print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"results written to {args.json}")
    return report


def benchmark(specs: list[str], frames: int = 5, points: int = 0, warmup: int = 1, device="cpu",
              threads: int = 0, encoder_peer: bool = False, settings: dict | None = None) -> dict:
    """Time the models `specs` (`NAME` or `NAME@ITEMS`, `load_spec`) on the same `frames` synthetic
    frames, interleaved frame by frame; threads 0: torch's default. encoder_peer: also
    time the FlatFormer-style peer encoder (`flat_group_encoder`) with the first model's
    weights on its tokens. settings: inference settings for every model (`Detector.configure`)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    names = list(specs)
    models = [load_spec(name, device, settings) for name in names]
    clouds = [bench_cloud(10_000 + i, points) for i in range(frames)]
    for model in models:  # warm-up: allocator, thread pools, lazy init
        for cloud in clouds[:warmup]:
            time_stages(model, cloud, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The CPU's matmul peak, measured before and after the frames and the better kept: on
    # a shared machine one measurement can fall in a slow spell and flatter every
    # model's share of it.
    peaks = [matmul_peak()] if device.type == "cpu" else []
    records = [[] for _ in models]
    for cloud in clouds:
        for i, model in enumerate(models):
            records[i].append(time_stages(model, cloud, device, peer=encoder_peer and i == 0))

    report = {"device": str(device), "threads": torch.get_num_threads(), "frames": len(clouds),
              "points_per_frame": float(np.mean([len(c) for c in clouds])), "models": []}
    if peaks:
        peaks.append(matmul_peak())
        report["matmul_peak_gflops"] = {dtype: max(p[dtype] for p in peaks) for dtype in peaks[0]}
    for name, rows in zip(names, records):
        median = {k: float(np.median([r[k] for r in rows])) for k in (*STAGES, "total", "tokens", "points_used")}
        flop = float(np.sum([r["encoder_flop"] for r in rows]))
        entry = {"checkpoint": str(name), "median_seconds": {k: median[k] for k in (*STAGES, "total")},
                 "p10_seconds": {k: float(np.percentile([r[k] for r in rows], 10)) for k in (*STAGES, "total")},
                 "p90_seconds": {k: float(np.percentile([r[k] for r in rows], 90)) for k in (*STAGES, "total")},
                 "tokens": median["tokens"], "points_used": median["points_used"],
                 "encoder_gflop": flop / len(rows) / 1e9,  # per frame, useful work only
                 "encoder_gflops": flop / 1e9 / max(float(np.sum([r["encoder"] for r in rows])), 1e-12),
                 "token_layers": float(np.sum([r["token_layers"] for r in rows])),
                 "frames_per_second": 1.0 / median["total"],
                 "encoder_share": median["encoder"] / median["total"]}
        report["models"].append(entry)
    first = report["models"][0]
    for entry, rows in zip(report["models"], records):
        for key, percentile in (("ratio_to_first", 50), ("ratio_to_first_p10", 10), ("ratio_to_first_p90", 90)):
            entry[key] = {k: paired_ratio(rows, records[0], k, percentile) for k in ("encoder", "total")}
        entry["ratio_of_medians"] = {k: entry["median_seconds"][k] / first["median_seconds"][k]
                                     for k in ("encoder", "total")}
        # What the encoder ratio would be if its time were proportional to the layers it
        # runs, and the share of that speed-up the encoder realises.
        entry["ideal_encoder_ratio"] = entry["token_layers"] / max(first["token_layers"], 1.0)
        entry["realised_of_ideal"] = entry["ideal_encoder_ratio"] / max(entry["ratio_to_first"]["encoder"], 1e-12)
    if encoder_peer:
        peer = float(np.median([r["peer_encoder"] for r in records[0]]))
        report["encoder_peer"] = {"name": "flat groups of 69", "median_seconds": peer,
                                  "first_encoder_to_peer": first["median_seconds"]["encoder"] / peer}
    if device.type == "cuda":
        report["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # Peak resident set of the whole process (Linux reports KiB), models and data included.
        report["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def paired_ratio(rows: list[dict], first_rows: list[dict], key: str, percentile: float = 50) -> float:
    """A percentile (50: the median) of the per-frame ratios rows[i][key] / first_rows[i][key]
    of two models timed on the same frames."""
    return float(np.percentile([r[key] / max(f[key], 1e-12) for r, f in zip(rows, first_rows)], percentile))


def _print_report(report: dict) -> None:
    print(f"device {report['device']}, {report['threads']} threads, {report['frames']} frames, "
          f"{report['points_per_frame']:.0f} points/frame; medians in ms")
    header = f"{'checkpoint':<28}{'points':>9}{'tokens':>8}" + "".join(f"{s:>10}" for s in (*STAGES, "total")) \
        + f"{'fps':>7}{'enc share':>10}{'enc x':>7}{'ideal x':>8}{'total x':>8}"
    print(header)
    for m in report["models"]:
        t = m["median_seconds"]
        print(f"{m['checkpoint'][-28:]:<28}{m['points_used']:>9.0f}{m['tokens']:>8.0f}"
              + "".join(f"{t[s] * 1000:>10.1f}" for s in (*STAGES, "total"))
              + f"{m['frames_per_second']:>7.2f}{m['encoder_share']:>10.2f}"
              + f"{m['ratio_to_first']['encoder']:>7.2f}{m['ideal_encoder_ratio']:>8.2f}"
              + f"{m['ratio_to_first']['total']:>8.2f}")
    print(f"peak memory: {report['peak_memory_mb']:.0f} MB; x: medians of per-frame ratios to the first "
          "model; ideal x: the encoder ratio if its time followed the token-layers it runs")
    for m in report["models"][1:]:
        low, high = m["ratio_to_first_p10"], m["ratio_to_first_p90"]
        print(f"{m['checkpoint'][-28:]}: per-frame ratios p10-p90: encoder {low['encoder']:.2f}-{high['encoder']:.2f}, "
              f"total {low['total']:.2f}-{high['total']:.2f}; realised {m['realised_of_ideal']:.2f} of the ideal "
              f"encoder speed-up")
    peak = report.get("matmul_peak_gflops")
    for m in report["models"]:
        share = f" = {m['encoder_gflops'] / peak['float32']:.0%} of the float32 matmul peak" if peak else ""
        print(f"{m['checkpoint'][-28:]}: encoder {m['encoder_gflop']:.2f} useful GFLOP per frame at "
              f"{m['encoder_gflops']:.1f} GFLOP/s{share}; total p10-p90 {m['p10_seconds']['total'] * 1000:.1f}-"
              f"{m['p90_seconds']['total'] * 1000:.1f} ms")
    if "encoder_peer" in report:
        peer = report["encoder_peer"]
        print(f"encoder peer ({peer['name']}, the first model's weights and tokens): "
              f"{peer['median_seconds'] * 1000:.1f} ms; the first model's encoder takes "
              f"{peer['first_encoder_to_peer']:.2f}x its time")
    if peak:
        print(f"dense matmul peak: {peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} GFLOP/s bfloat16")
