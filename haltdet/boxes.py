"""The one box convention of the project, and geometry on boxes.

Every box in haltdet, everywhere between the dataset readers and the user, is a row

    (x, y, z, l, w, h, yaw)

in the LiDAR frame (metres, x forward, y left, z up, right-handed):
  * (x, y, z) is the box centre (z is the centre, not the bottom);
  * l is the extent along the heading direction, w across it, h vertical;
  * yaw is the heading in radians, counter-clockwise from +x about +z.

Dataset readers convert their own conventions to this one at the boundary; nothing
in between converts anything. Boxes are upright (no pitch/roll).

Functions accept numpy arrays or torch tensors and return the same kind.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BOX_DIM = 7


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.as_tensor(np.asarray(x)), True


def _back(x: torch.Tensor, was_numpy: bool):
    return x.numpy() if was_numpy else x


def wrap_angle(angle):
    """Wrap angles to [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def bev_corners(boxes):
    """BEV corners of boxes, counter-clockwise.

    Args:
        boxes: (M, 7) boxes in the project convention.
    Returns:
        (M, 4, 2) corner (x, y) coordinates, counter-clockwise starting at the
        front-left... precisely: (+l/2, +w/2), (-l/2, +w/2), (-l/2, -w/2), (+l/2, -w/2)
        rotated by yaw and translated to the centre.
    """
    b, was_numpy = _as_tensor(boxes)
    half_l = b[:, 3:4] / 2
    half_w = b[:, 4:5] / 2
    local_x = torch.cat([half_l, -half_l, -half_l, half_l], dim=1)
    local_y = torch.cat([half_w, half_w, -half_w, -half_w], dim=1)
    cos, sin = torch.cos(b[:, 6:7]), torch.sin(b[:, 6:7])
    corner_x = b[:, 0:1] + local_x * cos - local_y * sin
    corner_y = b[:, 1:2] + local_x * sin + local_y * cos
    return _back(torch.stack([corner_x, corner_y], dim=-1), was_numpy)


def points_to_box_frame(points, boxes):
    """Express points in each box's local frame.

    Args:
        points: (P, >=3) points; only x, y, z are used.
        boxes: (M, 7) boxes.
    Returns:
        (M, P, 3) local coordinates: along heading, across heading, vertical,
        relative to the box centre.
    """
    p, was_numpy = _as_tensor(points)
    b, _ = _as_tensor(boxes)
    b = b.to(p.dtype) if p.is_floating_point() else b
    dx = p[None, :, 0] - b[:, None, 0]
    dy = p[None, :, 1] - b[:, None, 1]
    dz = p[None, :, 2] - b[:, None, 2]
    cos, sin = torch.cos(b[:, 6:7]), torch.sin(b[:, 6:7])
    local_x = dx * cos + dy * sin
    local_y = -dx * sin + dy * cos
    return _back(torch.stack([local_x, local_y, dz], dim=-1), was_numpy)


def points_in_boxes(points, boxes, margin: float = 0.0):
    """Which points lie inside which boxes (closed intervals).

    Args:
        points: (P, >=3) points.
        boxes: (M, 7) boxes.
        margin: metres added to every half-extent (enlarged boxes).
    Returns:
        (M, P) boolean mask.
    """
    p, was_numpy = _as_tensor(points)
    b, _ = _as_tensor(boxes)
    if b.numel() == 0 or p.numel() == 0:
        return _back(torch.zeros((b.shape[0], p.shape[0]), dtype=torch.bool), was_numpy)
    local = points_to_box_frame(p, b)
    half = b[:, None, 3:6].to(local.dtype) / 2 + margin
    inside = (local.abs() <= half).all(dim=-1)
    return _back(inside, was_numpy)


def count_points_in_boxes(points, boxes, margin: float = 0.0):
    """Number of points inside each box: (M,) int64."""
    inside = points_in_boxes(points, boxes, margin)
    if isinstance(inside, np.ndarray):
        return inside.sum(axis=1).astype(np.int64)
    return inside.sum(dim=1)



# ---------------------------------------------------------------------------------------
# Rotated IoU and NMS
# ---------------------------------------------------------------------------------------
#
# Intersection area of two rotated rectangles A and B by Green's theorem: the boundary of
# the convex polygon A ∩ B (traversed counter-clockwise) is made of the parts of A's edges
# that lie inside B and the parts of B's edges that lie inside A. Each edge P + t*d,
# t in [0, 1], is clipped to the other rectangle's four half-planes (Cyrus-Beck), giving
# [t0, t1], and contributes cross(P + t0 d, P + t1 d) / 2 = (t1 - t0) * cross(P, d) / 2
# to the area. Edges lying on the same line in the same direction are counted once
# (A's copy); on the same line in opposite directions the intersection is degenerate and
# neither counts. No sorting and no variable-length polygons, so everything is vectorised
# over box pairs, in float64, with coordinates relative to A's centre for accuracy.
#
# Only candidate pairs (overlapping axis-aligned BEV bounds, and in 3D overlapping vertical
# extents) are evaluated; the rest are 0. Work is chunked so memory stays bounded.

_PAIR_CHUNK = 4096  # box pairs per vectorised chunk (~40 kB of temporaries per 16 pairs)
_ROW_ELEMS = 2_000_000  # elements of the (rows, Nb) candidate matrices per row chunk


def _check_boxes(b: torch.Tensor, name: str) -> torch.Tensor:
    if b.dim() != 2 or b.shape[1] != BOX_DIM:
        from haltdet import InputError

        raise InputError(f"{name} must have shape (N, {BOX_DIM}), got {tuple(b.shape)}")
    return b


def _corner_rows(b: torch.Tensor, origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y, each (4, K), of the BEV corners of boxes b (K, 7) as `bev_corners` orders
    them, less `origin` (K, 2). Corner first, box last: the operations below then run
    along rows of K boxes (with (K, 4, 2) tensors every operation of the clipping loops
    over runs of 2 or 4 numbers, several times slower)."""
    half_l, half_w = b[:, 3] / 2, b[:, 4] / 2
    local_x = torch.stack([half_l, -half_l, -half_l, half_l])
    local_y = torch.stack([half_w, half_w, -half_w, -half_w])
    cos, sin = torch.cos(b[:, 6]), torch.sin(b[:, 6])
    x = b[:, 0] + local_x * cos - local_y * sin
    y = b[:, 1] + local_x * sin + local_y * cos
    return x - origin[:, 0], y - origin[:, 1]


def _clipped_edge_sum(px: torch.Tensor, py: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                      tol: torch.Tensor, second: bool) -> torch.Tensor:
    """Sum over the edges of polygon p of (t1 - t0) * cross(P, d) after clipping to polygon q.

    px, py, qx, qy: (4, K) counter-clockwise corners (`_corner_rows`); tol: (K,) length
    tolerance. second: True when p is B (same-direction collinear edges are then skipped).
    Tensors below are indexed [edge i of p, edge j of q, pair k].
    """
    dx, dy = torch.roll(px, -1, 0) - px, torch.roll(py, -1, 0) - py  # edges i of p
    ex, ey = torch.roll(qx, -1, 0) - qx, torch.roll(qy, -1, 0) - qy  # edges j of q; inside = left side
    ex_j, ey_j, dx_i, dy_i = ex[None], ey[None], dx[:, None], dy[:, None]
    # Point P_i + t d_i is inside half-plane j iff c + t n >= 0 (n, c: cross products).
    n = ex_j * dy_i - ey_j * dx_i
    c = ex_j * (py[:, None] - qy[None]) - ey_j * (px[:, None] - qx[None])
    e_len = torch.sqrt(ex * ex + ey * ey)[None]
    d_len = torch.sqrt(dx * dx + dy * dy)[:, None]
    parallel = n.abs() <= 1e-12 * e_len * d_len
    c_tol = tol * e_len
    ratio = -c / torch.where(parallel, torch.ones_like(n), n)
    inf = torch.full_like(ratio, math.inf)
    t0 = torch.where(~parallel & (n > 0), ratio, -inf).amax(dim=1).clamp(min=0)
    t1 = torch.where(~parallel & (n < 0), ratio, inf).amin(dim=1).clamp(max=1)
    collinear = parallel & (c.abs() <= c_tol)
    if not second:
        collinear = collinear & (ex_j * dx_i + ey_j * dy_i < 0)
    empty = (collinear | (parallel & (c < -c_tol))).any(dim=1)
    span = torch.where(empty, torch.zeros_like(t0), (t1 - t0).clamp(min=0))
    return (span * (px * dy - py * dx)).sum(dim=0)


def _paired_bev_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BEV intersection area of a[k] and b[k] for every k: (K, 7) x (K, 7) float64 -> (K,)."""
    origin = a[:, 0:2]
    ax, ay = _corner_rows(a, origin)
    bx, by = _corner_rows(b, origin)
    tol = 1e-9 * (1.0 + torch.maximum(a[:, 3:5].amax(dim=1), b[:, 3:5].amax(dim=1)))
    twice = _clipped_edge_sum(ax, ay, bx, by, tol, False) + _clipped_edge_sum(bx, by, ax, ay, tol, True)
    max_area = torch.minimum(a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]).clamp(min=0)
    return torch.minimum((0.5 * twice).clamp(min=0), max_area)


def _bev_half_extents(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) half extents of the axis-aligned BEV bounds of boxes."""
    cos, sin = torch.cos(b[:, 6]).abs(), torch.sin(b[:, 6]).abs()
    hl, hw = b[:, 3].clamp(min=0) / 2, b[:, 4].clamp(min=0) / 2
    return torch.stack([hl * cos + hw * sin, hl * sin + hw * cos], dim=1)


class _PairGeometry:
    """float64 per-box quantities for pairwise IoU between box sets a and b."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, three_d: bool):
        self.a, self.b, self.three_d = a, b, three_d
        self.ext_a, self.ext_b = _bev_half_extents(a), _bev_half_extents(b)
        self.area_a = (a[:, 3] * a[:, 4]).clamp(min=0)
        self.area_b = (b[:, 3] * b[:, 4]).clamp(min=0)
        if three_d:
            self.size_a = self.area_a * a[:, 5].clamp(min=0)
            self.size_b = self.area_b * b[:, 5].clamp(min=0)
            self.top_a, self.bot_a = a[:, 2] + a[:, 5] / 2, a[:, 2] - a[:, 5] / 2
            self.top_b, self.bot_b = b[:, 2] + b[:, 5] / 2, b[:, 2] - b[:, 5] / 2
        else:
            self.size_a, self.size_b = self.area_a, self.area_b

    def upper_bound(self, i: torch.Tensor | slice, j: torch.Tensor | slice, outer: bool) -> torch.Tensor:
        """Cheap upper bound of the IoU (0 where the exact IoU is certainly 0).

        The intersection lies inside the intersection of the axis-aligned bounds and is at
        most the smaller area; IoU is increasing in the intersection.
        """
        def pick(x, idx, axis_new):
            x = x[idx]
            return x.unsqueeze(axis_new) if outer else x

        ca, cb = pick(self.a[:, :2], i, 1), pick(self.b[:, :2], j, 0)
        ea, eb = pick(self.ext_a, i, 1), pick(self.ext_b, j, 0)
        overlap = (torch.minimum(ca + ea, cb + eb) - torch.maximum(ca - ea, cb - eb)).clamp(min=0)
        inter = torch.minimum(overlap.prod(dim=-1), torch.minimum(pick(self.area_a, i, 1), pick(self.area_b, j, 0)))
        if self.three_d:
            h = torch.minimum(pick(self.top_a, i, 1), pick(self.top_b, j, 0)) - torch.maximum(
                pick(self.bot_a, i, 1), pick(self.bot_b, j, 0)
            )
            inter = inter * h.clamp(min=0)
        union = pick(self.size_a, i, 1) + pick(self.size_b, j, 0) - inter
        return torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(inter))

    def exact(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Exact IoU of the pairs (a[i[k]], b[j[k]]), chunked."""
        out = torch.empty(i.shape[0], dtype=torch.float64, device=self.a.device)
        for k0 in range(0, i.shape[0], _PAIR_CHUNK):
            ii, jj = i[k0 : k0 + _PAIR_CHUNK], j[k0 : k0 + _PAIR_CHUNK]
            inter = _paired_bev_intersection(self.a[ii], self.b[jj])
            if self.three_d:
                h = torch.minimum(self.top_a[ii], self.top_b[jj]) - torch.maximum(self.bot_a[ii], self.bot_b[jj])
                inter = inter * h.clamp(min=0)
            union = self.size_a[ii] + self.size_b[jj] - inter
            iou = torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(inter))
            out[k0 : k0 + _PAIR_CHUNK] = iou.clamp(0.0, 1.0)
        return out

    def candidate_pairs(self, min_bound: float = 0.0, upper_only: bool = False):
        """Yield index pairs (i, j) whose IoU upper bound exceeds min_bound, row-chunked."""
        na, nb = self.a.shape[0], self.b.shape[0]
        rows = max(1, _ROW_ELEMS // max(nb, 1))
        for r0 in range(0, na, rows):
            r1 = min(na, r0 + rows)
            keep = self.upper_bound(slice(r0, r1), slice(None), outer=True) > min_bound
            if upper_only:
                keep &= torch.arange(r0, r1, device=keep.device)[:, None] < torch.arange(nb, device=keep.device)[None, :]
            ii, jj = torch.nonzero(keep, as_tuple=True)
            yield ii + r0, jj


def _pairwise_iou(boxes_a, boxes_b, three_d: bool):
    a, was_numpy = _as_tensor(boxes_a)
    b, _ = _as_tensor(boxes_b)
    _check_boxes(a, "boxes_a")
    _check_boxes(b, "boxes_b")
    out_dtype = a.dtype if a.is_floating_point() else torch.float32
    a64 = a.to(torch.float64)
    b64 = b.to(device=a.device, dtype=torch.float64)
    out = torch.zeros((a64.shape[0], b64.shape[0]), dtype=torch.float64, device=a.device)
    if out.numel() > 0:
        geo = _PairGeometry(a64, b64, three_d)
        for i, j in geo.candidate_pairs():
            out[i, j] = geo.exact(i, j)
    return _back(out.to(out_dtype), was_numpy)


def iou_bev(boxes_a, boxes_b):
    """Rotated bird's-eye-view IoU of every pair of boxes.

    Args:
        boxes_a: (Na, 7) boxes; boxes_b: (Nb, 7) boxes (numpy or torch, non-negative sizes).
    Returns:
        (Na, Nb) IoU of the rotated BEV rectangles, in [0, 1]; the same kind as
        ``boxes_a`` (dtype of ``boxes_a`` if floating, else float32). Computed in float64.
        Boxes of zero area have IoU 0 with everything (no NaN).
    """
    return _pairwise_iou(boxes_a, boxes_b, three_d=False)


def iou_3d(boxes_a, boxes_b):
    """3D IoU of every pair of upright boxes.

    intersection = rotated BEV intersection area * vertical overlap;
    IoU = intersection / (vol_a + vol_b - intersection).

    Args / returns as :func:`iou_bev`. Zero-volume boxes have IoU 0 with everything.
    """
    return _pairwise_iou(boxes_a, boxes_b, three_d=True)


def iou_3d_paired(boxes_a, boxes_b):
    """3D IoU of boxes_a[k] with boxes_b[k] for every k: (K, 7) x (K, 7) -> (K,), computed
    like :func:`iou_3d` (same kind and dtype rules)."""
    a, was_numpy = _as_tensor(boxes_a)
    b, _ = _as_tensor(boxes_b)
    _check_boxes(a, "boxes_a")
    _check_boxes(b, "boxes_b")
    if a.shape[0] != b.shape[0]:
        from haltdet import InputError

        raise InputError(f"paired IoU needs as many boxes in a as in b, got {a.shape[0]} and {b.shape[0]}")
    out_dtype = a.dtype if a.is_floating_point() else torch.float32
    geo = _PairGeometry(a.to(torch.float64), b.to(device=a.device, dtype=torch.float64), three_d=True)
    index = torch.arange(a.shape[0], device=a.device)
    return _back(geo.exact(index, index).to(out_dtype), was_numpy)


def nms_bev(boxes, scores, iou_threshold, max_output: int | None = None, labels=None) -> torch.Tensor:
    """Greedy non-maximum suppression with rotated BEV IoU.

    Boxes are visited by descending score (ties: lower index first); a box is kept unless
    its BEV IoU with an already kept box is strictly greater than ``iou_threshold``.
    With ``labels`` only boxes of the same label suppress each other, at that label's
    threshold: per label, the same result as a call on that label's boxes alone, in one
    pass (one set of tensor operations for all labels).
    IoUs are computed once, only for pairs whose cheap IoU upper bound exceeds the
    threshold (the others can never suppress each other) and, block by block, only for
    boxes not already suppressed.

    Args:
        boxes: (N, 7) tensor; scores: (N,) tensor.
        iou_threshold: suppression threshold; with ``labels``, a sequence of one per label.
        max_output: keep at most this many boxes (None: no limit).
        labels: None, or (N,) int64 labels in [0, len(iou_threshold)).
    Returns:
        int64 tensor of kept indices into ``boxes``, by descending score.
    """
    b = torch.as_tensor(boxes)
    s = torch.as_tensor(scores)
    _check_boxes(b, "boxes")
    if s.dim() != 1 or s.shape[0] != b.shape[0]:
        from haltdet import InputError

        raise InputError(f"scores must have shape ({b.shape[0]},), got {tuple(s.shape)}")
    n = b.shape[0]
    if n == 0 or (max_output is not None and max_output <= 0):
        return torch.zeros(0, dtype=torch.long, device=b.device)
    order = torch.sort(s, descending=True, stable=True).indices
    sorted_boxes = b[order].to(torch.float64)
    geo = _PairGeometry(sorted_boxes, sorted_boxes, three_d=False)
    if labels is None:
        sorted_labels, thresholds = None, torch.tensor([float(iou_threshold)], dtype=torch.float64, device=b.device)
        row_threshold = thresholds.expand(n)
    else:
        sorted_labels = torch.as_tensor(labels, device=b.device)[order]
        thresholds = torch.tensor([float(t) for t in iou_threshold], dtype=torch.float64, device=b.device)
        row_threshold = thresholds[sorted_labels]
    limit = n if max_output is None else int(max_output)
    # Bookkeeping in numpy and Python lists: the greedy pass visits boxes one by one, and a
    # tensor operation per box costs more than the whole IoU computation.
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    # Blocks of the sorted order: IoU rows are computed only for boxes not yet suppressed
    # when their block starts, and only against later boxes not yet suppressed. As few
    # blocks as the candidate matrices' size bound allows (a decoded frame's few hundred
    # boxes: one): each block costs a fixed few hundred tensor operations, more than the
    # IoUs its rows would skip.
    block = max(64, _ROW_ELEMS // n)
    arange = np.arange(n)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        rows = arange[r0:r1][~suppressed[r0:r1]]
        if rows.size == 0:
            continue
        cols = arange[r0 + 1:][~suppressed[r0 + 1:]]
        over: list[list[int]] = [[] for _ in rows]  # per row, the later boxes it suppresses
        if cols.size > 0:
            rows_t, cols_t = torch.from_numpy(rows).to(b.device), torch.from_numpy(cols).to(b.device)
            threshold = row_threshold[rows_t]
            candidate = (geo.upper_bound(rows_t, cols_t, outer=True) > threshold[:, None]) & (
                rows_t[:, None] < cols_t[None, :])
            if sorted_labels is not None:
                candidate &= sorted_labels[rows_t][:, None] == sorted_labels[cols_t][None, :]
            ri, ci = torch.nonzero(candidate, as_tuple=True)
            if ri.numel() > 0:
                hit = geo.exact(rows_t[ri], cols_t[ci]) > threshold[ri]
                for r, c in zip(ri[hit].tolist(), cols_t[ci[hit]].tolist()):
                    over[r].append(c)
        for r, k in enumerate(rows.tolist()):
            if suppressed[k]:
                continue
            keep.append(k)
            if len(keep) >= limit:
                break
            suppressed[over[r]] = True
        if len(keep) >= limit:
            break
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
