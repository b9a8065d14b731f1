"""Structured pruning (attention heads, FFN / MLP neurons) on FLUX.1 (issue 12).

Both block types on a tiny ``FluxTransformer2DModel`` built from a config: targets and units,
masked == physically sliced, the single-stream column layout of ``proj_out`` (heads at offset 0,
MLP neurons at offset ``inner_dim``), structured OBS on the shared ``proj_out`` (rank inside the
target's range, compensate over every surviving column), and ``method=l1`` /
``method=obs_diff_structured`` on ``model=tiny_flux`` through the runner.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from helpers import FixedHessian

from edm.errors import ConfigError, UnsupportedFamily
from edm.methods.base import ApplyContext
from edm.methods.weight import structured as K
from edm.methods.weight.calibrate import Calibration
from edm.methods.weight.l1 import L1Norm, l1_scores
from edm.methods.weight.obs_diff_structured import OBSDiffStructured, obs_prune_target
from edm.methods.weight.slicing import (
    mask_target,
    resolve_exclude_first_last,
    slice_targets,
    structured_targets,
    structured_units,
)

HEADS, HEAD_DIM = 4, 8
DIM = HEADS * HEAD_DIM  # 32; FFN / single-stream MLP width 4 * DIM = 128


def tiny_flux_transformer(seed: int = 0):
    """2 double-stream + 3 single-stream blocks, 4 heads of 8 (rotary axes sum to the head dim)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=24,
            pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def flux_call(model):
    """One denoiser call as FluxPipeline makes it (packed tokens, rotary ids, t in [0, 1])."""
    g = torch.Generator().manual_seed(1)
    n_img, n_txt = 16, 5
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(n_img, 1), ids.reshape(-1, 2).float()], 1)
    kw = {"hidden_states": torch.randn(2, n_img, 16, generator=g),
          "encoder_hidden_states": torch.randn(2, n_txt, 24, generator=g),
          "pooled_projections": torch.randn(2, 16, generator=g),
          "timestep": torch.tensor([0.3, 0.8]), "guidance": torch.tensor([3.5, 3.5]),
          "img_ids": img_ids, "txt_ids": torch.zeros(n_txt, 3)}
    return lambda: model(**kw).sample


def hook_hessians(model, call, layers):
    """H = 2 X X^T / n of each layer's input, from one forward (stand-in for calibration)."""
    H, handles = {}, []
    for name, lin in layers:
        def hook(_m, inp, _out, name=name):
            X = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[name] = (2 * X.T @ X / X.shape[0]).float()
        handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        call()
    for h in handles:
        h.remove()
    return H


def _of_stage(targets, stage):
    prefix = "transformer_blocks." if stage == "double" else "single_transformer_blocks."
    return [t for t in targets if t.name.startswith(prefix)]


# ---------------------------------------------------------------- targets
def test_targets_of_both_block_types_and_units():
    model = tiny_flux_transformer()
    targets = structured_targets(model, "flux", exclude_first_last=False)
    by = {t.name: t for t in targets}
    joint = by["transformer_blocks.0.attn"]
    assert [n for n, _ in joint.consumers] == ["transformer_blocks.0.attn.to_out.0",
                                               "transformer_blocks.0.attn.to_add_out"]
    assert len(joint.producers) == 6 and joint.num_groups == HEADS and joint.span is None
    for ff in ("ff", "ff_context"):  # GELU(tanh): one producer row per neuron
        t = by[f"transformer_blocks.1.{ff}"]
        assert t.num_groups == 4 * DIM and not t.producers[0][2]
    heads, mlp = by["single_transformer_blocks.0.attn"], by["single_transformer_blocks.0.proj_mlp"]
    assert (heads.kind, heads.group, heads.span, heads.num_groups) == \
        ("heads", "attn", (0, DIM), HEADS)
    assert (mlp.kind, mlp.group, mlp.span, mlp.num_groups) == \
        ("ffn", "ff", (DIM, 5 * DIM), 4 * DIM)
    proj_out = model.single_transformer_blocks[0].proj_out
    assert heads.consumers[0][1] is mlp.consumers[0][1] is proj_out
    assert heads.siblings == [mlp] and mlp.siblings == [heads]
    assert [n for n, _, _ in heads.producers] == [f"single_transformer_blocks.0.attn.to_{p}"
                                                   for p in "qkv"]
    assert [t.layer_index for t in targets] == sorted(t.layer_index for t in targets)  # in order
    units = [[n for n, _ in u] for u in structured_units(targets)]
    assert ["transformer_blocks.1.ff.net.2", "transformer_blocks.1.ff_context.net.2"] in units
    assert units.count(["single_transformer_blocks.0.proj_out"]) == 1  # shared consumer, one unit
    assert len(units) == 2 * 2 + 3  # double: heads, ff + ff_context; single: proj_out
    # target groups: single-stream heads are attn, MLP neurons ff; context only in double blocks
    ff_only = structured_targets(model, "flux", exclude_first_last=False, groups=("ff",))
    assert {t.kind for t in ff_only} == {"ffn"} and len(ff_only) == 2 + 3
    ctx = structured_targets(model, "flux", exclude_first_last=False, groups=("context",))
    assert [t.name for t in ctx] == [f"transformer_blocks.{i}.ff_context" for i in (0, 1)]
    assert all(not t.siblings for t in ff_only)  # alone on proj_out: owns only its range


