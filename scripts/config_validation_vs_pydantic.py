"""Config validation: haltdet's hand-written type checks against pydantic (if installed).

    python scripts/config_validation_vs_pydantic.py [--repeat 10] [--json OUT]

haltdet.config turns a config's raw mapping into its dataclasses with `_build` /
`_coerce` (unknown keys, strict bool / int / finite float / str / list types, nested
sections, the RETIRED table of removed options), then each section's `validate()`
(ranges, cross-field rules). This script builds pydantic models for the same schema,
generated from the project's dataclasses (`dataclasses.fields` + `typing.get_type_hints`
-> `pydantic.create_model`, one BaseModel per section, nested sections as nested
models, same defaults) with `ConfigDict(strict=True, extra="forbid",
allow_inf_nan=False)`. That is the closest semantics found: `TypeAdapter(Config,
config=...)` is refused for dataclasses, and a strict `pydantic.dataclasses` version of
the dataclasses wants dataclass instances, not mappings, as input in strict mode.

Then, for each bad config in BAD_CASES (YAML text, parsed as the loader parses a file;
one built with `apply_override` as `--set` does), both refuse it or not:

* haltdet: `haltdet.config.config_from_dict(values)`, a `ConfigError`;
* pydantic: the model's `model_validate(values)`, a `ValidationError` (its message shown
  as the error count and the first error's location and message: the first line of
  pydantic's text only names the model); where pydantic accepts, the values go into the
  project's dataclasses and their `validate()` runs, as a pydantic-based loader would do.

CONTROLS are configs haltdet accepts (the bundled presets, retired options at their off
values), given to both too. Also reported: the lines of config.py that pydantic would
replace and those that stay hand-written (counted from the source with `inspect`), the
glue a pydantic loader would need (the functions of this script marked GLUE, counted
the same way), the import time of `haltdet.config` and of pydantic plus building the
models (median of --repeat fresh interpreters, timed inside each around the import), and
the time to validate one config (a preset: median of 7 timeit runs), types only and with
`validate()`.

Run it pinned beside other work, e.g.
`OMP_NUM_THREADS=1 nice -n 10 taskset -c 1 python scripts/config_validation_vs_pydantic.py`.
Skips (exit 0) when pydantic is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import inspect
import json
import statistics
import subprocess
import sys
import textwrap
import timeit
import typing
from pathlib import Path

import yaml

from haltdet import ConfigError
from haltdet import config as hconfig

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]

# name, YAML text of the config's raw mapping, which step of haltdet should catch it
BAD_CASES = [
    ("unknown key, top level", "bogus: 1", "types"),
    ("misspelt section", "modle: {d_model: 64}", "types"),
    ("unknown key, nested", "model: {dmodel: 64}", "types"),
    ('"3" for an int', 'model: {num_layers: "3"}', "types"),
    ("1.5 for an int", "train: {batch_size: 1.5}", "types"),
    ("2.0 for an int", "train: {max_steps: 2.0}", "types"),
    ("true for an int", "train: {max_steps: true}", "types"),
    ('"yes" for a bool', 'data: {flip: "yes"}', "types"),
    ("1 for a bool", "model: {recycling: 1}", "types"),
    ("NaN for a float", "train: {lr: .nan}", "types"),
    ("inf for a float", "model: {pillar_size: .inf}", "types"),
    ("1.0e+400 (inf) for a float", "train: {lr: 1.0e+400}", "types"),
    ("10**400 int for a float", "train: {grad_clip: 1" + "0" * 400 + "}", "types"),
    ("1e-3 (PyYAML: a string) for a float", "train: {lr: 1e-3}", "types"),
    ("a string for a list", 'model: {nms_iou: "0.2"}', "types"),
    ("a list item of the wrong type", 'model: {halting_layers: [2, "4"]}', "types"),
    ("null in a float list", "model: {point_cloud_range: [-61.44, -61.44, null, 61.44, 61.44, 3.0]}", "types"),
    ("3 for a string", "name: 3", "types"),
    ("a section that is a list", "model: [64, 4]", "types"),
    ("an empty section (null)", "train:", "types"),
    ("--set train.max_steps=1e3 (a string)", None, "types"),
    ("negative batch size", "train: {batch_size: -1}", "validate"),
    ("zero layers", "model: {num_layers: 0}", "validate"),
    ("seed 2**64", "train: {seed: 18446744073709551616}", "validate"),
    ("dropout 1.0", "model: {dropout: 1.0}", "validate"),
    ("pfn_channels[-1] != d_model", "model: {pfn_channels: [32, 48]}", "validate"),
    ("halting layers not increasing", "model: {halting_layers: [4, 2]}", "validate"),
    ("groups combined with halting", "model: {group_size: 64, halting_layers: [2, 4]}", "validate"),
    ("scale low > high", "data: {scale: [1.1, 0.9]}", "validate"),
    ("unknown halting_rule", "model: {halting_rule: sometimes}", "validate"),
    ("pillar size not dividing the range", "model: {pillar_size: 0.33}", "validate"),
    ("retired option turned on", "model: {iou_head: true}", "retired"),
    ("retired option at a non-off value", "train: {sparsity_start: 0.3}", "retired"),
]
CONTROLS = [
    ("empty config", "{}"),
    ("int for a float", "train: {lr: 1}"),
    ("retired options at their off values", "model: {iou_head: false, iou_rectify: [0.7, 0.7, 0.7]}\n"
                                            "train: {iou_weight: 2.0, sparsity_start: 0.0}"),
] + [(f"preset {name}", f"preset:{name}") for name in ("baseline", "halting", "halting_large_refine", "peer_act")]


def case_values(name: str, text: str | None) -> dict:
    if text is None:  # the one --set case
        values: dict = {}
        hconfig.apply_override(values, "train.max_steps=1e3")
        return values
    if text.startswith("preset:"):
        return preset_values(text.removeprefix("preset:"))
    return yaml.safe_load(text)


def preset_values(name: str) -> dict:
    """A bundled preset's raw mapping, its `base` chain merged, as load_config reads it."""
    return hconfig._read_with_base(hconfig._config_path(name), [])


