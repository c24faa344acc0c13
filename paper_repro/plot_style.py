"""The one matplotlib style of the project (headless Agg), shared by the theory and the LM figures.

Usage: `fig, axes = new_figure(1, 3)`, draw, then `savefig(fig, "t1_theorem41", fig_dir)`, which writes
`fig_dir/t1_theorem41.png` and `.pdf` and closes the figure. Colors are fixed per method name so the same
method has the same color in every figure (`method_color`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
    "ps.fonttype": 42,
    "svg.hashsalt": "cola",
}

# colorblind-safe (Okabe-Ito), fixed order
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
METHOD_COLORS = {
    "LoRA": "#0072B2", "COLA": "#D55E00", "full": "#000000", "full FT": "#000000", "RAC-LoRA": "#009E73",
    "FW": "#CC79A7", "bound": "#7f7f7f",
}
BOUND_STYLE = {"color": "#7f7f7f", "linestyle": "--", "linewidth": 1.3}


def use_style() -> None:
    """Apply the project style to matplotlib's global rcParams (idempotent)."""
    plt.rcParams.update(STYLE)


def method_color(name: str, i: int = 0) -> str:
    """The fixed color of a method (by its name prefix), else the i-th palette color."""
    for key, color in METHOD_COLORS.items():
        if name == key or name.startswith(key + " ") or name.startswith(key + "-"):
            return color
    return PALETTE[i % len(PALETTE)]


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 3.2, height: float = 2.6, **kw):
    """A figure of nrows x ncols panels, each about width x height inches; returns (fig, axes array)."""
    use_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, axes


def savefig(fig, name: str, fig_dir: str | Path) -> list[Path]:
    """Write `fig` as fig_dir/name.png and fig_dir/name.pdf (directories created), close it, return the paths."""
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"name={name!r}: give a bare file stem such as 't1_theorem41' (no suffix, no '/')")
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [fig_dir / f"{name}.png", fig_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)
    return paths
