"""Caches and fewer steps: DeepCache on UNets, diffusers' cache hooks, the fewer-steps baseline.

Identity where a knob defines it (interval 1 / threshold 0 / skip range 1), bit-exact removal,
fewer FLOPs on cached steps and on the trajectory average, errors before loading, end-to-end runs.
"""

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from edm import perf
from edm.data.images import PromptItem
from edm.errors import ConfigError, UnsupportedFamily
from edm.eval.flops import measure_denoiser_flops
from edm.families import adapter
from edm.methods.base import ApplyContext, Sequential
from edm.methods.cache.deepcache import DeepCache, cached_modules
from edm.methods.cache.diffusers_cache import (
    FasterCache,
    FirstBlockCache,
    PyramidAttentionBroadcast,
    TaylorSeerCache,
)
from edm.methods.cache.mag_cache import MagCache
from edm.methods.cache.schedule import full_steps
from edm.methods.cache.steps import FewerSteps
from edm.models.tiny import tiny_flux
from edm.runner import run

logging.getLogger("diffusers").setLevel(logging.ERROR)  # FasterCache's "experimental" warnings

STEPS = 6
FAST = ["logger=none", "data.num_prompts=4", "gen.batch_size=2", "gen.num_inference_steps=6"]
# DeepCacheSDHelper of the `DeepCache` package, installed outside .venv (`pip install --no-deps
# DeepCache` into /tmp/deepcache-venv); its extension file has no imports, so it loads by path.
HELPER = Path(os.environ.get("DEEPCACHE_HELPER", "/tmp/deepcache-venv/lib/python3.11/"
                             "site-packages/DeepCache/extension/deepcache.py"))


@pytest.fixture(scope="module")
def pipes(tiny_pipes):
    out = dict(tiny_pipes)
    out["flux"] = tiny_flux()
    out["flux"].set_progress_bar_config(disable=True)
    return out


def _call(fam, n=2, steps=STEPS, seed=0):
    kw = {"num_inference_steps": steps,
          "generator": [torch.Generator().manual_seed(seed + i) for i in range(n)]}
    if fam == "digits":
        return dict(prompt=["seven", "one", "two"][:n], **kw)
    return dict(prompt=["a red cat", "a blue dog", "a tree"][:n], height=32, width=32,
                output_type="pt", guidance_scale=3.5 if fam == "flux" else 5.0, **kw)


def _gen(pipe, fam, **kw):
    return pipe(**_call(fam, **kw)).images


def _flops(pipe, fam, steps=STEPS):
    return measure_denoiser_flops(pipe, **_call(fam, n=1, steps=steps))


def _ctx(fam, steps=STEPS):
    return ApplyContext(family=fam, gen={"num_inference_steps": steps, "height": 32, "width": 32,
                                         "guidance_scale": 3.5 if fam == "flux" else 5.0})


def _hook_state(pipe):
    """Modules that carry a hook registry or an instance-level forward (must not change)."""
    den = adapter(pipe).denoiser(pipe)
    return {n for n, m in den.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
            or "forward" in m.__dict__}


