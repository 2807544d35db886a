"""The scripts stay runnable. scripts/train_bundled.sh, which trains the bundled checkpoints: bash
parses it, and every haltdet command in it parses with today's CLI and names configs that
exist."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from haltdet.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_bundled.sh"


def test_train_bundled_script_parses_with_the_cli():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    commands = [line.split("$HALTDET", 1)[1] for line in SCRIPT.read_text().splitlines()
                if "$HALTDET " in line and not line.lstrip().startswith("#")]
    assert len(commands) == 12  # 3 x data synth, 6 x train, 3 x eval
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command.replace('"$RUNS', '"runs')))
        if getattr(args, "config", None):
            assert (ROOT / args.config).exists(), args.config


def test_profile_train_step_times_and_profiles_a_config(tiny_config):
    config = tiny_config(batch_size=2)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_train_step.py"), "--config",
                             str(config), "--steps", "2", "--rows", "3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "seconds per step" in result.stdout and "Self CPU" in result.stdout


def test_reproduce_results_runs_build_and_the_specs_name_them():
    """scripts/reproduce_results.sh: bash parses it, every run's config (with its overrides)
    builds a model, and the pareto specs name only checkpoints the script trains."""
    from haltdet.config import load_config
    from haltdet.model.detector import Detector
    from haltdet.pareto import load_spec

    script = ROOT / "scripts" / "reproduce_results.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    runs = {}
    for line in text.split("RUN_LIST=(", 1)[1].split(")\n", 1)[0].splitlines():
        if line.strip().startswith('"'):
            name, config, overrides = line.strip().strip('"').split("|")
            runs[name] = load_config(config, shlex.split(overrides)[1::2])
            Detector(runs[name].model)
    assert len(runs) == 19 and runs["groups"].model.group_size == 69
    assert runs["coarse_064"].model.pillar_size == 0.64 and runs["halting_s1"].train.seed == 1
    assert runs["gradient_hard"].model.halting_gradient == "hard"
    refine = load_config("halting_large_refine")
    assert refine.train.refine_only and Detector(refine.model).refiner is not None
    assert refine.model.pillar_size == runs["halting_large_s0"].model.pillar_size == 0.24
    trained = {f"runs/results/{name}/final.pt" for name in runs} | {"runs/results/halting_large_refine/final.pt"}
    for spec in ("pareto_spec.yaml", "pareto_two_stage_spec.yaml"):
        loaded = load_spec(ROOT / "docs" / "results" / spec)
        assert {p["checkpoint"] for p in loaded["points"]} <= trained | {"baseline", "halting"}, spec
        assert f"--out {loaded['data']} " in text, spec  # the script makes the split it evaluates on
        assert f"pareto docs/results/{spec}" in text


def test_reproduce_results_finetune_runs_build_start_from_the_baseline_and_the_spec_names_them():
    """scripts/reproduce_results_finetune.sh: bash parses it, every run's config builds a
    model the bundled baseline's first stage loads into, and its spec names those runs."""
    from haltdet.checkpoint import load_checkpoint
    from haltdet.config import load_config
    from haltdet.model.detector import Detector
    from haltdet.pareto import load_spec

    script = ROOT / "scripts" / "reproduce_results_finetune.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    first_stage = {k: v for k, v in load_checkpoint(ROOT / "haltdet" / "checkpoints" / "baseline.pt")["model"].items()
                   if not k.startswith("refiner.")}
    runs = {}
    for line in text.split("RUN_LIST=(", 1)[1].split(")\n", 1)[0].splitlines():
        if line.strip().startswith('"'):
            name, config, overrides = line.strip().strip('"').split("|")
            runs[name] = load_config(config, shlex.split(overrides)[1::2])
            missing, unexpected = Detector(runs[name].model).load_state_dict(first_stage, strict=False)
            assert not unexpected, name
    assert len(runs) == 16 and runs["coarse_064"].model.pillar_size == 0.64
    assert runs["halting_s1"].train.seed == 1 and runs["gradient_hard"].model.halting_gradient == "hard"
    spec = load_spec(ROOT / "docs" / "results" / "pareto_finetune_spec.yaml")
    assert {p["checkpoint"] for p in spec["points"]} == {f"runs/finetune/{name}/final.pt" for name in runs}
    assert f"--out {spec['data']} " in text and "pareto docs/results/pareto_finetune_spec.yaml" in text


