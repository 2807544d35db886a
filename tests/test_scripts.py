"""The scripts stay runnable. scripts/train_bundled.sh, which trains the bundled checkpoints: bash
parses it, and every haltdet command in it parses with today's CLI and names configs that
exist."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from haltdet.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_bundled.sh"


def test_train_bundled_script_parses_with_the_cli():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    commands = [line.split("$HALTDET", 1)[1] for line in SCRIPT.read_text().splitlines()
                if "$HALTDET " in line and not line.lstrip().startswith("#")]
    assert len(commands) == 8  # 2 x data synth, 4 x train, 2 x eval
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
