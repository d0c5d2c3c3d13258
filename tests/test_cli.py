import subprocess
import sys

import pytest

from pipebd import Plan
from pipebd.cli import main
from pipebd.config import load_config


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {pair: mlp, args: {num_blocks: 4}}\nsteps: 7\nplan: {stages: [[0, 1], [2, 3]]}\n")
    config = load_config(str(path), ["optimizer.lr=0.5", "world_size=2", "final_loss.temperature=3"])
    assert config.steps == 7 and config.optimizer.lr == 0.5 and config.world_size == 2
    assert config.final_loss.temperature == 3.0
    assert config.fit_plan().stages == ((0, 1), (2, 3)) and config.fit_plan().replicas == (1, 1)
    assert load_config(None, ["plan=auto"]).fit_plan() == "auto"
    assert load_config(None, ["plan=0|1-3x2"]).fit_plan() == Plan([[0], [1, 2, 3]], [1, 2])
    # Not valid YAML: taken as the plain string, so the plan syntax needs no extra quotes.
    assert load_config(None, ["plan=[0]x1 | [1-3]x2"]).fit_plan() == Plan([[0], [1, 2, 3]], [1, 2])
    assert load_config(None, ["sync_batchnorm=true"]).sync_batchnorm is True


@pytest.mark.parametrize("text, message", [
    ("optimiser: {lr: 1}\n", "unknown config key 'optimiser' (did you mean 'optimizer'?)"),
    ("data: {sampels: 10}\n", "unknown config key 'data.sampels' (did you mean 'samples'?)"),
    ("steps: ten\n", "config key 'steps' must be int, got 'ten'"),
    ("optimizer: {lr: true}\n", "config key 'optimizer.lr' must be float, got True"),
    ("- 1\n", "the top level must be a mapping"),
    ("steps: [1\n", "bad.yaml is not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    assert message in str(info.value)


def test_cli_runs_a_config_and_writes_a_trace_and_a_plot(tmp_path, capsys):
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"
    code = main(["run", "--set", "model={pair: mlp}", "--set", "steps=5", "--set", "batch_size=8",
                 "--set", "data.samples=64", "--set", "world_size=2", "--set", f"trace={trace}",
                 "--set", f"plot={plot}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "throughput" in out and "teacher block runs: [40, 40, 40, 40]" in out
    assert trace.exists() and plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_profile_prints_costs_plan_and_predictions(capsys):
    code = main(["profile", "--set", "model={pair: emulated, args: {profile: unbalanced, scale: 0.2}}",
                 "--set", "batch_size=16", "--set", "steps=10", "--set", "world_size=3", "--set", "data.samples=32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "teacher ms" in out and "allreduce: 2 ranks" in out
    auto = next(line for line in out.splitlines() if line.startswith("auto: plan"))
    sims = [line for line in out.splitlines() if line.startswith("simulated")]
    assert len(sims) == 3 and sims[-1].startswith("simulated baseline")
    # Over only 10 steps pipeline fill counts, so the auto plan (optimal in steady state) need
    # not beat one range per rank by much here; both beat the baseline by far on this profile.
    rate = [float(line.split(": ")[1].split()[0]) for line in sims]
    assert rate[0] >= 0.9 * rate[1] and min(rate[:2]) > 1.5 * rate[2], (auto, sims)


def test_cli_reports_errors_without_a_traceback(capsys):
    assert main(["check", "--set", "strategy=dna"]) == 0  # strategy is checked by fit, not check
    assert main(["run", "--set", "model={pair: mlp}", "--set", "strategy=dna"]) == 2
    assert "pipebd: error: strategy must be one of" in capsys.readouterr().err
    assert main(["check", "--set", "model.pair=vit"]) == 2


def test_help():
    out = subprocess.run([sys.executable, "-m", "pipebd", "run", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    assert "--set KEY=VALUE" in out
