"""Train a halting model whose halting decisions are the ground truth's.

`haltdet train` with every halting stage's scores replaced by the ground truth of the
batch: a token whose pillar centre lies in a box of its frame (in BEV, enlarged by
--margin) scores 1 and runs every layer, every other token scores 0 and halts at the
first stage. The rest of the network learns with those decisions, as a halting model
learns with its scorers'; `scripts/halting_oracle.py --rules "objects only"` evaluates it
with the same decisions. Set against a baseline trained alike, it tells what halting
costs or gives when its decisions are right (docs/experiments.md).

Right decisions also tell the BEV stage where the objects are. `--mark-only` trains that
information alone: nothing halts, and the BEV stage receives each token's halting-stage
embedding (`model.halt_stage_embedding: true`) as if the ground-truth decisions had been
taken; `scripts/halting_oracle.py --rules "objects marked"` evaluates it. Arguments after
the script's own go to `haltdet train`:

    python scripts/halting_oracle_train.py --margin 0 -- --config halting \\
        --init haltdet/checkpoints/baseline.pt --out runs/oracle --set train.max_steps=600
"""

from __future__ import annotations

import argparse
import sys

import torch
from halting_oracle import marked

from haltdet.cli import main as haltdet_main
from haltdet.model.detector import Detector
from haltdet.model.halting import TokenScorer


def ground_truth_halting(margin: float, mark_only: bool = False) -> None:
    """Patch the detector so that every scorer returns the ground truth of the batch that
    `Detector.targets` was last given (the training loop builds the targets right before
    each forward pass). mark_only: every scorer keeps every token, and the BEV stage gets
    the halting-stage embedding of the ground-truth decisions instead."""
    batch = {}
    targets = Detector.targets
    dense_stage = Detector.dense_stage

    def remember(self, boxes, labels):
        batch.update(model=self, boxes=boxes)
        return targets(self, boxes, labels)

    def scores(self, x, coords, active, batch_size):
        if mark_only:
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return batch["model"].tokens_in_boxes(coords, batch["boxes"], margin).to(x.dtype)

    def mark(self, encoded, coords, batch_size):
        if self.stage_embedding is None:
            raise SystemExit("--mark-only needs --set model.halt_stage_embedding=true")
        foreground = self.tokens_in_boxes(coords, batch["boxes"], margin)
        return dense_stage(self, marked(encoded, foreground, self.config.num_layers), coords, batch_size)

    Detector.targets = remember
    TokenScorer.forward = scores
    if mark_only:
        Detector.dense_stage = mark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--margin", type=float, default=0.0, help="metres added to each box in BEV")
    parser.add_argument("--mark-only", action="store_true",
                        help="halt nothing; give the BEV stage the decisions' halting-stage embedding")
    parser.add_argument("train", nargs=argparse.REMAINDER, help="-- then `haltdet train` arguments")
    args = parser.parse_args()
    ground_truth_halting(args.margin, args.mark_only)
    train_args = args.train[1:] if args.train[:1] == ["--"] else args.train
    sys.exit(haltdet_main(["train", *train_args]))


if __name__ == "__main__":
    main()
