"""haltdet: fast transformer LiDAR 3D object detection with dynamic token halting."""

from haltdet.memory import keep_freed_memory

__version__ = "0.1.0"
__all__ = ["CLASSES", "ConfigError", "HaltdetError", "InputError", "keep_freed_memory", "load"]

CLASSES: tuple[str, ...] = ("Vehicle", "Pedestrian", "Cyclist")
"""The detection classes, in the order used for class indices everywhere."""


def load(name_or_path: str = "halting", device: str = "cpu"):
    """A detector from a checkpoint file or a bundled name ("halting", "baseline"), in
    eval mode on `device`. `load("halting").detect(points)` gives the boxes, scores and
    class indices (into CLASSES) of one (N, 4) cloud: x, y, z, intensity in [0, 1]."""
    from haltdet.checkpoint import load_model

    return load_model(name_or_path, device)[0]


class HaltdetError(Exception):
    """Base class of every error the project raises on purpose (bad input, bad config)."""


class InputError(HaltdetError, ValueError):
    """Input data is malformed: wrong shape, NaN/inf values, truncated file, bad labels."""


class ConfigError(HaltdetError, ValueError):
    """A configuration is invalid: unknown key, wrong type or impossible value."""
