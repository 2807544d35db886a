"""How well halting models' scorers tell object tokens from background, on a split.

For each model and halting stage, over the tokens that stage scores (inference pass, first
frames of the split): the ROC AUC of the scores for "the token's pillar centre lies in a
ground-truth box" (in BEV, enlarged by --margin; ignored boxes left out), and the share of
object and of background tokens the stage keeps. An AUC of 1 ranks every object token
above every background token; 0.5 is chance. The decisions' effect on accuracy is another
matter (docs/experiments.md): this says only what the scores know about objects.

    python scripts/halting_scorer_auc.py halting runs/RUN/final.pt --data data/val800 --frames 40
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader, Subset

from haltdet.bench import load_spec
from haltdet.data.dataset import FrameFolder, collate


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half (nan without both)."""
    pos, neg = scores[positive].double(), torch.sort(scores[~positive].double()).values
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    below = torch.searchsorted(neg, pos, right=False).double()
    at_or_below = torch.searchsorted(neg, pos, right=True).double()
    return float((below + 0.5 * (at_or_below - below)).mean() / neg.numel())


def scorer_report(model, data: str, frames: int, margin: float) -> list[dict]:
    """Per halting stage: {"layer", "auc", "objects_kept", "background_kept", "tokens",
    "object_tokens"} over the tokens the stage scored in the first `frames` frames."""
    dataset = FrameFolder(data)
    dataset = Subset(dataset, range(min(frames, len(dataset)))) if frames else dataset
    layers = model.config.halting_layers
    scores, objects = [[] for _ in layers], [[] for _ in layers]
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=2, collate_fn=collate):
            output = model(batch.points)
            encoded = output.encoded
            inside = model.tokens_in_boxes(output.tokens.coords, batch.trainable()[0], margin)
            for stage, layer in enumerate(layers):
                scored = encoded.halted_at >= layer
                scores[stage].append(encoded.scores[stage][scored])
                objects[stage].append(inside[scored])
    report = []
    for stage, layer in enumerate(layers):
        s, o = torch.cat(scores[stage]), torch.cat(objects[stage])
        kept = s >= model.encoder.halting.thresholds[stage]
        report.append({"layer": layer, "auc": roc_auc(s, o),
                       "objects_kept": float(kept[o].double().mean()) if o.any() else float("nan"),
                       "background_kept": float(kept[~o].double().mean()) if (~o).any() else float("nan"),
                       "tokens": int(s.numel()), "object_tokens": int(o.sum())})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="halting models: checkpoints or bundled names")
    parser.add_argument("--data", default="data/val")
    parser.add_argument("--frames", type=int, default=40, help="the split's first frames (0: all; default 40)")
    parser.add_argument("--margin", type=float, default=0.0, help="metres added to each box in BEV")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {}
    print(f"{'model':<40} {'stage':>5} {'AUC':>7} {'objects kept':>13} {'background kept':>16}")
    for spec in args.models:
        model = load_spec(spec, "cpu")
        if not model.halting:
            raise SystemExit(f"{spec} has no halting stages")
        result[spec] = scorer_report(model, args.data, args.frames, args.margin)
        for row in result[spec]:
            print(f"{spec:<40} {row['layer']:>5} {row['auc']:>7.4f} {row['objects_kept']:>13.3f} "
                  f"{row['background_kept']:>16.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "frames": args.frames, "margin": args.margin, "models": result}, f, indent=2)


if __name__ == "__main__":
    main()