def test_reproduce_results_budget_runs_build_and_the_spec_names_them():
    """scripts/reproduce_results_budget.sh: bash parses it, every run's config builds a model,
    the runs that continue from the baseline's snapshot load its weights and keep the
    baseline's budget, and its spec names those runs."""
    from haltdet.config import load_config
    from haltdet.model.detector import Detector
    from haltdet.pareto import load_spec

    script = ROOT / "scripts" / "reproduce_results_budget.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    phases = [{}, {}, {}, {}]
    blocks = text.split("RUN_LIST=(")[1:]
    assert len(blocks) == len(phases)
    for phase, block in zip(phases, blocks):
        for line in block.split(")\n", 1)[0].splitlines():
            if line.strip().startswith('"'):
                name, config, overrides = line.strip().strip('"').split("|")
                phase[name] = load_config(config, shlex.split(overrides)[1::2])
    scratch, continued, wide, second = phases
    snapshot = scratch["baseline_s1"]
    assert snapshot.train.seed == 1 and 2900 in snapshot.train.save_steps
    assert 'FRESH_ARGS=(--init "$RUNS/baseline_s1/step_2900.pt")' in blocks[1]
    assert 'FRESH_ARGS=(--init "$RUNS/size_wide/step_2900.pt")' in blocks[2]
    assert 'FRESH_ARGS=(--init "$RUNS/baseline_s0/step_2900.pt")' in blocks[3]
    assert "train.max_steps=1100" in text and 2900 + 1100 == snapshot.train.max_steps
    wider, seed0 = scratch["size_wide"], scratch["baseline_s0"]
    assert 2900 in wider.train.save_steps and wider.model.d_model == 96
    assert 2900 in seed0.train.save_steps and seed0.train.seed == 0 and seed0.model == snapshot.model
    for start, runs in ((snapshot, continued), (wider, wide), (seed0, second)):
        weights = Detector(start.model).state_dict()
        for name, config in runs.items():  # the snapshot loads: only scorers and extra layers start afresh
            model = Detector(config.model).state_dict()
            new = set(model) - set(weights)
            extra = {f"encoder.layers.{i}." for i in range(start.model.num_layers, config.model.num_layers)}
            assert all(".halting." in key or key.startswith(tuple(extra)) for key in new), (name, new)
            assert all(model[k].shape == weights[k].shape for k in set(model) & set(weights)), name
    assert continued["halting_deep"].model.num_layers == 8 and continued["size_shallow"].model.num_layers == 4
    assert continued["halting"].model.halting_gradient == "residual"
    assert continued["gradient_both"].model.halting_gradient == "both"
    assert scratch["halting_scratch"].train.sparsity_warmup == 0.5
    assert scratch["halting_scratch_residual"].model.halting_gradient == "residual"
    assert scratch["halting_scratch_start025"].train.halting_start == 0.25
    assert scratch["halting_scratch_residual_s1"].train.seed == 1
    assert scratch["halting_scratch_start05_s1"].train.halting_start == 0.5
    assert not continued["baseline_restart"].model.halting_layers  # the schedule's control
    for path in ("residual", "both"):  # the gradient paths at equal cost
        for name in (f"target_{path}", f"target_{path}_s1"):
            assert continued[name].model.halting_gradient == path and continued[name].train.sparsity_target == 0.4
    runs = {**scratch, **continued, **wide, **second}
    named = set()
    for page in ("budget", "capacity"):
        spec = load_spec(ROOT / "docs" / "results" / f"pareto_{page}_spec.yaml")
        named |= {p["checkpoint"] for p in spec["points"]}
        assert f"--out {spec['data']} " in text and f"pareto docs/results/pareto_{page}_spec.yaml" in text
    assert named == {f"runs/budget/{name}/final.pt" for name in runs}


