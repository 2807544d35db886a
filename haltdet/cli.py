"""The `haltdet` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from haltdet import CLASSES, HaltdetError, InputError, __version__
from haltdet.config import INFERENCE_DTYPES, INFERENCE_SETTINGS
from haltdet.memory import keep_freed_memory

DEFAULT_CHECKPOINT = "halting"
DEMO_SEED = 20261124  # not a seed of the training or validation splits


def _device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise HaltdetError(f"--device {name}: not a device name ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HaltdetError(f"--device {name}: CUDA is not available on this machine")
    return name


def _load_model(args):
    """The model of `--checkpoint` on `--device`, with the `--set` inference settings."""
    from haltdet.checkpoint import load_model
    from haltdet.config import inference_overrides

    settings = inference_overrides(args.set, args.dtype)  # a bad --set fails before the model loads
    model, config = load_model(args.checkpoint, _device(args.device))
    model.configure(**settings)
    return model, config


def _warn_if_trained_on_simulation(model, points_file: str | None, data: str | None) -> None:
    """Say once when a model trained on simulated frames only meets real input (a points
    file, or a real dataset)."""
    from haltdet.data.formats import data_source

    real = points_file is not None or (data is not None and data_source(data) not in (None, "synth"))
    if real and model.data_source == "synth":
        logging.getLogger("haltdet").warning(
            "this model was trained on simulated frames only: on real data expect false positives and "
            "misses; the input must be in the project frame (docs/data_format.md)")


def _data_frame_ids(source, spec, wanted: list[str] | None) -> list[str]:
    """The frame ids of a source to use: `wanted` (each must exist) or all of them."""
    ids = source.frame_ids()
    if not ids:
        raise InputError(f"{spec}: no frames")
    missing = [f for f in wanted or [] if f not in set(ids)]
    if missing:
        raise InputError(f"{spec}: no frame(s) {missing} (it has {len(ids)}: {', '.join(ids[:5])}"
                         f"{', ...' if len(ids) > 5 else ''})")
    return list(wanted) if wanted else ids


def _is_data_spec(text: str) -> bool:
    """True for FORMAT:PATH and haltdet dataset directories (not for points files)."""
    from haltdet.data.formats import parse_spec

    return parse_spec(text)[0] is not None or Path(text).is_dir()


def cmd_demo(args) -> None:
    import torch

    from haltdet.data.synth import simulate_frame
    from haltdet.model.pillars import PointBatch
    from haltdet.viz import draw_bev, draw_halting

    if args.sensor_height is not None and not (args.input and not _is_data_spec(args.input)):
        raise InputError("demo: --sensor-height is for a points file given as --input")
    model, config = _load_model(args)
    if args.input:
        spec = _is_data_spec(args.input)
        _warn_if_trained_on_simulation(model, None if spec else args.input, args.input if spec else None)
    gt_boxes = gt_labels = None
    if args.input and _is_data_spec(args.input):
        from haltdet.data.formats import open_data
        data = open_data(args.input)
        frame_id = _data_frame_ids(data, args.input, [args.frame] if args.frame else None)[0]
        frame = data.read(frame_id)
        keep = frame.difficulty > 0
        points, gt_boxes, gt_labels = frame.points, frame.boxes[keep], frame.labels[keep]
        source = f"{args.input} frame {frame_id}"
    elif args.input:
        from haltdet.data.frames import load_points_file, shift_to_ground
        points = load_points_file(args.input, columns=args.columns, intensity_scale=args.intensity_scale)
        points = shift_to_ground(points, args.sensor_height, args.input)
        source = str(args.input)
    else:
        frame = simulate_frame(args.seed)
        keep = frame.difficulty > 0
        points, gt_boxes, gt_labels = frame.points, frame.boxes[keep], frame.labels[keep]
        source = f"synthetic frame, seed {args.seed}"
    batch = PointBatch.from_list([torch.from_numpy(points)]).to(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model(batch)
        (detections,) = model.decode(output)
    seconds = time.perf_counter() - start
    keep = detections.scores >= args.min_score
    boxes = detections.boxes[keep].cpu().numpy()
    labels = detections.labels[keep].cpu().numpy()
    scores = detections.scores[keep].cpu().numpy()
    print(f"{source}: {len(points)} points, {output.tokens.coords.shape[0]} pillar tokens; model "
          f"'{config.name}'; {len(boxes)} detections with score >= {args.min_score} in {seconds * 1000:.0f} ms")
    if gt_boxes is not None:
        counts = ", ".join(f"{(gt_labels == i).sum()} {c}" for i, c in enumerate(CLASSES))
        print(f"ground truth (boxes with points): {counts}")
    print(f"{'class':<11}{'score':>6}{'x':>8}{'y':>8}{'z':>7}{'l':>6}{'w':>6}{'h':>6}{'yaw':>7}")
    for box, label, score in zip(boxes, labels, scores):
        print(f"{CLASSES[label]:<11}{score:6.2f}" + "".join(f"{v:{w}.2f}" for v, w in zip(box, (8, 8, 7, 6, 6, 6, 7))))
    draw_bev(args.out, points, gt_boxes, gt_labels, boxes, labels, scores, extent=args.extent,
             title=f"haltdet demo: {source}; {len(boxes)} detections (score >= {args.min_score})")
    print(f"BEV picture written to {args.out}")
    if model.halting:
        halted_at = output.encoded.halted_at.cpu().numpy()
        halting_path = Path(args.out).with_name(Path(args.out).stem + "_halting.png")
        draw_halting(halting_path, output.tokens.coords.cpu().numpy(), halted_at, config.model,
                     gt_boxes, gt_labels, boxes, labels, extent=args.extent)
        layers = config.model.num_layers
        print(f"tokens processed by all {layers} layers: {(halted_at == layers).mean():.1%}; "
              f"token-layers executed: {halted_at.mean() / layers:.1%}; halting picture written to {halting_path}")


def cmd_synth(args) -> None:
    from haltdet.data.synth import SensorConfig, generate_dataset

    sensor = SensorConfig.preset(args.sensor)
    start = time.perf_counter()
    path = generate_dataset(args.out, frames=args.frames, seed=args.seed, sensor=sensor,
                            workers=args.workers, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"wrote {args.frames} frames to {path} in {seconds:.1f} s "
          f"({args.frames / max(seconds, 1e-9):.1f} frames/s with {args.workers} worker(s))")


def cmd_stats(args) -> None:
    from tqdm import tqdm

    from haltdet.data.formats import open_data
    from haltdet.data.stats import dataset_statistics, format_statistics

    source = open_data(args.data)
    ids = _data_frame_ids(source, args.data, None)[: args.frames or None]
    frames = (source.read(i) for i in tqdm(ids, desc="stats", unit="frame", disable=args.quiet, leave=False))
    stats = dataset_statistics(frames)
    print(format_statistics(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))


def cmd_train(args) -> None:
    from haltdet.config import load_config
    from haltdet.train import train

    config = load_config(args.config, args.set)
    if args.max_steps:
        config.train.max_steps = args.max_steps
    if args.train_data:
        config.data.train = args.train_data
    config.validate()
    final = train(config, args.out, resume=args.resume, device=_device(args.device),
                  progress=not args.quiet, init=args.init)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        print(f"final checkpoint: {final}")


def cmd_eval(args) -> None:
    from haltdet.evaluate import format_table, result_to_json
    from haltdet.predict import evaluate_model

    model, config = _load_model(args)
    if (args.threshold or args.keep_ratio or args.max_tokens is not None) and not model.halting:
        raise HaltdetError(f"{args.checkpoint}: --threshold/--keep-ratio/--max-tokens need a "
                           "halting model; this one has no halting stages")
    if (args.refine_passes or args.refine_mirror is not None) and model.refiner is None:
        raise HaltdetError(f"{args.checkpoint}: --refine-passes/--refine-mirror need a model with a "
                           "second stage (model.refine)")
    against = None
    if args.against:  # with its own settings (NAME@T,bfloat16: halting thresholds, precision)
        from haltdet.bench import load_spec

        against = load_spec(args.against, _device(args.device))
        if args.first_stage and against.refiner is not None:  # first stage against first stage
            against.configure(second_stage=False)
    # --first-stage scores first stages: a one-stage model is one already, unless nothing
    # in the comparison has a second stage.
    if args.first_stage and model.refiner is None and (against is None or against.refiner is None):
        raise HaltdetError(f"{args.checkpoint}: --first-stage needs a model with a second stage "
                           "(model.refine), or --against one")
    model.configure(halting_threshold=args.threshold, halting_keep_ratio=args.keep_ratio,
                    halting_max_tokens=args.max_tokens, refine_passes=args.refine_passes,
                    refine_mirror=args.refine_mirror,
                    second_stage=False if args.first_stage and model.refiner is not None else None)
    two_stage = model.refiner is not None and model.second_stage
    start = time.perf_counter()
    result = evaluate_model(model, args.data, args.batch_size, args.device, progress=not args.quiet,
                            bootstrap=args.bootstrap, camera_view=not args.whole_scene, against=against)
    result["checkpoint"] = str(args.checkpoint)
    result["data"] = str(args.data)
    result["halting"] = {"layers": config.model.halting_layers, "thresholds": model.encoder.halting.thresholds,
                         "keep_ratios": model.encoder.halting.keep_ratios,
                         "max_tokens": model.encoder.halting.max_tokens}
    result["refine_passes"] = model.config.refine_passes if two_stage else 0
    result["refine_mirror"] = bool(two_stage and model.config.refine_mirror)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(result))
    tokens = result.get("tokens")
    if tokens:
        print(f"tokens per frame {tokens['tokens']:.0f} ({tokens['foreground_tokens']:.0f} foreground); "
              f"active per layer {[round(a) for a in tokens['active_per_layer']]}; token-layers executed "
              f"{tokens['token_layers']:.3f} (foreground {tokens['foreground_token_layers']:.3f}, "
              f"background {tokens['background_token_layers']:.3f})")
    if "bootstrap" in result:
        b = result["bootstrap"]
        print(f"evaluation noise: mAPH_L2 over {b['samples']} resampled sets of the {result['num_frames']} frames: "
              f"std {b['mAPH_L2_std']:.4f}, 5-95 % {b['mAPH_L2_p5']:.4f}-{b['mAPH_L2_p95']:.4f}")
    if "against" in result:
        a = result["against"]
        spread = (f" (over the same resampled frame sets: std {a['difference_std']:.4f}, 5-95 % "
                  f"{a['difference_p5']:+.4f} to {a['difference_p95']:+.4f})" if "difference_std" in a else "")
        print(f"against {args.against}: mAPH_L2 {a['mAPH_L2']:.4f}; difference {a['difference']:+.4f}{spread}")
    if args.json:
        Path(args.json).write_text(result_to_json(result))
        print(f"metrics written to {args.json}")


def cmd_eval_boxes(args) -> None:
    from haltdet.evaluate import evaluate_files, format_table, result_to_json

    result = evaluate_files(args.gt, args.pred)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(result_to_json(result))


def cmd_detect(args) -> None:
    import torch
    from tqdm import tqdm

    from haltdet.data.formats import open_data
    from haltdet.data.formats.kitti import KittiSource, label_lines
    from haltdet.data.frames import load_points_file, shift_to_ground
    from haltdet.predict import detect_points

    if (args.points is None) == (args.data is None):
        raise InputError("detect: give either a points file or --data (not both)")
    if args.frame and args.data is None:
        raise InputError("detect: --frame needs --data")
    if args.sensor_height is not None and args.data is not None:
        raise InputError("detect: --sensor-height is for a points file; readers of --data put the road in place")
    if not 0 <= args.min_score <= 1:
        raise InputError(f"detect: --min-score must be in [0, 1], got {args.min_score}")
    labels_dir = Path(args.kitti_labels) if args.kitti_labels else None
    calib_dir = None  # KITTI data: its calib files place the labels in its camera frame
    if labels_dir is not None:
        if labels_dir.exists() and not labels_dir.is_dir():
            raise InputError(f"--kitti-labels {labels_dir}: exists and is not a folder")
        labels_dir.mkdir(parents=True, exist_ok=True)
    model, _ = _load_model(args)
    _warn_if_trained_on_simulation(model, args.points, args.data)
    if args.data is not None:
        data = open_data(args.data)
        ids = _data_frame_ids(data, args.data, args.frame)
        clouds = ((fid, data.read(fid).points) for fid in ids)
        if labels_dir is not None and isinstance(data, KittiSource):
            calib_dir = data.root / "calib"
    else:
        name = Path(args.points).name
        ids = [name[:-len(".pcd.bin")] if name.endswith(".pcd.bin") else Path(args.points).stem]
        points = load_points_file(args.points, columns=args.columns, intensity_scale=args.intensity_scale)
        clouds = iter([(ids[0], shift_to_ground(points, args.sensor_height, args.points))])
    frames = []
    for frame_id, points in tqdm(clouds, total=len(ids), desc="detect", unit="frame",
                                 disable=len(ids) < 2, dynamic_ncols=True):
        with torch.no_grad():
            detections = detect_points(model, points, args.device)
        keep = detections.scores >= args.min_score
        if labels_dir is not None:
            lines = label_lines(detections.boxes[keep].numpy(), detections.labels[keep].numpy(),
                                detections.scores[keep].numpy(), calib_dir / f"{frame_id}.txt" if calib_dir else None)
            (labels_dir / f"{frame_id}.txt").write_text("".join(line + "\n" for line in lines))
        frames.append({"frame_id": frame_id,
                       "boxes": [[round(v, 4) for v in box] for box in detections.boxes[keep].tolist()],
                       "labels": [CLASSES[i] for i in detections.labels[keep].tolist()],
                       "scores": [round(s, 4) for s in detections.scores[keep].tolist()]})
    # One frame per line, numbers to 0.1 mm / 1e-4.
    convention = json.dumps("x, y, z (centre), l, w, h, yaw (ccw from +x), LiDAR frame, metres")
    text = (f'{{"box_convention": {convention},\n "frames": [\n'
            + ",\n".join(json.dumps(frame) for frame in frames) + "\n]}")
    if args.json:
        Path(args.json).write_text(text)
        print(f"{sum(len(f['boxes']) for f in frames)} detections in {len(frames)} frame(s) written to {args.json}")
    else:
        print(text)


def cmd_convert(args) -> None:
    from tqdm import tqdm

    from haltdet import __version__
    from haltdet.data.formats import open_format
    from haltdet.data.frames import write_dataset_index, write_frame

    source = open_format(args.source_format, args.src)
    ids = _data_frame_ids(source, args.src, None)
    boxes = 0
    for frame_id in tqdm(ids, desc=f"convert {args.source_format}", unit="frame", disable=args.quiet,
                         dynamic_ncols=True):
        frame = source.read(frame_id)
        boxes += frame.num_objects
        write_frame(args.out, frame)
    path = write_dataset_index(args.out, ids, meta={
        "source": args.source_format, "source_path": str(Path(args.src).resolve()),
        "converted_by": f"haltdet {__version__}"})
    print(f"wrote {len(ids)} frames ({boxes} boxes) to {path}")


def cmd_diagnose(args) -> None:
    from haltdet.diagnose import RESIDUALS, oracle_table, residual_table
    from haltdet.predict import predict_dataset

    model, _ = _load_model(args)
    predictions, ground_truth, _ = predict_dataset(model, args.data, device=args.device,
                                                   progress=not args.quiet)
    rows = oracle_table(predictions, ground_truth)
    print("LEVEL_1 AP (APH) with one quantity of the matched predictions replaced by the ground truth's")
    print(f"{'replaced':<16}" + "".join(f"{c:>18}" for c in CLASSES))
    for row in rows:
        print(f"{row['replaced']:<16}" + "".join(f"{row[c + ' AP']:>10.3f} ({row[c + ' APH']:.3f})" for c in CLASSES))
    residuals = residual_table(predictions, ground_truth, args.min_score)
    print(f"\nerrors of the matched predictions with score >= {args.min_score} (prediction - ground truth, "
          "metres; along/across the true heading): mean +- std")
    print(f"{'class':<12}{'matched':>8}" + "".join(f"{n:>15}" for n in RESIDUALS)
          + f"{'axis err':>10}{'reversed':>10}")
    for name, entry in residuals.items():
        if not entry["matched"]:
            print(f"{name:<12}{0:>8}")
            continue
        print(f"{name:<12}{entry['matched']:>8}"
              + "".join(f"{entry['mean'][n]:>+8.2f} +-{entry['std'][n]:4.2f}" for n in RESIDUALS)
              + f"{entry['axis_error_deg']:>9.1f}d{entry['reversed']:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"oracle": rows, "residuals": residuals}, indent=2))


def cmd_gradcheck(args) -> None:
    from haltdet.gradcheck import format_report, gradcheck

    if not 0 < args.temperature < 1:
        raise InputError(f"--temperature must be in (0, 1), got {args.temperature}")
    report = gradcheck(args.cases, args.temperature, seed=args.seed, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")


def cmd_pareto(args) -> None:
    from haltdet.pareto import run_pareto

    result = run_pareto(args.spec, args.out, progress=not args.quiet, jobs=args.jobs, cache=args.cache)
    print((Path(args.out) / "results.md").read_text())
    print(f"{len(result['points'])} points written to {args.out}: pareto.json, pareto.png, results.md")


def cmd_bench(args) -> None:
    from haltdet.bench import run_benchmark

    args.checkpoint = args.checkpoint or ["baseline", "halting"]
    run_benchmark(args)


def _height(text: str):
    """argparse type of --sensor-height: 'auto' or a number of metres."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a height in metres or 'auto', got {text!r}") from None


