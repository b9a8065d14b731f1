"""DDPM family (issue 12, OBS-Diff Table 10): unconditional pipeline, tiny and hub loaders, CIFAR-10
data and FID pre-flight, the real architecture's size, and Diff-Pruning + OBS update (the
conv/linear OBS kernel, identical masks with and without the update, its effect on the digits
model)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from edm.errors import ConfigError, MissingWeightsError
from edm.methods.base import ApplyContext
from edm.methods.weight.conv_obs import (
    channel_columns,
    consumer_input,
    obs_remove_columns,
    output_error,
    reconstruction_error,
    refit_columns,
    refit_to_dense,
    zero_columns,
)
from edm.methods.weight.diff_pruning import DiffPruning
from edm.models.ddpm import DDPMHubPipeline, TinyDDPMLoader, UnconditionalSamples

# -- the OBS kernel ----------------------------------------------------------------------------


def _correlated(n_tok: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tok, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5


def test_unfolded_columns_are_the_convolution():
    """conv(x) = W.reshape(out, -1) @ unfold(x): the Hessian of the unfolded input is the right
    one, and channel c owns columns c*kh*kw ... (stride 2, as the Downsample2D convs)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9, generator=g)
    y = F.conv2d(x, conv.weight, stride=2, padding=1)
    cols = consumer_input(conv, x)  # [b, positions, in*kh*kw]
    W = conv.weight.reshape(5, -1)
    assert torch.allclose((cols @ W.T).transpose(1, 2).reshape(y.shape), y, atol=1e-5)
    assert torch.equal(W[:, channel_columns([4], 9)], conv.weight[:, 4].reshape(5, -1))
    lin = nn.Linear(4, 3)
    assert consumer_input(lin, x[..., :4]) is not None
    with pytest.raises(TypeError):
        consumer_input(nn.Conv2d(4, 4, 3, groups=2), x[:, :4])


@pytest.mark.parametrize("group", [1, 9])
def test_obs_update_is_the_least_squares_refit_and_beats_zeroing(group):
    X = _correlated(4000, 8 * group)
    H = X.T @ X / len(X)
    W = torch.randn(6, 8 * group, generator=torch.Generator().manual_seed(1))
    cols = channel_columns([1, 5, 6], group)
    W_obs = obs_remove_columns(W, H, cols, percdamp=1e-6)
    assert torch.count_nonzero(W_obs[:, cols]) == 0
    assert torch.allclose(W_obs, refit_columns(W, H, cols), atol=1e-3, rtol=1e-3)
    e_zero = reconstruction_error(W, zero_columns(W, cols), H)
    e_obs = reconstruction_error(W, obs_remove_columns(W, H, cols), H)  # default damping
    assert e_obs < 0.7 * e_zero
    # with the dense inputs, the shifted-input refit is the same update
    keep = torch.tensor([c for c in range(W.shape[1]) if c not in set(cols.tolist())])
    V = refit_to_dense(W, H[keep], H[keep][:, keep], keep, percdamp=1e-6)
    assert torch.allclose(V, W_obs[:, keep], atol=1e-3, rtol=1e-3)


def test_refit_to_dense_on_shifted_inputs():
    """Pruning also shifts the kept inputs (GroupNorm over fewer channels, upstream layers): the
    refit matches the dense output on the shifted inputs better than the sliced weight does,
    and output_error computes ||W X - V X_hat||^2 from the moments."""
    X = _correlated(3000, 12)
    keep = torch.arange(0, 12, 2)
    X_hat = X[:, keep] * 1.3 + 0.2 * _correlated(3000, 6, seed=3)
    W = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    n = len(X)
    H, C, H_hat = X.T @ X / n, X_hat.T @ X / n, X_hat.T @ X_hat / n
    V = refit_to_dense(W, C, H_hat, keep, percdamp=1e-8)
    best = torch.linalg.lstsq(X_hat.double(), (X @ W.T).double()).solution.T.float()
    assert torch.allclose(V, best, atol=1e-3, rtol=1e-3)  # the least-squares optimum
    direct = float(((X @ W.T - X_hat @ V.T) ** 2).sum() / n)
    assert output_error(W, V, H, C, H_hat) == pytest.approx(direct, rel=1e-3)
    assert output_error(W, V, H, C, H_hat) < 0.8 * output_error(W, W[:, keep], H, C, H_hat)


# -- Diff-Pruning on the tiny DDPM: same masks with and without the update ---------------------


