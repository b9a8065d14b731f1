"""AT-EDM wiring on every family: removability, kept-token shapes, prune points, CFG mask
sharing, DSAP. Kernels, constructor errors, configs and FLOPs: test_atedm_kernel.py."""

from __future__ import annotations

import pytest
import torch

from edm.errors import ConfigError, NothingPatchedError
from edm.families import adapter
from edm.methods.base import ApplyContext
from edm.methods.token import atedm_kernel as K
from edm.methods.token.atedm import ATEDM
from edm.methods.token.dsap import DSAP

NO_DSAP = {"enabled": False}


def row_stochastic(b, n, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(b, n, n, generator=g)).softmax(-1)


# --------------------------------------------------------------------------- wiring


@pytest.fixture(scope="module")
def pipes(tiny_pipes):
    return tiny_pipes


def generate(pipe, family, guidance=3.0, steps=2):
    size = 16 if family == "digits" else 32
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        return pipe(
            prompt=["a cat", "a dog"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=gens,
            output_type="pt",
        ).images


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "digits"])
def test_identity_removal_double_apply(pipes, family):
    pipe = pipes[family]
    ctx = ApplyContext(family=family)
    dense = generate(pipe, family)
    zero = ATEDM(prune_ratio=0.0)
    assert zero.apply(pipe, ctx).patched > 0
    assert torch.equal(generate(pipe, family), dense)  # ratio 0: bit-identical to dense
    zero.remove(pipe)
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    rep = m.apply(pipe, ctx)
    once = generate(pipe, family)
    assert once.shape == dense.shape and torch.isfinite(once).all()
    assert not torch.equal(once, dense)
    assert m.apply(pipe, ctx).patched == rep.patched  # re-apply replaces, never stacks
    assert torch.equal(generate(pipe, family), once)
    m.remove(pipe)
    assert torch.equal(generate(pipe, family), dense)  # removal is bit-exact
    expected = "after_ffn" if family in ("sdxl", "sd3") else "after_self_attn"
    assert rep.details["prune_point"] == expected


def _record_lengths(module, store, key):
    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        store.setdefault(key, []).append(x.shape[1])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_kept_tokens_shorten_the_next_layer_sdxl(pipes):
    """after_ffn: layer 1 of a 2-layer block sees k tokens; the block output is a full grid."""
    pipe = pipes["sdxl"]
    blk = next(b for b in adapter("sdxl").attention_blocks(pipe.unet) if len(b.layers) == 2)
    seen, handles = {}, []
    handles.append(_record_lengths(blk.layers[0][1], seen, "l0"))
    handles.append(_record_lengths(blk.layers[1][1], seen, "l1"))
    out = {}
    handles.append(
        blk.module.register_forward_hook(lambda m, a, o: out.update(shape=o[0].shape))
    )  # returns None: output untouched
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    m.apply(pipe, ApplyContext(family="sdxl"))
    try:
        generate(pipe, "sdxl", steps=1)
    finally:
        m.remove(pipe)
        for h in handles:
            h.remove()
    n = seen["l0"][0]
    assert seen["l1"][0] == K.keep_count(n, 0.5) < n
    assert out["shape"][-2] * out["shape"][-1] == n


def test_after_self_attn_runs_cross_attention_on_kept_tokens(pipes):
    pipe = pipes["sd15"]
    lay = adapter("sd15").attention_blocks(pipe.unet)[0].layers[0][1]
    seen = {}
    hs = [
        _record_lengths(lay.attn1, seen, "attn1"),
        _record_lengths(lay.attn2, seen, "attn2"),
        _record_lengths(lay.ff, seen, "ff"),
    ]
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    m.apply(pipe, ApplyContext(family="sd15"))
    try:
        generate(pipe, "sd15", steps=1)
    finally:
        m.remove(pipe)
        for h in hs:
            h.remove()
    n = seen["attn1"][0]  # the hook's full-token call comes first
    k = K.keep_count(n, 0.5)
    assert seen["attn1"] == [n, k]  # then the layer's own call, answered from the same map
    assert seen["attn2"] == [k] and seen["ff"] == [k]


