"""Accuracy against latency for a set of models and operating points (`haltdet pareto`).

A spec (YAML) lists the points; every point is evaluated on the same split and all of
them are timed in one interleaved `haltdet bench` run, so their times compare:

```yaml
data: data/val                       # the evaluation split
bench: {frames: 20, threads: 2}      # `haltdet bench` options (warmup, points, device too)
bootstrap: 500                       # resampled frame sets for the noise (default 500)
title: Accuracy against latency     # the page's heading (this is the default)
about: what the points are and how they were trained   # printed under the heading
points:
  - {method: baseline, name: baseline, checkpoint: baseline}
  - {method: halting, name: "halting t=0.5", checkpoint: halting, threshold: [0.5], seed: 0}
  - {method: halting, name: "halting bf16", checkpoint: halting, dtype: bfloat16}
```

`method` is one of METHODS; points that share a name (several training seeds) are drawn
as their mean with the seeds' range as an error bar. Each point also gets the split's
noise on its mAPH_L2 and its difference from the first point with that difference's
spread over the same resampled frame sets (`haltdet eval --against`). The outputs: `pareto.json`
(`{"points": [...], "bench": ..., "machine": ...}`), `pareto.png` (mAPH_L2 against
encoder and against end-to-end milliseconds, points numbered in the table's order, the
halting points' frontier drawn) and `results.md` (the table, which halting
point dominates each other point, the command and the machine). With `--cache DIR` a
rerun evaluates only the points whose checkpoint, settings, split or code changed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from haltdet import InputError
from haltdet.config import INFERENCE_DTYPES, yaml_problem

METHODS = ("baseline", "halting", "random", "topk", "act", "coarse", "size", "groups", "ablation")
BENCH_KEYS = {"frames": 20, "threads": 0, "warmup": 1, "points": 0, "device": "cpu"}
SPEC_KEYS = {"data", "bench", "bootstrap", "title", "about", "points"}
TITLE = "Accuracy against latency"
POINT_KEYS = {"method", "name", "checkpoint", "threshold", "seed", "dtype"}


def load_spec(path: str | Path) -> dict:
    """Read and check a pareto spec; returns {"data", "bench", "points"}."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the spec ({err})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("points"), list) or not spec["points"]:
        raise InputError(f"{path}: a spec needs 'data' and a non-empty list 'points'")
    if set(spec) - SPEC_KEYS:
        raise InputError(f"{path}: unknown keys {sorted(set(spec) - SPEC_KEYS)} (a spec has {sorted(SPEC_KEYS)})")
    for key in ("title", "about"):
        if not isinstance(spec.get(key, ""), str):
            raise InputError(f"{path}: '{key}' must be text")
    if not isinstance(spec.get("data"), str):
        raise InputError(f"{path}: 'data' must name the evaluation split (a directory or FORMAT:PATH)")
    bench = {**BENCH_KEYS, **(spec.get("bench") or {})}
    if set(bench) - set(BENCH_KEYS):
        raise InputError(f"{path}: unknown bench keys {sorted(set(bench) - set(BENCH_KEYS))}")
    bootstrap = spec.get("bootstrap", 500)
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise InputError(f"{path}: 'bootstrap' must be a count of resampled frame sets (>= 0)")
    points = []
    for i, point in enumerate(spec["points"]):
        where = f"{path}: points[{i}]"
        if not isinstance(point, dict) or set(point) - POINT_KEYS:
            raise InputError(f"{where}: a mapping of {sorted(POINT_KEYS)}")
        if point.get("method") not in METHODS:
            raise InputError(f"{where}: method must be one of {', '.join(METHODS)}")
        if not isinstance(point.get("checkpoint"), str):
            raise InputError(f"{where}: needs 'checkpoint' (a file or a bundled name)")
        threshold = point.get("threshold")
        if threshold is not None:
            threshold = [threshold] if isinstance(threshold, (int, float)) else threshold
            if not (isinstance(threshold, list) and all(isinstance(t, (int, float)) for t in threshold)):
                raise InputError(f"{where}: threshold must be a number or a list of numbers")
        if point.get("dtype", "float32") not in INFERENCE_DTYPES:
            raise InputError(f"{where}: dtype must be one of {', '.join(INFERENCE_DTYPES)}")
        points.append({"method": point["method"], "name": str(point.get("name", point["checkpoint"])),
                       "checkpoint": point["checkpoint"], "threshold": threshold,
                       "seed": int(point.get("seed", 0)), "dtype": point.get("dtype", "float32")})
    keys = [(p["name"], p["seed"]) for p in points]
    if len(set(keys)) != len(keys):
        raise InputError(f"{path}: two points share a name and seed")
    return {"data": spec["data"], "bench": bench, "points": points, "bootstrap": bootstrap,
            "title": spec.get("title") or TITLE, "about": " ".join(spec.get("about", "").split())}