# ----------------------------------------------------------------------------- pydantic side
# GLUE: what a pydantic-based loader would need besides pydantic itself.

def pydantic_model(cls, pydantic):  # GLUE
    """A strict pydantic model of a config dataclass (nested dataclasses: nested models)."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        hint = pydantic_model(hints[f.name], pydantic) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name]
        default = (pydantic.Field(default_factory=f.default_factory)
                   if f.default_factory is not dataclasses.MISSING else f.default)
        fields[f.name] = (hint, default)
    config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    model = pydantic.create_model(cls.__name__, __config__=config, **fields)
    model.dataclass = cls
    return model


def to_dataclasses(instance):  # GLUE
    """A validated model instance -> the project's dataclasses (for their validate())."""
    return instance.dataclass(**{name: to_dataclasses(value) if hasattr(value, "dataclass") else value
                                 for name, value in instance})


def strip_retired(values: dict) -> dict:  # GLUE
    """The RETIRED table as a pass before pydantic: off values dropped, others refused."""
    values = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    for path, off in hconfig.RETIRED.items():
        section, key = path.split(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            value = values[section].pop(key)
            if off is not None and value != off:
                raise ConfigError(f"config key '{path}': removed (measured not to help, docs/experiments.md); "
                                  f"only {off!r}, off, is accepted")
    return values


def pydantic_config_error(err) -> ConfigError:  # GLUE
    """A pydantic ValidationError as the project's one-line ConfigError naming the key."""
    first = err.errors()[0]
    key = ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in first["loc"]).replace(".[", "[")
    return ConfigError(f"config key '{key}': {first['msg']}, got {first['input']!r}")


