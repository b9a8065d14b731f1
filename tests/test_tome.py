"""ToMe: kernel parity with the installed tomesd, spec §4 item 6, wiring, removal, FLOPs budgets."""

import copy
import itertools
import sys
import types
from pathlib import Path

import pytest
import torch

from edm.errors import ConfigError, NothingPatchedError, UnsupportedFamily
from edm.eval.flops import meta_denoiser_flops
from edm.methods.base import ApplyContext
from edm.methods.token.tome import _EDM_TOME_HOOK, ToMe
from edm.methods.token.tome_kernel import bipartite_merge
from edm.models.tiny import tiny_sd3, tiny_sdxl

tomesd = pytest.importorskip("tomesd")
from tomesd.merge import bipartite_soft_matching_random2d as tomesd_merge


# ---------------------------------------------------------------- kernel


@pytest.mark.parametrize(
    "hw,ratio,use_rand,batch,ties",
    [
        (hw, r, rand, b, ties)
        for hw, r, rand, b, ties in itertools.product(
            [(8, 8), (16, 16), (7, 9), (5, 4), (32, 32)],
            [0.1, 0.3, 0.5, 0.75, 0.9],
            [True, False],
            [1, 2],
            [False, True],
        )
        if not (ties and hw == (32, 32))
    ],
)
def test_kernel_equals_tomesd(hw, ratio, use_rand, batch, ties):
    h, w = hw
    x = torch.randn(batch, h * w, 16)
    if ties:  # many equal similarities: the order of sorts must match too
        x = x.round()
    r = int(h * w * ratio)
    g_ref, g_me = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    m_ref, u_ref = tomesd_merge(x, w, h, 2, 2, r, no_rand=not use_rand, generator=g_ref)
    m_me, u_me = bipartite_merge(x, w, h, r, 2, 2, use_rand=use_rand, generator=g_me)
    y = m_ref(x)
    assert torch.equal(m_me(x), y)
    z = torch.randn_like(y)
    assert torch.equal(u_me(z), u_ref(z))
    assert torch.equal(g_me.get_state(), g_ref.get_state())  # same number of draws


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6, 0.75])
def test_kernel_merged_length_and_groups(ratio):
    h = w = 12
    n = h * w
    x = torch.randn(2, n, 8, dtype=torch.float64)
    m, u = bipartite_merge(x, w, h, int(n * ratio), generator=torch.Generator().manual_seed(0))
    y = m(x)
    assert y.shape == (2, n - int(n * ratio), 8)  # spec §4.6
    back = u(y)
    for b in range(2):
        # unmerge(merge(x)) gives every token its merge group's mean; groups partition the tokens
        values, group = torch.unique(back[b], dim=0, return_inverse=True)
        assert len(values) == n - int(n * ratio)
        for g in range(len(values)):
            members = x[b][group == g]
            torch.testing.assert_close(members.mean(0), values[g])
            if len(members) == 1:  # unmerged position: exactly the input (spec §4.6)
                assert torch.equal(back[b][group == g][0], members[0])


def test_kernel_identity_and_clamp_and_meta():
    x = torch.randn(1, 64, 4)
    m, u = bipartite_merge(x, 8, 8, 0)
    assert m(x) is x and u(x) is x
    m, _ = bipartite_merge(x, 8, 8, 60, use_rand=False)  # more than the 48 sources
    assert m(x).shape[1] == 16  # one destination per 2x2 cell is left
    meta = torch.empty(2, 4096, 640, device="meta")
    m, u = bipartite_merge(meta, 64, 64, 2048, generator=torch.Generator().manual_seed(0))
    assert m(meta).shape == (2, 2048, 640) and u(m(meta)).shape == (2, 4096, 640)


# ---------------------------------------------------------------- wiring


def _pipe_of(unet, family):
    return types.SimpleNamespace(unet=unet, scheduler=None, edm_family=family)


def _unet_inputs(unet, batch=2, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, hw, hw, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500] * batch), ctx


def _hook_count(module) -> int:
    return sum(
        1
        for m in module.modules()
        if getattr(m, "_diffusers_hook", None) is not None
        and m._diffusers_hook.get_hook(_EDM_TOME_HOOK) is not None
    )


@pytest.fixture(scope="module")
def sd15(tiny_pipes):
    return tiny_pipes["sd15"]


