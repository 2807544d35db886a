"""How much of the BEV map the inference dense stage computes (`head.SparseMap`).

For each frame, the share of the map's cells in the support of each 3x3 convolution
(the occupied cells grown by one cell per convolution, plus the border ring the zero
padding reaches); above `head.SPARSE_SUPPORT_MAX` the dense convolution runs instead.
Frames: `haltdet bench`'s synthetic frames, and any point files given (read as `haltdet
detect` reads them, the ground found as it finds it). The first convolution is the
strided one from the tokens; the 3x3 convolutions follow it.

    python scripts/bev_support.py --frames 20
    python scripts/bev_support.py kitti/training/velodyne/000000.bin sweep.pcd.bin
"""

from __future__ import annotations

import argparse
import statistics

import torch

from haltdet.bench import bench_cloud, load_spec
from haltdet.model.head import grown_cells
from haltdet.model.pillars import PointBatch


def support_shares(model, points: torch.Tensor) -> list[float]:
    """Share of the map's cells each 3x3 convolution of the dense stage computes."""
    with torch.no_grad():
        tokens = model.pillar_net(PointBatch.from_list([points]))
    stride = model.bev.stride
    height, width = model.grid[0] // stride, model.grid[1] // stride
    cells = torch.unique(tokens.coords[:, 1] // stride * width + tokens.coords[:, 2] // stride).numpy()
    shares = []
    for _ in range(len(model.bev.net) // 3):  # the backbone's 3x3 convolutions, then the head's
        cells = grown_cells(cells, (1, height, width))
        shares.append(cells.size / (height * width))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="point files (formats of `haltdet detect`)")
    parser.add_argument("--checkpoint", default="baseline")
    parser.add_argument("--frames", type=int, default=20, help="haltdet bench frames (0: none)")
    parser.add_argument("--points", type=int, default=0, help="as `haltdet bench --points`")
    parser.add_argument("--sensor-height", default=None, help="as `haltdet detect --sensor-height`")
    args = parser.parse_args()
    from haltdet.data.frames import load_points_file, shift_to_ground

    model = load_spec(args.checkpoint, "cpu")
    rows = [(f"bench frame {i}", bench_cloud(10_000 + i, args.points)) for i in range(args.frames)]
    for path in args.files:
        points = shift_to_ground(load_points_file(path), args.sensor_height, path)
        rows.append((path, torch.from_numpy(points)))
    print(f"share of the {model.grid[0] // model.bev.stride} x {model.grid[1] // model.bev.stride} map's "
          "cells computed by each 3x3 convolution")
    table = []
    for name, points in rows:
        shares = support_shares(model, points)
        table.append(shares)
        print(f"{name:60s} " + " ".join(f"{s:6.3f}" for s in shares))
    if len(table) > 1:
        print(f"{'median':60s} " + " ".join(f"{statistics.median(c):6.3f}" for c in zip(*table)))


if __name__ == "__main__":
    main()
