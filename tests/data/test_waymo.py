"""Waymo readers: TFRecord framing + CRC-32C, wire decoding, range images, v1 and v2 sources."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from haltdet import CLASSES, InputError
from haltdet.data.formats import tfrecord, waymo_v1
from haltdet.data.formats.protowire import Message
from haltdet.data.formats.waymo_v1 import euler_to_rotation, range_image_to_points, row_inclinations
from haltdet.data.frames import GROUND_Z, read_frame, write_frame

# The vehicle frame's z in the project frame (the road 0.2 m below its origin, at GROUND_Z).
LIFT = GROUND_Z + waymo_v1.GROUND_BELOW_ORIGIN

WAYMO_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/real/waymo"
PVPS = "pvps_data_one_frame.tfrecord"
VAL = "val.tfrecord"


def fixture(name: str) -> Path:
    path = WAYMO_DIR / name
    if not path.is_file():
        pytest.skip(f"Waymo fixture {path} not available")
    return path


# ----------------------------------------------------------------------------- CRC-32C


def test_crc32c_known_vectors():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
    assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
    assert tfrecord.crc32c(b"") == 0


@pytest.mark.parametrize("size", [4095, 4096, 4097, 65536, 100_003, 1 << 20])
def test_crc32c_vectorised_matches_bytewise(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert tfrecord.crc32c(data) == tfrecord._crc_short(data) ^ 0xFFFFFFFF


@pytest.mark.parametrize("size", [0, 31, 4097, 1 << 20])
def test_crc32c_library_matches_ours(size):
    """Where google-crc32c is installed, checksums use it: it gives the same values."""
    google_crc32c = pytest.importorskip("google_crc32c")
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert google_crc32c.value(data) == tfrecord.crc32c(data)
    assert tfrecord._crc32c_fast is google_crc32c.value


# ----------------------------------------------------------------------------- TFRecord framing


@pytest.mark.parametrize("name", [PVPS, VAL])
def test_tfrecord_reads_fixtures(name):
    path = fixture(name)
    records = list(tfrecord.iter_records(path))
    assert [off for off, _ in records] == [0]
    assert len(records[0][1]) + 16 == path.stat().st_size


def _flip(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def _read_all(path: Path) -> None:
    list(tfrecord.iter_records(path))


def _open_and_read(path: Path) -> None:
    source = waymo_v1.open_source(path)
    for fid in source.frame_ids():
        source.read(fid)


@pytest.mark.parametrize("name", [PVPS, VAL])
@pytest.mark.parametrize("where", ["payload", "length", "payload_crc"])
@pytest.mark.parametrize("reader", [_read_all, _open_and_read])
def test_tfrecord_rejects_flipped_byte(tmp_path, name, where, reader):
    src = fixture(name)
    size = src.stat().st_size
    offset = {"payload": 12 + (size - 16) // 2, "length": 2, "payload_crc": size - 2}[where]
    bad = _flip(src, tmp_path / name, offset)
    with pytest.raises(InputError, match="checksum mismatch") as err:
        reader(bad)
    assert str(bad) in str(err.value) and "record at byte 0" in str(err.value)


def test_tfrecord_offset_of_second_record(tmp_path):
    first, second = fixture(VAL), fixture(PVPS)
    joined = tmp_path / "joined.tfrecord"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    offsets = [off for off, _ in tfrecord.iter_records(joined)]
    assert offsets == [0, first.stat().st_size]
    source = waymo_v1.open_source(joined)
    assert len(source.frame_ids()) == 2
    bad = _flip(joined, tmp_path / "bad.tfrecord", first.stat().st_size + 5000)
    with pytest.raises(InputError, match=f"record at byte {first.stat().st_size}: payload checksum"):
        _read_all(bad)


@pytest.mark.parametrize("cut", [-1, -4, -100, 13, 6])
def test_tfrecord_rejects_truncated(tmp_path, cut):
    src = fixture(VAL)
    data = src.read_bytes()
    bad = tmp_path / "cut.tfrecord"
    bad.write_bytes(data[:cut])
    with pytest.raises(InputError, match="truncated") as err:
        _read_all(bad)
    assert str(bad) in str(err.value) and "record at byte 0" in str(err.value)
    with pytest.raises(InputError, match="truncated"):
        waymo_v1.open_source(bad)


def test_tfrecord_write_read_roundtrip(tmp_path):
    payloads = [b"", b"x", bytes(range(256)) * 40]
    path = tmp_path / "r.tfrecord"
    tfrecord.write_records(path, payloads)
    assert [p for _, p in tfrecord.iter_records(path)] == payloads
    assert list(tfrecord.iter_records(_empty(tmp_path))) == []


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.tfrecord"
    path.write_bytes(b"")
    return path


# ----------------------------------------------------------------------------- labels of the fixtures


def _uvarint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _walk(buf: bytes):
    """Test-side generic walker over one message level: (field, wire type, value)."""
    i = 0
    while i < len(buf):
        key, i = _uvarint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _uvarint(buf, i)
        elif wire == 2:
            n, i = _uvarint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        yield field, wire, value


def _types_by_walking(payload: bytes) -> Counter:
    labels = [v for f, w, v in _walk(payload) if f == 6 and w == 2]
    return Counter(next(v for f, w, v in _walk(label) if f == 3 and w == 0) for label in labels)


def _types_from_stats(payload: bytes) -> Counter:
    """Waymo's own per-segment object counts (Context.stats.laser_object_counts)."""
    context = next(v for f, _, v in _walk(payload) if f == 1)
    stats = next(v for f, _, v in _walk(context) if f == 4)
    counts = Counter()
    for f, _, obj in _walk(stats):
        if f == 1:
            fields = dict((ff, vv) for ff, _, vv in _walk(obj))
            counts[fields[1]] = fields[2]
    return counts


