"""What torchrun (DDP) training needs beyond DistributedDataParallel itself.

Several processes training on slices of a global batch compute the same update as one
process training on the whole batch only if nothing depends on how the batch is split:
  * the loss normalisers (positives, objects, scored tokens) are counted over the global
    batch (`batch_count` inside `global_batch_losses`), so the mean over processes of the
    per-process losses (what DDP's gradient averaging differentiates) is the global loss;
  * BatchNorm statistics are taken over the global batch (`GlobalBatchNorm2d`; torch's
    SyncBatchNorm refuses CPU tensors, this one runs on gloo and nccl alike).
Without a process group every function here is the single-process computation.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

_GLOBAL_LOSSES = False


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun (WORLD_SIZE > 1) joins the
    process group: nccl for CUDA, gloo for CPU; each process takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else device)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: the gradient of a sum over processes is the sum of the
    processes' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity in a single process), differentiable."""
    return _AllReduceSum.apply(tensor) if world_size() > 1 else tensor


@contextmanager
def global_batch_losses(enabled: bool = True) -> Iterator[None]:
    """Within this block `batch_count` counts over the global batch (every process must
    then compute the same losses, as DDP training does)."""
    global _GLOBAL_LOSSES
    previous, _GLOBAL_LOSSES = _GLOBAL_LOSSES, enabled and world_size() > 1
    try:
        yield
    finally:
        _GLOBAL_LOSSES = previous


def batch_count(count: torch.Tensor, minimum: float = 1.0) -> torch.Tensor:
    """A loss normaliser: max(minimum, count). Inside `global_batch_losses` the count is the
    global batch's, divided by the number of processes: averaging the processes' losses
    S_r / (N / W) then gives the global batch's S / N."""
    count = count.detach().float()
    if not _GLOBAL_LOSSES:
        return count.clamp(min=minimum)
    world = world_size()
    return all_reduce_sum(count).clamp(min=minimum) / world


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (two-pass mean
    and variance over all processes). Same parameters and buffers as BatchNorm2d, and the
    same computation without a process group or in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        local_count = torch.tensor([x.numel() // channels], dtype=torch.float32, device=x.device)
        totals = all_reduce_sum(torch.cat([xf.sum(dim=(0, 2, 3)), local_count]))
        count = totals[-1].detach()
        mean = totals[:channels] / count
        centred = xf - mean[None, :, None, None]
        var = all_reduce_sum(centred.pow(2).sum(dim=(0, 2, 3))) / count
        update_running_stats(self, mean, var, count)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = centred * scale[None, :, None, None]
        if self.affine:
            out = out + self.bias[None, :, None, None]
        return out.to(x.dtype)


def update_running_stats(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                         count: torch.Tensor) -> None:
    """Update `norm`'s running statistics as BatchNorm2d does, from a batch's mean and
    biased variance over `count` values per channel (the running variance is unbiased)."""
    if not norm.track_running_stats:
        return
    norm.num_batches_tracked.add_(1)
    factor = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    with torch.no_grad():
        norm.running_mean.lerp_(mean.detach(), factor)
        norm.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), factor)


def batch_norm_rows(norm: nn.BatchNorm2d, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`norm` in training on a map given by its distinct vectors: rows (R, C), row r
    standing for counts[r] (float) of the map's cells. The batch statistics are those of
    every cell (over the global batch under DDP, as `GlobalBatchNorm2d`'s); returns the
    normalised rows (R, C). The running statistics are updated."""
    channels = rows.shape[1]
    totals = all_reduce_sum(torch.cat([counts @ rows, counts.sum()[None]]))
    count = totals[-1].detach()
    mean = totals[:channels] / count
    centred = rows - mean
    var = all_reduce_sum(counts @ centred.square()) / count
    update_running_stats(norm, mean, var, count)
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        return torch.addcmul(norm.bias, centred, scale * norm.weight)
    return centred * scale


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d of `module` (in place) for a GlobalBatchNorm2d holding the same
    parameters and buffers, so optimisers and state dicts are unaffected."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum,
                                       child.affine, child.track_running_stats)
            synced.weight, synced.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(synced, buffer, getattr(child, buffer))
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module
