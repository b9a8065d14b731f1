"""Every option of every config group composes; every method instantiates; every experiment's
sweep points compose (template's test_configs/test_sweeps, without running the models)."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from edm.validate import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "method", "data", "calib", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides, hydra_cfg=False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"], hydra_cfg=True)
    assert cfg[group] is not None


@pytest.mark.parametrize("option", options("method"))
def test_method_instantiates_without_a_model(option):
    cfg = _compose([f"method={option}"])
    method = instantiate(cfg.method)
    assert method.kind in ("none", "runtime", "weights", "compose")
    assert cfg.method.tag and cfg.method.name


@pytest.mark.parametrize("option", options("model"))
def test_model_loader_instantiates(option):
    cfg = _compose([f"model={option}"])
    loader = instantiate(cfg.model.loader)
    assert hasattr(loader, "check") and hasattr(loader, "load")
    assert cfg.model.family in ("digits", "sd15", "sd21", "sdxl", "sd3")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_sweep_points_compose(experiment):
    cfg = _compose([f"experiment={experiment}"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params or {}
    keys = list(params)
    values = [str(params[k]).split(",") if not str(params[k]).startswith("[") else [str(params[k])]
              for k in keys]
    points = list(itertools.product(*values)) or [()]
    for point in points:
        overrides = [f"experiment={experiment}"] + [f"{k}={v}" for k, v in zip(keys, point)]
        job = _compose(overrides)
        instantiate(job.method)  # every sweep point builds its method (constructor validation)
        validate(job)  # and passes the pre-load checks (model limits included)