def _types_with_protobuf(payload: bytes) -> Counter:
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="waymo_subset_test.proto", package="subset", syntax="proto2")
    label = fdp.message_type.add(name="Label")
    label.field.add(name="type", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    frame = fdp.message_type.add(name="Frame")
    frame.field.add(name="laser_labels", number=6, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED, type_name=".subset.Label")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("subset.Frame"))
    return Counter(lab.type for lab in cls.FromString(payload).laser_labels)


@pytest.mark.parametrize("name, total", [(PVPS, 75), (VAL, 18)])
def test_fixture_labels(name, total):
    path = fixture(name)
    source = waymo_v1.open_source(path)
    (fid,) = source.frame_ids()
    labels = source.read_labels(fid)
    names = {0: "UNKNOWN", 1: "VEHICLE", 2: "PEDESTRIAN", 3: "SIGN", 4: "CYCLIST"}
    counts = Counter(labels.types.tolist())
    print(name, {names[t]: n for t, n in sorted(counts.items())})
    assert sum(counts.values()) == total == len(labels.ids)
    payload = path.read_bytes()[12:-4]
    assert counts == _types_by_walking(payload) == _types_from_stats(payload)
    if name == PVPS:
        assert counts == {1: 37, 2: 12, 3: 25, 4: 1}
    assert (labels.boxes[:, 3:6] > 0).all() and np.isfinite(labels.boxes).all()
    assert (np.abs(labels.boxes[:, 6]) <= np.pi).all()


def test_fixture_labels_match_protobuf():
    payload = fixture(PVPS).read_bytes()[12:-4]
    source = waymo_v1.open_source(fixture(PVPS))
    ours = Counter(source.read_labels(source.frame_ids()[0]).types.tolist())
    assert ours == _types_with_protobuf(payload)


