"""Pareto plots of the leaderboard (:mod:`leaderboard`): quality against FLOPs per image and
against latency, one colour per method family, the front dotted."""

from __future__ import annotations

import math
from pathlib import Path

from leaderboard_data import FAMILY_STYLE, FIDELITY, badness, flops_unit, pareto, quality_spec


def plot(model: str, entries: list[dict], path: Path, latency: dict | None) -> None:
    """Primary quality (and PSNR vs dense, where measured) against FLOPs per image and against
    latency; one colour per family, one line per method, the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    quality = quality_spec(model)
    ys = [quality[0]] + [c for c in FIDELITY[:1] if any(
        isinstance(e["metrics"].get(c[0]), float) and math.isfinite(e["metrics"][c[0]])
        for e in entries)]
    unit, scale = flops_unit(entries)
    xs = [("flops_ratio", "FLOPs per image (× dense)", "pareto_flops"),
          ("latency", "s / image " + ("(alternated with dense)" if latency else "(sweep, noisy)"),
           "pareto_latency")]
    fig, axes = plt.subplots(len(ys), 2, figsize=(13, 5.2 * len(ys)), squeeze=False)
    for r, (key, yname, up, _) in enumerate(ys):
        for c, (xkey, xname, flag) in enumerate(xs):
            ax = axes[r][c]
            pts = [e for e in entries if e.get(xkey) is not None
                   and isinstance(e["metrics"].get(key), float) and math.isfinite(e["metrics"][key])]
            by_method: dict[str, list[dict]] = {}
            for e in pts:
                by_method.setdefault(e["method"], []).append(e)
            seen: dict[str, int] = {}  # methods of one family: filled, hollow, hollow dashed
            for method, es in by_method.items():
                family = es[0]["family"]
                color, marker = FAMILY_STYLE.get(family, ("gray", "x"))
                k = seen[family] = seen.get(family, -1) + 1
                es = sorted(es, key=lambda e: e[xkey])
                ax.plot([e[xkey] for e in es], [e["metrics"][key] for e in es], marker=marker,
                        color=color, ms=12 if marker == "*" else 6, lw=1, alpha=0.9,
                        mfc=color if k == 0 else "white", ls="--" if k > 1 else "-",
                        zorder=3 if family == "dense" else 2, label=method)
            # the front of this panel's own metric (the table's flags are for the primary one)
            bad = [badness(e["metrics"][key], up) for e in pts]
            front = sorted((e for e, ok in zip(pts, pareto([(e[xkey], b) for e, b in zip(pts, bad)]))
                            if ok), key=lambda e: e[xkey])
            if front:
                ax.step([e[xkey] for e in front], [e["metrics"][key] for e in front],
                        where="post", ls=":", color="gray", lw=1.5, zorder=0, label="Pareto front")
                for e in front:
                    ax.annotate(e["label"], (e[xkey], e["metrics"][key]), fontsize=7,
                                xytext=(4, 4), textcoords="offset points", color="dimgray")
            if key == quality[0][0] and not up:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            if xkey == "latency":
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.set_title(f"{yname} vs {'FLOPs' if xkey == 'flops_ratio' else 'latency'}",
                         fontsize=10)
            ax.set_xlabel(xname)
            ax.set_ylabel(f"{yname} ({'higher' if up else 'lower'} is better)")
            ax.grid(alpha=0.3, which="both")
            if r == 0 and c == 0:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"leaderboard_{model}: every method family at several budgets", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
