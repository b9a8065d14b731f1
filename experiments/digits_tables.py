"""Tables and plots of the embedded-default (digits) quality studies.

Reads the runs of the ``digits_*`` experiments either from Hydra's sweep folders
(``outputs/multirun/<experiment>/...``, after ``python run.py experiment=<name>``) or from the
copies committed in ``experiments/results/digits_runs/<experiment>/<run>.json``, and writes

* ``experiments/results/digits_weight_quality.md`` + ``digits_weight_quality.png`` (unstructured,
  2:4 and structured weight pruning: digit-feature FID and prompt accuracy vs sparsity);
* ``experiments/results/digits_token_quality.md`` + ``digits_token_quality.png`` (AT-EDM with and
  without DSAP, random-token control, ToMe at matched FLOPs: quality vs GFLOPs per step).

    python experiments/digits_tables.py --collect     # copy metrics from outputs/ into the repo, render
    python experiments/digits_tables.py               # render from the committed copies

Hand-written text after the ``<!-- discussion -->`` line of an existing .md is kept on re-render.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tables import load_results, render_sweep, value_of

RESULTS = HERE / "results"
RUNS = RESULTS / "digits_runs"
MARK = "<!-- discussion -->"
WEIGHT = ("digits_weight_quality", "digits_weight_nm", "digits_weight_structured",
          "digits_diff_pruning")
TOKEN = ("digits_token_quality", "digits_token_tome")
METHODS = ("magnitude", "wanda", "sparsegpt", "obs_diff")
# ToMe ratio -> the AT-EDM prune_ratio whose FLOPs it matches (conf/experiment/digits_token_tome.yaml)
TOME_MATCH = {0.17: 0.3, 0.27: 0.4, 0.39: 0.5, 0.53: 0.6, 0.73: 0.7}


def experiment_of(rec: dict) -> str | None:
    return rec.get("run", {}).get("choices", {}).get("experiment")


def run_file_name(rec: dict) -> str:
    """``<hydra job number>_<run name>.json`` with file-system-safe characters."""
    # the job folder is "<num>_<overrides>"; overrides with "/" (paths) nest it deeper
    jobs = [p.split("_", 1)[0] for p in Path(rec["run"]["output_dir"]).parts if re.match(r"^\d+_", p)]
    name = rec["run"]["run_name"].replace(":", "to")
    # run names do not show every swept knob (e.g. DSAP): a hash of the overrides keeps files apart
    tag = hashlib.sha1("\n".join(sorted(rec["run"].get("overrides", []))).encode()).hexdigest()[:6]
    name = f"{int(jobs[-1]):02d}_{name}_{tag}" if jobs else f"{name}_{tag}"
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name) + ".json"


def collect(outputs: Path) -> None:
    """Copy the newest complete sweep of each digits experiment into ``RUNS`` (no images)."""
    for exp in WEIGHT + TOKEN:
        sweeps = sorted((outputs / "multirun" / exp).glob("*"))
        recs = [r for s in sweeps for r in load_results(s)
                if r["run"].get("missing_images") == 0 and "eval/digit_fid" in r["metrics"]]
        if not recs:
            continue
        dest = RUNS / exp
        dest.mkdir(parents=True, exist_ok=True)
        for r in recs:  # later sweeps overwrite earlier ones of the same job
            r = {k: v for k, v in r.items() if k != "_path"}
            (dest / run_file_name(r)).write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
        print(f"{exp}: {len(recs)} runs -> {dest}")


def load(source: Path, runs: Path = RUNS) -> dict[str, list[dict]]:
    """Runs per experiment from ``source`` (a folder of .json copies, ``runs``, or of metrics.json files)."""
    recs = []
    for p in sorted(source.rglob("*.json")):
        if p.name != "metrics.json" and source != runs and runs not in p.parents:
            continue
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "metrics" in rec and "run" in rec:
            recs.append(rec)
    by_exp: dict[str, list[dict]] = {}
    for r in recs:
        by_exp.setdefault(experiment_of(r) or "", []).append(r)
    return by_exp


def _f(v, fmt="{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def _keep_discussion(path: Path, default: str) -> str:
    if path.exists() and MARK in path.read_text():
        return path.read_text().split(MARK, 1)[1]
    return default


def _header(title: str, experiments, runs: list[dict]) -> list[str]:
    n = sorted({r["run"]["num_items"] for r in runs})
    return [
        f"# {title}", "",
        ("Embedded default model (`model=digits`, 16x16 pixel-space UNet, 25 DDIM steps, CFG 1.5), "
        f"{'/'.join(map(str, n))} prompts per run (balanced over the ten digits, seed 0), `threads=1`, on a 2-core "
        "CPU shared with other jobs. Digit-feature FID (`eval/digit_fid`, lower is better; "
        "`digit_fid_floor` = real training digits vs the held-out reference) and prompt accuracy "
        "(`eval/prompt_acc`, the digit classifier agrees with the prompt) from `conf/eval/digits.yaml`."),
        "", "Produced by:", "", "```",
        *[f"python run.py experiment={e}{_extra(runs)}" for e in experiments],
        "python experiments/digits_tables.py --collect   # copies metrics to experiments/results/digits_runs/",
        "```", ""]


def _extra(runs: list[dict]) -> str:
    """CLI overrides every run shared besides the experiment's own (e.g. a checkpoint folder)."""
    common = None
    for r in runs:
        ov = {o for o in r.get("run", {}).get("overrides", [])
              if o.split("=", 1)[0].lstrip("+") in ("logger", "gen.progress")}
        common = ov if common is None else common & ov
    return "".join(f" {o}" for o in sorted(common or ()))


