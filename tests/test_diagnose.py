"""The diagnosis tables on small hand-computed cases."""

import math

import numpy as np
import pytest

from haltdet.diagnose import oracle_table, residual_table
from haltdet.evaluate import FrameBoxes


def frames():
    gt = FrameBoxes("f", np.array([[10.0, 0.0, 1.0, 4.0, 2.0, 1.5, math.pi / 2],   # vehicle, heading +y
                                   [-10.0, 5.0, 1.0, 4.0, 2.0, 1.5, 0.0],          # vehicle, heading +x
                                   [0.0, 10.0, 1.0, 0.6, 0.6, 1.8, 0.0],           # pedestrian
                                   [20.0, 20.0, 1.0, 4.0, 2.0, 1.5, 0.0]]),        # ignored (no point)
                    np.array([0, 0, 1, 0]), num_points=np.array([50, 50, 30, 0]),
                    difficulty=np.array([1, 1, 1, 0]))
    pred = FrameBoxes("f", np.array([
        [10.0, 0.5, 1.2, 4.4, 2.0, 1.5, -math.pi / 2],  # 0.5 m ahead, 0.2 m high, 0.4 m long, reversed
        [-10.3, 5.1, 1.0, 4.0, 2.0, 1.5, 0.0],          # 0.3 m behind, 0.1 m to the left
        [0.0, 10.0, 1.0, 0.6, 0.6, 1.8, 0.0],           # exact
        [-10.0, 5.0, 3.0, 4.0, 2.0, 1.5, 1.0],          # duplicate of vehicle 2 with a low score
        [20.0, 20.0, 1.0, 4.0, 2.0, 1.5, 0.0]]),        # on the ignored box: unmatched
        np.array([0, 0, 1, 0, 0]), scores=np.array([0.9, 0.8, 0.7, 0.1, 0.6]))
    return [pred], [gt]


def test_residuals_equal_hand_computed_errors():
    table = residual_table(*frames(), min_score=0.3)
    vehicle = table["Vehicle"]
    assert vehicle["matched"] == 2
    expected_mean = {"along": (0.5 - 0.3) / 2, "across": 0.1 / 2, "z": 0.1, "l": 0.2, "w": 0.0, "h": 0.0}
    expected_std = {"along": 0.4, "across": 0.05, "z": 0.1, "l": 0.2, "w": 0.0, "h": 0.0}
    for name in expected_mean:
        assert vehicle["mean"][name] == pytest.approx(expected_mean[name], abs=1e-9)
        assert vehicle["std"][name] == pytest.approx(expected_std[name], abs=1e-9)
    assert vehicle["reversed"] == 0.5 and vehicle["axis_error_deg"] == pytest.approx(0.0, abs=1e-9)
    pedestrian = table["Pedestrian"]
    assert pedestrian["matched"] == 1 and pedestrian["reversed"] == 0.0
    assert all(v == 0.0 for v in pedestrian["mean"].values())
    assert table["Cyclist"] == {"matched": 0}


def test_low_scores_join_the_residuals_when_asked():
    table = residual_table(*frames(), min_score=0.0)
    assert table["Vehicle"]["matched"] == 3  # the duplicate matches too; the ignored box never does
    assert table["Vehicle"]["mean"]["z"] == pytest.approx((0.2 + 0.0 + 2.0) / 3)


def test_oracle_with_every_quantity_replaced_scores_every_matched_object():
    rows = {row["replaced"]: row for row in oracle_table(*frames())}
    # Vehicle 1's prediction has 3D IoU 3.7*2*1.3 / (4*2*1.5 + 4.4*2*1.5 - 3.7*2*1.3) = 0.62
    # < 0.7: a miss; vehicle 2's has 3.7*1.9*1.5 / (2*12 - 3.7*1.9*1.5) = 0.78: a hit.
    assert rows["nothing"]["Pedestrian AP"] == pytest.approx(1.0)
    assert rows["nothing"]["Vehicle AP"] < 1.0
    assert rows["xy z size yaw"]["Vehicle AP"] == pytest.approx(1.0)
    assert rows["xy z size yaw"]["Vehicle APH"] == pytest.approx(1.0)
    # Only the heading replaced: vehicle 1 still fails IoU, so heading alone cannot fix it.
    assert rows["yaw"]["Vehicle AP"] == pytest.approx(rows["nothing"]["Vehicle AP"])
