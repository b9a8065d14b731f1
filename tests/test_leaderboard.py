"""The leaderboard (issue 13): renderer on fake run records (ratios vs dense, Pareto marks, equal-cost
groups, the fewer-steps paired fix) and the leaderboard experiments' rows (every row of every
model composes into a method the model's family supports; every row file is used)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import leaderboard as lb

from edm.runner import build_method

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("leaderboard_*.yaml"))
ROW_FILES = sorted(p.stem for p in (ROOT / "conf" / "experiment" / "leaderboard_rows").glob("*.yaml"))


def record(row, fid, gflops, sec=0.1, experiment="leaderboard_digits", steps=25, **extra):
    metrics = {"eval/digit_fid": fid, "eval/prompt_acc": extra.pop("acc", 1.0),
               "perf/tflops_per_image": gflops / 1e3, "perf/sec_per_image": sec,
               "perf/peak_mem_gb": 1.0, "perf/peak_rss_gb": 1.0,
               "method/apply_seconds": extra.pop("prepare", 0.0), "perf/nonzero_params_m": 0.375}
    metrics.update(extra.pop("metrics", {}))
    config = {"sparsity": extra.pop("sparsity", 0.5), "gen.num_inference_steps": steps}
    config.update(extra.pop("config", {}))
    return {"metrics": metrics,
            "run": {"choices": {"experiment": experiment, lb.ROW_KEY: row}, "config": config,
                    "missing_images": 0, "tag": extra.pop("tag", row), "run_name": row,
                    "protocol": {"num_inference_steps": steps, "height": 16, "width": 16}}}


@pytest.fixture
def rows():
    recs = [record("dense", 1.5, 1.6, sec=0.10),
            record("compiled", 1.5, 1.6, sec=0.06),
            record("obs_diff_1", 2.2, 1.6, sec=0.10, sparsity=0.5),
            record("deepcache_1", 1.4, 0.8, sec=0.05, config={"method.cache_interval": 3}),
            record("steps_3", 1.45, 0.8, sec=0.045, steps=12),
            record("tome_0", 1.6, 1.3, sec=0.13, config={"method.ratio": 0.3}),
            record("steps_4", 3.0, 0.5, sec=0.03, steps=9)]
    return {lb.row_name(r): r for r in recs}


def by_name(entries):
    return {e["name"]: e for e in entries}


def test_pareto_marks_only_undominated_points():
    pts = [(1.0, 1.0), (0.5, 2.0), (0.5, 1.5), (2.0, 0.9), (2.0, 1.2), (None, 0.1),
           (0.4, math.nan), (1.0, 1.0)]
    # (0.5, 2.0) is beaten by (0.5, 1.5); (2.0, 1.2) by (1.0, 1.0); missing/NaN never optimal;
    # an exact tie (the two (1, 1)) dominates neither
    assert lb.pareto(pts) == [True, False, True, True, False, False, False, True]


def test_build_ratios_vs_dense_and_pareto_flags(rows):
    e = by_name(lb.build("digits", rows))
    assert e["dense"]["flops_ratio"] == pytest.approx(1.0)
    assert e["deepcache_1"]["flops_ratio"] == pytest.approx(0.5)
    assert e["steps_4"]["flops_ratio"] == pytest.approx(0.5 / 1.6)
    assert e["compiled"]["speedup"] == pytest.approx(0.10 / 0.06)
    assert e["tome_0"]["delta"] == pytest.approx(0.1)
    # FLOPs: deepcache (1.4 @ 0.8) beats dense, compiled, steps_3 (same FLOPs, worse FID), tome
    assert {n for n, x in e.items() if x["pareto_flops"]} == {"deepcache_1", "steps_4"}
    # latency: steps_3 is faster than deepcache but worse; both are on the front, as is steps_4
    assert {n for n, x in e.items() if x["pareto_latency"]} == {"deepcache_1", "steps_3", "steps_4"}
    assert e["obs_diff_1"]["label"] == "OBS-Diff 50%"
    assert e["steps_3"]["label"] == "12 steps"
    assert e["deepcache_1"]["label"] == "DeepCache N=3"
    assert e["tome_0"]["label"] == "ToMe 0.3"
    assert [x["name"] for x in lb.build("digits", rows)][:2] == ["dense", "compiled"]


def test_latency_file_replaces_the_sweep_timing(rows):
    latency = {"rows": {"tome_0": {"sec_per_image": 0.08, "speedup": 1.25},
                        "compiled": {"sec_per_image": 0.05, "speedup": 1.6, "compile_s": 30.0}}}
    e = by_name(lb.build("digits", rows, latency))
    assert e["tome_0"]["latency"] == 0.08 and e["tome_0"]["speedup"] == 1.25
    assert e["tome_0"]["latency_source"] == "alternated"
    assert e["steps_3"]["latency_source"] == "sweep"
    md = lb.render("digits", list(e.values()), latency, "python run.py experiment=leaderboard_digits")
    assert "(+30 compile)" in md
    # against the compiled dense model: the ratio of the two alternated speed-ups
    assert e["tome_0"]["speedup_compiled"] == pytest.approx(1.25 / 1.6)
    assert e["compiled"]["speedup_compiled"] == pytest.approx(1.0)
    assert "| vs compiled |" in md and "0.78×" in md


def test_equal_cost_groups_span_families(rows):
    entries = lb.build("digits", rows)
    for x in entries:
        x["_bad"] = x["metrics"]["eval/digit_fid"]
    groups = lb.equal_cost_groups(entries, "flops", 0.04)
    names = [[x["name"] for x in g] for g in groups]
    assert ["deepcache_1", "steps_3"] in names               # 0.8 G: best FID first
    assert ["dense", "compiled", "obs_diff_1"] in names or \
        ["compiled", "dense", "obs_diff_1"] in names          # 1.6 G: ties keep either order
    assert not any("steps_4" in g for g in names)            # alone at 0.5 G: no comparison


def test_render_marks_pareto_and_keeps_the_discussion(rows, tmp_path):
    md = lb.write("digits", rows, "python run.py experiment=leaderboard_digits", out_dir=tmp_path)
    text = md.read_text()
    line = next(x for x in text.splitlines() if x.startswith("| DeepCache N=3 |"))
    assert line.rstrip().endswith("| F L |")
    assert next(x for x in text.splitlines() if x.startswith("| dense |")).rstrip().endswith("|  |")
    assert "0.500" in line                                    # FLOPs × dense
    assert (tmp_path / "leaderboard_digits.png").stat().st_size > 10_000
    assert "Peak memory is not a column" in text              # CPU: cumulative RSS, not per row
    md.write_text(text + "\n" + lb.MARK + "\nhand-written\n")
    lb.write("digits", rows, "cmd", out_dir=tmp_path)
    assert md.read_text().count("hand-written") == 1


def test_newest_complete_run_of_the_experiment_wins():
    old = record("tome_0", 9.0, 1.3)
    new = record("tome_0", 1.6, 1.3)
    partial = record("tome_0", 0.1, 1.3)
    partial["run"]["missing_images"] = 3
    other = record("tome_0", 0.2, 1.3, experiment="digits_token_tome")
    picked = lb.newest_per_row([old, new, partial, other], "digits")
    assert picked["tome_0"]["metrics"]["eval/digit_fid"] == 1.6


def test_latency_mode_times_a_row_against_dense(tmp_path):
    """``--latency`` builds the row as its run would, alternates it with dense and records the
    speed-up (9 steps instead of 25: clearly faster, whatever else runs on the machine)."""
    from leaderboard_latency import measure

    path = tmp_path / "latency.json"
    data = measure("digits", path, rounds=1, rows=["steps_4"])
    rec = json.loads(path.read_text())["rows"]["steps_4"]
    assert data["rows"]["steps_4"] == rec and rec["rounds"] == 1
    assert rec["speedup"] > 1.5 and rec["sec_per_image"] > 0
    assert "alternated" in data["how"]


def _rows_of(experiment, compose_job):
    cfg = compose_job([f"experiment={experiment}"], hydra_cfg=True)
    return [r.strip() for r in str(cfg.hydra.sweeper.params[f"+{lb.ROW_KEY}"]).split(",")]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_row_runs_on_its_model_family(experiment, compose_job):
    """test_configs composes and validates every sweep point; this adds the family check a run
    makes before loading (a cache a family does not support is an UnsupportedFamily error)."""
    rows = _rows_of(experiment, compose_job)
    assert rows[:2] == ["dense", "compiled"] and len(set(rows)) == len(rows)
    families = set()
    for row in rows:
        job = compose_job([f"experiment={experiment}", f"+{lb.ROW_KEY}={row}"])
        build_method(job).check(job.model.family)
        families.add(lb.family_of(row)[0])
        if row == "compiled":
            assert job.compile.enabled
    assert {"dense", "weights, unstructured", "weights, structured", "tokens", "cache",
            "fewer steps", "composition"} <= families


def test_every_row_file_is_used_and_labelled(compose_job):
    used = {r for e in EXPERIMENTS for r in _rows_of(e, compose_job)}
    assert set(ROW_FILES) == used
    assert all(lb.family_of(r)[0] != "other" for r in ROW_FILES)


def test_digits_budgets_overlap_in_flops():
    """The digits leaderboard's matching claim, from its committed runs: every family but the
    unstructured one shares a 4 % FLOPs window with another family."""
    rows = lb.load_rows("digits")
    if len(rows) < 30:
        pytest.skip("the digits leaderboard has not been collected")
    entries = lb.build("digits", rows)
    for x in entries:
        x["_bad"] = x["metrics"]["eval/digit_fid"]
    grouped = {x["family"] for g in lb.equal_cost_groups(entries, "flops", lb.FLOPS_TOLERANCE)
               for x in g}
    assert {"weights, structured", "tokens", "cache", "fewer steps", "composition"} <= grouped
    assert (lb.RESULTS / "leaderboard_digits.md").exists()
