"""Model-dependent config values fail as ConfigError before any model is loaded (issue 10.3)."""

from unittest.mock import patch

import pytest
import torch

from edm.errors import ConfigError
from edm.families import SCHEDULERS
from edm.runner import run
from edm.validate import validate

from test_configs import options


def _no_load(*_a, **_k):
    raise AssertionError("the pipeline was loaded before the bad value was rejected")


@pytest.mark.parametrize("overrides,key,allowed", [
    (["gen.height=17"], "gen.height", r"\(16, 16\)"),
    (["gen.width=32"], "gen.height", r"\(16, 16\)"),
    (["model=tiny_sd15", "gen.height=33"], "gen.height", "multiple of 2"),
    (["model=tiny_sd3", "gen.width=34"], "gen.width", "multiple of 4.*32 or 36"),
    (["model=sd15", "gen.width=500"], "gen.width", "multiple of 8"),
    (["model=sd35_large", "gen.height=1000"], "gen.height", "multiple of 16.*992 or 1008"),
    (["model=sd3_medium", "model.loader.scheduler=EulerDiscreteScheduler"],
     "model.loader.scheduler", "FlowMatchEulerDiscreteScheduler"),
    (["model=sd21", "model.loader.scheduler=FlowMatchEulerDiscreteScheduler"],
     "model.loader.scheduler", "PNDMScheduler"),
    (["model.limits.guidance=none"], "gen.guidance_scale", "guidance-distilled"),
    (["model.limits.guidance=distilled", "gen.negative_prompt=blurry"], "gen.negative_prompt",
     "without classifier-free"),
])
def test_model_dependent_values_fail_before_loading(compose_cfg, overrides, key, allowed):
    cfg = compose_cfg("logger=none", *overrides)
    with patch("edm.digits.loader.DigitsLoader.load", _no_load), \
         patch("edm.models.tiny.TinyPipeline.load", _no_load), \
         patch("edm.models.zoo.HubPipeline.load", _no_load):
        with pytest.raises(ConfigError, match=rf"<{key}>.*{allowed}"):
            run(cfg)


@pytest.mark.parametrize("option", options("model"))
def test_every_model_declares_limits_its_defaults_satisfy(option, compose_job):
    cfg = compose_job([f"model={option}"])
    assert set(cfg.model.limits) >= {"size_multiple", "sizes", "guidance"}
    validate(cfg)  # the model card's own defaults are valid


@pytest.mark.parametrize("option,kind", [("tiny_sd15", "sd15"), ("tiny_sdxl", "sdxl"),
                                         ("tiny_sd3", "sd3")])
def test_size_multiple_is_the_pipelines_own(option, kind, compose_job):
    """The declared multiple is what the built pipeline divides by (VAE factor x patch size)."""
    from edm.models.tiny import TinyPipeline

    pipe = TinyPipeline(kind=kind).load(kind, torch.float32, "cpu")
    den = getattr(pipe, "transformer", None)
    patch_size = den.config.patch_size if den is not None else 1
    cfg = compose_job([f"model={option}"])
    assert cfg.model.limits.size_multiple == pipe.vae_scale_factor * patch_size


@pytest.mark.parametrize("arch,option", [("sd15", "sd15"), ("sdxl", "sdxl"),
                                         ("sd3_medium", "sd3_medium"),
                                         ("sd35_large", "sd35_large")])
def test_real_size_multiple_matches_the_real_architecture(arch, option, compose_job):
    from edm.models.zoo import full_pipeline

    pipe = full_pipeline(arch, device="meta", dtype=torch.bfloat16)
    den = getattr(pipe, "transformer", None)
    patch_size = den.config.patch_size if den is not None else 1
    for name in (option, f"full_{option}"):
        assert compose_job([f"model={name}"]).model.limits.size_multiple == \
            pipe.vae_scale_factor * patch_size


def test_digits_sizes_match_the_pipeline_check(compose_job):
    from edm.digits.loader import DigitsLoader

    pipe = DigitsLoader().load()
    cfg = compose_job([])
    (h, w), = cfg.model.limits.sizes
    pipe(prompt=["a handwritten digit one"], num_inference_steps=1, height=h, width=w)
    with pytest.raises(ValueError, match="trained at"):
        pipe(prompt=["a handwritten digit one"], num_inference_steps=1, height=h + 1, width=w)


def test_scheduler_lists_are_diffusers_classes():
    import diffusers

    for names in SCHEDULERS.values():
        for n in names:
            assert getattr(diffusers, n).__name__ == n
