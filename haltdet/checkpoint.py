"""Checkpoints: written atomically, loaded safely (`weights_only=True`), versioned.

A checkpoint is a dict of plain data and tensors:
  format_version  int, CHECKPOINT_VERSION
  config          the full Config as a dict (so a checkpoint alone rebuilds its model)
  model           the model's state_dict
  step            optimisation steps done
  and, in training checkpoints (`latest.pt`): optimizer, scheduler, elapsed_seconds.
  No RNG state is needed: all training randomness derives from the seed and the step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from haltdet import HaltdetError, InputError
from haltdet.config import Config, config_from_dict

CHECKPOINT_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "checkpoints"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write `payload` to `path` atomically: a temporary file in the same directory,
    flushed to disk, then renamed over the target, so a kill never leaves a torn file."""
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
        raise InputError(f"{path}: checkpoint format version {version!r}, this haltdet reads "
                         f"version {CHECKPOINT_VERSION}")
    return payload


def load_model(name_or_path: str | Path, device="cpu"):
    """Rebuild a Detector from a checkpoint, in eval mode. Returns (model, config)."""
    from haltdet.model.detector import Detector

    payload = load_checkpoint(name_or_path)
    try:
        config: Config = config_from_dict(payload["config"])
    except HaltdetError as err:
        raise InputError(f"{name_or_path}: checkpoint config is invalid: {err}") from None
    model = Detector(config.model)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), config