def _prune(pipe, seed=0, **kw):
    loader = TinyDDPMLoader()
    torch.manual_seed(seed)  # random importance draws from the global RNG (the run seeds it)
    method = DiffPruning(0.3, batch_size=16, t_stride=100, obs_images=16, obs_timesteps=3,
                         obs_batch_size=8, save=False, **kw)
    return method.apply(pipe, ApplyContext(family="ddpm", seed=seed, train_data=loader.train_data,
                                           gen={"num_inference_steps": 10}))


@pytest.fixture(scope="module")
def tiny_ddpm():
    return TinyDDPMLoader().load("ddpm", "fp32", "cpu")


@pytest.mark.parametrize("importance,mode", [("taylor", "sequential"), ("random", "dense")])
def test_masks_identical_with_and_without_obs_update(tiny_ddpm, importance, mode):
    plain, obs = copy.deepcopy(tiny_ddpm), copy.deepcopy(tiny_ddpm)
    r0 = _prune(plain, importance=importance)
    r1 = _prune(obs, importance=importance, obs_update=True, obs_mode=mode)
    assert r0.details["kept_channels"] == r1.details["kept_channels"]
    s0, s1 = plain.unet.state_dict(), obs.unet.state_dict()
    assert {k: v.shape for k, v in s0.items()} == {k: v.shape for k, v in s1.items()}
    consumers = {f"{n}.weight" for n in r1.details["obs_update"]["layers"]}
    assert consumers and all(torch.equal(s0[k], s1[k]) for k in s0 if k not in consumers)
    assert any(not torch.equal(s0[k], s1[k]) for k in consumers)
    assert 0 < r1.metrics["obs_error_ratio"] < 1 and r1.metrics["obs_error"] >= 0
    assert r1.metrics["params_after"] == r0.metrics["params_after"] < r0.metrics["params_before"]
    images = obs(["", ""], num_inference_steps=2,
                 generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_finetune_unconditional_with_ema_and_flips(tiny_ddpm):
    pipe = copy.deepcopy(tiny_ddpm)
    r = _prune(pipe, importance="magnitude", finetune_steps=3, finetune_batch_size=4,
               ema_decay=0.999, hflip=True)
    assert r.details["finetune"]["steps"] == 3 and np.isfinite(r.metrics["finetune_loss"])


def test_method_checks():
    DiffPruning(0.3).check("ddpm")
    with pytest.raises(ConfigError, match="method.obs_mode"):
        DiffPruning(0.3, obs_mode="exact")
    with pytest.raises(ConfigError, match="method.obs_weighting"):
        DiffPruning(0.3, obs_weighting="cosine")
    with pytest.raises(ConfigError, match="method.ema_decay"):
        DiffPruning(0.3, ema_decay=1.0)


# -- the embedded digits model: what the update does there -----------------------------------


@torch.no_grad()
def _denoise_mse(pipe, x0, ctx, ts=(50, 200, 400, 600, 800)):
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    a = pipe.scheduler.alphas_cumprod
    out = []
    for t in ts:
        xt = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * noise
        tt = torch.full((len(x0),), t)
        out.append(F.mse_loss(pipe.unet(xt, tt, encoder_hidden_states=ctx).sample, noise).item())
    return sum(out) / len(out)


def test_obs_update_on_the_digits_model():
    """At Diff-Pruning's masks (no fine-tuning), the sequential update removes most of the
    pruned model's extra denoising error on held-out digits; the literal one-pass (dense) update
    shrinks every layer's own error far more than the network's (measured, see
    experiments/results/digits_table10.md)."""
    from edm.digits import DigitsLoader
    from edm.digits.data import digit_images, digit_prompt

    loader = DigitsLoader()
    dense = loader.load()
    x, y = digit_images("heldout")
    x0, ctx = x[:96] * 2 - 1, dense.encode_prompt([digit_prompt(int(v)) for v in y[:96]])
    reports, mse = {}, {}
    for mode in ("none", "sequential", "dense"):
        pipe = copy.deepcopy(dense)
        torch.manual_seed(0)
        method = DiffPruning(0.1, importance="magnitude", t_stride=100, save=False,
                             obs_update=mode != "none", obs_mode="dense" if mode == "none" else mode,
                             obs_images=16, obs_timesteps=4, obs_batch_size=16)
        reports[mode] = method.apply(pipe, ApplyContext(family="digits", train_data=loader.train_data,
                                                        gen={"num_inference_steps": 25}))
        mse[mode] = _denoise_mse(pipe, x0, ctx)
    kept = {m: r.details["kept_channels"] for m, r in reports.items()}
    assert kept["none"] == kept["sequential"] == kept["dense"]
    assert _denoise_mse(dense, x0, ctx) < mse["sequential"] < 0.5 * mse["none"]
    assert reports["dense"].metrics["obs_error_ratio"] < 0.2  # each layer's own error
    assert reports["sequential"].metrics["obs_error_ratio"] < 1


def test_run_py_option_on_the_default_model(compose_cfg):
    """``python run.py method=diff_pruning method.obs_update=true`` composes on digits with the
    digits defaults of Diff-Pruning, and the preset is the same method."""
    from edm.validate import validate

    for overrides in (["method=diff_pruning", "method.obs_update=true"], ["method=diff_pruning_obs"]):
        cfg = compose_cfg(*overrides)
        validate(cfg)
        method = instantiate(cfg.method)
        assert method.obs_update and method.obs_mode == "sequential" and method.importance == "taylor"
    assert instantiate(compose_cfg("method=diff_pruning", "method.obs_update=true").method).finetune_steps == 200


# -- runner, configs, pre-flight ---------------------------------------------------------------


def test_tiny_ddpm_end_to_end_through_the_runner(compose_cfg):
    from edm.runner import run

    cfg = compose_cfg("model=tiny_ddpm", "method=diff_pruning_obs", "method.t_stride=100",
                      "method.obs_images=8", "method.obs_timesteps=2", "method.batch_size=8",
                      "method.finetune_steps=2", "method.finetune_batch_size=4",
                      "data.num_prompts=6", "logger=none", "sparsity=0.3")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    import json

    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["perf/images_generated"] == 6 and m["perf/params_m"] < m["perf/dense_params_m"]
    assert m["method/obs_error_ratio"] < 1 and m["perf/gflops_per_step"] > 0
    from PIL import Image

    with Image.open(out / "images" / "000005.png") as im:
        assert im.mode == "RGB" and im.size == (16, 16)
    assert [ln for ln in (out / "prompts.jsonl").read_text().splitlines() if ln]


def test_unconditional_limits_and_data(compose_cfg):
    from edm.validate import validate

    with pytest.raises(ConfigError, match="gen.guidance_scale"):
        validate(compose_cfg("model=tiny_ddpm", "gen.guidance_scale=2.0"))
    with pytest.raises(ConfigError, match="gen.height"):
        validate(compose_cfg("model=tiny_ddpm", "gen.height=32", "gen.width=32"))
    items = UnconditionalSamples(3).load()
    assert [it.prompt for it in items] == ["", "", ""] and [it.index for it in items] == [0, 1, 2]
    with pytest.raises(ConfigError, match="data.num_prompts"):
        UnconditionalSamples(0).check()


def test_ddpm_cifar10_preflight_names_the_repo(compose_cfg, tmp_path, monkeypatch):
    from edm.runner import plan_run

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine has
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = compose_cfg("model=ddpm_cifar10", "eval=perf", "logger=none")
    assert cfg.gen.num_inference_steps == 100 and cfg.model.loader.scheduler == "DDIMScheduler"
    with pytest.raises(MissingWeightsError) as err:
        plan_run(cfg)
    assert "google/ddpm-cifar10-32" in str(err.value)
    assert "hf download google/ddpm-cifar10-32" in str(err.value)


def test_fid_cifar10_preflight_names_the_stats_file(compose_cfg, tmp_path):
    """No statistics: the run fails in plan_run (nothing loaded), naming the file and the
    command that builds it."""
    from edm.runner import plan_run

    inception = tmp_path / "weights" / "inception-2015-12-05.pt"
    inception.parent.mkdir()
    inception.write_bytes(b"stand-in")  # the Inception file is checked first
    cfg = compose_cfg("model=tiny_ddpm", "eval=fid_cifar10", f"paths.cache_dir={tmp_path}",
                      "logger=none")
    with pytest.raises(MissingWeightsError) as err:
        plan_run(cfg)
    msg = str(err.value)
    assert "cifar10_train32_clean.npz" in msg
    assert "python -m edm.eval.precompute eval=fid_cifar10 eval.fid.mode=clean" in msg


def _fake_cifar(root: Path, per_batch: int = 3) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": list(range(per_batch))}
        (root / name).write_bytes(pickle.dumps(batch))
    return root


def test_cifar10_train_data_and_reference_images(tmp_path):
    from edm.eval.fid import FID
    from edm.eval.precompute import unpack_cifar10

    root = _fake_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ConfigError, match="model.loader.train_data_dir"):
        DDPMHubPipeline("google/ddpm-cifar10-32").check_train_data()
    loader = DDPMHubPipeline("google/ddpm-cifar10-32", train_data_dir=str(root))
    loader.check_train_data()
    images, prompts = loader.train_data()
    assert images.shape == (15, 3, 32, 32) and prompts is None and 0 <= images.min() <= images.max() <= 1

    def feats(x):  # a cheap stand-in for Inception: channel means
        return x.mean(dim=(2, 3))

    fid = FID(reference="cifar10_train32", cache_dir=str(tmp_path / "refs"), feature_model=feats,
              feature_name="test", feature_size=8)
    folder = unpack_cifar10(root, fid)
    assert len(list(folder.glob("*.png"))) == 15 and unpack_cifar10(folder, fid) == folder
    from PIL import Image

    with Image.open(folder / "000000.png") as im:
        assert np.array_equal(np.asarray(im).transpose(2, 0, 1), (images[0] * 255).round().byte().numpy())
    assert fid.build_reference(folder).is_file()


