"""Calibration trajectories follow the protocol, not the evaluation: a calibration-only sampler
(``method.calibration.scheduler``, OBS-Diff Table 13) swapped in for the calibration pass only."""

import pytest

from edm.errors import ConfigError


def _heun_sd3():
    from diffusers import FlowMatchHeunDiscreteScheduler

    from edm.models.tiny import tiny_sd3

    pipe = tiny_sd3()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    return pipe, calls


def _apply(pipe, *overrides):
    from hydra.utils import instantiate

    from edm.configs import compose
    from edm.methods.base import ApplyContext
    from edm.runner import build_method

    # 2 prompts in one batch of 2, one module package: one calibration trajectory of 3 steps
    cfg = compose("model=tiny_sd3", "method=obs_diff", "calib.num_prompts=2",
                  "method.num_groups=1", *overrides)
    m = build_method(cfg)
    m.check("sd3")
    gen = {"num_inference_steps": 3, "guidance_scale": 2.0, "height": 32, "width": 32,
           "batch_size": 2}
    return m.apply(pipe, ApplyContext(family="sd3", gen=gen, calib=instantiate(cfg.calib)))


def test_calibration_scheduler_is_swapped_in_for_calibration_only():
    pipe, calls = _heun_sd3()
    heun = pipe.scheduler
    rep = _apply(pipe, "method.calibration.scheduler=FlowMatchEulerDiscreteScheduler")
    # Euler: one transformer call per step; Heun would make 2 * 3 - 1 = 5
    assert len(calls) == 3 and pipe.scheduler is heun  # the run's sampler is back
    assert rep.details["calibration"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_without_it_calibration_runs_the_loaded_sampler():
    pipe, calls = _heun_sd3()
    rep = _apply(pipe)
    assert len(calls) == 5 and rep.details["calibration"]["scheduler"] is None


def test_bad_calibration_scheduler_is_a_config_error():
    from edm.methods.weight.obs_diff import OBSDiff

    with pytest.raises(ConfigError, match="<method.calibration.scheduler> unknown scheduler"):
        OBSDiff(sparsity=0.5, calibration={"scheduler": "NotAScheduler"})
    # an epsilon sampler on a rectified-flow model: refused before loading, not noise
    m = OBSDiff(sparsity=0.5, calibration={"scheduler": "EulerDiscreteScheduler"})
    with pytest.raises(ConfigError, match="<method.calibration.scheduler> family 'sd3'"):
        m.check("sd3")
    m.check("sd15")


def test_calib_config_scheduler_reaches_the_settings_and_the_method_wins():
    from types import SimpleNamespace

    from edm.methods.weight.calibrate import resolve_settings

    calib = SimpleNamespace(scheduler="PNDMScheduler", num_inference_steps=25)
    gen = {"num_inference_steps": 50, "scheduler": "ignored: gen has no calibration sampler"}
    s = resolve_settings(None, calib, gen)
    assert s.scheduler == "PNDMScheduler" and s.num_inference_steps == 25
    assert resolve_settings({"scheduler": "DDIMScheduler"}, calib, gen).scheduler == "DDIMScheduler"
    assert resolve_settings(None, SimpleNamespace(), gen).scheduler is None


def test_calib_scheduler_of_the_wrong_kind_fails_validation(compose_job):
    from edm.validate import validate

    cfg = compose_job(["model=sd3_medium", "calib.scheduler=PNDMScheduler"])
    with pytest.raises(ConfigError, match="<calib.scheduler> family 'sd3'"):
        validate(cfg)
    validate(compose_job(["model=sd3_medium", "calib.scheduler=FlowMatchEulerDiscreteScheduler"]))
