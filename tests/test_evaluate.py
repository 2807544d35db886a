"""Waymo-style AP/APH: hand-computed cases, matching rules, JSON loading."""

import json
import math
import time

import numpy as np
import pytest

from haltdet import CLASSES, InputError
from haltdet.evaluate import (
    FrameBoxes,
    envelope_ap,
    evaluate,
    evaluate_files,
    format_table,
    load_boxes_json,
    match_boxes,
    result_to_json,
    save_boxes_json,
)

VEH, PED, CYC = 0, 1, 2


def box(x, y=0.0, yaw=0.0, l=4.0, w=2.0, h=1.5):
    return [x, y, 0.0, l, w, h, yaw]


def gt_frame(boxes, labels, fid="f0", **kw):
    return FrameBoxes(fid, np.array(boxes, dtype=np.float64).reshape(-1, 7), np.array(labels, dtype=np.int64), **{
        k: np.array(v) for k, v in kw.items()
    })


def pred_frame(boxes, labels, scores, fid="f0"):
    return FrameBoxes(
        fid,
        np.array(boxes, dtype=np.float64).reshape(-1, 7),
        np.array(labels, dtype=np.int64),
        scores=np.array(scores, dtype=np.float64),
    )


def shifted_iou(d, l=4.0):
    """IoU of two equal, axis-aligned boxes of length l shifted by d along their length."""
    return (l - d) / (l + d)


# --------------------------------------------------------------------------- envelope rule


def test_envelope_ap_rule():
    # Points (r, p): (0.5, 1.0), (0.5, 0.5), (1.0, 2/3), (0, 0).
    # Distinct recalls 0, 0.5, 1; envelope: p_env(0.5) = max(1, .5, 2/3) = 1, p_env(1) = 2/3.
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    assert envelope_ap([0.5, 0.5, 1.0, 0.0], [1.0, 0.5, 2 / 3, 0.0]) == pytest.approx(5 / 6)
    assert envelope_ap([], []) == 0.0
    assert envelope_ap([0.4, 0.2], [float("nan"), 1.0]) == pytest.approx(0.2)


# --------------------------------------------------------------------------- hand cases


def test_perfect_predictions():
    boxes = [box(0), box(10, yaw=1.0), box(0, 10, l=0.8, w=0.8, h=1.8), box(20, 20, yaw=-2.0, l=1.8, w=0.6)]
    labels = [VEH, VEH, PED, CYC]
    res = evaluate([gt_frame(boxes, labels)], [pred_frame(boxes, labels, [0.9, 0.3, 0.6, 0.05])])
    for name in CLASSES:
        for level in ("LEVEL_1", "LEVEL_2"):
            assert res[name][level]["AP"] == pytest.approx(1.0)
            assert res[name][level]["APH"] == pytest.approx(1.0)
    assert res["Vehicle"]["LEVEL_1"]["num_gt"] == 2 and res["Vehicle"]["LEVEL_1"]["num_pred"] == 2
    for key in ("mAP_L1", "mAPH_L1", "mAP_L2", "mAPH_L2"):
        assert res[key] == pytest.approx(1.0)
    assert res["num_frames"] == 1


def test_heading_error_half_pi():
    # Square footprint (l = w = 2): rotating by pi/2 leaves the box unchanged, IoU = 1.
    # Two GT; pred A exact (score .9), pred B yawed by pi/2 (score .8, weight 1 - 1/2 = .5).
    # cutoff .81-.90: TP 1, P 1, Ph 1, R .5;  cutoff <= .80: TP 2, P 1, Ph (1 + .5)/2 = .75, R 1.
    # AP = .5*1 + .5*1 = 1;  APH = .5*1 + .5*.75 = .875.
    g = gt_frame([box(0, l=2), box(10, l=2)], [VEH, VEH])
    p = pred_frame([box(0, l=2), box(10, l=2, yaw=math.pi / 2)], [VEH, VEH], [0.9, 0.8])
    res = evaluate([g], [p])["Vehicle"]["LEVEL_1"]
    assert res["AP"] == pytest.approx(1.0)
    assert res["APH"] == pytest.approx(0.875)
    # A single TP with heading error pi/2: APH = 0.5 * AP.
    res = evaluate([gt_frame([box(0, l=2)], [VEH])], [pred_frame([box(0, l=2, yaw=-math.pi / 2)], [VEH], [0.5])])
    assert res["Vehicle"]["LEVEL_1"]["AP"] == pytest.approx(1.0)
    assert res["Vehicle"]["LEVEL_1"]["APH"] == pytest.approx(0.5)


