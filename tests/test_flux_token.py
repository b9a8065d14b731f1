"""Token methods on FLUX.1 (issue 12): AT-EDM and ToMe on tiny_flux's double- and single-stream
blocks, the rotary positions of kept and merged tokens, FLOPs, and runs through the runner
(alone and after a weight method)."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch

from edm.errors import ConfigError
from edm.eval.flops import measure_denoiser_flops
from edm.families import adapter
from edm.methods.base import ApplyContext
from edm.methods.token import atedm_kernel as K
from edm.methods.token import tome as tome_module
from edm.methods.token.atedm import ATEDM
from edm.methods.token.dsap import DSAP
from edm.methods.token.flux_attn import FluxTokenAttnProcessor, gather_rotary
from edm.methods.token.tome import ToMe
from edm.runner import run

NO_DSAP = {"enabled": False}
FLUX = ApplyContext(family="flux")


@pytest.fixture(scope="module")
def pipe():
    from edm.models.tiny import tiny_flux

    p = tiny_flux()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def tr(pipe):
    """A copy of tiny_flux's transformer, called directly (tests may leave hooks on it)."""
    return copy.deepcopy(pipe.transformer)


def generate(pipe, prompts=("a cat", "a dog"), seeds=(0, 1), steps=2):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=3.5,
                    height=32, width=32, generator=gens, output_type="pt",
                    max_sequence_length=32).images


