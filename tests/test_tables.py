"""experiments/tables.py: paper tables and their plots from local metrics.json and W&B runs."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import tables

SPECS = yaml.safe_load(tables.SPEC.read_text())
PNG = b"\x89PNG\r\n\x1a\n"
BUDGETS = "atedm_sdxl_budgets"


def _rec(experiment, method, metrics, sparsity=None):
    """A metrics.json as the runner writes it (only the parts tables.py reads)."""
    over = [f"method={method}"] + ([f"sparsity={sparsity}"] if sparsity is not None else [])
    return {"metrics": metrics, "run": {"choices": {"experiment": experiment, "method": method},
                                        "overrides": over, "config": {"sparsity": sparsity}}}


def test_axis_and_series_follow_the_rows():
    x, pts = tables.plot_points(SPECS["obsdiff_table1_sd21"], [])
    assert x == "sparsity"
    assert [p["label"] for p in pts if p["base"]] == ["Dense"]
    series = {}
    for p in pts:
        if not p["base"]:
            series.setdefault(p["series"], []).append(p["x"])
    assert series == {s: [0.4, 0.5] for s in ("Magnitude", "DSnoT", "Wanda", "OBS-Diff")}
    assert all(p["ours"] is None for p in pts)

    x, pts = tables.plot_points(SPECS[BUDGETS], [])
    assert x == "TFLOPs"
    assert [p["x"] for p in pts if p["series"] == "AT-EDM"] == [2.9, 3.6, 4.1, 4.5]
    assert {p["series"] for p in pts if not p["base"]} == {"ToMe", "AT-EDM"}

    x, pts = tables.plot_points(SPECS["obsdiff_table6_weighting"], [])
    assert x == "variant" and [p["x"] for p in pts] == [0, 1, 2, 3, 4]


def _captured_figure(monkeypatch):
    """Keep the figure ``plot`` closes so the test can read what was drawn."""
    import matplotlib.pyplot as plt

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    return figs


def _drawn(ax, ls):
    return [(list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())))
            for ln in ax.get_lines() if ln.get_linestyle() == ls and len(ln.get_xdata()) > 1]


def test_plot_draws_paper_dashed_and_ours_solid(tmp_path, monkeypatch):
    figs = _captured_figure(monkeypatch)
    spec = SPECS[BUDGETS]
    ours = _rec(BUDGETS, "at_edm_b", {"eval/fid": 30.5, "eval/clip_score": 0.31,
                                      "perf/tflops_per_forward": 3.55})
    ours_c = _rec(BUDGETS, "at_edm_c", {"eval/fid": 28.5, "eval/clip_score": 0.32,
                                        "perf/tflops_per_forward": 4.05})
    other = _rec("obsdiff_table1_sd21", "at_edm_a", {"eval/fid": 99.0})
    titles = tables.plot(spec, [ours, ours_c, other], tmp_path / "t.png")
    assert titles == ["FID vs TFLOPs", "CLIP vs TFLOPs", "FID vs CLIP"]
    data = (tmp_path / "t.png").read_bytes()
    assert data[:8] == PNG and len(data) > 20_000

    fid_ax, _, fid_clip_ax = figs[-1].axes[:3]
    paper = _drawn(fid_ax, "--")
    assert ([2.9, 3.6, 4.1, 4.5], [52.0, 29.8, 28.04, 27.23]) in paper  # AT-EDM, from the paper
    assert ([2.9, 3.6, 4.1, 4.6], [58.76, 40.94, 35.27, 32.46]) in paper  # ToMe
    # Ours at our own TFLOPs; the other experiment's run is not drawn.
    assert _drawn(fid_ax, "-") == [([3.55, 4.05], [30.5, 28.5])]
    assert ([0.31, 0.32], [30.5, 28.5]) in _drawn(fid_clip_ax, "-")
    assert [ln.get_ydata()[0] for ln in fid_ax.get_lines() if len(ln.get_ydata()) == 2
            and ln.get_xdata()[0] == 0] == [31.94]  # the SD-XL reference line

    tables.plot(SPECS["obsdiff_table6_weighting"], [], tmp_path / "t6.png")
    assert [ax.get_title() for ax in figs[-1].axes if ax.get_visible()] == \
        ["ImageReward vs variant"]  # no FID/CLIP in that table, so no FID-CLIP panel


def test_main_writes_table_and_linked_plot(tmp_path):
    res = tmp_path / "outputs"
    runs = [("obsdiff_table1_sd21", 31.0), (None, 77.0)]  # the second: an ad-hoc run elsewhere
    for i, (exp, fid) in enumerate(runs):
        (res / str(i)).mkdir(parents=True)
        rec = _rec(exp, "wanda", {"eval/fid": fid, "eval/clip_score": 0.3}, sparsity=0.5)
        (res / str(i) / "metrics.json").write_text(json.dumps(rec))
    out = tmp_path / "results"
    tables.main(["obsdiff_table1_sd21", "--results", str(res), "--out", str(out)])
    md = (out / "obsdiff_table1_sd21.md").read_text()
    assert "(obsdiff_table1_sd21.png)" in md
    assert (out / "obsdiff_table1_sd21.png").read_bytes()[:8] == PNG
    assert "| Wanda 50% | 41.84 | 31 | -10.84 |" in md
    assert "| Dense | 31.25 | not run |" in md and "1/9 rows have results" in md


# --- W&B: what the runner logs, read back through a fake API --------------------------------

class FakeRun:
    def __init__(self, config, summary, url):
        self.config, self.summary, self.url = config, summary, url


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.paths = []

    def runs(self, path):
        self.paths.append(path)
        return list(self._runs)


CASES = [  # (overrides, the row they must fill, a metric of that table)
    ((f"experiment={BUDGETS}", "method=tome_c"), "ToMe-c", "eval/fid"),
    (("experiment=obsdiff_table1_sd21", "method=wanda", "sparsity=0.4"), "Wanda 40%", "eval/fid"),
    (("experiment=obsdiff_table6_weighting", "method.weighting=log_decrease"), "Log decrease",
     "eval/image_reward"),
]


@pytest.mark.parametrize("overrides,label,key", CASES)
def test_wandb_run_fills_the_same_row_as_its_metrics_json(compose_cfg, overrides, label, key):
    from edm.records import provenance as _provenance
    from edm.records import tracker_config

    cfg = compose_cfg(*overrides)
    exp = overrides[0].split("=")[1]
    spec = SPECS[exp]
    metrics = {key: 0.5, "perf/sec_per_image": 2.0}
    local = {"metrics": metrics, "run": _provenance(cfg)}
    # W&B stores the config as JSON (nested dicts); the summary adds its own keys and the image
    # table next to the logged scalars.
    config = json.loads(json.dumps(tracker_config(cfg)))
    summary = {**metrics, "_runtime": 6.5, "_step": 1, "_timestamp": 1.7e9,
               "images": {"_type": "table-file", "nrows": 16}}
    api = FakeApi([FakeRun(config, summary, "https://wandb.ai/e/p/runs/abc")])
    (wb,) = tables.load_wandb("e/p", api=api)
    assert api.paths == ["e/p"]
    assert wb["metrics"] == metrics and wb["_path"].endswith("/abc")
    assert wb["run"] == local["run"]  # choices, overrides and the flattened config alike
    for rec in (local, wb):
        hit = [r["label"] for r in spec["rows"] if tables.matches(rec, r["match"], exp)]
        assert hit == [label]
    assert tables.render(exp, spec, [wb]) == tables.render(exp, spec, [local])
    assert "| 0.5 |" in tables.render(exp, spec, [wb])

    # Runs logged before the runner added ``provenance``: experiment and method.name still match
    # where the method's name is its group choice; an alias (tome_c -> name tome) fills no row
    # rather than a wrong one.
    legacy = {k: v for k, v in config.items() if k != "provenance"}
    (old,) = tables.load_wandb("e/p", api=FakeApi([FakeRun(legacy, summary, "u")]))
    hit = [r["label"] for r in spec["rows"] if tables.matches(old, r["match"], exp)]
    assert hit == ([] if label == "ToMe-c" else [label])


def test_rendered_tables_print_the_paper_and_our_protocol():
    spec = SPECS["obsdiff_table1_sd21"]
    assert "PNDM" in spec["protocol"] and all("protocol" in s for s in SPECS.values())
    prot = {"num_inference_steps": 25, "guidance_scale": 7.0, "height": 512, "width": 512,
            "scheduler": "PNDMScheduler"}
    dense = _rec("obsdiff_table1_sd21", "none", {"eval/fid": 30.0})
    wanda = _rec("obsdiff_table1_sd21", "wanda", {"eval/fid": 40.0}, sparsity=0.4)
    dense["run"]["protocol"] = wanda["run"]["protocol"] = prot
    text = tables.render("obsdiff_table1_sd21", spec, [dense, wanda])
    assert "paper 25 steps, CFG 7.0, 512x512, PNDM" in text
    assert "ours 25 steps, CFG 7, 512x512, PNDMScheduler (every row)" in text
    wanda["run"]["protocol"] = {**prot, "num_inference_steps": 50, "scheduler": "EulerDiscreteScheduler"}
    text = tables.render("obsdiff_table1_sd21", spec, [dense, wanda])
    assert "**ours differ between rows**" in text
    assert "- 50 steps, CFG 7, 512x512, EulerDiscreteScheduler: Wanda 40%" in text


def test_experiment_generates_at_the_paper_protocol():
    """The obsdiff_* experiments choose protocol=obsdiff: 25 steps, CFG 7, 512², PNDM on SD2.1."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    for exp, sched in (("obsdiff_table1_sd21", "PNDMScheduler"),
                       ("obsdiff_table1_sd35_large", None),
                       ("obsdiff_table3_sdxl_structured", None)):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={exp}"])
        g = cfg.gen
        assert (g.num_inference_steps, g.guidance_scale, g.height, g.width) == (25, 7.0, 512, 512)
        assert cfg.model.loader.scheduler == sched
        # the calibration trajectories follow the same protocol (spec §2.6)
        assert (cfg.calib.num_inference_steps, cfg.calib.guidance_scale) == (25, 7.0)
    GlobalHydra.instance().clear()
