"""Rotated IoU (BEV and 3D) against shapely, and rotated BEV NMS."""

import math

import numpy as np
import pytest
import torch

from haltdet import InputError
from haltdet.boxes import iou_3d, iou_3d_paired, iou_bev, nms_bev

shapely = pytest.importorskip("shapely")
from shapely.geometry import Polygon  # noqa: E402


def _ref_polygon(box) -> Polygon:
    """Independent corner computation for the reference."""
    x, y, _, l, w, _, yaw = (float(v) for v in box)
    c, s = math.cos(yaw), math.sin(yaw)
    pts = []
    for lx, ly in ((l / 2, w / 2), (-l / 2, w / 2), (-l / 2, -w / 2), (l / 2, -w / 2)):
        pts.append((x + lx * c - ly * s, y + lx * s + ly * c))
    return Polygon(pts)


def _ref_iou(a, b, three_d: bool) -> float:
    pa, pb = _ref_polygon(a), _ref_polygon(b)
    inter = pa.intersection(pb).area
    size_a, size_b = pa.area, pb.area
    if three_d:
        h = max(0.0, min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2))
        inter *= h
        size_a *= a[5]
        size_b *= b[5]
    union = size_a + size_b - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, spread=3.0):
    return np.column_stack(
        [
            rng.uniform(-spread, spread, (n, 2)),
            rng.uniform(-0.5, 0.5, n),
            rng.uniform(0.3, 5.0, (n, 3)),
            rng.uniform(-math.pi, math.pi, n),
        ]
    )


def _special_pairs():
    """(a, b) pairs of degenerate / exact configurations."""
    base = np.array([1.0, -2.0, 0.5, 4.0, 2.0, 1.5, 0.4])
    pairs = []

    def with_(**kw):
        b = base.copy()
        for k, v in kw.items():
            b["xyzlwhr".index(k)] = v
        return b

    c, s = math.cos(0.4), math.sin(0.4)
    pairs.append((base, base.copy()))  # identical
    pairs.append((base, with_(r=0.4 + math.pi)))  # flipped heading
    pairs.append((base, with_(r=0.4 + math.pi / 2, l=2.0, w=4.0)))  # same footprint, rotated 90
    pairs.append((base, with_(r=0.4 + math.pi / 2)))  # rotated 90: a cross
    pairs.append((base, with_(r=0.4 + math.pi / 4)))
    pairs.append((base, with_(l=2.0, w=1.0)))  # one inside the other
    pairs.append((base, with_(l=2.0, w=1.0, r=1.3)))  # inside, rotated
    pairs.append((base, with_(l=4.0, w=1.0)))  # inside, sharing two edges
    pairs.append((base, with_(x=1.0 + 4.0 * c, y=-2.0 + 4.0 * s)))  # touching along an edge
    pairs.append((base, with_(x=1.0 + 4.0 * c + 2.0 * -s, y=-2.0 + 4.0 * s + 2.0 * c)))  # touching at a corner
    pairs.append((base, with_(x=1.0 + 2.0 * c, y=-2.0 + 2.0 * s)))  # half overlap, collinear edges
    pairs.append((base, with_(x=1.0 + 2.0 * c - 1.0 * s, y=-2.0 + 2.0 * s + 1.0 * c)))  # quarter overlap
    pairs.append((base, with_(x=30.0)))  # far apart
    pairs.append((base, with_(z=0.5 + 1.5)))  # touching vertically (3D IoU 0)
    pairs.append((base, with_(z=1.0, h=3.0)))
    pairs.append((with_(r=0.0), with_(r=0.0, x=2.0)))  # axis aligned
    pairs.append((with_(r=math.pi / 2), with_(r=-math.pi / 2, y=-1.0)))
    pairs.append((base, with_(l=0.0)))  # zero size
    pairs.append((with_(l=0.0, w=0.0, h=0.0), with_(l=0.0, w=0.0, h=0.0)))
    pairs.append((base, with_(h=0.0)))
    pairs.append((base, with_(r=0.4 + 1e-9)))  # almost identical
    return pairs


