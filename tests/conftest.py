"""Shared fixtures: a tiny synthetic dataset and a tiny, fast training config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from haltdet.data.synth import SensorConfig, generate_dataset

TINY_MODEL = {"point_cloud_range": [-19.2, -19.2, -4.0, 19.2, 19.2, 3.0], "d_model": 32,
              "pfn_channels": [16, 32], "num_layers": 2, "ffn_dim": 64, "window_size": 8,
              "bev_channels": 16, "head_channels": 16, "bev_convs": 1}


@pytest.fixture(scope="session")
def tiny_model_config() -> dict:
    """ModelConfig keywords of a tiny, fast model (a 120 x 120 pillar grid)."""
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 low-resolution synthetic frames."""
    return generate_dataset(tmp_path_factory.mktemp("tiny") / "data", frames=4, seed=3,
                            sensor=SensorConfig.preset("default", azimuth_steps=256), progress=False)


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """tiny_config(model=None, data=None, **train_overrides) -> path of a YAML config
    training the tiny model (on tiny_data unless `data` is given)."""

    def write(model: dict | None = None, data: Path | None = None, **train) -> Path:
        config = {"name": "tiny", "model": {**TINY_MODEL, **(model or {})},
                  "data": {"train": str(data or tiny_data), "num_workers": 0},
                  "train": {"batch_size": 4, "max_steps": 3, "checkpoint_every": 2, "log_every": 1, **train}}
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
