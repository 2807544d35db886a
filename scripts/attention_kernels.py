"""Times the encoder's window attention with each kernel choice and padding-bucket set.

For each bundled model, the encoder (inference pass) runs on the same synthetic frames
under every combination of
  * the largest bucket (slots) that attends by matrix products and a softmax (the
    first entry of `encoder.attention_plan`; 0: every bucket uses the fused
    `scaled_dot_product_attention` kernel), and
  * the bucket sizes (`encoder.BUCKET_FRACTIONS` of the 144 cells of a 12 x 12 window),
  * the softmax of buckets shorter than `encoder.SHORT_ROW` slots that attend by matrix
    products: whole-tensor operations (`encoder.short_softmax`) or torch.softmax,
interleaved round by round so machine noise hits them alike; it prints the median
milliseconds per frame of each and the largest difference of its output from the first
combination's. The encoder's choice (`encoder.attention_plan`) comes from this table.
`--partitions` times instead the window partition of both shifts: of all tokens, of the
survivors of a halting stage afresh, and of the survivors from the stored order
(`WindowPartition.subset`, what the removal pass does). `--softmax-rows` times instead
torch.softmax against `encoder.short_softmax` over 40,000 entries in rows of 4 to 32
(torch's CPU softmax runs a scalar loop on rows shorter than its vector width).
`--bucket-calls` times instead one bucket's attention call, the fused kernel against the
matrix products, for buckets of 1 to 40 windows of 18 to 144 slots (random tokens, 60 %
of the slots filled): what a call costs when few windows fill a bucket, as after a halting
stage. Run it on an otherwise idle machine:

    python scripts/attention_kernels.py --threads 2
    python scripts/attention_kernels.py --threads 1
    python scripts/attention_kernels.py --threads 2 --partitions
    python scripts/attention_kernels.py --threads 1 --softmax-rows
    python scripts/attention_kernels.py --threads 1 --bucket-calls
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import haltdet
from haltdet.bench import bench_cloud
from haltdet.model import encoder
from haltdet.model.pillars import PointBatch

BUCKETS = {"six": (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0),
           "nine": (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)}
MATMUL_MAX = (0, 15, 36, 72, 108, 144)
SOFTMAX = {"short": encoder.short_softmax, "torch": lambda logits: torch.softmax(logits, dim=-1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=["baseline", "halting"])
    parser.add_argument("--partitions", action="store_true", help="time the window partitions instead")
    parser.add_argument("--kept", type=float, default=0.12, help="share of tokens surviving, for --partitions")
    parser.add_argument("--softmax-rows", action="store_true", help="time the softmax of short rows instead")
    parser.add_argument("--bucket-calls", action="store_true", help="time single buckets' attention calls instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    haltdet.keep_freed_memory()  # as the haltdet command does
    if args.partitions:
        time_partitions(args)
        return
    if args.softmax_rows:
        time_softmax_rows(args)
        return
    if args.bucket_calls:
        time_bucket_calls(args)
        return
    plan, short_softmax = encoder.attention_plan, encoder.short_softmax
    try:
        for name in args.models:
            model = haltdet.load(name).eval()
            with torch.no_grad():
                tokens = [model.pillar_net(PointBatch.from_list([bench_cloud(seed)])) for seed in range(args.frames)]
                combos = [(m, b, s) for b in BUCKETS for m in MATMUL_MAX for s in SOFTMAX]
                times = {c: [] for c in combos}
                reference, error = None, {}
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for m, b, s in combos:
                        encoder.attention_plan = lambda device="cpu", m=m, b=b: (m, BUCKETS[b])
                        encoder.short_softmax = SOFTMAX[s]
                        start = time.perf_counter()
                        outputs = [model.encoder(t.features, t.coords, 1).features for t in tokens]
                        if round_:
                            times[(m, b, s)].append((time.perf_counter() - start) / len(tokens) * 1e3)
                        else:
                            reference = reference or outputs
                            error[(m, b, s)] = max(float((o - r).abs().max()) for o, r in zip(outputs, reference))
            print(f"{name}, {args.threads} thread(s), {args.frames} frames x {args.rounds} rounds: "
                  "encoder ms per frame (median), max |difference| from the first")
            for m, b, s in combos:
                print(f"  matmul up to {m:3d} slots, {b:4s} buckets, {s:5s} softmax of short rows: "
                      f"{statistics.median(times[(m, b, s)]):7.1f} ms   {error[(m, b, s)]:.1e}")
    finally:
        encoder.attention_plan, encoder.short_softmax = plan, short_softmax


def time_softmax_rows(args) -> None:
    """Median ms of torch.softmax and of `encoder.short_softmax` over the last dimension of
    40,000 random entries, per row length, interleaved."""
    print(f"softmax over 40,000 entries, {args.threads} thread(s), median ms (torch, whole-tensor operations):")
    generator = torch.Generator().manual_seed(0)
    for length in (4, 8, 9, 12, 15, 16, 18, 24, 32):
        logits = torch.randn(40_000 // length, length, generator=generator)
        ways = {"torch": lambda: torch.softmax(logits, dim=-1), "short": lambda: encoder.short_softmax(logits)}
        times = interleaved_medians(ways, args.rounds * 10)
        print(f"  rows of {length:2d}: {times['torch']:6.3f} {times['short']:6.3f}")


def time_bucket_calls(args, heads: int = 4, head_dim: int = 16) -> None:
    """Median microseconds of one bucket's `encoder.window_attention` with the fused kernel
    and with matrix products, per bucket shape, interleaved."""
    print(f"one bucket's attention ({heads} heads of {head_dim}), {args.threads} thread(s), "
          "median us per call (fused kernel, matrix products):")
    generator = torch.Generator().manual_seed(0)
    for slots in (18, 36, 54, 72, 108, 144):
        for windows in (1, 2, 4, 8, 16, 40):
            q, k, v = torch.randn(3, windows, heads, slots, head_dim, generator=generator).unbind(0)
            valid = torch.rand(windows, slots, generator=generator) < 0.6
            valid[:, 0] = True
            fused = encoder.Bucket(torch.zeros(windows * slots, dtype=torch.long), valid, slots, fused=True)
            products = encoder.Bucket(fused.gather_index, valid, slots, fused=False)
            ways = {"fused": lambda: encoder.window_attention(q, k, v, fused),
                    "products": lambda: encoder.window_attention(q, k, v, products)}
            times = interleaved_medians(ways, args.rounds * 30)
            print(f"  {windows:2d} windows of {slots:3d} slots: {1e3 * times['fused']:7.1f} {1e3 * times['products']:7.1f}")


def time_partitions(args) -> None:
    """Median ms of the partitions of both shifts on one frame's tokens, interleaved."""
    model = haltdet.load(args.models[0]).eval()
    coords = model.pillar_net(PointBatch.from_list([bench_cloud(0)])).coords
    keep = torch.rand(len(coords), generator=torch.Generator().manual_seed(0)) < args.kept
    size, channels = model.encoder.window_size, model.encoder.d_model
    shifts = sorted({model.encoder.shift_of_layer(i) for i in range(len(model.encoder.layers))})
    full = {s: encoder.partition_windows(coords, size, s, channels) for s in shifts}
    ways = {"all tokens": lambda: [encoder.partition_windows(coords, size, s, channels) for s in shifts],
            "survivors afresh": lambda: [encoder.partition_windows(coords[keep], size, s, channels) for s in shifts],
            "survivors from the stored order": lambda: [full[s].subset(keep) for s in shifts]}
    times = interleaved_medians(ways, args.rounds * 5)
    print(f"window partitions of both shifts, {len(coords)} tokens, {int(keep.sum())} surviving, "
          f"{args.threads} thread(s), median ms:")
    for name, median in times.items():
        print(f"  {name:32s} {median:6.2f}")


def interleaved_medians(ways: dict, rounds: int) -> dict[str, float]:
    """Median ms of each callable of `ways` over `rounds` rounds that call each once in
    turn, after one round that warms up."""
    times = {name: [] for name in ways}
    for round_ in range(rounds + 1):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


if __name__ == "__main__":
    main()
