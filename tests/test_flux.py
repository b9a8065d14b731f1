"""FLUX.1 as a family (issue 12): the adapter on a tiny ``FluxTransformer2DModel`` built from a
config, the model configs' pre-load checks, layer-wise weight methods, ``full_flux`` on the meta
device, and that no method claims Flux support it does not have (structured and token methods:
tests/test_flux_structured.py, tests/test_flux_token.py)."""

from unittest.mock import patch

import pytest
import torch
from torch import nn

from edm.errors import ConfigError, MissingWeightsError, UnsupportedFamily
from edm.families import adapter, family_of
from edm.runner import run


@pytest.fixture(scope="module")
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def test_adapter_blocks_in_forward_order(tiny_flux):
    blocks = adapter("flux").attention_blocks(tiny_flux)
    assert [(b.stage, b.position) for b in blocks] == \
        [("double", 0), ("double", 1), ("single", 0), ("single", 1), ("single", 2)]
    assert blocks[2].name == "single_transformer_blocks.0" and all(b.downsample == 1 for b in blocks)


def test_adapter_units_cover_every_block_linear(tiny_flux):
    ad = adapter("flux")
    units = ad.linear_units(tiny_flux)
    names = [n for u in units for n, _ in u]
    assert all(isinstance(m, nn.Linear) for u in units for _, m in u) and len(set(names)) == len(names)
    # single-stream: q/k/v and the MLP up-projection read one input (one unit); proj_out alone
    assert ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
            "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"] in \
        [[n for n, _ in u] for u in units]
    # every linear of the blocks except the AdaLN modulation (norm*.linear) is prunable
    want = {n for n, m in tiny_flux.named_modules() if isinstance(m, nn.Linear)
            and "transformer_blocks." in n and ".norm" not in n}
    assert set(names) == want
    assert {n for u in ad.linear_units(tiny_flux, groups=("ff",)) for n, _ in u} == \
        {n for n in want if ".ff." in n or n.endswith("proj_mlp")}
    assert ad.num_layers(tiny_flux) == 5


def test_family_is_inferred_from_the_single_stream_blocks(tiny_flux):
    class Holder:
        transformer = tiny_flux

    assert family_of(Holder()) == "flux"


def _no_load(*_a, **_k):
    raise AssertionError("loaded before the bad value was rejected")


@pytest.mark.parametrize("overrides,err,match", [
    (["model=flux_schnell", "gen.guidance_scale=3.5"], ConfigError, "<gen.guidance_scale>"),
    (["model=flux_dev", "gen.negative_prompt=blurry"], ConfigError, "<gen.negative_prompt>"),
    (["model=flux_dev", "gen.height=1000"], ConfigError, "multiple of 16"),
    (["model=flux_dev", "model.loader.scheduler=EulerDiscreteScheduler"], ConfigError,
     "FlowMatchEulerDiscreteScheduler"),
    # Diff-Pruning is torch-pruning on UNet convolutions: no FLUX port
    (["model=flux_dev", "method=diff_pruning"], UnsupportedFamily, "not for 'flux'"),
])
def test_flux_configs_fail_before_loading(compose_cfg, overrides, err, match):
    cfg = compose_cfg("logger=none", *overrides)
    with patch("edm.models.zoo.HubPipeline.load", _no_load), pytest.raises(err, match=match):
        run(cfg)


def test_missing_flux_weights_name_the_repo_and_the_licence(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match="(?s)black-forest-labs/FLUX.1-dev.*licence"):
        run(compose_cfg("logger=none", "model=flux_dev"))


