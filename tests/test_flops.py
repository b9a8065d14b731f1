"""FLOPs: CPU fused-attention formula, per-call counts in a pipeline, paper figures on meta."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edm.eval.flops import (
    analytic_mmdit_flops,
    count_params,
    flop_counter,
    measure_denoiser_flops,
    meta_denoiser_flops,
    meta_step_flops,
    split_flops,
)
from edm.models import archs
from edm.models.tiny import tiny_sd3, tiny_sd15, tiny_sdxl



def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@pytest.mark.parametrize(
    "q_shape,kv_shape",
    [
        ((2, 4, 64, 16), (2, 4, 64, 16)),
        ((1, 2, 100, 8), (1, 2, 77, 8)),
        ((3, 1, 5, 32), (3, 1, 9, 32)),
    ],
)
def test_cpu_fused_attention_counts_like_meta(q_shape, kv_shape):
    q, k = torch.randn(q_shape), torch.randn(kv_shape)
    with flop_counter() as cpu:
        F.scaled_dot_product_attention(q, k, k)
    with flop_counter() as meta:
        F.scaled_dot_product_attention(q.to("meta"), k.to("meta"), k.to("meta"))
    b, h, nq, d = q_shape
    expected = 4 * b * h * nq * kv_shape[2] * d  # QKᵀ and PV, 2 FLOPs per multiply-add
    assert cpu.get_total_flops() == meta.get_total_flops() == expected


@pytest.mark.parametrize("builder", [tiny_sd15, tiny_sdxl, tiny_sd3])
def test_cpu_denoiser_flops_equal_meta(builder):
    pipe = builder()
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    if hasattr(pipe, "transformer"):
        inputs = {
            "hidden_states": torch.randn(2, 16, 16, 16),
            "timestep": torch.tensor([3.0, 3.0]),
            "encoder_hidden_states": torch.randn(2, 333, 96),
            "pooled_projections": torch.randn(2, 64),
        }
    else:
        ctx = den.config.cross_attention_dim
        inputs = {
            "sample": torch.randn(2, 4, 16, 16),
            "timestep": torch.tensor([3.0, 3.0]),
            "encoder_hidden_states": torch.randn(2, 77, ctx),
        }
        if den.config.addition_embed_type == "text_time":
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(2, 32),
                "time_ids": torch.randn(2, 6),
            }
    with torch.no_grad(), flop_counter() as counter:
        den(**inputs)
    cpu = split_flops(counter)
    meta = meta_denoiser_flops(copy.deepcopy(den).to("meta"), _to(inputs, "meta"))
    assert cpu["total"] == meta and 0 < cpu["attention"] < cpu["total"]


@pytest.mark.parametrize("builder,res", [(tiny_sd15, 32), (tiny_sdxl, 64), (tiny_sd3, 32)])
def test_measure_denoiser_flops_in_the_pipeline(builder, res):
    pipe = builder()
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    seen = []
    handle = den.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            copy.deepcopy(_to({**dict(zip(["sample", "timestep"], a)), **kw}, "cpu"))
        ),
        with_kwargs=True,
    )
    counts = measure_denoiser_flops(
        pipe,
        prompt=["a cat"],
        num_inference_steps=2,
        guidance_scale=4.0,
        height=res,
        width=res,
        generator=[torch.Generator().manual_seed(0)],
        output_type="pt",
    )
    handle.remove()
    assert len(counts) == 2 == len(seen) and counts[0] == counts[1]  # same shapes every step
    # a call's count equals the same call (CFG batch 2, real context) replayed on meta
    meta = copy.deepcopy(den).to("meta")
    skip = ("return_dict", "cross_attention_kwargs", "joint_attention_kwargs", "timestep_cond")
    kwargs = {k: v for k, v in seen[0].items() if k not in skip}
    assert next(iter(kwargs.values())).shape[0] == 2
    assert meta_denoiser_flops(meta, _to(kwargs, "meta")) == counts[0]
    assert not den._forward_pre_hooks and not den._forward_hooks


class _ToyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class _ToyPipe:
    """Calls its denoiser once per step with a step-dependent token count (like DSAP)."""

    edm_family = "sd15"

    def __init__(self):
        self.unet = _ToyDenoiser()

    def __call__(self, tokens, fail=False):
        for n in tokens:
            self.unet(torch.randn(1, n, 8))
        if fail:
            raise RuntimeError("boom")


def test_measure_is_per_call_and_cleans_up_on_error():
    pipe = _ToyPipe()
    den = pipe.unet
    counts = measure_denoiser_flops(pipe, tokens=[16, 8, 4])
    assert counts == [2 * n * 8 * 8 for n in (16, 8, 4)]
    with pytest.raises(RuntimeError, match="boom"):
        measure_denoiser_flops(pipe, tokens=[4], fail=True)
    assert not den._forward_pre_hooks and not den._forward_hooks
    with flop_counter() as c:  # no counter left open: a fresh one sees only its own work
        den(torch.randn(1, 2, 8))
    assert c.get_total_flops() == 2 * 2 * 8 * 8


def test_meta_step_flops_replays_the_trajectory():
    pipe = tiny_sd3()
    meta = copy.deepcopy(pipe.transformer).to("meta")
    inputs = _to(
        {
            "hidden_states": torch.zeros(2, 16, 8, 8),
            "timestep": torch.zeros(2),
            "encoder_hidden_states": torch.zeros(2, 20, 96),
            "pooled_projections": torch.zeros(2, 64),
        },
        "meta",
    )
    seen = []
    meta.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].shape), with_kwargs=True
    )
    counts = meta_step_flops(meta, inputs, pipe.scheduler, 3)
    assert len(counts) == 3 == len(seen) and len(set(counts)) == 1
    assert counts[0] == analytic_mmdit_flops(dict(meta.config), 64, 64, 20) * 2  # batch 2


def test_count_params_counts_shared_once_and_nonzero():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, lin)
    assert count_params(model) == 20
    with torch.no_grad():
        lin.weight[:2] = 0
    assert count_params(model, nonzero=True) == 20 - 8 - int((lin.bias == 0).sum())


@pytest.mark.parametrize("qk_norm,dual", [(None, ()), ("rms_norm", (0, 1))])
def test_analytic_mmdit_matches_counter(qk_norm, dual):
    model = tiny_sd3(qk_norm=qk_norm, dual_attention_layers=dual).transformer.to("meta")
    inputs = _to(
        {
            "hidden_states": torch.zeros(1, 16, 8, 8),
            "timestep": torch.zeros(1),
            "encoder_hidden_states": torch.zeros(1, 50, 96),
            "pooled_projections": torch.zeros(1, 64),
        },
        "meta",
    )
    counted = meta_denoiser_flops(model, inputs)
    assert counted == analytic_mmdit_flops(dict(model.config), 64, 64, 50)


# -- full-size architectures against the papers (meta device, one batch-1 call at 1024²) ------


def _meta_split(name, **kw):
    model = archs.build_denoiser(name)
    with torch.no_grad(), flop_counter() as counter:
        model(**archs.sample_inputs(name, 1024, 1024, **kw))
    return split_flops(counter)


def test_sdxl_dense_flops_match_at_edm_and_obs_diff():
    flops = _meta_split("sdxl")  # latent 128², context 77x2048, text_time added conditions
    assert flops["total"] == pytest.approx(6.7e12, rel=0.03)  # AT-EDM: 2 FLOPs/MAC, attn counted
    assert flops["linear_conv"] == pytest.approx(5.98e12, rel=0.005)  # OBS-Diff Tab. 3: no attn


@pytest.mark.parametrize("name,paper", [("sd3_medium", 2.84e12), ("sd35_large", 11.26e12)])
def test_mmdit_flops_match_obs_diff(name, paper):
    # OBS-Diff Tables 9/4: MACs (1 per multiply-add) of linears/convs, 1024², 77 text tokens.
    flops = _meta_split(name, context_len=77)
    assert flops["linear_conv"] / 2 == pytest.approx(paper, rel=0.005)
    assert flops["total"] == analytic_mmdit_flops(archs.ARCHS[name].config, 1024, 1024, 77)


def _analytic_flux_flops(cfg, height, width, context_len, guidance):
    """Matmul FLOPs of one FLUX.1 transformer call, written from the architecture (issue 12):
    19 double-stream blocks (separate image/text projections and MLPs, joint attention) and 38
    single-stream blocks (q/k/v and the MLP from one input, proj_out reading both), batch 1."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ni, nt = (height // 16) * (width // 16), context_len  # 2x2-packed latent tokens, text tokens
    n = ni + nt

    def mm(tokens, a, b):
        return 2 * tokens * a * b

    emb = mm(ni, cfg["in_channels"], D) + mm(nt, cfg["joint_attention_dim"], D)
    emb += mm(1, 256, D) + mm(1, D, D) + mm(1, cfg["pooled_projection_dim"], D) + mm(1, D, D)
    if guidance:  # dev's guidance embedding
        emb += mm(1, 256, D) + mm(1, D, D)
    double = (2 * mm(1, D, 6 * D) + 4 * mm(ni, D, D) + 4 * mm(nt, D, D) + 4 * n * n * D
              + 2 * mm(ni, D, 4 * D) + 2 * mm(nt, D, 4 * D))
    single = mm(1, D, 3 * D) + mm(n, D, 4 * D) + 3 * mm(n, D, D) + 4 * n * n * D + mm(n, 5 * D, D)
    out = mm(1, D, 2 * D) + mm(ni, D, cfg["in_channels"])
    return emb + cfg["num_layers"] * double + cfg["num_single_layers"] * single + out


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell"])
def test_full_size_flux_flops_on_meta_equal_the_architecture(name):
    spec = archs.ARCHS[name]
    model = archs.build_denoiser(name)
    got = meta_denoiser_flops(model, archs.sample_inputs(name))
    assert got == _analytic_flux_flops(spec.config, 1024, 1024, spec.context_len,
                                       spec.config["guidance_embeds"])