# -- the real architecture ---------------------------------------------------------------------


def test_real_ddpm_cifar10_size_and_table10_pruning():
    """google/ddpm-cifar10-32 from its published config: 35.7 M parameters and 6.1 G MACs
    (convolutions and linears, the papers' counter) at 32x32; channel ratio 0.3 gives Table
    10's 13.95 M / 2.1 G."""
    from edm.eval.flops import flop_counter, split_flops
    from edm.models import archs

    inputs = {"sample": torch.zeros(1, 3, 32, 32), "timestep": torch.full((1,), 500.0)}

    def macs(model, device):
        with flop_counter() as fc, torch.no_grad():
            model(**{k: v.to(device) for k, v in inputs.items()})
        return split_flops(fc)["linear_conv"] / 2

    meta = archs.build_denoiser("ddpm_cifar10", device="meta")
    assert sum(p.numel() for p in meta.parameters()) == 35_746_307
    assert macs(meta, "meta") / 1e9 == pytest.approx(6.1, abs=0.05)
    unet = archs.build_denoiser("ddpm_cifar10", device="cpu").requires_grad_(True)  # TP traces
    method = DiffPruning(0.3, importance="magnitude", magnitude_p=2)
    example = {"sample": inputs["sample"], "timestep": torch.zeros(1, dtype=torch.long)}
    for group in method.build_pruner(unet, example, True).step(interactive=True):
        group.prune()
    from edm.methods.weight.diff_pruning import repair_static_attributes

    repair_static_attributes(unet)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(13.95, abs=0.005)
    assert macs(unet, "cpu") / 1e9 == pytest.approx(2.1, abs=0.05)


