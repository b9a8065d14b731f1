"""Plots of the paper tables: paper dashed with hollow markers, ours solid and filled.

``plot_points`` decides the x axis of a rows-shaped table (sparsity, else TFLOPs, else the rows in
order) and ``plot`` draws every metric against it, plus an FID-CLIP panel where the table has
both; ``canvas`` / ``save`` are shared with the other shapes of the other shapes (experiments/table_pairs.py,
experiments/fid_clip_curve.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from table_data import metric_value, row_records

# "Magnitude 40%" -> "Magnitude", "AT-EDM-b" -> "AT-EDM": paper labels are "<method> <setting>".
_SETTING = re.compile(r"[\s-]+(\d+(\.\d+)?%|[a-z])$")


def plot_points(spec: dict, results: list[dict]) -> tuple[str, list[dict]]:
    """What ``plot`` draws: the x axis name and one point per row.

    x is the rows' ``sparsity`` when they match on it, else the TFLOPs metric (paper and ours each
    at their own TFLOPs), else the row's position (``variant``, categorical, one series). Rows
    matched on ``method: none`` are the dense reference (``base``, drawn as horizontal lines). A
    point holds ``series``, ``label``, ``base``, ``x``/``x_ours`` and the ``paper``/``ours``
    metric dicts (ours None: not run).
    """
    metrics = spec["metrics"]
    rows = spec["rows"]
    if any("sparsity" in r["match"] for r in rows):
        xname = "sparsity"
    elif "TFLOPs" in metrics and len({r.get("paper", {}).get("TFLOPs") for r in rows}) > 1:
        xname = "TFLOPs"
    else:
        xname = "variant"
    points, i = [], 0
    for row, rec in row_records(spec, results):
        base = row["match"].get("method") == "none"
        paper = dict(row.get("paper", {}))
        ours = ({m: v for m, k in metrics.items()
                 if (v := metric_value(rec["metrics"], k)) is not None} if rec else None)
        if xname == "sparsity":
            x = x_ours = row["match"].get("sparsity")
        elif xname == "TFLOPs":
            x = paper.get("TFLOPs")
            x_ours = (ours or {}).get("TFLOPs", x)
        else:
            x = x_ours = None if base else i
            i += not base
        points.append({"label": row["label"], "base": base,
                       "series": "" if xname == "variant" else _SETTING.sub("", row["label"]),
                       "x": x, "x_ours": x_ours, "paper": paper, "ours": ours})
    return xname, points


def _draw(ax, pts: list[dict], xy, color, connect: bool) -> None:
    """One series: the paper's points dashed/hollow, ours solid/filled where they exist."""
    for src, ls, mfc in (("paper", "--", "none"), ("ours", "-", color)):
        got = sorted(v for v in (xy(p, src) for p in pts if p[src] is not None) if None not in v)
        if got:
            ax.plot(*zip(*got), marker="o", color=color, mfc=mfc, ls=ls if connect else "none")


def plot(spec: dict, results: list[dict], path: Path) -> list[str]:
    """Write ``path`` (PNG): one panel per metric vs the x axis, plus FID vs CLIP when the table
    has both. Returns the panel titles."""
    from matplotlib.lines import Line2D

    xname, points = plot_points(spec, results)
    ys = [m for m in spec["metrics"] if m != xname]
    panels = [(m, xname) for m in ys]
    if "FID" in spec["metrics"] and "CLIP" in spec["metrics"]:
        panels.append(("FID", "CLIP"))
    fig, axes = canvas(len(panels))
    series = list(dict.fromkeys(p["series"] for p in points if not p["base"]))
    colors = {s: f"C{i}" for i, s in enumerate(series)}
    for ax, (ym, xm) in zip(axes.flat, panels):
        def xy(p, src, ym=ym, xm=xm):
            x = p[src].get("CLIP") if xm == "CLIP" else p["x" if src == "paper" else "x_ours"]
            return (x, p[src].get(ym))
        for s in series:
            _draw(ax, [p for p in points if p["series"] == s and not p["base"]], xy, colors[s],
                  connect=xname != "variant")
        for p in (p for p in points if p["base"]):
            for src, ls in (("paper", "--"), ("ours", "-")):
                if p[src] is None:
                    continue
                if xm == "CLIP":  # the dense model is a point in FID-CLIP space
                    ax.plot(*xy(p, src), marker="*", ms=10, color="k", ls="none",
                            mfc="none" if src == "paper" else "k")
                elif p[src].get(ym) is not None:
                    ax.axhline(p[src][ym], color="k", ls=ls, lw=0.8)
        ax.set_xlabel("CLIP" if xm == "CLIP" else xname)
        ax.set_ylabel(ym)
        ax.set_title(f"{ym} vs {'CLIP' if xm == 'CLIP' else xname}", fontsize=9)
        if xname == "variant" and xm != "CLIP":
            labels = [p["label"] for p in points if not p["base"]]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[s], marker="o", label=s) for s in series if s]
    handles += [Line2D([], [], color="k", lw=0.8, label=p["label"]) for p in points if p["base"]]
    return save(fig, axes, len(panels), handles, spec["title"], path)


def canvas(npanels: int):
    """A figure with ``npanels`` panels, at most three per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(npanels, 3)
    nrow = math.ceil(npanels / ncol)
    return plt.subplots(nrow, ncol, figsize=(max(4.3 * ncol, 8), 3.4 * nrow + 0.8), squeeze=False)


def save(fig, axes, npanels: int, handles: list, title: str, path: Path,
         styles: bool = True) -> list[str]:
    """Hide unused panels, add the legend (``styles``: with the paper/ours line styles) and write
    ``path``; returns the panel titles."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    for ax in axes.flat[npanels:]:
        ax.set_visible(False)
    if styles:
        handles = handles + [
            Line2D([], [], color="gray", ls="--", marker="o", mfc="none", label="paper"),
            Line2D([], [], color="gray", ls="-", marker="o", label="ours")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if axes.shape[0] == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [ax.get_title() for ax in axes.flat[:npanels]]
