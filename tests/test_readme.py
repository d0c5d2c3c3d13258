"""The README's examples run as written."""

import re
import subprocess
import sys
from pathlib import Path


def run_example(heading, tmp_path, timeout=170):
    """Run the first python block after ``heading`` as a script in ``tmp_path``; return stdout."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    script = tmp_path / "example.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quick_start_runs(tmp_path):
    out = run_example("## Quick start", tmp_path)
    assert "samples/s" in out and "teacher block runs: [1280, 1280, 1280, 1280]" in out
    assert (tmp_path / "trace.json").stat().st_size > 0


def test_soft_target_example_runs(tmp_path):
    assert "grad (8, 32000)" in run_example("## Soft-target loss and Triton kernels", tmp_path, timeout=120)


def test_codistillation_example_runs(tmp_path):
    out = run_example("## Codistillation and online distillation", tmp_path)
    assert "mode=codistill n=2 world_size=2" in out
    assert "ensemble accuracy after 300 steps" in out
    assert "[None, None, None, None, None, 25, 25, 25, 25, 25]" in out   # burn-in 50, K 25


def test_checkpoint_example_runs(tmp_path):
    out = run_example("## Checkpoints and resume", tmp_path)
    assert "resumed: blocks had completed steps [50, 50, 50, 50]" in out
    assert "teacher block runs: [1600, 1600, 1600, 1600]" in out     # steps 50-99 only
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock"] + [f"block{i}.pt" for i in range(4)] + ["run.json"]