def test_encoder_layers_script_times_every_layer_and_the_halting_stages():
    """scripts/encoder_layers.py: one line per layer with the tokens it processed (all of
    them for the baseline, fewer after each stage for the halting model), and the halting
    model's stage and partition overheads; with --unpacked, each model again without
    packing, on the same tokens."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "encoder_layers.py"), "baseline", "halting",
                             "--threads", "1", "--frames", "2", "--warmup", "1", "--unpacked"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    blocks = {}
    for line in result.stdout.splitlines()[1:]:
        if not line.startswith(" "):
            name = line.split(":")[0]
            blocks[name] = []
        blocks[name].append(line)
    assert list(blocks) == ["baseline", "baseline, unpacked", "halting", "halting, unpacked"]
    assert all("halting stages" in "\n".join(blocks[n]) and "survivors' partitions" in "\n".join(blocks[n])
               for n in ("halting", "halting, unpacked"))
    counts = {name: [int(line.split()[2]) for line in lines if line.strip().startswith("layer ")]
              for name, lines in blocks.items()}
    assert counts["baseline, unpacked"] == counts["baseline"] and counts["halting, unpacked"] == counts["halting"]
    base, halting = counts["baseline"], counts["halting"]
    assert len(base) == len(halting) == 6
    assert len(set(base)) == 1 and halting[0] == base[0]
    assert halting == sorted(halting, reverse=True) and halting[-1] < halting[0]


def test_crc32c_speed_script_runs_and_checks_agreement():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "crc32c_speed.py"), "--megabytes", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "numpy (haltdet)" in result.stdout and "MB/s" in result.stdout


def test_protobuf_vs_wire_script_decoders_agree_on_the_waymo_fixtures(tmp_path):
    """scripts/protobuf_vs_wire.py: on the real Waymo records, haltdet's wire decoder and the
    protobuf runtime reach the same values, and both reject a record cut in half."""
    pytest.importorskip("google.protobuf")
    data = ROOT.parent / "shared" / "data" / "real" / "waymo"
    if not (data / "val.tfrecord").is_file() or not (data / "pvps_data_one_frame.tfrecord").is_file():
        pytest.skip(f"Waymo fixtures not available in {data}")
    out = tmp_path / "numbers.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "protobuf_vs_wire.py"), "--data", str(data),
                             "--repeat", "2", "--sweep-max-bytes", "0", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = {row["record"]: row for row in json.loads(out.read_text())["records"]}
    assert {"val.tfrecord#0", "pvps_data_one_frame.tfrecord#0"} <= set(records)
    assert records["val.tfrecord#0"]["labels"] == 18 and records["pvps_data_one_frame.tfrecord#0"]["labels"] == 75
    for row in records.values():
        assert row["agree"] and row["differences"] == [], row["differences"]
        cut = row["malformed"]["truncated at half"]
        assert cut["wire"][0] == cut["protobuf"][0] == "error"


def test_config_validation_vs_pydantic_cases_are_all_refused_by_haltdet(tmp_path):
    """scripts/config_validation_vs_pydantic.py: every bad config in its list is refused by
    haltdet's loader, and the configs it gives as controls are accepted."""
    pytest.importorskip("pydantic")
    out = tmp_path / "numbers.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_validation_vs_pydantic.py"),
                             "--no-timings", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert len(numbers["cases"]) >= 15
    for row in numbers["cases"]:
        assert row["haltdet"] == "refused" and row["haltdet_message"], row["case"]
    assert all(row["haltdet"] == "accepted" for row in numbers["controls"])
    assert numbers["lines"]["replaced_total"] > 0


