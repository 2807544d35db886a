"""Property-based fuzzing of the entry points: whatever the input, the result is a success
or one of the project's documented errors (haltdet.HaltdetError; on the command line exit
code 2, or argparse's usage error, also 2), never another exception.

CI runs a fixed, small set of examples; `HALTDET_FUZZ_EXAMPLES=500` runs more, random ones."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from haltdet import HaltdetError
from haltdet.checkpoint import save_checkpoint
from haltdet.cli import main
from haltdet.config import Config, ModelConfig, config_from_dict
from haltdet.data.frames import FRAME_ARRAYS, load_points_file, read_frame
from haltdet.model.detector import Detector
from haltdet.model.pillars import PillarFeatureNet, PointBatch

EXAMPLES = int(os.environ.get("HALTDET_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 25, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy casts of fuzzed values
EXTENSIONS = (".bin", ".npy", ".npz", ".txt", ".csv")

floats = st.floats(-100, 100, width=32) | st.floats(allow_nan=True, allow_infinity=True, width=32) \
    | st.sampled_from([1e38, -1e38, 1e-40])
dtypes = st.sampled_from(["float32", "float32", "float64", "float16", "int64", "uint8", "bool", "complex64"])
shapes = st.integers(0, 8).map(lambda n: (n, 4)) | st.sampled_from([(7, 3), (3, 6), (4,), (2, 4, 1), (0,), (), (1, 0)])


def arrays(shape=shapes):
    return dtypes.flatmap(lambda d: hnp.arrays(d, shape, elements=floats if d.startswith("float") else None))


def _quiet(call):
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return call()


def _documented(call):
    """Run `call`; a HaltdetError is a documented outcome (returns None)."""
    try:
        return _quiet(call)
    except HaltdetError:
        return None


def _exit_code(argv: list[str]) -> int:
    try:
        return _quiet(lambda: main(argv))
    except SystemExit as exit:  # argparse usage errors
        return exit.code


# ----------------------------------------------------------------------------- readers

@FUZZ
@given(suffix=st.sampled_from(EXTENSIONS), content=st.binary(max_size=600), columns=st.integers(-2, 9))
def test_points_files_with_fuzzed_bytes(suffix, content, columns):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cloud{suffix}"
        path.write_bytes(content)
        points = _documented(lambda: load_points_file(path, columns=columns))
    if points is not None:
        assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 4
        assert np.isfinite(points).all()


@FUZZ
@given(text=st.text(alphabet="0123456789.,-+e naif#\n\t", max_size=200))
def test_text_points_files_with_fuzzed_numbers(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cloud.txt"
        path.write_text(text)
        points = _documented(lambda: load_points_file(path))
    assert points is None or (points.shape[1] == 4 and np.isfinite(points).all())


@FUZZ
@given(array=arrays(), suffix=st.sampled_from([".npy", ".npz"]))
def test_points_files_with_fuzzed_arrays(array, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cloud{suffix}"
        np.save(path, array) if suffix == ".npy" else np.savez(path, points=array)
        points = _documented(lambda: load_points_file(path))
    assert points is None or (points.dtype == np.float32 and np.isfinite(points).all())


@st.composite
def frame_arrays(draw) -> dict:
    """A valid frame's arrays, then at most one fault: a missing array, another dtype or
    shape, out-of-range labels, NaN/huge/non-positive box values, inconsistent lengths."""
    m = draw(st.integers(0, 3))
    boxes = draw(hnp.arrays("float32", (m, 7), elements=st.floats(-80, 80, width=32)))
    boxes[:, 3:6] = np.abs(boxes[:, 3:6]) / 8 + 0.1
    arrays = {"points": draw(hnp.arrays("float32", (draw(st.integers(0, 20)), 4), elements=floats)),
              "boxes": boxes, "labels": np.arange(m) % 3, "num_points": np.full(m, 6), "difficulty": np.ones(m, int)}
    name = draw(st.sampled_from(FRAME_ARRAYS))
    fault = draw(st.sampled_from(["none", "none", "drop", "dtype", "shape", "value", "length"]))
    if fault == "drop":
        del arrays[name]
    elif fault == "dtype":
        arrays[name] = arrays[name].astype(draw(st.sampled_from(["bool", "complex64", "float16", "uint64", "U3"])))
    elif fault == "shape":
        arrays[name] = arrays[name].reshape(-1)[:, None] if arrays[name].size else np.zeros((1, 2, 3))
    elif fault == "value" and m:
        target = draw(st.sampled_from(["labels", "num_points", "difficulty", "boxes"]))
        value = draw(st.sampled_from([-1, 3, 7, 2**62]) if target != "boxes" else floats)
        arrays[target] = arrays[target].astype(np.float32 if target == "boxes" else np.int64)
        arrays[target][0, ...] = value
    elif fault == "length":
        arrays[name] = np.concatenate([arrays[name], arrays[name][:1]]) if len(arrays[name]) else arrays[name][:0]
    return arrays


@FUZZ
@given(arrays=frame_arrays())
def test_frame_files_with_fuzzed_arrays_read_or_fail_clearly(arrays, tiny_model_config):
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "000000.npz", **arrays)
        frame = _documented(lambda: read_frame(Path(tmp) / "000000.npz"))
    if frame is not None:  # what the reader accepts, training accepts
        model = Detector(ModelConfig(**tiny_model_config))
        targets = model.targets([frame.boxes], [frame.labels])
        assert torch.isfinite(targets.heatmap).all() and torch.isfinite(targets.regression).all()


# ----------------------------------------------------------------------------- pillarization

clouds = st.lists(
    st.integers(0, 40).flatmap(lambda n: hnp.arrays("float32", (n, 4), elements=floats)), max_size=3)


@FUZZ
@given(clouds=clouds, caps=st.tuples(st.integers(0, 8), st.integers(0, 30), st.integers(0, 3)))
def test_pillarization_of_fuzzed_clouds(clouds, caps):
    net = PillarFeatureNet([-19.2, -19.2, -4.0, 19.2, 19.2, 3.0], 0.32, [8, 16], *caps)
    tokens = net(PointBatch.from_list([torch.from_numpy(c) for c in clouds]))
    total = sum(len(c) for c in clouds)
    assert tokens.points_used + tokens.points_dropped + tokens.points_capped == total
    assert torch.isfinite(tokens.features).all()
    assert tokens.coords.shape[0] <= tokens.points_used
    if caps[0] and len(tokens.coords):
        assert torch.bincount(tokens.coords[:, 0]).max() <= caps[0]


@FUZZ
@given(cloud=st.one_of(arrays(), arrays(), st.lists(st.lists(floats, min_size=3, max_size=5), max_size=4),
                      st.text(max_size=5)))
def test_point_batches_of_fuzzed_inputs(cloud):
    batch = _documented(lambda: PointBatch.from_list([cloud]))
    assert batch is None or (batch.points.dtype == torch.float32 and batch.points.shape[1] == 4)


# ----------------------------------------------------------------------------- configs

hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 10**6) | st.sampled_from([2**70, -(2**70)]) | floats
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def mutated_configs(draw):
    """The default config with 1-2 values replaced: by a nearby value of the same kind
    (often still valid) or by anything at all."""
    values = Config().to_dict()
    for _ in range(draw(st.integers(1, 2))):
        section = draw(st.sampled_from(["model", "model", "data", "train", "train", "name", "extra"]))
        if not isinstance(values.get(section), dict):
            values[section] = draw(hostile_values)
            continue
        key = draw(st.sampled_from(sorted(values[section]) + ["unknown_key"]))
        old = values[section].get(key)
        nearby = {bool: st.booleans(), int: st.integers(0, 12), float: st.floats(0, 1.5),
                  str: st.sampled_from(["mlp", "bev", "cosine", "onecycle", "x"]),
                  list: st.just(old)}.get(type(old), hostile_values)
        values[section][key] = draw(nearby | hostile_values)
    return values


@FUZZ
@given(values=mutated_configs())
def test_fuzzed_configs_validate_or_name_the_problem(values):
    config = _documented(lambda: config_from_dict(values))
    if config is not None:
        assert all(math.isfinite(v) for v in config.model.point_cloud_range)


# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_config):
    """Untrained tiny baseline and halting checkpoints (the CLI only needs them to load)."""
    root = tmp_path_factory.mktemp("fuzz")
    for name, extra in (("plain", {}), ("halting", {"num_layers": 3, "halting_layers": [1, 2]})):
        config = Config(model=ModelConfig(**{**tiny_model_config, **extra}))
        save_checkpoint(root / f"{name}.pt", {"config": config.to_dict(), "step": 0,
                                              "model": Detector(config.model).state_dict()})
    return root


def _encode(suffix: str, array: np.ndarray) -> bytes:
    """`array` written as a file of that type (whatever its shape and dtype)."""
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, array)
    elif suffix == ".npz":
        np.savez(buffer, points=array)
    elif suffix == ".bin":
        return array.astype(np.float32, copy=False).tobytes() if array.dtype.kind in "fiub" else b"??"
    else:
        rows = np.atleast_2d(array) if array.ndim <= 2 else array.reshape(array.shape[0], -1)
        np.savetxt(buffer, rows, fmt="%s", delimiter="," if suffix == ".csv" else " ")
    return buffer.getvalue()


@FUZZ
@given(suffix=st.sampled_from(EXTENSIONS), data=st.data(), columns=st.sampled_from([4, 4, 3, 5, 0, -1]))
def test_cli_detect_with_fuzzed_files(checkpoints, suffix, data, columns):
    content = data.draw(st.binary(max_size=400) | arrays().map(lambda a: _encode(suffix, a)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cloud{suffix}"
        path.write_bytes(content)
        argv = ["detect", str(path), "--checkpoint", str(checkpoints / "plain.pt"), "--columns", str(columns),
                "--json", str(Path(tmp) / "out.json")]
        assert _exit_code(argv) in (0, 2)


def numbers(valid):
    """Mostly values from `valid`, sometimes anything (as command-line text)."""
    anything = st.one_of(st.integers(-3, 5000), floats).map(str) | st.sampled_from(["x", "", "-", "1e999"])
    return st.one_of(valid.map(str), valid.map(str), anything)


@settings(FUZZ, max_examples=EXAMPLES // 5 or 12)
@given(thresholds=st.lists(numbers(st.floats(0, 1)), max_size=2),
       ratios=st.lists(numbers(st.floats(0.01, 1)), max_size=2),
       max_tokens=numbers(st.integers(0, 3000)) | st.none(), batch_size=numbers(st.integers(1, 4)),
       device=st.sampled_from(["cpu", "cpu", "cpu:0", "cuda:7", "tpu", ""]))
def test_cli_eval_with_fuzzed_options(checkpoints, tiny_data, thresholds, ratios, max_tokens, batch_size, device):
    argv = ["eval", "--checkpoint", str(checkpoints / "halting.pt"), "--data", str(tiny_data), "--quiet",
            "--batch-size", batch_size, "--device", device]
    argv += ["--threshold", *thresholds] if thresholds else []
    argv += ["--keep-ratio", *ratios] if ratios else []
    argv += ["--max-tokens", max_tokens] if max_tokens is not None else []
    assert _exit_code(argv) in (0, 2)


@FUZZ
@given(document=st.text(max_size=120) | mutated_configs().map(yaml.safe_dump))
def test_cli_train_with_fuzzed_config_files(document):
    with tempfile.TemporaryDirectory() as tmp:  # no dataset here: a valid config fails on data/train
        (Path(tmp) / "c.yaml").write_text(document)
        argv = ["train", "--config", str(Path(tmp) / "c.yaml"), "--out", str(Path(tmp) / "run"), "--quiet",
                "--train-data", str(Path(tmp) / "nowhere")]
        assert _exit_code(argv) == 2


boxes_json = st.recursive(st.none() | st.booleans() | st.integers() | floats | st.text(max_size=6),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                              st.sampled_from(["frames", "frame_id", "boxes", "labels", "scores", "num_points",
                                               "difficulty", "x"]), inner, max_size=4), max_leaves=12)


@FUZZ
@given(gt=boxes_json, pred=boxes_json)
def test_cli_eval_boxes_with_fuzzed_json(gt, pred):
    with tempfile.TemporaryDirectory() as tmp:
        for name, document in (("gt", gt), ("pred", pred)):
            (Path(tmp) / f"{name}.json").write_text(json.dumps(document))
        argv = ["eval-boxes", "--gt", str(Path(tmp) / "gt.json"), "--pred", str(Path(tmp) / "pred.json")]
        assert _exit_code(argv) in (0, 2)
