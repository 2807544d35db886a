"""Training loop: single process, or several through torchrun (DDP).

Launch with `haltdet train --config CONFIG --out RUN_DIR`, or for N processes
`torchrun --nproc_per_node N -m haltdet.cli train ...` (gloo on CPU, nccl on CUDA).
The global batch is `train.batch_size`, split evenly over the processes; rank 0 logs and
writes the checkpoints. N processes compute the update one process computes on the
whole batch (up to float rounding): the same global batches (`EpochSampler`), loss
normalisers and BatchNorm statistics over the global batch (`haltdet.distributed`).
Logged values are the global batch's.

Everything random is seeded from `train.seed`, the epoch, the frame and the step, so a
run resumed from `latest.pt` (also after `kill -9`) continues exactly as the
uninterrupted run would have: bit-exact on CPU for the same thread count
(tests/test_resume.py), and on CUDA with `train.deterministic: true`. Two fresh runs of
the full baseline config have differed in the last bits (docs/design.md, Determinism).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from haltdet import ConfigError, InputError
from haltdet.checkpoint import load_checkpoint, load_model, load_weights, rng_state, save_checkpoint, set_rng_state
from haltdet.config import Config, TrainConfig
from haltdet.data.dataset import FrameFolder, collate
from haltdet.data.formats import data_source
from haltdet.distributed import all_reduce_sum, global_batch_losses, init_from_env, sync_batchnorm
from haltdet.model.detector import Detector
from haltdet.model.halting import ShareTarget

log = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """This rank's share of a deterministic shuffled order, from a given batch on.

    Epoch `epoch` is a permutation seeded by (seed, epoch) cut into global batches of
    per_rank_batch * world frames (the ragged end is dropped, so every rank does the same
    work); rank r takes the r-th slice of each. The global batches do not depend on the
    number of processes, and `start_batch` resumes mid-epoch.
    """

    def __init__(self, size: int, seed: int, epoch: int, rank: int, world: int,
                 per_rank_batch: int, start_batch: int = 0):
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(size, generator=generator).tolist()
        global_batch = per_rank_batch * world
        num_batches = size // global_batch  # drop the ragged end: every rank does the same work
        self.indices = []
        for b in range(start_batch, num_batches):
            batch = order[b * global_batch:(b + 1) * global_batch]
            self.indices += batch[rank * per_rank_batch:(rank + 1) * per_rank_batch]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimisation step of one process."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def frame_seed(seed: int, step: int, frame_id: str) -> int:
    """The seed of one frame's draws at one optimisation step (the refiner's jittered
    boxes): the same in every process that trains the frame, whatever its batch."""
    return int(np.random.SeedSequence([seed, step, zlib.crc32(frame_id.encode())]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(config: Config, optimizer):
    """Linear warm-up then cosine decay. 'onecycle' warms up from lr/10 and ends at lr/1000
    (one-cycle policy without momentum cycling); 'cosine' warms up from 0 and ends at lr/100."""
    t = config.train
    start, end = (0.1, 0.001) if t.schedule == "onecycle" else (0.0, 0.01)
    warmup = int(t.warmup_fraction * t.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def halting_paused(t: TrainConfig, step: int) -> bool:
    """Whether step `step` (0-based) comes before train.halting_start: no token halts yet."""
    return step < t.halting_start * t.max_steps


def at_step(t: TrainConfig, step: int) -> TrainConfig:
    """The loss settings of step `step` (0-based): lambda is 0 before train.halting_start;
    with train.sparsity_warmup it then rises linearly from 0 to train.sparsity_weight over
    that share of the steps, so early on the detector and the scorers learn mostly from the
    detection loss."""
    if halting_paused(t, step):
        return dataclasses.replace(t, sparsity_weight=0.0)
    if t.sparsity_warmup <= 0:
        return t
    since = step - math.ceil(t.halting_start * t.max_steps)
    ramp = min(1.0, (since + 1) / max(1.0, t.sparsity_warmup * t.max_steps))
    return dataclasses.replace(t, sparsity_weight=t.sparsity_weight * ramp)


def autocast_context(device: torch.device, config: Config):
    if device.type == "cuda" and config.train.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and config.train.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


class _Logger:
    """JSONL log (always) and TensorBoard (when installed), rank 0 only. Entries after
    `step` (left by a killed run that is now resumed from `step`) are dropped."""

    def __init__(self, out_dir: Path, enabled: bool, step: int):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        path = out_dir / "log.jsonl"
        kept = [line + "\n" for line in (path.read_text().splitlines() if path.exists() else [])
                if _logged_step(line) <= step]
        path.write_text("".join(kept))
        self.jsonl = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)
        except ImportError:
            log.info("tensorboard not installed: JSONL log only")

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line torn by a kill
        return math.inf


def _set_deterministic(device: torch.device) -> None:
    """Deterministic kernels only (an error where torch has none). CPU training is already
    deterministic for a fixed thread count; this matters on CUDA."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def _mean_over_processes(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Logged values: the mean over processes (for losses, the global batch's loss)."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if world > 1:
        stacked = all_reduce_sum(stacked) / world
    return dict(zip(values, stacked.tolist()))