def test_lanes_train_each_run_once_resume_stopped_ones_and_skip_finished_ones(tmp_path):
    """scripts/lanes.sh with a stand-in for haltdet: every entry of RUN_LIST is trained once,
    with FRESH_ARGS only when it starts, COMMON_ARGS and its own overrides always."""
    fake = tmp_path / "fake_haltdet"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    (runs / "stopped").mkdir(parents=True)
    (runs / "stopped" / "latest.pt").write_text("")
    (runs / "finished").mkdir()
    (runs / "finished" / "final.pt").write_text("")
    script = (f'set -euo pipefail; HALTDET={fake}; RUNS={runs}; LANES=2\n'
              'RUN_LIST=("new|baseline|--set train.seed=1" "stopped|halting|" "finished|halting|" "other|peer_topk|")\n'
              'FRESH_ARGS=(--init start.pt); COMMON_ARGS=(--set train.max_steps=7)\n'
              f'. {ROOT / "scripts" / "lanes.sh"}\nrun_lanes\n')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "CALLS": str(tmp_path / "calls")})
    assert result.returncode == 0, result.stderr
    calls = {line.split(" --out ")[1].split()[0]: line for line in (tmp_path / "calls").read_text().splitlines()}
    assert sorted(calls) == [f"{runs}/{name}" for name in ("new", "other", "stopped")]
    assert sorted(line.split()[-1] for line in result.stdout.splitlines()) == ["done"] * 3
    new, other, stopped = (calls[f"{runs}/{name}"] for name in ("new", "other", "stopped"))
    assert new.startswith(f"train --config baseline --out {runs}/new --threads 1 --quiet")
    assert new.endswith("--init start.pt --set train.max_steps=7 --set train.seed=1")
    assert other.endswith("--init start.pt --set train.max_steps=7")
    assert stopped.endswith("--resume --set train.max_steps=7") and "--init" not in stopped


def test_halting_oracle_script_keeps_the_objects_and_runs_every_token(tiny_data, tmp_path):
    """scripts/halting_oracle.py: with ground-truth scores every object token runs every
    layer; with nothing halting every token does; the learned scorers halt some."""
    out = tmp_path / "oracle.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "halting_oracle.py"), "halting",
                             "--baseline", "baseline", "--data", str(tiny_data), "--frames", "2",
                             "--bootstrap", "5", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["learned", "objects kept", "objects first", "nothing halts", "baseline"]
    assert rows["learned"]["token_layers"] < 1 and rows["learned"]["foreground_token_layers"] < 1
    assert rows["objects kept"]["foreground_token_layers"] == 1.0
    assert rows["nothing halts"]["token_layers"] == rows["nothing halts"]["foreground_token_layers"] == 1.0
    assert all(rows[name]["difference"] is not None for name in list(rows)[1:])


def test_ground_truth_halting_trains_and_is_evaluated_against_a_reference(tiny_config, tmp_path):
    """scripts/halting_oracle_train.py trains a halting model whose decisions are the
    ground truth's (object tokens run every layer, the rest halt at the first stage), and
    scripts/halting_oracle.py evaluates it with the same decisions against a reference."""
    config = tiny_config(model={"num_layers": 4, "halting_layers": [1, 3]}, sparsity_weight=0.0, max_steps=2)
    run = tmp_path / "gt"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "halting_oracle_train.py"), "--",
                             "--config", str(config), "--out", str(run), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert 0.25 < log[0]["token_layers"] < 1  # the first stage's share and the objects' layers
    data = yaml.safe_load(config.read_text())["data"]["train"]
    out = tmp_path / "oracle.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "halting_oracle.py"), str(run / "final.pt"),
                             "--rules", "objects only", "--reference", str(run / "final.pt"), "--data", data,
                             "--bootstrap", "5", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["reference", "learned", "objects only"]
    assert rows["learned"]["difference"] == 0.0  # the model against itself
    only = rows["objects only"]
    assert only["foreground_token_layers"] == 1.0 and only["token_layers"] < 1


