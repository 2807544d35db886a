"""End to end through the command line: synth -> train -> eval -> detect -> demo."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

from haltdet.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    assert main(["data", "synth", "--out", str(root / "train"), "--frames", "4", "--seed", "5", "--quiet"]) == 0
    assert main(["data", "synth", "--out", str(root / "val"), "--frames", "2", "--seed", "6", "--quiet"]) == 0
    config = {
        "name": "tiny",
        "model": {"d_model": 32, "pfn_channels": [16, 32], "num_layers": 2, "ffn_dim": 64,
                  "bev_channels": 16, "head_channels": 16, "bev_convs": 1},
        "data": {"train": str(root / "train"), "val": str(root / "val"), "num_workers": 0},
        "train": {"batch_size": 2, "max_steps": 3, "checkpoint_every": 2, "log_every": 1, "save_steps": [1]},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    config["model"].update(num_layers=3, halting_layers=[1, 2], halt_stage_embedding=True)
    config["train"].update(sparsity_weight=0.5, save_steps=[])
    (root / "tiny_halting.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(root / "tiny_halting.yaml"), "--out", str(root / "halting"),
                 "--quiet"]) == 0
    return root


def test_train_writes_checkpoints_and_logs(tiny_run):
    run = tiny_run / "run"
    assert (run / "final.pt").exists() and (run / "latest.pt").exists()
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_1.pt"]  # train.save_steps
    from haltdet.checkpoint import load_checkpoint

    assert load_checkpoint(run / "step_1.pt")["step"] == 1
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(np.isfinite(line["loss"]) for line in lines)


def test_eval_writes_waymo_style_metrics(tiny_run, capsys):
    out = tiny_run / "metrics.json"
    assert main(["eval", "--checkpoint", str(tiny_run / "run" / "final.pt"), "--data",
                 str(tiny_run / "val"), "--json", str(out), "--quiet", "--bootstrap", "20"]) == 0
    result = json.loads(out.read_text())
    for cls in ("Vehicle", "Pedestrian", "Cyclist"):
        for level in ("LEVEL_1", "LEVEL_2"):
            assert set(result[cls][level]) >= {"AP", "APH"}
    assert "mAPH_L2" in result
    assert result["bootstrap"]["samples"] == 20 and result["bootstrap"]["mAPH_L2_std"] >= 0
    assert "evaluation noise: mAPH_L2 over 20 resampled sets of the 2 frames" in capsys.readouterr().out
    # The same model against itself: no difference, on any resampled set.
    checkpoint = str(tiny_run / "run" / "final.pt")
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(tiny_run / "val"), "--json", str(out), "--quiet",
                 "--bootstrap", "20", "--against", checkpoint]) == 0
    against = json.loads(out.read_text())["against"]
    assert against["difference"] == 0 and against["difference_std"] == 0
    assert f"against {checkpoint}: mAPH_L2" in capsys.readouterr().out


def test_eval_of_a_two_stage_model_with_and_without_its_refiner(tiny_run, capsys, monkeypatch):
    config = yaml.safe_load((tiny_run / "tiny.yaml").read_text())
    config["model"].update(refine=True, refine_channels=[16, 32])
    config["train"].update(refine_only=True, save_steps=[])
    (tiny_run / "tiny_refine.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tiny_run / "tiny_refine.yaml"), "--out", str(tiny_run / "refine"),
                 "--init", str(tiny_run / "run" / "final.pt"), "--quiet"]) == 0
    results = {}
    for name, extra in (("default", []), ("one", ["--refine-passes", "1"]), ("first", ["--first-stage"]),
                        ("plain", ["--no-refine-mirror"])):
        out = tiny_run / f"refine_{name}.json"
        assert main(["eval", "--checkpoint", str(tiny_run / "refine" / "final.pt"), "--data", str(tiny_run / "val"),
                     "--json", str(out), "--quiet", *extra]) == 0
        results[name] = json.loads(out.read_text())
    assert [results[k]["refine_passes"] for k in ("default", "one", "first", "plain")] == [2, 1, 0, 2]
    # --first-stage compares first stage with first stage: the other model's refiner is off too.
    import haltdet.predict

    seen = []
    evaluate_model = haltdet.predict.evaluate_model

    def recording(model, *args, against=None, **kwargs):
        seen.append((model.second_stage, against.second_stage))
        return evaluate_model(model, *args, against=against, **kwargs)

    monkeypatch.setattr(haltdet.predict, "evaluate_model", recording)
    refined = str(tiny_run / "refine" / "final.pt")
    out = tiny_run / "refine_against.json"
    for extra in ([], ["--first-stage"]):
        assert main(["eval", "--checkpoint", refined, "--data", str(tiny_run / "val"), "--json", str(out),
                     "--quiet", "--against", refined, *extra]) == 0
    assert seen == [(True, True), (False, False)]
    against = json.loads(out.read_text())["against"]
    assert against["mAPH_L2"] == results["first"]["mAPH_L2"] and against["difference"] == 0
    # A first-stage model fine-tuned from the two-stage detector takes its first stage only.
    from haltdet.checkpoint import load_checkpoint

    assert main(["train", "--config", str(tiny_run / "tiny_halting.yaml"), "--out", str(tiny_run / "from_two"),
                 "--init", str(tiny_run / "refine" / "final.pt"), "--max-steps", "1", "--quiet"]) == 0
    tuned = load_checkpoint(tiny_run / "from_two" / "final.pt")["model"]
    assert tuned and not any(k.startswith("refiner.") for k in tuned)
    assert [results[k]["refine_mirror"] for k in ("default", "one", "first", "plain")] == [True, True, False, False]
    one_stage = str(tiny_run / "run" / "final.pt")
    assert main(["eval", "--checkpoint", one_stage, "--data", str(tiny_run / "val"),
                 "--first-stage", "--quiet"]) == 2  # nothing with a second stage: a clear error
    assert "needs a model with a second stage" in capsys.readouterr().err
    # A one-stage model is its own first stage: against a two-stage model's first stage.
    seen.clear()
    assert main(["eval", "--checkpoint", one_stage, "--data", str(tiny_run / "val"), "--json", str(out),
                 "--quiet", "--against", refined, "--first-stage"]) == 0
    assert seen == [(True, False)]
    assert json.loads(out.read_text())["against"]["mAPH_L2"] == results["first"]["mAPH_L2"]


def test_detect_and_demo(tiny_run, tmp_path, capsys):
    points = np.random.default_rng(0).uniform(-30, 30, size=(2000, 4)).astype(np.float32)
    points[:, 2] = -1.5
    np.save(tmp_path / "cloud.npy", points)
    out = tmp_path / "det.json"
    checkpoint = str(tiny_run / "run" / "final.pt")
    assert main(["detect", "--checkpoint", checkpoint, str(tmp_path / "cloud.npy"), "--json", str(out)]) == 0
    frame = json.loads(out.read_text())["frames"][0]
    assert len(frame["boxes"]) == len(frame["labels"]) == len(frame["scores"])
    picture = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", checkpoint, "--out", str(picture)]) == 0
    assert picture.stat().st_size > 10_000
    assert "BEV picture written" in capsys.readouterr().out


def test_resume_continues_to_more_steps(tiny_run):
    config = yaml.safe_load((tiny_run / "tiny.yaml").read_text())
    config["train"]["max_steps"] = 4
    (tiny_run / "tiny4.yaml").write_text(yaml.safe_dump(config))
    import shutil
    shutil.copytree(tiny_run / "run", tiny_run / "run4")
    assert main(["train", "--config", str(tiny_run / "tiny4.yaml"), "--out", str(tiny_run / "run4"),
                 "--resume", "--quiet"]) == 0
    lines = (tiny_run / "run4" / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4


@pytest.mark.parametrize("argv, message", [
    (["detect", "--checkpoint", "no-such-model", "x.npy"], "no checkpoint file"),
    (["train", "--config", "no-such-config", "--out", "x"], "no config file"),
    (["eval-boxes", "--gt", "missing.json", "--pred", "missing.json"], "missing.json"),
    # output files are checked before any work: a folder, or a file in a missing folder
    (["eval", "--checkpoint", "no-such-model", "--data", "d", "--json", "."], "is a folder"),
    (["detect", "--checkpoint", "no-such-model", "x.npy", "--json", "nowhere/det.json"], "does not exist"),
    (["demo", "--out", "."], "is a folder"),
    (["gradcheck", "--json", "nowhere/g.json"], "does not exist"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_points_file_is_a_clear_error(tiny_run, tmp_path, capsys):
    bad = tmp_path / "cloud.bin"
    bad.write_bytes(b"\x00" * 18)  # not a whole number of float32 x 4 rows
    assert main(["detect", "--checkpoint", str(tiny_run / "run" / "final.pt"), str(bad)]) == 2
    assert "cloud.bin" in capsys.readouterr().err


def test_halting_model_eval_overrides_and_demo(tiny_run, tmp_path, capsys):
    checkpoint = str(tiny_run / "halting" / "final.pt")
    logged = json.loads((tiny_run / "halting" / "log.jsonl").read_text().splitlines()[-1])
    assert "sparsity" in logged and 0 <= logged["kept_fraction"] <= 1
    # the share of the layers that object and background tokens ran (at most 3 of 3)
    assert 1 / 3 <= logged["foreground_layers"] <= 1 and 1 / 3 <= logged["background_layers"] <= 1
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(tiny_run / "val"), "--json", str(out),
                 "--keep-ratio", "0.5", "--max-tokens", "3000", "--quiet"]) == 0
    result = json.loads(out.read_text())
    tokens = result["tokens"]
    assert result["halting"]["keep_ratios"] == [0.5, 0.5]
    active = tokens["active_per_layer"]
    assert len(active) == 3 and active[0] == tokens["tokens"]
    assert active[1] <= min(3000, 0.5 * active[0] + 1) and active[2] <= 0.5 * active[1] + 1
    assert tokens["token_layers"] < 0.7
    picture = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", checkpoint, "--out", str(picture)]) == 0
    assert (tmp_path / "demo_halting.png").stat().st_size > 10_000
    assert "halting picture written" in capsys.readouterr().out


def test_threshold_override_needs_a_halting_model(tiny_run, capsys):
    assert main(["eval", "--checkpoint", str(tiny_run / "run" / "final.pt"), "--data",
                 str(tiny_run / "val"), "--threshold", "0.5", "--quiet"]) == 2
    assert "no halting stages" in capsys.readouterr().err


def test_nan_points_are_dropped_and_counted_empty_cloud_runs(tiny_run, tmp_path, caplog):
    checkpoint = str(tiny_run / "run" / "final.pt")
    points = np.random.default_rng(1).uniform(-20, 20, size=(500, 4)).astype(np.float32)
    points[:7, 0] = np.nan
    points[7:10, 2] = np.inf
    np.save(tmp_path / "nan.npy", points)
    with pytest.warns(UserWarning, match="10"):
        assert main(["detect", "--checkpoint", checkpoint, str(tmp_path / "nan.npy"),
                     "--json", str(tmp_path / "a.json")]) == 0
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.float32))
    assert main(["detect", "--checkpoint", checkpoint, str(tmp_path / "empty.npy"),
                 "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["frames"][0]["frame_id"] == "empty"


def test_missing_dataset_and_bad_columns_are_clear_errors(tiny_run, tmp_path, capsys):
    checkpoint = str(tiny_run / "run" / "final.pt")
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err
    np.save(tmp_path / "two.npy", np.zeros((5, 2), dtype=np.float32))
    assert main(["detect", "--checkpoint", checkpoint, str(tmp_path / "two.npy")]) == 2
    assert "two.npy" in capsys.readouterr().err


def test_init_from_a_baseline_keeps_its_weights_and_adds_scorers(tiny_run, tmp_path):
    import torch

    from haltdet.checkpoint import load_checkpoint

    out = tmp_path / "finetune"
    assert main(["train", "--config", str(tiny_run / "tiny_halting.yaml"), "--out", str(out),
                 "--init", str(tiny_run / "run" / "final.pt"), "--max-steps", "1", "--quiet"]) == 0
    baseline = load_checkpoint(tiny_run / "run" / "final.pt")["model"]
    tuned = load_checkpoint(out / "final.pt")["model"]
    assert any(k.startswith("encoder.halting.scorers.") for k in tuned)
    # Shared parameters started from the baseline: after one small step they are close to it.
    key = "encoder.layers.0.attention.value.weight"
    assert (tuned[key] - baseline[key]).abs().max() < 0.05
    assert not torch.equal(tuned[key], baseline[key])


def test_distillation_from_a_teacher_is_logged_and_changes_the_training(tiny_run, tmp_path):
    """train.distill_weight: the halting model fine-tuned from the baseline learns from the
    baseline's outputs too: the distances are logged, and the weights differ from a run
    without them."""
    import torch

    from haltdet.checkpoint import load_checkpoint

    teacher = str(tiny_run / "run" / "final.pt")
    runs = {}
    for name, extra in (("plain", []), ("distilled", ["--set", "train.distill_weight=1.0",
                                                      "--set", f"train.distill_from={teacher}"])):
        runs[name] = tmp_path / name
        assert main(["train", "--config", str(tiny_run / "tiny_halting.yaml"), "--out", str(runs[name]),
                     "--init", teacher, "--max-steps", "2", "--quiet", *extra]) == 0
    lines = [json.loads(line) for line in (runs["distilled"] / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["distill_heatmap"]) and line["distill_regression"] >= 0 for line in lines)
    assert "distill_heatmap" not in (runs["plain"] / "log.jsonl").read_text()
    plain, distilled = (load_checkpoint(runs[name] / "final.pt")["model"] for name in ("plain", "distilled"))
    key = "encoder.layers.0.attention.value.weight"
    assert not torch.equal(plain[key], distilled[key])


def test_init_of_a_shallower_encoder_takes_the_first_layers_and_refuses_other_extra_weights(
        tiny_run, tmp_path, capsys):
    """A model with fewer encoder layers than the checkpoint starts from its first layers
    (the size points of the results); any other parameter the model lacks is an error."""
    import torch

    from haltdet.checkpoint import load_checkpoint

    baseline = load_checkpoint(tiny_run / "run" / "final.pt")["model"]
    out = tmp_path / "shallow"
    assert main(["train", "--config", str(tiny_run / "tiny.yaml"), "--out", str(out), "--init",
                 str(tiny_run / "run" / "final.pt"), "--set", "model.num_layers=1", "--max-steps", "1",
                 "--quiet"]) == 0
    shallow = load_checkpoint(out / "final.pt")["model"]
    assert not any(k.startswith("encoder.layers.1.") for k in shallow)
    key = "encoder.layers.0.attention.value.weight"  # one small step from the checkpoint's
    assert (shallow[key] - baseline[key]).abs().max() < 0.05 and not torch.equal(shallow[key], baseline[key])
    # the halting model's scorers are not encoder layers: a baseline cannot take them
    assert main(["train", "--config", str(tiny_run / "tiny.yaml"), "--out", str(tmp_path / "refused"), "--init",
                 str(tiny_run / "halting" / "final.pt"), "--max-steps", "1", "--quiet"]) == 2
    assert "scorers" in capsys.readouterr().err


def test_bench_times_a_halting_model_at_several_thresholds(tiny_run, tmp_path, capsys):
    """NAME@T times a halting model at threshold T; a higher threshold halts more tokens,
    and the ratios are against the first checkpoint of the same run."""
    baseline, halting = str(tiny_run / "run" / "final.pt"), str(tiny_run / "halting" / "final.pt")
    out = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", baseline, "--checkpoint", halting + "@0.0",
                 "--checkpoint", halting + "@1.0", "--frames", "1", "--warmup", "0", "--json", str(out),
                 "--encoder-peer", "flat"]) == 0
    report = json.loads(out.read_text())
    peer = report["encoder_peer"]
    assert peer["median_seconds"] > 0
    assert peer["first_encoder_to_peer"] == pytest.approx(report["models"][0]["median_seconds"]["encoder"]
                                                          / peer["median_seconds"])
    first, keep_all, halt_all = report["models"]
    assert keep_all["checkpoint"].endswith("@0.0") and halt_all["checkpoint"].endswith("@1.0")
    # Same frames, same tokens: the 3-layer halting model at threshold 0 runs every token
    # through 3 layers against the 2-layer baseline's 2; at threshold 1 every token halts
    # at the first stage, after 1 layer.
    assert first["tokens"] == keep_all["tokens"] == halt_all["tokens"] > 0
    assert keep_all["ideal_encoder_ratio"] == 1.5 and halt_all["ideal_encoder_ratio"] == 0.5
    for entry in (keep_all, halt_all):
        # one frame: the paired ratio is that frame's ratio, the ratio of the medians
        ratio = entry["median_seconds"]["encoder"] / first["median_seconds"]["encoder"]
        assert entry["ratio_to_first"]["encoder"] == pytest.approx(ratio)
        assert entry["ratio_of_medians"]["encoder"] == pytest.approx(ratio)
        assert entry["ratio_to_first_p10"]["total"] <= entry["ratio_to_first"]["total"] <= entry["ratio_to_first_p90"]["total"]
        assert entry["realised_of_ideal"] == pytest.approx(entry["ideal_encoder_ratio"] / ratio)
    from haltdet.bench import load_spec

    assert load_spec(halting + "@0.3,0.7", "cpu").encoder.halting.thresholds == [0.3, 0.7]
    assert main(["bench", "--checkpoint", baseline + "@0.5", "--frames", "1"]) == 2
    assert "has no halting" in capsys.readouterr().err


def test_diagnose_prints_and_writes_both_tables(tiny_run, capsys):
    out = tiny_run / "diagnose.json"
    assert main(["diagnose", "--checkpoint", "baseline", "--data", str(tiny_run / "val"),
                 "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "xy z size yaw" in printed and "reversed" in printed
    result = json.loads(out.read_text())
    assert [row["replaced"] for row in result["oracle"]][0] == "nothing" and len(result["oracle"]) == 7
    vehicle = result["residuals"]["Vehicle"]
    assert vehicle["matched"] > 0 and set(vehicle["mean"]) == {"along", "across", "z", "l", "w", "h"}
    assert 0.0 <= vehicle["reversed"] <= 1.0


def test_gradcheck_writes_cosines_per_path(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["gradcheck", "--cases", "2", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["cases"] == 2
    assert set(report["paths"]) == {"both", "attention", "residual", "hard", "both_tangent", "both_w0.25", "both_w0.5"}
    for row in report["paths"].values():
        assert -1 <= row["cosine_median"] <= 1 and row["cosine_p10"] <= row["cosine_median"]
    printed = capsys.readouterr().out
    assert "both" in printed and "residual *" in printed  # the default path is marked
    assert main(["gradcheck", "--temperature", "2"]) == 2


def test_train_set_overrides_config_values(tiny_run, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["train", "--config", str(tiny_run / "tiny_halting.yaml"), "--out", str(out), "--quiet",
                 "--set", "train.max_steps=2", "--set", "train.sparsity_hinge=0.1",
                 "--set", "model.halting_gradient=attention"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["sparsity_hinge"] == 0.1
    assert saved["model"]["halting_gradient"] == "attention"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    capsys.readouterr()
    for bad in ("train.max_steps", "optim.lr=1", "train.no_such_key=1", "model.halting_gradient=sideways"):
        assert main(["train", "--config", str(tiny_run / "tiny.yaml"), "--out", str(tmp_path / "x"),
                     "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("haltdet: error:") and len(err.strip().splitlines()) == 1


def test_detect_min_score_keeps_the_confident_subset(tmp_path):
    from haltdet.data.synth import simulate_frame

    np.save(tmp_path / "frame.npy", np.asarray(simulate_frame(7).points, dtype=np.float32))
    results = {}
    for score in ("0", "0.5"):
        out = tmp_path / f"det{score}.json"
        assert main(["detect", "--checkpoint", "baseline", str(tmp_path / "frame.npy"), "--min-score", score,
                     "--json", str(out)]) == 0
        text = out.read_text()
        assert len(text.splitlines()) == 4  # convention, "frames": [, one line per frame, ]}
        results[score] = json.loads(text)["frames"][0]
    everything, confident = results["0"], results["0.5"]
    expected = [(b, label) for b, label, s in zip(everything["boxes"], everything["labels"], everything["scores"])
                if s >= 0.5]
    assert 0 < len(expected) < len(everything["boxes"])
    assert list(zip(confident["boxes"], confident["labels"])) == expected
    assert min(confident["scores"]) >= 0.5
    assert main(["detect", "--checkpoint", "baseline", str(tmp_path / "frame.npy"), "--min-score", "2"]) == 2


def test_pareto_evaluates_times_and_writes_the_frontier(tiny_run, tmp_path, capsys):
    baseline, halting = str(tiny_run / "run" / "final.pt"), str(tiny_run / "halting" / "final.pt")
    spec = {"data": str(tiny_run / "val"), "bench": {"frames": 1, "warmup": 0}, "about": "Tiny models,\n  one step.",
            "points": [{"method": "baseline", "name": "base", "checkpoint": baseline},
                       {"method": "halting", "name": "keep all", "checkpoint": halting, "threshold": 0.0},
                       {"method": "halting", "name": "halt all", "checkpoint": halting, "threshold": [1.0, 1.0]},
                       {"method": "baseline", "name": "base bf16", "checkpoint": baseline, "dtype": "bfloat16"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "pareto"
    assert main(["pareto", str(tmp_path / "spec.yaml"), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "pareto.json").read_text())
    base, keep_all, halt_all, base_bf16 = result["points"]
    assert [p["method"] for p in result["points"]] == ["baseline", "halting", "halting", "baseline"]
    assert base_bf16["dtype"] == "bfloat16" and base["dtype"] == "float32"
    assert base_bf16["token_layers"] == 1.0
    for point in result["points"]:
        assert 0 <= point["mAPH_L2"] <= 1 and point["encoder_ms"] > 0 and point["total_ms"] >= point["encoder_ms"]
    assert base["token_layers"] == keep_all["token_layers"] == 1.0 and halt_all["token_layers"] == pytest.approx(1 / 3)
    assert base["object_token_layers"] == keep_all["object_token_layers"] == 1.0
    assert halt_all["object_token_layers"] == pytest.approx(1 / 3)  # objects' tokens halt too
    assert (out / "pareto.png").stat().st_size > 10_000
    assert base["vs_first"] == base["vs_first_std"] == 0  # the first point against itself
    assert keep_all["vs_first"] == pytest.approx(keep_all["mAPH_L2"] - base["mAPH_L2"])
    assert all(p["mAPH_L2_std"] >= 0 and p["vs_first_std"] >= 0 for p in result["points"])
    table = (out / "results.md").read_text()
    assert "| halting | halt all | 1 |" in table and "haltdet pareto" in table
    assert "| token-layers | objects' token-layers |" in table and "| 0.333 | 0.333 |" in table
    assert "| +0.0000 +-0.0000 |" in table and "over 500 resampled frame sets" in table
    assert "\nTiny models, one step.\n" in table and table.startswith("# Accuracy against latency\n")
    assert all(p["train_steps"] >= 1 and p["train_seconds"] > 0 for p in result["points"])
    assert f"| {base['train_steps']} steps, " in table
    # Evaluated two at a time in worker processes: the same accuracy and token-layers.
    assert main(["pareto", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "jobs"), "--jobs", "2",
                 "--quiet"]) == 0
    in_workers = json.loads((tmp_path / "jobs" / "pareto.json").read_text())["points"]
    for key in ("mAPH_L2", "token_layers", "vs_first"):
        assert [p[key] for p in in_workers] == pytest.approx([p[key] for p in result["points"]], abs=1e-6), key
    assert main(["pareto", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**spec, "point": spec["points"]}))
    assert main(["pareto", str(tmp_path / "typo.yaml"), "--out", str(out)]) == 2
    assert "unknown keys ['point']" in capsys.readouterr().err
    (tmp_path / "titled.yaml").write_text(yaml.safe_dump({**spec, "title": ["not", "text"]}))
    assert main(["pareto", str(tmp_path / "titled.yaml"), "--out", str(out)]) == 2
    assert "'title' must be text" in capsys.readouterr().err


def test_pareto_dominance_by_hand():
    from haltdet.pareto import dominating, grouped, markdown

    def point(method, name, seed, accuracy, encoder, total):
        return {"method": method, "name": name, "seed": seed, "mAPH_L2": accuracy, "mAPH_L2_first_stage": accuracy,
                "token_layers": 1.0, "encoder_ms": encoder, "total_ms": total}

    points = [point("baseline", "b", 0, 0.60, 60, 200), point("random", "r", 0, 0.50, 35, 150),
              point("halting", "h", 0, 0.58, 30, 160), point("halting", "h", 1, 0.56, 32, 162),
              point("topk", "k", 0, 0.59, 31, 150)]
    rows = {r["name"]: r for r in grouped(points)}
    assert rows["h"]["seeds"] == 2 and rows["h"]["mAPH_L2"] == pytest.approx(0.57)
    assert rows["h"]["mAPH_L2_min"] == 0.56 and rows["h"]["encoder_ms"] == 31
    rows = list(rows.values())
    by_name = {r["name"]: r for r in rows}
    assert dominating(by_name["r"], rows, "encoder_ms") == "h"      # 0.57 >= 0.50 at 31 <= 35 ms
    assert dominating(by_name["r"], rows, "total_ms") is None       # 161 > 150 ms
    assert dominating(by_name["k"], rows, "encoder_ms") is None     # 0.59 beats the halting mean
    assert dominating(by_name["b"], rows, "encoder_ms") is None     # more accurate than every halting point
    # A halting point at another precision dominates nothing of float32.
    fast = grouped([{**point("halting", "h bf16", 0, 0.9, 1, 1), "dtype": "bfloat16"}])[0]
    for key in ("encoder_ms", "total_ms"):
        assert dominating(by_name["k"], rows + [fast], key) is None
    assert dominating({**by_name["k"], "dtype": "bfloat16"}, rows + [fast], "encoder_ms") == "h bf16"
    table = markdown({"points": points, "data": "val", "spec": "s.yaml",
                      "bench": {"frames": 1, "threads": 1, "device": "cpu"}, "machine": {"processor": "x", "torch": "t"}})
    assert "| topk | k | 1 |" in table
    # Peers against the halting rows: r is dominated on encoder time only; both are set
    # against h, the halting row nearest in encoder time (31 ms).
    assert ("- **r** (random): dominated on encoder time by h, not dominated end to end. Against h, the halting "
            "point nearest in encoder time: -0.0700 mAPH_L2 at 1.13x its encoder and 0.93x its end-to-end time.") in table
    assert "- **k** (topk): not dominated on encoder time, not dominated end to end. Against h" in table
    assert "**b**" not in table and "**h**" not in table


def test_validation_during_training_logs_and_keeps_the_best(tiny_run, tmp_path):
    from haltdet.checkpoint import load_checkpoint, load_model

    out = tmp_path / "val"
    assert main(["train", "--config", str(tiny_run / "tiny.yaml"), "--out", str(out), "--quiet",
                 "--set", "train.max_steps=4", "--set", "train.val_every=2", "--set", "train.val_frames=1"]) == 0
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    validations = [e for e in entries if "val_mAPH_L2" in e]
    assert [e["step"] for e in validations] == [2, 4]
    assert all(0 <= e["val_mAPH_L2"] <= 1 and e["val_token_layers"] == 1.0 for e in validations)
    best = load_checkpoint(out / "best.pt")
    assert best["val_mAPH_L2"] == max(e["val_mAPH_L2"] for e in validations)
    assert best["step"] == next(e["step"] for e in validations if e["val_mAPH_L2"] == best["val_mAPH_L2"])
    load_model(out / "best.pt")
    assert main(["train", "--config", str(tiny_run / "tiny.yaml"), "--out", str(tmp_path / "x"), "--quiet",
                 "--set", "train.val_every=2", "--set", "data.val=/no/such/split"]) == 2


def test_a_corrupt_frame_read_by_a_loader_worker_is_a_one_line_error(tiny_run, tmp_path, capsys):
    import shutil

    data = tmp_path / "val"
    shutil.copytree(tiny_run / "val", data)
    frame = sorted((data / "frames").glob("*.npz"))[0]
    frame.write_bytes(frame.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_run / "run" / "final.pt"), "--data", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and frame.name in err and "Traceback" not in err


def test_every_command_takes_threads(capsys):
    import torch

    from haltdet.cli import build_parser

    parser = build_parser()
    for argv in (["demo"], ["data", "synth", "--out", "x", "--frames", "1"], ["data", "stats", "x"], ["train", "--config", "c",
                 "--out", "o"], ["eval", "--data", "d"], ["detect", "x.npy"], ["bench"], ["gradcheck"],
                 ["pareto", "s.yaml", "--out", "o"], ["convert", "x", "--from", "kitti", "--out", "o"],
                 ["diagnose", "--data", "d"], ["eval-boxes", "--gt", "g", "--pred", "p"]):
        assert parser.parse_args(argv + ["--threads", "1"]).threads == 1
    before = torch.get_num_threads()
    try:
        assert main(["gradcheck", "--cases", "1", "--quiet", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--data", "d", "--threads", "-1"])


def test_pathological_inputs_are_one_line_errors(tmp_path, capsys):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    config = tmp_path / "huge_window.yaml"
    config.write_text("base: baseline\nmodel: {window_size: 100000}\n")
    for argv, message in ((["eval-boxes", "--gt", str(nested), "--pred", str(nested)], "nested too deeply"),
                          (["train", "--config", str(config), "--out", str(tmp_path / "run")], "window_size")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_inference_commands_take_set_for_inference_settings(tmp_path, capsys):
    """`--set model.KEY=VALUE` changes an inference setting of detect/eval/demo/diagnose/bench;
    anything else is a one-line error before any work."""
    from haltdet.data.synth import simulate_frame

    np.save(tmp_path / "frame.npy", np.asarray(simulate_frame(7).points, dtype=np.float32))
    counts = {}
    for cap in ("100", "5"):
        out = tmp_path / f"det{cap}.json"
        assert main(["detect", "--checkpoint", "baseline", str(tmp_path / "frame.npy"), "--json", str(out),
                     "--set", f"model.max_detections={cap}"]) == 0
        counts[cap] = len(json.loads(out.read_text())["frames"][0]["boxes"])
    assert counts["5"] == 5 < counts["100"]
    capsys.readouterr()
    for argv, message in [
        (["--set", "model.d_model=32"], "not inference settings: d_model"),
        (["--set", "train.lr=0.1"], "only model settings"),
        (["--set", "model.max_detections"], "expected section.key=value"),
        (["--set", "model.score_threshold=[oops"], "not valid YAML"),
    ]:
        assert main(["detect", "--checkpoint", "baseline", str(tmp_path / "frame.npy"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for command in (["eval", "--data", "x"], ["demo"], ["diagnose", "--data", "x"], ["bench"]):
        assert main([*command, "--set", "model.d_model=32"]) == 2
        assert "not inference settings: d_model" in capsys.readouterr().err


def test_sensor_height_moves_a_raw_cloud_to_the_training_ground(tmp_path, capsys):
    """A cloud from a sensor 1.4 m above the road (0.5 m lower than the training frame's)
    given with --sensor-height 1.4 (or auto) detects what the cloud in the training frame does."""
    from haltdet.data.synth import simulate_frame

    cloud = np.asarray(simulate_frame(7).points, dtype=np.float32)
    np.save(tmp_path / "frame.npy", cloud)
    low = cloud.copy()
    low[:, 2] += 0.5
    np.save(tmp_path / "low.npy", low)
    results = {}
    for name, argv in (("reference", ["frame.npy"]), ("unmoved", ["low.npy"]),
                       ("given", ["low.npy", "--sensor-height", "1.4"]),
                       ("auto", ["low.npy", "--sensor-height", "auto"])):
        out = tmp_path / f"{name}.json"
        assert main(["detect", "--checkpoint", "baseline", str(tmp_path / argv[0]), *argv[1:],
                     "--min-score", "0.3", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())["frames"][0]
    reference = np.array(results["reference"]["boxes"])
    given = np.array(results["given"]["boxes"])
    assert given.shape == reference.shape and len(reference) > 5
    np.testing.assert_allclose(given, reference, atol=1e-3)
    assert len(results["auto"]["boxes"]) >= 0.8 * len(reference)
    assert results["unmoved"]["boxes"] != results["reference"]["boxes"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:  # an argparse usage error
        main(["detect", "--checkpoint", "baseline", str(tmp_path / "low.npy"), "--sensor-height", "high"])
    assert exit_code.value.code == 2 and "a height in metres or 'auto'" in capsys.readouterr().err
    assert main(["demo", "--sensor-height", "1.7"]) == 2
    assert "for a points file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--config", "baseline", "--out", "x", "--max-steps", "0"],
                                  ["eval", "--data", "x", "--batch-size", "0"],
                                  ["gradcheck", "--cases", "0"]])
def test_counts_below_their_minimum_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(argv)
    assert exit_code.value.code == 2 and "must be an integer >=" in capsys.readouterr().err


def test_a_model_trained_on_simulation_says_so_once_on_real_input(tmp_path, caplog, tiny_run):
    from haltdet.data.synth import simulate_frame

    np.save(tmp_path / "cloud.npy", np.asarray(simulate_frame(7).points, dtype=np.float32))
    with caplog.at_level("WARNING"):
        assert main(["detect", "--checkpoint", "baseline", str(tmp_path / "cloud.npy"), "--json",
                     str(tmp_path / "a.json")]) == 0
    assert [r.message for r in caplog.records].count(
        "this model was trained on simulated frames only: on real data expect false positives and misses; "
        "the input must be in the project frame (docs/data_format.md)") == 1
    caplog.clear()
    with caplog.at_level("WARNING"):  # simulated data: nothing to say
        assert main(["detect", "--checkpoint", "baseline", "--data", str(tiny_run / "val"), "--json",
                     str(tmp_path / "b.json")]) == 0
    assert not any("simulated frames only" in r.message for r in caplog.records)
    from haltdet.checkpoint import load_model

    assert load_model(tiny_run / "run" / "final.pt")[0].data_source == "synth"  # recorded by training


def test_pareto_reuses_cached_evaluations_only_while_nothing_changed(tiny_run, tmp_path, monkeypatch, capsys):
    import haltdet.pareto as pareto

    halting = str(tiny_run / "halting" / "final.pt")
    spec = {"data": str(tiny_run / "val"), "bench": {"frames": 1, "warmup": 0}, "bootstrap": 0,
            "points": [{"method": "halting", "name": "keep all", "checkpoint": halting, "threshold": 0.0},
                       {"method": "halting", "name": "halt all", "checkpoint": halting, "threshold": 1.0}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cache = tmp_path / "cache"
    command = ["pareto", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"), "--cache", str(cache)]
    evaluated = []
    real = pareto.evaluate_point
    monkeypatch.setattr(pareto, "evaluate_point", lambda point, *args: evaluated.append(point["name"]) or
                        real(point, *args))
    assert main(command) == 0
    first = json.loads((tmp_path / "out" / "pareto.json").read_text())["points"]
    assert evaluated == ["keep all", "halt all"] and len(list(cache.glob("*.pkl"))) == 2
    assert main(command) == 0  # nothing changed: both read back, the same figures
    assert evaluated == ["keep all", "halt all"]
    assert "reused the evaluation of keep all" in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "pareto.json").read_text())["points"]
    for key in ("mAPH_L2", "mAPH_L2_first_stage", "token_layers"):
        assert [p[key] for p in again] == [p[key] for p in first]
    # A changed threshold, checkpoint file or split is evaluated afresh.
    spec["points"][1]["threshold"] = 0.5
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(command) == 0 and evaluated[2:] == ["halt all"]
    moved = tmp_path / "copy.pt"
    checkpoint = torch.load(halting, weights_only=False)
    torch.save({**checkpoint, "note": "the same weights in another file"}, moved)
    spec["points"][0]["checkpoint"] = str(moved)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(command) == 0 and evaluated[3:] == ["keep all"]
    frame = next(p for p in sorted((tiny_run / "val").rglob("*")) if p.is_file())
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    assert main(command) == 0 and evaluated[4:] == ["keep all", "halt all"]
    # An evaluation is kept as soon as it ends: a run that fails on its second point keeps the first.
    spec["points"][1]["threshold"] = 0.25
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    for file in cache.glob("*.pkl"):
        file.unlink()

    def fail_second(point, *args):
        if point["name"] == "halt all":
            raise RuntimeError("stopped")
        return real(point, *args)

    monkeypatch.setattr(pareto, "evaluate_point", fail_second)
    with pytest.raises(RuntimeError):
        main(command)
    assert len(list(cache.glob("*.pkl"))) == 1 and not list(cache.glob("*.part"))