def test_heading_flipped_contributes_zero():
    # Flipping by pi gives the same box (IoU 1, a TP) but heading weight 1 - pi/pi = 0.
    res = evaluate([gt_frame([box(0, yaw=0.3)], [VEH])], [pred_frame([box(0, yaw=0.3 + math.pi)], [VEH], [0.7])])
    assert res["Vehicle"]["LEVEL_1"]["AP"] == pytest.approx(1.0)
    assert res["Vehicle"]["LEVEL_1"]["APH"] == pytest.approx(0.0)


def test_fp_ranked_above_tp():
    # GT g1 at x=0, g2 at x=10. Preds: TP on g1 (.9), FP far away (.8), TP on g2 (.7).
    # cutoff .81-.90: TP 1, FP 0 -> P 1,   R .5
    # cutoff .71-.80: TP 1, FP 1 -> P .5,  R .5
    # cutoff <= .70:  TP 2, FP 1 -> P 2/3, R 1
    # envelope: p_env(.5) = 1, p_env(1) = 2/3 -> AP = .5*1 + .5*2/3 = 5/6.
    g = gt_frame([box(0), box(10)], [VEH, VEH])
    p = pred_frame([box(0), box(50), box(10)], [VEH, VEH, VEH], [0.9, 0.8, 0.7])
    res = evaluate([g], [p])
    assert res["Vehicle"]["LEVEL_1"]["AP"] == pytest.approx(5 / 6)
    assert res["Vehicle"]["LEVEL_1"]["APH"] == pytest.approx(5 / 6)
    assert res["Vehicle"]["LEVEL_2"]["AP"] == pytest.approx(5 / 6)
    # Classes without GT: NaN, excluded from the means.
    assert math.isnan(res["Pedestrian"]["LEVEL_1"]["AP"]) and math.isnan(res["Cyclist"]["LEVEL_2"]["APH"])
    assert res["mAP_L1"] == pytest.approx(5 / 6)
    assert json.loads(result_to_json(res))["Pedestrian"]["LEVEL_1"]["AP"] is None


def test_zero_point_gt_removed_and_prediction_on_it_is_fp():
    # GT A (100 points) and C (0 points, removed). Preds: on C (.9), on A (.6).
    # cutoff .61-.90: only the C prediction: C is gone -> FP; TP 0 -> P 0, R 0.
    # cutoff <= .60: TP 1 (A), FP 1 (C) -> P .5, R 1/1.   AP = 1 * .5 = .5.
    g = gt_frame([box(0), box(10)], [VEH, VEH], num_points=[100, 0])
    p = pred_frame([box(10), box(0)], [VEH, VEH], [0.9, 0.6])
    res = evaluate([g], [p])["Vehicle"]
    assert res["LEVEL_1"]["num_gt"] == 1 and res["LEVEL_2"]["num_gt"] == 1
    assert res["LEVEL_1"]["AP"] == pytest.approx(0.5)
    assert res["LEVEL_2"]["AP"] == pytest.approx(0.5)
    # A class whose only GT has 0 points has no GT at all -> NaN.
    res = evaluate([gt_frame([box(0)], [PED], num_points=[0])], [pred_frame([box(0)], [PED], [0.5])])
    assert math.isnan(res["Pedestrian"]["LEVEL_1"]["AP"]) and res["Pedestrian"]["LEVEL_1"]["num_gt"] == 0


def test_levels_missed_level2_box():
    # GT A: 100 points (LEVEL_1); GT B: 3 points (LEVEL_2). One pred, on A (.8).
    # LEVEL_1: TP 1, FP 0, FN 0 (missed B is not a LEVEL_1 FN) -> P 1, R 1, AP 1.
    # LEVEL_2: TP 1, FN 1 -> P 1, R .5, AP .5.
    g = gt_frame([box(0), box(10)], [VEH, VEH], num_points=[100, 3])
    p = pred_frame([box(0)], [VEH], [0.8])
    res = evaluate([g], [p])["Vehicle"]
    assert (res["LEVEL_1"]["num_gt"], res["LEVEL_2"]["num_gt"]) == (1, 2)
    assert res["LEVEL_1"]["AP"] == pytest.approx(1.0)
    assert res["LEVEL_2"]["AP"] == pytest.approx(0.5)


