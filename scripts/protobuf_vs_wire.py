"""Waymo v1 Frame decoding: haltdet's own wire decoder against the protobuf runtime.

    python scripts/protobuf_vs_wire.py [--data DIR] [--repeat 30] [--synthetic] [--json OUT]

For each record of each ``.tfrecord`` file in DIR (default: the real Waymo fixtures in
``../shared/data/real/waymo``), two decoders do the per-frame work of
``waymo_v1.WaymoV1Source.read`` up to the geometry: the message decode and every field
it reaches (context name, timestamp, pose, every laser calibration's extrinsic, beam
inclinations and min/max, every laser's compressed range images, the range image and
pixel pose matrices where present (zlib + MatrixFloat), and the laser labels' boxes,
types, ids, point counts and difficulty levels).

* ``wire``: haltdet.data.formats.protowire with the field tables and helpers of
  waymo_v1 (``decode_labels``, ``decode_matrix``, ``_transform``);
* ``protobuf``: the protobuf runtime, with that same schema subset (same field
  numbers, from the public dataset.proto / label.proto) declared here in Python
  (a FileDescriptorProto; no protoc, no generated code).

Both must give identical values. Times are per record, interleaved (the order of the
two alternates), median and best of ``--repeat`` runs; ratio = wire / protobuf (above 1:
protobuf is faster). Then each decoder gets malformed copies of each record (cut at
half its length; one byte XOR 0x01 at its middle) and, for records up to
``--sweep-max-bytes``, every single-byte flip: what each raises, or whether it silently
returns changed values. The fixtures hold no range images, so ``--synthetic`` adds one
record built here with realistic range image sizes (TOP 64 x 2650 with pixel poses,
four 200 x 600 side lidars, first and second returns) to time that path too.

Skips (exit 0) when the protobuf package or the data directory is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from haltdet.data.formats import tfrecord, waymo_v1
from haltdet.data.formats.protowire import Message, read_varint
from haltdet.data.formats.waymo_v1 import ContextF, FrameF, LaserCalibrationF, LaserF, RangeImageF

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "waymo"

# ----------------------------------------------------------------------------- schema subset


def declare_schema():
    """Message classes of the Frame subset waymo_v1 reads (field numbers of waymo_v1)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="haltdet_waymo_subset.proto", package="waymo.open_dataset", syntax="proto2")
    pkg = ".waymo.open_dataset."

    def message(name, parent=None):
        return (parent.nested_type if parent is not None else fdp.message_type).add(name=name)

    def enum(parent, name, values):
        e = parent.enum_type.add(name=name)
        for value_name, number in values:
            e.value.add(name=value_name, number=number)

    def field(msg, name, number, kind, repeated=False, type_name=None, packed=False):
        f = msg.field.add(name=name, number=number, type=kind,
                          label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
        if type_name:
            f.type_name = pkg + type_name
        if packed:
            f.options.packed = True

    transform = message("Transform")
    field(transform, "transform", 1, F.TYPE_DOUBLE, repeated=True)
    shape = message("MatrixShape")
    field(shape, "dims", 1, F.TYPE_INT32, repeated=True)
    matrix = message("MatrixFloat")
    field(matrix, "data", 1, F.TYPE_FLOAT, repeated=True, packed=True)
    field(matrix, "shape", 2, F.TYPE_MESSAGE, type_name="MatrixShape")
    laser_name = message("LaserName")
    enum(laser_name, "Name", [("UNKNOWN", 0), ("TOP", 1), ("FRONT", 2), ("SIDE_LEFT", 3),
                              ("SIDE_RIGHT", 4), ("REAR", 5)])
    range_image = message("RangeImage")
    field(range_image, "range_image_compressed", RangeImageF.RANGE_IMAGE_COMPRESSED, F.TYPE_BYTES)
    field(range_image, "range_image_pose_compressed", RangeImageF.RANGE_IMAGE_POSE_COMPRESSED, F.TYPE_BYTES)
    laser = message("Laser")
    field(laser, "name", LaserF.NAME, F.TYPE_ENUM, type_name="LaserName.Name")
    field(laser, "ri_return1", LaserF.RI_RETURN1, F.TYPE_MESSAGE, type_name="RangeImage")
    field(laser, "ri_return2", LaserF.RI_RETURN2, F.TYPE_MESSAGE, type_name="RangeImage")
    calib = message("LaserCalibration")
    field(calib, "name", LaserCalibrationF.NAME, F.TYPE_ENUM, type_name="LaserName.Name")
    field(calib, "beam_inclinations", LaserCalibrationF.BEAM_INCLINATIONS, F.TYPE_DOUBLE, repeated=True)
    field(calib, "beam_inclination_min", LaserCalibrationF.BEAM_INCLINATION_MIN, F.TYPE_DOUBLE)
    field(calib, "beam_inclination_max", LaserCalibrationF.BEAM_INCLINATION_MAX, F.TYPE_DOUBLE)
    field(calib, "extrinsic", LaserCalibrationF.EXTRINSIC, F.TYPE_MESSAGE, type_name="Transform")
    context = message("Context")
    field(context, "name", ContextF.NAME, F.TYPE_STRING)
    field(context, "laser_calibrations", ContextF.LASER_CALIBRATIONS, F.TYPE_MESSAGE, repeated=True,
          type_name="LaserCalibration")
    label = message("Label")
    box = message("Box", label)
    for name in ("center_x", "center_y", "center_z", "width", "length", "height", "heading"):
        field(box, name, getattr(waymo_v1.BoxF, name.upper()), F.TYPE_DOUBLE)
    enum(label, "Type", [("TYPE_UNKNOWN", 0), ("TYPE_VEHICLE", 1), ("TYPE_PEDESTRIAN", 2), ("TYPE_SIGN", 3),
                         ("TYPE_CYCLIST", 4)])
    enum(label, "DifficultyLevel", [("UNKNOWN", 0), ("LEVEL_1", 1), ("LEVEL_2", 2)])
    field(label, "box", waymo_v1.LabelF.BOX, F.TYPE_MESSAGE, type_name="Label.Box")
    field(label, "type", waymo_v1.LabelF.TYPE, F.TYPE_ENUM, type_name="Label.Type")
    field(label, "id", waymo_v1.LabelF.ID, F.TYPE_STRING)
    field(label, "detection_difficulty_level", waymo_v1.LabelF.DETECTION_DIFFICULTY_LEVEL, F.TYPE_ENUM,
          type_name="Label.DifficultyLevel")
    field(label, "num_lidar_points_in_box", waymo_v1.LabelF.NUM_LIDAR_POINTS_IN_BOX, F.TYPE_INT32)
    frame = message("Frame")
    field(frame, "context", FrameF.CONTEXT, F.TYPE_MESSAGE, type_name="Context")
    field(frame, "timestamp_micros", FrameF.TIMESTAMP_MICROS, F.TYPE_INT64)
    field(frame, "pose", FrameF.POSE, F.TYPE_MESSAGE, type_name="Transform")
    field(frame, "lasers", FrameF.LASERS, F.TYPE_MESSAGE, repeated=True, type_name="Laser")
    field(frame, "laser_labels", FrameF.LASER_LABELS, F.TYPE_MESSAGE, repeated=True, type_name="Label")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    names = ("Frame", "Context", "LaserCalibration", "Laser", "RangeImage", "Transform", "MatrixFloat",
             "MatrixShape", "Label")
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName("waymo.open_dataset." + n))
            for n in names}