def test_map_output_reuse_and_kept_fused_agree(pipes):
    """after_self_attn: P·V from the map and fused SDPA on the kept rows give the same result."""
    pipe = pipes["sd15"]
    dense = generate(pipe, "sd15", steps=1)
    outs = {}
    for mode in ("reuse", "kept_fused"):
        m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, map_output=mode)
        rep = m.apply(pipe, ApplyContext(family="sd15"))
        try:
            outs[mode] = generate(pipe, "sd15", steps=1)
        finally:
            m.remove(pipe)
        assert rep.details["map_output"] == mode
    assert not torch.equal(outs["reuse"], dense)
    assert torch.allclose(outs["reuse"], outs["kept_fused"], atol=1e-4)
    with pytest.raises(ConfigError):
        ATEDM(map_output="kept_fused").apply(pipes["sdxl"], ApplyContext(family="sdxl"))
    # auto: kept rows only with the attention refill; cosine needs every post-attention state
    for assignment, expected in (("attention", "kept_fused"), ("cosine", "reuse")):
        m = ATEDM(prune_ratio=0.5, assignment=assignment)
        assert m.apply(pipe, ApplyContext(family="sd15")).details["map_output"] == expected
        m.remove(pipe)


def test_small_ratio_is_near_dense_on_the_shipped_digits_model():
    """Wiring check with the trained weights: pruning 2 % of the tokens (cosine refill) barely
    changes the images, and more pruning changes them more."""
    from edm.digits import DigitsLoader

    try:
        pipe = DigitsLoader().load()
    except Exception as e:  # noqa: BLE001 - no shipped checkpoint: nothing to check
        pytest.skip(f"digits checkpoint unavailable: {e}")

    def run(ratio=None):
        m = None
        if ratio is not None:
            m = ATEDM(prune_ratio=ratio, dsap=NO_DSAP, assignment="cosine")
            m.apply(pipe, ApplyContext(family="digits"))
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        try:
            prompts = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")]
            return pipe(
                prompt=prompts,
                num_inference_steps=10,
                guidance_scale=1.5,
                generator=gens,
                output_type="pt",
            ).images
        finally:
            if m is not None:
                m.remove(pipe)

    dense = run()
    small = (run(0.02) - dense).abs().mean().item()
    large = (run(0.3) - dense).abs().mean().item()
    assert 0 < small < 0.02 and small < large  # measured: 0.007-0.008 and 0.07-0.08


def test_mmdit_prunes_image_tokens_inside_the_range():
    from edm.models.tiny import tiny_sd3

    pipe = tiny_sd3(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(1,))
    blocks = pipe.transformer.transformer_blocks
    seen = {}
    hs = [_record_lengths(b, seen, i) for i, b in enumerate(blocks)]
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, mmdit_prune_after=[0], mmdit_refill_after=-2)
    rep = m.apply(pipe, ApplyContext(family="sd3"))
    try:
        img = generate(pipe, "sd3", steps=1)
    finally:
        m.remove(pipe)
        for h in hs:
            h.remove()
    n = seen[0][0]
    k = K.keep_count(n, 0.5)
    assert [seen[i][0] for i in range(4)] == [n, k, k, n]  # refilled after block 2
    assert torch.isfinite(img).all() and rep.details["pruning_layers"] == ["transformer_blocks.0"]
    with pytest.raises(ConfigError):
        ATEDM(mmdit_prune_after=[2], mmdit_refill_after=1).apply(pipe, ApplyContext(family="sd3"))


