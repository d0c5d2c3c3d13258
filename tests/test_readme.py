"""The README's quick start runs as written."""

import re
import subprocess
import sys
from pathlib import Path


def test_quick_start_runs(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stdout and "teacher block runs: [1280, 1280, 1280, 1280]" in proc.stdout
    assert (tmp_path / "trace.json").stat().st_size > 0


def test_soft_target_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Soft-target loss and Triton kernels", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grad (8, 32000)" in proc.stdout


def test_codistillation_example_runs(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Codistillation and online distillation", 1)[1]
    script = tmp_path / "codistill.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode=codistill n=2 world_size=2" in proc.stdout
    assert "ensemble accuracy after 300 steps" in proc.stdout
    assert "[None, None, None, None, None, 25, 25, 25, 25, 25]" in proc.stdout   # burn-in 50, K 25


def test_checkpoint_example_runs(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Checkpoints and resume", 1)[1]
    script = tmp_path / "resume.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed: blocks had completed steps [50, 50, 50, 50]" in proc.stdout
    assert "teacher block runs: [1600, 1600, 1600, 1600]" in proc.stdout     # steps 50-99 only
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"block{i}.pt" for i in range(4)] + ["run.json"]
