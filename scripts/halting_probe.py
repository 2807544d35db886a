"""What a halting model's scorers see and what pulls on them, from a training checkpoint.

    python scripts/halting_probe.py RUN_DIR/latest.pt [--data data/train] [--frames 4]

On the first frames of the training data (augmented as in training, in the training
pass), per halting stage: the mean score and the share kept of object tokens (pillar
inside a ground-truth box enlarged by train.sparsity_margin) and of background tokens,
and the summed gradient that the detection loss and the weighted sparsity loss each
give those scores. A gradient > 0 pushes scores down (towards halting). Read it when a
run's `kept_fraction` falls to 0: do the scorers tell objects from background, and which
loss pushes which way?
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from haltdet.checkpoint import load_checkpoint
from haltdet.config import apply_override, config_from_dict
from haltdet.data.dataset import FrameFolder, collate
from haltdet.model.detector import Detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint of a halting model (latest.pt, final.pt)")
    parser.add_argument("--data", help="training data (default: the checkpoint's data.train)")
    parser.add_argument("--frames", type=int, default=4, help="frames, probed two at a time (default 4)")
    parser.add_argument("--set", action="append", metavar="model.KEY=VALUE",
                        help="probe with another model setting, e.g. model.halting_secant=false")
    args = parser.parse_args()
    state = load_checkpoint(args.checkpoint)
    values = state["config"]
    for override in args.set or []:
        apply_override(values, override)
    config = config_from_dict(values)
    model = Detector(config.model)
    model.load_state_dict(state["model"])
    if not model.halting:
        parser.error(f"{args.checkpoint}: not a halting model")
    model.train()
    dataset = FrameFolder(args.data or config.data.train, augment=config.data, seed=config.train.seed)
    print(f"{args.checkpoint}: step {state.get('step')}; per stage, objects / background")
    for start in range(0, args.frames, 2):
        batch = collate([dataset[i] for i in range(start, min(start + 2, args.frames))])
        boxes, labels = batch.trainable()
        decisions = {}
        hook = model.encoder.halting.register_forward_hook(lambda m, a, d: decisions.setdefault(a[0], d))
        output = model(batch.points)
        hook.remove()
        detection_only = dataclasses.replace(config.train, sparsity_weight=0.0)
        detection = model.loss(output, model.targets(boxes, labels), detection_only, boxes, labels)["loss"]
        foreground = model.tokens_in_boxes(output.tokens.coords, boxes, config.train.sparsity_margin)
        sparsity = config.train.sparsity_weight * model.sparsity_loss(output, config.train, foreground)
        scores = [decisions[s].scores for s in sorted(decisions)]
        foreground = foreground.detach()
        from_detection = torch.autograd.grad(detection, scores, retain_graph=True, allow_unused=True)
        from_sparsity = torch.autograd.grad(sparsity, scores, allow_unused=True)
        print(f"frames {start}-{start + len(batch.frame_ids) - 1}: {int(foreground.sum())} object tokens "
              f"of {len(foreground)}")
        active = torch.ones_like(foreground)
        for stage, score in enumerate(scores):
            keep = decisions[stage].keep
            row = []
            for name, group in (("objects", foreground & active), ("background", ~foreground & active)):
                if not group.any():
                    continue
                det = from_detection[stage][group].sum() if from_detection[stage] is not None else 0.0
                spa = from_sparsity[stage][group].sum() if from_sparsity[stage] is not None else 0.0
                row.append(f"{name}: score {float(score.detach()[group].mean()):.3f}, kept "
                           f"{float(keep[group].float().mean()):.2f}, gradient detection {float(det):+.2e} "
                           f"sparsity {float(spa):+.2e}")
            print(f"  stage {stage + 1}: " + ("; ".join(row) or "no token reaches it"))
            active = keep


if __name__ == "__main__":
    main()