def test_fixture_frames(tmp_path):
    source = waymo_v1.open_source(fixture(PVPS))
    (fid,) = source.frame_ids()
    assert fid == "1024360143612057520_3580_000_3600_000_1553735853462203"
    frame = source.read(fid)
    # The pvps fixture has empty range images: no points, but every box comes back.
    assert frame.points.shape == (0, 4)
    counts = Counter(CLASSES[i] for i in frame.labels.tolist())
    print("pvps frame classes:", dict(counts))
    assert counts == {"Vehicle": 37, "Pedestrian": 12, "Cyclist": 1}
    assert frame.num_points.min() >= 0 and set(frame.difficulty.tolist()) <= {0, 1, 2}
    raw = source.read_labels(fid)
    kept = np.isin(raw.types, [1, 2, 4])
    np.testing.assert_allclose(frame.boxes, raw.boxes[kept] + [0, 0, LIFT, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_array_equal(frame.num_points, raw.num_points[kept])
    back = read_frame(write_frame(tmp_path, frame))  # passes the frame-file validation
    assert back.boxes.shape == (50, 7)
    # a directory of files lists every frame
    both = waymo_v1.open_source(fixture(VAL).parent)
    assert len(both.frame_ids()) >= 2
    val = both.read("1071392229495085036_1844_790_1864_790_1507315488219118")
    assert val.labels.tolist() == [0]


# ----------------------------------------------------------------------------- range images


def test_range_image_hand_computed():
    r = 10.0
    h = r / np.sqrt(2)
    image = np.full((1, 4), r)
    pts = range_image_to_points(image, [0.0], np.eye(4))
    # column 0 looks backwards-left (azimuth 3pi/4), azimuth decreasing with the column
    np.testing.assert_allclose(pts, [[-h, h, 0], [h, h, 0], [h, -h, 0], [-h, -h, 0]], atol=1e-9)
    # a sensor yawed by 90 deg and shifted: the same vehicle-frame directions, plus the shift
    ext = np.eye(4)
    ext[:3, :3] = euler_to_rotation(0.0, 0.0, np.pi / 2)
    ext[:3, 3] = [1.0, 2.0, 3.0]
    image = np.array([[r, 0.0, r, -1.0]])
    pts = range_image_to_points(image, [0.5], ext)
    flat = r * np.cos(0.5) / np.sqrt(2)
    expect = np.array([[-flat, flat, r * np.sin(0.5)], [flat, -flat, r * np.sin(0.5)]]) + [1.0, 2.0, 3.0]
    np.testing.assert_allclose(pts, expect, atol=1e-9)


def test_row_inclinations_order():
    np.testing.assert_allclose(row_inclinations(4, lo=-0.4, hi=0.4), [0.3, 0.1, -0.1, -0.3])
    np.testing.assert_allclose(row_inclinations(3, [-0.2, 0.0, 0.1]), [0.1, 0.0, -0.2])
    with pytest.raises(InputError):
        row_inclinations(3, [0.0, 0.1])
    with pytest.raises(InputError):
        row_inclinations(3)


def test_euler_to_rotation_axes():
    a = 0.3
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_allclose(euler_to_rotation(a, 0, 0), rx, atol=1e-12)
    np.testing.assert_allclose(euler_to_rotation(0, a, 0), ry, atol=1e-12)
    np.testing.assert_allclose(euler_to_rotation(0, 0, a), rz, atol=1e-12)
    np.testing.assert_allclose(euler_to_rotation(a, a, a), rz @ ry @ rx, atol=1e-12)  # yaw, then pitch, then roll


def _pose6_to_matrix(p: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = euler_to_rotation(*p[:3])
    m[:3, 3] = p[3:]
    return m


def _scene(height: int, width: int, inclinations: np.ndarray, extrinsic: np.ndarray, moving: bool, seed: int):
    """A range image of known surfaces (a sphere and the ground, fixed in the world).

    Returns (range image (H, W, 4) float32, pixel pose (H, W, 6) float32 or None, frame
    pose (4, 4), expected (N, 3) vehicle-frame points of the non-empty pixels).
    """
    rng = np.random.default_rng(seed)
    frame6 = np.array([0.01, -0.02, 0.5, 1000.0, -2000.0, 30.0], np.float32).astype(np.float64)
    frame_pose = _pose6_to_matrix(frame6)
    # per column: the vehicle drives 15 m/s forward turning at 0.3 rad/s during a 0.1 s sweep
    t = np.linspace(-0.05, 0.05, width) if moving else np.zeros(width)
    pose6 = np.repeat(frame6[None], width, axis=0)
    pose6[:, 2] += 0.3 * t
    pose6[:, 3:] += (frame_pose[:3, :3] @ np.stack([15.0 * t, 0 * t, 0 * t]))[:3].T
    pose6 = np.broadcast_to(pose6, (height, width, 6)).astype(np.float32)
    world_from_pixel = np.stack([[_pose6_to_matrix(p.astype(np.float64)) for p in row] for row in pose6])
    azimuth = np.pi * (1 - (2 * np.arange(width) + 1) / width) - np.arctan2(extrinsic[1, 0], extrinsic[0, 0])
    inc = np.asarray(inclinations)[:, None]
    direction = np.stack(np.broadcast_arrays(np.cos(inc) * np.cos(azimuth), np.cos(inc) * np.sin(azimuth),
                                             np.sin(inc)), axis=-1)  # (H, W, 3) sensor frame
    world_from_sensor = world_from_pixel @ extrinsic
    origin = world_from_sensor[..., :3, 3]
    d = np.einsum("hwij,hwj->hwi", world_from_sensor[..., :3, :3], direction)
    centre, radius = frame_pose[:3, 3], 25.0
    b = np.einsum("hwi,hwi->hw", d, origin - centre)
    s_sphere = -b + np.sqrt(b**2 - (np.sum((origin - centre) ** 2, axis=-1) - radius**2))
    ground = centre[2] - 1.2
    with np.errstate(divide="ignore"):
        s_ground = np.where(d[..., 2] < 0, (ground - origin[..., 2]) / d[..., 2], np.inf)
    rng_m = np.minimum(s_sphere, s_ground)
    rng_m[rng.random(rng_m.shape) < 0.1] = 0.0  # empty pixels
    image = np.stack([rng_m, rng.uniform(0, 3, rng_m.shape), rng.uniform(0, 1, rng_m.shape),
                      rng.integers(0, 2, rng_m.shape)], axis=-1).astype(np.float32)
    valid = image[..., 0] > 0
    world = origin + d * image[..., 0:1].astype(np.float64)
    expected = (world[valid] - frame_pose[:3, 3]) @ frame_pose[:3, :3]
    return image, (pose6 if moving else None), frame_pose, expected


def _extrinsic(roll, pitch, yaw, xyz) -> np.ndarray:
    return _pose6_to_matrix(np.array([roll, pitch, yaw, *xyz]))


TOP_EXTRINSIC = _extrinsic(0.02, -0.03, 0.7, (1.2, -0.3, 1.8))
FRONT_EXTRINSIC = _extrinsic(-0.01, 0.2, -0.1, (4.0, 0.1, 0.7))
TOP_INCL_ASC = np.sort(np.random.default_rng(7).uniform(-0.3, 0.05, 16))  # calibration order (ascending)
FRONT_LO, FRONT_HI = -1.2, 0.5
FRONT_ROWS = FRONT_LO + (np.arange(8)[::-1] + 0.5) / 8 * (FRONT_HI - FRONT_LO)  # row 0 highest


@pytest.mark.parametrize("moving", [False, True])
def test_range_image_recovers_known_geometry(moving):
    rows = TOP_INCL_ASC[::-1]
    image, pixel_pose, frame_pose, expected = _scene(16, 64, rows, TOP_EXTRINSIC, moving, seed=1)
    pts = range_image_to_points(image, rows, TOP_EXTRINSIC, pixel_pose, frame_pose)
    err_mm = 1000 * np.abs(pts[:, :3] - expected).max()
    print(f"range image -> points, moving={moving}: max error {err_mm:.6f} mm over {len(pts)} points")
    assert err_mm < 1.0
    valid = image[..., 0] > 0
    np.testing.assert_array_equal(pts[:, 3:], image[valid][:, 1:])
    if moving:  # the per-pixel pose matters: ignoring it is off by metres
        still = range_image_to_points(image, rows, TOP_EXTRINSIC)
        assert np.abs(still[:, :3] - expected).max() > 0.5
        with pytest.raises(InputError, match="frame pose"):
            range_image_to_points(image, rows, TOP_EXTRINSIC, pixel_pose)


# ----------------------------------------------------------------------------- synthetic v1 frames


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _dbl(field: int, value: float) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<d", value)


def _doubles(field: int, values) -> bytes:
    return _len(field, np.asarray(values, "<f8").tobytes())


def _matrix(array: np.ndarray) -> bytes:
    """zlib(MatrixFloat): packed data, unpacked shape dims."""
    shape = _len(2, b"".join(_int(1, d) for d in array.shape))
    return zlib.compress(_len(1, np.asarray(array, "<f4").tobytes()) + shape)


def _label(box, kind: int, num_points: int | None = None, level: int | None = None) -> bytes:
    x, y, z, length, width, height, heading = box
    box_msg = b"".join(_dbl(f, v) for f, v in zip((1, 2, 3, 5, 4, 6, 7), (x, y, z, length, width, height, heading)))
    out = _len(1, box_msg) + _int(3, kind) + _len(4, b"obj")
    out += _int(5, level) if level is not None else b""
    return out + (_int(7, num_points) if num_points is not None else b"")


EYE = _len(5, _doubles(1, np.eye(4).ravel()))
UNIFORM = _dbl(3, -0.3) + _dbl(4, 0.1)


def _one_laser(calibration: bytes, compressed_range_image: bytes) -> bytes:
    """A Frame with one TOP lidar: its calibration fields and its compressed range image."""
    return _len(1, _len(3, _int(1, 1) + calibration)) + _len(5, _int(1, 1) + _len(2, _len(2, compressed_range_image)))


def _synthetic_frame():
    """A serialized Frame with a moving TOP lidar and a FRONT lidar, plus its expectations."""
    top, top_pose, frame_pose, top_xyz = _scene(16, 64, TOP_INCL_ASC[::-1], TOP_EXTRINSIC, True, seed=2)
    front, _, _, front_xyz = _scene(8, 32, FRONT_ROWS, FRONT_EXTRINSIC, False, seed=3)
    front2, _, _, front2_xyz = _scene(8, 32, FRONT_ROWS, FRONT_EXTRINSIC, False, seed=4)
    calib_top = (_int(1, 1) + _doubles(2, TOP_INCL_ASC) + _dbl(3, -0.3) + _dbl(4, 0.05)
                 + _len(5, _doubles(1, TOP_EXTRINSIC.ravel())))
    calib_front = _int(1, 2) + _dbl(3, FRONT_LO) + _dbl(4, FRONT_HI) + _len(5, _doubles(1, FRONT_EXTRINSIC.ravel()))
    context = _len(1, b"synthetic_segment") + _len(3, calib_front) + _len(3, calib_top)
    laser_top = _int(1, 1) + _len(2, _len(2, _matrix(top)) + _len(4, _matrix(top_pose)))
    laser_front = _int(1, 2) + _len(2, _len(2, _matrix(front))) + _len(3, _len(2, _matrix(front2)))
    xyz = np.concatenate([top_xyz, front_xyz])
    intensity = np.tanh(np.concatenate([top[top[..., 0] > 0][:, 1], front[front[..., 0] > 0][:, 1]]))
    ped_box = [*xyz[0], 3.0, 3.0, 3.0, 0.3]
    labels = [
        _label([10.0, 1.0, 0.5, 4.5, 2.0, 1.6, 3.0], 1, num_points=10, level=2),
        _label(ped_box, 2),  # no point count: recounted from the points
        _label([3.0, -4.0, 1.0, 0.5, 0.5, 2.0, 0.0], 3, num_points=40),  # sign: dropped
        _label([-8.0, 2.0, 0.8, 1.8, 0.6, 1.7, -1.0], 4, num_points=0),
    ]
    payload = (_len(1, context) + _int(2, 1_600_000_000_123_456) + _len(3, _doubles(1, frame_pose.ravel()))
               + _len(5, laser_top) + _len(5, laser_front) + b"".join(_len(6, lab) for lab in labels))
    return payload, xyz, intensity, np.array(ped_box), front2_xyz


def test_v1_synthetic_frame_end_to_end(tmp_path):
    payload, xyz, intensity, ped_box, second_xyz = _synthetic_frame()
    path = tmp_path / "segment.tfrecord"
    tfrecord.write_records(path, [payload, payload])
    source = waymo_v1.open_source(path)
    ids = source.frame_ids()
    assert ids[0] == "synthetic_segment_1600000000123456" and len(ids) == 2 and ids[1] != ids[0]
    frame = source.read(ids[0])
    err_mm = 1000 * np.abs(frame.points[:, :3] - (xyz + [0, 0, LIFT])).max()
    print(f"v1 synthetic frame: {len(xyz)} points, max error {err_mm:.6f} mm")
    assert frame.points.shape == (len(xyz), 4) and err_mm < 1.0
    np.testing.assert_allclose(frame.points[:, 3], intensity, atol=1e-6)
    assert frame.labels.tolist() == [0, 1, 2]  # the sign is dropped
    np.testing.assert_allclose(frame.boxes[0], [10.0, 1.0, 0.5 + LIFT, 4.5, 2.0, 1.6, 3.0], atol=1e-6)
    from haltdet.boxes import count_points_in_boxes

    expected_ped = int(count_points_in_boxes(frame.points, frame.boxes[1:2])[0])
    assert expected_ped > 0
    assert frame.num_points.tolist() == [10, expected_ped, 0]
    assert frame.difficulty[0] == 2 and frame.difficulty[2] == 0  # Waymo LEVEL_2; no points: ignored
    both = waymo_v1.open_source(path, second_return=True).read(ids[0]).points
    np.testing.assert_allclose(both[:, :3], np.concatenate([xyz, second_xyz]) + [0, 0, LIFT], atol=1e-3)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x0a\xff\xff\xff\x0f", "truncated"),  # context length past the end
        (b"\x08" + b"\xff" * 11, "varint"),  # over-long varint
        (_int(6, 5), "laser_labels"),  # laser_labels as an integer: wrong schema
        (_len(6, _int(1, 3)), "box"),  # a label whose box is an integer
        (_one_laser(UNIFORM + EYE, b"not zlib"), "zlib"),
        (_one_laser(UNIFORM + _len(5, _doubles(1, [1.0, 2.0])), _matrix(np.ones((2, 3, 4)))), "16 values"),
        (_one_laser(EYE, _matrix(np.ones((2, 3, 4)))), "beam_inclination"),
        (_one_laser(UNIFORM + EYE, zlib.compress(_len(1, bytes(8)))), "shape"),
        (b"\x0b\x0c", "wire type"),  # group
    ],
)
def test_v1_malformed_frames(tmp_path, payload, match):
    path = tmp_path / "bad.tfrecord"
    tfrecord.write_records(path, [payload])
    with pytest.raises(InputError, match=match) as err:
        _open_and_read(path)
    assert str(path) in str(err.value)


def test_v1_missing_calibration_and_bad_paths(tmp_path):
    payload, *_ = _synthetic_frame()
    msg = Message(payload)
    without_context = b"".join(
        _len(f, bytes(v)) if w == 2 else _int(f, v) for f, w, v in _walk(payload) if f != 1
    )
    assert 1 in msg and 1 not in Message(without_context)
    path = tmp_path / "nocal.tfrecord"
    tfrecord.write_records(path, [without_context])
    with pytest.raises(InputError, match="no calibration") as err:
        _open_and_read(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="no such"):
        waymo_v1.open_source(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="no .tfrecord"):
        waymo_v1.open_source(tmp_path / "empty_dir")
    with pytest.raises(InputError, match="unknown"):
        waymo_v1.open_source(path).read("nope")


# ----------------------------------------------------------------------------- v2 parquet


def _write_v2(root: Path, context: str, stamps: list[int]) -> dict:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    lidar, pose, vehicle, boxes, expected = [], [], [], [], {}
    for k, stamp in enumerate(stamps):
        top, top_pose, frame_pose, top_xyz = _scene(16, 64, TOP_INCL_ASC[::-1], TOP_EXTRINSIC, True, seed=10 + k)
        front, _, _, front_xyz = _scene(8, 32, FRONT_ROWS, FRONT_EXTRINSIC, False, seed=20 + k)
        for laser, image in ((1, top), (2, front)):
            lidar.append((context, stamp, laser, image.ravel().tolist(), list(image.shape)))
        pose.append((context, stamp, 1, top_pose.ravel().tolist(), list(top_pose.shape)))
        vehicle.append((context, stamp, frame_pose.ravel().tolist()))
        frame_boxes = [(1, [5.0 + k, 1.0, 0.5, 4.0, 2.0, 1.5, 0.2]), (3, [1.0, 1.0, 1.0, 0.3, 0.3, 1.0, 0.0]),
                       (2, [-3.0, 2.0, 0.9, 0.8, 0.7, 1.8, -2.0])]
        for i, (kind, box) in enumerate(frame_boxes):
            boxes.append((context, stamp, f"obj{i}", kind, box, 12 if kind == 1 else None))
        expected[f"{context}_{stamp}"] = (np.concatenate([top_xyz, front_xyz]), [b for t, b in frame_boxes if t != 3])

    def write(component: str, columns: dict) -> None:
        (root / component).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), root / component / f"{context}.parquet")

    keys = lambda rows, laser=True: {  # noqa: E731
        "key.segment_context_name": [r[0] for r in rows],
        "key.frame_timestamp_micros": pa.array([r[1] for r in rows], pa.int64()),
        **({"key.laser_name": pa.array([r[2] for r in rows], pa.int8())} if laser else {}),
    }
    prefix = "[LiDARComponent].range_image_return1"
    write("lidar", {**keys(lidar), f"{prefix}.values": pa.array([r[3] for r in lidar], pa.list_(pa.float32())),
                    f"{prefix}.shape": pa.array([r[4] for r in lidar], pa.list_(pa.int32(), 3))})
    prefix = "[LiDARPoseComponent].range_image_return1"
    write("lidar_pose", {**keys(pose), f"{prefix}.values": pa.array([r[3] for r in pose], pa.list_(pa.float32())),
                         f"{prefix}.shape": pa.array([r[4] for r in pose], pa.list_(pa.int32(), 3))})
    write("vehicle_pose", {**keys(vehicle, laser=False), "[VehiclePoseComponent].world_from_vehicle.transform":
                           pa.array([r[2] for r in vehicle], pa.list_(pa.float64(), 16))})
    c = "[LiDARCalibrationComponent]"
    write("lidar_calibration", {
        "key.segment_context_name": [context, context], "key.laser_name": pa.array([1, 2], pa.int8()),
        f"{c}.extrinsic.transform": pa.array([TOP_EXTRINSIC.ravel().tolist(), FRONT_EXTRINSIC.ravel().tolist()],
                                             pa.list_(pa.float64(), 16)),
        f"{c}.beam_inclination.min": [-0.3, FRONT_LO], f"{c}.beam_inclination.max": [0.05, FRONT_HI],
        f"{c}.beam_inclination.values": pa.array([TOP_INCL_ASC.tolist(), None], pa.list_(pa.float64())),
    })
    b = "[LiDARBoxComponent]"
    names = ["center.x", "center.y", "center.z", "size.x", "size.y", "size.z", "heading"]
    write("lidar_box", {
        **keys(boxes, laser=False), "key.laser_object_id": [r[2] for r in boxes],
        f"{b}.type": pa.array([r[3] for r in boxes], pa.int8()),
        **{f"{b}.box.{n}": [r[4][i] for r in boxes] for i, n in enumerate(names)},
        f"{b}.num_lidar_points_in_box": pa.array([r[5] for r in boxes], pa.int64()),
    })
    return expected


