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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(points) <= 12 else None, markersize=3, linewidth=1.4)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def loss_curve(train: Sequence[tuple[float, float]], val: Sequence[tuple[float, float]], title: str) -> bytes:
    return line_chart({"train loss": train, "held-out loss": val}, title=title, ylabel="loss")
