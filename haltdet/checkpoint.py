"""Checkpoints: written atomically, loaded safely (`weights_only=True`), versioned.

A checkpoint is a dict of plain data and tensors:
  format_version  int, CHECKPOINT_VERSION
  config          the full Config as a dict (so a checkpoint alone rebuilds its model)
  model           the model's state_dict
  step            optimisation steps done
  and, in training checkpoints (`latest.pt`): optimizer, scheduler, elapsed_seconds,
  rng (`rng_state()`: python, numpy, torch and CUDA generators), data (epoch,
  batches_per_epoch: the data order is a function of seed, epoch and step), threads.
  Training reseeds from (seed, step, rank) every step, so the RNG states are a safeguard
  for randomness outside that scheme.

Loading uses `torch.load(weights_only=True)`: a checkpoint can hold only tensors and plain
Python data, never code. Anything that is not a haltdet checkpoint, or one of another
format version, is an InputError saying so.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from haltdet import HaltdetError, InputError
from haltdet.config import Config, config_from_dict

CHECKPOINT_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "checkpoints"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write `payload` to `path` atomically: a temporary file in the same directory,
    flushed to disk, then renamed over the target, so a kill never leaves a torn file.
    Temporary files that earlier, killed writers left behind are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": CHECKPOINT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint path, or the name of a bundled checkpoint (e.g. 'baseline')."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = BUNDLED_DIR / f"{name_or_path}.pt"
    if bundled.exists():
        return bundled
    names = sorted(p.stem for p in BUNDLED_DIR.glob("*.pt"))
    raise InputError(f"no checkpoint file '{name_or_path}' and no bundled checkpoint of that "
                     f"name (bundled: {', '.join(names) or 'none'})")


def load_checkpoint(name_or_path: str | Path, map_location="cpu") -> dict:
    path = resolve_checkpoint(name_or_path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / foreign files
        raise InputError(f"{path}: not a readable haltdet checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise InputError(f"{path}: not a haltdet checkpoint (missing 'model' or 'config')")
    version = payload.get("format_version")
    if version != CHECKPOINT_VERSION:
        newer = isinstance(version, int) and version > CHECKPOINT_VERSION
        raise InputError(f"{path}: checkpoint format version {version!r}, this haltdet reads "
                         f"version {CHECKPOINT_VERSION}" + (" (written by a newer haltdet: upgrade)" if newer else ""))
    return payload


def load_weights(model: torch.nn.Module, weights, source, strict: bool = True):
    """`model.load_state_dict(weights)`, with a mismatch as an InputError naming `source`."""
    try:
        return model.load_state_dict(weights, strict=strict)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{source}: the weights do not fit this model ({str(err).splitlines()[0]})") from None


def rng_state() -> dict:
    """The python, numpy, torch and CUDA random generator states, as checkpoint data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (CUDA states only where the GPU count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_model(name_or_path: str | Path, device="cpu"):
    """Rebuild a Detector from a checkpoint, in eval mode. Returns (model, config)."""
    from haltdet.model.detector import Detector

    payload = load_checkpoint(name_or_path)
    try:
        config: Config = config_from_dict(payload["config"])
    except HaltdetError as err:
        raise InputError(f"{name_or_path}: checkpoint config is invalid: {err}") from None
    model = Detector(config.model)
    load_weights(model, payload["model"], name_or_path)
    # The kind of data it was trained on ("synth", a dataset format; None: not recorded).
    # The bundled models were trained on simulated frames only.
    bundled = resolve_checkpoint(name_or_path).parent == BUNDLED_DIR
    model.data_source = payload.get("data_source") or ("synth" if bundled else None)
    return model.to(device).eval(), config