# ----------------------------------------------------------------------------- the two decoders


def laser_values(name, ri1, ri2, pose, image, pixel_pose) -> dict:
    return {"name": name, "ri_return1": ri1, "ri_return2": ri2, "range_image_pose": pose,
            "range_image": image, "pixel_pose": pixel_pose}


def decode_wire(payload: bytes) -> dict:
    """What WaymoV1Source.read reaches, through protowire and waymo_v1's helpers."""
    frame = Message(payload, "Frame")
    context = frame.message(FrameF.CONTEXT, "context")
    pose = frame.message(FrameF.POSE, "pose")
    out = {
        "name": context.string(ContextF.NAME) if context is not None else None,
        "timestamp": frame.integer(FrameF.TIMESTAMP_MICROS),
        "pose": waymo_v1._transform(pose, "pose") if pose is not None else None,
        "calibrations": [],
        "lasers": [],
    }
    for calib in context.messages(ContextF.LASER_CALIBRATIONS, "laser_calibrations") if context else []:
        out["calibrations"].append({
            "name": calib.integer(LaserCalibrationF.NAME, 0),
            "extrinsic": waymo_v1._transform(calib.message(LaserCalibrationF.EXTRINSIC, "extrinsic"),
                                             f"{calib.name}.extrinsic"),
            "beam_inclinations": calib.doubles(LaserCalibrationF.BEAM_INCLINATIONS),
            "min": calib.double(LaserCalibrationF.BEAM_INCLINATION_MIN),
            "max": calib.double(LaserCalibrationF.BEAM_INCLINATION_MAX),
        })
    for laser in frame.messages(FrameF.LASERS, "lasers"):
        ri1 = laser.message(LaserF.RI_RETURN1, "ri_return1")
        ri2 = laser.message(LaserF.RI_RETURN2, "ri_return2")
        c1 = ri1.raw(RangeImageF.RANGE_IMAGE_COMPRESSED, b"") if ri1 else b""
        c2 = ri2.raw(RangeImageF.RANGE_IMAGE_COMPRESSED, b"") if ri2 else b""
        cp = ri1.raw(RangeImageF.RANGE_IMAGE_POSE_COMPRESSED, b"") if ri1 else b""
        image = waymo_v1.decode_matrix(c1, f"{laser.name}.ri_return1.range_image", 4) if c1 else None
        pixel_pose = waymo_v1.decode_matrix(cp, f"{laser.name}.range_image_pose", 6) if cp else None
        out["lasers"].append(laser_values(laser.integer(LaserF.NAME, 0), c1, c2, cp, image, pixel_pose))
    labels = waymo_v1.decode_labels(frame)
    out["labels"] = {"boxes": labels.boxes, "types": labels.types, "num_points": labels.num_points,
                     "levels": labels.levels, "ids": labels.ids}
    return out