@pytest.mark.parametrize("schedule", ["uniform", "non_uniform"])
def test_schedules(schedule):
    for steps in (2, 9, 25, 50):
        for n in (1, 2, 3, 5):
            got = full_steps(schedule, steps, n, center=min(15, steps - 1))
            assert 0 in got and max(got) < steps and len(got) == -(-steps // n)
    assert full_steps("uniform", 9, 3) == {0, 3, 6}
    assert full_steps("non_uniform", 50, 5, 15, 1.4) == {0, 5, 10, 13, 15, 19, 24, 29, 35, 42}


@pytest.mark.parametrize("fam", ["digits", "sd15", "sdxl"])
def test_deepcache_identity_removal_and_flops(pipes, fam):
    pipe = pipes[fam]
    before = _hook_state(pipe)
    dense, dense_flops = _gen(pipe, fam), _flops(pipe, fam)
    exact = DeepCache(cache_interval=1)
    exact.apply(pipe, _ctx(fam))
    assert torch.equal(_gen(pipe, fam), dense)  # every step full: bit-identical
    exact.remove(pipe)
    method = DeepCache(cache_interval=3)
    report = method.apply(pipe, _ctx(fam))
    assert report.details["full_steps"] == [0, 3]
    assert report.metrics["planned_cached_fraction"] == pytest.approx(4 / 6)
    method.apply(pipe, _ctx(fam))  # re-applying replaces, never stacks
    out = _gen(pipe, fam)
    assert out.shape == dense.shape and not torch.equal(out, dense)
    assert method.run_metrics()["cached_call_fraction"] == pytest.approx(4 / 6)
    per_call = _flops(pipe, fam)
    full, cached = per_call[0], per_call[1]
    assert per_call[3] == full == dense_flops[0] and cached < 0.9 * full  # skipped compute is gone
    assert all(c == cached for i, c in enumerate(per_call) if i not in (0, 3))
    # the runner's metric is that trajectory average, per call
    item = PromptItem(index=0, prompt=_call(fam)["prompt"][0], seed=0)
    size = 16 if fam == "digits" else 32  # digits: the pipeline's defaults (16x16, CFG 1.5)
    gen = {"num_inference_steps": STEPS, "height": size, "width": size,
           "guidance_scale": _call(fam).get("guidance_scale", 1.5)}
    got = perf.flops_per_step(pipe, item, gen)["gflops_per_step"] * 1e9
    assert got == pytest.approx(sum(per_call) / len(per_call)) and got < sum(dense_flops) / STEPS
    method.remove(pipe)
    assert torch.equal(_gen(pipe, fam), dense) and _hook_state(pipe) == before


def test_deepcache_new_trajectories_and_batch_changes(pipes):
    pipe = pipes["digits"]
    method = DeepCache(cache_interval=4)
    method.apply(pipe, _ctx("digits"))
    _gen(pipe, "digits", n=3)  # a batch of 3 fills the cache, then a smaller batch follows:
    two = _gen(pipe, "digits", n=2)  # its first step is full again (cache keyed by batch size)
    assert torch.equal(_gen(pipe, "digits", n=2), two)  # each trajectory refills its cache
    method.remove(pipe)
    fresh = DeepCache(cache_interval=4)
    fresh.apply(pipe, _ctx("digits"))
    assert torch.equal(_gen(pipe, "digits", n=2), two)  # nothing leaked from the batch of 3
    fresh.remove(pipe)


def _reference_helper():
    if not HELPER.exists():
        pytest.skip(f"DeepCache's DeepCacheSDHelper not found at {HELPER}; run "
                    "bash experiments/deepcache_parity/run_parity.sh (its own venv)")
    spec = importlib.util.spec_from_file_location("deepcache_helper", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.DeepCacheSDHelper


@pytest.mark.parametrize("fam", ["digits", "sd15", "sdxl"])
def test_deepcache_equals_the_deepcache_package(pipes, fam):
    """Every branch, bit for bit, against the package's own (forward-overwriting) helper."""
    helper_cls, pipe = _reference_helper(), pipes[fam]
    # the helper leaves instance-level forwards on every module it wrapped: give it a copy
    ref_pipe = copy.deepcopy(pipe)
    unet = pipe.unet
    for block in range(len(unet.down_blocks)):
        for layer in range(len(unet.up_blocks[-1 - block].resnets)):
            ours = DeepCache(cache_interval=3, cache_block_id=block, cache_layer_id=layer)
            ours.apply(pipe, _ctx(fam))
            got = _gen(pipe, fam)
            ours.remove(pipe)
            helper = helper_cls(pipe=ref_pipe)
            helper.set_params(cache_interval=3)  # it hard-codes 3 layers in cache_branch_id
            helper.params.update(cache_block_id=block, cache_layer_id=layer)
            helper.enable()
            try:
                ref = _gen(ref_pipe, fam)
            finally:
                helper.disable()
            assert torch.equal(got, ref), (fam, block, layer)


def test_deepcache_branches_and_errors(pipes):
    unet = pipes["sd15"].unet  # 3 down blocks, 3 resnets per up block
    assert [n for n, _ in cached_modules(unet, 0, 0)] == [
        "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
        "up_blocks.1", "up_blocks.2.resnets.0", "up_blocks.2.attentions.0",
        "up_blocks.2.resnets.1", "up_blocks.2.attentions.1"]
    assert [n for n, _ in cached_modules(unet, 2, 2)] == ["mid_block"]
    with pytest.raises(ConfigError, match="method.cache_block_id.*3 down blocks"):
        DeepCache(cache_block_id=3).apply(pipes["sd15"], _ctx("sd15"))
    with pytest.raises(ConfigError, match="method.cache_layer_id.*3 resnets"):
        DeepCache(cache_layer_id=3).apply(pipes["sd15"], _ctx("sd15"))
    assert _hook_state(pipes["sd15"]) == set()  # a failed apply leaves nothing behind
    for kw, key in (({"cache_interval": 0}, "cache_interval"), ({"schedule": "x"}, "schedule"),
                    ({"power": 1.0}, "power"), ({"cache_interval": 2.5}, "cache_interval")):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            DeepCache(**kw)
    for fam in ("sd3", "flux"):
        with pytest.raises(UnsupportedFamily, match="deepcache"):
            DeepCache().check(fam)


EVERY_STEP = {"spatial_attention_timestep_skip_range": (-1, 1001),
              "cross_attention_timestep_skip_range": (-1, 1001)}
CASES = {  # method: (identity config, caching config, families)
    "first_block_cache": (lambda: FirstBlockCache(0.0), lambda: FirstBlockCache(0.3), ["flux"]),
    "taylorseer_cache": (lambda: TaylorSeerCache(cache_interval=1),
                         lambda: TaylorSeerCache(cache_interval=2, disable_cache_before_step=2,
                                                 taylor_factors_dtype="float32"),
                         ["digits", "sd15", "sdxl", "sd3", "flux"]),
    "pab": (lambda: PyramidAttentionBroadcast(1),
            lambda: PyramidAttentionBroadcast(2, 3, **EVERY_STEP),
            ["digits", "sd15", "sdxl", "sd3", "flux"]),
    "faster_cache": (lambda: FasterCache(spatial_attention_block_skip_range=1,
                                         unconditional_batch_skip_range=1),
                     lambda: FasterCache(), ["sd3", "flux"]),
    "mag_cache": (lambda: MagCache(max_skip_steps=0),
                  lambda: MagCache(threshold=0.5, retention_ratio=0.1), ["sd3", "flux"]),
}
PAIRS = [(m, f) for m, (_, _, fams) in CASES.items() for f in fams]


@pytest.mark.parametrize("name,fam", PAIRS)
def test_diffusers_cache_identity_removal_and_flops(pipes, name, fam):
    identity, caching, _ = CASES[name]
    pipe = pipes[fam]
    before = _hook_state(pipe)
    dense, dense_flops = _gen(pipe, fam), _flops(pipe, fam)
    exact = identity()
    exact.apply(pipe, _ctx(fam))
    assert torch.equal(_gen(pipe, fam), dense), "identity knob must be bit-identical"
    exact.remove(pipe)
    method = caching()
    report = method.apply(pipe, _ctx(fam))
    assert report.patched > 0 and report.details["hooks"]
    out = _gen(pipe, fam)
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert torch.equal(_gen(pipe, fam), out)  # state is reset per trajectory: reproducible
    per_call = _flops(pipe, fam)
    assert len(per_call) == len(dense_flops) and per_call[0] == dense_flops[0]
    assert sum(per_call) < 0.95 * sum(dense_flops)  # some steps skip compute
    method.remove(pipe)
    assert torch.equal(_gen(pipe, fam), dense) and _hook_state(pipe) == before


UNETS = ("digits", "sd15", "sd21", "sdxl")


@pytest.mark.parametrize("name,fam", [("first_block_cache", f) for f in (*UNETS, "sd3")]
                         + [(m, f) for m in ("faster_cache", "mag_cache") for f in UNETS])
def test_unsupported_families_are_named(name, fam):
    with pytest.raises(UnsupportedFamily, match=f"{name}.*{fam}.*: .*supported: "):
        CASES[name][1]().check(fam)


def test_the_unsupported_reasons_still_hold_in_diffusers(pipes):
    """The families refused above fail inside diffusers itself (if one starts working after a
    diffusers upgrade, this test says so: add the family to the method's supported_families)."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        apply_faster_cache,
        apply_first_block_cache,
    )
    from diffusers.models.cache_utils import CacheMixin

    sd3 = copy.deepcopy(pipes["sd3"])
    apply_first_block_cache(sd3.transformer, FirstBlockCacheConfig(threshold=0.05))
    with CacheMixin.cache_context(sd3.transformer, "x"), \
            pytest.raises(TypeError, match="NoneType"):  # SD3's context_pre_only last block
        _gen(sd3, "sd3", steps=2)
    sd15 = copy.deepcopy(pipes["sd15"])
    apply_faster_cache(sd15.unet, FasterCacheConfig(current_timestep_callback=lambda: 500,
                                                    tensor_format="BCHW"))
    with pytest.raises(RuntimeError, match="1-dimensional"):  # the 0-d positional timestep
        _gen(sd15, "sd15", steps=3)


@pytest.mark.parametrize("make,key", [
    (lambda: FirstBlockCache(1.5), "threshold"),
    (lambda: FirstBlockCache(-0.1), "threshold"),
    (lambda: TaylorSeerCache(cache_interval=0), "cache_interval"),
    (lambda: TaylorSeerCache(disable_cache_before_step=0), "disable_cache_before_step"),
    (lambda: TaylorSeerCache(taylor_factors_dtype="fp8"), "taylor_factors_dtype"),
    (lambda: PyramidAttentionBroadcast(spatial_attention_timestep_skip_range=(800, 100)),
     "spatial_attention_timestep_skip_range"),
    (lambda: PyramidAttentionBroadcast(None, None), "spatial_attention_block_skip_range"),
    (lambda: FasterCache(unconditional_batch_skip_range=0), "unconditional_batch_skip_range"),
    (lambda: FasterCache(attention_weight=2), "attention_weight"),
    (lambda: MagCache(threshold=3), "threshold"),
    (lambda: MagCache(mag_ratios="sd3"), "mag_ratios"),
    (lambda: MagCache(retention_ratio=1.5), "retention_ratio"),
    (lambda: FewerSteps(0), "num_inference_steps"),
])
def test_out_of_range_knobs_name_the_key(make, key):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        make()


def test_mag_cache_calibration_given_and_flux_ratios(pipes):
    pipe = pipes["sd3"]
    dense = _gen(pipe, "sd3")
    method = MagCache(threshold=0.5, retention_ratio=0.1)
    report = method.apply(pipe, _ctx("sd3"))
    ratios = report.details["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and report.details["mag_ratios_source"] == \
        "calibrate"
    calibrated = _gen(pipe, "sd3")
    method.remove(pipe)
    given = MagCache(threshold=0.5, retention_ratio=0.1, mag_ratios=ratios)
    given.apply(pipe, _ctx("sd3"))
    assert torch.equal(_gen(pipe, "sd3"), calibrated)  # pasting the ratios reproduces the run
    given.remove(pipe)
    assert torch.equal(_gen(pipe, "sd3"), dense)
    flux = MagCache(mag_ratios="flux")
    assert len(flux.apply(pipes["flux"], _ctx("flux")).details["mag_ratios"]) == 28
    flux.remove(pipes["flux"])


def test_composes_with_weight_and_token_methods(pipes):
    from edm.methods.token.tome import ToMe
    from edm.methods.weight.magnitude import Magnitude

    pipe = pipes["digits"]
    dense = _gen(pipe, "digits")
    both = Sequential([ToMe(ratio=0.5, seed=0), DeepCache(cache_interval=3)], name="tome+dc")
    both.apply(pipe, _ctx("digits"))
    out = _gen(pipe, "digits")
    assert not torch.equal(out, dense) and both.run_metrics()["deepcache/cached_call_fraction"] > 0
    both.remove(pipe)
    assert torch.equal(_gen(pipe, "digits"), dense)
    weights = Sequential([Magnitude(sparsity=0.5, keep_backup=True), DeepCache(cache_interval=2)],
                         name="magnitude+dc")
    report = weights.apply(pipe, _ctx("digits"))
    assert report.sparsity == pytest.approx(0.5, abs=0.05)
    weights.remove(pipe)  # cache off first, then the weights back
    assert torch.equal(_gen(pipe, "digits"), dense)


def _metrics(cfg):
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_fewer_steps_sets_the_generation_steps(compose_cfg):
    cfg = compose_cfg("logger=none", "data.num_prompts=4", "gen.batch_size=4",
                      "method=fewer_steps", "method.num_inference_steps=3")
    assert cfg.gen.num_inference_steps == 3
    run(cfg)
    rec = _metrics(cfg)
    assert rec["run"]["protocol"]["num_inference_steps"] == 3
    assert rec["metrics"]["method/step_fraction"] == pytest.approx(3 / 25)
    assert rec["metrics"]["perf/denoiser_calls"] == 3
    bad = compose_cfg("logger=none", "method=fewer_steps", "gen.num_inference_steps=7")
    with pytest.raises(Exception, match="gen.num_inference_steps.*is 7") as err:
        run(bad)
    assert isinstance(err.value.__cause__ or err.value, ConfigError)


def test_deepcache_end_to_end_on_digits_lowers_measured_flops(compose_cfg, tmp_path):
    dense = compose_cfg(*FAST)
    run(dense)
    cached = compose_cfg(*FAST, "method=deepcache")
    cached.paths.output_dir = str(tmp_path / "deepcache")  # not the dense run's images
    run(cached)
    d, c = _metrics(dense)["metrics"], _metrics(cached)["metrics"]
    assert c["method/cached_call_fraction"] == pytest.approx(4 / 6)
    assert c["perf/gflops_per_step"] < 0.75 * d["perf/gflops_per_step"]
    assert c["perf/denoiser_calls"] == d["perf/denoiser_calls"] == 6
    assert 0 <= c["eval/prompt_acc"] <= 1 and c["eval/digit_fid"] > 0


@pytest.mark.parametrize("model,method", [("tiny_sd15", "pab"), ("tiny_sdxl", "taylorseer_cache"),
                                          ("tiny_sd3", "mag_cache"), ("tiny_sd3", "faster_cache"),
                                          ("tiny_flux", "first_block_cache")])
def test_caches_end_to_end_on_tiny_families(compose_cfg, model, method):
    cfg = compose_cfg(*FAST, f"model={model}", f"method={method}")
    run(cfg)
    rec = _metrics(cfg)
    assert rec["run"]["method"] == method and rec["metrics"]["method/patched"] > 0
    assert rec["metrics"]["perf/gflops_per_step"] > 0
    assert len(list(Path(cfg.gen.images_dir).glob("*.png"))) == 4


def test_bad_cache_configs_fail_before_loading(compose_cfg, forbid_model_loading):
    for method, fam in (("first_block_cache", "digits"), ("faster_cache", "digits"),
                        ("mag_cache", "digits"), ("deepcache", "sd3")):
        model = "tiny_sd3" if fam == "sd3" else "digits"
        with pytest.raises(UnsupportedFamily, match=f"{method}.*{fam}"):
            run(compose_cfg("logger=none", f"model={model}", f"method={method}"))
    for override in ("method.threshold=1.5", "method.max_skip_steps=-1"):
        with pytest.raises(Exception) as err:
            run(compose_cfg("logger=none", "model=tiny_sd3", "method=mag_cache", override))
        assert isinstance(err.value.__cause__ or err.value, ConfigError)
        assert f"<{override.split('=')[0]}>" in str(err.value)