def bench_name(point: dict) -> str:
    """The `haltdet bench` spec of a point: CHECKPOINT or CHECKPOINT@T1,T2,DTYPE."""
    items = [str(t) for t in point["threshold"] or []]
    items += [point["dtype"]] if point["dtype"] != "float32" else []
    return point["checkpoint"] + ("@" + ",".join(items) if items else "")


def evaluate_point(point: dict, data, progress: bool = True):
    """mAPH_L2 of a point with and without its second stage, its token-layers (of all
    tokens, and of the tokens inside ground-truth boxes) and the steps and seconds of the
    run that wrote its checkpoint; with its predictions and the ground truth, for the
    noise (`run_pareto`)."""
    from haltdet.bench import load_spec as load_model_spec
    from haltdet.checkpoint import load_checkpoint
    from haltdet.evaluate import evaluate
    from haltdet.predict import evaluate_model, predict_dataset, summarise_tokens

    model = load_model_spec(bench_name(point), "cpu")
    predictions, truth, token_stats = predict_dataset(model, data, progress=progress)
    run = load_checkpoint(point["checkpoint"])
    tokens = summarise_tokens(token_stats) if token_stats else {}
    scores = {"mAPH_L2": evaluate(truth, predictions)["mAPH_L2"],
              "token_layers": tokens.get("token_layers", 1.0),
              "object_token_layers": tokens.get("foreground_token_layers", 1.0),
              "train_steps": int(run.get("step", 0)), "train_seconds": float(run.get("train_seconds", 0.0))}
    if model.refiner is None:
        scores["mAPH_L2_first_stage"] = scores["mAPH_L2"]
    else:
        model.configure(second_stage=False)
        scores["mAPH_L2_first_stage"] = evaluate_model(model, data, progress=progress)["mAPH_L2"]
    return scores, predictions, truth


def _evaluate_in_worker(point: dict, data, threads: int):
    import torch

    torch.set_num_threads(threads)
    return evaluate_point(point, data, progress=False)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_fingerprint() -> str:
    """A digest of haltdet's Python sources: any change to the code changes it."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_fingerprint(data: str) -> str:
    """A digest of a split's files (names, sizes, modification times), or of its name where
    it is not a local path."""
    path = Path(data)
    if not path.exists() and ":" in data:  # FORMAT:PATH
        path = Path(data.split(":", 1)[1])
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []
    listing = [(str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns)
               for f in files if f.is_file()]
    return hashlib.sha256(json.dumps([data, listing]).encode()).hexdigest()


def evaluation_keys(points: list[dict], data: str) -> list[str]:
    """Per point, a key of everything its evaluation depends on: the checkpoint's bytes,
    the point's threshold and precision, the split's files and haltdet's code."""
    from haltdet.checkpoint import resolve_checkpoint

    common = {"data": data_fingerprint(data), "code": code_fingerprint()}
    digests = {}
    keys = []
    for point in points:
        checkpoint = resolve_checkpoint(point["checkpoint"])
        if checkpoint not in digests:
            digests[checkpoint] = _file_digest(checkpoint)
        item = {**common, "checkpoint": digests[checkpoint], "threshold": point["threshold"],
                "dtype": point["dtype"]}
        keys.append(hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()[:40])
    return keys