@pytest.mark.parametrize(
    "kw",
    [
        {"selection": "random"},
        {"selection": "attn_colsum"},
        {"head_reduce": "rms"},
        {"assignment": "cosine"},
        {"score_source": "cross"},
        {"cfg_shared_mask": False},
        {"prune_after_layers": [0], "downsamples": [2], "prune_point": "after_self_attn"},
    ],
)
def test_variants_run_and_prune(pipes, kw):
    pipe = pipes["sdxl"]
    dense = generate(pipe, "sdxl", steps=1)
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, profile=True, **kw)
    m.apply(pipe, ApplyContext(family="sdxl"))
    try:
        out = generate(pipe, "sdxl", steps=1)
        timings = {k[len("time_"):-len("_s")] for k in m.run_metrics() if k.startswith("time_")}
    finally:
        m.remove(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert {"gwpr", "mask", "gather", "refill"} <= timings


def test_cfg_batch_shares_the_mask(pipes, monkeypatch):
    calls = []
    real = K.keep_indices

    def spy(scores, k, cfg_shared=False):
        keep = real(scores, k, cfg_shared)
        calls.append((cfg_shared, keep))
        return keep

    monkeypatch.setattr(K, "keep_indices", spy)
    pipe = pipes["sdxl"]
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    m.apply(pipe, ApplyContext(family="sdxl"))
    try:
        generate(pipe, "sdxl", guidance=3.0, steps=1)  # CFG: batch [uncond x2, cond x2]
        assert calls and all(shared for shared, _ in calls)
        assert all(torch.equal(keep[:2], keep[2:]) for _, keep in calls)
        calls.clear()
        generate(pipe, "sdxl", guidance=1.0, steps=1)  # no CFG: two different samples
        assert calls and not any(shared for shared, _ in calls)
    finally:
        m.remove(pipe)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
@pytest.mark.parametrize("assignment", ["attention", "cosine"])
def test_cfg_batch_maps_the_cond_half_only(pipes, monkeypatch, family, assignment):
    """With a shared CFG mask the uncond half's map is never computed, and the images equal
    those of computing both halves' maps (the uncond map was discarded anyway)."""
    from edm.methods.token import attn_map

    pipe = pipes[family]
    mapped_batches = []
    real = attn_map.attention_with_map

    def spy(q, *a, **kw):
        mapped_batches.append(q.shape[0])
        return real(q, *a, **kw)

    monkeypatch.setattr(attn_map, "attention_with_map", spy)
    outs = {}
    for cond_only in (True, False):
        if not cond_only:  # reference: every row mapped, as before the optimisation
            monkeypatch.setattr(
                attn_map, "_attention_with_map_cfg", lambda slot, q, k, v, **kw: real(q, k, v, **kw)
            )
        m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, assignment=assignment)
        m.apply(pipe, ApplyContext(family=family))
        try:
            outs[cond_only] = generate(pipe, family, guidance=3.0, steps=2)
        finally:
            m.remove(pipe)
    assert mapped_batches and set(mapped_batches) == {2}  # CFG batch of 4: cond half = 2 rows
    assert torch.allclose(outs[True], outs[False], atol=1e-5)


def test_meta_cfg_batch_counts_one_map_per_pair():
    """FLOPs on meta: a CFG batch (``meta_cfg_batch``) counts the cond half's maps only."""
    from edm.eval.flops import meta_pipe, trajectory_flops

    pipe, inputs = meta_pipe("sdxl", 256, 256, batch=2)
    counts = []
    for cfg in (False, True):
        m = ATEDM(prune_ratio=0.63, dsap=NO_DSAP)
        counts.append(trajectory_flops(pipe, inputs, m, cfg_batch=cfg))
    assert counts[1] < counts[0]


def test_dsap_schedule_and_early_steps_prune_less(pipes):
    pipe = pipes["sdxl"]
    blocks = adapter("sdxl").attention_blocks(pipe.unet)
    d = DSAP(early_steps=0.5, block_rule="first_down_last_up")
    exempt = [b.name for b in blocks if d.exempt(b)]
    assert exempt and all(
        (b.stage == "down" and b.position == 0)
        or (b.stage == "up" and b.position == b.stage_len - 1)
        for b in blocks
        if b.name in exempt
    )
    assert d.tau(10) == 5 and d.is_early(4, 10) and not d.is_early(5, 10)
    assert d.ratio(0.6, blocks[0], 0, 10) == (0.0 if d.exempt(blocks[0]) else 0.6)
    assert DSAP(early_steps=2, early_prune_ratio=0.2).ratio(0.6, blocks[1], 1, None) in (0.0, 0.2)
    with pytest.raises(ConfigError):
        DSAP(block_rule="bogus")
    with pytest.raises(ConfigError):
        DSAP(early_steps=1.5)
    # in a pipeline run the exempt blocks keep every token during the early steps only
    lay = next(b for b in blocks if d.exempt(b) and len(b.layers) == 2).layers[1][1]
    seen = {}
    h = _record_lengths(lay, seen, "l1")
    m = ATEDM(prune_ratio=0.5, dsap={"enabled": True, "early_steps": 1})
    m.apply(pipe, ApplyContext(family="sdxl"))
    try:
        generate(pipe, "sdxl", steps=3)
    finally:
        m.remove(pipe)
        h.remove()
    n = seen["l1"][0]
    assert seen["l1"] == [n, K.keep_count(n, 0.5), K.keep_count(n, 0.5)]


