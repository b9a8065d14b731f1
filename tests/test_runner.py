"""The runner end to end: the embedded default, tiny families, resume, bad input, the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from edm.errors import ConfigError
from edm.runner import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "gen.num_inference_steps=3", "data.num_prompts=6", "gen.batch_size=4"]


def _metrics(cfg):
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_digits_end_to_end_and_resume(compose_cfg):
    cfg = compose_cfg(*FAST)
    value = run(cfg)
    out = Path(cfg.paths.output_dir)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 6
    rec = _metrics(cfg)
    m = rec["metrics"]
    assert value == m["eval/digit_fid"] and m["eval/digit_fid"] > 0
    assert 0 <= m["eval/prompt_acc"] <= 1
    for key in ("perf/params_m", "perf/gflops_per_step", "perf/sec_per_image", "perf/peak_rss_gb"):
        assert m[key] > 0, key
    assert rec["run"]["choices"] == {} or rec["run"]["choices"]["model"] == "digits"
    # rerun: nothing regenerated, identical files, metrics reused (inputs unchanged)
    before = {p.name: p.read_bytes() for p in pngs}
    run(cfg)
    rec2 = _metrics(cfg)
    assert rec2["metrics"]["perf/images_generated"] == 0
    assert rec2["run"]["eval_inputs_hash"] == rec["run"]["eval_inputs_hash"]
    assert {p.name: p.read_bytes() for p in (out / "images").glob("*.png")} == before
    # a lost image is regenerated bit-identically (per-prompt seeds), and metrics are recomputed
    (out / "images" / "000003.png").unlink()
    (out / "images" / "000004.png").unlink()
    run(cfg)
    assert _metrics(cfg)["metrics"]["perf/images_generated"] == 2
    assert (out / "images" / "000003.png").read_bytes() == before["000003.png"]


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl", "tiny_sd3"])
def test_tiny_families_end_to_end(compose_cfg, model):
    cfg = compose_cfg(f"model={model}", "logger=none", "data.num_prompts=2", "gen.batch_size=2")
    run(cfg)
    rec = _metrics(cfg)
    assert rec["run"]["family"] in ("sd15", "sdxl", "sd3")
    assert len(list(Path(cfg.gen.images_dir).glob("*.png"))) == 2
    assert rec["metrics"]["perf/gflops_per_step"] > 0


def test_bad_values_fail_before_loading(compose_cfg, forbid_model_loading):
    with pytest.raises(ConfigError, match=r"<sparsity>.*\[0, 1\)"):
        run(compose_cfg("sparsity=1.2", "logger=none"))
    with pytest.raises(ConfigError, match="gen.shard"):
        run(compose_cfg("gen.shard=2", "gen.num_shards=2", "logger=none"))
    with pytest.raises(ConfigError, match="model.dtype.*Allowed: fp32, fp16, bf16"):
        run(compose_cfg("model.dtype=fp8", "logger=none"))
    with pytest.raises(ConfigError, match="data.root"):
        run(compose_cfg("data=coco2014", "logger=none"))


def test_unknown_group_option_lists_choices(compose_cfg):
    with pytest.raises(MissingConfigException, match="Available options"):
        compose_cfg("model=sd99")


def test_cli_multirun_and_wandb_offline(tmp_path):
    env = {**os.environ, "WANDB_MODE": "", "HF_HUB_OFFLINE": "1", "EDM_OUTPUT_ROOT": str(tmp_path)}
    env.pop("WANDB_MODE")
    cmd = [sys.executable, "run.py", "-m", "seed=0,1", "data.num_prompts=4", "gen.num_inference_steps=2",
           "logger.mode=offline", "gen.progress=false"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = sorted(tmp_path.rglob("metrics.json"))
    assert len(metrics) == 2
    seeds = sorted(json.loads(p.read_text())["run"]["seed"] for p in metrics)
    assert seeds == [0, 1]
    assert len(list(tmp_path.rglob("offline-run-*"))) == 2


def test_metrics_record_what_the_method_did(compose_cfg):
    """Token methods: the ratio measured per pruning-layer call (DSAP included), and no
    ``sparsity`` they never read; weight methods: the requested and the measured sparsity."""
    steps = ["gen.num_inference_steps=5", "data.num_prompts=4", "logger=none", "sparsity=0.6"]
    cfg = compose_cfg(*steps, "method=at_edm", "method.prune_ratio=0.5",
                      "method.dsap.early_steps=1", "method.dsap.early_prune_ratio=0.0")
    run(cfg)
    rec = _metrics(cfg)
    m = rec["metrics"]
    # 1 of 5 steps prunes nothing, 4 prune half of an even token count: 4/5 * 0.5
    assert m["method/token_ratio_measured"] == pytest.approx(0.4)
    assert m["method/prune_ratio"] == 0.5  # the configured value, under its own name
    assert rec["run"]["requested_sparsity"] is None and "method/requested_sparsity" not in m
    assert "sparsity" not in rec["run"]

    cfg = compose_cfg(*steps, "method=magnitude")
    run(cfg)
    rec = _metrics(cfg)
    assert rec["run"]["requested_sparsity"] == 0.6 == rec["metrics"]["method/requested_sparsity"]
    assert rec["metrics"]["method/sparsity"] == pytest.approx(0.6, abs=0.005)  # measured


def test_composed_methods_report_the_token_ratio_of_their_token_part(compose_cfg):
    cfg = compose_cfg("gen.num_inference_steps=2", "data.num_prompts=2", "logger=none",
                      "method=magnitude", "then=tome", "then.ratio=0.5", "then.dsap.enabled=false")
    run(cfg)
    m = _metrics(cfg)["metrics"]
    assert m["method/tome/token_ratio_measured"] == pytest.approx(0.5)
    assert m["method/requested_sparsity"] == 0.5
