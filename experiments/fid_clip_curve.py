"""AT-EDM's FID-CLIP curves on SD-XL (spec §1.7): our CFG sweep against the paper's best points.

    python run.py experiment=atedm_sdxl_fid_clip hydra/launcher=slurm_gpu_example data.root=/data/coco
    python experiments/fid_clip_curve.py [--results outputs] [--wandb entity/project]

writes ``experiments/results/atedm_sdxl_fid_clip.{md,png}`` (the same as
``python experiments/tables.py atedm_sdxl_fid_clip``; this is its ``shape: curve`` renderer). The
paper only gives its curves as a figure, so the comparison is each model's best FID (and the CLIP
score there) read off it (``paper_tables.yaml``: FID-CLIP curve, best points) against the best
FID of our sweep, plus our full sweep; models or scales without a run say "not run".
"""

from __future__ import annotations

import sys
from pathlib import Path

from table_data import fmt, footer, matches, metric_value
from table_plots import canvas, save


def sweep_records(spec: dict, results: list[dict]) -> list[tuple[dict, dict]]:
    """Each row (model) with ``{sweep value: newest matching run}`` over ``spec['values']``."""
    key = spec["sweep"]
    out = []
    for row in spec["rows"]:
        runs = {}
        for v in spec["values"]:
            hits = [r for r in results
                    if matches(r, {**row["match"], key: v}, spec.get("experiment"))]
            if hits:
                runs[v] = hits[-1]
        out.append((row, runs))
    return out


def _point(spec: dict, rec: dict) -> dict:
    return {m: metric_value(rec["metrics"], k) for m, k in spec["metrics"].items()}


def best(spec: dict, runs: dict) -> tuple[float, dict] | None:
    """(sweep value, metrics) of the lowest-FID run, as the paper's "best point"."""
    pts = [(v, _point(spec, r)) for v, r in runs.items()]
    pts = [(v, p) for v, p in pts if p.get("FID") is not None]
    return min(pts, key=lambda vp: vp[1]["FID"]) if pts else None


def render(name: str, spec: dict, results: list[dict], image: str | None = None) -> str:
    table = sweep_records(spec, results)
    lines = [f"### {spec['title']}", "",
             ("| model | FID paper (best) | CLIP paper | FID ours (best) | CLIP ours | at CFG | "
              "Δ FID | TFLOPs ours |"), "|" + "---|" * 8]
    for row, runs in table:
        paper = row.get("paper", {})
        b = best(spec, runs)
        ours = b[1] if b else {}
        d = (ours["FID"] - paper["FID"]) if b and paper.get("FID") is not None else None
        lines.append(f"| {row['label']} | {fmt(paper.get('FID'))} | {fmt(paper.get('CLIP'))} | "
                     f"{fmt(ours.get('FID'))} | {fmt(ours.get('CLIP'))} | "
                     f"{fmt(b[0]) if b else '–'} | {fmt(d) if d is not None else '–'} | "
                     f"{fmt(ours.get('TFLOPs'))} |")
    lines += ["", f"Our sweep ({spec['sweep']}), FID / CLIP:", "",
              "| CFG | " + " | ".join(row["label"] for row, _ in table) + " |",
              "|" + "---|" * (1 + len(table))]
    for v in spec["values"]:
        cells = []
        for _, runs in table:
            p = _point(spec, runs[v]) if v in runs else None
            cells.append(f"{fmt(p.get('FID'))} / {fmt(p.get('CLIP'))}" if p else "not run")
        lines.append(f"| {fmt(v)} | " + " | ".join(cells) + " |")
    flat = [({"label": f"{row['label']} CFG {fmt(v)}"}, runs.get(v))
            for row, runs in table for v in spec["values"]]
    ran = sum(rec is not None for _, rec in flat)
    lines += footer(name, spec, ran, len(flat), flat, image, unit="runs")
    return "\n".join(lines) + "\n"


def plot(spec: dict, results: list[dict], path: Path) -> list[str]:
    """FID vs CLIP: our sweep per model (solid, filled, CFG next to each point) and the paper's
    best point (hollow diamond, same colour)."""
    from matplotlib.lines import Line2D

    fig, axes = canvas(1)
    ax = axes[0, 0]
    handles = []
    for i, (row, runs) in enumerate(sweep_records(spec, results)):
        c = f"C{i}"
        paper = row.get("paper", {})
        if paper.get("FID") is not None and paper.get("CLIP") is not None:
            ax.plot(paper["CLIP"], paper["FID"], marker="D", ms=8, mfc="none", color=c, ls="none")
        pts = [(v, _point(spec, r)) for v, r in sorted(runs.items())]
        pts = [(v, p["CLIP"], p["FID"]) for v, p in pts if None not in (p["CLIP"], p["FID"])]
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", color=c, ls="-")
            for v, x, y in pts:
                ax.annotate(fmt(v), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        handles.append(Line2D([], [], color=c, marker="o", label=row["label"]))
    if not any(ln.get_marker() == "o" for ln in ax.get_lines()):
        ax.text(0.5, 0.95, "ours: not run", transform=ax.transAxes, ha="center", va="top")
    handles.append(Line2D([], [], color="gray", marker="D", mfc="none", ls="none",
                          label="paper best point"))
    ax.set_xlabel("CLIP")
    ax.set_ylabel("FID")
    ax.set_title("FID vs CLIP (CFG sweep)", fontsize=9)
    ax.grid(alpha=0.3)
    return save(fig, axes, 1, handles, spec["title"], path, styles=False)


def main(argv=None) -> None:
    import tables

    tables.main(["atedm_sdxl_fid_clip", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
