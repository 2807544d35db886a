"""Raw point files as users hand them to `haltdet detect` / `demo --input`: formats told by
name and header (.pcd.bin, .bin, .pcd, .ply), plausibility of raw .bin readings (a wrong
column count or dtype is refused, not read as garbage), and intensity scaling to [0, 1]."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from haltdet import InputError
from haltdet.data.frames import DroppedPointsWarning, load_points_file
from haltdet.data.synth import simulate_frame

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real"
NUSCENES = REAL / "nuscenes" / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
KITTI = REAL / "kitti" / "training" / "velodyne"


def _fixture(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real-data fixture not found: {path}")
    return path


def _nuscenes_expected() -> np.ndarray:
    """The fixture as nuScenes stores it (float32 x 5), intensity / 255, ring dropped: (N, 4)."""
    raw = np.fromfile(_fixture(NUSCENES), dtype=np.float32).reshape(-1, 5)
    out = raw[:, :4].copy()
    out[:, 3] = np.clip(raw[:, 3].astype(np.float64) / 255.0, 0, 1)
    return out


def _synthetic(seed: int = 0, rows_multiple: int = 4) -> np.ndarray:
    """A synthetic sensor frame's (N, 4) float32 points, N a multiple of ``rows_multiple``."""
    points = simulate_frame(seed).points
    return points[: len(points) // rows_multiple * rows_multiple].copy()


# ----------------------------------------------------------------------------- nuScenes .pcd.bin


def test_nuscenes_pcd_bin_reads_five_columns_and_scales_intensity():
    points = load_points_file(_fixture(NUSCENES))
    assert points.shape == (34_688, 4) and points.dtype == np.float32
    assert points[:, 3].min() >= 0 and points[:, 3].max() == 1.0  # 0..255 -> [0, 1]
    np.testing.assert_array_equal(points, _nuscenes_expected())


def test_nuscenes_pcd_bin_read_as_four_columns_is_refused():
    with pytest.raises(InputError, match=r"LIDAR_TOP__1532402927647951\.pcd\.bin: read as float32 x 4") as err:
        load_points_file(_fixture(NUSCENES), columns=4)
    assert "intensities" in str(err.value) and "--columns 5" in str(err.value)


def test_real_kitti_frames_are_plausible():
    files = sorted(_fixture(KITTI).glob("*.bin"))
    assert files
    for path in files:
        points = load_points_file(path)
        assert points.shape == (path.stat().st_size // 16, 4)
        np.testing.assert_array_equal(points, np.fromfile(path, np.float32).reshape(-1, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_frames_are_plausible(tmp_path, seed):
    points = simulate_frame(seed).points
    points.tofile(tmp_path / "synth.bin")
    np.testing.assert_array_equal(load_points_file(tmp_path / "synth.bin"), points)


# ----------------------------------------------------------------------------- raw .bin misreads


def _five_columns() -> np.ndarray:
    """nuScenes-like rows: x, y, z, intensity 0..255, ring 0..31 (float32 x 5)."""
    points = _synthetic()
    ring = np.arange(len(points)) % 32
    return np.column_stack([points[:, :3], np.round(points[:, 3] * 255), ring]).astype(np.float32)


@pytest.mark.parametrize("layout", ["float32 x 5", "float32 x 3", "float64 x 4"])
def test_wrong_layout_whose_size_divides_by_16_is_refused(tmp_path, layout):
    dtype, columns = layout.split(" x ")
    columns = int(columns)
    if columns == 5:
        rows = _five_columns()
    else:
        rows = _synthetic()[:, :columns].astype(dtype)
    path = tmp_path / "cloud.bin"
    rows.tofile(path)
    assert path.stat().st_size % 16 == 0  # float32 x 4 divides it: the old reader took garbage
    with pytest.raises(InputError, match=r"cloud\.bin: read as float32 x 4 columns") as err:
        load_points_file(path)
    message = str(err.value)
    assert "--columns" in message and "\n" not in message
    if dtype == "float64":
        assert "float64" in message and "columns=4, dtype='float64'" in message
    else:
        assert f"pass --columns {columns}" in message
    points = load_points_file(path, columns=columns, dtype=dtype, intensity_scale=1)
    expected = np.zeros((len(rows), 4), np.float32)
    expected[:, : min(columns, 4)] = rows[:, :4]
    np.testing.assert_array_equal(points, expected)


def test_five_columns_named_pcd_bin_need_no_columns(tmp_path):
    rows = _five_columns()
    rows.tofile(tmp_path / "sweep.pcd.bin")
    points = load_points_file(tmp_path / "sweep.pcd.bin")
    np.testing.assert_array_equal(points[:, :3], rows[:, :3])
    np.testing.assert_allclose(points[:, 3], rows[:, 3] / 255, rtol=1e-6)


def test_random_bytes_are_refused_with_a_hint(tmp_path):
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 16 * 1000, np.uint8).tobytes())
    with pytest.raises(InputError, match=r"noise\.bin: read as float32 x 4 columns.*--columns N"):
        load_points_file(tmp_path / "noise.bin")


def test_size_mismatch_names_a_plausible_layout(tmp_path):
    rows = _five_columns()[:9]  # 180 bytes: not whole float32 x 4 rows
    rows.tofile(tmp_path / "odd.bin")
    with pytest.raises(InputError, match=r"odd\.bin: size 180 bytes.*truncated or wrong column count.*--columns 5"):
        load_points_file(tmp_path / "odd.bin")


def test_bad_dtype_is_refused(tmp_path):
    _synthetic().tofile(tmp_path / "a.bin")
    with pytest.raises(InputError, match=r"a\.bin: dtype must be one of float32, float64"):
        load_points_file(tmp_path / "a.bin", dtype="int32")


# ----------------------------------------------------------------------------- PCD


def _write_pcd(path: Path, fields: list[tuple[str, str, int]], columns: dict[str, np.ndarray], mode: str,
               height: int = 1) -> Path:
    """Write a PCD v0.7 file as PCL does: ``fields`` (name, TYPE+SIZE e.g. 'F4', COUNT), values in
    ``columns`` (name -> (N,) or (N, COUNT)), ``DATA ascii`` or ``binary``."""
    n = len(next(iter(columns.values())))
    header = ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7",
              "FIELDS " + " ".join(f[0] for f in fields),
              "SIZE " + " ".join(f[1][1:] for f in fields),
              "TYPE " + " ".join(f[1][0] for f in fields),
              "COUNT " + " ".join(str(f[2]) for f in fields),
              f"WIDTH {n // height}", f"HEIGHT {height}", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {n}", f"DATA {mode}"]
    codes = {"F": "f", "U": "u", "I": "i"}
    dtype = np.dtype([(f"c{i}", "<" + codes[t[0]] + t[1:], (c,) if c > 1 else ())
                      for i, (_, t, c) in enumerate(fields)])
    records = np.zeros(n, dtype)
    for i, (name, _, _) in enumerate(fields):
        records[f"c{i}"] = columns[name]
    text = "\n".join(header) + "\n"
    if mode == "binary":
        path.write_bytes(text.encode() + records.tobytes())
    else:
        lines = []
        for rec in records:
            values = []
            for i in range(len(fields)):
                values += [repr(v.item()) if isinstance(v, np.floating) else str(v) for v in np.atleast_1d(rec[i])]
            lines.append(" ".join(values))
        path.write_text(text + "\n".join(lines) + ("\n" if lines else ""))
    return path


def _cloud(n: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    points = simulate_frame(seed).points[:n]
    return {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "intensity": points[:, 3],
            "ring": (np.arange(n) % 32).astype(np.uint16), "t": np.linspace(0, 0.1, n),
            "normal": np.tile(np.float32([0, 0, 1]), (n, 1)), "_": np.zeros(n, np.uint8)}


PCD_LAYOUTS = {
    "xyzi": [("x", "F4", 1), ("y", "F4", 1), ("z", "F4", 1), ("intensity", "F4", 1)],
    "xyz": [("x", "F4", 1), ("y", "F4", 1), ("z", "F4", 1)],
    # extra fields before, between and after, padding, a COUNT 3 field, doubles, uint16
    "extras": [("ring", "U2", 1), ("x", "F8", 1), ("_", "U1", 1), ("y", "F4", 1), ("normal", "F4", 3),
               ("z", "F4", 1), ("intensity", "F4", 1), ("t", "F8", 1)],
}


@pytest.mark.parametrize("mode", ["ascii", "binary"])
@pytest.mark.parametrize("layout", sorted(PCD_LAYOUTS))
def test_pcd_reads_back_exactly(tmp_path, mode, layout):
    cloud = _cloud()
    path = _write_pcd(tmp_path / "cloud.pcd", PCD_LAYOUTS[layout], cloud, mode)
    points = load_points_file(path)
    assert points.shape == (200, 4) and points.dtype == np.float32
    expected = np.column_stack([cloud["x"], cloud["y"], cloud["z"],
                                cloud["intensity"] if layout != "xyz" else np.zeros(200)]).astype(np.float32)
    np.testing.assert_array_equal(points, expected)


def test_pcd_integer_intensity_is_scaled_and_organized_nan_rows_dropped(tmp_path):
    cloud = _cloud(n=60)
    cloud["intensity"] = np.arange(60, dtype=np.uint8) * 4  # 0..236, an 8-bit sensor
    cloud["x"] = cloud["x"].copy()
    cloud["x"][:6] = np.nan  # an organized cloud: no return -> NaN
    fields = [("x", "F4", 1), ("y", "F4", 1), ("z", "F4", 1), ("intensity", "U1", 1)]
    path = _write_pcd(tmp_path / "organized.pcd", fields, cloud, "binary", height=6)
    with pytest.warns(DroppedPointsWarning, match="dropped 6 points"):
        points = load_points_file(path)
    assert points.shape == (54, 4)
    np.testing.assert_allclose(points[:, 3], np.arange(6, 60) * 4 / 255, rtol=1e-6)


def test_pcd_empty_cloud(tmp_path):
    cloud = {k: v[:0] for k, v in _cloud().items()}
    for mode in ("ascii", "binary"):
        path = _write_pcd(tmp_path / f"empty_{mode}.pcd", PCD_LAYOUTS["xyzi"], cloud, mode)
        assert load_points_file(path).shape == (0, 4)


def _pcd_text(**replace) -> str:
    lines = {"FIELDS": "x y z", "SIZE": "4 4 4", "TYPE": "F F F", "COUNT": "1 1 1", "WIDTH": "2", "HEIGHT": "1",
             "POINTS": "2", "DATA": "ascii"}
    lines.update(replace)
    return "VERSION 0.7\n" + "".join(f"{k} {v}\n" for k, v in lines.items()) + "1 2 3\n4 5 6\n"


@pytest.mark.parametrize("replace, message", [
    (dict(DATA="binary_compressed"), "binary_compressed is not supported"),
    (dict(DATA="zip"), "DATA 'zip' is not supported"),
    (dict(FIELDS="a y z"), "PCD FIELDS has no x"),
    (dict(POINTS="3"), "POINTS 3 differs from WIDTH x HEIGHT"),
    (dict(WIDTH="3", POINTS="3"), "2 lines for 3 points"),
    (dict(SIZE="4 4 3"), "TYPE F SIZE 3"),
    (dict(TYPE="F F Q"), "TYPE Q"),
    (dict(SIZE="4 4"), "one entry per field"),
    (dict(WIDTH="two"), "WIDTH needs a whole number"),
])
def test_bad_pcd_headers_are_input_errors(tmp_path, replace, message):
    path = tmp_path / "bad.pcd"
    path.write_text(_pcd_text(**replace))
    with pytest.raises(InputError, match=message) as err:
        load_points_file(path)
    assert "bad.pcd" in str(err.value)


def test_truncated_binary_pcd_and_garbage_are_input_errors(tmp_path):
    path = _write_pcd(tmp_path / "cut.pcd", PCD_LAYOUTS["xyzi"], _cloud(), "binary")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError, match=r"cut\.pcd: truncated: DATA binary needs 3200 bytes"):
        load_points_file(path)
    (tmp_path / "junk.pcd").write_bytes(b"\xff\x00" * 100)
    with pytest.raises(InputError, match=r"junk\.pcd: not a PCD file"):
        load_points_file(tmp_path / "junk.pcd")
    (tmp_path / "nodata.pcd").write_text("VERSION 0.7\nFIELDS x y z\n")
    with pytest.raises(InputError, match=r"nodata\.pcd: .*no DATA line"):
        load_points_file(tmp_path / "nodata.pcd")


# ----------------------------------------------------------------------------- PLY


def _write_ply(path: Path, fmt: str, cloud: dict, props: list[tuple[str, str]], before: int = 0,
               faces: bool = False) -> Path:
    """A PLY file: ``before`` instances of a fixed-size 'camera' element, the vertices
    (``props``: (PLY type, name)), then a face element with a list property if ``faces``."""
    n = len(cloud["x"])
    header = ["ply", f"format {fmt} 1.0", "comment written by the haltdet tests"]
    if before:
        header += [f"element camera {before}", "property float view_px", "property uchar flag"]
    header += [f"element vertex {n}"] + [f"property {t} {name}" for t, name in props]
    if faces:
        header += ["element face 1", "property list uchar int vertex_indices"]
    header.append("end_header")
    codes = {"float": "f4", "double": "f8", "uchar": "u1", "ushort": "u2", "int": "i4"}
    if fmt == "ascii":
        body = "".join("0.5 1\n" for _ in range(before))
        body += "".join(" ".join(repr(cloud[name][i].item()) for _, name in props) + "\n" for i in range(n))
        body += "3 0 1 2\n" if faces else ""
        path.write_text("\n".join(header) + "\n" + body)
        return path
    order = "<" if fmt == "binary_little_endian" else ">"
    camera = np.zeros(before, np.dtype([("v", order + "f4"), ("f", "u1")]))
    vertex = np.zeros(n, np.dtype([(name, order + codes[t]) for t, name in props]))
    for _, name in props:
        vertex[name] = cloud[name]
    face = (np.uint8(3).tobytes() + np.array([0, 1, 2], order + "i4").tobytes()) if faces else b""
    path.write_bytes(("\n".join(header) + "\n").encode() + camera.tobytes() + vertex.tobytes() + face)
    return path


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
@pytest.mark.parametrize("with_intensity", [True, False])
def test_ply_reads_back_exactly(tmp_path, fmt, with_intensity):
    cloud = _cloud(n=50)
    props = [("double", "x"), ("float", "y"), ("float", "z"), ("ushort", "ring")]
    props += [("float", "intensity")] if with_intensity else []
    path = _write_ply(tmp_path / "cloud.ply", fmt, cloud, props, before=2, faces=True)
    expected = np.column_stack([cloud["x"], cloud["y"], cloud["z"],
                                cloud["intensity"] if with_intensity else np.zeros(50)]).astype(np.float32)
    np.testing.assert_array_equal(load_points_file(path), expected)


def test_bad_ply_files_are_input_errors(tmp_path):
    cloud = _cloud(n=5)
    path = _write_ply(tmp_path / "noz.ply", "ascii", cloud, [("float", "x"), ("float", "y")])
    with pytest.raises(InputError, match=r"noz\.ply: PLY vertex element has no z"):
        load_points_file(path)
    path = _write_ply(tmp_path / "cut.ply", "binary_little_endian", cloud, [("float", a) for a in "xyz"])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputError, match=r"cut\.ply: truncated"):
        load_points_file(path)
    (tmp_path / "mesh.ply").write_text("ply\nformat ascii 1.0\nelement face 1\nproperty list uchar int v\n"
                                       "end_header\n3 0 1 2\n")
    with pytest.raises(InputError, match=r"mesh\.ply: PLY file has no vertex element"):
        load_points_file(tmp_path / "mesh.ply")
    (tmp_path / "other.ply").write_text("solid cube\n")
    with pytest.raises(InputError, match=r"other\.ply: not a PLY file"):
        load_points_file(tmp_path / "other.ply")


# ----------------------------------------------------------------------------- intensity scaling


def _npy(tmp_path, intensity, name="cloud.npy") -> Path:
    points = np.zeros((len(intensity), 4), np.float32)
    points[:, 0] = np.arange(len(intensity))
    points[:, 3] = intensity
    np.save(tmp_path / name, points)
    return tmp_path / name


def test_automatic_intensity_scaling(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="haltdet.data.frames"):
        points = load_points_file(_npy(tmp_path, [0, 51, 255]))
    np.testing.assert_allclose(points[:, 3], [0, 0.2, 1], rtol=1e-6)
    assert "divided by 255" in caplog.text and "cloud.npy" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="haltdet.data.frames"):
        points = load_points_file(_npy(tmp_path, [0, 0.5, 1], "unit.npy"))
    np.testing.assert_array_equal(points[:, 3], [0, 0.5, 1])  # already [0, 1]: untouched
    assert "divided" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="haltdet.data.frames"):
        points = load_points_file(_npy(tmp_path, [0, 255, 1000], "wide.npy"))
    np.testing.assert_allclose(points[:, 3], [0, 1, 1])
    assert "1 intensities above 255" in caplog.text