def test_marked_ground_truth_decisions_halt_nothing_and_reach_the_bev_stage(tiny_config, tmp_path):
    """scripts/halting_oracle_train.py --mark-only trains with every token running every
    layer; scripts/halting_oracle.py "objects marked" evaluates it so; the marks change
    what the BEV stage receives (the halting-stage embedding of the ground-truth decisions)."""
    config = tiny_config(model={"num_layers": 4, "halting_layers": [1, 3], "halt_stage_embedding": True},
                         sparsity_weight=0.0, max_steps=2)
    run = tmp_path / "marked"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "halting_oracle_train.py"), "--mark-only",
                             "--", "--config", str(config), "--out", str(run), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(entry["token_layers"] == 1.0 for entry in log)
    data = yaml.safe_load(config.read_text())["data"]["train"]
    out = tmp_path / "oracle.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "halting_oracle.py"), str(run / "final.pt"),
                             "--rules", "objects marked", "--data", data, "--bootstrap", "5", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["rows"]["objects marked"]["token_layers"] == 1.0

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from halting_oracle import GroundTruthScores, batches_of_boxes
    finally:
        sys.path.pop(0)
    from haltdet.checkpoint import load_model
    from haltdet.data.dataset import FrameFolder, collate

    frames = [FrameFolder(data)[i] for i in range(2)]
    assert all(len(frame.boxes) for frame in frames)
    points = collate(frames).points
    plain, _ = load_model(run / "final.pt")
    plain.configure(halting_threshold=[0.0, 0.0])
    model, _ = load_model(run / "final.pt")
    GroundTruthScores(model, "objects marked", 0.0).batches = batches_of_boxes(data, 2, 2)
    with torch.no_grad():
        unmarked, marked = plain(points), model(points)
    assert torch.equal(unmarked.encoded.features, marked.encoded.features)  # the same tokens, every layer
    assert not torch.equal(unmarked.heatmap, marked.heatmap)


def test_halting_scorer_auc_by_hand_and_on_a_split(tiny_data, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from halting_scorer_auc import roc_auc
    finally:
        sys.path.pop(0)
    positive = torch.tensor([True, True, False, False, False])
    # positives 0.9 and 0.4 against negatives 0.1, 0.4, 0.95: (2 + 1.5) / 6
    assert roc_auc(torch.tensor([0.9, 0.4, 0.1, 0.4, 0.95]), positive) == pytest.approx(3.5 / 6)
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3]), positive) == 1.0
    out = tmp_path / "auc.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "halting_scorer_auc.py"), "halting",
                             "--data", str(tiny_data), "--frames", "2", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stages = json.loads(out.read_text())["models"]["halting"]
    assert [row["layer"] for row in stages] == [2, 4]
    assert stages[0]["object_tokens"] > 0 and stages[1]["tokens"] < stages[0]["tokens"]
    assert all(0 <= row["auc"] <= 1 and 0 <= row["objects_kept"] <= 1 for row in stages)


