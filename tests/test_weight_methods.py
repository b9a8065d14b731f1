"""Weight methods on tiny random pipelines (UNet: SD1.5-shaped, MMDiT: SD3-shaped) and on the
embedded digits architecture: measured sparsity, hooks removed, dtype kept, step tracking, context
branch, module packages (spec §4 item 5), config validation and calibration sets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from edm.errors import ConfigError
from edm.eval.base import PromptItem
from edm.families import adapter
from edm.methods.base import ApplyContext
from edm.methods.weight import DSnoT, Magnitude, OBSDiff, SparseGPT, Wanda
from edm.methods.weight.calibrate import CalibSettings, collect_stats, resolve_settings
from edm.methods.weight.hessian import timestep_weights
from edm.methods.weight.obs_diff import obs_diff
from edm.methods.weight.obs_diff_structured import OBSDiffStructured

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
GEN = {
    "num_inference_steps": STEPS,
    "guidance_scale": 5.0,
    "height": 32,
    "width": 32,
    "batch_size": 2,
}


class Prompts:
    """Minimal calibration set (the ``ctx.calib`` protocol)."""

    def __init__(self, n: int = 2):
        words = ["a red cat", "a blue dog", "green tree", "small house"]
        self.items = [PromptItem(i, words[i % 4], seed=i) for i in range(n)]

    def load(self):
        return list(self.items)


# ---- tiny pipelines ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipes(tiny_pipes):
    """conftest's tiny pipelines; each test deep-copies the one it mutates."""
    return tiny_pipes


def _ctx(family: str, calib=None, **gen):
    return ApplyContext(family=family, gen=dict(GEN, **gen), calib=calib or Prompts())


def _linears(pipe):
    den = adapter(pipe).denoiser(pipe)
    return {n: m for n, m in den.named_modules() if isinstance(m, torch.nn.Linear)}


def _no_hooks(module: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


METHODS = {
    "magnitude": lambda **kw: Magnitude(sparsity=0.5, **kw),
    "wanda": lambda **kw: Wanda(sparsity=0.5, num_groups=1, **kw),
    "sparsegpt": lambda **kw: SparseGPT(sparsity=0.5, num_groups=1, **kw),
    "obs_diff": lambda **kw: OBSDiff(sparsity=0.5, num_groups=1, **kw),
    "obs_diff_2:4": lambda **kw: OBSDiff(sparsity=0.5, pattern="2:4", num_groups=1, **kw),
    "dsnot": lambda **kw: DSnoT(sparsity=0.5, num_groups=1, **kw),
}


# ---- behaviour on both architectures ---------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_measured_sparsity_hooks_untouched(pipes, family, method):
    pipe = copy.deepcopy(pipes[family])
    den = adapter(pipe).denoiser(pipe)
    before = {k: v.clone() for k, v in den.state_dict().items()}
    m = METHODS[method]()
    report = m.apply(pipe, _ctx(family))
    targets = {n for p in report.details["packages"] for n in p}
    assert report.patched == len(targets) > 0
    # measured from the weights, within +-1 % of the target, for every layer and overall
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    for name, s in report.details["per_layer_sparsity"].items():
        assert s == pytest.approx(0.5, abs=0.01), name
    lin = _linears(pipe)
    zeros = sum(int((lin[n].weight == 0).sum()) for n in targets)
    assert zeros / sum(lin[n].weight.numel() for n in targets) == pytest.approx(report.sparsity)
    # untouched parameters are bit-identical; touched ones changed
    after = den.state_dict()
    for k, v in before.items():
        owner = k.rsplit(".", 1)[0]
        if owner not in targets or not k.endswith("weight"):
            assert torch.equal(v, after[k]), k
    assert _no_hooks(den) and _no_hooks(pipe.vae)  # (text encoders keep transformers' own hooks)
    if m.needs_calib:
        assert report.details["steps_seen"] == list(range(STEPS))
        assert report.metrics["calib_seconds"] > 0
    assert report.metrics["params_nonzero_after"] < report.metrics["params_nonzero_before"]
    assert report.metrics["peak_mem_gb"] > 0
    if "2:4" in method:
        from edm.methods.weight.masks import is_nm_sparse

        assert all(is_nm_sparse(lin[n].weight, 2, 4) for n in targets)
    if method != "obs_diff":
        return
    out = pipe(
        prompt=["a cat"],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(0)],
        output_type="pt",
    ).images
    assert torch.isfinite(out).all()


def test_sd3_context_branch_follows_targets(pipes):
    ctx_names = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")
    for targets, expect in ((["attn", "ff", "context"], True), (["attn", "ff"], False)):
        pipe = copy.deepcopy(pipes["sd3"])
        report = OBSDiff(sparsity=0.5, num_groups=1, targets=targets).apply(pipe, _ctx("sd3"))
        lin = _linears(pipe)
        context = [n for n in lin if any(s in n for s in ctx_names)]
        assert context
        pruned = [n for n in context if (lin[n].weight == 0).float().mean() > 0.4]
        assert bool(pruned) == expect
        assert (set(context) <= set(report.details["per_layer_sparsity"])) == expect