def test_explicit_intensity_scale(tmp_path):
    path = _npy(tmp_path, [0, 50, 100, 4000])
    np.testing.assert_allclose(load_points_file(path, intensity_scale=100)[:, 3], [0, 0.5, 1, 40])
    np.testing.assert_array_equal(load_points_file(path, intensity_scale=1)[:, 3], [0, 50, 100, 4000])
    np.testing.assert_allclose(load_points_file(path, intensity_scale=4000.0)[:, 3], [0, 0.0125, 0.025, 1])


@pytest.mark.parametrize("scale", [0, -255, float("nan"), float("inf"), "255", True])
def test_bad_intensity_scale_is_refused(tmp_path, scale):
    with pytest.raises(InputError, match=r"cloud\.npy: intensity_scale \(--intensity-scale\) must be"):
        load_points_file(_npy(tmp_path, [0, 1]), intensity_scale=scale)


def test_intensity_scale_that_overflows_is_refused(tmp_path):
    with pytest.raises(InputError, match="overflow"):
        load_points_file(_npy(tmp_path, [0, 3e38]), intensity_scale=1e-3)


# ----------------------------------------------------------------------------- command line


def test_detect_reads_the_nuscenes_fixture(tmp_path, capsys):
    from haltdet.checkpoint import load_model
    from haltdet.cli import main
    from haltdet.predict import detect_points

    out = tmp_path / "det.json"
    assert main(["detect", "--checkpoint", "baseline", str(_fixture(NUSCENES)), "--json", str(out)]) == 0
    frame = json.loads(out.read_text())["frames"][0]
    assert frame["frame_id"] == NUSCENES.name[: -len(".pcd.bin")]
    model, _ = load_model("baseline")
    expected = detect_points(model, _nuscenes_expected())
    assert frame["scores"] == [round(s, 4) for s in expected.scores.tolist()]
    assert frame["boxes"] == [[round(v, 4) for v in box] for box in expected.boxes.tolist()]
    # A wrong --columns is a one-line error naming the file and the right count.
    assert main(["detect", "--checkpoint", "baseline", str(NUSCENES), "--columns", "4"]) == 2
    err = capsys.readouterr().err
    assert NUSCENES.name in err and "--columns 5" in err and len(err.strip().splitlines()) == 1
    assert main(["detect", "--checkpoint", "baseline", str(NUSCENES), "--intensity-scale", "0"]) == 2
    assert "--intensity-scale" in capsys.readouterr().err


def test_demo_input_takes_columns_and_intensity_scale(tmp_path, capsys):
    from haltdet.cli import main

    rows = _five_columns()
    rows.tofile(tmp_path / "five.bin")
    picture = tmp_path / "demo.png"
    argv = ["demo", "--checkpoint", "baseline", "--input", str(tmp_path / "five.bin"), "--out", str(picture)]
    assert main(argv) == 2  # read as float32 x 4: refused
    assert "--columns 5" in capsys.readouterr().err
    assert main(argv + ["--columns", "5", "--intensity-scale", "255"]) == 0
    assert f"{len(rows)} points" in capsys.readouterr().out and picture.is_file()
