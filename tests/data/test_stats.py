"""`haltdet data stats`: counts checked against frames built by hand."""

import json
from pathlib import Path

import numpy as np
import pytest

from haltdet.cli import main
from haltdet.data.frames import Frame, difficulty_from_points, write_dataset_index, write_frame
from haltdet.data.stats import dataset_statistics, frame_statistics


def hand_frame(frame_id: str, num_points: list[int]) -> Frame:
    points = np.array([
        [0.01, 0.01, 0.0, 0.5],  # pillar (192, 192) ...
        [0.30, 0.30, 1.0, 0.5],  # ... the same pillar (0.32 m)
        [0.33, 0.01, 0.0, 0.5],  # the next pillar along x
        [-61.44, -61.44, -4.0, 0.5],  # the range's lower corner is inside it
        [61.5, 0.0, 0.0, 0.5],  # beyond its upper bound
        [0.0, 0.0, 3.5, 0.5],  # too high
    ], dtype=np.float32)
    labels = np.array([0, 0, 1, 2][: len(num_points)])
    boxes = np.tile(np.array([[5.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.0]], np.float32), (len(num_points), 1))
    n = np.array(num_points, dtype=np.int64)
    return Frame(frame_id, points, boxes, labels, n, difficulty_from_points(n))


def test_frame_counts():
    stats = frame_statistics(hand_frame("a", [0, 3, 10, 40]))
    assert stats == {"points": 6, "pillars": 3, "points_in_boxes": 53, "labels": 4, "ignored": 1,
                     "level_2": 1, "Vehicle": 2, "Pedestrian": 1, "Cyclist": 1}


def test_dataset_means_and_fractions():
    stats = dataset_statistics([hand_frame("a", [0, 3, 10, 40]), hand_frame("b", [7, 8])])
    assert stats["frames"] == 2
    assert stats["points"] == {"mean": 6.0, "min": 6, "max": 6}
    assert stats["Vehicle_per_frame"] == 2.0 and stats["Pedestrian_per_frame"] == 0.5
    assert stats["ignored_fraction"] == pytest.approx(1 / 6) and stats["level_2_fraction"] == pytest.approx(1 / 6)
    assert stats["points_in_boxes_fraction"] == pytest.approx(68 / 12)  # labels' counts, not checked here
    with pytest.raises(ValueError):
        dataset_statistics([])


def test_cli_prints_and_writes_json(tmp_path, capsys):
    for frame in (hand_frame("a", [0, 3, 10, 40]), hand_frame("b", [7, 8])):
        write_frame(tmp_path / "d", frame)
    write_dataset_index(tmp_path / "d", ["a", "b"])
    assert main(["data", "stats", str(tmp_path / "d"), "--frames", "1", "--json", str(tmp_path / "s.json"),
                 "--quiet"]) == 0
    assert "1 frames" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["Cyclist_per_frame"] == 1.0


def test_real_kitti_frames(capsys):
    kitti = Path(__file__).parents[2].parent / "shared" / "data" / "real" / "kitti" / "training"
    if not kitti.is_dir():
        pytest.skip(f"real-data fixture not found: {kitti}")
    assert main(["data", "stats", f"kitti:{kitti}", "--quiet"]) == 0
    out = capsys.readouterr().out  # the fixture's own counts (tests/data/test_kitti.py)
    assert "2 frames" in out and "min 115,384, max 120,268" in out
    assert "1.0 Vehicle, 0.5 Pedestrian, 0.5 Cyclist" in out