def test_levels_match_to_level2_is_tp_at_level1():
    # Same GT; one pred, on the LEVEL_2 box B (.9).
    # LEVEL_1: TP 1 (not an FP), FP 0, FN 1 (A) -> P 1, R 1/(1+1) = .5, AP .5
    # (were it an FP or ignored, AP would be 0).  LEVEL_2: TP 1, FN 1 -> AP .5.
    g = gt_frame([box(0), box(10)], [VEH, VEH], num_points=[100, 3])
    p = pred_frame([box(10)], [VEH], [0.9])
    res = evaluate([g], [p])["Vehicle"]
    assert res["LEVEL_1"]["AP"] == pytest.approx(0.5)
    assert res["LEVEL_2"]["AP"] == pytest.approx(0.5)
    # Add a pred on A (.8): cutoff .81-.90 as above (P 1, R .5); <= .80: TP 2, FN 0 -> R 1. AP 1.
    p = pred_frame([box(10), box(0)], [VEH, VEH], [0.9, 0.8])
    res = evaluate([g], [p])["Vehicle"]
    assert res["LEVEL_1"]["AP"] == pytest.approx(1.0)
    assert res["LEVEL_2"]["AP"] == pytest.approx(1.0)


def test_difficulty_field_and_defaults():
    # difficulty given (1 or 2) wins over num_points; 0 means "not set" -> from num_points.
    g = gt_frame([box(0), box(10), box(20)], [VEH, VEH, VEH], num_points=[3, 100, 4], difficulty=[1, 2, 0])
    res = evaluate([g], [])["Vehicle"]
    # box 0: difficulty 1 -> L1; box 1: difficulty 2 -> L2; box 2: 0 -> 4 points -> L2.
    assert (res["LEVEL_1"]["num_gt"], res["LEVEL_2"]["num_gt"]) == (1, 3)
    assert res["LEVEL_1"]["AP"] == 0.0 and res["LEVEL_1"]["num_pred"] == 0
    # Neither num_points nor difficulty: everything LEVEL_1.
    res = evaluate([gt_frame([box(0), box(10)], [VEH, VEH])], [])["Vehicle"]
    assert (res["LEVEL_1"]["num_gt"], res["LEVEL_2"]["num_gt"]) == (2, 2)
    # 5 points -> LEVEL_2, 6 -> LEVEL_1.
    res = evaluate([gt_frame([box(0), box(10)], [VEH, VEH], num_points=[5, 6])], [])["Vehicle"]
    assert (res["LEVEL_1"]["num_gt"], res["LEVEL_2"]["num_gt"]) == (1, 2)


def test_hungarian_beats_greedy():
    # Vehicles 4 x 2 x 1.5, axis aligned, on the x axis: IoU = (4 - d) / (4 + d).
    # g1 at 0, g2 at 1.0; p1 at 0.45 (.9): IoU(p1,g1) = 3.55/4.45 = .798, IoU(p1,g2) = 3.45/4.55 = .758;
    # p2 at -0.5 (.8): IoU(p2,g1) = 3.5/4.5 = .778, IoU(p2,g2) = 2.5/5.5 = .455 (< .7).
    # Greedy by score: p1 -> g1 (best IoU), p2 unmatched -> 1 TP, 1 FP (AP would be .5).
    # Maximum weight: p1 -> g2, p2 -> g1 (.758 + .778 = 1.536 > .798) -> 2 TP.
    # cutoff .81-.90: TP 1, P 1, R .5;  cutoff <= .80: TP 2, P 1, R 1  -> AP 1.
    assert shifted_iou(0.45) > 0.7 and shifted_iou(0.55) > 0.7 and shifted_iou(0.5) > 0.7 > shifted_iou(1.5)
    g = gt_frame([box(0), box(1.0)], [VEH, VEH])
    p = pred_frame([box(0.45), box(-0.5)], [VEH, VEH], [0.9, 0.8])
    res = evaluate([g], [p])["Vehicle"]["LEVEL_1"]
    assert res["AP"] == pytest.approx(1.0)
    iou = np.array([[shifted_iou(0.45), shifted_iou(0.55)], [shifted_iou(0.5), shifted_iou(1.5)]])
    pi_, gi = match_boxes(iou, 0.7)
    assert sorted(zip(pi_.tolist(), gi.tolist())) == [(0, 1), (1, 0)]


