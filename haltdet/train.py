"""Training loop: single process, or several through torchrun (DDP).

Launch with `haltdet train --config CONFIG --out RUN_DIR`, or for N processes
`torchrun --nproc_per_node N -m haltdet.cli train ...` (gloo on CPU, nccl on CUDA).
The global batch is `train.batch_size`, split evenly over the processes.

Everything random is seeded from `train.seed` and the step, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from haltdet import ConfigError, InputError
from haltdet.checkpoint import load_checkpoint, save_checkpoint
from haltdet.config import Config
from haltdet.data.dataset import FrameFolder, collate
from haltdet.model.detector import Detector

log = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """Deterministic shuffled order per epoch, this rank's share, from a given position."""

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


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


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


def autocast_context(device: torch.device, config: Config):
    if device.type == "cuda" and config.train.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and config.train.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


class _Logger:
    """JSONL log (always) and TensorBoard (when installed), rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.jsonl = open(out_dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
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


def train(config: Config, out_dir: str | Path, resume: bool = False, device: str = "cpu",
          progress: bool = True, init: str | Path | None = None) -> Path:
    """Train a detector; returns the path of the final checkpoint (`RUN_DIR/final.pt`).

    init: start from this checkpoint's weights (fine-tuning). Parameters the checkpoint
    lacks (for example halting scorers added to a baseline) keep their initialisation;
    a parameter of a different shape is an error.
    """
    rank, world = _distributed()
    out_dir = Path(out_dir)
    t = config.train
    if t.batch_size % world:
        raise ConfigError(f"config key 'train.batch_size': {t.batch_size} does not split over "
                          f"{world} processes")
    per_rank_batch = t.batch_size // world
    device = torch.device(device if device != "cuda" or world == 1 else f"cuda:{rank % torch.cuda.device_count()}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but CUDA is not available")

    _seed_everything(t.seed)
    model = Detector(config.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(config, optimizer)
    if init is not None and not resume:
        weights = load_checkpoint(init, map_location=device)["model"]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise InputError(f"--init {init}: parameters this model does not have: {', '.join(unexpected[:5])}")
        log.info("initialised from %s (%d parameters kept their initialisation)", init, len(missing))
    step, elapsed = 0, 0.0
    latest = out_dir / "latest.pt"
    if resume:
        if not latest.exists():
            raise InputError(f"--resume: no checkpoint {latest} to resume from")
        state = load_checkpoint(latest, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, elapsed = state["step"], state.get("elapsed_seconds", 0.0)
        log.info("resumed from %s at step %d", latest, step)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = FrameFolder(config.data.train, augment=config.data, seed=t.seed)
    batches_per_epoch = len(dataset) // t.batch_size
    if batches_per_epoch == 0:
        raise InputError(f"{config.data.train}: {len(dataset)} frames, fewer than one batch of {t.batch_size}")
    logger = _Logger(out_dir, rank == 0)
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress or rank != 0,
               desc="train", unit="step", dynamic_ncols=True)
    model.train()
    start_time = time.time() - elapsed
    stopped_early = False

    def checkpoint(path: Path) -> None:
        if rank == 0:
            save_checkpoint(path, {
                "config": config.to_dict(), "model": model.state_dict(), "step": step,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "elapsed_seconds": time.time() - start_time})

    while step < t.max_steps and not stopped_early:
        epoch, start_batch = divmod(step, batches_per_epoch)
        dataset.set_epoch(epoch)
        sampler = EpochSampler(len(dataset), t.seed, epoch, rank, world, per_rank_batch, start_batch)
        loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, collate_fn=collate,
                            num_workers=config.data.num_workers,
                            persistent_workers=False, prefetch_factor=4 if config.data.num_workers else None)
        for batch in loader:
            # Per-step seeding keeps any randomness in the model reproducible across resumes.
            torch.manual_seed(t.seed * 1_000_003 + step)
            boxes, labels = batch.trainable()
            targets = model.targets(boxes, labels).to(device)
            with autocast_context(device, config):
                output = ddp_model(batch.points.to(device))
            losses = model.loss(output, targets, t, boxes)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                values = {k: float(v.detach()) for k, v in losses.items()}
                values.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                              tokens=int(output.tokens.features.shape[0]),
                              seconds=round(time.time() - start_time, 1), epoch=epoch)
                logger.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}")
            if step % t.checkpoint_every == 0:
                checkpoint(latest)
            if t.max_minutes and time.time() - start_time > 60 * t.max_minutes:
                log.warning("train.max_minutes reached at step %d: stopping", step)
                stopped_early = True
            if step >= t.max_steps or stopped_early:
                break
    bar.close()
    checkpoint(latest)
    final = out_dir / "final.pt"
    if rank == 0:
        save_checkpoint(final, {"config": config.to_dict(), "model": model.state_dict(), "step": step,
                                "train_seconds": round(time.time() - start_time, 1)})
    logger.close()
    if world > 1:
        dist.barrier()
    return final
