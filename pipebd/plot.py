"""Pictures of a run, for the optional ``plot`` extra (matplotlib): a timeline with one row per
rank and a bar per span, and, for a ``Distiller`` report, each stage's time split into compute,
communication, waiting and idle (the report's fractions); for a ``CodistillReport`` with
``eval_data``, each model's accuracy (and the ensemble's) against steps. ``Report.plot(path)``
and ``CodistillReport.plot(path)`` write both to one image (PNG, or the format of the path's
suffix).

The figure is built without pyplot, so plotting neither needs a display nor changes the
caller's matplotlib state.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

# One colour per span kind: compute in blues and greens, communication in red, waiting in greys.
KIND_COLORS = {
    "data": "#9ecae1", "teacher": "#3182bd", "student": "#31a354", "step": "#a1d99b",
    "checkpoint": "#756bb1", "eval": "#fdae6b", "allreduce": "#de2d26", "send": "#fc9272", "recv": "#fcbba1",
    "exchange": "#a50f15",
    "recv-wait": "#bdbdbd", "send-wait": "#969696", "exchange-wait": "#737373",
    "data-wait": "#d9d9d9",
}
BREAKDOWN = (("compute", "#31a354"), ("communication", "#de2d26"), ("waiting", "#969696"), ("idle", "#f0f0f0"))


def image_format(path: str | os.PathLike) -> str:
    """The format ``plot_report`` writes ``path`` in: its suffix (``.svg``, ``.pdf``, ...), PNG
    when it has none. ValueError for a suffix matplotlib cannot write (or .pgf without the TeX
    system it needs), ImportError without matplotlib: both before anything is drawn (the CLI
    asks before training)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'pipebd[plot]'") from err
    suffix = os.path.splitext(os.fspath(path))[1][1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise ValueError(f"cannot plot to {os.fspath(path)!r}: matplotlib writes no .{suffix} files "
                         f"(it writes {', '.join('.' + s for s in sorted(supported))})")
    if suffix == "pgf":   # drawn by measuring text with a TeX system
        import matplotlib

        tex = matplotlib.rcParams["pgf.texsystem"]
        if shutil.which(tex) is None:
            raise ValueError(f"cannot plot to {os.fspath(path)!r}: .pgf files need {tex} (a TeX system), "
                             f"which is not installed")
    return suffix or "png"


def plot_report(report: Any, path: str | os.PathLike | None = None, *, dpi: int = 120) -> Any:
    """Draw ``report`` (a ``pipebd.Report`` or ``CodistillReport``) and save it to ``path``
    when given, exactly there, in the format its suffix names (``image_format``: PNG without
    one). Returns the matplotlib ``Figure``."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'pipebd[plot]'") from err
    fmt = None if path is None else image_format(path)
    tracks = report.tracks
    stages = getattr(report, "stages", None) or []
    evaluated = bool(getattr(report, "eval_steps", None))
    heights = [1.2 + 0.35 * len(tracks)]
    if stages:
        heights.append(0.9 + 0.35 * len(stages))
    elif evaluated:
        heights.append(2.6)
    fig = Figure(figsize=(11, sum(heights)), layout="constrained")
    axes = fig.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    timeline = axes[0]
    bars = axes[1] if stages else None

    kinds: list[str] = []
    for row, (_, spans) in enumerate(tracks):
        for kind in sorted({s.kind for s in spans}, key=_kind_order):
            extents = [(s.start, s.end - s.start) for s in spans if s.kind == kind]
            timeline.broken_barh(extents, (row - 0.4, 0.8), facecolors=KIND_COLORS.get(kind, "black"),
                                 label=kind, gid=f"{row}:{kind}")
            if kind not in kinds:
                kinds.append(kind)
    timeline.set_yticks(range(len(tracks)), [name for name, _ in tracks])
    timeline.set_ylim(len(tracks) - 0.5, -0.5)
    timeline.set_xlabel("seconds since the start barrier")
    timeline.set_title(_title(report))
    timeline.legend(handles=[Patch(color=KIND_COLORS.get(k, "black"), label=k) for k in kinds],
                    loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)

    if bars is not None:
        labels = []
        for s, st in enumerate(stages):
            blocks = f"{st.blocks[0]}-{st.blocks[-1]}" if len(st.blocks) > 1 else f"{st.blocks[0]}"
            labels.append(f"stage {s}: blocks {blocks} x{len(st.ranks)}")
            left = 0.0
            for (name, color), value in zip(BREAKDOWN, (st.utilization, st.communication, st.waiting, st.idle)):
                bars.barh(s, value, left=left, color=color, edgecolor="white", gid=f"{s}:{name}")
                if value >= 0.06:
                    bars.text(left + value / 2, s, f"{value:.0%}", ha="center", va="center", fontsize="small")
                left += value
        bars.set_yticks(range(len(stages)), labels)
        bars.set_ylim(len(stages) - 0.5, -0.5)
        bars.set_xlim(0, 1)
        bars.set_xlabel("fraction of the wall time (mean over a stage's replicas)")
        bars.legend(handles=[Patch(color=c, label=n) for n, c in BREAKDOWN], loc="upper left",
                    bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    if evaluated and not stages:
        _accuracy_curves(axes[1], report)
    if path is not None:
        from .outputs import write_output     # a file whole or not at all: a full disk leaves any older one

        write_output(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt))
    return fig


def _accuracy_curves(ax: Any, report: Any) -> None:
    """Accuracy on ``eval_data`` against steps: one line per model, the ensemble dashed."""
    curves = [(f"model {i}", acc, "-") for i, acc in enumerate(report.accuracy)]
    if report.n > 1:
        curves.append(("ensemble", report.ensemble_accuracy, "--"))
    for label, acc, style in curves:
        ax.plot(report.eval_steps, acc, style, marker="o", markersize=3, label=label, gid=f"accuracy:{label}")
    ax.set_xlabel("steps (per model)")
    ax.set_ylabel("accuracy on eval_data")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)


def _kind_order(kind: str) -> tuple[int, str]:
    order = list(KIND_COLORS)
    return (order.index(kind) if kind in order else len(order), kind)


def _title(report: Any) -> str:
    plan = getattr(report, "plan", None)
    where = f"plan {plan.describe()}" if plan is not None else f"mode {getattr(report, 'mode', '?')}"
    return (f"{getattr(report, 'strategy', 'codistillation')} on {report.world_size} rank(s), {where}: "
            f"{report.samples_per_s:.1f} samples/s")

