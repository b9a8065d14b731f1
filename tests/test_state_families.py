"""Family adapters and the step tracker on tiny random denoisers (built inline, offline)."""

import pytest
import torch
from diffusers import DDIMScheduler, SD3Transformer2DModel, UNet2DConditionModel

from edm.errors import ConfigError, UnsupportedFamily
from edm.families import adapter
from edm.state import StepTracker


def tiny_unet(layers=(1, 2)):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=4, norm_num_groups=4, transformer_layers_per_block=layers,
    )


def tiny_mmdit(num_layers=2):
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
        pooled_projection_dim=8, out_channels=4,
    )


def test_unet_blocks_and_units():
    unet = tiny_unet()
    ad = adapter("sdxl")
    blocks = ad.attention_blocks(unet)
    stages = [(b.stage, b.stage_index, b.position) for b in blocks]
    assert stages[0] == ("down", 0, 0) and ("mid", 0, 0) in stages and stages[-1][0] == "up"
    assert [len(b.layers) for b in blocks if b.stage == "down"] == [1, 2]
    n_layers = sum(len(b.layers) for b in blocks)
    units = ad.linear_units(unet)
    assert len(units) == 6 * n_layers  # 6 basic units per BasicTransformerBlock
    names = [n for u in units for n, _ in u]
    assert len(names) == len(set(names)) == 10 * n_layers
    ff = ad.linear_units(unet, groups=("ff",))
    assert all(".ff." in n for u in ff for n, _ in u) and len(ff) == 2 * n_layers
    assert ad.linear_units(unet, blocks=range(0, 1))[0][0][0].startswith("down_blocks.0")
    with pytest.raises(ConfigError, match="method.targets"):
        ad.linear_units(unet, groups=("mlp",))


def test_mmdit_units_include_context_stream():
    tr = tiny_mmdit()
    ad = adapter("sd3")
    assert len(ad.attention_blocks(tr)) == 2
    all_units = ad.linear_units(tr)
    names = {n for u in all_units for n, _ in u}
    assert "transformer_blocks.0.ff_context.net.2" in names
    assert "transformer_blocks.0.attn.to_add_out" in names
    # the last block is context_pre_only: no context FFN / to_add_out exist there
    assert "transformer_blocks.1.ff_context.net.2" not in names
    no_ctx = {n for u in ad.linear_units(tr, groups=("attn", "ff")) for n, _ in u}
    assert not any("add_" in n or "context" in n for n in no_ctx)


def test_unknown_family():
    with pytest.raises(UnsupportedFamily):
        adapter("vqgan")


def test_step_tracker_positional_unet():
    unet = tiny_unet((1, 1))
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(4)
    tr = StepTracker(unet, sched)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        for _ in range(2):  # two trajectories: the index restarts at the first timestep
            for t in sched.timesteps:
                unet(x, t, encoder_hidden_states=ctx)
    assert tr.state.history == [0, 1, 2, 3]
    assert tr.state.calls == 8 and tr.state.latent_hw == (8, 8) and tr.state.batch_size == 2
    tr.remove()
    assert not unet._forward_pre_hooks


def test_step_tracker_keyword_mmdit():
    tr_model = tiny_mmdit()
    sched = DDIMScheduler(num_train_timesteps=100)
    sched.set_timesteps(3)
    tr = StepTracker(tr_model, sched)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for t in sched.timesteps:
            tr_model(hidden_states=x, encoder_hidden_states=torch.randn(1, 3, 8),
                     pooled_projections=torch.randn(1, 8), timestep=t.expand(1))
    assert tr.state.history == [0, 1, 2] and tr.state.timestep == float(sched.timesteps[-1])
    tr.remove()


def test_step_tracker_restarts_on_flux_rescaled_timesteps():
    # FluxPipeline calls the transformer with t / 1000, never scheduler.timesteps[0]: a rising
    # timestep marks the next trajectory (DSAP and the OBS-Diff step weights key on the index).
    from edm.models.tiny import tiny_flux

    pipe = tiny_flux()
    tr = StepTracker(pipe.transformer, pipe.scheduler)
    seen = []
    for seed in (0, 1):
        pipe(prompt=["a"], num_inference_steps=3, guidance_scale=3.5, height=16, width=16,
             max_sequence_length=8, generator=torch.Generator().manual_seed(seed),
             output_type="pt")
        seen.append(list(tr.state.history))
    assert seen == [[0, 1, 2], [0, 1, 2]] and tr.state.calls == 6
    tr.remove()


def test_step_tracker_pndm_repeats_are_one_trajectory():
    from diffusers import PNDMScheduler

    unet = tiny_unet((1, 1))
    sched = PNDMScheduler(num_train_timesteps=100, skip_prk_steps=True)
    sched.set_timesteps(4)
    tr = StepTracker(unet, sched)
    assert len(sched.timesteps) == 5  # PLMS: the first timestep twice
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        for _ in range(2):
            for t in sched.timesteps:
                unet(x, t, encoder_hidden_states=ctx)
    assert tr.state.history == [0, 1, 2, 3, 4] and tr.state.calls == 10
    tr.remove()