def test_tiny_flux_end_to_end_dense(compose_cfg):
    """model=tiny_flux through the runner: offline tokenizers, FLOPs per sample (no CFG batch:
    the guidance is an embedding), the size check agrees with the pipeline's own."""
    import json
    from pathlib import Path

    cfg = compose_cfg("model=tiny_flux", "logger=none", "data.num_prompts=2", "gen.batch_size=2")
    run(cfg)
    rec = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    m = rec["metrics"]
    assert rec["run"]["family"] == "flux" and m["perf/images_generated"] == 2
    assert m["perf/gflops_per_step"] > 0
    # one sample per call: TFLOPs per forward equals the per-step count (no division by 2)
    assert m["perf/tflops_per_forward"] == pytest.approx(m["perf/gflops_per_step"] / 1e3)
    assert m["perf/tflops_per_image"] == pytest.approx(
        m["perf/gflops_per_step"] * m["perf/denoiser_calls"] / 1e3)
    assert rec["run"]["protocol"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_tiny_flux_size_multiple_is_the_pipelines_own():
    from edm.models.tiny import tiny_flux

    pipe = tiny_flux()
    from edm.configs import compose

    assert compose("model=tiny_flux").model.limits.size_multiple == pipe.vae_scale_factor * 2


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "obs_diff", "dsnot"])
def test_layerwise_weight_methods_prune_both_block_types(method):
    """Every unstructured method on tiny_flux: all 34 block linears (double- and single-stream)
    at the target sparsity; calibration sees one row per prompt (distilled guidance, no CFG
    halves), so the transformer's batch equals the calibration batch."""
    from hydra.utils import instantiate

    from edm.configs import compose
    from edm.methods.base import ApplyContext
    from edm.models.tiny import tiny_flux
    from edm.runner import build_method

    cfg = compose("model=tiny_flux", f"method={method}", "sparsity=0.5", "calib.num_prompts=4")
    pipe = tiny_flux()
    batches = []
    pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    m = build_method(cfg)
    m.check("flux")
    gen = {"num_inference_steps": 2, "guidance_scale": 3.5, "height": 32, "width": 32,
           "batch_size": 4}
    rep = m.apply(pipe, ApplyContext(family="flux", gen=gen, calib=instantiate(cfg.calib)))
    per_layer = rep.details["per_layer_sparsity"]
    assert rep.patched == len(per_layer) == 34
    assert {"single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out",
            "transformer_blocks.0.attn.add_k_proj"} <= set(per_layer)
    assert all(abs(s - 0.5) < 0.01 for s in per_layer.values()), per_layer
    if m.needs_calib:
        assert batches and set(batches) == {4}


def test_full_flux_on_meta_is_the_published_transformer():
    """model=full_flux with model.loader.device=meta: a FluxPipeline around the real 11.9 B
    transformer (no memory), CLIP/T5 stand-ins with the real widths, and the FLOPs of a
    trajectory's steps (the scheduler's resolution-dependent shift included) equal the
    README's per-forward count: no CFG batch."""
    from hydra.utils import instantiate

    from edm.configs import compose
    from edm.eval.flops import count_params, meta_denoiser_flops, meta_step_flops
    from edm.models import archs

    cfg = compose("model=full_flux")
    pipe = instantiate(cfg.model.loader, device="meta").load(cfg.model.family, cfg.model.dtype,
                                                              "cpu")
    tr = pipe.transformer
    assert type(pipe).__name__ == "FluxPipeline" and pipe.edm_family == "flux"
    assert next(tr.parameters()).is_meta and tr.config.guidance_embeds
    assert count_params(tr) == pytest.approx(11.9e9, rel=0.001)
    assert pipe.text_encoder_2.config.d_model == tr.config.joint_attention_dim == 4096
    assert pipe.vae_scale_factor * 2 == cfg.model.limits.size_multiple
    inputs = archs.sample_inputs("flux_dev", dtype=torch.bfloat16)
    steps = meta_step_flops(tr, inputs, pipe.scheduler, 2)
    assert steps == [meta_denoiser_flops(tr, inputs)] * 2
    assert steps[0] / 1e12 == pytest.approx(74.385, abs=5e-4)


def test_a_meta_pipeline_run_is_refused_before_loading(compose_cfg):
    cfg = compose_cfg("logger=none", "model=full_flux", "model.loader.device=meta")
    with patch("edm.models.zoo.FullSizePipeline.load", _no_load), \
            pytest.raises(ConfigError, match="<model.loader.device>"):
        run(cfg)


def test_calibration_uses_the_model_cards_text_length():
    """gen.call_kwargs (FLUX's max_sequence_length) reaches the calibration trajectories too:
    single-stream linears read text and image tokens, so the Hessians depend on the text
    length, which must be generation's (schnell: 256, not the pipeline default 512)."""
    from hydra.utils import instantiate

    from edm.configs import compose
    from edm.methods.base import ApplyContext
    from edm.models.tiny import tiny_flux
    from edm.runner import build_method

    cfg = compose("model=tiny_flux", "method=obs_diff", "calib.num_prompts=2")
    pipe = tiny_flux()
    lengths = []
    pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: lengths.append(kw["encoder_hidden_states"].shape[1]),
        with_kwargs=True)
    gen = {"num_inference_steps": 2, "guidance_scale": 3.5, "height": 32, "width": 32,
           "batch_size": 2, "call_kwargs": cfg.gen.call_kwargs}
    rep = build_method(cfg).apply(pipe, ApplyContext(family="flux", gen=gen,
                                                     calib=instantiate(cfg.calib)))
    assert lengths and set(lengths) == {cfg.gen.call_kwargs.max_sequence_length} == {32}
    assert rep.details["calibration"]["call_kwargs"] == {"max_sequence_length": 32}