@pytest.mark.parametrize(
    "kw",
    [{}, {"use_rand": False}, {"merge_crossattn": True, "merge_mlp": True, "max_downsample": 2}],
)
def test_unet_output_equals_tomesd_with_keyword_call(sd15, kw):
    ref_unet, unet = copy.deepcopy(sd15.unet), copy.deepcopy(sd15.unet)
    x, t, ctx = _unet_inputs(unet)
    with torch.no_grad():
        dense = unet(x, t, ctx).sample
        tomesd.apply_patch(ref_unet, ratio=0.5, **kw)
        torch.manual_seed(3)  # seed=None forks the global RNG at first use, as tomesd does
        ref = [ref_unet(x, t, ctx).sample for _ in range(2)]
        method = ToMe(ratio=0.5, seed=None, **kw)
        method.apply(_pipe_of(unet, "sd15"), ApplyContext(family="sd15"))
        torch.manual_seed(3)
        ours = [unet(sample=x, timestep=t, encoder_hidden_states=ctx).sample for _ in range(2)]
        with pytest.raises(IndexError):  # tomesd reads args[0]: keyword calls break it
            ref_unet(sample=x, timestep=t, encoder_hidden_states=ctx)
    assert not torch.equal(ours[0], dense)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def _generate(pipe, seed=0, steps=2):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    return pipe(
        prompt=["a red cat", "a blue dog"],
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=gens,
        output_type="pt",
    ).images


def test_ratio_zero_remove_and_double_apply(sd15):
    pipe = copy.deepcopy(sd15)
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe)
    ctx = ApplyContext(family="sd15")
    zero = ToMe(ratio=0.0)
    assert zero.apply(pipe, ctx).patched == 5  # 2 down + 3 up layers at full resolution
    assert torch.equal(_generate(pipe), dense)  # ratio 0 is bit-identical to dense
    zero.remove(pipe)

    method = ToMe(ratio=0.5, seed=0)
    report = method.apply(pipe, ctx)
    hooks = _hook_count(pipe.unet)
    assert hooks == 2 * report.patched  # one layer hook + one attn1 hook per layer
    once = _generate(pipe)
    assert not torch.equal(once, dense) and once.shape == dense.shape
    assert torch.equal(_generate(pipe), once)  # seeded per trajectory: reproducible
    method.apply(pipe, ctx)  # applying twice re-patches, never stacks
    assert _hook_count(pipe.unet) == hooks
    assert torch.equal(_generate(pipe), once)
    with pytest.raises(RuntimeError, match="already applied"):
        ToMe(ratio=0.3).apply(pipe, ctx)
    method.remove(pipe)
    assert _hook_count(pipe.unet) == 0
    assert torch.equal(_generate(pipe), dense)  # removal is bit-exact


def test_sdxl_max_downsample_1_patches_nothing_and_raises():
    pipe = tiny_sdxl()
    x, t, ctx = _unet_inputs(pipe.unet, batch=1)
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        dense = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
    with pytest.raises(
        NothingPatchedError, match="max_downsample=1.*finest attention level has downsample 2"
    ):
        ToMe(max_downsample=1).apply(pipe, ApplyContext(family="sdxl"))
    assert _hook_count(pipe.unet) == 0  # regression (spec §3.1): tomesd is a silent no-op here
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ctx, added_cond_kwargs=added).sample, dense)
    report = ToMe(max_downsample=2).apply(pipe, ApplyContext(family="sdxl"))
    assert {layer["downsample"] for layer in report.details["layers"]} == {2}


@pytest.mark.parametrize(
    "family,build,kw,merged",
    [
        ("sdxl", tiny_sdxl, {"max_downsample": 4, "merge_mlp": True}, ["attn1", "ff"]),
        ("sd3", tiny_sd3, {"merge_mlp": True}, ["attn", "ff"]),
        ("sd3", lambda: tiny_sd3(dual_attention_layers=(0,)), {}, ["attn", "attn2"]),
    ],
)
def test_runs_on_tiny_families(family, build, kw, merged):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe)
    method = ToMe(ratio=0.5, seed=0, **kw)
    report = method.apply(pipe, ApplyContext(family=family))
    assert report.details["layers"][0]["merged"] == merged
    out = _generate(pipe)
    assert out.shape == dense.shape and torch.isfinite(out).all() and not torch.equal(out, dense)
    method.remove(pipe)
    assert torch.equal(_generate(pipe), dense)