def make_decode_protobuf(classes: dict):
    Frame, MatrixFloat = classes["Frame"], classes["MatrixFloat"]

    def transform(msg) -> np.ndarray:
        values = np.array(msg.transform, dtype=np.float64)
        if values.size != 16:
            raise ValueError(f"a transform needs 16 values, got {values.size}")
        return values.reshape(4, 4)

    def matrix(compressed: bytes, channels: int) -> np.ndarray:
        m = MatrixFloat.FromString(zlib.decompress(compressed))
        data = np.array(m.data, dtype=np.float32)  # upb containers have __array__: no Python loop
        shape = tuple(m.shape.dims)
        if len(shape) != 3 or shape[2] != channels or min(shape) < 0 or int(np.prod(shape)) != data.size:
            raise ValueError(f"matrix of {data.size} values with shape {shape}, expected (H, W, {channels})")
        return data.reshape(shape)

    def decode_protobuf(payload: bytes) -> dict:
        """The same values, through the protobuf runtime."""
        frame = Frame.FromString(payload)
        context = frame.context
        has_context = frame.HasField("context")
        out = {
            "name": context.name if has_context and context.HasField("name") else None,
            "timestamp": frame.timestamp_micros if frame.HasField("timestamp_micros") else None,
            "pose": transform(frame.pose) if frame.HasField("pose") else None,
            "calibrations": [],
            "lasers": [],
        }
        for calib in context.laser_calibrations:
            if not calib.HasField("extrinsic"):
                raise ValueError("missing extrinsic")
            out["calibrations"].append({
                "name": calib.name,
                "extrinsic": transform(calib.extrinsic),
                "beam_inclinations": np.array(calib.beam_inclinations, dtype=np.float64),
                "min": calib.beam_inclination_min if calib.HasField("beam_inclination_min") else None,
                "max": calib.beam_inclination_max if calib.HasField("beam_inclination_max") else None,
            })
        for laser in frame.lasers:
            c1 = laser.ri_return1.range_image_compressed
            c2 = laser.ri_return2.range_image_compressed
            cp = laser.ri_return1.range_image_pose_compressed
            image = matrix(c1, 4) if c1 else None
            pixel_pose = matrix(cp, 6) if cp else None
            out["lasers"].append(laser_values(laser.name, c1, c2, cp, image, pixel_pose))
        boxes, types, num_points, levels, ids = [], [], [], [], []
        for label in frame.laser_labels:
            if not label.HasField("box"):
                raise ValueError("a label without a box")
            b = label.box
            boxes.append([b.center_x, b.center_y, b.center_z, b.length, b.width, b.height, b.heading])
            types.append(label.type)
            num_points.append(label.num_lidar_points_in_box if label.HasField("num_lidar_points_in_box") else -1)
            levels.append(label.detection_difficulty_level)
            ids.append(label.id)
        out["labels"] = {"boxes": np.reshape(np.array(boxes, dtype=np.float64), (-1, 7)),
                         "types": np.array(types, dtype=np.int64), "num_points": np.array(num_points, dtype=np.int64),
                         "levels": np.array(levels, dtype=np.int64), "ids": ids}
        return out

    return decode_protobuf


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two decoded values differ (exact; NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [path or "keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}" if path else k)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        same = a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")
        return [] if same else [path]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return []
    return [] if (type(a) is type(b) or {type(a), type(b)} <= {int, float}) and a == b else [path]


# ----------------------------------------------------------------------------- timing and malformed input


def time_both(decoders: dict, payload: bytes, repeat: int) -> dict:
    times = {name: [] for name in decoders}
    names = list(decoders)
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            decoders[name](payload)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(t), "best_ms": 1e3 * min(t)} for name, t in times.items()}