@pytest.mark.parametrize("three_d", [False, True])
def test_iou_matches_shapely_random(three_d):
    rng = np.random.default_rng(1)
    a = _random_boxes(rng, 20)
    b = _random_boxes(rng, 20)
    fn = iou_3d if three_d else iou_bev
    got = fn(a, b)
    assert isinstance(got, np.ndarray) and got.shape == (20, 20)
    ref = np.array([[_ref_iou(x, y, three_d) for y in b] for x in a])
    assert (ref > 0).sum() > 50 and (ref == 0).sum() > 20  # both overlapping and disjoint pairs
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_paired_iou_matches_shapely():
    rng = np.random.default_rng(7)
    a, b = _random_boxes(rng, 200, spread=1.0), _random_boxes(rng, 200, spread=1.0)
    got = iou_3d_paired(a, b)
    assert got.shape == (200,)
    ref = np.array([_ref_iou(x, y, True) for x, y in zip(a, b)])
    assert (ref > 0).sum() > 50
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="as many boxes"):
        iou_3d_paired(a, b[:3])


@pytest.mark.parametrize("three_d", [False, True])
def test_iou_matches_shapely_special(three_d):
    pairs = _special_pairs()
    fn = iou_3d if three_d else iou_bev
    for k, (a, b) in enumerate(pairs):
        for x, y in ((a, b), (b, a)):
            got = fn(x[None], y[None])[0, 0]
            ref = _ref_iou(x, y, three_d)
            assert np.isfinite(got)
            assert abs(got - ref) < 1e-5, (k, three_d, got, ref)


