"""Render a paper table next to our results: ``python experiments/tables.py <table> [...]``.

Reads every ``metrics.json`` under ``--results`` (default: ``outputs/``; Hydra sweeps write to
``outputs/multirun/<experiment>/...``), matches runs to the rows of
``experiments/paper_tables.yaml`` (group choices, CLI overrides or resolved config values), and
writes ``<out>/<table>.md`` with paper | ours | delta per metric ("not run" where no result
exists). With ``--wandb entity/project`` it also pulls run summaries from W&B.
Tables defined only in code (the embedded-default studies) go through ``render_sweep``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

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


def load_wandb(path: str) -> list[dict]:  # pragma: no cover - needs network and a W&B account
    import wandb

    recs = []
    for r in wandb.Api().runs(path):
        cfg = r.config
        recs.append({"metrics": dict(r.summary), "run": {
            "choices": {"method": cfg.get("method", {}).get("name")},
            "config": {"sparsity": cfg.get("sparsity"), **{f"method.{k}": v for k, v in cfg.get("method", {}).items()}},
            "overrides": []}, "_path": r.url})
    return recs


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
    if experiment and rec.get("run", {}).get("choices", {}).get("experiment") not in (experiment, None):
        return False
    return all(_same(value_of(rec, k), v) for k, v in match.items())


def _fmt(v) -> str:
    if v is None:
        return "not run"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def render(name: str, spec: dict, results: list[dict]) -> str:
    metrics = spec["metrics"]
    head = ["row"] + [f"{m} paper | {m} ours | Δ" for m in metrics]
    lines = [f"### {spec['title']}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * (1 + 3 * len(metrics))]
    ran = 0
    for row in spec["rows"]:
        hits = [r for r in results if matches(r, row["match"], spec.get("experiment"))]
        rec = hits[-1] if hits else None
        ran += rec is not None
        cells = [row["label"]]
        for m, key in metrics.items():
            paper = row.get("paper", {}).get(m)
            ours = rec["metrics"].get(key) if rec else None
            delta = (ours - paper) if (ours is not None and paper is not None) else None
            cells += [_fmt(paper), _fmt(ours), _fmt(delta) if delta is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{ran}/{len(spec['rows'])} rows have results. Reproduce: "
              f"`python run.py experiment={spec.get('experiment', name)}`."]
    return "\n".join(lines) + "\n"


def render_sweep(results: list[dict], row_key: str, col_key: str, metric: str,
                 title: str) -> str:
    """A grid (e.g. method x sparsity) of one metric from a sweep, for studies without paper rows."""
    rows = sorted({str(value_of(r, row_key)) for r in results})
    cols = sorted({value_of(r, col_key) for r in results}, key=lambda v: float(v))
    lines = [f"### {title}", "", f"| {row_key} \\ {col_key} | " + " | ".join(map(str, cols)) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for rk in rows:
        cells = []
        for ck in cols:
            hit = [r for r in results if str(value_of(r, row_key)) == rk and _same(value_of(r, col_key), ck)]
            cells.append(_fmt(hit[-1]["metrics"].get(metric)) if hit else "not run")
        lines.append(f"| {rk} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="*", help="table names (default: all in paper_tables.yaml)")
    ap.add_argument("--results", default="outputs", help="folder searched for metrics.json")
    ap.add_argument("--wandb", default=None, help="entity/project to read runs from")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the .md files go")
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
        md = render(n, specs[n], results)
        (out / f"{n}.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
