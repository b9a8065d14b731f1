"""Render a paper table next to our results: ``python experiments/tables.py <table> [...]``.

Reads every ``metrics.json`` under ``--results`` (default: ``outputs/``; Hydra sweeps write to
``outputs/multirun/<experiment>/...``), matches runs to the rows of
``experiments/paper_tables.yaml`` (runs of the table's experiment only, by group choices, CLI
overrides or resolved config values), and writes ``<out>/<table>.md`` with paper | ours | delta
per metric ("not run" where no result exists) and ``<out>/<table>.png``: each metric against the
table's natural x axis (sparsity, else TFLOPs, else the rows in order) plus an FID-CLIP panel,
paper dashed/hollow, ours solid/filled.
With ``--wandb entity/project`` it also pulls run summaries from W&B.
Tables defined only in code (the embedded-default studies) go through ``render_sweep``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import yaml

from edm.records import flat_config

HERE = Path(__file__).resolve().parent
SPEC = HERE / "paper_tables.yaml"


def load_results(root: Path) -> list[dict]:
    """Every metrics.json below ``root``, newest last."""
    out = []
    for p in sorted(Path(root).rglob("metrics.json"), key=lambda p: p.stat().st_mtime):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        rec["_path"] = str(p)
        out.append(rec)
    return out


def wandb_record(run) -> dict:
    """A W&B run (``.config``, ``.summary``, ``.url``) as a metrics.json-shaped record.

    The runner logs the resolved config as nested dicts plus ``provenance`` (Hydra group choices
    and CLI overrides, which the config alone lacks: ``method=tome_c`` resolves to
    ``method.name=tome``); the summary holds the flat ``eval/...`` scalars. The record's
    ``run.config`` is flattened by ``edm.records.flat_config`` (as metrics.json) so ``value_of`` reads both alike.
    Runs logged without ``provenance`` fall back to ``experiment_name`` and ``method.name``.
    """
    cfg = dict(run.config)
    flat = flat_config(cfg)
    prov = cfg.get("provenance") or {}
    choices = prov.get("choices") or {"experiment": cfg.get("experiment_name"),
                                      "method": (cfg.get("method") or {}).get("name")}
    metrics = {k: v for k, v in run.summary.items()  # drops _runtime/_step and the images table
               if not k.startswith("_") and type(v) in (int, float)}
    return {"metrics": metrics, "_path": run.url,
            "run": {"choices": dict(choices), "overrides": list(prov.get("overrides") or []),
                    "config": flat}}


def load_wandb(path: str, api=None) -> list[dict]:
    """Records for every run of the W&B project ``entity/project`` (``api`` defaults to
    ``wandb.Api()``; tests pass a fake)."""
    if api is None:  # pragma: no cover - needs network and a W&B account
        import wandb

        api = wandb.Api()
    return [wandb_record(r) for r in api.runs(path)]


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def value_of(rec: dict, key: str):
    """A run's value for ``key``: CLI override, then group choice, then resolved config."""
    run = rec.get("run", {})
    for ov in run.get("overrides", []):
        k, _, v = ov.lstrip("+~").partition("=")
        if k == key:
            return v
    if key in run.get("choices", {}):
        return run["choices"][key]
    return run.get("config", {}).get(key, run.get(key))


def matches(rec: dict, match: dict, experiment: str | None = None) -> bool:
    # A table's rows differ only in method/sparsity, so a run from another experiment (or an ad-hoc
    # run of another model) must not fill them.
    if experiment and rec.get("run", {}).get("choices", {}).get("experiment") != experiment:
        return False
    return all(_same(value_of(rec, k), v) for k, v in match.items())


def _fmt(v) -> str:
    if v is None:
        return "not run"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def row_records(spec: dict, results: list[dict]) -> list[tuple[dict, dict | None]]:
    """Each paper row with the newest run matching it (None: not run)."""
    out = []
    for row in spec["rows"]:
        hits = [r for r in results if matches(r, row["match"], spec.get("experiment"))]
        out.append((row, hits[-1] if hits else None))
    return out


def _protocol_text(p: dict | None) -> str:
    if not p:
        return "not recorded (run made before metrics.json recorded it)"
    sched = p.get("scheduler") or "model default"
    return (f"{p['num_inference_steps']} steps, CFG {p['guidance_scale']:g}, "
            f"{p['height']}x{p['width']}, {sched}")


