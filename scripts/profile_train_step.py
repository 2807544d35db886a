"""Time training steps of a config and show where one step's time goes.

    python scripts/profile_train_step.py [--config baseline] [--threads 1] [--steps 6] [--data data/train]
                                         [--set train.cpu_bf16=true ...]

Runs `--steps` optimiser steps of batch `train.batch_size` on the first frames of the
training split (augmented as in training, no data loader), prints each step's seconds and
the mean of all but the first, then profiles one more step with `torch.profiler` and
prints its most expensive operators (self time, by input shape). Numbers are only
comparable on an otherwise idle machine or within one run.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from haltdet import keep_freed_memory
from haltdet.config import load_config
from haltdet.data.dataset import FrameFolder, collate
from haltdet.model.detector import Detector
from haltdet.train import autocast_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="baseline", help="config file or preset name")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", help="training split (default: the config's data.train)")
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for haltdet train (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `haltdet train` does
    config = load_config(args.config, args.set)
    torch.manual_seed(config.train.seed)
    model = Detector(config.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    dataset = FrameFolder(args.data or config.data.train, augment=config.data, seed=config.train.seed)
    size = config.train.batch_size
    frames = [dataset[i % len(dataset)] for i in range((args.steps + 1) * size)]

    def step(k: int) -> None:
        batch = collate(frames[k * size:(k + 1) * size])
        boxes, labels = batch.trainable()
        with autocast_context(torch.device("cpu"), config):  # as haltdet train: the forward pass only
            output = model(batch.points)
        losses = model.loss(output, model.targets(boxes, labels), config.train, boxes, labels,
                            jitter_seeds=list(range(size)))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    seconds = []
    for k in range(args.steps):
        start = time.perf_counter()
        step(k)
        seconds.append(time.perf_counter() - start)
    print(f"{args.config}, {args.threads} thread(s): seconds per step {[round(s, 2) for s in seconds]}; "
          f"mean after the first {sum(seconds[1:]) / max(len(seconds) - 1, 1):.3f}")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(args.steps)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