def test_runs_on_digits():
    from edm.digits.components import build_components, default_config
    from edm.digits.pipeline import DigitsPipeline

    pipe = DigitsPipeline(**build_components(default_config()))
    pipe.set_progress_bar_config(disable=True)

    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(["seven", "one"], num_inference_steps=2, generator=gens).images

    dense = run()
    method = ToMe(ratio=0.5, seed=0)  # tomesd's default max_downsample=1 has layers here
    assert method.apply(pipe, ApplyContext(family="digits")).patched > 0
    out = run()
    assert out.shape == dense.shape and not torch.equal(out, dense)
    method.remove(pipe)
    assert torch.equal(run(), dense)


def test_dsap_step_schedule(sd15):
    unet = copy.deepcopy(sd15.unet)
    x, t, ctx = _unet_inputs(unet)
    pipe = _pipe_of(unet, "sd15")
    with torch.no_grad():
        dense = unet(x, t, ctx).sample
        dsap = {"enabled": True, "early_steps": 1, "block_rule": "all"}
        method = ToMe(ratio=0.5, seed=0, dsap=dsap)
        method.apply(pipe, ApplyContext(family="sd15"))
        early, late = unet(x, t, ctx).sample, unet(x, t, ctx).sample  # steps 0 and 1
    assert torch.equal(early, dense) and not torch.equal(late, dense)
    method.remove(pipe)
    # the paper's block rule: only the exempt blocks are unmerged early, so FLOPs sit between
    meta = copy.deepcopy(sd15.unet).to("meta")
    inputs = {"sample": x.to("meta"), "timestep": 500, "encoder_hidden_states": ctx.to("meta")}
    flops_dense = meta_denoiser_flops(meta, inputs)
    dsap = {"enabled": True, "early_steps": 1, "block_rule": "first_down_last_up"}
    method = ToMe(ratio=0.75, merge_mlp=True, dsap=dsap)
    method.apply(_pipe_of(meta, "sd15"), ApplyContext(family="sd15"))
    flops_early, flops_late = (meta_denoiser_flops(meta, inputs) for _ in range(2))
    assert flops_dense > flops_early > flops_late


def test_seeded_draws_restart_every_trajectory(sd15):
    # DSAP leaves step 0 unmerged (no draw); the seed must still restart per image batch.
    pipe = copy.deepcopy(sd15)
    pipe.set_progress_bar_config(disable=True)
    dsap = {"enabled": True, "early_steps": 1, "block_rule": "all"}
    ToMe(ratio=0.5, seed=0, dsap=dsap).apply(pipe, ApplyContext(family="sd15"))
    first = _generate(pipe, steps=3)
    _generate(pipe, seed=5)  # another batch in between
    assert torch.equal(_generate(pipe, steps=3), first)


def test_config_and_family_errors(sd15):
    with pytest.raises(ConfigError, match="method.ratio"):
        ToMe(ratio=0.8)
    with pytest.raises(ConfigError, match="method.max_downsample"):
        ToMe(max_downsample=3)
    with pytest.raises(ConfigError, match="merge_attn"):
        ToMe(merge_attn=False)
    with pytest.raises(UnsupportedFamily):
        ToMe().apply(sd15, ApplyContext(family="flux"))
    with pytest.raises(NothingPatchedError):  # MMDiT has no cross-attention to merge
        ToMe(merge_attn=False, merge_crossattn=True).apply(tiny_sd3(), ApplyContext(family="sd3"))


def test_mlp_merge_with_ff_chunking_is_an_error(sd15):
    unet = copy.deepcopy(sd15.unet)
    for block in unet.modules():
        if hasattr(block, "set_chunk_feed_forward"):  # diffusers' memory-saving FF slicing
            block.set_chunk_feed_forward(4, dim=1)
    ToMe(merge_mlp=True).apply(_pipe_of(unet, "sd15"), ApplyContext(family="sd15"))
    with pytest.raises(RuntimeError, match="chunking"), torch.no_grad():
        unet(*_unet_inputs(unet))


# ---------------------------------------------------------------- FLOPs budgets (full-size SD-XL)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["a", "b", "c", "d"])
def test_sdxl_budget_configs_within_3_percent(budget):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import tome_budgets

    pipe, inputs = tome_budgets.sdxl_meta()
    flops = tome_budgets.tome_flops(pipe, inputs, tome_budgets.committed(budget))
    target = tome_budgets.BUDGETS_T[budget] * 1e12
    assert abs(flops / target - 1) < 0.03, (budget, flops / 1e12)