def test_dtype_preserved(pipes):
    pipe = copy.deepcopy(pipes["sd15"]).to(dtype=torch.bfloat16)
    OBSDiff(sparsity=0.5, num_groups=1).apply(pipe, _ctx("sd15"))
    den = adapter(pipe).denoiser(pipe)
    assert all(p.dtype == torch.bfloat16 for p in den.parameters())


def test_packages_first_identical_later_differ(pipes):
    """Spec §4.5: 1 vs L packages -> the first package's weights are identical, later differ."""
    results = {}
    for groups in (1, 4):
        pipe = copy.deepcopy(pipes["sd3"])
        rep = OBSDiff(sparsity=0.5, num_groups=groups).apply(pipe, _ctx("sd3"))
        results[groups] = (_linears(pipe), rep)
    first = results[4][1].details["packages"][0]
    later = [n for p in results[4][1].details["packages"][1:] for n in p]
    assert len(results[4][1].details["packages"]) == 4
    for n in first:
        assert torch.equal(results[1][0][n].weight, results[4][0][n].weight), n
    assert any(not torch.equal(results[1][0][n].weight, results[4][0][n].weight) for n in later)
    assert results[4][1].metrics["stats_peak_mb"] < results[1][1].metrics["stats_peak_mb"]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_collect_stats_weights_steps_under_cfg(pipes, family):
    """Each call is weighted by alpha of its step; b counts both CFG halves; hooks removed."""
    pipe = pipes[family]
    unit = adapter(pipe).linear_units(adapter(pipe).denoiser(pipe))[0]
    seen = []

    class Rec:
        def update(self, x, alpha=1.0):
            seen.append((x.shape[0], alpha))

        def nbytes(self):
            return 0

    w = timestep_weights("log_decrease", STEPS)
    cal = collect_stats(
        pipe,
        unit[:1],
        lambda n, m: Rec(),
        Prompts(3).load(),
        CalibSettings(3, STEPS, 5.0, 32, 32, 2, 7),
        lambda i, T: float(timestep_weights("log_decrease", T)[i]),
    )
    assert cal.steps_seen == list(range(STEPS))
    # batches of 2 and 1 prompts, CFG doubles the rows
    assert [b for b, _ in seen] == [4] * STEPS + [2] * STEPS
    assert [a for _, a in seen] == pytest.approx([float(v) for v in w] * 2)
    assert _no_hooks(adapter(pipe).denoiser(pipe))


def test_hooks_removed_when_calibration_fails(pipes):
    pipe = pipes["sd15"]
    den = adapter(pipe).denoiser(pipe)
    unit = adapter(pipe).linear_units(den)[0]

    class Boom:
        def update(self, x, alpha=1.0):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(
            pipe,
            unit,
            lambda n, m: Boom(),
            Prompts().load(),
            CalibSettings(2, 2, 5.0, 32, 32, 2, 0),
        )
    assert _no_hooks(den)


def test_calibration_is_deterministic(pipes):
    pipe = pipes["sd15"]
    unit = adapter(pipe).linear_units(adapter(pipe).denoiser(pipe))[0]
    from edm.methods.weight.hessian import HessianStat

    def run():
        return (
            collect_stats(
                pipe,
                unit,
                lambda n, m: HessianStat(m.in_features),
                Prompts().load(),
                CalibSettings(2, 2, 5.0, 32, 32, 2, 3),
            )
            .stats[unit[0][0]]
            .H
        )

    assert torch.equal(run(), run())


# ---- configuration ---------------------------------------------------------------------------
def test_config_errors_name_the_key():
    cases = [
        (lambda: OBSDiff(sparsity=0.6, pattern="2:4"), "method.sparsity"),
        (lambda: Wanda(sparsity=0.6, pattern="4:8"), "method.sparsity"),
        (lambda: OBSDiff(sparsity=0.5, pattern="1:3"), "method.pattern"),
        (lambda: OBSDiff(sparsity=1.2), "method.sparsity"),
        (lambda: OBSDiff(sparsity=0.5, targets=["mlp"]), "method.targets"),
        (lambda: OBSDiff(sparsity=0.5, blocks=[3, 1]), "method.blocks"),
        (lambda: OBSDiff(sparsity=0.5, num_groups=0), "method.num_groups"),
        (lambda: OBSDiff(sparsity=0.5, weighting="cosine"), "method.weighting"),
        (lambda: obs_diff(sparsity=0.5, granularity="rows"), "method.granularity"),
        (lambda: obs_diff(sparsity=0.5, pattern="2:4", granularity="structured"), "method.pattern"),
        (lambda: OBSDiff(sparsity=0.5, calibration={"steps": 3}), "method.calibration"),
        (lambda: SparseGPT(sparsity=0.5, granularity="structured"), "method.granularity"),
    ]
    for make, key in cases:
        with pytest.raises(ConfigError) as e:
            make()
        assert e.value.key == key


