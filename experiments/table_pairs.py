"""Tables of dense -> pruned pairs per setting (``shape: pairs``): OBS-Diff's robustness tables
(CFG, steps, sampler; spec §2.8 Tables 11-13) and their digits counterparts.

The entry's ``pair`` names what tells the two runs of a setting apart (``{dense: {method: none},
pruned: {method: obs_diff}}``); each row's ``match`` names the setting (``gen.guidance_scale: 5.0``)
and its ``paper`` holds ``{dense: {metric: v}, pruned: {metric: v}}``. A cell reads
``dense → pruned`` as the paper lists them; Δ is pruned − dense, the cost of pruning at that
setting (the papers' point: it should not grow away from the calibration setting).
"""

from __future__ import annotations

from pathlib import Path

from table_data import fmt, footer, matches, metric_value, paper_metrics
from table_plots import canvas, save

SIDES = ("dense", "pruned")


def pair_records(spec: dict, results: list[dict]) -> list[tuple[dict, dict]]:
    """Each row with its newest matching run per side (``{dense: rec | None, pruned: ...}``)."""
    out = []
    for row in spec["rows"]:
        recs = {}
        for side in SIDES:
            match = {**spec["pair"][side], **row["match"]}
            hits = [r for r in results if matches(r, match, spec.get("experiment"))]
            recs[side] = hits[-1] if hits else None
        out.append((row, recs))
    return out


def _values(row: dict, recs: dict, metric: str, key) -> tuple[dict, dict]:
    """(paper, ours) as ``{side: value or None}``."""
    paper = {s: ((row.get("paper") or {}).get(s) or {}).get(metric) for s in SIDES}
    ours = {s: metric_value(recs[s]["metrics"], key) if recs[s] else None for s in SIDES}
    return paper, ours


def _arrow(v: dict) -> str:
    if v["dense"] is None and v["pruned"] is None:
        return "not run"
    return f"{fmt(v['dense'])} → {fmt(v['pruned'])}"


def _delta(v: dict) -> str:
    return "–" if None in (v["dense"], v["pruned"]) else fmt(v["pruned"] - v["dense"])


def render(name: str, spec: dict, results: list[dict], image: str | None = None) -> str:
    metrics = spec["metrics"]
    with_paper = paper_metrics(spec)
    head, ncols = ["setting"], 1
    for m in metrics:
        if m in with_paper:
            head += [f"{m} paper (dense → pruned)", f"{m} ours", f"{m} Δ paper", f"{m} Δ ours"]
            ncols += 4
        else:
            head += [f"{m} (dense → pruned)", f"{m} Δ"]
            ncols += 2
    lines = [f"### {spec['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * ncols]
    table = pair_records(spec, results)
    for row, recs in table:
        cells = [row["label"]]
        for m, key in metrics.items():
            paper, ours = _values(row, recs, m, key)
            cells += ([_arrow(paper), _arrow(ours), _delta(paper), _delta(ours)]
                      if m in with_paper else [_arrow(ours), _delta(ours)])
        lines.append("| " + " | ".join(cells) + " |")
    # per-run view for the protocol lines: each side of each setting is its own run
    flat = [({"label": f"{row['label']} {s}"}, recs[s]) for row, recs in table for s in SIDES]
    ran = sum(rec is not None for _, rec in flat)
    lines += footer(name, spec, ran, len(flat), flat, image, unit="runs")
    return "\n".join(lines) + "\n"


def plot(spec: dict, results: list[dict], path: Path) -> list[str]:
    """One panel per metric: the settings in order on x, dense (black) and pruned (C0) lines;
    the paper dashed/hollow, ours solid/filled where run."""
    from matplotlib.lines import Line2D

    table = pair_records(spec, results)
    labels = [row["label"] for row, _ in table]
    metrics = spec["metrics"]
    fig, axes = canvas(len(metrics))
    colors = {"dense": "k", "pruned": "C0"}
    for ax, (m, key) in zip(axes.flat, metrics.items()):
        vals = [_values(row, recs, m, key) for row, recs in table]
        for side in SIDES:
            for src, ls, filled in ((0, "--", False), (1, "-", True)):
                pts = [(i, v[src][side]) for i, v in enumerate(vals) if v[src][side] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls=ls, color=colors[side],
                            mfc=colors[side] if filled else "none")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(m)
        ax.set_title(f"{m}: dense vs pruned", fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", label=s) for s, c in colors.items()]
    return save(fig, axes, len(metrics), handles, spec["title"], path)
