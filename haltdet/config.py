"""Configuration: plain dataclasses, loaded from YAML and validated.

A config file has three sections, `model`, `data` and `train`, each mapping to the
dataclass of the same name below. Unknown keys, wrong types and impossible values are
rejected with a `ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from haltdet import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"
# Which entries of the halting training pass carry the gate's gradient (haltdet/model/halting.py).
GRADIENT_PATHS = ("both", "attention", "residual", "hard")
# threshold: the method; act: cumulative halting (A-ViT-style peer, haltdet/model/halting.py)
HALTING_RULES = ("threshold", "act")


@dataclass
class ModelConfig:
    """The detector. Lengths in metres, angles in radians."""

    # x_min, y_min, z_min, x_max, y_max, z_max in the LiDAR frame.
    point_cloud_range: list[float] = field(
        default_factory=lambda: [-61.44, -61.44, -4.0, 61.44, 61.44, 3.0])
    pillar_size: float = 0.32
    pfn_channels: list[int] = field(default_factory=lambda: [32, 64])
    # input bounds per frame, 0 = no cap (haltdet/model/pillars.py): far above real frames
    max_pillars: int = 65536  # non-empty pillars (tokens) kept: the nearest to the sensor
    max_points: int = 400_000  # points kept: the densest pillars are thinned first
    max_points_per_pillar: int = 0
    d_model: int = 64
    num_heads: int = 4
    ffn_dim: int = 128
    num_layers: int = 6
    window_size: int = 12  # pillars per window side; odd layers shift by half of it
    # > 0: attention in equal-size groups of this many tokens, sorted by window, instead of
    # in windows (FlatFormer-style; haltdet/model/encoder.py, partition_groups); no halting
    group_size: int = 0
    dropout: float = 0.0
    bev_stride: int = 2  # the dense stage and the head run at this stride
    bev_channels: int = 64
    bev_convs: int = 2
    head_channels: int = 64
    # decoding
    score_threshold: float = 0.05
    max_detections: int = 200
    nms_iou: list[float] = field(default_factory=lambda: [0.2, 0.2, 0.2])  # per class
    # after the per-class NMS (and the refiner): boxes of any classes overlapping more than
    # this in BEV IoU keep the better-scored one; 1 = off (0.3 cost the halting model 3.9
    # points of mAPH_L2: docs/experiments.md), for pipelines that want one box per object
    cross_class_iou: float = 1.0
    # targets
    min_gaussian_radius: int = 1
    gaussian_overlap: float = 0.1
    # token halting (empty halting_layers: the baseline, no halting)
    halting_layers: list[int] = field(default_factory=list)  # [2, 4]: after layers 2 and 4
    halting_threshold: list[float] = field(default_factory=lambda: [0.5])  # one, or one per stage
    halting_keep_ratio: list[float] = field(default_factory=list)  # per stage; overrides threshold
    halting_max_tokens: int = 0  # per frame and stage; 0 = no cap
    halting_scorer: str = "mlp"  # mlp (per token) | random (drop at random: the peer)
    # threshold (the method) | act (cumulative halting probabilities, mean-field output and a
    # ponder cost as the sparsity loss: the A-ViT peer; halting_threshold is the cumulative level)
    halting_rule: str = "threshold"
    recycling: bool = True  # halted tokens reach the BEV map with their last feature
    # training pass: which entries carry the halting gate's gradient (haltdet/model/halting.py):
    # residual (updates) | attention (weights) | both | hard (removal). Residual: at the same
    # token-layers it trained more accurate halting models than both (docs/design.md)
    halting_gradient: str = "residual"
    # a halted key's attention gradient: the change attending to it would make (bounded),
    # not the derivative at gate 0 (unbounded when its logit exceeds the attended keys')
    halting_secant: bool = True
    # with the attention path (both | attention): the share of its gradient the gates receive
    # (1 = all of it; the forward values do not change). `haltdet gradcheck` measures what
    # each share does to the pseudo-gradient
    halting_attention_weight: float = 1.0
    halt_stage_embedding: bool = False  # add a learned embedding of the halting stage
    # a stage also keeps the candidates within this many pillars (Chebyshev, same frame) of
    # a token its scores keep (0: the scores alone decide; the cap still bounds the result).
    # Settable at inference, but part of what a model is trained with (docs/design.md)
    halting_dilation: int = 0
    # second stage (haltdet/model/refine.py): refine every detection from the raw points
    # around it; scores become score^(1-a) * IoU^a with the refiner's IoU (a per class)
    refine: bool = False
    refine_channels: list[int] = field(default_factory=lambda: [64, 128])
    refine_points: int = 128  # per box, at most
    refine_context: float = 0.5  # metres around the box whose points the refiner sees
    refine_passes: int = 2  # at inference: each pass refines the last one's boxes
    refine_min_score: float = 0.2  # at inference: first-stage boxes below this score are dropped, not refined
    refine_mirror: bool = True  # at inference: average the refiner over the points and their left-right mirror
    refine_rectify: list[float] = field(default_factory=lambda: [0.68, 0.71, 0.65])
    # at inference: "bfloat16" runs the dense stage (BEV convolutions and head) in bfloat16
    # (autocast; fast on CPUs with AMX and on GPUs), everything else in float32
    inference_dtype: str = "float32"

    def stage_thresholds(self) -> list[float]:
        return per_stage(self.halting_threshold, len(self.halting_layers))

    def weight_count(self) -> int:
        """About how many weights the first stage has (the encoder's linear layers, the
        pillar net, the dense stage and the head): for a size check before building it."""
        d, ffn = self.d_model, self.ffn_dim
        encoder = self.num_layers * (4 * d * d + 2 * d * ffn)
        pillars = sum(a * b for a, b in zip([9] + [2 * c for c in self.pfn_channels[:-1]], self.pfn_channels))
        dense = (d * self.bev_channels * self.bev_stride ** 2 + self.bev_convs * 9 * self.bev_channels ** 2
                 + 9 * self.bev_channels * self.head_channels)
        return int(encoder + pillars + dense)

    def grid_size(self) -> tuple[int, int]:
        """(ny, nx) pillars of the BEV grid."""
        r = self.point_cloud_range
        nx = round((r[3] - r[0]) / self.pillar_size)
        ny = round((r[4] - r[1]) / self.pillar_size)
        return ny, nx

    def validate(self) -> None:
        r = self.point_cloud_range
        _check(len(r) == 6, "model.point_cloud_range", "needs 6 numbers")
        _check(r[0] < r[3] and r[1] < r[4] and r[2] < r[5], "model.point_cloud_range",
               "min must be below max on every axis")
        _check(all(math.isfinite(v) for v in r), "model.point_cloud_range", "must be finite")
        _check(0 < self.pillar_size < math.inf, "model.pillar_size", "must be positive")
        ny, nx = self.grid_size()
        _check(nx * ny <= 2**26, "model.pillar_size", f"gives a {ny}x{nx} grid, more than 2**26 pillars")
        _check(self.bev_stride in (1, 2, 4), "model.bev_stride", "must be 1, 2 or 4")
        for extent, n in ((r[3] - r[0], nx), (r[4] - r[1], ny)):
            _check(abs(n * self.pillar_size - extent) < 1e-6, "model.pillar_size",
                   f"must divide the range extent {extent} evenly")
        _check(ny % (self.bev_stride * 2) == 0 and nx % (self.bev_stride * 2) == 0,
               "model.bev_stride", f"grid {ny}x{nx} must be divisible by 2*bev_stride")
        _check(self.num_heads >= 1 and self.d_model % self.num_heads == 0, "model.num_heads",
               "must divide d_model")
        _check(self.d_model % 4 == 0, "model.d_model", "must be a multiple of 4")
        _check(self.num_layers >= 1, "model.num_layers", "must be >= 1")
        _check(2 <= self.window_size <= min(ny, nx), "model.window_size",
               f"must be in 2..{min(ny, nx)} (the pillar grid is {ny} x {nx})")
        _check(len(self.pfn_channels) >= 1 and all(c > 0 for c in self.pfn_channels),
               "model.pfn_channels", "needs positive channel counts")
        _check(self.pfn_channels[-1] == self.d_model, "model.pfn_channels",
               "last entry must equal d_model")
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        for key in ("ffn_dim", "bev_channels", "head_channels", "max_detections"):
            _check(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        for key in ("bev_convs", "min_gaussian_radius", "max_pillars", "max_points", "max_points_per_pillar"):
            _check(getattr(self, key) >= 0, f"model.{key}", "must be >= 0")
        weights = self.weight_count()
        _check(weights <= 2**28, "model.d_model",
               f"the sizes (d_model, ffn_dim, num_layers, pfn/bev/head channels) give about {weights:.2e} "
               f"weights, {4 * weights / 2**30:.0f} GB in float32: more than 2**28 (1 GB)")
        _check(0 < self.gaussian_overlap < 1, "model.gaussian_overlap", "must be in (0, 1)")
        _check(len(self.nms_iou) == 3 and all(0 <= t <= 1 for t in self.nms_iou), "model.nms_iou",
               "needs one value in [0, 1] per class")
        _check(0 <= self.score_threshold < 1, "model.score_threshold", "must be in [0, 1)")
        _check(0 <= self.cross_class_iou <= 1, "model.cross_class_iou", "must be in [0, 1] (1: off)")
        stages = self.halting_layers
        _check(all(0 < layer < self.num_layers for layer in stages) and stages == sorted(set(stages)),
               "model.halting_layers", f"must be increasing layer counts in 1..{self.num_layers - 1}")
        _check(len(self.halting_threshold) in (1, len(stages)) and
               all(0 <= t <= 1 for t in self.halting_threshold), "model.halting_threshold",
               "needs one value in [0, 1], or one per halting stage")
        _check(len(self.halting_keep_ratio) in (0, len(stages)) and
               all(0 < r <= 1 for r in self.halting_keep_ratio), "model.halting_keep_ratio",
               "needs one value in (0, 1] per halting stage, or none")
        _check(self.halting_max_tokens >= 0, "model.halting_max_tokens", "must be >= 0")
        _check(self.halting_scorer in ("mlp", "random"), "model.halting_scorer", "must be 'mlp' or 'random'")
        _check(self.group_size == 0 or 2 <= self.group_size <= 4096, "model.group_size", "must be 0 (windows) or 2..4096")
        # Which tokens share a group depends on which are active, so the masked training
        # pass would not compute what the removal pass does: groups are for the baseline.
        _check(not (self.group_size and self.halting_layers), "model.group_size",
               "equal-size groups are not combined with halting (model.halting_layers)")
        _check(self.halting_gradient in GRADIENT_PATHS, "model.halting_gradient",
               f"must be one of {', '.join(GRADIENT_PATHS)}")
        _check(0.0 <= self.halting_attention_weight <= 1.0, "model.halting_attention_weight",
               "must be in [0, 1]")
        _check(self.halting_rule in HALTING_RULES, "model.halting_rule", f"must be one of {', '.join(HALTING_RULES)}")
        _check(0 <= self.halting_dilation <= 8, "model.halting_dilation", "must be 0..8 pillars")
        _check(self.halting_dilation == 0 or self.halting_rule == "threshold", "model.halting_dilation",
               "applies to the threshold rule (model.halting_rule: threshold)")
        _check(self.halting_rule != "act" or (not self.halting_keep_ratio and not self.halting_max_tokens
                                              and self.halting_scorer != "random"),
               "model.halting_rule", "act decides by cumulative probability: no keep ratios, cap or random scorer")
        _check(len(self.refine_channels) >= 1 and min(self.refine_channels) >= 1, "model.refine_channels",
               "needs at least one positive width")
        _check(self.refine_points >= 1, "model.refine_points", "must be >= 1")
        _check(self.refine_passes >= 1, "model.refine_passes", "must be >= 1")
        _check(0 <= self.refine_min_score < 1, "model.refine_min_score", "must be in [0, 1)")
        _check(self.inference_dtype in INFERENCE_DTYPES, "model.inference_dtype", f"must be one of {INFERENCE_DTYPES}")
        _check(self.refine_context >= 0, "model.refine_context", "must be >= 0")
        _check(len(self.refine_rectify) == 3 and all(0 <= a <= 1 for a in self.refine_rectify),
               "model.refine_rectify", "needs one value in [0, 1] per class")


@dataclass
class DataConfig:
    """Training/validation data and augmentation."""

    train: str = "data/train"
    val: str = "data/val"
    num_workers: int = 1
    # augmentation (training only)
    rotation: float = 0.785  # uniform in [-rotation, rotation] radians about z
    flip: bool = True  # random flips about the x and y axes
    scale: list[float] = field(default_factory=lambda: [0.95, 1.05])
    gt_sampling: bool = False  # paste objects from other training frames
    gt_sampling_max: list[int] = field(default_factory=lambda: [6, 6, 6])  # per class

    def validate(self) -> None:
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(0 <= self.rotation <= 3.1416, "data.rotation", "must be in [0, pi]")
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], "data.scale",
               "needs [low, high] with 0 < low <= high")
        _check(len(self.gt_sampling_max) == 3 and min(self.gt_sampling_max) >= 0, "data.gt_sampling_max",
               "needs one count >= 0 per class")


@dataclass
class TrainConfig:
    """Optimisation."""

    batch_size: int = 2
    max_steps: int = 4000
    lr: float = 2e-3
    weight_decay: float = 0.01
    schedule: str = "onecycle"  # onecycle | cosine
    warmup_fraction: float = 0.1
    grad_clip: float = 10.0
    seed: int = 0
    checkpoint_every: int = 500
    save_steps: list[int] = field(default_factory=list)  # also keep RUN_DIR/step_N.pt at these steps
    log_every: int = 20
    # validation on data.val every N steps (0: never): mAPH_L2 logged, the best kept as best.pt
    val_every: int = 0
    val_frames: int = 0  # only the first N frames of data.val (0: all)
    amp: bool = True  # mixed precision on CUDA (ignored on CPU unless cpu_bf16)
    cpu_bf16: bool = False  # bfloat16 autocast on CPU (AMX units make it much faster)
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resumes on CUDA too
    # loss weights
    heatmap_weight: float = 1.0
    regression_weight: float = 0.25
    direction_weight: float = 0.2  # binary cross-entropy of the heading direction
    # second stage (models with model.refine)
    refine_only: bool = False  # train only the refiner; the rest is frozen (start from --init)
    refine_weight: float = 1.0  # smooth L1 of its box residual
    refine_flip_weight: float = 1.0  # binary cross-entropy of its front/back flip
    refine_iou_weight: float = 1.0  # binary cross-entropy of its IoU
    refine_proposals: int = 64  # per frame: the first stage's best detections (score >= 0.1)
    refine_jitter: int = 4  # plus this many jittered copies of each ground-truth box
    refine_match_iou: float = 0.3  # BEV IoU with a ground-truth box for a proposal to regress it
    # non-uniform token sparsity loss (halting models): lambda * mean(weight_i * score_i)
    sparsity_weight: float = 0.0  # lambda
    sparsity_uniform: bool = False  # one weight (background's) for every token: the ablation
    sparsity_fg_weight: float = 0.0  # tokens inside (enlarged) ground-truth boxes; < 0 keeps them
    sparsity_bg_weight: float = 1.0  # every other token
    sparsity_margin: float = 0.5  # metres added to each box half-extent for "inside"
    # 0: the term is weight * score; m > 0: a hinge, a score is pushed only until it lies on
    # its side of the stage threshold by m (haltdet/model/halting.py, sparsity_loss)
    sparsity_hinge: float = 0.0
    # average foreground and background tokens apart and add the two means (each group weighs
    # the same whatever its token count)
    sparsity_balance: bool = False
    # weight of a binary cross-entropy of every halting score against whether its token lies
    # in a ground-truth box (enlarged by sparsity_margin), object and background tokens
    # averaged apart: scorers taught by the boxes as well as by the pseudo-gradient
    # (haltdet/model/halting.py, score_supervision_loss); 0: off, the method as published
    score_supervision: float = 0.0
    # weight of a distillation loss towards a frozen teacher detector run on the same frames
    # (distill_from: a checkpoint path or a bundled model's name): the KL divergence of the
    # heatmap from the teacher's and the L1 distance of the box regression where the teacher
    # sees objects (haltdet/model/head.py, distillation_loss); 0: off
    distill_weight: float = 0.0
    distill_from: str = ""
    # lambda rises linearly from 0 over this share of max_steps (0: lambda from the first step),
    # counted from halting_start
    sparsity_warmup: float = 0.0
    # share of max_steps before any token halts: until then every halting stage keeps every
    # token, no gradient reaches the scores and lambda is 0 (the detector trains as the
    # baseline); 0: halting from the first step
    halting_start: float = 0.0
    # share of the token-layers the training pass should run (0: off). Lambda is then
    # sparsity_weight times a multiplier that adapts after every step by
    # exp(rate * (share - target) / target) from the step's share, so the model settles near
    # that cost whatever its gradient path or loss (haltdet/model/halting.py, ShareTarget).
    # It adapts once a step first runs no more than the target, or after the share
    # sparsity_target_after of the steps (counted from halting_start), whichever comes first.
    sparsity_target: float = 0.0
    sparsity_target_rate: float = 0.02
    sparsity_target_after: float = 0.2

    def validate(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(0 <= self.seed < 2**32, "train.seed", "must be in [0, 2**32)")
        _check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(0 < self.lr < math.inf, "train.lr", "must be positive and finite")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.schedule in ("onecycle", "cosine"), "train.schedule",
               "must be 'onecycle' or 'cosine'")
        _check(0 <= self.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
        _check(self.grad_clip > 0, "train.grad_clip", "must be positive")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(all(s >= 1 for s in self.save_steps), "train.save_steps", "must be step numbers >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.val_every >= 0 and self.val_frames >= 0, "train.val_every",
               "val_every and val_frames must be >= 0")
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0")
        _check(self.sparsity_weight >= 0, "train.sparsity_weight", "must be >= 0")
        for key in ("refine_weight", "refine_flip_weight", "refine_iou_weight", "refine_proposals", "refine_jitter"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        _check(0 < self.refine_match_iou <= 1, "train.refine_match_iou", "must be in (0, 1]")
        _check(self.sparsity_margin >= 0, "train.sparsity_margin", "must be >= 0")
        _check(self.score_supervision >= 0, "train.score_supervision", "must be >= 0")
        _check(self.distill_weight >= 0, "train.distill_weight", "must be >= 0")
        _check(not self.distill_weight or self.distill_from, "train.distill_from",
               "names the teacher (a checkpoint or a bundled model) when train.distill_weight > 0")
        _check(not (self.distill_weight and self.refine_only), "train.distill_weight",
               "distils the first stage: it must be 0 with train.refine_only")
        _check(0 <= self.sparsity_hinge <= 1, "train.sparsity_hinge", "must be in [0, 1]")
        _check(0 <= self.sparsity_warmup <= 1, "train.sparsity_warmup", "must be in [0, 1]")
        _check(0 <= self.halting_start < 1, "train.halting_start", "must be in [0, 1)")
        _check(0 <= self.sparsity_target < 1, "train.sparsity_target", "must be in [0, 1)")
        _check(0 < self.sparsity_target_rate <= 1, "train.sparsity_target_rate", "must be in (0, 1]")
        _check(0 <= self.sparsity_target_after <= 1, "train.sparsity_target_after", "must be in [0, 1]")
        _check(self.sparsity_target == 0 or self.sparsity_weight > 0, "train.sparsity_target",
               "adapts lambda: it needs a starting train.sparsity_weight > 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        _check(self.train.halting_start == 0 or self.model.halting_rule == "threshold", "train.halting_start",
               "applies to the threshold rule (model.halting_rule: threshold)")
        _check(self.train.sparsity_target == 0 or (self.model.halting_layers and not self.model.halting_keep_ratio
                                                    and self.model.halting_rule == "threshold"),
               "train.sparsity_target", "applies to halting models with the threshold rule and no keep ratios")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def per_stage(values: list[float], stages: int) -> list[float]:
    """One value for every halting stage: a single value is repeated."""
    return list(values) * stages if len(values) == 1 else list(values)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


# Options measured not to help and removed (docs/experiments.md), with the value that
# switched each off: configs of older checkpoints load when they hold these values (or,
# None, any value: a setting of a removed part), and a config that turns one on is refused.
RETIRED = {"model.iou_head": False, "model.iou_rectify": None, "model.regression_radius": 0,
           "train.iou_weight": None, "train.sparsity_start": 0.0, "train.sparsity_ramp": 0.0}


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {type(values).__name__}")
    hints = _type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if path in RETIRED:
            if RETIRED[path] is not None and value != RETIRED[path]:
                raise ConfigError(f"config key '{path}': removed (measured not to help, docs/experiments.md); "
                                  f"only {RETIRED[path]!r}, off, is accepted")
            continue
        if key not in known:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _coerce(value, hint, path: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value  # NaN
                or abs(value) > sys.float_info.max):  # inf, or an int too large for a float
            raise ConfigError(f"config key '{path}' must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{path}': unsupported type {hint}")


def config_from_dict(values: dict) -> Config:
    return _build(Config, values or {}, "").validate()


def load_config(path_or_preset: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, or a bundled preset by name (e.g. 'baseline'), with
    `section.key=value` overrides applied (values in YAML syntax: `train.max_steps=1200`,
    `model.halting_layers=[2,4]`).

    A config may start from another: `base: baseline.yaml` (a file beside it, or a preset
    name) takes every value of that config, and this file's sections change some of them.
    """
    path = _config_path(path_or_preset)
    values = _read_with_base(path, [])
    for override in overrides or []:
        apply_override(values, override)
    config = config_from_dict(values)
    if config.name == "custom":
        config.name = path.stem
    return config


