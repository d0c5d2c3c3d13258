"""The plot helper (pipebd.plot) draws what the report measured: every span of every rank on the
timeline and each stage's fractions in the bars."""

import builtins

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pipebd
from pipebd.models import mlp_pair
from pipebd.plot import KIND_COLORS, plot_report
from pipebd.trace import COMMUNICATION, COMPUTE, WAITING


@pytest.fixture(scope="module")
def report():
    teacher, student = mlp_pair(num_blocks=4)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    return distiller.fit(torch.randn(64, 16), 16, 6, world_size=3, plan=pipebd.Plan([[0, 1], [2, 3]], [1, 2]),
                         progress=False, timeout=60)


def widths(collection):
    return [p.vertices[:, 0].max() - p.vertices[:, 0].min() for p in collection.get_paths()]


def test_timeline_and_stage_bars_match_the_report(report, tmp_path):
    path = tmp_path / "report.png"
    fig = plot_report(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timeline, bars = fig.axes[:2]
    for row, (_, spans) in enumerate(report.tracks):
        for kind in {s.kind for s in spans}:
            drawn = [c for c in timeline.collections if c.get_gid() == f"{row}:{kind}"]
            assert len(drawn) == 1
            expected = sorted(s.end - s.start for s in spans if s.kind == kind)
            assert sorted(widths(drawn[0])) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert len(timeline.collections) == sum(len({s.kind for s in spans}) for _, spans in report.tracks)
    for s, stage in enumerate(report.stages):
        drawn = {p.get_gid().split(":")[1]: p.get_width() for p in bars.patches if p.get_gid().startswith(f"{s}:")}
        assert drawn == pytest.approx({"compute": stage.utilization, "communication": stage.communication,
                                       "waiting": stage.waiting, "idle": stage.idle})


def test_report_plot_writes_a_png(report, tmp_path):
    report.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 10_000
    report.plot(str(tmp_path / "r"))              # no suffix: a PNG at exactly that path
    assert (tmp_path / "r").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "r.png.png").exists()
    report.plot(str(tmp_path / "r.SVG"))          # the suffix names the format
    assert b"<svg" in (tmp_path / "r.SVG").read_bytes()[:1000]
    with pytest.raises(ValueError, match=r"cannot plot to '.*r\.txt': matplotlib writes no \.txt files \(it writes .*\.png"):
        report.plot(str(tmp_path / "r.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "r.SVG", "r.png"]


def test_every_span_kind_has_a_colour():
    assert set(COMPUTE + COMMUNICATION + WAITING) <= set(KIND_COLORS)


def test_codistillation_report_gets_a_timeline_and_accuracy_curves(tmp_path):
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    co = pipebd.Codistillation(lambda i: nn.Linear(4, 3), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                               exchange_every=2, device="cpu")
    result = co.fit(TensorDataset(x, y), batch_size=8, steps=6, eval_data=(x, y), eval_every=3,
                    progress=False)
    fig = plot_report(result, str(tmp_path / "co.png"))
    assert len(fig.axes) == 2 and any(c.get_gid().endswith(":eval") for c in fig.axes[0].collections)
    curves = {line.get_gid(): line for line in fig.axes[1].lines}
    assert set(curves) == {"accuracy:model 0", "accuracy:model 1", "accuracy:ensemble"}
    assert result.eval_steps == [3, 6]
    for name, acc in (("model 0", result.accuracy[0]), ("model 1", result.accuracy[1]),
                      ("ensemble", result.ensemble_accuracy)):
        assert list(curves[f"accuracy:{name}"].get_xdata()) == [3, 6]
        assert list(curves[f"accuracy:{name}"].get_ydata()) == acc
    result.eval_steps = []                                   # without eval_data: the timeline alone
    assert len(plot_report(result).axes) == 1
    result.plot(str(tmp_path / "co2.png"))
    assert (tmp_path / "co2.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_error_says_what_to_install(report, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install 'pipebd\[plot\]'"):
        plot_report(report)
