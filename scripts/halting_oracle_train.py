"""Train a halting model whose halting decisions are the ground truth's.

`haltdet train` with every halting stage's scores replaced by the ground truth of the
batch: a token whose pillar centre lies in a box of its frame (in BEV, enlarged by
--margin) scores 1 and runs every layer, every other token scores 0 and halts at the
first stage. The rest of the network learns with those decisions, as a halting model
learns with its scorers'; `scripts/halting_oracle.py --rules "objects only"` evaluates it
with the same decisions. Set against a baseline trained alike, it tells what halting
costs or gives when its decisions are right (docs/experiments.md). Arguments after the
script's own go to `haltdet train`:

    python scripts/halting_oracle_train.py --margin 0 -- --config halting \\
        --init haltdet/checkpoints/baseline.pt --out runs/oracle --set train.max_steps=600
"""

from __future__ import annotations

import argparse
import sys

from haltdet.cli import main as haltdet_main
from haltdet.model.detector import Detector
from haltdet.model.halting import TokenScorer


def ground_truth_halting(margin: float) -> None:
    """Patch the detector so that every scorer returns the ground truth of the batch that
    `Detector.targets` was last given (the training loop builds the targets right before
    each forward pass)."""
    batch = {}
    targets = Detector.targets

    def remember(self, boxes, labels):
        batch.update(model=self, boxes=boxes)
        return targets(self, boxes, labels)

    def scores(self, x, coords, active, batch_size):
        return batch["model"].tokens_in_boxes(coords, batch["boxes"], margin).to(x.dtype)

    Detector.targets = remember
    TokenScorer.forward = scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--margin", type=float, default=0.0, help="metres added to each box in BEV")
    parser.add_argument("train", nargs=argparse.REMAINDER, help="-- then `haltdet train` arguments")
    args = parser.parse_args()
    ground_truth_halting(args.margin)
    train_args = args.train[1:] if args.train[:1] == ["--"] else args.train
    sys.exit(haltdet_main(["train", *train_args]))


if __name__ == "__main__":
    main()