def protocol_lines(spec: dict, pairs: list[tuple[dict, dict | None]]) -> list[str]:
    """The paper's generation protocol and the one(s) our rows were generated with."""
    ours: dict[str, list[str]] = {}
    for row, rec in pairs:
        if rec is not None:
            ours.setdefault(_protocol_text(rec.get("run", {}).get("protocol")), []).append(row["label"])
    lines = [f"Generation protocol: paper {spec.get('protocol', 'not stated')}; "]
    if not ours:
        lines[0] += "ours: no rows run yet."
    elif len(ours) == 1:
        lines[0] += f"ours {next(iter(ours))} (every row)."
    else:
        lines[0] += "**ours differ between rows**:"
        lines += [f"- {text}: {', '.join(labels)}" for text, labels in ours.items()]
    return lines


def render(name: str, spec: dict, results: list[dict], image: str | None = None) -> str:
    metrics = spec["metrics"]
    head = ["row"] + [f"{m} paper | {m} ours | Δ" for m in metrics]
    lines = [f"### {spec['title']}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * (1 + 3 * len(metrics))]
    pairs = row_records(spec, results)
    for row, rec in pairs:
        cells = [row["label"]]
        for m, key in metrics.items():
            paper = row.get("paper", {}).get(m)
            ours = rec["metrics"].get(key) if rec else None
            delta = (ours - paper) if (ours is not None and paper is not None) else None
            cells += [_fmt(paper), _fmt(ours), _fmt(delta) if delta is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    ran = sum(rec is not None for _, rec in pairs)
    lines += ["", (f"{ran}/{len(spec['rows'])} rows have results. Reproduce: "
                   f"`python run.py experiment={spec.get('experiment', name)}`."), ""]
    lines += protocol_lines(spec, pairs)
    if image:
        lines += ["", f"![{name}: paper dashed/hollow, ours solid/filled]({image})"]
    return "\n".join(lines) + "\n"


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
        ours = ({m: rec["metrics"][k] for m, k in metrics.items() if k in rec["metrics"]}
                if rec else None)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xname, points = plot_points(spec, results)
    ys = [m for m in spec["metrics"] if m != xname]
    panels = [(m, xname) for m in ys]
    if "FID" in spec["metrics"] and "CLIP" in spec["metrics"]:
        panels.append(("FID", "CLIP"))
    ncol = min(len(panels), 3)
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.3 * ncol, 8), 3.4 * nrow + 0.8),
                             squeeze=False)
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
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[s], marker="o", label=s) for s in series if s]
    handles += [Line2D([], [], color="k", lw=0.8, label=p["label"]) for p in points if p["base"]]
    handles += [Line2D([], [], color="gray", ls="--", marker="o", mfc="none", label="paper"),
                Line2D([], [], color="gray", ls="-", marker="o", label="ours")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    fig.suptitle(spec["title"], fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if nrow == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [ax.get_title() for ax in axes.flat[:len(panels)]]


def render_sweep(results: list[dict], row_key: str, col_key: str, metric: str,
                 title: str) -> str:
    """A grid (e.g. method x sparsity) of one metric from a sweep (studies without paper rows)."""
    rows = sorted({str(value_of(r, row_key)) for r in results})
    cols = sorted({value_of(r, col_key) for r in results}, key=lambda v: float(v))
    lines = [f"### {title}", "",
             f"| {row_key} \\ {col_key} | " + " | ".join(map(str, cols)) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for rk in rows:
        cells = []
        for ck in cols:
            hit = [r for r in results
                   if str(value_of(r, row_key)) == rk and _same(value_of(r, col_key), ck)]
            cells.append(_fmt(hit[-1]["metrics"].get(metric)) if hit else "not run")
        lines.append(f"| {rk} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="*", help="table names (default: all in paper_tables.yaml)")
    ap.add_argument("--results", default="outputs", help="folder searched for metrics.json")
    ap.add_argument("--wandb", default=None, help="entity/project to read runs from")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the .md and .png files go")
    args = ap.parse_args(argv)
    specs = yaml.safe_load(SPEC.read_text())
    names = args.tables or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        ap.error(f"unknown table(s) {unknown}; choose from: {', '.join(specs)}")
    results = load_results(Path(args.results)) + (load_wandb(args.wandb) if args.wandb else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        plot(specs[n], results, out / f"{n}.png")
        md = render(n, specs[n], results, image=f"{n}.png")
        (out / f"{n}.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