def test_v2_parquet_roundtrip(tmp_path):
    from haltdet.data.formats import waymo_v2

    expected = _write_v2(tmp_path, "ctx_a", [1_500_000_000_000_001, 1_500_000_000_100_001])
    source = waymo_v2.open_source(tmp_path)
    assert source.frame_ids() == sorted(expected)
    for fid, (xyz, boxes) in expected.items():
        frame = source.read(fid)
        err_mm = 1000 * np.abs(frame.points[:, :3] - (xyz + [0, 0, LIFT])).max()
        print(f"v2 {fid}: {len(xyz)} points, max error {err_mm:.6f} mm")
        assert frame.points.shape == (len(xyz), 4) and err_mm < 1.0
        assert (frame.points[:, 3] >= 0).all() and (frame.points[:, 3] < 1).all()
        np.testing.assert_allclose(frame.boxes, np.asarray(boxes) + [0, 0, LIFT, 0, 0, 0, 0], atol=1e-6)
        assert frame.labels.tolist() == [0, 1]
        assert frame.num_points[0] == 12
    with pytest.raises(InputError, match="unknown"):
        source.read("ctx_a_5")


def test_v2_errors(tmp_path, monkeypatch):
    from haltdet.data.formats import waymo_v2

    pytest.importorskip("pyarrow")
    with pytest.raises(InputError, match="no lidar"):
        waymo_v2.open_source(tmp_path)
    _write_v2(tmp_path, "ctx_b", [7])
    (tmp_path / "lidar_calibration" / "ctx_b.parquet").write_bytes(b"PAR1 garbage")
    source = waymo_v2.open_source(tmp_path)
    with pytest.raises(InputError, match="lidar_calibration") as err:
        source.read("ctx_b_7")
    assert "ctx_b.parquet" in str(err.value)
    shutil.copy(tmp_path / "lidar_box" / "ctx_b.parquet", tmp_path / "lidar_calibration" / "ctx_b.parquet")
    with pytest.raises(InputError, match="missing column"):
        waymo_v2.open_source(tmp_path).read("ctx_b_7")
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(InputError, match=r"pip install haltdet\[real\]"):
        waymo_v2.open_source(tmp_path)
