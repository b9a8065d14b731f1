"""The leaderboard: every method family at several budgets in one table, and Pareto plots of
quality against FLOPs per image and against measured latency.

    python run.py experiment=leaderboard_digits                     # the sweep (conf/experiment/)
    python experiments/leaderboard.py digits --collect              # copy its records here, render
    python experiments/leaderboard.py digits --latency              # re-time every row vs dense
    python experiments/leaderboard.py digits                        # re-render from the copies
    python experiments/leaderboard.py sdxl --results /scratch/edm/outputs   # a GPU model's sweep

A row is one file of ``conf/experiment/leaderboard_rows/`` (the run records it as the group
choice ``experiment/leaderboard_rows``); only runs of ``experiment=leaderboard_<model>`` count,
the newest complete run of each row wins. ``--collect`` copies them (without per-image lists)
to ``experiments/results/leaderboard_runs/<model>/<row>.json``; the renderer reads those copies
plus, with ``--results``, any sweep below that folder. Writes
``experiments/results/leaderboard_<model>.md`` and ``.png``; hand-written text after the
``<!-- discussion -->`` line of an existing .md is kept.

Columns: quality (digit FID / prompt accuracy on digits, FID / CLIP / ImageReward on COCO) and
fidelity to the dense images (PSNR / SSIM / LPIPS, ``eval=paired``); cost: FLOPs per image (the
whole trajectory of one sample, ``perf/tflops_per_image``), its ratio to dense, latency per image,
the speed-up over dense, non-zero parameters, peak memory (CUDA only: on CPU the runner reports
the process's peak RSS, which in a one-process sweep is the maximum over all jobs so far) and the
time to prepare (``method/apply_seconds``: calibration, pruning, patching). *Pareto* marks the
rows no other row beats on both the primary quality metric and the cost (FLOPs, latency).

Latency from the sweep (``perf/sec_per_image``) is one timing of one run on whatever else the
machine was doing. ``--latency`` re-times every row in one process, each batch alternated with
the dense pipeline, thread CPU time and wall clock, median of ``--rounds``
(:mod:`leaderboard_latency`); the table and the latency plot use it where it exists.

Fewer-steps rows are scored against the dense model at its own steps
(``Method.reference_gen``). The committed digits copies were made before that runner fix: their
PSNR/SSIM were recomputed against the dense row's images then, and say so
(``leaderboard.paired_reference``, marked in the table).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from leaderboard_data import (
    FAMILIES,
    FAMILY_ORDER,
    FAMILY_STYLE,
    FIDELITY,
    FLOPS_TOLERANCE,
    HERE,
    LATENCY_FILE,
    LATENCY_TOLERANCE,
    MARK,
    PAIRED,
    QUALITY,
    RESULTS,
    ROW_KEY,
    RUNS,
    _f,
    badness,
    build,
    collect,
    complete,
    equal_cost_groups,
    family_of,
    flops_unit,
    label_of,
    load_latency,
    load_rows,
    newest_per_row,
    pareto,
    quality_spec,
    row_name,
)

__all__ = ["FAMILIES", "FAMILY_ORDER", "FAMILY_STYLE", "FIDELITY", "FLOPS_TOLERANCE", "HERE", "LATENCY_FILE", "LATENCY_TOLERANCE", "MARK", "PAIRED", "QUALITY", "RESULTS", "ROW_KEY", "RUNS", "badness", "build", "collect", "complete", "equal_cost_groups", "family_of", "flops_unit", "label_of", "load_latency", "load_rows", "newest_per_row", "pareto", "quality_spec", "row_name"]


def render(model: str, entries: list[dict], latency: dict | None, command: str,
           image: str | None = None) -> str:
    quality = quality_spec(model)
    primary, pname, primary_up, _ = quality[0]
    fidelity = [c for c in FIDELITY if any(c[0] in e["metrics"] for e in entries)]
    cuda = any(e["metrics"].get("perf/peak_mem_gb") != e["metrics"].get("perf/peak_rss_gb")
               for e in entries)
    unit, scale = flops_unit(entries)
    lat_note = ("alternated with dense, thread CPU time" if latency else
                "from the sweep: one run each, noisy")
    compiled = any(e.get("speedup_compiled") for e in entries)
    head = (["row", "family"] + [c[1] for c in quality] + [c[1] for c in fidelity]
            + [f"{unit}/image", "FLOPs × dense", "s/image", "speed-up"]
            + (["vs compiled"] if compiled else []) + ["non-zero params (M)"]
            + (["peak mem (GB)"] if cuda else []) + ["prepare (s)", "Pareto"])
    lines = [f"# Leaderboard: `model={model}`", "",
             f"Every method family at several budgets, one run per row: `{command}`. "
             f"Latency: {lat_note}; *speed-up* is against the eager dense model, *vs compiled* "
             f"against the compiled dense one (`compile.enabled=true`). **bold** = best quality column; *Pareto*: no other row has "
             f"a better {pname} at lower or equal cost (F: FLOPs per image, L: latency).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}
    for key, _, up, _ in quality + fidelity:
        vals = [e["metrics"][key] for e in entries if e["name"] not in ("dense", "compiled")
                and isinstance(e["metrics"].get(key), float) and math.isfinite(e["metrics"][key])]
        if vals:
            best[key] = max(vals) if up else min(vals)
    for e in entries:
        m = e["metrics"]
        cells = [e["label"], e["family"]]
        for key, _, _, spec in quality + fidelity:
            v = m.get(key)
            s = _f(v, spec)
            cells.append(f"**{s}**" if v is not None and best.get(key) == v else s)
        cells += [_f(e["flops"] * scale if e["flops"] is not None else None, "{:.3f}"),
                  _f(e["flops_ratio"], "{:.3f}"), _f(e["latency"], "{:.4f}"),
                  _f(e["speedup"], "{:.2f}×")]
        if compiled:
            cells.append(_f(e.get("speedup_compiled"), "{:.2f}×"))
        cells.append(_f(e["params_m"], "{:.3f}"))
        if cuda:
            cells.append(_f(e["peak_mem_gb"], "{:.2f}"))
        prep = _f(e["prepare_s"], "{:.1f}")
        if e.get("compile_s") is not None:
            prep += f" (+{e['compile_s']:.0f} compile)"
        cells.append(prep)
        cells.append(" ".join(f for f, k in (("F", "pareto_flops"), ("L", "pareto_latency")) if e[k]))
        lines.append("| " + " | ".join(cells) + " |")
    floor = next((e["metrics"].get("eval/digit_fid_floor") for e in entries
                  if e["metrics"].get("eval/digit_fid_floor") is not None), None)
    lines += [""]
    if floor is not None:
        n = next((e["num_items"] for e in entries if e["name"] == "dense"), None)
        lines.append(f"Digit FID floor (real training vs held-out digits, "
                     f"{'%d images' % n if n else 'same count'}): {floor:.2f}.")
    lines.append("FLOPs per image: the denoiser's FLOPs over one sample's whole trajectory "
                 "(`perf/tflops_per_image`, measured with `torch.utils.flop_counter` on a real "
                 "trajectory, cached steps as they ran; the CFG batch's FLOPs halved, as the papers quote "
                 "them). Unstructured zeros run in dense kernels: no FLOPs saved.")
    if not cuda:
        rss = max((e["metrics"].get("perf/peak_rss_gb") or 0) for e in entries)
        lines.append(f"Peak memory is not a column: on CPU the runner reports the process's peak "
                     f"RSS, and the sweep's jobs share one process (its peak: {rss:.2f} GB).")
    if latency:
        lines.append(f"Latency: `{latency.get('command', '')}`: {latency.get('how', '')}")
    else:
        lines.append("Latency is `perf/sec_per_image` of each sweep job (one timing on a shared "
                     "machine): indicative only; `--latency` re-times every row against dense.")
    fixed = [e["label"] for e in entries if e["metrics"] and "paired_fixed" in e]
    if fixed:
        lines.append("PSNR/SSIM of " + ", ".join(fixed) + " are against the dense row's images.")
    for e in entries:
        e["_bad"] = badness(e["metrics"].get(primary), primary_up)
    for cost, tol, title in (("flops", FLOPS_TOLERANCE, "At equal FLOPs"),
                             ("latency", LATENCY_TOLERANCE, "At equal latency")):
        groups = equal_cost_groups(entries, cost, tol)
        if not groups:
            continue
        what = "FLOPs per image" if cost == "flops" else "s/image"
        lines += ["", f"## {title} (within {tol:.0%} of {what}; best {pname} first)", ""]
        for g in groups:
            lo, hi = (min(x[cost] for x in g), max(x[cost] for x in g))
            if cost == "flops" and g[0].get("flops_ratio"):
                d = g[0]["flops"] / g[0]["flops_ratio"]  # the dense row's FLOPs per image
                lo, hi, unit, spec = lo / d, hi / d, "× dense FLOPs", "{:.2f}"
            elif cost == "flops":
                unit, spec = "TFLOPs/image", "{:.4g}"
            else:
                unit, spec = "s/image", "{:.4f}"
            span = spec.format(lo) if spec.format(lo) == spec.format(hi) else \
                f"{spec.format(lo)}–{spec.format(hi)}"
            cost_txt = f"{span} {unit}"
            ranked = "; ".join(f"{x['label']} {_f(x['metrics'].get(primary), quality[0][3])}"
                               for x in g)
            lines.append(f"- {cost_txt}: {ranked}")
    if image:
        lines += ["", f"![leaderboard_{model}: {pname} vs FLOPs per image and vs latency]({image})"]
    return "\n".join(lines) + "\n"


def write(model: str, rows: dict[str, dict], command: str, out_dir: Path = RESULTS) -> Path:
    latency = load_latency(model)
    entries = build(model, rows, latency)
    for e in entries:
        if rows[e["name"]].get("leaderboard", {}).get("paired_reference"):
            e["paired_fixed"] = True
    md = out_dir / f"leaderboard_{model}.md"
    png = md.with_suffix(".png")
    from leaderboard_plot import plot

    plot(model, entries, png, latency)
    text = render(model, entries, latency, command, image=png.name)
    if md.exists() and MARK in md.read_text():
        text += "\n" + MARK + md.read_text().split(MARK, 1)[1]
    md.write_text(text)
    return md


DEFAULT_COMMAND = "python run.py experiment=leaderboard_{model}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="digits | sd15 | sdxl | sd35_medium | flux_dev")
    ap.add_argument("--results", type=Path, default=None,
                    help="also read runs below this folder (default with --collect: outputs/)")
    ap.add_argument("--collect", action="store_true",
                    help="copy the newest complete run of each row into leaderboard_runs/<model>/")
    ap.add_argument("--latency", action="store_true",
                    help="re-time every row alternated with dense first (leaderboard_latency.py)")
    ap.add_argument("--rounds", type=int, default=3, help="--latency: timed rounds per row")
    ap.add_argument("--rows", default=None, help="--latency: comma-separated rows (default: all)")
    ap.add_argument("--command", default=None,
                    help="the sweep command printed in the table (default: the experiment's)")
    args = ap.parse_args(argv)
    command = args.command or DEFAULT_COMMAND.format(model=args.model)
    if args.collect:
        rows = collect(args.model, args.results or HERE.parent / "outputs")
    else:
        rows = load_rows(args.model, args.results)
    if args.latency:
        from leaderboard_latency import measure

        measure(args.model, RUNS / args.model / LATENCY_FILE, rounds=args.rounds,
                rows=args.rows.split(",") if args.rows else None)
    if not rows:
        sys.exit(f"no complete runs of experiment=leaderboard_{args.model} found "
                 f"(run `{DEFAULT_COMMAND.format(model=args.model)}` first)")
    print(write(args.model, rows, command).read_text())


if __name__ == "__main__":
    main()