def test_ineligible_pairs_never_matched():
    # Pred 0 overlaps both GT below the threshold; it must stay unmatched even though the
    # assignment solver pairs every row with some column.
    iou = np.array([[0.6, 0.65], [0.9, 0.0]])
    pi_, gi = match_boxes(iou, 0.7)
    assert pi_.tolist() == [1] and gi.tolist() == [0]
    pi_, gi = match_boxes(np.zeros((2, 3)), 0.5)
    assert len(pi_) == 0 and len(gi) == 0


def test_iou_just_below_threshold_is_not_a_match():
    # (4 - d)/(4 + d) = .69 -> d = 4*.31/1.69; = .71 -> d = 4*.29/1.71.
    d_below, d_above = 4 * 0.31 / 1.69, 4 * 0.29 / 1.71
    assert shifted_iou(d_below) == pytest.approx(0.69) and shifted_iou(d_above) == pytest.approx(0.71)
    g = gt_frame([box(0)], [VEH])
    res = evaluate([g], [pred_frame([box(d_below)], [VEH], [0.9])])["Vehicle"]["LEVEL_1"]
    assert res["AP"] == 0.0  # FP + FN
    res = evaluate([g], [pred_frame([box(d_above)], [VEH], [0.9])])["Vehicle"]["LEVEL_1"]
    assert res["AP"] == pytest.approx(1.0)
    # Pedestrian threshold is 0.5: IoU .69 is a match there.
    res = evaluate([gt_frame([box(0)], [PED])], [pred_frame([box(d_below)], [PED], [0.9])])
    assert res["Pedestrian"]["LEVEL_1"]["AP"] == pytest.approx(1.0)


def test_classes_are_separate_and_frames_matched_by_id():
    # A Pedestrian prediction on a Vehicle GT box is a Pedestrian FP and a Vehicle FN.
    gts = [gt_frame([box(0)], [VEH], fid="a"), gt_frame([box(0)], [VEH], fid="b")]
    preds = [pred_frame([box(0)], [PED], [0.9], fid="a")]  # frame "b": no predictions
    res = evaluate(gts, preds)
    assert res["Vehicle"]["LEVEL_1"]["AP"] == 0.0 and res["Vehicle"]["LEVEL_1"]["num_gt"] == 2
    assert math.isnan(res["Pedestrian"]["LEVEL_1"]["AP"]) and res["Pedestrian"]["LEVEL_1"]["num_pred"] == 1
    assert res["num_frames"] == 2
    # Frame a matched by id, b gets a perfect prediction: recall .5 at precision 1 -> AP .5.
    preds = [pred_frame([box(0)], [VEH], [0.9], fid="b")]
    assert evaluate(gts, preds)["Vehicle"]["LEVEL_1"]["AP"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="no ground truth"):
        evaluate(gts, [pred_frame([box(0)], [VEH], [0.9], fid="zzz")])
    with pytest.raises(InputError, match="duplicate"):
        evaluate(gts + [gts[0]], [])
    with pytest.raises(InputError, match="scores"):
        evaluate(gts, [gt_frame([box(0)], [VEH], fid="a")])


def test_score_cutoffs_are_inclusive():
    # A TP with score exactly .5 is included at cutoff .50; score 0 still counts at cutoff 0.
    g = gt_frame([box(0), box(10)], [VEH, VEH])
    res = evaluate([g], [pred_frame([box(0), box(10)], [VEH, VEH], [0.5, 0.0])])
    assert res["Vehicle"]["LEVEL_1"]["AP"] == pytest.approx(1.0)