def evaluate_points(points: list[dict], data, jobs: int = 1, progress: bool = True,
                    cache: str | Path | None = None) -> list:
    """`evaluate_point` of every point, `jobs` at a time in worker processes that share
    this process's threads; the results in the order of `points`. With `cache`, a
    directory: each evaluation is stored there under its `evaluation_keys` key as soon as
    it is done (an interrupted run keeps what it finished), and a stored one is read back
    instead of evaluating again (evaluation is deterministic)."""
    if cache is None:
        return _evaluate_all(points, data, jobs, progress)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    files = [cache / f"{key}.pkl" for key in evaluation_keys(points, data)]
    results = [None] * len(points)
    for i, (point, file) in enumerate(zip(points, files)):
        if file.exists():
            with open(file, "rb") as f:
                results[i] = pickle.load(f)
            if progress:
                print(f"reused the evaluation of {point['name']} (seed {point['seed']}) from {file}")
    missing = [i for i, r in enumerate(results) if r is None]

    def store(k: int, result) -> None:
        i = missing[k]
        results[i] = result
        partial = files[i].with_suffix(".part")
        with open(partial, "wb") as f:
            pickle.dump(result, f)
        partial.replace(files[i])

    _evaluate_all([points[i] for i in missing], data, jobs, progress, store)
    return results


def _evaluate_all(points: list[dict], data, jobs: int, progress: bool, done=None) -> list:
    """The evaluations of `points` in order; `done(k, result)` is called as the k-th ends."""
    results = []
    if jobs <= 1:
        for point in points:
            if progress:
                print(f"evaluating {point['name']} (seed {point['seed']})")
            results.append(evaluate_point(point, data, progress))
            if done:
                done(len(results) - 1, results[-1])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_evaluate_in_worker, point, data, threads) for point in points]
        for point, future in zip(points, futures):
            results.append(future.result())
            if done:
                done(len(results) - 1, results[-1])
            if progress:
                print(f"evaluated {point['name']} (seed {point['seed']})")
        return results