def _dense(by_exp) -> dict | None:
    hits = [r for r in by_exp.get("digits_weight_nm", []) if value_of(r, "method") == "none"]
    return hits[-1] if hits else None


def _structured(by_exp) -> list[dict]:
    """Structured runs (L1, structured OBS-Diff) plus Diff-Pruning labelled by its fine-tuning."""
    out = list(by_exp.get("digits_weight_structured", []))
    for r in by_exp.get("digits_diff_pruning", []):
        ft = int(float(value_of(r, "method.finetune_steps") or 0))
        out.append({"metrics": r["metrics"], "run": {
            "overrides": [f"method=diff_pruning ft{ft}", f"sparsity={value_of(r, 'sparsity')}"],
            "num_items": r["run"]["num_items"]}})
    return out


def weight_md(by_exp, plot_path: Path) -> str:
    uns = by_exp.get("digits_weight_quality", [])
    nm = [r for r in by_exp.get("digits_weight_nm", []) if value_of(r, "method") != "none"]
    st = _structured(by_exp)
    dense = _dense(by_exp)
    lines = _header("Weight pruning on the embedded digits model", WEIGHT, uns + nm + st)
    if dense:
        m = dense["metrics"]
        lines += [(f"**Dense baseline**: digit FID {_f(m.get('eval/digit_fid'))}, prompt accuracy "
                  f"{_f(m.get('eval/prompt_acc'))} (floor FID {_f(m.get('eval/digit_fid_floor'))}), "
                  f"{_f(m.get('perf/params_m'))} M UNet parameters, "
                  f"{_f(m.get('perf/gflops_per_step'), '{:.4f}')} GFLOPs/step."), ""]
    lines += ["## Unstructured", ""]
    if uns:
        for key, what in (("eval/digit_fid", "digit FID (lower is better)"),
                          ("eval/prompt_acc", "prompt accuracy (higher is better)"),
                          ("method/sparsity", "measured sparsity of the targeted layers")):
            lines += [render_sweep(uns, "method", "sparsity", key, what), ""]
    else:
        lines += ["not run", ""]
    lines += ["## 2:4 (sparsity 0.5)", "", "| method | digit FID | prompt acc | measured sparsity |",
              "|---|---|---|---|"]
    for r in sorted(nm, key=lambda r: METHODS.index(value_of(r, "method")) if value_of(r, "method") in METHODS else 9):
        m = r["metrics"]
        lines.append(f"| {value_of(r, 'method')} | {_f(m.get('eval/digit_fid'))} | "
                     f"{_f(m.get('eval/prompt_acc'))} | {_f(m.get('method/sparsity'))} |")
    lines += ["", "## Structured (heads + FFN neurons / channels, physically sliced)", "",
              ("Columns: target `sparsity` (L1 / structured OBS-Diff: fraction of heads and FFN "
               "neurons; Diff-Pruning: torch-pruning channel ratio, which removes far more "
               "parameters on this small model: compare at equal parameters, table 3)."), ""]
    if st:
        for key, what in (("eval/digit_fid", "digit FID"), ("eval/prompt_acc", "prompt accuracy"),
                          ("perf/params_m", "UNet parameters after slicing (M)"),
                          ("perf/gflops_per_step", "GFLOPs per step")):
            lines += [render_sweep(st, "method", "sparsity", key, what), ""]
    else:
        lines += ["not run", ""]
    lines += [f"![quality vs sparsity]({plot_path.name})", ""]
    return "\n".join(lines)


