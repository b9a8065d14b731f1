"""experiments/tables.py for the remaining tables of both papers (issue 12): OBS-Diff Tables 1
(FLUX.1-dev), 8, 9, 11-14, the AT-EDM FID-CLIP curve and the digits counterparts -- every entry
renders from fake metrics.json records, "not run" where a run is absent; the robustness sweeps keep
the calibration at the protocol while the evaluation changes."""

import itertools
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import tables
from test_tables import PNG, SPECS, _captured_figure, _drawn, _rec

# --- the remaining tables of both papers (issue 12): every entry renders, "not run" where absent

def _run(experiment, overrides, metrics, **config):
    """A metrics.json whose run was made with ``overrides`` (``key=value`` strings)."""
    choices = {"experiment": experiment}
    for ov in overrides:
        k, _, v = ov.partition("=")
        if "." not in k:
            choices[k] = v
    return {"metrics": metrics, "run": {"choices": choices, "overrides": list(overrides),
                                        "config": dict(config), "missing_images": 0}}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_entry_renders_not_run_without_results(name, tmp_path):
    spec = SPECS[name]
    mod = tables.shape_module(spec)
    text = mod.render(name, spec, [], image=f"{name}.png")
    assert spec["title"] in text and "not run" in text and f"({name}.png)" in text
    assert "0/" in text  # nothing ran


@pytest.mark.parametrize("name", ["obsdiff_table11_cfg", "digits_robustness_steps",
                                  "atedm_sdxl_fid_clip", "obsdiff_table8_pruning_time"])
