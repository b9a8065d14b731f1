"""Diff-Pruning on the digits UNet: gradient accumulation rule, the torch-pruning head-width
pitfall and its fix, static-attribute repair, fine-tuning, save/reload of the pruned model."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from edm.errors import ConfigError, UnsupportedFamily
from edm.methods.base import ApplyContext
from edm.methods.weight.diff_pruning import DiffPruning, accumulate_gradients, attention_heads


def digits_pipe(heads=(2, 4, 4), seed=0, mask_padding=False):
    """A digits pipeline (random init) whose attention has several heads per block, so that
    torch-pruning's default widths (16 -> 11) are not divisible by the head count."""
    from edm.digits.components import build_components, default_config
    from edm.digits.pipeline import DigitsPipeline

    cfg = default_config("small")
    cfg["unet"]["attention_head_dim"] = list(heads)
    return DigitsPipeline(**build_components(cfg, seed=seed), mask_padding=mask_padding)


def example(unet):
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 1, 16, 16, generator=g), "timestep": torch.tensor([3, 700]),
            "encoder_hidden_states": torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)}


@pytest.mark.parametrize("pass_heads", [False, True])
def test_torch_pruning_head_widths(pass_heads):
    """Measured fact (spec §3.2 / issue 3): without ``num_heads`` torch-pruning 1.6.1 prunes q/k/v
    widths to sizes the head count cannot divide and the forward fails; with it, it works."""
    pipe = digits_pipe()
    unet = pipe.unet
    ex = example(unet)
    unet(**ex).sample.pow(2).mean().backward()
    pruner = DiffPruning(0.3).build_pruner(unet, {k: v[:1] for k, v in ex.items()}, pass_heads)
    for group in pruner.step(interactive=True):
        group.prune()
    from edm.methods.weight.diff_pruning import repair_static_attributes

    repair_static_attributes(unet)
    widths = [(lin.out_features, h) for lin, h in attention_heads(unet).items()]
    divisible = all(w % h == 0 for w, h in widths)
    if pass_heads:
        assert divisible
        with torch.no_grad():
            assert unet(**ex).sample.shape == ex["sample"].shape
    else:
        assert not divisible
        with pytest.raises(RuntimeError):
            unet(**ex)


class _Identity(nn.Module):
    """Predicts eps = x_t * w: good at high noise, bad at low noise, so the loss falls with t."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=x * self.w)


def test_gradient_accumulation_stops_at_loss_ratio():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    stub = _Identity()
    out = accumulate_gradients(stub, sched, x0, None, 0.05, torch.Generator().manual_seed(0))
    losses = out["losses"]
    assert 1 < out["timesteps_used"] < 1000
    assert losses[-1] < 0.05 * max(losses) and all(l >= 0.05 * max(losses[: i + 1])
                                                   for i, l in enumerate(losses[:-1]))
    # gradients accumulated over every used step: equals the sum of per-step gradients
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    total = torch.zeros(())
    for t in range(out["timesteps_used"]):
        a = sched.alphas_cumprod[t]
        w = torch.ones((), requires_grad=True)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        (grad,) = torch.autograd.grad(torch.nn.functional.mse_loss(xt * w, noise), w)
        total += grad
    assert torch.allclose(stub.w.grad, total, rtol=1e-4)
    all_t = accumulate_gradients(_Identity(), sched, x0, None, 0.0, torch.Generator(), t_stride=100)
    assert all_t["timesteps_used"] == 10


def test_apply_finetune_save_reload(tmp_path):
    pipe = digits_pipe()
    calls = []

    def train_data():  # ctx.train_data contract: (images [N, C, H, W] in [0, 1], prompts)
        calls.append(1)
        return torch.rand(16, 1, 16, 16), ["a handwritten digit seven"] * 16

    before = sum(p.numel() for p in pipe.unet.parameters())
    method = DiffPruning(0.3, batch_size=8, t_stride=100, finetune_steps=2, finetune_batch_size=4)
    report = method.apply(pipe, ApplyContext(family="digits", output_dir=tmp_path,
                                             train_data=train_data))
    after = sum(p.numel() for p in pipe.unet.parameters())
    assert calls and after < before and report.metrics["params_after"] == after
    assert report.patched > 0 and report.metrics["timesteps_used"] <= 10
    assert report.details["finetune"]["steps"] == 2
    for m in pipe.unet.modules():  # repaired static attributes (forward asserts them)
        if type(m).__name__ in ("Upsample2D", "Downsample2D"):
            assert m.channels == m.conv.in_channels
    def gen():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    img = pipe(["a handwritten digit one"] * 2, num_inference_steps=2, generator=gen()).images
    assert img.shape == (2, 1, 16, 16) and torch.isfinite(img).all()

    # model.pruned_from: a fresh dense pipeline reloads the pruned UNet exactly
    from edm.methods.weight.io import apply_pruned_from

    fresh = digits_pipe(seed=1)
    fresh.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
    apply_pruned_from(fresh, tmp_path / "pruned_model")
    img2 = fresh(["a handwritten digit one"] * 2, num_inference_steps=2, generator=gen()).images
    assert torch.equal(img, img2)


def test_family_and_config_checks():
    with pytest.raises(UnsupportedFamily, match="training images"):
        DiffPruning(0.3).check("sdxl")
    DiffPruning(0.3).check("digits")
    with pytest.raises(ConfigError):
        DiffPruning(0.3, importance="hessian")
    with pytest.raises(ConfigError):
        DiffPruning(1.2)


def test_padding_mask_reaches_every_unet_call(tmp_path):
    """A ``mask_padding`` UNet (model=layouts) is trained and sampled with the text padding masked
    out; Diff-Pruning's gradient pass, torch-pruning trace, OBS update and fine-tune must call it
    the same way, with the empty prompt's mask on the rows dropped for CFG."""
    pipe = digits_pipe(mask_padding=True)
    prompt = "a handwritten digit seven"
    masks = {tuple(pipe._tokens([p]).attention_mask[0].tolist()): p for p in (prompt, "")}
    seen = []

    def spy(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if states is not None:
            seen.append(kwargs.get("encoder_attention_mask"))

    pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    method = DiffPruning(0.3, batch_size=8, t_stride=100, finetune_steps=4, finetune_batch_size=8,
                         p_uncond=0.5, obs_update=True, obs_images=4, obs_timesteps=2)
    method.apply(pipe, ApplyContext(family="digits", output_dir=tmp_path, seed=0,
                                    train_data=lambda: (torch.rand(16, 1, 16, 16), [prompt] * 16)))
    assert len(seen) > 10 and all(m is not None for m in seen)
    rows = [tuple(r.tolist()) for m in seen for r in m]
    assert set(rows) <= set(masks) and {masks[r] for r in rows} == {prompt, ""}
    assert all(0 < sum(r) < len(r) for r in rows)  # real masks: some tokens, some padding