def weight_plot(by_exp, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = _dense(by_exp)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes[:2], ("eval/digit_fid", "eval/prompt_acc")):
        for meth in METHODS:
            pts = sorted((float(value_of(r, "sparsity")), r["metrics"].get(key))
                         for r in by_exp.get("digits_weight_quality", []) if value_of(r, "method") == meth)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=meth)
        if dense:
            ax.axhline(dense["metrics"][key], color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("target sparsity (unstructured)")
        ax.set_ylabel(key)
        if key == "eval/digit_fid":
            ax.set_yscale("log")
    ax = axes[2]
    st = _structured(by_exp)
    for meth in sorted({value_of(r, "method") for r in st}):
        pts = sorted((r["metrics"]["perf/params_m"], r["metrics"].get("eval/digit_fid"))
                     for r in st if value_of(r, "method") == meth)
        if pts:
            ax.plot(*zip(*pts), marker="s", label=meth)
    if dense:
        ax.plot([dense["metrics"]["perf/params_m"]], [dense["metrics"]["eval/digit_fid"]], "k*", label="dense")
    ax.set_xlabel("UNet parameters (M), structured")
    ax.set_ylabel("eval/digit_fid")
    ax.set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_variant(rec: dict) -> tuple[str, float] | None:
    """(row label, matched AT-EDM prune ratio) of a token-study run."""
    if experiment_of(rec) == "digits_token_tome":
        r = float(value_of(rec, "method.ratio"))
        return "tome (max_downsample=2)", TOME_MATCH.get(round(r, 3), r)
    if experiment_of(rec) != "digits_token_quality":
        return None
    sel = value_of(rec, "method.selection")
    dsap = str(value_of(rec, "method.dsap.enabled")).lower() == "true"
    refill = value_of(rec, "method.assignment")
    refill = "" if refill in (None, "attention") else f", {refill} refill"
    return f"at_edm {sel}{' + DSAP' if dsap else ''}{refill}", float(value_of(rec, "method.prune_ratio"))


def _token_records(by_exp) -> list[dict]:
    """Copies of the token runs with ``variant`` / ``prune_ratio`` set for ``render_sweep``."""
    out = []
    for r in by_exp.get("digits_token_quality", []) + by_exp.get("digits_token_tome", []):
        v = token_variant(r)
        if v:
            out.append({"metrics": r["metrics"], "run": {"overrides": [
                f"variant={v[0]}", f"prune_ratio={v[1]}", *r["run"].get("overrides", [])],
                "num_items": r["run"]["num_items"]}})
    return out


def token_md(by_exp, plot_path: Path) -> str:
    recs = _token_records(by_exp)
    lines = _header("Token pruning on the embedded digits model", TOKEN, recs or [{"run": {"num_items": 0}}])
    dense = _dense(by_exp)
    if dense:
        m = dense["metrics"]
        lines += [(f"**Dense baseline** (digits_weight_nm, method=none): digit FID "
                  f"{_f(m.get('eval/digit_fid'))}, prompt accuracy {_f(m.get('eval/prompt_acc'))}, "
                  f"{_f(m.get('perf/gflops_per_step'), '{:.4f}')} GFLOPs/step."), ""]
    lines += [("Columns: AT-EDM `method.prune_ratio` (keep ratio = 1 - column). ToMe rows sit in the "
              "column whose AT-EDM-with-DSAP FLOPs they match (ToMe ratio 0.17/0.27/0.39/0.53/0.73 "
              "-> 0.3/0.4/0.5/0.6/0.7); the GFLOPs table shows the measured value of every run."), ""]
    if recs:
        for key, what in (("eval/digit_fid", "digit FID (lower is better)"),
                          ("eval/prompt_acc", "prompt accuracy (higher is better)"),
                          ("perf/gflops_per_step", "GFLOPs per step, measured (CFG batch of 2, trajectory mean)")):
            lines += [render_sweep(recs, "variant", "prune_ratio", key, what), ""]
    else:
        lines += ["not run", ""]
    lines += [f"![quality vs FLOPs]({plot_path.name})", ""]
    return "\n".join(lines)


def token_plot(by_exp, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _token_records(by_exp)
    dense = _dense(by_exp)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key in zip(axes, ("eval/digit_fid", "eval/prompt_acc")):
        for var in sorted({value_of(r, "variant") for r in recs}):
            pts = sorted((r["metrics"]["perf/gflops_per_step"], r["metrics"].get(key))
                         for r in recs if value_of(r, "variant") == var)
            ax.plot(*zip(*pts), marker="o", label=var)
        if dense:
            ax.plot([dense["metrics"]["perf/gflops_per_step"]], [dense["metrics"][key]], "k*",
                    ms=10, label="dense")
        ax.set_xlabel("GFLOPs per step (measured)")
        ax.set_ylabel(key)
        if key == "eval/digit_fid":
            ax.set_yscale("log")  # 1 (dense) to ~80 (collapsed refill)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_args(doc: str, runs: Path, argv=None) -> argparse.Namespace:
    """The command line shared by the study-table scripts (``--collect``, ``--source``, ...)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collect", action="store_true",
                    help=f"copy the newest runs' metrics from --outputs into {runs} first")
    ap.add_argument("--outputs", default="outputs", help="Hydra output root (for --collect)")
    ap.add_argument("--source", default=str(runs),
                    help="folder of runs to render (default: the committed copies; or e.g. outputs/multirun)")
    ap.add_argument("--out", default=str(RESULTS))
    return ap.parse_args(argv)


def write_reports(out: Path, by_exp, reports) -> None:
    """``<name>.md`` (keeping the text after :data:`MARK`) and ``<name>.png`` per
    ``(name, md_fn, plot_fn)``; a plot that partial sweeps cannot draw is reported, not fatal."""
    out.mkdir(parents=True, exist_ok=True)
    for name, md_fn, plot_fn in reports:
        md_path, png = out / f"{name}.md", out / f"{name}.png"
        discussion = _keep_discussion(md_path, "\n## Discussion\n\n(to be written)\n")
        md_path.write_text(md_fn(by_exp, png) + "\n" + MARK + discussion)
        try:
            plot_fn(by_exp, png)
        except (KeyError, ValueError, TypeError) as e:  # partial sweeps: tables still render
            print(f"{png.name}: not plotted ({e})")
        print(f"wrote {md_path} and {png}")


def main(argv=None) -> None:
    args = report_args(__doc__, RUNS, argv)
    if args.collect:
        collect(Path(args.outputs))
    write_reports(Path(args.out), load(Path(args.source)),
                  (("digits_weight_quality", weight_md, weight_plot),
                   ("digits_token_quality", token_md, token_plot)))


if __name__ == "__main__":
    main()