def train(config: Config, out_dir: str | Path, resume: bool = False, device: str = "cpu",
          progress: bool = True, init: str | Path | None = None) -> Path:
    """Train a detector; returns the path of the final checkpoint (`RUN_DIR/final.pt`).

    resume: continue from `RUN_DIR/latest.pt` (model, optimizer, scheduler, RNG states,
    step; the data order follows from the step), e.g. after the process was killed.
    init: start from this checkpoint's weights (fine-tuning). Parameters the checkpoint
    lacks (for example halting scorers added to a baseline) keep their initialisation;
    a parameter of a different shape is an error. A first-stage model started from a
    two-stage checkpoint takes its first stage and leaves its refiner.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but CUDA is not available")
    rank, world, device = init_from_env(device)
    t = config.train
    if t.batch_size % world:
        raise ConfigError(f"config key 'train.batch_size': {t.batch_size} does not split over "
                          f"{world} processes")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if t.deterministic:
        _set_deterministic(device)
    try:
        return _train(config, Path(out_dir), resume, device, progress, init, rank, world)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(config: Config, out_dir: Path, resume: bool, device: torch.device, progress: bool,
           init, rank: int, world: int) -> Path:
    t = config.train
    _seed_everything(t.seed)
    model = Detector(config.model).to(device)
    if world > 1:
        sync_batchnorm(model)  # BatchNorm over the global batch: the same update as 1 process
    if t.refine_only:
        if model.refiner is None:
            raise ConfigError("train.refine_only needs model.refine: true")
        if init is None and not resume:
            raise ConfigError("train.refine_only trains only the refiner: start from a trained detector "
                              "with --init CHECKPOINT")
        for module in model.first_stage():
            module.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(config, optimizer)
    if init is not None and not resume:
        weights = load_checkpoint(init, map_location=device)["model"]
        if model.refiner is None:  # the first stage of a two-stage detector: its refiner is not used
            weights = {k: v for k, v in weights.items() if not k.startswith("refiner.")}
        # A shallower encoder takes the checkpoint's first layers (a deeper one keeps the
        # initialisation of the layers the checkpoint lacks).
        depth = len(model.encoder.layers)
        deeper = [k for k in weights if k.startswith("encoder.layers.") and int(k.split(".")[2]) >= depth]
        weights = {k: v for k, v in weights.items() if k not in deeper}
        missing, unexpected = load_weights(model, weights, f"--init {init}", strict=False)
        if unexpected:
            raise InputError(f"--init {init}: parameters this model does not have: {', '.join(unexpected[:5])}")
        log.info("initialised from %s (%d parameters kept their initialisation%s)", init, len(missing),
                 f"; the encoder layers from {depth} on left out" if deeper else "")
    teacher = None
    if t.distill_weight > 0:  # frozen, as at inference; its outputs are the distillation targets
        teacher = load_model(t.distill_from, device)[0].requires_grad_(False)
        log.info("distilling from %s (weight %g)", t.distill_from, t.distill_weight)
    dataset = FrameFolder(config.data.train, augment=config.data, seed=t.seed)
    if t.val_every:  # a missing validation split is an error now, not after the first steps
        FrameFolder(config.data.val)
    batches_per_epoch = len(dataset) // t.batch_size
    if batches_per_epoch == 0:
        raise InputError(f"{config.data.train}: {len(dataset)} frames, fewer than one batch of {t.batch_size}")
    step, elapsed, target_state = 0, 0.0, None
    latest = out_dir / "latest.pt"
    if resume:
        step, elapsed, target_state = _restore(latest, model, optimizer, scheduler, device, batches_per_epoch)
    target = None
    if t.sparsity_target:
        start = math.ceil(t.halting_start * t.max_steps) + round(t.sparsity_target_after * t.max_steps)
        target = ShareTarget(t.sparsity_target, t.sparsity_target_rate, start, target_state)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = _Logger(out_dir, rank == 0, step)
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress or rank != 0,
               desc="train", unit="step", dynamic_ncols=True)
    model.train()
    if t.refine_only:  # the first stage runs as at inference: it only makes the proposals
        for module in model.first_stage():
            module.eval()
    start_time = time.time() - elapsed
    stopped_early, skipped = False, 0
    best_val = _best_val(out_dir / "best.pt") if resume else -math.inf

    def checkpoint(path: Path) -> None:
        if rank == 0:
            save_checkpoint(path, {
                "config": config.to_dict(), "model": model.state_dict(), "step": step,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "elapsed_seconds": time.time() - start_time, "rng": rng_state(),
                "data": {"epoch": step // batches_per_epoch, "batches_per_epoch": batches_per_epoch},
                "threads": torch.get_num_threads(),
                "sparsity_target": target.state() if target else None})

    while step < t.max_steps and not stopped_early:
        epoch, start_batch = divmod(step, batches_per_epoch)
        dataset.set_epoch(epoch)
        sampler = EpochSampler(len(dataset), t.seed, epoch, rank, world, t.batch_size // world, start_batch)
        loader = DataLoader(dataset, batch_size=t.batch_size // world, sampler=sampler, collate_fn=collate,
                            num_workers=config.data.num_workers,
                            persistent_workers=False, prefetch_factor=4 if config.data.num_workers else None)
        for batch in loader:
            # Per-step seeding keeps any randomness in the model reproducible across resumes.
            torch.manual_seed(step_seed(t.seed, step, rank))
            boxes, labels = batch.trainable()
            targets = model.targets(boxes, labels).to(device)
            if model.halting:
                model.encoder.halting.paused = halting_paused(t, step)
            points = batch.points.to(device)
            with autocast_context(device, config):
                output = ddp_model(points)
            teacher_output = None
            if teacher is not None:
                with torch.no_grad(), autocast_context(device, config):
                    teacher_output = teacher(points)
            with global_batch_losses(world > 1):
                seeds = [frame_seed(t.seed, step, frame_id) for frame_id in batch.frame_ids]
                settings = at_step(t, step)
                if target:
                    settings = dataclasses.replace(settings,
                                                   sparsity_weight=settings.sparsity_weight * target.multiplier)
                losses = model.loss(output, targets, settings, boxes, labels, jitter_seeds=seeds,
                                    teacher=teacher_output)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, t.grad_clip)
            # Gradients are averaged over processes, so every process decides alike.
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", step + 1)
            scheduler.step()
            if target and not halting_paused(t, step):
                target.update(_mean_over_processes({"share": losses["token_layers"]}, world)["share"], step)
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                tokens = torch.tensor(output.tokens.features.shape[0] * world, device=device)
                values = _mean_over_processes({**losses, "grad_norm": grad_norm, "tokens": tokens}, world)
                values.update(lr=scheduler.get_last_lr()[0], tokens=round(values["tokens"]),
                              seconds=round(time.time() - start_time, 1), epoch=epoch, skipped_steps=skipped)
                if t.sparsity_warmup or t.halting_start or target:
                    values["sparsity_weight"] = settings.sparsity_weight
                logger.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}")
            if t.val_every and step % t.val_every == 0:
                best_val = _validate(model, config, out_dir, step, start_time, best_val, logger, rank, world, device)
            if step % t.checkpoint_every == 0:
                checkpoint(latest)
            if step in t.save_steps:
                checkpoint(out_dir / f"step_{step}.pt")
            if t.max_minutes:
                over = torch.tensor(float(time.time() - start_time > 60 * t.max_minutes), device=device)
                if float(all_reduce_sum(over)) > 0:  # every process stops at the same step
                    log.warning("train.max_minutes reached at step %d: stopping", step)
                    stopped_early = True
            if step >= t.max_steps or stopped_early:
                break
    bar.close()
    if model.halting:
        model.encoder.halting.paused = False
    checkpoint(latest)
    final = out_dir / "final.pt"
    if rank == 0:
        save_checkpoint(final, {"config": config.to_dict(), "model": model.state_dict(), "step": step,
                                "train_seconds": round(time.time() - start_time, 1),
                                "data_source": data_source(config.data.train)})
    logger.close()
    if world > 1:
        dist.barrier()
    return final


def _validate(model: Detector, config: Config, out_dir: Path, step: int, start_time: float, best: float,
              logger, rank: int, world: int, device) -> float:
    """Evaluate on data.val (rank 0; the others wait), log val_mAPH_L2 and the token-layers
    run, and keep the best weights so far as best.pt. Returns the best mAPH_L2 so far."""
    from haltdet.predict import evaluate_model

    t = config.train
    if rank == 0:
        result = evaluate_model(model, config.data.val, device=device, progress=False, num_workers=0,
                                frames=t.val_frames)
        value = float(result["mAPH_L2"])
        logger.write(step, {"val_mAPH_L2": value, "val_token_layers": result.get("tokens", {}).get("token_layers"),
                            "val_seconds": round(time.time() - start_time, 1)})
        if value > best:
            best = value
            save_checkpoint(out_dir / "best.pt", {"config": config.to_dict(), "model": model.state_dict(),
                                                  "step": step, "val_mAPH_L2": value})
        model.train()
        if t.refine_only:  # the first stage stays as at inference
            for module in model.first_stage():
                module.eval()
    if world > 1:
        dist.barrier()
    return best


def _best_val(path: Path) -> float:
    """The validation mAPH_L2 of a run's best.pt (-inf if none yet)."""
    if not path.exists():
        return -math.inf
    return float(load_checkpoint(path).get("val_mAPH_L2", -math.inf))