def pydantic_message(err) -> str:
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"])
    return f"{len(errors)} error{'s' if len(errors) > 1 else ''}; {loc}: {first['msg']} [{first['type']}]"


def run_pydantic(model, values, pydantic) -> tuple[str, str, str]:
    """("pydantic" | "validate()" (the step that refused) | "accepted", its message, the
    message as the project's ConfigError)."""
    try:
        instance = model.model_validate(values)
    except pydantic.ValidationError as err:
        return "pydantic", pydantic_message(err), str(pydantic_config_error(err))
    try:
        to_dataclasses(instance).validate()
    except ConfigError as err:
        return "validate()", str(err), str(err)
    return "accepted", "", ""


def short(message: str) -> str:
    return textwrap.shorten(message, 110, placeholder=" ...")


def run_haltdet(values) -> tuple[str, str]:
    try:
        hconfig.config_from_dict(values)
    except ConfigError as err:
        return "refused", str(err)
    return "accepted", ""


# ----------------------------------------------------------------------------- line counts

def source_lines(obj) -> tuple[int, int, list[str]]:
    lines, start = inspect.getsourcelines(obj)
    return start, start + len(lines) - 1, lines


def line_counts() -> dict:
    """Lines of config.py (physical lines, from inspect) pydantic would replace or not."""
    coerce_start, coerce_end, _ = source_lines(hconfig._coerce)
    build_start, build_end, build = source_lines(hconfig._build)
    retired_first = next(i for i, line in enumerate(build) if "if path in RETIRED" in line)
    retired_last = next(i for i in range(retired_first, len(build)) if build[i].strip() == "continue")
    retired_in_build = retired_last - retired_first + 1
    replaced = {
        "_coerce": [coerce_start, coerce_end, coerce_end - coerce_start + 1],
        "_build less its RETIRED branch": [build_start, build_end, len(build) - retired_in_build],
    }
    source = Path(inspect.getsourcefile(hconfig)).read_text().splitlines()
    retired_table = [i + 1 for i, line in enumerate(source) if line.startswith("RETIRED =")][0]
    table_end = retired_table
    while not source[table_end - 1].rstrip().endswith("}"):
        table_end += 1
    kept = {f"{cls.__name__}.validate": source_lines(cls.validate) for cls in
            (hconfig.ModelConfig, hconfig.DataConfig, hconfig.TrainConfig, hconfig.Config)}
    kept |= {name: source_lines(getattr(hconfig, name)) for name in (
        "_check", "config_from_dict", "load_config", "_config_path", "_read_with_base", "yaml_problem",
        "apply_override", "inference_overrides")}
    kept = {name: [start, end, end - start + 1] for name, (start, end, _) in kept.items()}
    kept["RETIRED table"] = [retired_table, table_end, table_end - retired_table + 1]
    kept["RETIRED branch of _build"] = [build_start + retired_first, build_start + retired_last, retired_in_build]
    glue = {}
    for name, function in (("pydantic_model", pydantic_model), ("to_dataclasses", to_dataclasses),
                           ("strip_retired", strip_retired), ("pydantic_config_error", pydantic_config_error)):
        start, end, _ = source_lines(function)
        glue[name] = [start, end, end - start + 1]
    return {"config_py_lines": len(source), "replaced": replaced, "kept": kept, "glue": glue,
            "replaced_total": sum(v[2] for v in replaced.values()), "kept_total": sum(v[2] for v in kept.values()),
            "glue_total": sum(v[2] for v in glue.values())}


# ----------------------------------------------------------------------------- timings

# One fresh interpreter: the times of these steps, in this order (each timed inside it).
IMPORT_STEPS = """\
import time, importlib.util
t0 = time.perf_counter()
import haltdet.config
t1 = time.perf_counter()
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
t2 = time.perf_counter()
spec = importlib.util.spec_from_file_location("cvp", {script!r})
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
import pydantic
t3 = time.perf_counter()
script.pydantic_model(haltdet.config.Config, pydantic)
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t4 - t3)
"""
ALONE = """\
import time
t0 = time.perf_counter()
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
print(time.perf_counter() - t0)
"""