def test_iou_exact_values():
    a = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.3]])
    assert iou_bev(a, a)[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert iou_3d(a, a)[0, 0] == pytest.approx(1.0, abs=1e-12)
    inside = np.array([[0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.3]])
    assert iou_bev(a, inside)[0, 0] == pytest.approx(2.0 / 8.0)  # area 2 inside area 8
    assert iou_3d(a, inside)[0, 0] == pytest.approx(2.0 / 16.0)  # volume 2 inside volume 16
    zero = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert iou_bev(zero, zero)[0, 0] == 0.0
    assert iou_3d(a, zero)[0, 0] == 0.0


def test_iou_symmetry_self_and_flip():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(_random_boxes(rng, 30))
    b = torch.from_numpy(_random_boxes(rng, 25))
    for fn in (iou_bev, iou_3d):
        ab = fn(a, b)
        assert isinstance(ab, torch.Tensor) and ab.dtype == torch.float64
        torch.testing.assert_close(ab, fn(b, a).T, atol=1e-9, rtol=0)
        torch.testing.assert_close(torch.diagonal(fn(a, a)), torch.ones(30, dtype=torch.float64), atol=1e-9, rtol=0)
        flipped = a.clone()
        flipped[:, 6] += math.pi
        torch.testing.assert_close(fn(flipped, b), ab, atol=1e-9, rtol=0)
        assert ((ab >= 0) & (ab <= 1)).all()


def test_iou_shapes_dtypes_and_chunking(monkeypatch):
    import haltdet.boxes as hb

    rng = np.random.default_rng(3)
    a = _random_boxes(rng, 40)
    b = _random_boxes(rng, 30)
    full = iou_bev(a, b)
    monkeypatch.setattr(hb, "_PAIR_CHUNK", 7)
    monkeypatch.setattr(hb, "_ROW_ELEMS", 50)
    np.testing.assert_allclose(iou_bev(a, b), full, atol=1e-12)
    assert iou_bev(np.zeros((0, 7)), b).shape == (0, 30)
    assert iou_3d(a, np.zeros((0, 7))).shape == (40, 0)
    f32 = iou_bev(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert f32.dtype == torch.float32
    with pytest.raises(InputError):
        iou_bev(np.zeros((3, 6)), b)


def _boxes_t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_nms_removes_lower_scored_duplicate():
    boxes = _boxes_t(
        [
            [0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.1],
            [0.1, 0.05, 0.0, 4.0, 2.0, 1.5, 0.12],  # near duplicate of 0, higher score
            [20.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0],  # far away
            [0.0, 10.0, 0.0, 1.0, 1.0, 1.5, 0.0],  # far away, lowest score
        ]
    )
    scores = torch.tensor([0.5, 0.9, 0.3, 0.1])
    keep = nms_bev(boxes, scores, 0.5)
    assert keep.dtype == torch.long
    assert keep.tolist() == [1, 2, 3]
    assert nms_bev(boxes, scores, 0.5, max_output=2).tolist() == [1, 2]
    # Threshold above the duplicate's IoU keeps everything, by descending score.
    assert nms_bev(boxes, scores, 0.99).tolist() == [1, 0, 2, 3]


def test_nms_rotated_overlap_and_ties():
    # Same centre, rotated by 90 deg: BEV IoU of a 4x2 cross = 4 / 12 = 1/3.
    boxes = _boxes_t([[0, 0, 0, 4, 2, 1, 0.0], [0, 0, 0, 4, 2, 1, math.pi / 2]])
    assert nms_bev(boxes, torch.tensor([0.5, 0.6]), 0.3).tolist() == [1]
    assert nms_bev(boxes, torch.tensor([0.5, 0.6]), 0.34).tolist() == [1, 0]
    # Equal scores: lower index first, deterministic.
    dup = _boxes_t([[0, 0, 0, 4, 2, 1, 0.0]] * 3 + [[9, 9, 0, 1, 1, 1, 0.0]])
    for _ in range(3):
        assert nms_bev(dup, torch.tensor([0.7, 0.7, 0.7, 0.7]), 0.5).tolist() == [0, 3]
    assert nms_bev(torch.zeros((0, 7)), torch.zeros(0), 0.5).tolist() == []


def test_nms_matches_reference_greedy():
    rng = np.random.default_rng(4)
    boxes = torch.from_numpy(_random_boxes(rng, 300, spread=8.0))
    scores = torch.from_numpy(rng.uniform(0, 1, 300))
    scores[10] = scores[20]  # a tie
    for thr in (0.1, 0.5):
        iou = iou_bev(boxes, boxes)
        order = sorted(range(300), key=lambda i: (-float(scores[i]), i))
        suppressed, ref = set(), []
        for i in order:
            if i in suppressed:
                continue
            ref.append(i)
            suppressed |= {j for j in range(300) if iou[i, j] > thr}
        assert nms_bev(boxes, scores, thr).tolist() == ref


def test_nms_with_labels_is_nms_of_each_label_alone():
    """With labels, boxes suppress only boxes of their own label, at that label's
    threshold: the kept set of each label is a call on that label's boxes alone, the
    whole in descending score (ties: lower index); max_output counts every label."""
    rng = np.random.default_rng(7)
    boxes = torch.from_numpy(_random_boxes(rng, 400, spread=6.0))
    scores = torch.from_numpy(rng.uniform(0, 1, 400).round(2))  # many ties, within and across labels
    labels = torch.from_numpy(rng.integers(0, 3, 400))
    thresholds = [0.1, 0.3, 0.5]
    keep = nms_bev(boxes, scores, thresholds, labels=labels)
    expected = []
    for label, threshold in enumerate(thresholds):
        index = torch.nonzero(labels == label).flatten()
        own = index[nms_bev(boxes[index], scores[index], threshold)]
        assert len(own) < len(index)  # something is suppressed in every label
        expected += own.tolist()
    assert keep.tolist() == sorted(expected, key=lambda i: (-float(scores[i]), i))
    assert nms_bev(boxes, scores, thresholds, max_output=5, labels=labels).tolist() == keep[:5].tolist()


def test_paired_intersection_by_hand():
    """BEV intersections of box pairs computed by hand: overlapping axis-aligned boxes,
    one inside the other, a cross (4 x 2 boxes at 90 degrees: a 2 x 2 square), a square
    turned 45 degrees over another (an octagon), touching and disjoint boxes."""
    from haltdet.boxes import _paired_bev_intersection

    a = _boxes_t([[0, 0, 0, 4, 2, 1, 0], [0, 0, 0, 4, 4, 1, 0], [0, 0, 0, 4, 2, 1, 0], [0, 0, 0, 2, 2, 1, 0],
                  [0, 0, 0, 2, 2, 1, 0], [0, 0, 0, 2, 2, 1, 0]]).double()
    b = _boxes_t([[1, 0.5, 0, 4, 2, 1, 0], [0.5, 0, 0, 1, 1, 1, 0.3], [0, 0, 0, 4, 2, 1, math.pi / 2],
                  [0, 0, 0, 2, 2, 1, math.pi / 4], [2, 0, 0, 2, 2, 1, 0], [5, 5, 0, 2, 2, 1, 0]]).double()
    octagon = 4 * (math.sqrt(2) - 1) * 2  # a square of side 2 cut by the same square turned 45 degrees
    expected = torch.tensor([3 * 1.5, 1.0, 4.0, octagon, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_paired_bev_intersection(a, b), expected, rtol=0, atol=1e-12)
