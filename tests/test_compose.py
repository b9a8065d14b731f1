"""Composition of a weight method with a token method: config group ``then`` + ``build_method``."""

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from edm.errors import ConfigError
from edm.methods.base import ApplyContext, Sequential
from edm.methods.compose import build_method
from edm.methods.token.tome import ToMe

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A primary config reduced to what composition needs, so these tests do not depend on the
# other groups; the real conf/ is exercised below and in test_runner.py.
MINIMAL = """
defaults:
  - _self_
  - method: none
  - then: null
seed: 0
sparsity: 0.5
model: {name: tiny, family: sd15}
run_name: ${model.name}-${method.tag}-s${seed}
"""


@pytest.fixture
def minimal_conf(tmp_path):
    conf = tmp_path / "conf"
    for group in ("method", "method_base", "then"):  # method_base: the weight methods' bases
        shutil.copytree(CONF / group, conf / group)
    (conf / "config.yaml").write_text(MINIMAL)
    return conf


def _compose(conf_dir, *overrides):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _then_override(conf_dir: Path, option: str) -> str:
    """``then=x`` when the primary config lists ``then: null``, else Hydra's append ``+then=x``."""
    defaults = OmegaConf.load(conf_dir / "config.yaml").get("defaults", [])
    listed = any(isinstance(d, dict) and "then" in d for d in OmegaConf.to_container(defaults))
    return f"then={option}" if listed else f"+then={option}"


def test_weight_then_token_builds_sequential(minimal_conf):
    cfg = _compose(
        minimal_conf,
        "method=magnitude",
        "then=tome",
        "sparsity=0.4",
        "then.ratio=0.3",
        "then.max_downsample=2",
    )
    assert cfg.method.sparsity == 0.4 and cfg.then.ratio == 0.3  # each keeps its own keys
    assert cfg.run_name == "tiny-magnitude-0.4-unstructured+tome-r0.3-d2-s0"
    method = build_method(cfg)
    assert isinstance(method, Sequential) and method.kind == "compose"
    assert method.name == "magnitude+tome"
    first, second = method.methods
    assert first.kind == "weights" and isinstance(second, ToMe)
    assert (second.ratio, second.max_downsample) == (0.3, 2)


def test_no_then_is_the_plain_method(minimal_conf):
    cfg = _compose(minimal_conf, "method=tome")
    method = build_method(cfg)
    assert isinstance(method, ToMe) and "then" not in cfg
    assert cfg.run_name == "tiny-tome-r0.5-d1-s0"


def test_list_of_then_nodes_and_errors(minimal_conf):
    cfg = _compose(minimal_conf, "method=magnitude")
    OmegaConf.set_struct(cfg, False)
    tome = OmegaConf.load(CONF / "method" / "tome.yaml")  # ${seed} resolves against cfg
    cfg.then = [tome, tome]  # an experiment file may compose more than two
    assert [m.name for m in build_method(cfg).methods] == ["magnitude", "tome", "tome"]
    cfg.then = {"ratio": 0.5}
    with pytest.raises(ConfigError, match="then"):
        build_method(cfg)
    swapped = _compose(minimal_conf, "method=tome", "then=tome")
    OmegaConf.set_struct(swapped, False)
    swapped.then = _compose(minimal_conf, "method=magnitude").method  # with its base defaults
    with pytest.raises(ConfigError, match="weight method"):
        build_method(swapped)


def test_composed_apply_on_tiny_sd15(minimal_conf):
    from edm.models.tiny import tiny_sd15

    cfg = _compose(minimal_conf, "method=magnitude", "then=tome", "sparsity=0.5")
    method = build_method(cfg)
    pipe = tiny_sd15()
    report = method.apply(pipe, ApplyContext(family="sd15"))
    assert report.kind == "compose" and report.sparsity == pytest.approx(0.5, abs=0.01)
    assert report.metrics["tome/layers"] == 5 and set(report.details) == {"magnitude", "tome"}
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=["a", "b"],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=gens,
        output_type="pt",
    ).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("token", ["tome", "at_edm"])
def test_real_conf_composes(token):
    if not (CONF / "method" / f"{token}.yaml").exists():
        pytest.skip(f"conf/method/{token}.yaml not written yet")
    cfg = _compose(CONF, "model=tiny_sd15", "method=obs_diff", _then_override(CONF, token))
    method = build_method(cfg)
    assert isinstance(method, Sequential) and method.name == f"obs_diff+{cfg.then.name}"
    assert "+" in cfg.run_name


@pytest.mark.parametrize("cache", ["deepcache", "taylorseer_cache", "pab"])
def test_then_a_cache_composes_and_runs(cache, compose_cfg):
    """then=<cache>: a weight method, then a cache, end to end on the digits model; the run
    name carries both tags."""
    import json

    from edm.runner import run

    cfg = compose_cfg("method=magnitude", f"then={cache}", "logger=none", "data.num_prompts=4",
                      "eval=none", "threads=1")
    method = build_method(cfg)
    assert isinstance(method, Sequential) and method.name == f"magnitude+{cfg.then.name}"
    assert f"+{cfg.then.tag}" in cfg.run_name
    run(cfg)
    rec = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert rec["metrics"]["perf/images_generated"] == 4
    assert 0.45 < rec["metrics"]["method/sparsity"] < 0.55


def test_two_caches_are_refused(compose_cfg):
    cfg = compose_cfg("method=deepcache", "then=pab")
    with pytest.raises(ConfigError, match="<then> two feature caches"):
        build_method(cfg)
