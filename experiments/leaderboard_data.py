"""The leaderboard's data (:mod:`leaderboard`): which row is which method and family, the run
records of each row, and the derived table entries (ratios vs dense, Pareto flags, equal-cost
groups). No rendering here."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from table_data import load_results

RESULTS = HERE / "results"
RUNS = RESULTS / "leaderboard_runs"
MARK = "<!-- discussion -->"
ROW_KEY = "experiment/leaderboard_rows"
LATENCY_FILE = "latency.json"
FLOPS_TOLERANCE = 0.04     # rows within 4 % of FLOPs per image are "at equal FLOPs"
LATENCY_TOLERANCE = 0.10   # ... within 10 % of latency "at equal latency" (timings are noisier)

# (metrics.json key, column header, higher is better, format); the first is the primary metric
QUALITY = {
    "digits": [("eval/digit_fid", "digit FID", False, "{:.2f}"),
               ("eval/prompt_acc", "prompt acc", True, "{:.2f}")],
    "coco": [("eval/fid", "FID", False, "{:.2f}"),
             ("eval/clip_score", "CLIP", True, "{:.4f}"),
             ("eval/image_reward", "ImageReward", True, "{:.3f}")],
}
FIDELITY = [("eval/psnr", "PSNR", True, "{:.1f}"), ("eval/ssim", "SSIM", True, "{:.3f}"),
            ("eval/lpips", "LPIPS", False, "{:.3f}")]
PAIRED = {"eval/psnr": "psnr", "eval/ssim": "ssim", "eval/lpips": "lpips"}

# row-name prefix -> (family, method label); longest prefix first
FAMILIES = [
    ("obs_diff_then_", "composition", "OBS-Diff + cache"),
    ("obs_diff_structured_", "weights, structured", "OBS-Diff structured"),
    ("l1_", "weights, structured", "L1 structured"),
    ("obs_diff_", "weights, unstructured", "OBS-Diff"),
    ("magnitude_", "weights, unstructured", "magnitude"),
    ("wanda_", "weights, unstructured", "Wanda"),
    ("sparsegpt_", "weights, unstructured", "SparseGPT"),
    ("at_edm_", "tokens", "AT-EDM"),
    ("tome_", "tokens", "ToMe"),
    ("deepcache_", "cache", "DeepCache"),
    ("taylorseer_", "cache", "TaylorSeer"),
    ("pab_", "cache", "PAB"),
    ("mag_cache_", "cache", "MagCache"),
    ("first_block_cache_", "cache", "First-Block-Cache"),
    ("faster_cache_", "cache", "FasterCache"),
    ("steps_", "fewer steps", "steps"),
    ("compiled", "dense", "dense + torch.compile"),
    ("dense", "dense", "dense"),
]
FAMILY_ORDER = ["dense", "weights, unstructured", "weights, structured", "tokens", "cache",
                "fewer steps", "composition"]
FAMILY_STYLE = {"dense": ("black", "*"), "weights, unstructured": ("tab:blue", "o"),
                "weights, structured": ("tab:purple", "s"), "tokens": ("tab:green", "^"),
                "cache": ("tab:orange", "D"), "fewer steps": ("tab:red", "v"),
                "composition": ("tab:brown", "P")}


def family_of(name: str) -> tuple[str, str]:
    """``(family, method label)`` of a row name (``tome_1`` -> ``("tokens", "ToMe")``)."""
    for prefix, family, method in FAMILIES:
        if name == prefix or name.startswith(prefix):
            return family, method
    return "other", name


def quality_spec(model: str) -> list[tuple]:
    return QUALITY["digits" if model == "digits" else "coco"]


def row_name(rec: dict) -> str | None:
    return rec.get("run", {}).get("choices", {}).get(ROW_KEY)


def _cfg(rec: dict, key: str):
    return rec.get("run", {}).get("config", {}).get(key)


def label_of(name: str, rec: dict) -> str:
    """A short human label: the method and the knob its budget sets."""
    family, method = family_of(name)
    run = rec.get("run", {})
    s, tag = _cfg(rec, "sparsity"), run.get("tag") or name
    if family == "dense":
        return method
    if family.startswith("weights"):
        return f"{method} {float(s):.0%}"
    if family == "composition":
        # run.tag is the first method's; the run name has both: <model>-<tag>+<then tag>-s<seed>
        second = (run.get("run_name") or tag).split("+", 1)[-1]
        n = re.match(r"(deepcache|taylorseer)-n(\d+)", second)
        second = f"{'DeepCache' if n[1] == 'deepcache' else 'TaylorSeer'} N={n[2]}" if n else second
        return f"OBS-Diff {float(s):.0%} + {second}"
    if family == "fewer steps":
        return f"{_cfg(rec, 'gen.num_inference_steps')} steps"
    knob = {"AT-EDM": "method.prune_ratio", "ToMe": "method.ratio",
            "DeepCache": "method.cache_interval", "TaylorSeer": "method.cache_interval",
            "PAB": "method.spatial_attention_block_skip_range",
            "MagCache": "method.threshold", "First-Block-Cache": "method.threshold"}.get(method)
    value = _cfg(rec, knob) if knob else None
    if value is None:
        return tag
    prefix = "N=" if "cache_interval" in knob or "skip_range" in knob else ""
    return f"{method} {prefix}{value:g}" if isinstance(value, (int, float)) else f"{method} {value}"


# --- the records ---------------------------------------------------------------------------------

def complete(rec: dict, primary: str) -> bool:
    return rec.get("run", {}).get("missing_images") == 0 and primary in rec.get("metrics", {})


def newest_per_row(records: list[dict], model: str) -> dict[str, dict]:
    """The newest complete run of each row of ``experiment=leaderboard_<model>`` (``records``
    oldest first, as :func:`table_data.load_results` returns them)."""
    primary = quality_spec(model)[0][0]
    out: dict[str, dict] = {}
    for rec in records:
        name = row_name(rec)
        if name and rec["run"]["choices"].get("experiment") == f"leaderboard_{model}" \
                and complete(rec, primary):
            out[name] = rec
    return out


def load_rows(model: str, results: Path | None = None) -> dict[str, dict]:
    """Committed copies of ``model``'s rows, overridden by newer runs below ``results``."""
    recs = load_results(RUNS / model) if (RUNS / model).is_dir() else []
    if results is not None:
        recs += load_results(results)
    return newest_per_row(recs, model)