def _restore(latest: Path, model, optimizer, scheduler, device: torch.device,
             batches_per_epoch: int) -> tuple[int, float, dict | None]:
    """Load a training checkpoint into the run; returns (step, elapsed seconds, the state of
    train.sparsity_target's adaptation)."""
    if not latest.exists():
        raise InputError(f"--resume: no checkpoint {latest} to resume from")
    state = load_checkpoint(latest, map_location=device)
    if "optimizer" not in state:
        raise InputError(f"{latest}: not a training checkpoint (no optimizer state) to resume from")
    load_weights(model, state["model"], latest)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise InputError(f"{latest}: optimizer state does not fit this run ({err})") from None
    if "rng" in state:
        set_rng_state(state["rng"])
    stored = state.get("data", {}).get("batches_per_epoch", batches_per_epoch)
    if stored != batches_per_epoch:
        log.warning("%s: %d batches per epoch then, %d now (data or batch size changed): the data "
                    "order differs from the interrupted run's", latest, stored, batches_per_epoch)
    if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        log.warning("%s: written with %d threads, running with %d: CPU results may differ in the last bits",
                    latest, state["threads"], torch.get_num_threads())
    log.info("resumed from %s at step %d", latest, state["step"])
    return state["step"], state.get("elapsed_seconds", 0.0), state.get("sparsity_target")
