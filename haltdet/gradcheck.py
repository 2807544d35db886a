"""How close the halting pseudo-gradient is to a true gradient (`haltdet gradcheck`).

A halting decision is a step function of the score: it has no gradient. The training
pass gives the score the gradient of the loss with respect to the token's gate, taken at
the hard 0/1 gate (haltdet/model/halting.py). This module measures how that compares with
the gradient of a smooth relaxation of the same encoder, in which every stage's factor
is sigmoid((score - threshold) / T), and with central finite differences of that
relaxation, on small random token sets (a few windows, two halting stages, random
weights, a random linear loss on every token's final feature), in float64.

Gradients are compared with respect to each stage's gate factor. For the straight-through
factor `keep + s - stopgrad(s)` that is the gradient the score receives; the relaxation's
score gradient is the same times the sigmoid's slope, which is all but zero away from the
threshold and would only say which tokens sit near it. Per case the cosine is taken over
all tokens each stage decided on.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from haltdet.config import GRADIENT_PATHS, ModelConfig
from haltdet.model.encoder import SparseWindowEncoder

ATTENTION_WEIGHTS = (0.25, 0.5)
# The training passes compared, as (gradient path, secant, attention weight): each gradient
# path with the secant attention gradient for halted keys (the default); both paths with
# the exact derivative at gate 0 instead; both paths with a share of the attention path's
# gradient (model.halting_attention_weight).
VARIANTS = ({path: (path, True, 1.0) for path in GRADIENT_PATHS} | {"both_tangent": ("both", False, 1.0)}
            | {f"both_w{w}": ("both", True, w) for w in ATTENTION_WEIGHTS})

# The small encoder of every case: two halting stages, windows of 6 x 6 pillars over an
# 18 x 18 grid (9 windows before shifting), about 9 tokens per window.
CASE = dict(d_model=16, num_heads=2, ffn_dim=32, num_layers=4, window_size=6, halting_layers=[1, 3])
GRID = 18
TOKENS = 80


def random_case(seed: int) -> tuple[SparseWindowEncoder, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random encoder (float64, scorers giving scores spread around 0.5), token features
    (T, C), coords (T, 3) and the loss weights (T, C) of case `seed`."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = SparseWindowEncoder(**CASE).double()
    for scorer in encoder.halting.scorers:
        for name, p in scorer.named_parameters():
            torch.nn.init.normal_(p, std=0.0 if name.endswith("bias") else 0.5)
    cells = torch.randperm(GRID * GRID, generator=generator)[:TOKENS].sort().values
    coords = torch.stack([torch.zeros_like(cells), cells // GRID, cells % GRID], dim=1)
    features = torch.randn(TOKENS, CASE["d_model"], generator=generator, dtype=torch.float64)
    loss_weights = torch.randn(TOKENS, CASE["d_model"], generator=generator, dtype=torch.float64)
    return encoder, features, coords, loss_weights


class _Factors:
    """A forward hook on `encoder.halting` that keeps every stage's decision (with the
    factor's gradient retained) and adds an optional offset to the factors."""

    def __init__(self, encoder: SparseWindowEncoder):
        self.decisions, self.offsets = {}, {}
        self.handle = encoder.halting.register_forward_hook(self)

    def __call__(self, module, args, decision):
        stage = args[0]
        if stage in self.offsets:
            decision = replace(decision, factor=decision.factor + self.offsets[stage])
        if decision.factor.requires_grad:
            decision.factor.retain_grad()
        self.decisions[stage] = decision
        return decision


def _loss(encoder, features, coords, loss_weights) -> torch.Tensor:
    return (encoder(features, coords).features * loss_weights).sum()


