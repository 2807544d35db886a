"""Kill-safe training: atomic checkpoints, exact resume after SIGKILL, safe loading."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from haltdet import ConfigError, InputError
from haltdet.checkpoint import (CHECKPOINT_VERSION, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from haltdet.config import config_from_dict


def _train(config, out, *extra, threads: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # bit-exact CPU results need equal thread counts
    return subprocess.Popen([sys.executable, "-m", "haltdet.cli", "train", "--config", str(config),
                             "--out", str(out), "--quiet", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tiny_config, tmp_path, threads):
    config = tiny_config(batch_size=2, max_steps=8, checkpoint_every=2, deterministic=True)
    reference = _train(config, tmp_path / "reference", threads=threads)
    run = tmp_path / "run"
    victim = _train(config, run, threads=threads)
    deadline = time.time() + 300
    while not (run / "latest.pt").exists():  # the step-2 checkpoint
        assert victim.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (run / "final.pt").exists(), "killed too late: the run had finished"
    interrupted_at = load_checkpoint(run / "latest.pt")["step"]
    assert 2 <= interrupted_at < 8
    _finish(_train(config, run, "--resume", threads=threads))
    _finish(reference)

    resumed, uninterrupted = load_checkpoint(run / "latest.pt"), load_checkpoint(tmp_path / "reference" / "latest.pt")
    assert resumed["step"] == uninterrupted["step"] == 8
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for index, state in uninterrupted["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][index][k], v) for k, v in state.items())
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # entries the killed run wrote after its checkpoint are replaced
    assert not list(run.glob(".*.tmp"))


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"model": {}, "config": {}, "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_checkpoint_writes_are_atomic_and_clean_up(tmp_path):
    stale = tmp_path / ".latest.pt.abc.tmp"
    stale.write_bytes(b"torn")  # what a writer killed mid-write leaves
    save_checkpoint(tmp_path / "latest.pt", {"model": {"w": torch.ones(2)}, "config": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]
    assert load_checkpoint(tmp_path / "latest.pt")["format_version"] == CHECKPOINT_VERSION


class _Payload:
    """Not plain data: weights_only loading must refuse to build it."""


@pytest.mark.parametrize("payload, message", [
    ({"format_version": CHECKPOINT_VERSION + 1, "model": {}, "config": {}}, "newer haltdet"),
    ({"format_version": None, "model": {}, "config": {}}, "format version None"),
    ({"weights": torch.ones(1)}, "not a haltdet checkpoint"),
    ({"format_version": CHECKPOINT_VERSION, "model": _Payload(), "config": {}}, "not a readable"),
])
def test_unsafe_foreign_and_future_checkpoints_are_clear_errors(tmp_path, payload, message):
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(InputError, match=message):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04garbage"])
def test_non_checkpoint_files_are_clear_errors(tmp_path, content):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(InputError, match="c.pt"):
        load_checkpoint(tmp_path / "c.pt")


def test_resume_from_a_checkpoint_of_another_model_is_a_clear_error(tiny_config, tmp_path):
    from haltdet.cli import main

    run = tmp_path / "run"
    assert main(["train", "--config", str(tiny_config(max_steps=1)), "--out", str(run), "--quiet"]) == 0
    assert main(["train", "--config", str(tiny_config(model={"d_model": 16, "pfn_channels": [8, 16]})),
                 "--out", str(run), "--resume", "--quiet"]) == 2


@pytest.mark.parametrize("values, message", [
    ({"model": {"d_modle": 64}}, "unknown config key 'model.d_modle'"),
    ({"train": {"lr": "fast"}}, "'train.lr' must be a finite number"),
    ({"train": {"lr": float("nan")}}, "'train.lr' must be a finite number"),
    ({"train": {"deterministic": 1}}, "'train.deterministic' must be true/false"),
    ({"model": {"num_heads": 0}}, "model.num_heads"),
    ({"model": {"bev_stride": 0}}, "model.bev_stride"),
    ({"model": {"pillar_size": 1e-9}}, "model.pillar_size"),
    ({"model": {"max_points": -1}}, "model.max_points"),
    ({"model": {"gaussian_overlap": 0.0}}, "model.gaussian_overlap"),
    ({"train": {"seed": 2**40}}, "train.seed"),
    ({"model": {"refine_points": 0}}, "model.refine_points"),
    ({"model": {"refine_rectify": [0.5]}}, "model.refine_rectify"),
    ({"train": {"refine_match_iou": 0.0}}, "train.refine_match_iou"),
    ({"train": {"sparsity_warmup": 1.5}}, "train.sparsity_warmup"),
    ({"train": {"halting_start": 1.0}}, "train.halting_start"),
    ({"model": {"halting_layers": [2], "halting_rule": "act"}, "train": {"halting_start": 0.25}},
     "train.halting_start"),
    ({"train": {"sparsity_target": 1.0}}, "train.sparsity_target"),
    ({"train": {"sparsity_target": 0.4}}, "train.sparsity_target"),  # no lambda to adapt
    ({"train": {"sparsity_target": 0.4, "sparsity_weight": 0.25}}, "train.sparsity_target"),  # no halting
    ({"train": {"sparsity_target_rate": 0.0}}, "train.sparsity_target_rate"),
    ({"train": {"sparsity_target_after": 1.5}}, "train.sparsity_target_after"),
    ({"train": {"distill_weight": -1.0, "distill_from": "baseline"}}, "train.distill_weight"),
    ({"train": {"distill_weight": 0.5}}, "train.distill_from"),
    ({"train": {"distill_weight": 0.5, "distill_from": "baseline", "refine_only": True}}, "train.distill_weight"),
    ({"data": []}, "section 'data' must be a mapping"),
])
def test_invalid_configs_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(values)