def outcome(decode, payload: bytes, reference: dict) -> tuple[str, str]:
    """("error", "Type: message") | ("changed", fields) | ("same", "")."""
    try:
        values = decode(payload)
    except Exception as exc:  # noqa: BLE001 - whatever each decoder raises is the measurement
        return "error", f"{type(exc).__name__}: {exc}"
    diff = differences(values, reference)
    return ("changed", ", ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")) if diff else ("same", "")


def top_field_at(payload: bytes, offset: int) -> str:
    """The top-level Frame field holding byte ``offset`` (for the report)."""
    buf, pos = memoryview(payload), 0
    while pos < len(buf):
        key, after_key = read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            end = read_varint(buf, after_key)[1]
        elif wire == 2:
            size, start = read_varint(buf, after_key)
            end = start + size
        else:
            end = after_key + (8 if wire == 1 else 4)
        if pos <= offset < end:
            return f"in Frame field {key >> 3}"
        pos = end
    return "past the end"


def malformed(decoders: dict, payload: bytes, references: dict, sweep_max: int) -> dict:
    middle = len(payload) // 2
    flipped = bytearray(payload)
    flipped[middle] ^= 0x01
    cases = {
        "truncated at half": payload[:middle],
        f"byte {middle} flipped ({top_field_at(payload, middle)})": bytes(flipped),
    }
    out = {case: {name: outcome(decode, data, references[name]) for name, decode in decoders.items()}
           for case, data in cases.items()}
    if len(payload) <= sweep_max:
        counts = {name: {"error": 0, "changed": 0, "same": 0} for name in decoders}
        joint: dict[str, int] = {}
        messages: dict[str, dict[str, int]] = {name: {} for name in decoders}
        disagreements: dict[str, list] = {}
        for i in range(len(payload)):
            data = bytearray(payload)
            data[i] ^= 0x01
            got = {name: outcome(decode, bytes(data), references[name]) for name, decode in decoders.items()}
            for name, (kind, detail) in got.items():
                counts[name][kind] += 1
                if kind == "error":
                    messages[name].setdefault(detail, i)
            key = " / ".join(kind for kind, _ in got.values())
            joint[key] = joint.get(key, 0) + 1
            if len({kind for kind, _ in got.values()}) > 1 and len(disagreements.setdefault(key, [])) < 2:
                disagreements[key].append({"offset": i, **{name: list(value) for name, value in got.items()}})
        out["every single-byte flip"] = {
            "counts": counts, "joint (" + " / ".join(decoders) + ")": joint,
            "distinct error messages": {name: len(m) for name, m in messages.items()},
            "error messages (first offset)": {name: dict(list(m.items())[:4]) for name, m in messages.items()},
            "disagreements (first 2 of each kind)": disagreements}
    return out


