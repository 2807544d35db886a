"""A halting model under scorers that know the ground truth, at inference.

Evaluates one halting model (first stage) on a split under scorers that know the ground
truth, each against the model as trained, on the same frames (paired bootstrap):
  * learned: the model as it is;
  * objects kept: every token whose pillar centre lies in a ground-truth box (in BEV,
    enlarged by --margin) is kept at every stage; the rest halt as the scorers say;
  * objects first: per frame and stage the same number of tokens is kept as the scorers
    keep, chosen object tokens first, then by score: the same token-layers, a perfect
    ranking of objects against background;
  * objects only (`--rules`): object tokens run every layer, every other token halts at
    the first stage (the decisions `scripts/halting_oracle_train.py` trains with);
  * nothing halts: the same weights with every token run through every layer;
  * objects marked (`--rules`): nothing halts, and the BEV stage receives each token's
    halting-stage embedding as if the "objects only" decisions had been taken (object
    tokens: ran to the end, the rest: halted at the first stage): what those decisions
    tell the BEV stage about where objects are, without halting anything (for a model
    trained so by `scripts/halting_oracle_train.py --mark-only` with
    `model.halt_stage_embedding: true`);
and the baseline (`--baseline`), for reference. `--reference CHECKPOINT` compares with
another model instead of the model's learned scores (a model trained with ground-truth
decisions against a baseline trained alike). It asks whether the scorers' choices are
what halting costs. The answer needs care: the layers after a stage, the BEV stage and the
head were trained on the token sets the scorers chose (and on halted tokens' features
from the layer they halted at), so any other choice at inference is also a change of
input distribution (docs/experiments.md has the figures).

    python scripts/halting_oracle.py halting --baseline baseline --data data/val800 --threads 1
    python scripts/halting_oracle.py runs/oracle/gt_halting/final.pt --rules "objects only" \
        --reference runs/oracle/baseline_ft/final.pt --data data/val800
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

from haltdet.bench import load_spec
from haltdet.data.dataset import FrameFolder
from haltdet.evaluate import evaluate
from haltdet.predict import predict_dataset, summarise_tokens


def marked(encoded, foreground: torch.Tensor, num_layers: int):
    """The encoder output `encoded` with its tokens' layer counts replaced by those of the
    "objects only" decisions (`foreground` (T,) bool: num_layers, else 0), so that
    `Detector.bev_features` adds the halting-stage embedding of those decisions."""
    halted_at = torch.where(foreground, num_layers, 0).to(encoded.halted_at.dtype)
    return dataclasses.replace(encoded, halted_at=halted_at)


class GroundTruthScores:
    """Replaces the scores of a model's halting stages by a rule that knows the boxes of
    the frames being run. `batches` (set before running): per batch, per frame, the frame's
    boxes, in the order `predict_dataset` runs them (batch_size 2, the dataset's order)."""

    def __init__(self, model, rule: str, margin: float):
        self.model, self.rule, self.margin = model, rule, margin
        self.batches: list[list[np.ndarray]] = []
        self.current: list[np.ndarray] = []
        halting = model.encoder.halting
        for stage, scorer in enumerate(halting.scorers):
            scorer.forward = self._wrap(scorer.forward, stage)
        forward = model.forward
        if rule == "objects marked":
            if model.stage_embedding is None:
                raise SystemExit('"objects marked" needs a model with model.halt_stage_embedding: true')
            dense_stage = model.dense_stage

            def mark(encoded, coords, batch_size):
                foreground = model.tokens_in_boxes(coords, self.current, margin)
                return dense_stage(marked(encoded, foreground, model.config.num_layers), coords, batch_size)
            model.dense_stage = mark

        def run(points, *args, **kwargs):
            self.current = self.batches.pop(0)
            return forward(points, *args, **kwargs)
        model.forward = run

    def _wrap(self, forward, stage: int):
        def scores(x, coords, active, batch_size):
            learned = forward(x, coords, active, batch_size)
            foreground = self.model.tokens_in_boxes(coords, self.current, self.margin) & active
            threshold = self.model.encoder.halting.thresholds[stage]
            if self.rule == "objects kept":
                return torch.where(foreground, torch.ones_like(learned), learned)
            if self.rule == "objects marked":
                return torch.ones_like(learned)
            if self.rule == "objects only":
                return foreground.to(learned.dtype)
            # objects first: as many kept per frame as the learned scores keep
            kept = active & (learned * active >= threshold)
            chosen = torch.zeros_like(active)
            frame = coords[:, 0]
            for f in torch.unique(frame).tolist():
                rows = torch.nonzero((frame == f) & active).flatten()
                count = int(kept[rows].sum())
                key = learned[rows] + 2.0 * foreground[rows].to(learned.dtype)
                order = torch.argsort(key, descending=True, stable=True)
                chosen[rows[order[:count]]] = True
            return chosen.to(learned.dtype)
        return scores


def batches_of_boxes(data: str, batch_size: int, frames: int = 0) -> list[list[np.ndarray]]:
    dataset = FrameFolder(data)
    boxes = [dataset[i].boxes for i in range(min(frames, len(dataset)) if frames else len(dataset))]
    return [boxes[i:i + batch_size] for i in range(0, len(boxes), batch_size)]


RULES = ("objects kept", "objects first", "objects only", "nothing halts", "objects marked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a halting model: checkpoint or bundled name")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=["objects kept", "objects first", "nothing halts"],
                        help="the scorers to replace the learned ones with")
    parser.add_argument("--reference", default=None,
                        help="compare with this model (checkpoint or name) instead of the model's learned scores")
    parser.add_argument("--baseline", default=None, help="a baseline to show beside (checkpoint or name)")
    parser.add_argument("--data", default="data/val")
    parser.add_argument("--margin", type=float, default=0.0, help="metres added to each box in BEV")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frames", type=int, default=0, help="the split's first frames only (0: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def first_stage(spec):
        model = load_spec(spec, "cpu")
        if model.refiner is not None:
            model.configure(second_stage=False)
        return model

    def predict(model):
        return predict_dataset(model, args.data, 2, "cpu", False, 0, args.frames)

    learned, truth, learned_tokens = predict(first_stage(args.model))
    rows, reference = {}, learned
    if args.reference:
        reference = predict(first_stage(args.reference))[0]
        rows["reference"] = (evaluate(truth, reference, bootstrap=args.bootstrap), None)
    rows["learned"] = (evaluate(truth, learned, bootstrap=args.bootstrap,
                                against=reference if args.reference else None), learned_tokens)
    for rule in args.rules:
        model = first_stage(args.model)
        if rule == "nothing halts":
            model.configure(halting_threshold=[0.0] * len(model.encoder.halting))
        else:
            GroundTruthScores(model, rule, args.margin).batches = batches_of_boxes(args.data, 2, args.frames)
        pred, _, tokens = predict(model)
        rows[rule] = (evaluate(truth, pred, bootstrap=args.bootstrap, against=reference), tokens)
    if args.baseline:
        rows["baseline"] = (evaluate(truth, predict(first_stage(args.baseline))[0], bootstrap=args.bootstrap,
                                     against=reference), None)

    report = {}
    compared = args.reference or "learned"
    print(f"{args.model} on {args.data}, first stage; differences from {compared} over the same "
          f"resampled frames ({args.bootstrap} sets)")
    print(f"{'scores':<15} {'mAPH_L2':>8} {'vs ' + compared[:8]:>11} {'(std)':>7} {'token-layers':>13} {'objects':>8}")
    for name, (result, tokens) in rows.items():
        summary = summarise_tokens(tokens) if tokens else {}
        against = result.get("against", {})
        report[name] = {"mAPH_L2": result["mAPH_L2"], "difference": against.get("difference"),
                        "difference_std": against.get("difference_std"),
                        "token_layers": summary.get("token_layers"),
                        "foreground_token_layers": summary.get("foreground_token_layers")}
        r = report[name]
        print(f"{name:<15} {r['mAPH_L2']:8.4f} "
              + (f"{r['difference']:+11.4f} {r['difference_std']:7.4f}" if r["difference"] is not None
                 else f"{'':>11} {result['bootstrap']['mAPH_L2_std']:7.4f}")
              + (f" {r['token_layers']:13.3f} {r['foreground_token_layers']:8.3f}" if tokens else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "reference": args.reference, "data": args.data, "margin": args.margin,
                       "rows": report}, f, indent=2)


if __name__ == "__main__":
    main()
