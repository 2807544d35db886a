"""torchrun training: N gloo processes compute the update one process computes on the whole
global batch.

Tolerances (float rounding differs: sums over 2 + 2 frames vs 4, all-reduced BatchNorm
statistics). At step 1, where both start from the same weights, the logged global-batch
loss and gradient norm agree to 1e-5 relative. After 3 AdamW steps the weight updates
agree to 1 % (relative norm of the difference; measured 0.04 %): Adam divides each
gradient by its own running magnitude, so where the true gradient is zero (the attention
key bias: softmax ignores a constant shift of the keys) float noise becomes a full-size
step in either run. For contrast, per-process BatchNorm statistics give a 13 % difference
and per-process loss normalisers 5 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from haltdet.checkpoint import load_checkpoint
from haltdet.config import load_config
from haltdet.distributed import GlobalBatchNorm2d, sync_batchnorm
from haltdet.model.detector import Detector
from haltdet.train import EpochSampler, _seed_everything, train


def test_sampler_gives_every_rank_its_slice_of_the_same_global_batches():
    size, per_rank, seed, epoch = 23, 2, 5, 3
    single = EpochSampler(size, seed, epoch, 0, 1, per_rank * 4).indices
    shards = [EpochSampler(size, seed, epoch, rank, 4, per_rank).indices for rank in range(4)]
    assert len(single) == 16 and all(len(s) == 4 for s in shards)  # ragged end dropped
    for b in range(2):
        assert sum((s[b * per_rank:(b + 1) * per_rank] for s in shards), []) == single[b * 8:(b + 1) * 8]
    # Resuming at batch 1 continues the same order; the order is a function of (seed, epoch).
    assert EpochSampler(size, seed, epoch, 2, 4, per_rank, start_batch=1).indices == shards[2][per_rank:]
    assert EpochSampler(size, seed, epoch, 0, 1, 8).indices == single
    assert EpochSampler(size, seed, epoch + 1, 0, 1, 8).indices != single


def test_synchronised_batchnorm_keeps_the_state_and_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    model.load_state_dict(reference)
    synced = sync_batchnorm(model)
    assert isinstance(synced[1], GlobalBatchNorm2d) and synced.state_dict().keys() == reference.keys()
    assert torch.equal(synced(x), expected)


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


HALTING_TO_A_TARGET = dict(model={"num_layers": 4, "halting_layers": [1, 3], "halting_threshold": [0.953]},
                          sparsity_weight=1.0, sparsity_target=0.4, sparsity_target_rate=0.5)


@pytest.mark.slow  # trains in subprocesses
@pytest.mark.parametrize("settings", [{}, HALTING_TO_A_TARGET], ids=["baseline", "halting_to_a_target"])
def test_two_gloo_processes_train_like_one(tiny_config, tmp_path, settings):
    config = tiny_config(**settings)  # global batch 4: 2 frames per process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "haltdet.cli", "train", "--config", str(config), "--out", str(tmp_path / "ddp"), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # The reference runs in its own process with the same thread count as each DDP process:
    # oneDNN's kernels for 1 and 2 threads differ by ~1e-3 in this gradient norm.
    single_command = [sys.executable, "-m", "haltdet.cli", "train", "--config", str(config),
                      "--out", str(tmp_path / "single"), "--quiet"]
    done = subprocess.run(single_command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ddp, single = _log(tmp_path / "ddp"), _log(tmp_path / "single")
    assert [e["step"] for e in ddp] == [e["step"] for e in single] == [1, 2, 3]
    assert ddp[0]["tokens"] == single[0]["tokens"]
    for key in ("loss", "heatmap", "regression"):
        assert abs(ddp[0][key] - single[0][key]) <= 1e-5 * abs(single[0][key]), key
    assert abs(ddp[0]["grad_norm"] - single[0]["grad_norm"]) <= 1e-4 * single[0]["grad_norm"]
    if settings:  # the global batch's share of token-layers: lambda adapts alike
        for a, b in zip(ddp, single):
            assert a["token_layers"] == pytest.approx(b["token_layers"], rel=1e-6)
            assert a["sparsity_weight"] == pytest.approx(b["sparsity_weight"], rel=1e-6)
        assert single[-1]["sparsity_weight"] != 1.0

    _seed_everything(0)
    start = Detector(load_config(config).model).state_dict()
    a = load_checkpoint(tmp_path / "ddp" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "single" / "final.pt")["model"]
    assert a.keys() == b.keys()  # BatchNorm was swapped for its synchronised form in place
    floats = [k for k in b if b[k].is_floating_point()]
    difference = torch.cat([(a[k] - b[k]).flatten() for k in floats]).norm()
    update = torch.cat([(b[k] - start[k]).flatten() for k in floats]).norm()
    print("weights after 3 steps, |2 processes - 1| / |update|:", float(difference / update))
    assert difference <= 1e-2 * update, float(difference / update)
    assert all(torch.equal(a[k], b[k]) for k in b if not b[k].is_floating_point())  # BN batch counts


@pytest.mark.slow  # trains in subprocesses
def test_two_gloo_processes_train_the_refiner_like_one(tiny_config, tmp_path):
    """Refine-only training (the refiner runs in the loss, outside the DDP-wrapped forward):
    the same update as one process, because the jittered ground-truth proposals are drawn
    per frame, not per process, and the losses are normalised over the global batch."""
    first = train(load_config(tiny_config(max_steps=1)), tmp_path / "first", progress=False)
    config = tiny_config(model={"refine": True, "refine_channels": [16, 32]}, refine_only=True, lr=0.01)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = ["-m", "haltdet.cli", "train", "--config", str(config), "--init", str(first), "--quiet", "--out"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for command in (ddp + run + [str(tmp_path / "ddp")], [sys.executable] + run + [str(tmp_path / "single")]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    ddp_log, single_log = _log(tmp_path / "ddp"), _log(tmp_path / "single")
    assert [e["step"] for e in ddp_log] == [e["step"] for e in single_log] == [1, 2, 3]
    for a, b in zip(ddp_log, single_log):  # the refiner's loss at every step, not only the first
        for key in ("refine_box", "refine_flip", "refine_iou"):
            assert b[key] > 0 and abs(a[key] - b[key]) <= 1e-4 * b[key], (a["step"], key, a[key], b[key])

    first_stage = load_checkpoint(first)["model"]
    _seed_everything(0)
    start = Detector(load_config(config).model).state_dict()  # the refiner as both runs initialise it
    a = load_checkpoint(tmp_path / "ddp" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "single" / "final.pt")["model"]
    assert all(torch.equal(a[k], v) and torch.equal(b[k], v) for k, v in first_stage.items())  # frozen
    refiner = [k for k in b if k.startswith("refiner.") and b[k].is_floating_point()]
    difference = torch.cat([(a[k] - b[k]).flatten() for k in refiner]).norm()
    update = torch.cat([(b[k] - start[k]).flatten() for k in refiner]).norm()
    print("refiner after 3 steps, |2 processes - 1| / |update|:", float(difference / update))
    assert update > 0 and difference <= 1e-3 * update


def test_a_torchrun_worker_ends_without_the_interpreter_teardown(tmp_path):
    """Under torchrun the command leaves with os._exit once its work is done (the teardown
    can abort on native threads still releasing tensors): the exit code and the output are
    kept, Python's exit handlers do not run. Outside torchrun the teardown runs as usual."""
    argv = ["haltdet", "eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]
    script = ("import atexit, sys; from haltdet.cli import main; atexit.register(print, 'teardown ran'); "
              f"sys.argv = {argv!r}; sys.exit(main())")
    for world, teardown in (("2", False), ("1", True)):
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "WORLD_SIZE": world},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "missing.pt" in done.stderr, (world, done.stderr[-2000:])
        assert ("teardown ran" in done.stdout) == teardown, (world, done.stdout)
