"""Charts as PNG bytes (matplotlib, no display needed) and as markdown images with a data URI.

A markdown artifact holding `![alt](data:image/png;base64,...)` renders as an image in the
Prefect UI with no external host (inline SVG is stripped by its sanitiser); the same markdown
renders in Jupyter and on GitHub.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

Series = dict[str, Sequence[tuple[float, float]]]


def line_chart(series: Series, title: str = "", xlabel: str = "step", ylabel: str = "",
               size: tuple[float, float] = (7.0, 3.4), dpi: int = 100) -> bytes:
    """One line per named series of (x, y) points, as a PNG. Empty series are left out."""
    return panels({title: series}, xlabel, ylabel, width=size[0], height=size[1], dpi=dpi)


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def loss_curve(train: Sequence[tuple[float, float]], val: Sequence[tuple[float, float]], title: str) -> bytes:
    return line_chart({"train loss": train, "held-out loss": val}, title=title, ylabel="loss")


def panels(charts: dict[str, Series], xlabel: str = "step", ylabel: str = "", dashed: str | None = None,
           width: float = 7.0, height: float = 3.0, dpi: int = 100) -> bytes:
    """One chart per title, stacked in one PNG (e.g. every stage's loss curves of several runs). A
    series whose name ends with `dashed` is drawn dashed in the colour of the series before it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * max(len(charts), 1)), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (title, series) in enumerate(charts.items(), start=1):
        ax = fig.add_subplot(len(charts), 1, i)
        colour = None
        for name, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points)
            paired = dashed is not None and name.endswith(dashed) and colour is not None
            (line,) = ax.plot(xs, ys, label=name, linestyle="--" if paired else "-", color=colour if paired else None,
                              marker="o" if len(points) <= 12 else None, markersize=3, linewidth=1.4)
            colour = line.get_color()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(series.values()):
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