def import_seconds(repeat: int) -> dict:
    """Median and best seconds of each step over --repeat fresh interpreters."""
    steps = [[float(t) for t in subprocess.run([sys.executable, "-c", IMPORT_STEPS.format(script=str(SCRIPT))],
                                               capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()]
             for _ in range(repeat)]
    alone = [float(subprocess.run([sys.executable, "-c", ALONE], capture_output=True, text=True, check=True,
                                  cwd=ROOT).stdout) for _ in range(repeat)]
    columns = {"import haltdet.config": [row[0] for row in steps],
               "then pydantic (the names a loader uses)": [row[1] for row in steps],
               "then building the models": [row[2] for row in steps],
               "pydantic alone, fresh interpreter": alone}
    return {name: {"median_s": statistics.median(times), "min_s": min(times)} for name, times in columns.items()}


class _CachedHints:
    """`typing` for config.py with get_type_hints cached (one timing row; config.py
    evaluates its string annotations again on every _build call)."""

    get_type_hints = staticmethod(functools.cache(typing.get_type_hints))

    def __getattr__(self, name):
        return getattr(typing, name)


def per_config_seconds(model, pydantic) -> dict:
    values = preset_values("halting")
    built = hconfig.config_from_dict(values)
    candidates = {
        "haltdet types (_build)": lambda: hconfig._build(hconfig.Config, values, ""),
        "haltdet types, get_type_hints cached": lambda: hconfig._build(hconfig.Config, values, ""),
        "pydantic types (model_validate)": lambda: model.model_validate(values),
        "validate() alone (the same in both)": built.validate,
        "haltdet full (config_from_dict)": lambda: hconfig.config_from_dict(values),
        "pydantic full (+ dataclasses + validate())": lambda: to_dataclasses(model.model_validate(values)).validate(),
    }
    out = {}
    for name, function in candidates.items():
        if "cached" in name:
            hconfig.typing = _CachedHints()
        try:
            number, _ = timeit.Timer(function).autorange()
            runs = timeit.Timer(function).repeat(7, number)
        finally:
            hconfig.typing = typing
        out[name] = {"median_s": statistics.median(runs) / number, "min_s": min(runs) / number}
    return out


def install_size(distributions: list[str]) -> dict:
    out = {}
    for name in distributions:
        dist = importlib.metadata.distribution(name)
        files = [Path(dist.locate_file(f)) for f in dist.files or []]
        out[name] = {"version": dist.version,
                     "installed_bytes": sum(f.stat().st_size for f in files if f.is_file())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="fresh interpreters per import timing")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    parser.add_argument("--no-timings", action="store_true", help="only the cases and the line counts")
    args = parser.parse_args()
    try:
        import pydantic
    except ImportError:
        print("pydantic is not installed (pip install pydantic): nothing to compare")
        return
    model = pydantic_model(hconfig.Config, pydantic)

    rows = []
    for name, text, step in BAD_CASES:
        values = case_values(name, text)
        haltdet_result, haltdet_msg = run_haltdet(values)
        pydantic_result, pydantic_msg, as_config_error = run_pydantic(model, values, pydantic)
        rows.append({"case": name, "yaml": text, "haltdet_step": step, "haltdet": haltdet_result,
                     "haltdet_message": haltdet_msg, "pydantic": pydantic_result, "pydantic_message": pydantic_msg,
                     "pydantic_as_config_error": as_config_error,
                     "both_refused": haltdet_result == "refused" and pydantic_result != "accepted"})
    controls = []
    for name, text in CONTROLS:
        values = case_values(name, text)
        haltdet_result, haltdet_msg = run_haltdet(values)
        pydantic_result, pydantic_msg, _ = run_pydantic(model, values, pydantic)
        try:
            with_pass = run_pydantic(model, strip_retired(values), pydantic)[0]
        except ConfigError:
            with_pass = "strip_retired"
        controls.append({"case": name, "haltdet": haltdet_result, "haltdet_message": haltdet_msg,
                         "pydantic": pydantic_result, "pydantic_message": pydantic_msg,
                         "pydantic_after_strip_retired": with_pass})

    width = max(len(r["case"]) for r in rows + controls)
    print(f"{'case':<{width}} | haltdet's message | pydantic's message (count; first error) | both refused?")
    for r in rows:
        pyd = r["pydantic_message"] if r["pydantic"] == "pydantic" else (
            f"accepted; validate(): {r['pydantic_message']}" if r["pydantic"] == "validate()" else "ACCEPTED")
        print(f"{r['case']:<{width}} | {short(r['haltdet_message'] or 'ACCEPTED')} | {short(pyd)} | "
              f"{'yes' if r['both_refused'] else 'NO'}")
    differ = [r["case"] for r in rows if not r["both_refused"]]
    by_pydantic = sum(r["pydantic"] == "pydantic" for r in rows)
    print(f"\n{len(rows)} bad configs: haltdet refused {sum(r['haltdet'] == 'refused' for r in rows)}; "
          f"pydantic's types refused {by_pydantic}, validate() after pydantic "
          f"{sum(r['pydantic'] == 'validate()' for r in rows)}; differ: {', '.join(differ) or 'none'}")
    print("\ncontrols (haltdet accepts):")
    for c in controls:
        print(f"{c['case']:<{width}} | haltdet {c['haltdet']} | pydantic: "
              f"{short(c['pydantic_message']) if c['pydantic'] != 'accepted' else 'accepted'} | "
              f"after strip_retired: {c['pydantic_after_strip_retired']}")

    lines = line_counts()
    print(f"\nconfig.py: {lines['config_py_lines']} lines. pydantic would replace {lines['replaced_total']}:")
    for name, (start, end, count) in lines["replaced"].items():
        print(f"  {name}: lines {start}-{end}, {count}")
    print(f"stays hand-written: {lines['kept_total']} lines: "
          + ", ".join(f"{name} {count}" for name, (_, _, count) in lines["kept"].items()))
    print(f"plus the dataclasses (the schema, kept in both). glue a pydantic loader adds: {lines['glue_total']} "
          "lines: " + ", ".join(f"{name} {count}" for name, (_, _, count) in lines["glue"].items()))

    imports = per_config = None
    if not args.no_timings:
        imports, per_config = import_seconds(args.repeat), per_config_seconds(model, pydantic)
        print_timings(imports, per_config, args.repeat)
    sizes = install_size(["pydantic", "pydantic-core", "annotated-types", "typing-inspection"])
    print("installed: " + ", ".join(f"{name} {s['version']} {s['installed_bytes'] / 2**20:.1f} MiB"
                                    for name, s in sizes.items()))

    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "controls": controls, "differ": differ, "lines": lines,
                                         "import_seconds": imports, "validate_seconds_per_config": per_config,
                                         "install": sizes, "python": sys.version.split()[0]}, indent=1))
        print(f"\nwrote {args.json}")


def print_timings(imports: dict, per_config: dict, repeat: int) -> None:
    print(f"\nimport time, median of {repeat} fresh interpreters:")
    for name, t in imports.items():
        print(f"  {name:<44} {t['median_s'] * 1e3:8.1f} ms (best {t['min_s'] * 1e3:.1f})")
    print("validating the 'halting' preset, per config, median of 7 runs:")
    for name, t in per_config.items():
        print(f"  {name:<44} {t['median_s'] * 1e6:8.1f} us (best {t['min_s'] * 1e6:.1f})")


if __name__ == "__main__":
    main()