def test_exclude_first_last_follows_mmdit_over_all_blocks():
    """Default (None) as MMDiT: first and last block of the forward order (double then single)."""
    assert resolve_exclude_first_last(None, "flux") is True
    model = tiny_flux_transformer()
    names = {t.name for t in structured_targets(model, "flux")}
    assert not any(n.startswith(("transformer_blocks.0.", "single_transformer_blocks.2."))
                   for n in names)
    assert {"transformer_blocks.1.attn", "single_transformer_blocks.1.proj_mlp"} <= names
    assert {t.layer_index for t in structured_targets(model, "flux")} == {1, 2, 3}


# ---------------------------------------------------------------- masked == sliced
@pytest.mark.parametrize("stage", ["double", "single"])
@pytest.mark.parametrize("mode", ["mask", "obs"])
def test_masked_equals_sliced(stage, mode):
    model = tiny_flux_transformer()
    call = flux_call(model)
    with torch.no_grad():
        dense = call()
    targets = _of_stage(structured_targets(model, "flux", exclude_first_last=False), stage)
    if mode == "mask":
        g = torch.Generator().manual_seed(2)
        for t in targets:
            mask_target(t, torch.randperm(t.num_groups, generator=g)[: t.num_groups // 2].tolist())
    else:
        H = hook_hessians(model, call, [nl for t in targets for nl in t.consumers])
        for t in targets:  # forward order: a single block's heads, then its MLP neurons
            obs_prune_target(t, H, 0.5)
    with torch.no_grad():
        masked = call()
    n_before = sum(p.numel() for p in model.parameters())
    slice_targets(targets)
    with torch.no_grad():
        sliced = call()
    assert sum(p.numel() for p in model.parameters()) < n_before
    assert not torch.allclose(dense, masked)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    for t in targets:
        assert t.num_groups == t.info["kept"] and not t.pruned
        if t.kind == "heads":
            assert t.module.heads == 2 and t.module.to_q.out_features == 2 * HEAD_DIM


def test_single_stream_slicing_layout():
    """A removed head drops its q/k/v rows and proj_out columns [h*d, (h+1)*d); a removed MLP
    neuron drops its proj_mlp row and proj_out column inner_dim + i."""
    model = tiny_flux_transformer()
    block = model.single_transformer_blocks[1]
    targets = [t for t in structured_targets(model, "flux", exclude_first_last=False)
               if t.name.startswith("single_transformer_blocks.1.")]
    heads, mlp = targets
    old = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in
           [("q", block.attn.to_q), ("k", block.attn.to_k), ("v", block.attn.to_v),
            ("mlp", block.proj_mlp), ("out", block.proj_out)]}
    mask_target(heads, [1, 3])
    mask_target(mlp, [0, 5, 127])
    assert torch.all(block.proj_out.weight[:, [8, 15, 24, 31, DIM, DIM + 5, 5 * DIM - 1]] == 0)
    slice_targets(targets)
    rows = torch.tensor([*range(8), *range(16, 24)])  # heads 0 and 2 kept
    mlp_rows = torch.tensor([i for i in range(4 * DIM) if i not in (0, 5, 127)])
    for p, lin in (("q", block.attn.to_q), ("k", block.attn.to_k), ("v", block.attn.to_v)):
        assert torch.equal(lin.weight, old[p][0][rows]) and torch.equal(lin.bias, old[p][1][rows])
    assert torch.equal(block.proj_mlp.weight, old["mlp"][0][mlp_rows])
    assert torch.equal(block.proj_mlp.bias, old["mlp"][1][mlp_rows])
    cols = torch.cat([rows, DIM + mlp_rows])
    assert torch.equal(block.proj_out.weight, old["out"][0][:, cols])
    assert torch.equal(block.proj_out.bias, old["out"][1])  # output width unchanged
    assert (block.attn.heads, block.attn.inner_dim, block.attn.head_dim) == (2, 16, HEAD_DIM)
    assert block.proj_out.in_features == 16 + 125 and block.mlp_hidden_dim == 125
    assert list(block.proj_out._tp_packed_row_blocks) == [16, 125]
    # the MLP target's range moved down with the removed head columns
    assert (heads.span, mlp.span, heads.num_groups, mlp.num_groups) == ((0, 16), (16, 141), 2, 125)


# ---------------------------------------------------------------- structured OBS on proj_out
def test_span_solve_is_least_squares_refit_of_the_whole_layer():
    """Heads ranked in columns [0, 32), then neurons in [32, 48) with the heads' columns
    removed: the result (no damping) is the least-squares refit of W X on every kept column of
    the layer, attention and MLP alike (nested OBS projections compose)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(48, 48, generator=g) / 48**0.5
    X = A @ torch.randn(48, 3000, generator=g) + 0.1 * torch.randn(48, 3000, generator=g)
    X = X.double()
    W = torch.randn(12, 48, dtype=torch.float64, generator=g)
    H = 2 * X @ X.T / X.shape[1]
    heads = K.obs_prune_structured(W.float(), H.float(), 2, group_size=8, percdamp=0.0,
                                   span=(0, 32))
    gone = K._expand(heads.pruned, 8)
    neurons = K.obs_prune_structured(heads.W, H.float(), 6, group_size=1, percdamp=0.0,
                                     span=(32, 48), removed=gone)
    kept = torch.ones(48, dtype=torch.bool)
    kept[gone] = False
    kept[32 + neurons.pruned] = False
    assert int(kept.sum()) == 48 - 16 - 6 and torch.all(neurons.W[:, ~kept] == 0)
    Xk = X[kept]
    W_opt = (W @ X @ Xk.T) @ torch.linalg.inv(Xk @ Xk.T)
    assert torch.allclose(neurons.W[:, kept].double(), W_opt, rtol=1e-3, atol=1e-3)
    # the sub-block solve (H restricted to the MLP columns) refits fewer columns: never better
    sub = heads.W.clone()
    sub[:, 32:] = K.obs_prune_structured(heads.W[:, 32:], H[32:, 32:].float(), 6, 1,
                                         percdamp=0.0).W
    assert K.reconstruction_error(W, neurons.W, H) <= K.reconstruction_error(W, sub, H) + 1e-6


def test_obs_on_proj_out_beats_l1_and_no_compensate():
    """On the same calibration forward, OBS (compensated) leaves a smaller reconstruction error
    on each single-stream proj_out than the same ranking without compensation and than L1."""
    errors = {}
    for mode in ("obs", "no_compensate", "l1"):
        model = tiny_flux_transformer()
        call = flux_call(model)
        targets = _of_stage(structured_targets(model, "flux", exclude_first_last=False), "single")
        outs = {n: lin for t in targets for n, lin in t.consumers}
        W0 = {n: lin.weight.detach().clone() for n, lin in outs.items()}
        H = hook_hessians(model, call, list(outs.items()))
        for t in targets:
            if mode == "l1":
                k = t.num_to_prune(0.5)
                mask_target(t, torch.argsort(l1_scores(t))[:k].tolist())
            else:
                obs_prune_target(t, H, 0.5, no_compensate=mode == "no_compensate")
        for n, lin in outs.items():
            assert int((lin.weight == 0).all(0).sum()) == HEADS // 2 * HEAD_DIM + 2 * DIM
        errors[mode] = {n: K.reconstruction_error(W0[n], lin.weight.detach(), H[n])
                        for n, lin in outs.items()}
    for n in errors["obs"]:
        assert errors["obs"][n] < errors["no_compensate"][n], n
        assert errors["obs"][n] < errors["l1"][n], n


def test_obs_method_prunes_both_targets_of_a_shared_proj_out():
    """The package loop gives proj_out's Hessian to the heads and then the MLP target (it is
    freed only after both), and the report counts proj_out once."""
    model = tiny_flux_transformer()
    call = flux_call(model)

    class HookCalibrated(OBSDiffStructured):
        def calibrate(self, pipe, layers, items, settings):
            H = hook_hessians(model, call, layers)
            return Calibration(stats={n: FixedHessian(h) for n, h in H.items()})

    method = HookCalibrated(0.5, num_groups=2, calibration={"num_prompts": 1})
    pipe = types.SimpleNamespace(transformer=model, edm_family="flux")
    report = method.apply(pipe, ApplyContext(family="flux",
                                             calib=types.SimpleNamespace(load=lambda: ["-"])))
    d = report.details
    assert d["num_targets"] == d["patched"] == 3 + 2 * 2  # double 1: 3; singles 0, 1: 2 each
    assert d["kept"]["single_transformer_blocks.1.attn"] == 2
    assert d["kept"]["single_transformer_blocks.1.proj_mlp"] == 2 * DIM
    assert 0.4 < d["sparsity"] < 0.6 and d["params_after"] < d["params_before"]
    with torch.no_grad():
        assert torch.isfinite(call()).all()


def test_rejected_combinations_name_the_key():
    with pytest.raises(ConfigError, match="<method.keep_backup>"):
        L1Norm(0.3, keep_backup=True)
    with pytest.raises(ConfigError, match="<method.targets>"):
        OBSDiffStructured(0.3, targets=["attn", "mlp"])  # single-stream MLP neurons are "ff"
    for m in (L1Norm(0.3), OBSDiffStructured(0.3)):
        m.check("flux")  # both structured methods opt in to FLUX
    from edm.methods.weight.diff_pruning import DiffPruning

    with pytest.raises(UnsupportedFamily, match="'flux'"):
        DiffPruning(0.3).check("flux")  # torch-pruning on UNets only


# ---------------------------------------------------------------- end to end (runner)
@pytest.mark.parametrize("method", ["l1", "obs_diff_structured"])
def test_tiny_flux_structured_end_to_end(compose_cfg, method):
    """run.py model=tiny_flux method=...: fewer parameters and FLOPs than the dense model, the
    pruned model saved and reloadable with model.pruned_from."""
    from edm import perf
    from edm.data.images import PromptItem
    from edm.methods.weight.io import apply_pruned_from
    from edm.models.tiny import tiny_flux
    from edm.runner import run

    extra = ["calib.num_prompts=2", "method.num_groups=2"] if method != "l1" else []
    cfg = compose_cfg("model=tiny_flux", f"method={method}", "sparsity=0.5", "logger=none",
                      "data.num_prompts=2", "gen.batch_size=2", *extra)
    run(cfg)
    out = Path(cfg.paths.output_dir)
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["method/patched"] > 0 and 0.3 < m["method/sparsity"] < 0.7
    assert m["method/params_after"] < m["method/params_before"]
    assert m["perf/params_m"] < m["perf/dense_params_m"] and m["perf/images_generated"] == 2
    dense = tiny_flux()
    gen = dict(cfg.gen)
    dense_flops = perf.flops_per_step(dense, PromptItem(0, "a cat", seed=0), gen,
                                      guidance="distilled")
    assert m["perf/gflops_per_step"] < dense_flops["gflops_per_step"]
    info = apply_pruned_from(dense, out / "pruned_model")
    assert info["params"] == pytest.approx(m["method/params_after"])
    for blk in dense.transformer.single_transformer_blocks:  # reloaded attributes, not stale
        assert blk.mlp_hidden_dim == blk.proj_mlp.out_features
        assert list(blk.proj_out._tp_packed_row_blocks) == \
            [blk.attn.inner_dim, blk.mlp_hidden_dim]
        assert blk.proj_out.in_features == blk.attn.inner_dim + blk.mlp_hidden_dim