def test_dsap_on_digits_follows_the_pipeline_steps(pipes):
    """The digits pipeline's steps drive DSAP: an exempt block keeps every token in the early
    steps only, and DSAP settings that exempt nothing are bit-identical to DSAP off."""
    pipe = pipes["digits"]
    blocks = adapter("digits").attention_blocks(pipe.unet)
    d = DSAP(early_steps=1)
    info = next(b for b in blocks if d.exempt(b))
    seen = {}
    h = _record_lengths(info.layers[0][1].attn2, seen, "attn2")
    outs = {}
    variants = {
        "off": {"enabled": False},
        "early1": {"enabled": True, "early_steps": 1},
        "rule_none": {"enabled": True, "early_steps": 1, "block_rule": "none"},
        "tau0": {"enabled": True, "early_steps": 0},
    }
    try:
        for name, dsap in variants.items():
            seen.clear()
            m = ATEDM(prune_ratio=0.5, dsap=dsap)
            m.apply(pipe, ApplyContext(family="digits"))
            try:
                outs[name] = generate(pipe, "digits", steps=3)
            finally:
                m.remove(pipe)
            if name == "early1":
                n = seen["attn2"][0]
                assert seen["attn2"] == [n, K.keep_count(n, 0.5), K.keep_count(n, 0.5)]
    finally:
        h.remove()
    assert torch.equal(outs["rule_none"], outs["off"]) and torch.equal(outs["tau0"], outs["off"])
    assert not torch.equal(outs["early1"], outs["off"])


def test_nothing_patched_is_an_error(pipes):
    # SD1.5 blocks have one layer: pruning after its FFN would refill at once, so nothing applies
    with pytest.raises(NothingPatchedError):
        ATEDM(prune_point="after_ffn").apply(pipes["sd15"], ApplyContext(family="sd15"))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_random_scores_drawn_before_the_call_are_the_layers_own_draws(pipes, family, monkeypatch):
    """selection=random: the denoiser's pre-hook draws one pool (so a compiled forward holds no
    generator) and rewinds the generator after the call to what the layers used: the images
    equal those of the layers drawing for themselves (CPU generators are serial), and the stream
    continues correctly across the steps and trajectories."""
    from edm.methods.token.atedm_hooks import DenoiserHook

    def run():
        m = ATEDM(prune_ratio=0.5, selection="random", dsap={"early_steps": 1}, seed=3)
        m.apply(pipes[family], ApplyContext(family=family))
        try:
            return torch.cat([generate(pipes[family], family, steps=3) for _ in range(2)])
        finally:
            m.remove(pipes[family])

    pooled = run()
    used = []
    orig = DenoiserHook.after
    def spy(self, *a):  # a forward hook: returns None, the output stays
        used.append(self.shared.pool_off)
        orig(self, *a)

    monkeypatch.setattr(DenoiserHook, "after", spy)
    assert torch.equal(run(), pooled) and min(used[1:]) > 0  # the pool fed every pruned call
    monkeypatch.setattr(DenoiserHook, "after", orig)
    real_call = DenoiserHook.__call__

    def no_pool(self, *a):  # the layers draw themselves (the pre-compile behaviour)
        n, self.shared.prune_layers = self.shared.prune_layers, 0
        real_call(self, *a)
        self.shared.prune_layers = n

    monkeypatch.setattr(DenoiserHook, "__call__", no_pool)
    assert torch.equal(run(), pooled)
