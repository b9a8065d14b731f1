"""Every option of every config group composes; every method instantiates; every experiment's
sweep points compose (template's test_configs/test_sweeps, without running the models)."""

import itertools
from pathlib import Path

import pytest
from hydra.utils import instantiate

from edm.validate import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "method", "data", "calib", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option, compose_job):
    cfg = compose_job([f"{group}={option}"], hydra_cfg=True)
    assert cfg[group] is not None


@pytest.mark.parametrize("option", options("method"))
def test_method_instantiates_without_a_model(option, compose_job):
    cfg = compose_job([f"method={option}"])
    method = instantiate(cfg.method)
    assert method.kind in ("none", "runtime", "weights", "compose")
    assert cfg.method.tag and cfg.method.name


@pytest.mark.parametrize("option", options("model"))
def test_model_loader_instantiates(option, compose_job):
    cfg = compose_job([f"model={option}"])
    loader = instantiate(cfg.model.loader)
    assert hasattr(loader, "check") and hasattr(loader, "load")
    assert cfg.model.family in ("digits", "sd15", "sd21", "sdxl", "sd3", "flux", "ddpm")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_sweep_points_compose(experiment, compose_job):
    cfg = compose_job([f"experiment={experiment}"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params or {}
    keys = list(params)
    values = [str(params[k]).split(",") if not str(params[k]).startswith("[") else [str(params[k])]
              for k in keys]
    points = list(itertools.product(*values)) or [()]
    for point in points:
        overrides = [f"experiment={experiment}"] + [f"{k}={v}" for k, v in zip(keys, point)]
        job = compose_job(overrides)
        instantiate(job.method)  # every sweep point builds its method (constructor validation)
        validate(job)  # and passes the pre-load checks (model limits included)