def factor_gradients(encoder, features, coords, loss_weights, candidates=None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per stage, d loss / d factor over the stage's candidates (bool (T,) each, default
    the tokens the stage decided on in this pass). Returns (gradients, candidates)."""
    hook = _Factors(encoder)
    try:
        _loss(encoder, features, coords, loss_weights).backward()
    finally:
        hook.handle.remove()
    stages = sorted(hook.decisions)
    if candidates is None:  # the stage's candidates are the tokens still active before it
        candidates, active = [], torch.ones(features.shape[0], dtype=torch.bool)
        for stage in stages:
            candidates.append(active)
            active = hook.decisions[stage].keep
    gradients = []
    for stage, chosen in zip(stages, candidates):
        grad = hook.decisions[stage].factor.grad
        if grad is None:
            grad = torch.zeros(int(chosen.sum()), dtype=torch.float64)
        elif grad.numel() == chosen.numel():  # the masked pass decides on every token
            grad = grad[chosen]
        gradients.append(grad)  # else the removal pass: its decisions are on the candidates only
    return gradients, candidates


def finite_differences(encoder, features, coords, loss_weights, probes: list[torch.Tensor],
                       eps: float) -> list[torch.Tensor]:
    """Central differences of the loss with respect to the factors of the tokens `probes`
    (per stage, (N,) token indices)."""
    hook = _Factors(encoder)
    gradients = []
    try:
        with torch.no_grad():
            for stage, tokens in enumerate(probes):
                grad = []
                for token in tokens.tolist():
                    values = []
                    for sign in (1.0, -1.0):
                        offset = torch.zeros(features.shape[0], dtype=torch.float64)
                        offset[token] = sign * eps
                        hook.offsets = {stage: offset}
                        values.append(float(_loss(encoder, features, coords, loss_weights)))
                    grad.append((values[0] - values[1]) / (2 * eps))
                gradients.append(torch.tensor(grad, dtype=torch.float64))
    finally:
        hook.handle.remove()
    return gradients


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat(a), torch.cat(b)
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def run_case(seed: int, temperature: float, eps: float, probes: int = 12) -> dict[str, float]:
    """Cosines of one case: each training path's pseudo-gradient against the relaxation's
    gradient ("<path>"), and on `probes` random candidates per stage against the
    relaxation's finite differences ("<path>_fd"); the relaxation's gradient against its
    finite differences on the same tokens ("relaxed_vs_fd")."""
    encoder, features, coords, loss_weights = random_case(seed)
    encoder.train()
    result = {}
    pseudo, candidates = {}, None
    for path, (gradient, secant, weight) in VARIANTS.items():
        encoder.halting.gradient, encoder.halting.secant, encoder.halting.attention_weight = gradient, secant, weight
        encoder.zero_grad()
        # Every path halts the same tokens; the first one's candidates are everyone's.
        grads, found = factor_gradients(encoder, features, coords, loss_weights, candidates)
        candidates = candidates or found
        pseudo[path] = grads
    encoder.halting.gradient, encoder.halting.secant, encoder.halting.attention_weight = "both", True, 1.0
    encoder.halting.relaxation = temperature
    relaxed, _ = factor_gradients(encoder, features, coords, loss_weights, candidates)
    generator = torch.Generator().manual_seed(seed)
    # Per stage: positions among its candidates, and the tokens they are.
    picks = [torch.randperm(int(c.sum()), generator=generator)[:probes].sort().values for c in candidates]
    tokens = [torch.nonzero(c).flatten()[p] for c, p in zip(candidates, picks)]
    numeric = finite_differences(encoder, features, coords, loss_weights, tokens, eps)

    def probed(grads):
        return [g[p] for g, p in zip(grads, picks)]

    for path, grads in pseudo.items():
        result[path] = cosine(grads, relaxed)
        result[path + "_fd"] = cosine(probed(grads), numeric)
    result["relaxed_vs_fd"] = cosine(probed(relaxed), numeric)
    encoder.halting.relaxation = None
    with torch.no_grad():
        halted = encoder.eval()(features, coords).halted_at < len(encoder.layers)
    result["halted_fraction"] = float(halted.double().mean())
    return result


def gradcheck(cases: int = 50, temperature: float = 0.01, eps: float = 1e-6, seed: int = 0,
              progress: bool = True) -> dict:
    """Run `cases` random cases; returns {"cases", "temperature", "paths": {path:
    {"cosine_median", "cosine_p10", "cosine_fd_median", "cosine_fd_p10"}},
    "relaxed_vs_fd_median", "halted_fraction_mean"}."""
    results = [run_case(seed + i, temperature, eps)
               for i in tqdm(range(cases), desc="gradcheck", disable=not progress)]

    def quantile(key: str, q: float) -> float:
        values = np.array([r[key] for r in results])
        return float(np.quantile(values, q)) if values.size else math.nan

    return {
        "cases": cases, "temperature": temperature, "tokens": TOKENS, "encoder": CASE,
        "paths": {path: {"cosine_median": quantile(path, 0.5), "cosine_p10": quantile(path, 0.1),
                         "cosine_fd_median": quantile(path + "_fd", 0.5),
                         "cosine_fd_p10": quantile(path + "_fd", 0.1)} for path in VARIANTS},
        "relaxed_vs_fd_median": quantile("relaxed_vs_fd", 0.5),
        "halted_fraction_mean": float(np.mean([r["halted_fraction"] for r in results])),
    }


def format_report(report: dict) -> str:
    lines = [f"{report['cases']} cases, relaxation temperature {report['temperature']}, "
             f"{report['halted_fraction_mean']:.0%} of tokens halted on average",
             "cosine of the pseudo-gradient against the relaxed gradient (and its finite differences)",
             f"{'path':<13} {'median':>8} {'p10':>8} {'fd median':>10} {'fd p10':>8}"]
    default = ModelConfig.halting_gradient
    if ModelConfig.halting_attention_weight != 1.0 and default == "both":
        default = f"{default}_w{ModelConfig.halting_attention_weight}"
    for path, row in report["paths"].items():
        name = f"{path} *" if path == default else path
        lines.append(f"{name:<13} {row['cosine_median']:8.3f} {row['cosine_p10']:8.3f} "
                     f"{row['cosine_fd_median']:10.3f} {row['cosine_fd_p10']:8.3f}")
    lines.append(f"relaxed gradient against its finite differences: median cosine "
                 f"{report['relaxed_vs_fd_median']:.4f}")
    lines.append("* the training pass by default (model.halting_gradient)")
    return "\n".join(lines)