def run_pareto(spec_path: str | Path, out_dir: str | Path, progress: bool = True, jobs: int = 1,
               cache: str | Path | None = None) -> dict:
    """Evaluate and time every point of a spec (`jobs` evaluations at a time, reusing those
    stored in `cache`: `evaluate_points`); writes pareto.json, pareto.png and results.md
    to `out_dir` and returns the result. The bench always runs afresh."""
    from haltdet.bench import benchmark
    from haltdet.evaluate import evaluate

    spec = load_spec(spec_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [dict(p) for p in spec["points"]]
    first = None
    evaluations = evaluate_points(points, spec["data"], jobs, progress, cache)
    for point, (scores, predictions, truth) in zip(points, evaluations):
        point.update(scores)
        first = first or predictions
        if spec["bootstrap"]:
            noise = evaluate(truth, predictions, bootstrap=spec["bootstrap"], against=first)
            point.update(mAPH_L2_std=noise["bootstrap"]["mAPH_L2_std"], vs_first=noise["against"]["difference"],
                         vs_first_std=noise["against"]["difference_std"])
    b = spec["bench"]
    report = benchmark([bench_name(p) for p in points], b["frames"], b["points"], b["warmup"], b["device"],
                       b["threads"])
    for point, timing in zip(points, report["models"]):
        point["encoder_ms"] = 1000 * timing["median_seconds"]["encoder"]
        point["total_ms"] = 1000 * timing["median_seconds"]["total"]
    import torch

    result = {"points": points, "data": spec["data"], "bootstrap": spec["bootstrap"], "title": spec["title"],
              "about": spec["about"],
              "bench": {"frames": report["frames"], "threads": report["threads"], "device": report["device"]},
              "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "spec": str(spec_path)}
    (out_dir / "pareto.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / "pareto.png")
    (out_dir / "results.md").write_text(markdown(result))
    return result


def grouped(points: list[dict]) -> list[dict]:
    """Points sharing a name (training seeds): mean and range of accuracy and times."""
    groups = defaultdict(list)
    for point in points:
        groups[(point["method"], point["name"])].append(point)
    rows = []
    for (method, name), members in groups.items():
        row = {"method": method, "name": name, "seeds": len(members), "train_steps": members[0].get("train_steps", 0),
               "dtype": members[0].get("dtype", "float32")}
        row["train_seconds"] = float(np.mean([m.get("train_seconds", 0.0) for m in members]))
        for key in ("mAPH_L2", "mAPH_L2_first_stage", "encoder_ms", "total_ms", "token_layers"):
            values = np.array([m[key] for m in members], dtype=np.float64)
            row[key], row[key + "_min"], row[key + "_max"] = values.mean(), values.min(), values.max()
        for key in ("mAPH_L2_std", "vs_first", "vs_first_std", "object_token_layers"):  # averaged over seeds
            if all(key in m for m in members):
                row[key] = float(np.mean([m[key] for m in members]))
        rows.append(row)
    return rows


def table_rows(points: list[dict]) -> list[dict]:
    """The grouped rows in the table's order (and the plot's numbering): by method, then encoder time."""
    return sorted(grouped(points), key=lambda r: (METHODS.index(r["method"]), r["encoder_ms"]))


def halting_rows(row: dict, rows: list[dict]) -> list[dict]:
    """The halting rows `row` is compared with: those at its precision, but itself."""
    return [other for other in rows if other["method"] == "halting" and other is not row
            and other.get("dtype", "float32") == row.get("dtype", "float32")]


def dominating(row: dict, rows: list[dict], time_key: str) -> str | None:
    """The name of a halting row at the same precision, at no more time and with no less
    accuracy than `row`."""
    for other in halting_rows(row, rows):
        if other[time_key] <= row[time_key] and other["mAPH_L2"] >= row["mAPH_L2"]:
            return other["name"]
    return None


def training(row: dict) -> str:
    """The steps and minutes (seeds' mean) of the run behind a row."""
    if not row.get("train_steps"):
        return "-"
    return f"{row['train_steps']} steps, {row['train_seconds'] / 60:.0f} min"


def comparisons(rows: list[dict]) -> list[str]:
    """One line per row that is neither the baseline nor halting: the halting rows (at its
    precision) that dominate it, and its difference from the halting row nearest to it in
    encoder time (the accuracy it gives or loses at about equal latency)."""
    lines = []
    for row in rows:
        halting = halting_rows(row, rows)
        if row["method"] in ("baseline", "halting") or not halting:
            continue
        axes = []
        for key, axis in (("encoder_ms", "on encoder time"), ("total_ms", "end to end")):
            by = dominating(row, rows, key)
            axes.append(f"dominated {axis} by {by}" if by else f"not dominated {axis}")
        near = min(halting, key=lambda r: abs(r["encoder_ms"] - row["encoder_ms"]))
        noise = f" (the split's noise on a difference: +-{row['vs_first_std']:.4f})" if "vs_first_std" in row else ""
        lines.append(
            f"- **{row['name']}** ({row['method']}): {', '.join(axes)}. Against {near['name']}, the halting point "
            f"nearest in encoder time: {row['mAPH_L2'] - near['mAPH_L2']:+.4f} mAPH_L2{noise} at "
            f"{row['encoder_ms'] / near['encoder_ms']:.2f}x its encoder and {row['total_ms'] / near['total_ms']:.2f}x "
            "its end-to-end time.")
    return lines


def markdown(result: dict) -> str:
    rows = table_rows(result["points"])
    b, m = result["bench"], result["machine"]
    # The objects' token-layers: a column where the points measured them (older pareto.json lack them)
    objects = any("object_token_layers" in row for row in rows)
    lines = [
        f"# {result.get('title', TITLE)}",
        "",
        f"Generated by `haltdet pareto {result['spec']} --out DIR` from its `pareto.json`: every point "
        f"evaluated on `{result['data']}`, all of them timed in one interleaved `haltdet bench` run "
        f"({b['frames']} frames, {b['threads']} threads, {b['device']}; {m['processor']}, torch {m['torch']}). "
        "Times are medians; compare rows of this table only. mAPH_L2: the seeds' mean (their range); "
        f"+- the split's noise, the std over {result.get('bootstrap', 0)} resampled frame sets; "
        f"vs first: the difference from the first point of the spec ({result['points'][0]['name']}) "
        "and its std over the same resampled sets. "
        + ("Token-layers: the share of the encoder's layers times tokens that it runs; objects': the same "
           "for the tokens inside ground-truth boxes. " if objects else "")
        + "Training: the steps and minutes of the run that wrote "
        "the checkpoint. Dominance: by a halting point at the same inference precision (each point's "
        "`dtype` in pareto.json).",
        "",
        *([result["about"], ""] if result.get("about") else []),
        "| method | point | seeds | mAPH_L2 | vs first | first stage | token-layers "
        + ("| objects' token-layers " if objects else "")
        + "| encoder ms | total ms | dominated on encoder ms by | on total ms by | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if objects else ""),
    ]
    for row in rows:
        spread = f" ({row['mAPH_L2_min']:.4f}-{row['mAPH_L2_max']:.4f})" if row["seeds"] > 1 else ""
        noise = f" +-{row['mAPH_L2_std']:.4f}" if "mAPH_L2_std" in row else ""
        versus = f"{row['vs_first']:+.4f} +-{row['vs_first_std']:.4f}" if "vs_first" in row else "-"
        share = f"{row['token_layers']:.3f}"
        if objects:
            share += f" | {row['object_token_layers']:.3f}" if "object_token_layers" in row else " | -"
        lines.append(
            f"| {row['method']} | {row['name']} | {row['seeds']} | {row['mAPH_L2']:.4f}{noise}{spread} | {versus} "
            f"| {row['mAPH_L2_first_stage']:.4f} | {share} | {row['encoder_ms']:.1f} "
            f"| {row['total_ms']:.1f} | {dominating(row, rows, 'encoder_ms') or '-'} "
            f"| {dominating(row, rows, 'total_ms') or '-'} | {training(row)} |")
    versus = comparisons(rows)
    if versus:
        lines += ["", "Each peer and ablation against the halting points:", "", *versus]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(result["points"])
    colours = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, label in ((axes[0], "encoder_ms", "encoder (ms)"), (axes[1], "total_ms", "whole detector (ms)")):
        for method in METHODS:
            members = [r for r in rows if r["method"] == method]
            if not members:
                continue
            x = [r[key] for r in members]
            y = [r["mAPH_L2"] for r in members]
            yerr = [[r["mAPH_L2"] - r["mAPH_L2_min"] for r in members],
                    [r["mAPH_L2_max"] - r["mAPH_L2"] for r in members]]
            ax.errorbar(x, y, yerr=yerr, fmt="o", color=colours[method], label=method, capsize=3)
        for number, r in enumerate(rows, 1):  # numbers, not names: the points crowd
            ax.annotate(str(number), (r[key], r["mAPH_L2"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        frontier, best = [], -1.0  # the halting points no other halting point dominates
        for r in sorted((r for r in rows if r["method"] == "halting"), key=lambda r: (r[key], -r["mAPH_L2"])):
            if r["mAPH_L2"] > best:
                frontier.append(r)
                best = r["mAPH_L2"]
        if frontier:
            ax.step([r[key] for r in frontier], [r["mAPH_L2"] for r in frontier], where="post",
                    color=colours["halting"], alpha=0.5, label="halting frontier" if ax is axes[0] else None)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAPH_L2")
    axes[0].legend(fontsize=8)
    key_text = "\n".join(f"{number} {r['name']}" for number, r in enumerate(rows, 1))
    fig.text(0.80, 0.5, key_text, fontsize=7, va="center", family="monospace")
    fig.subplots_adjust(left=0.06, right=0.79, wspace=0.05)
    fig.suptitle(f"accuracy against latency ({result['bench']['threads']} threads, {result['bench']['device']})")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
