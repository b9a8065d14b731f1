"""Tables and plots of the layouts-model studies (issue 14).

Reads the runs of the ``layouts_*`` experiments from Hydra's output folders (after
``python run.py experiment=<name>``) or from the copies committed in
``experiments/results/layouts_runs/<experiment>/<run>.json``, and writes

* ``experiments/results/layouts_token_quality.md`` + ``.png``: AT-EDM one factor at a time around
  the paper's setting (selection, refill, DSAP) and ToMe at matched FLOPs, quality vs GFLOPs/step;
* ``experiments/results/layouts_weight_quality.md`` + ``.png``: magnitude / Wanda / SparseGPT /
  OBS-Diff at 30-70 % unstructured sparsity;
* with ``--collect``, ``experiments/results/layouts_samples.png``: the first prompts' images of
  dense and of each method at its middle setting (images are not committed, this picture is).

    python experiments/layouts_tables.py --collect    # copy metrics from outputs/ into the repo, render
    python experiments/layouts_tables.py              # render from the committed copies

``--model flat`` does the same for the model shipped before, whose self-attention is unused
(``experiments/checkpoints/layouts_flat``): runs in ``experiments/results/layouts_flat_runs/``,
reports ``layouts_flat_*.md/.png``, commands with its overrides; collect its runs from their own
output folder (``--outputs``), as every layouts run found there is copied.

Hand-written text after the ``<!-- discussion -->`` line of an existing .md is kept on re-render.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_tables import _f, experiment_of, load, report_args, run_file_name, write_reports
from tables import render_sweep, value_of

RESULTS = HERE / "results"
RUNS = RESULTS / "layouts_runs"
# which weights a set of studies ran on: runs folder, report prefix, overrides every command adds,
# and the sentence that says what the model is
PROFILES = {
    "layouts": {"runs": RUNS, "prefix": "layouts", "extra": "",
                "about": ("the shipped weights, `edm/layouts/weights` (`python -m edm.layouts.train`: copies in "
                          "half the scenes, self-attention query/key x3 at init; its self-attention matters, "
                          "`layouts_premeasure.md`); prompts `data.repeat=0.5` (half the scenes' digits one "
                          "class); `eval/copy_err` is 0 for exact copies, 0.072 between independently drawn "
                          "digits. Runs made before it was shipped, with `model.loader.checkpoint="
                          "experiments/checkpoints/layouts_qk3 data.repeat=0.5` (the same bytes and settings)")},
    "flat": {"runs": RESULTS / "layouts_flat_runs", "prefix": "layouts_flat",
             "extra": "model.loader.checkpoint=experiments/checkpoints/layouts_flat data.repeat=0",
             "about": ("the weights shipped from b280e53 to 83bc8a9, now `experiments/checkpoints/layouts_flat` "
                       "(`python -m edm.layouts.train --copies 0 --qk-init-scale 1`): its self-attention is "
                       "nearly uniform and unused, see `layouts_premeasure.md`; runs made when they were the "
                       "default, `data.repeat` 0")},
}
TOKEN = ("layouts_token_quality", "layouts_token_tome")
WEIGHT = ("layouts_weight_quality",)
DENSE = "layouts_dense"
METHODS = ("magnitude", "wanda", "sparsegpt", "obs_diff")
# ToMe ratio -> the AT-EDM prune_ratio whose FLOPs it matches (conf/experiment/layouts_token_tome.yaml)
TOME_MATCH = {0.07: 0.3, 0.21: 0.5, 0.37: 0.7}
QUALITY = (("eval/object_acc", "per-object accuracy: digit and cell right (higher is better)"),
           ("eval/scene_acc", "scene accuracy: every cell of the prompt right (higher is better)"),
           ("eval/empty_acc", "empty-cell accuracy: no digit drawn where the prompt names none"),
           ("eval/layout_fid", "cell-feature FID (lower is better)"))
COMMANDS = {  # {x}: the profile's extra overrides
    "layouts_dense": "python run.py experiment=layouts_dense{x} gen.progress=False logger=none",
    "layouts_token_quality": "python run.py experiment=layouts_token_quality{x} gen.progress=False logger=none",
    "cosine": ("python run.py experiment=layouts_token_quality method.selection=gwpr "
               "method.assignment=cosine{x} gen.progress=False logger=none"),
    "random_cosine": ("python run.py experiment=layouts_token_quality method.selection=random "
                      "method.assignment=cosine{x} gen.progress=False logger=none"),
    "nodsap": ("python run.py experiment=layouts_token_quality method.selection=gwpr "
               "method.dsap.enabled=false{x} gen.progress=False logger=none"),
    "layouts_token_tome": "python run.py experiment=layouts_token_tome{x} gen.progress=False logger=none",
    "layouts_weight_quality": "python run.py experiment=layouts_weight_quality{x} gen.progress=False logger=none",
}


def collect(outputs: Path, runs: Path = RUNS) -> None:
    """Copy every complete layouts run under ``outputs`` into ``runs`` (no images; newest wins)."""
    n: dict[str, int] = {}
    for p in sorted(outputs.rglob("metrics.json"), key=lambda p: p.stat().st_mtime):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        exp = experiment_of(rec) if isinstance(rec, dict) and "run" in rec else None
        if exp not in TOKEN + WEIGHT + (DENSE,) or rec["run"].get("missing_images") != 0 \
                or "eval/object_acc" not in rec.get("metrics", {}):
            continue
        dest = runs / exp
        dest.mkdir(parents=True, exist_ok=True)
        (dest / run_file_name(rec)).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        n[exp] = n.get(exp, 0) + 1
    for exp, k in sorted(n.items()):
        print(f"{exp}: {k} runs -> {runs / exp}")
    # every copied run (also those of earlier --collect calls, e.g. from another output root)
    prefix = next((k["prefix"] for k in PROFILES.values() if k["runs"] == runs), "layouts")
    samples_png([r for rs in load(runs, runs=runs).values() for r in rs], RESULTS / f"{prefix}_samples.png")


# (label, experiment, overrides the run must have): the rows of the samples picture
SAMPLES = (("dense", DENSE, ()),
           ("AT-EDM 0.5, attention refill", "layouts_token_quality",
            ("method.selection=gwpr", "method.prune_ratio=0.5", "method.assignment=attention",
             "method.dsap.enabled=True")),
           ("AT-EDM 0.5, cosine refill", "layouts_token_quality",
            ("method.selection=gwpr", "method.prune_ratio=0.5", "method.assignment=cosine")),
           ("random 0.5, attention refill", "layouts_token_quality",
            ("method.selection=random", "method.prune_ratio=0.5", "method.assignment=attention")),
           ("random 0.5, cosine refill", "layouts_token_quality",
            ("method.selection=random", "method.prune_ratio=0.5", "method.assignment=cosine")),
           ("ToMe 0.21 (FLOPs of AT-EDM 0.5)", "layouts_token_tome", ("method.ratio=0.21",)),
           ("OBS-Diff 50 %", "layouts_weight_quality", ("method=obs_diff", "sparsity=0.5")),
           ("magnitude 50 %", "layouts_weight_quality", ("method=magnitude", "sparsity=0.5")))


def samples_png(recs: list[dict], path: Path, n: int = 8) -> None:
    """Rows of :data:`SAMPLES` x the first ``n`` prompts, from the runs' image folders."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = []
    for label, exp, need in SAMPLES:
        hits = [r for r in recs if experiment_of(r) == exp
                and all(o in set(r["run"].get("overrides", ())) or _has(r, o) for o in need)]
        if hits and Path(hits[-1]["run"]["images_dir"]).is_dir():
            rows.append((label, Path(hits[-1]["run"]["images_dir"])))
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 2.2, 1.15 * len(rows)), squeeze=False)
    for (label, d), ax_row in zip(rows, axes):
        for i, ax in enumerate(ax_row):
            ax.imshow(Image.open(d / f"{i:06d}.png").convert("L"), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
        ax_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _has(rec: dict, override: str) -> bool:
    key, val = override.split("=", 1)
    return str(value_of(rec, key)) == val


def _dense(by_exp) -> dict | None:
    hits = by_exp.get(DENSE, [])
    return hits[-1] if hits else None


def _header(title: str, commands: list[str], runs: list[dict], profile: dict) -> list[str]:
    n = sorted({r["run"]["num_items"] for r in runs})
    return [
        f"# {title}", "",
        ("Embedded layouts model (`model=layouts`: 1-4 digits at named cells of a 2x2 grid on a 32x32 "
         "canvas, 1024 tokens at the first attention level, 25 DDIM steps, CFG 1.1; "
         f"{profile['about']}), "
         f"{'/'.join(map(str, n))} prompts per run (50 per object count, seed 0), `threads=1`, on a "
         "2-core CPU shared with other jobs. Metrics from `conf/eval/layouts.yaml`: a cell classifier "
         "reads each of the four cells (digit or empty); `eval/layout_fid` is the FID of its cell "
         "features (`layout_fid_floor`: real scenes vs the held-out reference)."),
        "", "Produced by:", "", "```", *commands,
        (f"python experiments/layouts_tables.py{_model_flag(profile)} --collect   # copies metrics to "
         f"experiments/results/{profile['runs'].name}/"),
        "```", ""]


def _dense_line(dense: dict | None) -> list[str]:
    if not dense:
        return ["**Dense baseline**: not run", ""]
    m = dense["metrics"]
    return [(f"**Dense baseline** (`experiment=layouts_dense`): per-object {_f(m.get('eval/object_acc'))}, "
             f"scene {_f(m.get('eval/scene_acc'))}, empty cells {_f(m.get('eval/empty_acc'))}, cell FID "
             f"{_f(m.get('eval/layout_fid'))} (floor {_f(m.get('eval/layout_fid_floor'))}), "
             f"{_f(m.get('perf/gflops_per_step'), '{:.4f}')} GFLOPs/step."), ""]


def token_variant(rec: dict) -> tuple[str, float] | None:
    """(row label, AT-EDM prune ratio it sits at) of a token-study run."""
    if experiment_of(rec) == "layouts_token_tome":
        r = round(float(value_of(rec, "method.ratio")), 3)
        return f"tome (max_downsample=2, ratio {r})", TOME_MATCH.get(r, r)
    if experiment_of(rec) != "layouts_token_quality":
        return None
    dsap = str(value_of(rec, "method.dsap.enabled")).lower() == "true"
    refill = value_of(rec, "method.assignment")
    refill = "" if refill in (None, "attention") else f", {refill} refill"
    return (f"at_edm {value_of(rec, 'method.selection')}{' + DSAP' if dsap else ''}{refill}",
            float(value_of(rec, "method.prune_ratio")))


def _token_records(by_exp) -> list[dict]:
    out = []
    for r in by_exp.get("layouts_token_quality", []) + by_exp.get("layouts_token_tome", []):
        v = token_variant(r)
        if v:
            label = v[0].split(", ratio")[0] + ")" if v[0].startswith("tome") else v[0]
            out.append({"metrics": r["metrics"], "run": {"overrides": [
                f"variant={label}", f"prune_ratio={v[1]}", *r["run"].get("overrides", [])],
                "num_items": r["run"]["num_items"]}})
    return out


def _model_flag(profile: dict) -> str:
    return "".join(f" --model {k}" for k, v in PROFILES.items() if v is profile and k != "layouts")


def _commands(profile: dict, *keys: str) -> list[str]:
    x = f" {profile['extra']}" if profile["extra"] else ""
    return [COMMANDS[k].format(x=x) for k in keys]


def _quality(recs: list[dict]) -> tuple:
    """:data:`QUALITY`, plus the copy error where the runs measured it (prompts with ``data.repeat``)."""
    if any("eval/copy_err" in r["metrics"] for r in recs):
        return QUALITY + (("eval/copy_err", "copy error: same-class digits of a scene, mean abs. pixel "
                           "difference (0 = exact copies)"),)
    return QUALITY


def token_md(by_exp, plot_path: Path, profile: dict = PROFILES["layouts"]) -> str:
    recs = _token_records(by_exp)
    cmds = _commands(profile, "layouts_dense", "layouts_token_quality", "cosine", "random_cosine", "nodsap",
                     "layouts_token_tome")
    lines = _header("Token pruning on the embedded layouts model", cmds, recs or [{"run": {"num_items": 0}}],
                    profile)
    lines += _dense_line(_dense(by_exp))
    lines += [("Columns: AT-EDM `method.prune_ratio`. ToMe rows sit in the column whose AT-EDM (G-WPR, "
               "attention refill, DSAP) FLOPs they match within 0.5 % (ToMe ratio "
               + "/".join(map(str, TOME_MATCH)) + " -> " + "/".join(map(str, TOME_MATCH.values()))
               + "); the GFLOPs table shows every run's measured value."), ""]
    if recs:
        for key, what in _quality(recs) + (("perf/gflops_per_step",
                                     "GFLOPs per step, measured (CFG batch of 2, trajectory mean)"),):
            lines += [render_sweep(recs, "variant", "prune_ratio", key, what), ""]
    else:
        lines += ["not run", ""]
    lines += [f"![quality vs FLOPs]({plot_path.name})", ""]
    return "\n".join(lines)


def weight_md(by_exp, plot_path: Path, profile: dict = PROFILES["layouts"]) -> str:
    runs = by_exp.get("layouts_weight_quality", [])
    lines = _header("Weight pruning on the embedded layouts model",
                    _commands(profile, "layouts_dense", "layouts_weight_quality"),
                    runs or [{"run": {"num_items": 0}}], profile)
    lines += _dense_line(_dense(by_exp))
    if runs:
        for key, what in _quality(runs) + (("method/sparsity", "measured sparsity of the targeted layers"),):
            lines += [render_sweep(runs, "method", "sparsity", key, what), ""]
    else:
        lines += ["not run", ""]
    lines += [f"![quality vs sparsity]({plot_path.name})", ""]
    return "\n".join(lines)


def _plot(series: dict[str, list[tuple[float, dict]]], dense: dict | None, dense_x, xlabel: str,
          path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("eval/object_acc", "eval/scene_acc", "eval/layout_fid")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    for ax, key in zip(axes, keys):
        for label, pts in series.items():
            xy = sorted((x, m.get(key)) for x, m in pts)
            ax.plot(*zip(*xy), marker="o", label=label)
        if dense:
            ax.plot([dense_x], [dense["metrics"][key]], "k*", ms=10, label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        if key == "eval/layout_fid":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_plot(by_exp, path: Path) -> None:
    series: dict[str, list] = {}
    for r in _token_records(by_exp):
        series.setdefault(value_of(r, "variant"), []).append((r["metrics"]["perf/gflops_per_step"], r["metrics"]))
    dense = _dense(by_exp)
    _plot(series, dense, dense and dense["metrics"]["perf/gflops_per_step"], "GFLOPs per step (measured)", path)


def weight_plot(by_exp, path: Path) -> None:
    series: dict[str, list] = {}
    for r in by_exp.get("layouts_weight_quality", []):
        series.setdefault(value_of(r, "method"), []).append((float(value_of(r, "sparsity")), r["metrics"]))
    _plot(series, _dense(by_exp), 0.0, "target sparsity (unstructured)", path)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "layouts"
    if "--model" in argv:  # the profile picks the defaults of report_args' folders
        i = argv.index("--model")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
        if name not in PROFILES:
            raise SystemExit(f"--model: unknown profile {name!r} (one of {', '.join(PROFILES)})")
    prof = PROFILES[name]
    args = report_args(__doc__, prof["runs"], argv)
    if args.collect:
        collect(Path(args.outputs), prof["runs"])
    write_reports(Path(args.out), load(Path(args.source), runs=prof["runs"]),
                  ((f"{prof['prefix']}_token_quality", partial(token_md, profile=prof), token_plot),
                   (f"{prof['prefix']}_weight_quality", partial(weight_md, profile=prof), weight_plot)))


if __name__ == "__main__":
    main()
