"""Where the encoder's time goes, layer by layer, in the inference (removal) pass.

For each model (a checkpoint, a bundled name, or NAME@THRESHOLD as in `haltdet bench`)
the encoder runs on the same synthetic frames, models interleaved frame by frame, and
prints the median milliseconds of:
  * the window partitions of all tokens (both shifts, once per frame),
  * each layer, with the tokens it processed and the microseconds per token,
  * the halting stages (the scorers and the decision),
  * the survivors' partitions after each stage (`WindowPartition.subset`),
  * the rest (bookkeeping between layers: the survivors' rows, the recycled features),
and the encoder's total against the first model's, beside the ratio its token-layers
would give if time followed them. A halting model's gap between the two is the sum of the
stage overheads and of its layers' time per token growing as fewer tokens remain. Run it
on an otherwise idle machine:

    python scripts/encoder_layers.py baseline halting --threads 2

`--unpacked` also runs every model with sparse token sets' small windows padded to
buckets rather than packed into chunks (`encoder.PACK_FRACTION` 0), interleaved with the
packed runs frame by frame: what packing saves, layer by layer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from haltdet.bench import bench_cloud, load_spec
from haltdet.model import encoder as encoder_module
from haltdet.model.pillars import PointBatch


class Timer:
    """Seconds spent in named parts of one encoder pass (call `reset` before each)."""

    def __init__(self):
        self.parts: dict[str, float] = defaultdict(float)
        self.layers: list[tuple[int, float]] = []
        self._start: dict[str, float] = {}

    def reset(self) -> None:
        self.parts.clear()
        self.layers.clear()

    def wrap(self, function, name: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.parts[name] += time.perf_counter() - start
            return result
        return timed

    def attach(self, encoder) -> None:
        """Hooks on the encoder's layers and halting stages, wrappers on its partitions."""
        def before(module, args):
            self._start[id(module)] = time.perf_counter()

        def after_layer(module, args, output):
            self.layers.append((args[0].shape[0], time.perf_counter() - self._start[id(module)]))

        def after_stage(module, args, output):
            self.parts["halting stages"] += time.perf_counter() - self._start[id(module)]

        for layer in encoder.layers:
            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after_layer)
        encoder.halting.register_forward_pre_hook(before)
        encoder.halting.register_forward_hook(after_stage)
        encoder.partitions = self.wrap(encoder.partitions, "partitions of all tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoints, bundled names or NAME@THRESHOLD")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--unpacked", action="store_true",
                        help="also time every model with no packing of small windows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = Timer()
    subset = encoder_module.WindowPartition.subset
    packings = [("", encoder_module.PACK_FRACTION)] + [(", unpacked", 0.0)] * args.unpacked
    encoder_module.WindowPartition.subset = timer.wrap(subset, "survivors' partitions")
    try:
        models = [load_spec(name, "cpu") for name in args.models]
        for model in models:
            timer.attach(model.encoder)
        frames = [bench_cloud(10_000 + i) for i in range(args.frames)]
        records = {name + label: [] for name in args.models for label, _ in packings}
        with torch.no_grad():
            tokens = [[m.pillar_net(PointBatch.from_list([cloud])) for cloud in frames] for m in models]
            for i in range(args.frames):
                for name, model, frame_tokens in zip(args.models, models, tokens):
                    for label, fraction in packings:
                        encoder_module.PACK_FRACTION = fraction
                        t = frame_tokens[i]
                        timer.reset()
                        start = time.perf_counter()
                        model.encoder(t.features, t.coords, 1)
                        total = time.perf_counter() - start
                        if i >= args.warmup:
                            records[name + label].append((total, dict(timer.parts), list(timer.layers)))
    finally:
        encoder_module.WindowPartition.subset = subset
        encoder_module.PACK_FRACTION = packings[0][1]
    report(records, args.threads)


def report(records: dict, threads: int) -> None:
    def ms(values):
        return 1000 * statistics.median(values)

    first_total = first_token_layers = None
    print(f"encoder, inference pass, {threads} thread(s); medians over "
          f"{len(next(iter(records.values())))} frames, ms")
    for name, rows in records.items():
        total = ms([r[0] for r in rows])
        token_layers = statistics.median([sum(n for n, _ in r[2]) for r in rows])
        first_total, first_token_layers = first_total or total, first_token_layers or token_layers
        print(f"{name}: {total:.1f} ms, {total / first_total:.2f}x the first "
              f"(token-layers {token_layers / first_token_layers:.2f}x)")
        for k in range(len(rows[0][2])):
            tokens = statistics.median([r[2][k][0] for r in rows])
            layer = ms([r[2][k][1] for r in rows])
            print(f"  layer {k}: {tokens:7.0f} tokens {layer:6.2f} ms  {1000 * layer / max(tokens, 1):5.2f} us/token")
        parts = sorted({part for r in rows for part in r[1]})
        for part in parts:
            print(f"  {part}: {ms([r[1].get(part, 0.0) for r in rows]):.2f} ms")
        rest = [r[0] - sum(r[1].values()) - sum(dt for _, dt in r[2]) for r in rows]
        print(f"  the rest: {ms(rest):.2f} ms")


if __name__ == "__main__":
    main()