def call_inputs(tr, h=6, w=8, n_txt=5, batch=2, seed=0):
    """One transformer call's keyword arguments on a non-square h x w token grid."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    c = tr.config
    return {
        "hidden_states": torch.randn(batch, h * w, c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, n_txt, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 0.7),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32),
        "txt_ids": torch.zeros(n_txt, 3),
        "return_dict": False,
    }


def holder(tr):
    return types.SimpleNamespace(transformer=tr, scheduler=None, edm_family="flux")


METHODS = {
    "at_edm": lambda r: ATEDM(prune_ratio=r, dsap=NO_DSAP),
    "tome": lambda r: ToMe(ratio=r, seed=0),
    "tome_mlp": lambda r: ToMe(ratio=r, seed=0, merge_mlp=True),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_identity_removal_double_apply(pipe, name):
    dense = generate(pipe)
    zero = METHODS[name](0.0)
    assert zero.apply(pipe, FLUX).patched > 0
    assert torch.equal(generate(pipe), dense)  # ratio 0: bit-identical to dense
    zero.remove(pipe)
    m = METHODS[name](0.5)
    rep = m.apply(pipe, FLUX)
    once = generate(pipe)
    assert once.shape == dense.shape and torch.isfinite(once).all()
    assert not torch.equal(once, dense)
    assert m.run_metrics()["token_ratio_measured"] == pytest.approx(0.5)
    assert m.apply(pipe, FLUX).patched == rep.patched  # re-apply replaces, never stacks
    assert torch.equal(generate(pipe), once)
    m.remove(pipe)
    assert torch.equal(generate(pipe), dense)  # removal is bit-exact


# ------------------------------------------------------------------------- rotary positions


@pytest.mark.parametrize("stage", ["double", "single"])
def test_per_sample_rotary_attention(pipe, stage):
    """Our processor with the model's rotary repeated per sample equals diffusers' processor
    bit for bit; permuting each sample's image tokens together with their rotary rows permutes
    its output (attention is equivariant), and permuting the tokens alone does not."""
    tr = pipe.transformer
    blk = next(b for b in adapter("flux").attention_blocks(tr) if b.stage == stage).module
    attn, ref_proc = blk.attn, blk.attn.get_processor()
    inp = call_inputs(tr)
    n_img, n_txt, b = inp["hidden_states"].shape[1], 5, 2
    rot = tr.pos_embed(torch.cat([inp["txt_ids"], inp["img_ids"]]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n_img + (n_txt if stage == "single" else 0), attn.query_dim, generator=g)
    ctx = torch.randn(b, n_txt, attn.query_dim, generator=g) if stage == "double" else None
    ours = FluxTokenAttnProcessor(ref_proc)

    def img_out(proc, x, rotary):
        with torch.no_grad():
            out = proc(attn, x, ctx, None, rotary)
        return out[0] if stage == "double" else out[:, n_txt:]

    dense = img_out(ref_proc, x, rot)
    ident = torch.arange(n_img).expand(b, n_img)
    assert torch.equal(img_out(ours, x, gather_rotary(rot, n_txt, ident)), dense)
    perm = torch.stack([torch.randperm(n_img, generator=g) for _ in range(b)])
    xp = torch.cat([x[:, : x.shape[1] - n_img], K.gather_tokens(x[:, -n_img:], perm)], 1)
    moved = img_out(ours, xp, gather_rotary(rot, n_txt, perm))
    torch.testing.assert_close(moved, K.gather_tokens(dense, perm), rtol=1e-5, atol=1e-6)
    stale = img_out(ours, xp, gather_rotary(rot, n_txt, ident))
    assert not torch.allclose(stale, K.gather_tokens(dense, perm), atol=1e-3)


def _spy(monkeypatch, module, name, store):
    real = getattr(module, name)

    def spy(*a, **kw):
        out = real(*a, **kw)
        store.setdefault(name, []).append((a, out))
        return out

    monkeypatch.setattr(module, name, spy)


def test_pruned_run_equals_blocks_on_gathered_tokens(tr, monkeypatch):
    """AT-EDM prunes after double block 0: every later block of the pruned run equals
    diffusers' own block run per sample on the gathered image tokens with the gathered rotary
    rows (text rows first), bit for bit; the refill puts each kept token back at its raster
    position and the model output is ``proj_out(norm_out(refilled))``."""
    inp = call_inputs(tr)
    seen = {}
    blocks = [b.module for b in adapter("flux").attention_blocks(tr)]
    handles = [blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(temb=kw["temb"], rot=kw["image_rotary_emb"]),
        with_kwargs=True), blocks[0].register_forward_hook(lambda m, a, o: seen.update(out0=o))]
    _spy(monkeypatch, K, "keep_indices", seen)
    _spy(monkeypatch, K, "refill", seen)
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    rep = m.apply(holder(tr), FLUX)
    with torch.no_grad():
        pruned_out = tr(**inp)[0]
    m.remove(holder(tr))
    for h in handles:
        h.remove()
    assert rep.details["pruning_layers"] == ["transformer_blocks.0"]
    (_, keep), = seen["keep_indices"]
    ((kept_final, _), refilled), = seen["refill"]
    n_txt, n_img = inp["encoder_hidden_states"].shape[1], inp["hidden_states"].shape[1]
    assert keep.shape == (2, K.keep_count(n_img, 0.5)) and not torch.equal(keep[0], keep[1])
    cos, sin = tr.pos_embed(torch.cat([inp["txt_ids"], inp["img_ids"]]))
    assert torch.equal(seen["rot"][0], cos)  # block 0 saw the model's own rotary
    enc, hid = seen["out0"]  # block 0's output after pruning
    for b in range(2):
        rot_b = (torch.cat([cos[:n_txt], cos[n_txt:][keep[b]]]),
                 torch.cat([sin[:n_txt], sin[n_txt:][keep[b]]]))
        # the whole batch with sample b's rotary (diffusers' processors take one for all):
        # row b is exact, and the same GEMM shapes as the pruned run keep it bit-comparable
        e, x = enc, hid
        with torch.no_grad():
            for blk in blocks[1:]:  # diffusers' processors again: the method is removed
                e, x = blk(hidden_states=x, encoder_hidden_states=e, temb=seen["temb"],
                           image_rotary_emb=rot_b)
        assert torch.equal(x[b], kept_final[b])
        assert torch.equal(refilled[b, keep[b]], kept_final[b])  # back in raster order
    with torch.no_grad():
        assert torch.equal(pruned_out, tr.proj_out(tr.norm_out(refilled, seen["temb"])))


def test_tome_merged_tokens_take_their_destinations_rotary(tr, monkeypatch):
    """In every merged attention call the rotary rows are the text rows, then, per merged slot,
    the row of the token that slot is (unmerge reads that token back from its own slot): the
    destination for a merged group, the token itself otherwise."""
    inp = call_inputs(tr)  # 6 x 8 grid from img_ids
    calls = []
    real = FluxTokenAttnProcessor.__call__

    def spy(self, attn, x, ctx=None, mask=None, rotary=None):
        calls.append(rotary)
        return real(self, attn, x, ctx, mask, rotary)

    monkeypatch.setattr(FluxTokenAttnProcessor, "__call__", spy)
    seen = {}
    _spy(monkeypatch, tome_module, "bipartite_merge", seen)
    m = ToMe(ratio=0.5, seed=0)
    m.apply(holder(tr), FLUX)
    with torch.no_grad():
        tr(**inp)
    m.remove(holder(tr))
    cos, _ = tr.pos_embed(torch.cat([inp["txt_ids"], inp["img_ids"]]))
    n_txt, n_img = 5, 48
    assert len(calls) == len(seen["bipartite_merge"]) == 4  # 2 double + 2 single blocks
    for rotary, (_, (_, unmerge, order)) in zip(calls, seen["bipartite_merge"], strict=True):
        assert rotary[0].shape == (2, n_txt + n_img - n_img // 2, cos.shape[1])
        slots = torch.arange(order.shape[1], dtype=torch.float32).expand(2, -1)[..., None]
        own = unmerge(slots)[..., 0].long().gather(1, order)  # the slot each token reads
        assert torch.equal(own, torch.arange(order.shape[1]).expand(2, -1))
        for b in range(2):
            assert torch.equal(rotary[0][b], torch.cat([cos[:n_txt], cos[n_txt:][order[b]]]))


def test_tome_grid_comes_from_img_ids(tr):
    """The 2x2 destination cells need the raster grid: a 6 x 8 grid is read from img_ids, and
    ids that are not a raster grid (e.g. an appended reference image) are an error, not a
    silent wrong grid. merge_mlp alone (no attention merge) runs too."""
    inp = call_inputs(tr)
    with torch.no_grad():
        dense = tr(**inp)[0]
    m = ToMe(ratio=0.5, seed=0, merge_attn=False, merge_mlp=True)
    rep = m.apply(holder(tr), FLUX)
    assert [layer["merged"] for layer in rep.details["layers"]] == \
        [["ff"], ["ff"], ["proj_mlp"], ["proj_mlp"]]
    with torch.no_grad():
        out = tr(**inp)[0]
        assert out.shape == dense.shape and not torch.equal(out, dense)
        bad = dict(inp, img_ids=inp["img_ids"].flip(0))
        with pytest.raises(RuntimeError, match="not a raster grid"):
            tr(**bad)
    m.remove(holder(tr))


# ------------------------------------------------------------------------------ FLOPs, CFG


def _flops(pipe, method=None, prompts=("a cat", "a dog"), steps=1) -> float:
    """Mean FLOPs per transformer call of one pipeline run (``method`` applied meanwhile)."""
    if method is not None:
        method.apply(pipe, FLUX)
    try:
        calls = measure_denoiser_flops(pipe, prompt=list(prompts), num_inference_steps=steps,
                                       height=32, width=32, output_type="pt",
                                       max_sequence_length=32)
    finally:
        if method is not None:
            method.remove(pipe)
    return sum(calls) / len(calls)


def test_flops_drop(pipe):
    dense = _flops(pipe)
    f = {n: _flops(pipe, METHODS[n](0.5)) / dense for n in METHODS}
    # measured on tiny_flux (64 image + 32 text tokens, 4 blocks): 0.684 / 0.703 / 0.622
    assert f["at_edm"] < 0.75 and f["tome_mlp"] < f["tome"] < 0.75, f
    assert _flops(pipe, ATEDM(prune_ratio=0.8, dsap=NO_DSAP)) / dense < f["at_edm"]


@pytest.mark.slow
def test_full_size_flux_flops_on_meta():
    """FLUX.1-dev at 1024² (4096 image + 512 text tokens, 19 + 38 blocks) on the meta device:
    AT-EDM's default (63 % pruned after double block 0) and ToMe at 0.5 (square grid assumed:
    meta ids have no values). Dense is 74.38 TFLOPs per call."""
    from edm.eval.flops import meta_denoiser_flops, meta_pipe

    meta, inputs = meta_pipe("flux_dev", 1024, 1024)
    dense = meta_denoiser_flops(meta.transformer, inputs)
    ratios = {}
    for name, m in (("at_edm", ATEDM(dsap=NO_DSAP)), ("tome", ToMe(ratio=0.5)),
                    ("tome_mlp", ToMe(ratio=0.5, merge_mlp=True))):
        m.apply(meta, FLUX)
        ratios[name] = meta_denoiser_flops(meta.transformer, inputs) / dense
        m.remove(meta)
    assert ratios == pytest.approx({"at_edm": 0.402, "tome": 0.778, "tome_mlp": 0.620}, abs=2e-3)


def test_no_cfg_pair_on_flux(pipe, monkeypatch):
    """FLUX.1 is guidance-distilled: two samples with equal latents (same seed) are not a CFG
    pair, so AT-EDM does not share their mask."""
    calls = []
    real = K.keep_indices
    monkeypatch.setattr(K, "keep_indices",
                        lambda s, k, cfg_shared=False: calls.append(cfg_shared) or real(s, k))
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    m.apply(pipe, FLUX)
    generate(pipe, prompts=("a cat", "a cat"), seeds=(0, 0), steps=1)
    m.remove(pipe)
    assert calls and not any(calls)


def test_progressive_points_and_early_refill():
    """Pruning after double block 0 and single block 0 (its map comes from the single-stream
    [text, image] attention on already pruned tokens) and a refill before the last block: the
    blocks see n, k1, k1, k2, n image tokens."""
    from edm.models.tiny import tiny_flux

    pipe = tiny_flux(num_single_layers=3)
    pipe.set_progress_bar_config(disable=True)
    blocks = [b.module for b in adapter("flux").attention_blocks(pipe.transformer)]
    seen = {i: [] for i in range(5)}
    for i, b in enumerate(blocks):  # a fresh pipe: hooks may stay
        b.register_forward_pre_hook(
            lambda mod, a, kw, i=i: seen[i].append(kw["hidden_states"].shape[1]), with_kwargs=True)
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, mmdit_prune_after=[0, 2], mmdit_refill_after=3,
              head_reduce="rms")
    rep = m.apply(pipe, FLUX)
    img = generate(pipe, steps=1)
    n = seen[0][0]
    k1 = K.keep_count(n, 0.5)
    assert [seen[i][0] for i in range(5)] == [n, k1, k1, K.keep_count(k1, 0.5), n]
    assert rep.details["pruning_layers"] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert torch.isfinite(img).all()


def test_single_stream_map_is_the_rotary_image_image_attention(tr, monkeypatch):
    """The G-WPR map of a single-stream block: its attention over [text, image] with the
    rotary applied, image queries x image keys, rows renormalised (heads summed first)."""
    from diffusers.models.embeddings import apply_rotary_emb

    inp = call_inputs(tr)
    blk = tr.single_transformer_blocks[0]
    seen = {}
    blk.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw=kw), with_kwargs=True)
    _spy(monkeypatch, K, "gwpr", seen)
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, mmdit_prune_after=[2])  # single block 0
    m.apply(holder(tr), FLUX)
    with torch.no_grad():
        tr(**inp)
    m.remove(holder(tr))
    ((A, _), _), = seen["gwpr"]
    kw, attn, t = seen["kw"], blk.attn, inp["encoder_hidden_states"].shape[1]
    with torch.no_grad():
        x, _ = blk.norm(torch.cat([kw["encoder_hidden_states"], kw["hidden_states"]], 1),
                        emb=kw["temb"])
        q, k = (norm(proj(x).unflatten(-1, (-1, attn.head_dim))) for proj, norm in
                ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)))
        q, k = (apply_rotary_emb(t_, kw["image_rotary_emb"], sequence_dim=1).transpose(1, 2)
                for t_ in (q, k))
        P = (q @ k.transpose(-1, -2) / attn.head_dim**0.5).softmax(-1)[:, :, t:, t:].sum(1)
    torch.testing.assert_close(A, P / P.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,key,allowed", [
    (lambda: ATEDM(score_source="cross"), "method.score_source", ["self"]),
    (lambda: ATEDM(prune_point="after_self_attn"), "method.prune_point", ["auto", "after_ffn"]),
    (lambda: ATEDM(map_output="kept_fused"), "method.map_output", ["auto", "reuse"]),
    (lambda: ATEDM(downsamples=[1]), "method.downsamples", [None]),
    (lambda: ToMe(merge_crossattn=True), "method.merge_crossattn", [False]),
])
def test_unsupported_knobs_on_flux_are_config_errors(pipe, make, key, allowed):
    method = make()
    method.check("sdxl")  # fine elsewhere
    with pytest.raises(ConfigError, match=f"<{key}>") as err:
        method.check("flux")
    assert err.value.allowed == allowed
    with pytest.raises(ConfigError, match=f"<{key}>"):
        method.apply(pipe, FLUX)
    # (FluxPipeline's cache_context leaves an empty registry on the transformer: not ours)
    assert not any(getattr(mod, "_diffusers_hook", None) and mod._diffusers_hook.hooks
                   for mod in pipe.transformer.modules())


def test_dsap_never_exempts_flux_blocks(pipe):
    blocks = adapter("flux").attention_blocks(pipe.transformer)
    for rule in ("first_down_last_up", "first_down_last_up_mid", "none"):
        assert not any(DSAP(block_rule=rule).exempt(b) for b in blocks)
    assert all(DSAP(block_rule="all").exempt(b) for b in blocks)


@pytest.mark.parametrize("overrides,ratio_key,ratio", [
    (["method=at_edm"], "method/token_ratio_measured", 0.625),  # 64 tokens: keep 24 of 64
    (["method=tome"], "method/token_ratio_measured", 0.5),
    (["method=obs_diff", "then=at_edm", "calib.num_prompts=2"],
     "method/at_edm/token_ratio_measured", 0.625),
    (["method=obs_diff", "then=tome", "calib.num_prompts=2"],
     "method/tome/token_ratio_measured", 0.5),
])
def test_runner_end_to_end(pipe, compose_cfg, overrides, ratio_key, ratio):
    cfg = compose_cfg("model=tiny_flux", "logger=none", "data.num_prompts=2", "gen.batch_size=2",
                      *overrides)
    run(cfg)
    m = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    assert m["perf/images_generated"] == 2 and m[ratio_key] == pytest.approx(ratio)
    # the runner counts one prompt with the model config's steps and text length
    assert m["perf/gflops_per_step"] < _flops(pipe, prompts=("a cat",), steps=2) / 1e9

