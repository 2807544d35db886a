"""haltdet: fast transformer LiDAR 3D object detection with dynamic token halting."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("Vehicle", "Pedestrian", "Cyclist")
"""The detection classes, in the order used for class indices everywhere."""


class HaltdetError(Exception):
    """Base class of every error the project raises on purpose (bad input, bad config)."""


class InputError(HaltdetError, ValueError):
    """Input data is malformed: wrong shape, NaN/inf values, truncated file, bad labels."""


class ConfigError(HaltdetError, ValueError):
    """A configuration is invalid: unknown key, wrong type or impossible value."""