def _config_path(path_or_preset: str | Path, beside: Path | None = None) -> Path:
    """A config file: the path itself, the path beside another config, or a preset."""
    path = Path(path_or_preset)
    for candidate in ([beside / path] if beside is not None else []) + [path, PRESET_DIR / path,
                                                                        PRESET_DIR / f"{path_or_preset}.yaml"]:
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file '{path_or_preset}' and no preset of that name (presets: {', '.join(names)})")


def _read_with_base(path: Path, chain: list[Path]) -> dict:
    """A config file's raw mapping with its `base` (recursively) merged in, section by section."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must name a config file or preset")
    merged = _read_with_base(_config_path(base, beside=path.parent), chain + [path.resolve()])
    merged.pop("name", None)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (PyYAML's own message spans several)."""
    problem = getattr(err, "problem", None) or type(err).__name__
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


# ModelConfig keys that change inference only (`Detector.configure`, `--set` of the
# inference commands).
INFERENCE_SETTINGS = ("halting_threshold", "halting_keep_ratio", "halting_max_tokens", "halting_dilation",
                      "score_threshold", "max_detections", "nms_iou", "cross_class_iou", "refine_passes",
                      "refine_min_score", "refine_mirror", "inference_dtype")
INFERENCE_DTYPES = ("float32", "bfloat16")


def inference_overrides(overrides: list[str] | None, dtype: str | None = None) -> dict:
    """`--set model.KEY=VALUE` of the inference commands -> {KEY: value} for
    `Detector.configure` (which checks that each KEY is an inference setting); `--dtype
    D` is `--set model.inference_dtype=D`."""
    values: dict = {"model": {"inference_dtype": dtype}} if dtype else {}
    for override in overrides or []:
        apply_override(values, override)
    other = sorted(set(values) - {"model"})
    if other:
        raise ConfigError(f"--set {other[0]}.*: at inference only model settings can change "
                          "(e.g. --set model.score_threshold=0.3)")
    return values.get("model", {})


def apply_override(values: dict, override: str) -> None:
    """Set `section.key=value` (value parsed as YAML) in a config's raw mapping."""
    key, sep, text = override.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) != 2 or not all(path):
        raise ConfigError(f"override {override!r}: expected section.key=value, e.g. train.max_steps=1200")
    section, name = path
    if section not in ("model", "data", "train"):
        raise ConfigError(f"override {override!r}: unknown section '{section}' (model, data, train)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({yaml_problem(err)})") from None
    target = values.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"config section '{section}' must be a mapping")
    target[name] = value