def collect(model: str, results: Path) -> dict[str, dict]:
    """Copy the newest complete run of every row below ``results`` into ``RUNS/<model>/``."""
    rows = newest_per_row(load_results(results), model)
    dest = RUNS / model
    dest.mkdir(parents=True, exist_ok=True)
    for name, rec in rows.items():
        rec = {k: v for k, v in rec.items() if k not in ("_path", "per_image")}
        (dest / f"{name}.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(f"leaderboard_{model}: {len(rows)} rows -> {dest}")
    return load_rows(model)


def load_latency(model: str) -> dict | None:
    p = RUNS / model / LATENCY_FILE
    return json.loads(p.read_text()) if p.exists() else None


# --- the table -----------------------------------------------------------------------------------

def pareto(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """Which ``(cost, badness)`` points no other point dominates (<= on both, < on one); a point
    with a missing or NaN coordinate is never optimal and dominates nothing."""
    def ok(p):
        return all(v is not None and not math.isnan(v) for v in p)

    out = []
    for i, p in enumerate(points):
        if not ok(p):
            out.append(False)
            continue
        out.append(not any(ok(q) and q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
                           for j, q in enumerate(points) if j != i))
    return out


def badness(value, higher_is_better: bool):
    if value is None:
        return None
    return -value if higher_is_better else value


def build(model: str, rows: dict[str, dict], latency: dict | None = None) -> list[dict]:
    """One entry per row: label, family, quality, cost, ratios vs the dense row and Pareto flags.

    ``latency`` (the ``--latency`` file) supplies re-timed seconds per image and speed-ups; rows
    it lacks fall back to the sweep's ``perf/sec_per_image`` and its ratio to the dense row's.
    """
    quality = quality_spec(model)
    primary, _, primary_up, _ = quality[0]
    dense = rows.get("dense")
    dm = dense["metrics"] if dense else {}
    timed = (latency or {}).get("rows", {})
    out = []
    for name, rec in rows.items():
        m = rec["metrics"]
        family, method = family_of(name)
        flops = m.get("perf/tflops_per_image")
        e = {"name": name, "label": label_of(name, rec), "family": family, "method": method,
             "metrics": m, "flops": flops, "num_items": rec["run"].get("num_items"),
             "flops_ratio": flops / dm["perf/tflops_per_image"]
             if flops is not None and dm.get("perf/tflops_per_image") else None,
             "sweep_latency": m.get("perf/sec_per_image"),
             "prepare_s": m.get("method/apply_seconds"),
             "params_m": m.get("perf/nonzero_params_m"),
             "peak_mem_gb": m.get("perf/peak_mem_gb")}
        if name in timed:
            t = timed[name]
            e["latency"], e["speedup"], e["latency_source"] = t["sec_per_image"], t["speedup"], "alternated"
            if t.get("compile_s") is not None:
                e["compile_s"] = t["compile_s"]
        else:
            e["latency"], e["latency_source"] = e["sweep_latency"], "sweep"
            d = dm.get("perf/sec_per_image")
            e["speedup"] = d / e["latency"] if d and e["latency"] else None
        e["delta"] = (m[primary] - dm[primary]) if primary in m and primary in dm else None
        out.append(e)
    # speed-up against what a user would otherwise run, the compiled dense model: the ratio of
    # the two speed-ups over dense (each timed alternated with its own dense batches, so the
    # machine's drift between rows cancels), not of latencies taken at different times
    comp = next((e["speedup"] for e in out if e["name"] == "compiled"), None)
    for e in out:
        e["speedup_compiled"] = e["speedup"] / comp if comp and e["speedup"] else None
    bad = [badness(e["metrics"].get(primary), primary_up) for e in out]
    for flag, cost in (("pareto_flops", "flops"), ("pareto_latency", "latency")):
        for e, opt in zip(out, pareto([(e[cost], b) for e, b in zip(out, bad)])):
            e[flag] = opt
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    out.sort(key=lambda e: (order.get(e["family"], 99), e["method"] != "dense",
                            e["method"], -(e["flops"] or 0), e["name"]))
    return out


def equal_cost_groups(entries: list[dict], cost: str, tol: float) -> list[list[dict]]:
    """Rows whose ``cost`` lies within ``tol`` (relative) of the cheapest row of their group, for
    groups spanning at least two families; each group sorted best-first by the primary metric
    (entries carry it as ``_bad``)."""
    pts = sorted((e for e in entries if e.get(cost) is not None and e.get("_bad") is not None),
                 key=lambda e: e[cost])
    groups, cur = [], []
    for e in pts:
        if cur and e[cost] > cur[0][cost] * (1 + tol):
            groups.append(cur)
            cur = []
        cur.append(e)
    if cur:
        groups.append(cur)
    return [sorted(g, key=lambda e: e["_bad"]) for g in groups
            if len({e["family"] for e in g}) > 1]


def _f(v, spec="{:.3g}"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return spec.format(v)


def flops_unit(entries: list[dict]) -> tuple[str, float]:
    """GFLOPs for the embedded model (dense ~1.6 G per image), TFLOPs for real ones."""
    dense = next((e["flops"] for e in entries if e["name"] == "dense" and e["flops"]), None)
    return ("GFLOPs", 1e3) if dense is not None and dense < 0.1 else ("TFLOPs", 1.0)
