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

Entry keys beyond the rows (experiments/paper_tables.yaml): ``shape`` (``pairs``: dense -> pruned
per setting, experiments/table_pairs.py; ``curve``: a CFG sweep against the paper's best points,
experiments/fid_clip_curve.py), ``md`` (several tables written into one ``<md>.md``),
``committed`` (run copies kept in the repo, read as well as ``--results``; ``--collect`` refreshes
them) and ``notes`` (lines printed under the table). A metric is a metrics.json key or
``{key: ..., scale: ...}`` (e.g. seconds -> minutes). A metric no row has a paper number for
(our own measurements, the digits studies) gets an "ours" column only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the table modules next to this file, also when imported
SPEC = HERE / "paper_tables.yaml"

# Re-exported: experiments/digits_tables.py and the tests use them from here.
from table_data import (
    fmt,
    footer,
    load_results,
    load_wandb,
    matches,
    metric_value,
    paper_metrics,
    protocol_lines,
    row_records,
    same,
    value_of,
    wandb_record,
)
from table_plots import plot, plot_points

__all__ = [
    "load_results",
    "load_wandb",
    "main",
    "matches",
    "plot",
    "plot_points",
    "protocol_lines",
    "render",
    "render_sweep",
    "value_of",
    "wandb_record",
]


def render(name: str, spec: dict, results: list[dict], image: str | None = None) -> str:
    metrics = spec["metrics"]
    with_paper = paper_metrics(spec)
    head = ["row"] + [f"{m} paper | {m} ours | Δ" if m in with_paper else f"{m} ours"
                      for m in metrics]
    ncols = 1 + sum(3 if m in with_paper else 1 for m in metrics)
    lines = [f"### {spec['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * ncols]
    pairs = row_records(spec, results)
    for row, rec in pairs:
        cells = [row["label"]]
        for m, key in metrics.items():
            ours = metric_value(rec["metrics"], key) if rec else None
            if m not in with_paper:
                cells.append(fmt(ours))
                continue
            paper = row.get("paper", {}).get(m)
            delta = (ours - paper) if (ours is not None and paper is not None) else None
            cells += [fmt(paper) if paper is not None else "–", fmt(ours),
                      fmt(delta) if delta is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    ran = sum(rec is not None for _, rec in pairs)
    lines += footer(name, spec, ran, len(spec["rows"]), pairs, image)
    return "\n".join(lines) + "\n"



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
                   if str(value_of(r, row_key)) == rk and same(value_of(r, col_key), ck)]
            cells.append(fmt(hit[-1]["metrics"].get(metric)) if hit else "not run")
        lines.append(f"| {rk} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shape_module(spec: dict):
    """The module that renders and plots this entry's shape (``render``, ``plot``)."""
    shape = spec.get("shape", "rows")
    if shape == "rows":
        return sys.modules[__name__]
    if shape == "pairs":
        import table_pairs

        return table_pairs
    if shape == "curve":
        import fid_clip_curve

        return fid_clip_curve
    raise ValueError(f"unknown table shape {shape!r} (rows | pairs | curve)")


def committed_results(spec: dict) -> list[dict]:
    """The run copies kept in the repo for this table (``committed:``, relative to experiments/)."""
    d = spec.get("committed")
    return load_results(HERE / d) if d and (HERE / d).is_dir() else []


def collect(spec: dict, results: list[dict]) -> int:
    """Copy this table's complete runs (its experiment, no missing images) into ``committed``;
    a later sweep's job of the same name overwrites the earlier copy."""
    dest = HERE / spec["committed"]
    recs = [r for r in results if r.get("run", {}).get("choices", {}).get("experiment")
            == spec["experiment"] and r["run"].get("missing_images", 0) == 0
            and HERE not in Path(r.get("_path", "/")).resolve().parents]
    if recs:
        shutil.rmtree(dest, ignore_errors=True)  # a table's copies come from one set of runs
        dest.mkdir(parents=True)
    for r in recs:
        job = Path(r["run"].get("output_dir", r["_path"])).name  # "<num>_<overrides>"
        name = re.sub(r"[^A-Za-z0-9._=-]", "_", job) + ".json"
        r = {k: v for k, v in r.items() if k != "_path"}
        (dest / name).write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
    return len(recs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="*", help="table names (default: all in paper_tables.yaml)")
    ap.add_argument("--results", default="outputs", help="folder searched for metrics.json")
    ap.add_argument("--wandb", default=None, help="entity/project to read runs from")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the .md and .png files go")
    ap.add_argument("--collect", action="store_true",
                    help="first copy the runs of tables with `committed:` into the repo")
    args = ap.parse_args(argv)
    specs = yaml.safe_load(SPEC.read_text())
    names = args.tables or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        ap.error(f"unknown table(s) {unknown}; choose from: {', '.join(specs)}")
    results = load_results(Path(args.results)) + (load_wandb(args.wandb) if args.wandb else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for n in names:
        spec = specs[n]
        if args.collect and spec.get("committed"):
            print(f"{n}: {collect(spec, results)} runs -> {spec['committed']}")
        runs = committed_results(spec) + results
        mod = shape_module(spec)
        mod.plot(spec, runs, out / f"{n}.png")
        files.setdefault(spec.get("md", n), []).append(mod.render(n, spec, runs, image=f"{n}.png"))
    for md_name, parts in files.items():
        md = "\n".join(parts)
        (out / f"{md_name}.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