def test_bev_support_script_counts_the_cells_the_dense_stage_computes(monkeypatch):
    """scripts/bev_support.py: its shares are those of the cells each 3x3 convolution of
    the inference dense stage computes (head.SparseMap), growing from one convolution to
    the next; the command prints one row per frame and the median."""
    import importlib.util

    from haltdet.bench import bench_cloud, load_spec
    from haltdet.model import head
    from haltdet.model.pillars import PointBatch

    spec = importlib.util.spec_from_file_location("bev_support", ROOT / "scripts" / "bev_support.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = load_spec("baseline", "cpu")
    cloud = bench_cloud(10_000)
    computed = []
    conv = head.SparseMap.conv3x3_relu
    monkeypatch.setattr(head.SparseMap, "conv3x3_relu",
                        lambda self, *args: computed.append(r := conv(self, *args)) or r)
    with torch.no_grad():
        model(PointBatch.from_list([cloud]))
    shares = script.support_shares(model, cloud)
    assert len(shares) == len(computed) == 3 and shares == sorted(shares) and 0 < shares[0] < shares[-1] < 0.5
    assert [m.cells.numel() / (m.shape[1] * m.shape[2]) for m in computed] == pytest.approx(shares, abs=1e-12)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bev_support.py"), "--frames", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["bench", "bench", "median"]
    assert [float(v) for v in lines[1].split()[3:]] == pytest.approx(shares, abs=1e-3)


def test_encoder_bound_products_are_the_work_bench_counts():
    """scripts/encoder_bound.py times exactly the products whose operations `haltdet bench`
    counts as the encoder's useful work (`encoder_flop`), and prints the bound beside the
    encoder as run and the flat-group peer, and with --profile N the N costliest operators;
    halting models are refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from encoder_bound import products
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from haltdet.bench import bench_cloud, encoder_flop, load_spec
    from haltdet.model.pillars import PointBatch

    model = load_spec("baseline", "cpu")
    with torch.no_grad():
        tokens = model.pillar_net(PointBatch.from_list([bench_cloud(10_000)]))
        encoded = model.encoder(tokens.features, tokens.coords, 1)
    work = products(model.encoder, tokens.features, tokens.coords)
    assert {kind for kind, _, _ in work} == {"linear", "attention"}
    assert sum(flop for _, flop, _ in work) == encoder_flop(model.encoder, tokens.coords, encoded.halted_at)
    script = [sys.executable, str(ROOT / "scripts" / "encoder_bound.py")]
    result = subprocess.run(script + ["--frames", "1", "--repeats", "1", "--threads", "1", "--profile", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("profiled encoder")[1].strip().splitlines()) == 1 + 3
    for words in ("dense matmul peak", "encoder as run", "of the peak (the bound)", "flat-group peer"):
        assert words in result.stdout
    refused = subprocess.run(script + ["halting", "--frames", "1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "halts tokens" in refused.stderr


def test_reproduce_results_depth_runs_build_match_the_budget_scripts_and_the_spec_names_them():
    """scripts/reproduce_results_depth.sh: bash parses it, every run continues the baseline's
    snapshot with the budget script's fine-tune arguments, a run named as one of
    scripts/reproduce_results_budget.sh has its settings (they share runs/budget), and its
    spec names exactly its runs."""
    from haltdet.config import load_config
    from haltdet.model.detector import Detector
    from haltdet.pareto import load_spec

    def run_lists(path):
        text = path.read_text()
        runs = {}
        for block in text.split("RUN_LIST=(")[1:]:
            for line in block.split(")\n", 1)[0].splitlines():
                if line.strip().startswith('"'):
                    name, config, overrides = line.strip().strip('"').split("|")
                    runs[name] = (config, overrides)
        return text, runs

    script = ROOT / "scripts" / "reproduce_results_depth.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text, runs = run_lists(script)
    budget_text, budget = run_lists(ROOT / "scripts" / "reproduce_results_budget.sh")
    assert runs["baseline_s1"] == budget["baseline_s1"]
    fine_tune = text.split('FRESH_ARGS=(--init "$RUNS/baseline_s1/step_2900.pt")')[1].split("run_lanes")[0]
    assert fine_tune.strip() in budget_text  # the same fine-tune arguments
    for name in set(runs) & set(budget):
        assert runs[name] == budget[name], name
    configs = {name: load_config(config, shlex.split(overrides)[1::2]) for name, (config, overrides) in runs.items()}
    weights = Detector(configs["baseline_s1"].model).state_dict()
    for name, config in configs.items():  # what the snapshot lacks: scorers, or layers added on top
        model = Detector(config.model).state_dict()
        added = tuple(f"encoder.layers.{i}." for i in range(configs["baseline_s1"].model.num_layers,
                                                             config.model.num_layers))
        assert all(".halting." in key or key.startswith(added) for key in set(model) - set(weights)), name
    assert configs["size_shallow_s2"].model.num_layers == 4 and configs["size_shallow_s2"].train.seed == 2
    assert configs["halting_after3"].model.halting_layers == [3, 5]
    assert configs["size_deep_s1"].model.num_layers == 8 and not configs["size_deep_s1"].model.halting_layers
    assert configs["halting_after1_s1"].model.halting_layers == [1, 3] and configs["halting_after1_s1"].train.seed == 1
    assert configs["target_residual_s2"].train.sparsity_target == 0.4
    assert not configs["baseline_restart"].model.halting_layers
    spec = load_spec(ROOT / "docs" / "results" / "pareto_depth_spec.yaml")
    named = {p["checkpoint"] for p in spec["points"]}
    assert named == {f"runs/budget/{name}/final.pt" for name in runs if name != "baseline_s1"}
    assert "pareto docs/results/pareto_depth_spec.yaml" in text and f"--out {spec['data']} " in text