def test_hub_loader_reads_a_ddpm_repo_layout(tmp_path):
    """google/ddpm-cifar10-32's layout (model_index.json of a DDPMPipeline, unet/, scheduler/
    with a DDPMScheduler) from a local folder: loaded offline, sampled with DDIM."""
    import json

    from diffusers import DDPMScheduler

    from edm.models.tiny import tiny_ddpm

    root = tmp_path / "ddpm-cifar10-32"
    tiny_ddpm().unet.save_pretrained(root / "unet")
    DDPMScheduler(beta_schedule="linear", clip_sample=True).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]}))
    loader = DDPMHubPipeline("google/ddpm-cifar10-32", path=str(root), scheduler="DDIMScheduler")
    pipe = loader.load("ddpm", "fp32", "cpu")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.edm_family == "ddpm"
    assert pipe.scheduler.config.beta_schedule == "linear"
    img = pipe([""] * 2, num_inference_steps=3,
               generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    one = pipe([""], num_inference_steps=3, generator=[torch.Generator().manual_seed(1)]).images
    assert img.shape == (2, 3, 16, 16) and torch.allclose(img[1:], one, atol=1e-5)  # per-image seeds
    with pytest.raises(ConfigError, match="model.family"):
        loader.load("sd15", "fp32", "cpu")


def test_sequential_units_and_determinism(tiny_ddpm):
    """Only layers reading the same tensor object share a unit (q/k/v), and the sequential
    update is deterministic: a freed input's address reused by the next layer once merged a
    layer with the one it feeds, and the result changed from run to run."""
    from edm.methods.weight.diff_pruning_obs import forward_units

    unet = tiny_ddpm.unet
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    batch = (torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), {}, 1.0)
    units = forward_units(unet, names, batch)
    multi = [u for u in units if len(u) > 1]
    n_attn = sum(type(m).__name__ == "Attention" for m in unet.modules())
    assert len(multi) == n_attn and all(sorted(n.rsplit(".", 1)[1] for n in u) ==
                                        ["to_k", "to_q", "to_v"] for u in multi)
    assert sorted(n for u in units for n in u) == sorted(names)
    a, b = copy.deepcopy(tiny_ddpm), copy.deepcopy(tiny_ddpm)
    ra, rb = _prune(a, obs_update=True), _prune(b, obs_update=True)
    assert ra.metrics["obs_error"] == rb.metrics["obs_error"]
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