def test_speed_200_frames():
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for f in range(200):
        n = 30
        b = np.column_stack(
            [rng.uniform(-50, 50, (n, 2)), rng.uniform(-1, 1, n), rng.uniform(1, 5, (n, 3)), rng.uniform(-3, 3, n)]
        )
        lab = rng.integers(0, 3, n)
        gts.append(FrameBoxes(str(f), b, lab, num_points=rng.integers(0, 50, n)))
        pb = b + rng.normal(0, 0.1, b.shape)
        preds.append(FrameBoxes(str(f), pb, lab, scores=rng.uniform(0, 1, n)))
    t = time.perf_counter()
    res = evaluate(gts, preds)
    assert time.perf_counter() - t < 20.0  # ~1 s normally; generous for a loaded machine
    assert 0.0 < res["mAP_L2"] <= 1.0


# --------------------------------------------------------------------------- JSON files


def _write(tmp_path, data, name="boxes.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_json_round_trip_and_evaluate_files(tmp_path):
    gts = [gt_frame([box(0), box(10, l=0.8, w=0.8)], [VEH, PED], fid="x", num_points=[50, 3], difficulty=[0, 2])]
    preds = [pred_frame([box(0), box(10, l=0.8, w=0.8)], [VEH, PED], [0.9, 0.4], fid="x")]
    save_boxes_json(tmp_path / "gt.json", gts, "gt")
    save_boxes_json(tmp_path / "pred.json", preds, "pred")
    raw = json.loads((tmp_path / "gt.json").read_text())
    assert raw["frames"][0]["labels"] == ["Vehicle", "Pedestrian"]
    back = load_boxes_json(tmp_path / "gt.json", "gt")
    np.testing.assert_array_equal(back[0].boxes, gts[0].boxes)
    np.testing.assert_array_equal(back[0].labels, [VEH, PED])
    np.testing.assert_array_equal(back[0].num_points, [50, 3])
    np.testing.assert_array_equal(back[0].difficulty, [0, 2])
    assert back[0].scores is None
    res = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json")
    assert result_to_json(res) == result_to_json(evaluate(gts, preds))
    assert res["Vehicle"]["LEVEL_1"]["AP"] == pytest.approx(1.0)
    table = format_table(res)
    for name in CLASSES:
        assert name in table
    # Integer labels are accepted too; empty frames are fine.
    path = _write(tmp_path, {"frames": [{"frame_id": "a", "boxes": [box(0)], "labels": [2], "scores": [1.0]},
                                        {"frame_id": "b", "boxes": [], "labels": [], "scores": []}]})
    frames = load_boxes_json(path, "pred")
    assert frames[0].labels.tolist() == [CYC] and frames[1].boxes.shape == (0, 7)


def _frame(**over):
    f = {"frame_id": "frm7", "boxes": [box(0), box(5)], "labels": ["Vehicle", "Cyclist"], "scores": [0.5, 0.2]}
    f.update(over)
    return {k: v for k, v in f.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    "content, kind, problem",
    [
        ("{not json", "pred", "not valid JSON"),
        ({"frame": []}, "pred", "'frames'"),
        ({"frames": {}}, "pred", "'frames' must be a list"),
        ({"frames": [_frame(boxes=_DROP)]}, "pred", "missing key 'boxes'"),
        ({"frames": [_frame(labels=_DROP)]}, "gt", "missing key 'labels'"),
        ({"frames": [_frame(scores=_DROP)]}, "pred", "missing key 'scores'"),
        ({"frames": [_frame(frame_id=_DROP)]}, "pred", "missing key 'frame_id'"),
        ({"frames": [_frame(labels=["Vehicle"])]}, "pred", "'labels' has 1 entries"),
        ({"frames": [_frame(scores=[0.5])]}, "pred", "'scores' has 1 entries"),
        ({"frames": [_frame(boxes=[box(0), [1, 2, 3]])]}, "pred", "box 1 must be a list of 7 numbers"),
        ({"frames": [_frame(boxes=[box(0), box(1)[:6] + ["a"]])]}, "pred", "box 1 must be a list of 7 numbers"),
        ('{"frames": [{"frame_id": "frm7", "boxes": [[0, 0, 0, 1, 1, NaN, 0]], "labels": [0], "scores": [0.5]}]}',
         "pred", "non-finite"),
        ({"frames": [_frame(labels=["Vehicle", "Truck"])]}, "pred", "unknown class name 'Truck'"),
        ({"frames": [_frame(labels=["Vehicle", 3])]}, "pred", "unknown class 3"),
        ({"frames": [_frame(scores=[0.5, 1.5])]}, "pred", "score 1 must be a number in [0, 1]"),
        ({"frames": [_frame(scores=[-0.1, 0.5])]}, "pred", "score 0 must be a number in [0, 1]"),
        ({"frames": [_frame(), _frame()]}, "pred", "duplicate frame id"),
        ({"frames": [_frame(num_points=[3])]}, "gt", "'num_points' has 1 entries"),
        ({"frames": [_frame(num_points=[3, -1])]}, "gt", "num_points 1 must be a non-negative integer"),
        ({"frames": [_frame(difficulty=[1, 3])]}, "gt", "difficulty 1 must be 1 or 2"),
        ({"frames": [_frame(boxes=[box(0), box(0, l=-1.0)])]}, "gt", "non-negative"),
    ],
)
def test_json_malformed(tmp_path, content, kind, problem):
    path = _write(tmp_path, content, name="bad_file.json")
    with pytest.raises(InputError) as err:
        load_boxes_json(path, kind)
    msg = str(err.value)
    assert "bad_file.json" in msg
    assert problem in msg
    if not isinstance(content, str) and "frames" in content and isinstance(content["frames"], list):
        assert "frm7" in msg or "frame #0" in msg


def test_json_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_boxes_json(tmp_path / "nope.json", "gt")


def test_bootstrap_spread_of_the_split():
    """Resampling frames: no spread when every frame scores alike, a spread bracketing the
    split's own figure when frames differ, the same draws for the same seed, and the point
    metrics unchanged."""
    hit = [gt_frame([box(10.0 * i)], [VEH], fid=f"h{i}") for i in range(6)]
    hit_pred = [pred_frame([box(10.0 * i)], [VEH], [0.9], fid=f"h{i}") for i in range(6)]
    same = evaluate(hit, hit_pred, bootstrap=50)
    assert same["bootstrap"]["mAPH_L2_std"] == 0.0 and same["mAPH_L2"] == 1.0
    miss = [gt_frame([box(5.0)], [VEH], fid=f"m{i}") for i in range(6)]
    miss_pred = [pred_frame([box(-30.0)], [VEH], [0.8], fid=f"m{i}") for i in range(6)]
    plain = evaluate(hit + miss, hit_pred + miss_pred)
    mixed = evaluate(hit + miss, hit_pred + miss_pred, bootstrap=200, seed=3)
    assert result_to_json({k: v for k, v in mixed.items() if k != "bootstrap"}) == result_to_json(plain)
    spread = mixed["bootstrap"]
    assert spread["samples"] == 200 and spread["mAPH_L2_std"] > 0.05
    assert spread["mAPH_L2_p5"] < plain["mAPH_L2"] < spread["mAPH_L2_p95"]
    assert evaluate(hit + miss, hit_pred + miss_pred, bootstrap=200, seed=3)["bootstrap"] == spread


def test_paired_difference_against_other_predictions():
    """`against`: the difference of two models' mAPH_L2 on the same frames, its spread over
    the same resampled frame sets (none when the two agree frame by frame)."""
    gt = [gt_frame([box(10.0 * i)], [VEH], fid=f"f{i}") for i in range(10)]
    good = [pred_frame([box(10.0 * i)], [VEH], [0.9], fid=f"f{i}") for i in range(10)]
    worse = [pred_frame([box(10.0 * i + (2.0 if i % 3 == 0 else 0.0))], [VEH], [0.9], fid=f"f{i}")
             for i in range(10)]
    same = evaluate(gt, good, bootstrap=100, against=good)["against"]
    assert same["difference"] == 0 and same["difference_std"] == 0
    result = evaluate(gt, good, bootstrap=300, seed=1, against=worse)
    diff = result["against"]
    assert diff["mAPH_L2"] == evaluate(gt, worse)["mAPH_L2"] < result["mAPH_L2"] == 1.0
    assert diff["difference"] == pytest.approx(result["mAPH_L2"] - diff["mAPH_L2"])
    assert 0 < diff["difference_std"] and diff["difference_p5"] < diff["difference"] < diff["difference_p95"]
    assert "difference_std" not in evaluate(gt, good, against=worse)["against"]  # no spread without resampling
