"""Argoverse 2 reader: the real log excerpt (cuboid point counts), split folders, bad input."""

import sys
from pathlib import Path

import numpy as np
import pytest

from haltdet import CLASSES, InputError
from haltdet.boxes import points_in_boxes
from haltdet.data.formats import open_data, to_project_frame
from haltdet.data.formats.av2 import BOX_COLUMNS, GROUND_BELOW_ORIGIN, read_annotations

pa = pytest.importorskip("pyarrow", reason="the AV2 reader needs pyarrow (pip install haltdet[real])")
feather = pytest.importorskip("pyarrow.feather")

LOG = Path(__file__).parents[2].parent / "shared" / "data" / "real" / "av2" / "7fab2350-7eaf-3b7e-a39d-6937a4c1bede"
SWEEPS = ["315966265259836000", "315966265360032000"]


@pytest.fixture
def av2():
    if not LOG.is_dir():
        pytest.skip(f"real-data fixture not found: {LOG}")
    return open_data(f"av2:{LOG}")


@pytest.mark.parametrize("sweep", SWEEPS)
def test_points_in_cuboids_reproduce_num_interior_pts(av2, sweep):
    raw = read_annotations(LOG, int(sweep))
    points = av2.read(sweep).points  # in the project frame: the cuboids go with them
    _, boxes = to_project_frame(np.zeros((0, 4)), raw.boxes, GROUND_BELOW_ORIGIN)
    counts = points_in_boxes(points, boxes).sum(axis=1)
    matches = int((counts == raw.num_interior_pts).sum())
    print(f"AV2 {sweep}: {matches}/{len(counts)} cuboids match num_interior_pts ({counts.sum()} points)")
    assert len(counts) == 81
    assert matches == 81


def test_frames_points_and_class_mapping(av2):
    assert av2.frame_ids() == SWEEPS
    frame = av2.read(SWEEPS[0])
    assert frame.points.shape == (99_229, 4) and frame.points.dtype == np.float32
    assert frame.points[:, 3].min() >= 0 and frame.points[:, 3].max() <= 1
    raw = read_annotations(LOG, int(SWEEPS[0]))
    names = [CLASSES[i] for i in frame.labels]
    expected = {c: sum(raw.categories.count(k) for k in keys) for c, keys in (
        ("Vehicle", ("REGULAR_VEHICLE", "BOX_TRUCK", "TRUCK_CAB", "VEHICULAR_TRAILER")),
        ("Pedestrian", ("PEDESTRIAN",)), ("Cyclist", ("BICYCLIST", "MOTORCYCLIST")))}
    assert {c: names.count(c) for c in CLASSES} == expected
    assert frame.num_objects == 62 and expected["Vehicle"] == 47
    kept = [c not in ("BICYCLE", "MOTORCYCLE", "BOLLARD", "STROLLER", "CONSTRUCTION_CONE") for c in raw.categories]
    np.testing.assert_array_equal(frame.num_points, raw.num_interior_pts[kept])


def test_a_split_folder_names_frames_by_log_and_timestamp(av2, tmp_path):
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / LOG.name).symlink_to(LOG, target_is_directory=True)
    split = open_data(f"av2:{tmp_path / 'split'}")
    assert split.frame_ids() == [f"{LOG.name}_{s}" for s in SWEEPS]
    np.testing.assert_array_equal(split.read(split.frame_ids()[1]).boxes, av2.read(SWEEPS[1]).boxes)
    with pytest.raises(InputError, match="no sweep '123'"):
        split.read("123")


def _write_log(root: Path, sweep_columns: dict, categories: list[str]) -> Path:
    (root / "sensors" / "lidar").mkdir(parents=True)
    feather.write_feather(pa.table(sweep_columns), root / "sensors" / "lidar" / "1000.feather")
    n = len(categories)
    boxes = {c: np.ones(n) for c in BOX_COLUMNS if c not in ("timestamp_ns", "category", "num_interior_pts")}
    boxes.update(timestamp_ns=np.full(n, 1000, np.int64), category=categories,
                 num_interior_pts=np.zeros(n, np.int64), qx=np.zeros(n), qy=np.zeros(n),
                 qw=np.full(n, np.cos(0.25)), qz=np.full(n, np.sin(0.25)))
    feather.write_feather(pa.table(boxes), root / "annotations.feather")
    return root


SWEEP = {"x": np.array([1.0, 9.0], np.float16), "y": np.array([1.0, 9.0], np.float16),
         "z": np.array([1.0, 9.0], np.float16), "intensity": np.array([255, 51], np.uint8)}


def test_hand_made_log(tmp_path):
    log = _write_log(tmp_path / "log", SWEEP, ["BUS", "BICYCLE", "MOTORCYCLIST"])
    frame = open_data(f"av2:{log}").read("1000")
    assert [CLASSES[i] for i in frame.labels] == ["Vehicle", "Cyclist"]
    # yaw from the quaternion; 1.5 m down: the road, 0.4 m below the rear axle, to -1.9
    np.testing.assert_allclose(frame.boxes[0], [1, 1, -0.5, 1, 1, 1, 0.5], atol=1e-6)
    np.testing.assert_allclose(frame.points, [[1, 1, -0.5, 1.0], [9, 9, 7.5, 0.2]], atol=1e-6)
    assert frame.num_points.tolist() == [1, 1] and frame.difficulty.tolist() == [2, 2]
    (log / "annotations.feather").unlink()  # a test-split log: no labels
    assert open_data(f"av2:{log}").read("1000").boxes.shape == (0, 7)


def test_bad_feather_files_are_input_errors_naming_them(tmp_path):
    no_intensity = {k: v for k, v in SWEEP.items() if k != "intensity"}
    log = _write_log(tmp_path / "a", no_intensity, ["BUS"])
    with pytest.raises(InputError, match=r"1000\.feather: missing column\(s\) \['intensity'\]"):
        open_data(f"av2:{log}").read("1000")
    log = _write_log(tmp_path / "b", SWEEP, ["SPACESHIP"])
    with pytest.raises(InputError, match="annotations.feather: unknown class name"):
        open_data(f"av2:{log}").read("1000")
    path = log / "annotations.feather"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="annotations.feather: truncated or corrupt"):
        open_data(f"av2:{log}").read("1000")
    with pytest.raises(InputError, match="not an Argoverse 2 log"):
        open_data(f"av2:{tmp_path / 'a' / 'sensors'}")


def test_missing_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(InputError, match=r"pip install haltdet\[real\]"):
        open_data(f"av2:{tmp_path}")