def test_obs_diff_granularity_dispatch():
    """method=obs_diff method.granularity=structured builds the method of obs_diff_structured;
    a key of the other granularity is an error naming it, not silently ignored."""
    assert type(obs_diff(0.3)) is OBSDiff
    m = obs_diff(0.3, granularity="structured", exclude_first_last=True, rrf_k=30, num_groups=2)
    assert type(m) is OBSDiffStructured
    assert (m.exclude_first_last, m.rrf_k, m.num_groups, m.name) == (True, 30, 2, "obs_diff")
    for kwargs, key in (({"granularity": "structured", "blocks": [0, 2]}, "method.blocks"),
                        ({"granularity": "structured", "keep_backup": True}, "method.keep_backup"),
                        ({"no_compensate": True}, "method.no_compensate")):
        with pytest.raises(ConfigError) as e:
            obs_diff(0.3, **kwargs)
        assert e.value.key == key
    with pytest.raises(ConfigError) as e:
        OBSDiffStructured(0.3, keep_backup=True)
    assert e.value.key == "method.keep_backup"


def test_needs_calibration_set(pipes):
    pipe = copy.deepcopy(pipes["sd15"])
    with pytest.raises(ConfigError) as e:
        Wanda(sparsity=0.5).apply(pipe, ApplyContext(family="sd15", gen=GEN, calib=None))
    assert e.value.key == "calib"
    Magnitude(sparsity=0.5).apply(pipe, ApplyContext(family="sd15", gen=GEN, calib=None))


def test_resolve_settings_priority():
    class C:
        num_prompts, guidance_scale, height = 10, 7.0, 512

    s = resolve_settings(
        {"height": 64, "seed": None}, C(), {"height": 16, "width": 16, "num_inference_steps": 5}
    )
    assert (s.num_prompts, s.guidance_scale, s.height, s.width, s.num_inference_steps) == (
        10,
        7.0,
        64,
        16,
        5,
    )
    assert s.batch_size == 4 and s.seed == 24432  # paper defaults when nobody sets them


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "obs_diff", "dsnot"])
def test_method_configs_instantiate(name, compose_job):
    from hydra.utils import instantiate

    cfg = compose_job([f"method={name}", "sparsity=0.7"])  # configs share conf/method_base/
    method = instantiate(cfg.method)
    assert method.sparsity == 0.7 and method.name == name
    assert "0.7" in method.tag


def test_captions_file(tmp_path):
    from edm.data.calib import CaptionsFile

    tsv = tmp_path / "gcc.tsv"
    tsv.write_text("a dog on a beach\thttp://x/1\nred car\thttp://x/2\nthird one\thttp://x/3\n")
    items = CaptionsFile(str(tsv), "gcc3m_tsv", num_prompts=2, seed=5).load()
    assert [i.prompt for i in items] == ["a dog on a beach", "red car"]
    assert [i.seed for i in items] == [5, 6]
    js = tmp_path / "coco.json"
    js.write_text(json.dumps({"annotations": [{"caption": " A cat. "}, {"caption": "Two men"}]}))
    assert [i.prompt for i in CaptionsFile(str(js), "coco_json", num_prompts=5).load()] == [
        "A cat.",
        "Two men",
    ]
    with pytest.raises(ConfigError) as e:
        CaptionsFile(str(tmp_path / "missing.tsv")).check()
    assert e.value.key == "calib.path"
    with pytest.raises(ConfigError):
        CaptionsFile(str(tsv), format="csv")
    for name in ("gcc3m", "coco_train"):
        node = OmegaConf.load(ROOT / "conf/calib" / f"{name}.yaml")
        assert node._target_ == "edm.data.calib.CaptionsFile" and node.num_prompts == 100


def test_digits_architecture():
    """The embedded model (the shipped checkpoint, or its random-init architecture)."""
    comps = pytest.importorskip("edm.digits.components")
    from edm.digits.loader import DigitsLoader
    from edm.digits.pipeline import DigitsPipeline
    from edm.errors import MissingWeightsError

    try:
        pipe = DigitsLoader().load("digits", "fp32", "cpu")
    except MissingWeightsError:
        pipe = DigitsPipeline(**comps.build_components(comps.default_config("small")))
    pipe.set_progress_bar_config(disable=True)
    gen = {
        "num_inference_steps": 4,
        "guidance_scale": 1.5,
        "height": 16,
        "width": 16,
        "batch_size": 4,
    }
    rep = OBSDiff(sparsity=0.6).apply(
        pipe, ApplyContext(family="digits", gen=gen, calib=Prompts(4))
    )
    assert rep.sparsity == pytest.approx(0.6, abs=0.01)
    assert rep.details["steps_seen"] == list(range(4))
    assert rep.details["calibration"]["height"] == 16
    assert _no_hooks(pipe.unet)
