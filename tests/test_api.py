"""The Python API as README shows it."""

import re
from pathlib import Path

import numpy as np

import haltdet
from haltdet.data.synth import simulate_frame

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    frame = simulate_frame(3)
    np.asarray(frame.points, dtype=np.float32).tofile(tmp_path / "cloud.bin")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.split()[0] in haltdet.CLASSES for line in lines)


def test_detect_a_cloud_equals_the_batch_path():
    from haltdet.model.pillars import PointBatch
    import torch

    model = haltdet.load("baseline")
    points = np.asarray(simulate_frame(4).points, dtype=np.float32)
    single = model.detect(points)
    (batched,) = model.detect(PointBatch.from_list([torch.from_numpy(points)]))
    assert len(single.boxes) > 0
    assert torch.equal(single.boxes, batched.boxes) and torch.equal(single.scores, batched.scores)
    assert torch.equal(model.detect(torch.from_numpy(points)).boxes, single.boxes)


def test_keep_freed_memory_sets_glibc_malloc_or_reports_it_cannot(monkeypatch):
    """On Linux with glibc every setting takes effect (the command calls it at start);
    where the C library has no mallopt nothing changes and the answer is False."""
    import ctypes
    import platform
    import sys

    from haltdet import cli, memory

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert haltdet.keep_freed_memory() is True
    monkeypatch.setenv("HALTDET_KEEP_FREED_MEMORY", "0")
    assert haltdet.keep_freed_memory() is False
    monkeypatch.delenv("HALTDET_KEEP_FREED_MEMORY")

    def no_glibc(name):
        raise OSError(f"{name}: not found")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert memory.keep_freed_memory() is False
    called = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: called.append(True))
    assert cli.main(["data", "stats", "/nonexistent-folder"]) == 2 and called == [True]
