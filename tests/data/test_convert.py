"""Data specs (FORMAT:PATH), `haltdet convert`, and the commands on real frames."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from haltdet import InputError
from haltdet.cli import main
from haltdet.config import DataConfig
from haltdet.data.dataset import FrameFolder
from haltdet.data.formats import FrameDirectory, open_data, open_format, parse_spec
from haltdet.data.frames import FrameDataset, read_dataset_index

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real"
SOURCES = {  # format -> (path under REAL, one frame id)
    "kitti": ("kitti/training", "000001"),
    "nuscenes": ("nuscenes", "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951"),
    "av2": ("av2/7fab2350-7eaf-3b7e-a39d-6937a4c1bede", "315966265259836000"),
}


def real_spec(fmt: str) -> tuple[str, str]:
    """`FORMAT:PATH` of a real-data fixture and one of its frame ids (skip when absent)."""
    path, frame_id = SOURCES[fmt]
    if not (REAL / path).is_dir():
        pytest.skip(f"real-data fixture not found: {REAL / path}")
    if fmt == "av2":
        pytest.importorskip("pyarrow", reason="the AV2 reader needs pyarrow")
    return f"{fmt}:{REAL / path}", frame_id


@pytest.mark.parametrize("spec, expected", [
    ("kitti:/data/kitti", ("kitti", "/data/kitti")),
    ("AV2:rel/log", ("av2", "rel/log")),
    ("waymo-v2:d:/x", ("waymo-v2", "d:/x")),
    ("C:\\data\\set", (None, "C:\\data\\set")),
    ("runs/a:b", (None, "runs/a:b")),
    ("data/val", (None, "data/val")),
])
def test_parse_spec_only_takes_known_formats(spec, expected):
    assert parse_spec(spec) == expected


def test_unknown_format_and_non_dataset_folders_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="some/dir: unknown data format 'kitty'"):
        open_format("kitty", "some/dir")
    with pytest.raises(InputError, match="not a haltdet dataset directory.*FORMAT:PATH"):
        open_data(tmp_path)
    with pytest.raises(InputError, match="dataset.json: file not found"):
        open_data(tmp_path / "missing")


def test_cli_convert_with_an_unknown_format_is_a_clear_error(tmp_path, capsys):
    assert main(["convert", "--from", "kitty", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown data format 'kitty'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_convert_writes_a_dataset_that_reads_back_the_same(fmt, tmp_path):
    spec, _ = real_spec(fmt)
    source = open_data(spec)
    out = tmp_path / "converted"
    assert main(["convert", "--from", fmt, spec.split(":", 1)[1], "--out", str(out), "--quiet"]) == 0
    index = read_dataset_index(out)
    assert index["source"] == fmt and index["frames"] == source.frame_ids()
    assert Path(index["source_path"]).is_dir()
    dataset = FrameDataset(out)
    for frame_id, converted in zip(dataset.frame_ids, dataset):
        original = source.read(frame_id)
        for name in ("points", "boxes", "labels", "num_points", "difficulty"):
            np.testing.assert_array_equal(getattr(converted, name), getattr(original, name), err_msg=name)
    assert isinstance(open_data(out), FrameDirectory)


def test_frame_folder_reads_real_data_with_reproducible_augmentation():
    spec, _ = real_spec("kitti")
    folder = FrameFolder(spec, augment=DataConfig(gt_sampling=True), seed=3)
    assert len(folder) == 2 and folder.paths is None
    assert sum(len(v) for v in folder.gt_database.by_class.values()) == 4  # every object has > 5 points
    a, b = folder[1], folder[1]
    assert np.array_equal(a.points, b.points) and np.array_equal(a.boxes, b.boxes)


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_detect_on_a_real_frame_with_the_bundled_model(fmt, tmp_path):
    spec, frame_id = real_spec(fmt)
    out = tmp_path / "detections.json"
    assert main(["detect", "--data", spec, "--frame", frame_id, "--json", str(out)]) == 0
    (frame,) = json.loads(out.read_text())["frames"]
    assert frame["frame_id"] == frame_id
    boxes = np.asarray(frame["boxes"], dtype=np.float64).reshape(-1, 7)
    print(f"{fmt} {frame_id}: {len(boxes)} detections")
    assert np.isfinite(boxes).all() and np.isfinite(frame["scores"]).all()
    assert len(frame["labels"]) == len(boxes)


def test_detect_needs_exactly_one_input_and_known_frames(tmp_path, capsys):
    spec, _ = real_spec("kitti")
    assert main(["detect", "--data", spec, "--frame", "999999"]) == 2
    assert "no frame(s) ['999999']" in capsys.readouterr().err
    assert main(["detect"]) == 2
    assert "either a points file or --data" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_and_eval_on_real_data(tmp_path, capsys):
    spec, frame_id = real_spec("kitti")
    picture = tmp_path / "demo.png"
    assert main(["demo", "--input", spec, "--frame", frame_id, "--out", str(picture)]) == 0
    printed = capsys.readouterr().out
    assert f"frame {frame_id}" in printed and "ground truth (boxes with points): 2 Vehicle" in printed
    assert picture.stat().st_size > 10_000
    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--data", spec, "--json", str(metrics), "--quiet"]) == 0
    result = json.loads(metrics.read_text())
    assert result["data"] == spec and math.isfinite(result["mAPH_L2"])