# ----------------------------------------------------------------------------- synthetic record


def synthetic_record(classes: dict) -> bytes:
    """One Frame with range images of real Waymo sizes (values made up, smooth enough to compress)."""
    rng = np.random.default_rng(0)
    frame = classes["Frame"]()
    frame.context.name = "synthetic"
    frame.timestamp_micros = 1_600_000_000_000_000
    frame.pose.transform.extend(np.eye(4).ravel().tolist())

    def compressed(shape) -> bytes:
        """Range images: range (smooth + noise, 4 mm steps), intensity, elongation 0, no-label-zone -1,
        empty pixels -1; pixel poses: one pose per column."""
        h, w, c = shape
        if c == 4:
            values = np.empty(shape, np.float32)
            ranges = 20 + 10 * np.sin(np.linspace(0, 6, w))[None, :] + 0.1 * np.arange(h)[:, None]
            values[..., 0] = np.round((ranges + rng.normal(0, 0.05, (h, w))) / 0.004) * 0.004
            values[..., 1] = np.round(rng.exponential(0.1, (h, w)), 3)
            values[..., 2] = 0.0
            values[..., 3] = -1.0
            values[rng.random((h, w)) < 0.2] = -1.0
        else:
            column = np.linspace(0, 1, w, dtype=np.float32)[:, None] * np.float32([0.001, 0.002, 0.1, 2.0, 0.5, 0.01])
            values = np.broadcast_to(column, shape)
        m = classes["MatrixFloat"]()
        m.data.extend(values.ravel().tolist())
        m.shape.dims.extend(shape)
        return zlib.compress(m.SerializeToString())

    for name in range(1, 6):
        h, w = (64, 2650) if name == 1 else (200, 600)
        calib = frame.context.laser_calibrations.add(name=name, beam_inclination_min=-0.3, beam_inclination_max=0.04)
        if name == 1:
            calib.beam_inclinations.extend(np.linspace(-0.3, 0.04, 64).tolist())
        calib.extrinsic.transform.extend(np.eye(4).ravel().tolist())
        laser = frame.lasers.add(name=name)
        laser.ri_return1.range_image_compressed = compressed((h, w, 4))
        laser.ri_return2.range_image_compressed = compressed((h, w, 4))
        if name == 1:
            laser.ri_return1.range_image_pose_compressed = compressed((h, w, 6))
    for i in range(100):
        label = frame.laser_labels.add(type=1 + i % 4, id=f"object-{i:04d}", num_lidar_points_in_box=i * 7)
        label.box.center_x, label.box.center_y, label.box.center_z = rng.uniform(-70, 70, 3).tolist()
        label.box.length, label.box.width, label.box.height = rng.uniform(0.5, 5, 3).tolist()
        label.box.heading = float(rng.uniform(-np.pi, np.pi))
    return frame.SerializeToString()


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a directory of Waymo v1 .tfrecord files")
    parser.add_argument("--repeat", type=int, default=30, help="timed runs of each decoder per record")
    parser.add_argument("--synthetic", action="store_true", help="also time a record with real-size range images")
    parser.add_argument("--sweep-max-bytes", type=int, default=16384,
                        help="flip every byte of records up to this size (0: no sweep)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here")
    args = parser.parse_args()
    try:
        import google.protobuf
        from google.protobuf.internal import api_implementation
    except ImportError:
        print("protobuf is not installed (pip install protobuf): nothing to compare")
        return
    files = sorted(p for p in args.data.glob("*.tfrecord*") if p.is_file()) if args.data.is_dir() else []
    if not files:
        print(f"no Waymo .tfrecord files in {args.data}: nothing to compare")
        return
    classes = declare_schema()
    decoders = {"wire": decode_wire, "protobuf": make_decode_protobuf(classes)}
    records = [(f"{path.name}#{i}", payload)
               for path in files for i, (_, payload) in enumerate(tfrecord.iter_records(path))]
    if args.synthetic:
        records.append(("synthetic (range images)", synthetic_record(classes)))
    result = {"protobuf": google.protobuf.__version__, "backend": api_implementation.Type(),
              "python": sys.version.split()[0], "repeat": args.repeat, "records": []}
    print(f"protobuf {result['protobuf']} ({result['backend']} backend), Python {result['python']}, "
          f"median (best) of {args.repeat} interleaved runs, ms per record")
    print(f"{'record':<34}{'bytes':>9}{'labels':>7}{'wire ms':>17}{'protobuf ms':>17}{'ratio':>7}  agree")
    for name, payload in records:
        references = {n: decode(payload) for n, decode in decoders.items()}
        diff = differences(references["wire"], references["protobuf"])
        times = time_both(decoders, payload, args.repeat)
        w, p = times["wire"], times["protobuf"]
        ratio = w["median_ms"] / p["median_ms"]
        images = sum(1 for laser in references["wire"]["lasers"] if laser["range_image"] is not None)
        row = {"record": name, "bytes": len(payload), "labels": len(references["wire"]["labels"]["ids"]),
               "range_images_decoded": images, "agree": not diff, "differences": diff, "times": times,
               "ratio_wire_over_protobuf": ratio}
        print(f"{name:<34}{len(payload):>9}{row['labels']:>7}{w['median_ms']:>9.3f} ({w['best_ms']:.3f})"
              f"{p['median_ms']:>9.3f} ({p['best_ms']:.3f}){ratio:>7.2f}  {'yes' if not diff else diff[:3]}")
        row["malformed"] = malformed(decoders, payload, references, args.sweep_max_bytes)
        result["records"].append(row)
    print("\nmalformed input (error: what it raised; changed: accepted, values differ; same: accepted, no change)")
    for row in result["records"]:
        for case, got in row["malformed"].items():
            if case == "every single-byte flip":
                print(f"{row['record']}: every single-byte flip (XOR 0x01), {row['bytes']} positions")
                for key, value in got.items():
                    if key == "error messages (first offset)":
                        for n, first in value.items():
                            print(f"    {n} errors, e.g.: " + " | ".join(m[:90] for m in first))
                    elif key.startswith("disagreements"):
                        for d in (d for examples in value.values() for d in examples):
                            print(f"    byte {d['offset']}: " + "; ".join(
                                f"{n} {d[n][0]}{' (' + d[n][1][:80] + ')' if d[n][1] else ''}" for n in decoders))
                    else:
                        print(f"    {key}: {value}")
                continue
            print(f"{row['record']}: {case}")
            for n, (kind, detail) in got.items():
                print(f"    {n:>9}: {kind}{': ' + detail[:150] if detail else ''}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    assert all(row["agree"] for row in result["records"]), "the decoders disagree"


if __name__ == "__main__":
    main()