def _count(minimum: int):
    """argparse type: an integer >= minimum (else a usage error, exit code 2)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # how argparse names the type in messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haltdet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"haltdet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Options every command takes.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_count(0), default=0,
                        help="CPU threads for torch (default 0: OMP_NUM_THREADS if set, else torch's default, "
                             "one per core); on a shared machine fewer threads than cores avoid oversubscription")

    # Options of the commands that run a model.
    inference = argparse.ArgumentParser(add_help=False)
    inference.add_argument("--set", action="append", metavar="model.KEY=VALUE",
                           help="change an inference setting of the model, in YAML syntax (repeatable), e.g. "
                                f"--set model.score_threshold=0.3; KEY: {', '.join(INFERENCE_SETTINGS)}")
    inference.add_argument("--dtype", choices=INFERENCE_DTYPES,
                           help="precision of the dense stage (BEV convolutions and head) at inference "
                                "(default: the checkpoint's, float32): bfloat16 is faster on CPUs with AMX and "
                                "on GPUs, far slower on CPUs without AVX-512 (a warning says so), its accuracy "
                                "measured in docs/experiments.md")

    # Options of the commands that read a points file.
    raw = argparse.ArgumentParser(add_help=False)
    raw.add_argument("--columns", type=int, default=None,
                     help="float32 values per point in a raw .bin points file (default: 5 for a nuScenes .pcd.bin, "
                          "else 4); a reading that does not look like a LiDAR frame is refused")
    raw.add_argument("--intensity-scale", type=float, default=None,
                     help="divide the intensities of the points file by this (default: automatic, values above 1 "
                          "are taken as 0..255 and divided by 255; 1 keeps them as stored)")
    raw.add_argument("--sensor-height", type=_height, metavar="H|auto",
                     help="the sensor's height above the road in metres, or 'auto' to measure it from the "
                          "points: a raw cloud is moved so that its road lies where the models expect it "
                          "(default: the cloud is taken to be in the project frame, the road 1.9 m below the sensor)")

    p = sub.add_parser("demo", parents=[common, inference, raw], help="detect objects in a synthetic frame with the bundled model")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint file or bundled name")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the synthetic frame")
    p.add_argument("--input", help="a points file, or data (FORMAT:PATH or a dataset directory) whose "
                                   "frame is drawn with its ground truth, instead of a synthetic frame")
    p.add_argument("--frame", help="frame id of --input data (default: its first frame)")
    p.add_argument("--out", default="haltdet_demo.png", help="BEV picture to write")
    p.add_argument("--extent", type=float, help="half-width of the pictures in metres (default: fitted to the "
                                               "boxes, 20 to 62 m)")
    p.add_argument("--min-score", type=float, default=0.3, help="score to print/draw a detection")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", parents=[common], help="generate a synthetic LiDAR dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--seed", type=int, default=0,
                   help="dataset seed (default 0); each frame's seed derives from it and the frame index")
    p.add_argument("--sensor", default="default", help="sensor preset (default, hdl64, waymo_top, nuscenes32)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)
    p = data.add_parser("stats", parents=[common], help="points, pillars and objects per frame of a dataset")
    p.add_argument("data", help="dataset directory or FORMAT:PATH (e.g. kitti:DIR)")
    p.add_argument("--frames", type=_count(0), default=0, help="only the first N frames (0: all)")
    p.add_argument("--json", help="write the statistics here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("train", parents=[common], help="train a detector")
    p.add_argument("--config", required=True, help="YAML config file or preset name")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/latest.pt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-steps", type=_count(1), help="override train.max_steps")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, in YAML syntax (repeatable), e.g. --set train.max_minutes=0")
    p.add_argument("--init", help="start from this checkpoint's weights (fine-tuning; new parameters keep their init)")
    p.add_argument("--train-data", help="override data.train (dataset directory or FORMAT:PATH)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[common, inference], help="Waymo-style AP/APH of a checkpoint on a dataset")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", required=True, help="dataset directory or FORMAT:PATH (e.g. kitti:DIR)")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--batch-size", type=_count(1), default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threshold", type=float, nargs="+", help="halting threshold(s): one, or one per stage")
    p.add_argument("--keep-ratio", type=float, nargs="+", help="keep ratio(s) per stage instead of thresholds")
    p.add_argument("--max-tokens", type=int, help="cap on active tokens per frame at each stage (0: none)")
    p.add_argument("--whole-scene", action="store_true",
                   help="score all around even in frames whose labels a camera view bounds (KITTI: by "
                        "default only what the front camera sees is scored)")
    p.add_argument("--against", metavar="CHECKPOINT",
                   help="also evaluate this model (a file, NAME, or NAME@T for halting thresholds, NAME@bfloat16 "
                        "for the precision, as in bench; its own settings otherwise, its first stage with "
                        "--first-stage) on the same frames and report the difference of mAPH_L2; with "
                        "--bootstrap, its spread over the same resampled frame sets")
    p.add_argument("--bootstrap", type=_count(0), default=0, metavar="N",
                   help="also the split's evaluation noise: the spread of mAPH_L2 over N sets of frames "
                        "drawn from it with replacement (default 0: off)")
    p.add_argument("--first-stage", action="store_true",
                   help="score the head's boxes without the model's second stage (refiner), and so "
                        "--against's; a one-stage model is its own first stage")
    p.add_argument("--refine-passes", type=_count(1), help="refinement passes (default: the model's)")
    p.add_argument("--refine-mirror", action=argparse.BooleanOptionalAction,
                   help="average the refiner over each box's points and their left-right mirror (default: "
                        "the model's model.refine_mirror, true unless its config says otherwise)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-boxes", parents=[common], help="score predicted boxes against ground truth (JSON files)")
    p.add_argument("--gt", required=True)
    p.add_argument("--pred", required=True)
    p.add_argument("--json", help="write the metrics here")
    p.set_defaults(func=cmd_eval_boxes)

    p = sub.add_parser("detect", parents=[common, inference, raw], help="detect objects in a points file or in frames of a dataset")
    p.add_argument("points", nargs="?", help=".bin (float32 rows), .pcd.bin (nuScenes), .pcd (PCL), .ply, .npy, "
                                             ".npz frame, .txt/.csv")
    p.add_argument("--data", help="instead of a points file: dataset directory or FORMAT:PATH")
    p.add_argument("--frame", action="append", help="frame id of --data (repeatable; default: every frame)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--min-score", type=float, default=0.0,
                   help="only detections scoring at least this (default 0: all the model returns)")
    p.add_argument("--json", help="write detections here (default: print)")
    p.add_argument("--kitti-labels", metavar="DIR",
                   help="also write one KITTI label file per frame here (camera frame, score last): through "
                        "the frame's calib file for --data kitti:..., else the camera axes at the LiDAR")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("convert", parents=[common],
                       help="convert a real dataset (kitti, nuscenes, av2, ...) to haltdet frames")
    p.add_argument("src", help="the dataset's folder (see docs/data_format.md)")
    p.add_argument("--from", dest="source_format", required=True, metavar="FORMAT",
                   help="kitti, nuscenes, av2, waymo, waymo-v2")
    p.add_argument("--out", required=True, help="haltdet dataset directory to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("diagnose", parents=[common, inference],
                       help="where accuracy goes: how much AP each box error (xy, z, size, yaw) "
                            "costs, and the errors' bias and spread per class")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", required=True, help="dataset directory or FORMAT:PATH (e.g. kitti:DIR)")
    p.add_argument("--min-score", type=float, default=0.3, help="score of the predictions whose errors are "
                   "summarised (default 0.3)")
    p.add_argument("--json", help="write both tables here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("gradcheck", parents=[common],
                       help="how close the halting pseudo-gradient is to the gradient of a smooth "
                            "relaxation, on small random token sets")
    p.add_argument("--cases", type=_count(1), default=50, help="random cases (default 50)")
    p.add_argument("--temperature", type=float, default=0.01,
                   help="the relaxation's temperature T: gates sigmoid((score - threshold) / T) (default 0.01)")
    p.add_argument("--seed", type=_count(0), default=0, help="seed of the first case (default 0)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("pareto", parents=[common],
                       help="accuracy against encoder and end-to-end latency of listed models and "
                            "operating points: one evaluation each, one interleaved bench run")
    p.add_argument("spec", help="YAML spec: data, bench options, points (see haltdet/pareto.py)")
    p.add_argument("--out", required=True, help="directory for pareto.json, pareto.png and results.md")
    p.add_argument("--jobs", type=_count(1), default=1,
                   help="evaluations run at a time, in processes sharing --threads (default 1)")
    p.add_argument("--cache", help="directory keeping each point's evaluation, reused while the checkpoint "
                                   "file, the point's threshold and precision, the split's files and haltdet's "
                                   "code stay the same (default: evaluate every point; the bench always runs)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("bench", parents=[common, inference], help="latency, throughput and memory of models, against the first")
    p.add_argument("--checkpoint", action="append",
                   help="checkpoint to time, NAME, NAME@THRESHOLD for a halting model, NAME@bfloat16 or "
                        "NAME@THRESHOLD,bfloat16 for another precision; repeat to compare "
                        "(ratios are against the first); default: the bundled baseline, then the bundled "
                        "halting model")
    p.add_argument("--frames", type=_count(1), default=5, help="synthetic frames to time")
    p.add_argument("--points", type=_count(0), default=0,
                   help="points per frame (topped up with scattered points; 0: the frames as simulated)")
    p.add_argument("--warmup", type=_count(0), default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoder-peer", choices=["flat"],
                   help="also time a FlatFormer-style encoder (equal groups of 69 sorted tokens, one attention "
                        "call per layer) with the first model's weights on its tokens")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench)
    return parser


def one_line(err: Exception) -> str:
    """An error's message; for one raised in a DataLoader worker (which PyTorch re-raises
    with the worker's whole traceback as its message) the original message alone."""
    message = str(err).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


def check_output_file(path: str, option: str) -> None:
    """A file the command will write: refused before any work if it names a folder or
    lies in a folder that does not exist."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{option} {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        raise InputError(f"{option} {path}: folder {target.parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    code = _run(args)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown. Its work is done and its
    files are written and closed, but torch's native threads may still release tensors
    that Python objects own while the interpreter finalises; such a thread needs the GIL,
    can no longer take it, and the process aborts ("terminate called without an active
    exception"): torchrun then reports a failed run after a good one. It is rare (about
    once in a hundred two-process runs of a few steps on a 2-core CPU, more often on a
    busy one)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _run(args) -> int:
    try:
        if getattr(args, "threads", 0):
            import torch

            torch.set_num_threads(args.threads)
        if getattr(args, "json", None):
            check_output_file(args.json, "--json")
        if args.command == "demo":
            check_output_file(args.out, "--out")
        args.func(args)
    except HaltdetError as err:
        print(f"haltdet: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("haltdet: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