def test_new_shapes_plot_without_and_with_results(name, tmp_path):
    spec = SPECS[name]
    mod = tables.shape_module(spec)
    assert mod.plot(spec, [], tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG


def test_flux_table1_rows_fill_by_method_and_sparsity():
    name = "obsdiff_table1_flux_dev"
    run = _rec(name, "obs_diff", {"eval/fid": 40.0, "eval/clip_score": 0.30,
                                  "eval/image_reward": 0.5}, sparsity=0.7)
    text = tables.render(name, SPECS[name], [run])
    assert "| OBS-Diff 70% | 39.79 | 40 | 0.21 |" in text
    assert "| OBS-Diff 60% | 39.4 | not run |" in text and "1/9 rows" in text


def test_table8_reads_the_apply_time_in_minutes():
    name = "obsdiff_table8_pruning_time"
    runs = [_rec(name, "obs_diff", {"method/apply_seconds": 600.0}),
            _rec(name, "magnitude", {"method/apply_seconds": 1.2})]
    text = tables.render(name, SPECS[name], runs)
    assert "| OBS-Diff | 14.95 | 10 | -4.95 |" in text
    assert "| Magnitude | 0 | 0.02 | 0.02 |" in text
    assert "| Wanda | 7.32 | not run | – |" in text


def test_table9_has_params_and_tflops_columns():
    name = "obsdiff_table9_sd3_medium_structured"
    run = _rec(name, "l1", {"perf/params_b": 1.9, "perf/tflops_per_forward": 2.6}, sparsity=0.1)
    text = tables.render(name, SPECS[name], [run])
    assert "Params_B paper | Params_B ours" in text and "TFLOPs paper" in text
    assert "| L1 10% | 1.91 | 1.9 | -0.01 | 2.59 | 2.6 | 0.01 | 267.3 | not run |" in text


def test_pairs_render_dense_to_pruned_per_setting():
    name = "obsdiff_table11_cfg"
    runs = [_run(name, ["method=none", "gen.guidance_scale=5.0"], {"eval/image_reward": 0.8}),
            _run(name, ["method=obs_diff", "gen.guidance_scale=5.0"], {"eval/image_reward": 0.5}),
            _run(name, ["method=none", "gen.guidance_scale=7.0"], {"eval/image_reward": 0.9}),
            _run("obsdiff_table12_steps", ["method=obs_diff", "gen.guidance_scale=9.0"],
                 {"eval/image_reward": 0.1})]  # another table's run fills nothing here
    text = tables.shape_module(SPECS[name]).render(name, SPECS[name], runs)
    assert "| CFG 5.0 | 0.8319 → 0.5297 | 0.8 → 0.5 | -0.3022 | -0.3 |" in text
    assert "| CFG 7.0 | 0.851 → 0.6425 | 0.9 → not run | -0.2085 | – |" in text
    assert "| CFG 9.0 | 0.8275 → 0.7044 | not run | -0.1231 | – |" in text
    assert "3/6 runs have results" in text


def test_pairs_match_samplers_and_tables_without_paper_numbers():
    name = "obsdiff_table13_samplers_sd3"
    heun = "model.loader.scheduler=FlowMatchHeunDiscreteScheduler"
    runs = [_run(name, ["method=none", heun], {"eval/image_reward": 0.9}),
            _run(name, ["method=obs_diff", heun], {"eval/image_reward": 0.7})]
    text = tables.shape_module(SPECS[name]).render(name, SPECS[name], runs)
    assert "| Heun | 0.92 → 0.7249 | 0.9 → 0.7 |" in text and "| Euler | 0.851 → 0.6425 | not run |" in text

    name = "digits_robustness_cfg"  # no paper numbers: "ours" columns only
    runs = [_run(name, ["method=none", "gen.guidance_scale=1.0"],
                 {"eval/digit_fid": 1.5, "eval/prompt_acc": 0.97})]
    text = tables.shape_module(SPECS[name]).render(name, SPECS[name], runs)
    assert "| setting | digit_FID (dense → pruned) | digit_FID Δ | accuracy (dense → pruned) |" in text
    assert "| CFG 1.0 | 1.5 → not run | – | 0.97 → not run | – |" in text


def test_table14_rows_are_the_calibration_sets():
    name = "obsdiff_table14_calib_set"
    runs = [_run(name, ["calib=coco_train"], {"eval/image_reward": 0.66})]
    text = tables.render(name, SPECS[name], runs)
    assert "| COCO-2014 train | 27.93 | not run | – | 0.3169 | not run | – | 0.6547 | 0.66 |" in text
    assert "| GCC3M | 27.2 | not run |" in text


def test_fid_clip_curve_best_point_and_sweep(tmp_path, monkeypatch):
    import fid_clip_curve

    name = "atedm_sdxl_fid_clip"
    spec = SPECS[name]
    runs = [_run(name, ["method=at_edm_c", f"gen.guidance_scale={g}"],
                 {"eval/fid": fid, "eval/clip_score": clip, "perf/tflops_per_forward": 4.1})
            for g, fid, clip in ((3.0, 29.0, 0.31), (5.0, 27.5, 0.317), (9.0, 31.0, 0.321))]
    text = fid_clip_curve.render(name, spec, runs)
    assert "| AT-EDM @ 4.1 T | 27.8 | 0.318 | 27.5 | 0.317 | 5 | -0.3 | 4.1 |" in text
    assert "| SD-XL @ 6.7 T | 24.7 | 0.31 | not run |" in text
    assert "| 5 | not run | not run | 27.5 / 0.317 | not run |" in text
    assert "3/48 runs have results" in text
    figs = _captured_figure(monkeypatch)
    fid_clip_curve.plot(spec, runs, tmp_path / "c.png")
    ax = figs[-1].axes[0]
    assert _drawn(ax, "-") == [([0.31, 0.317, 0.321], [29.0, 27.5, 31.0])]  # ours, in CFG order
    hollow = [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in ax.get_lines()
              if ln.get_marker() == "D"]
    assert (0.318, 27.8) in hollow and len(hollow) == 4  # the paper's best points


def test_collect_commits_runs_and_tables_share_one_markdown(tmp_path, monkeypatch):
    """``--collect`` copies a digits table's runs to ``committed``; tables naming the same ``md``
    land in one file; a later render reads the committed copies alone."""
    spec = {k: dict(SPECS[k]) for k in ("digits_robustness_cfg", "digits_robustness_steps")}
    for k, s in spec.items():
        s["committed"] = str(tmp_path / "committed" / k)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    monkeypatch.setattr(tables, "SPEC", path)
    res = tmp_path / "outputs"
    runs = [_run("digits_robustness_cfg", ["method=none", "gen.guidance_scale=1.5"],
                 {"eval/digit_fid": 1.5, "eval/prompt_acc": 1.0}),
            _run("digits_robustness_cfg", ["method=obs_diff", "gen.guidance_scale=1.5"],
                 {"eval/digit_fid": 6.5, "eval/prompt_acc": 0.78})]
    for i, r in enumerate(runs):
        d = res / f"{i}_job"
        d.mkdir(parents=True)
        r["run"]["output_dir"] = str(d)
        (d / "metrics.json").write_text(json.dumps(r))
        (d / "method_report.json").write_text(json.dumps({"metrics": {}}))  # not a run record
    out = tmp_path / "results"
    tables.main([*spec, "--results", str(res), "--out", str(out), "--collect"])
    assert sorted(p.name for p in (tmp_path / "committed" / "digits_robustness_cfg").iterdir()) \
        == ["0_job.json", "1_job.json"]
    md = (out / "digits_robustness.md").read_text()
    assert "| CFG 1.5 (calibrated) | 1.5 → 6.5 | 5 | 1 → 0.78 | -0.22 |" in md
    assert "Robustness to the number of steps" in md and not (out / "digits_robustness_cfg.md").exists()
    tables.main([*spec, "--results", str(tmp_path / "empty"), "--out", str(out)])
    assert (out / "digits_robustness.md").read_text() == md  # from the committed copies alone


def _sweep_points(experiment):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        params = compose("config", overrides=[f"experiment={experiment}"],
                         return_hydra_config=True).hydra.sweeper.params
    GlobalHydra.instance().clear()
    keys = list(params)
    return [[f"{k}={v}" for k, v in zip(keys, point)]
            for point in itertools.product(*(str(params[k]).split(",") for k in keys))]


@pytest.mark.parametrize("experiment,calib", [
    ("obsdiff_table11_cfg", (25, 7.0)), ("obsdiff_table12_steps", (25, 7.0)),
    ("obsdiff_table13_samplers_sd21", (25, 7.0)), ("obsdiff_table14_calib_set", (25, 7.0)),
    ("digits_robustness_cfg", (25, 1.5)), ("digits_robustness_steps", (25, 1.5))])
def test_robustness_sweeps_keep_calibration_at_the_protocol(experiment, calib):
    """The evaluation setting changes per sweep point; the calibration trajectories do not."""
    from hydra.utils import instantiate

    from edm.configs import compose
    from edm.methods.weight.calibrate import resolve_settings

    seen = set()
    for point in _sweep_points(experiment):
        cfg = compose(f"experiment={experiment}", *point)
        if cfg.method.name == "none":
            continue
        s = resolve_settings(cfg.method.get("calibration"), instantiate(cfg.calib), dict(cfg.gen))
        assert (s.num_inference_steps, s.guidance_scale) == calib, point
        seen.add((cfg.gen.num_inference_steps, cfg.gen.guidance_scale,
                  cfg.model.loader.get("scheduler"), cfg.calib.name))
    assert len(seen) > 1  # the sweep does change the evaluation (or the calibration set)


def test_flux_table1_calibrates_at_distilled_guidance_for_every_method():
    from hydra.utils import instantiate

    from edm.configs import compose
    from edm.methods.weight.calibrate import resolve_settings
    from edm.runner import build_method

    for point in _sweep_points("obsdiff_table1_flux_dev"):
        cfg = compose("experiment=obsdiff_table1_flux_dev", *point)
        build_method(cfg).check("flux")  # every method of the table supports the family
        g = cfg.gen
        assert (g.num_inference_steps, g.guidance_scale, g.height, g.width) == (50, 3.5, 512, 512)
        assert cfg.model.limits.guidance == "distilled"  # one calibration row per prompt
        s = resolve_settings(cfg.method.get("calibration"), instantiate(cfg.calib), dict(g))
        assert (s.guidance_scale, s.height, s.num_prompts) == (3.5, 512, 100)


@pytest.mark.parametrize("name", ["digits_pruning_time", "digits_robustness_cfg",
                                  "digits_robustness_steps"])
def test_committed_digits_runs_fill_every_row(name):
    spec = SPECS[name]
    runs = tables.committed_results(spec)
    assert runs, f"no committed runs in {spec['committed']}"
    text = tables.shape_module(spec).render(name, spec, runs)
    assert "not run" not in text and "protocol: paper not applicable" in text
